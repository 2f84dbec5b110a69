"""Stage one: run the MLLM once per (image, prompt) and write the vectors to cache shards.

The run is cut into shards planned from the sorted image keys alone, so any number of
uncoordinated workers (``torchrun`` ranks, SLURM array tasks, ``--workers W --worker R``) fill
one cache: worker r of W takes the shards whose index is r modulo W. A shard is written whole
and renamed into place, so a killed run leaves only whole shards and a rerun does the rest.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
import warnings
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from agiqa.cache import MANIFEST, SemanticCache, ShardData, semantic_spec
from agiqa.data.datasets import Dataset
from agiqa.data.images import list_images, load_image, regular_file, resolve_key
from agiqa.errors import AgiqaError, ConfigError
from agiqa.models.mllm import BatchPreparer, SemanticEncoder
from agiqa.presets import DEFAULT_MLLM, DEFAULT_PROMPTS, load_prompts
from agiqa.stages.extraction.resume import ShardJob, discard_damaged, merge_rows, plan_resume

__all__ = ["ExtractConfig", "ExtractReport", "ImageSource", "default_loader_workers",
           "extract_semantics", "ordered_load", "semantic_spec_of", "worker_slot"]


@dataclass
class ExtractConfig:
    """Options of ``agiqa extract-semantics``."""

    out: Path
    model: str = DEFAULT_MLLM
    revision: str | None = None
    format: str | None = None
    prompts: str = DEFAULT_PROMPTS
    batch_size: int = 8
    shard_size: int = 1024
    device: str = "auto"
    dtype: str = "auto"
    trust_remote_code: bool = False
    retry_failed: bool = True
    workers: int | None = None
    worker: int | None = None
    loader_workers: int | None = None
    compile: bool = False
    attn_implementation: str | None = None
    pad_square: bool | None = None
    fuse_prompts: bool | None = None
    progress: bool = True
    # The images (for agiqa.extract_semantics): a folder, or a data set's label file.
    images: Path | None = None
    dataset: str | None = None
    root: Path | None = None
    labels: Path | None = None
    image_column: str | None = None

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        if self.batch_size < 1:
            raise ConfigError(f"batch size must be at least 1, got {self.batch_size}")
        if self.loader_workers is not None and self.loader_workers < 0:
            raise ConfigError(f"loader workers must be 0 or more, got {self.loader_workers}")


@dataclass
class ImageSource:
    """The images of a run: keys relative to ``root``, plus files that are not images."""

    root: Path
    keys: list[str]
    skipped: list[str] = field(default_factory=list)
    # folders below the root that could not be listed (key with a trailing "/") → reason
    unlisted: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_folder(cls, root: str | os.PathLike, recursive: bool = True,
                    exclude: str | os.PathLike | None = None) -> ImageSource:
        """The images below ``root``; ``exclude``: a folder not to walk (the output)."""
        unlisted: dict[str, str] = {}
        keys, others = list_images(root, recursive, exclude, unlisted)
        return cls(Path(root), keys, others, unlisted)

    @classmethod
    def from_dataset(cls, ds: Dataset) -> ImageSource:
        return cls(ds.root, sorted(ds.keys))


@dataclass
class ExtractReport:
    cache: str
    requested: int
    computed: int = 0
    reused: int = 0
    failures: dict[str, str] = field(default_factory=dict)
    skipped_files: list[str] = field(default_factory=list)
    shards_written: int = 0
    changed: list[str] = field(default_factory=list)
    retried: list[str] = field(default_factory=list)
    damaged_shards: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    worker: int = 0
    workers: int = 1
    forward_passes: int = 0
    model_calls: int = 0
    tokens: int = 0
    padding_tokens: int = 0
    loader_workers: int = 0
    # the keys this run computed (failed ones included), for counts that add up
    computed_keys: set[str] = field(default_factory=set, repr=False)

    @property
    def images_per_second(self) -> float:
        return self.computed / self.seconds if self.seconds > 0 else 0.0

    @property
    def exit_code(self) -> int:
        return 2 if self.failures else 0

    def to_dict(self) -> dict:
        return {
            "cache": self.cache, "requested": self.requested, "computed": self.computed,
            "reused": self.reused, "failed": len(self.failures), "failures": self.failures,
            "skipped_files": self.skipped_files, "shards_written": self.shards_written,
            "changed": self.changed, "retried": self.retried,
            "damaged_shards": self.damaged_shards,
            "seconds": round(self.seconds, 3),
            "images_per_second": round(self.images_per_second, 3),
            "forward_passes": self.forward_passes, "model_calls": self.model_calls,
            "tokens": self.tokens,
            "padding_fraction": round(self.padding_tokens / self.tokens, 4) if self.tokens else 0.0,
            "worker": self.worker, "workers": self.workers,
            "loader_workers": self.loader_workers,
        }


def worker_slot(workers: int | None = None, worker: int | None = None) -> tuple[int, int]:
    """(rank, world size) from the options, else from a ``torchrun`` environment, else (0, 1)."""
    if workers is None and worker is None:
        workers = int(os.environ.get("WORLD_SIZE", "1"))
        worker = int(os.environ.get("RANK", "0"))
    workers = 1 if workers is None else workers
    worker = 0 if worker is None else worker
    if workers < 1 or not 0 <= worker < workers:
        raise ConfigError(f"worker index {worker} is out of range (0 to {workers - 1})")
    return worker, workers


def default_loader_workers(device: torch.device | str) -> int:
    """Loader processes when none are asked for: on a GPU ``min(8, cpus - 1)``, enough to keep
    it fed at ~20 ms of CPU per large image; on a CPU ``min(2, cpus)``, the earlier fixed
    default, which measured faster on two cores than one loader process."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cpus = cpus or 1
    if torch.device(device).type == "cuda":
        return max(0, min(8, cpus - 1))
    return max(0, min(2, cpus))


def _decode(root: Path, key: str):
    """(image, sha, None) or (None, None, reason): a bad file is a recorded failure."""
    try:
        img, sha = load_image(resolve_key(root, key, "image list"), key)
        return img, sha, None
    except AgiqaError as e:  # a bad file or a refused path: recorded, never fatal
        return None, None, getattr(e, "reason", None) or str(e)


class _LoadPixels:
    """One image -> (key, sha, uint8 pixels, failure reason), in a loader process."""

    def __init__(self, root: Path, prepare: BatchPreparer):
        self.root, self.prepare = root, prepare

    def __call__(self, key: str):
        img, sha, reason = _decode(self.root, key)
        if reason is not None:
            return key, None, None, reason
        try:
            return key, sha, self.prepare.image_item(img), None
        except Exception as e:  # noqa: BLE001 - one image refused, the run goes on
            return key, None, None, f"the MLLM's processor refused it ({type(e).__name__}: {e})"


class _LoadBatch:
    """Keys -> (keys, shas, failures, processor inputs), the processor run in a loader process
    (model families whose processor is not split into uint8 pixels and a device step)."""

    def __init__(self, root: Path, prepare: BatchPreparer):
        self.root, self.prepare = root, prepare

    def _inputs(self, images):
        return self.prepare.all_prompts(images)

    def __call__(self, keys: list[str]):
        items = [(k, *_decode(self.root, k)) for k in keys]
        failures = {k: reason for k, _, _, reason in items if reason is not None}
        good = [(k, img, sha) for k, img, sha, reason in items if reason is None]
        try:
            inputs = self._inputs([img for _, img, _ in good]) if good else []
        except Exception:  # noqa: BLE001 - find the images the processor refuses, keep the rest
            kept = []
            for k, img, sha in good:
                try:
                    self._inputs([img])
                    kept.append((k, img, sha))
                except Exception as e:  # noqa: BLE001
                    failures[k] = f"the MLLM's processor refused it ({type(e).__name__}: {e})"
            good = kept
            inputs = self._inputs([img for _, img, _ in good]) if good else []
        return [k for k, _, _ in good], [s for _, _, s in good], failures, inputs


_TASK = None  # the task function of a loader process, set once when it starts


def _start_loader(task) -> None:
    global _TASK
    _TASK = task
    torch.set_num_threads(1)


def _run_task(item):
    return _TASK(item)


KILLED = ("its loader process was killed by the operating system while reading it (out of "
          "memory?)")


def _loader_pool(workers: int, task) -> ProcessPoolExecutor:
    methods = mp.get_all_start_methods()
    ctx = mp.get_context("fork" if "fork" in methods else "spawn")
    return ProcessPoolExecutor(workers, mp_context=ctx, initializer=_start_loader,
                               initargs=(task,))


def ordered_load(task, items: list, workers: int, ahead: int, split, died) -> Iterator:
    """``task(item)`` for each of ``items``, in order, run in ``workers`` processes with up to
    ``ahead`` items in flight (``workers=0``: in this process).

    A loader process that dies (killed by the operating system, e.g. for memory) takes none
    of the run with it: the items it may have held are run again one key at a time
    (``split(item)`` gives the one-key items), each in a process of its own, and a key whose
    process dies again gives ``died(key_item)``, its failure by name.
    """
    if workers == 0:
        for item in items:
            yield task(item)
        return
    pending: deque = deque()
    pool = _loader_pool(workers, task)
    try:
        at = 0
        while at < len(items) or pending:
            while at < len(items) and len(pending) < ahead:
                pending.append((items[at], pool.submit(_run_task, items[at])))
                at += 1
            item, future = pending.popleft()
            try:
                yield future.result()
                continue
            except BrokenProcessPool:
                pass
            pool.shutdown(wait=True, cancel_futures=True)
            suspects = [(item, future), *pending]
            pending.clear()
            for item, future in suspects:
                if future.done() and not future.cancelled() and future.exception() is None:
                    yield future.result()
                    continue
                for one in split(item):
                    with _loader_pool(1, task) as alone:
                        try:
                            result = alone.submit(_run_task, one).result()
                        except BrokenProcessPool:
                            result = died(one)
                    yield result
            pool = _loader_pool(workers, task)
    finally:  # waits for the images in hand at most: no loader outlives the run
        pool.shutdown(wait=True, cancel_futures=True)


def semantic_spec_of(encoder: SemanticEncoder) -> dict:
    """What the cache fingerprints for vectors of ``encoder``: model, revision, dtype, prompts,
    recipe."""
    p = encoder.prompts
    return semantic_spec(encoder.model_id, encoder.resolved_revision, encoder.dtype, p.texts,
                         p.answer_prefix, p.rating_words, p.rating_weights, encoder.recipe_spec)


def extract_semantics(
    cfg: ExtractConfig, source: ImageSource, encoder: SemanticEncoder | None = None
) -> ExtractReport:
    """Fill the cache ``cfg.out`` with the semantic vectors of ``source``'s images."""
    start = time.perf_counter()
    rank, world = worker_slot(cfg.workers, cfg.worker)
    if encoder is None:
        encoder = SemanticEncoder(
            cfg.model, load_prompts(cfg.prompts), revision=cfg.revision, device=cfg.device,
            dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code,
            attn_implementation=cfg.attn_implementation, pad_square=cfg.pad_square,
            fuse_prompts=cfg.fuse_prompts, compile=cfg.compile,
        )
    spec = semantic_spec_of(encoder)

    def create() -> SemanticCache:
        return SemanticCache.create(cfg.out, spec, encoder.prompts.names, encoder.dim,
                                    cfg.format, root=source.root)

    # An existing cache is checked (fingerprint, format) before any work; a new one is created
    # only once the model has loaded, so a failed load leaves nothing behind.
    out = Path(cfg.out)
    existing = (out / MANIFEST).is_file() or (out.is_dir() and any(out.iterdir()))
    cache = create() if existing else None
    report = ExtractReport(str(cfg.out), len(source.keys), skipped_files=list(source.skipped),
                           worker=rank, workers=world)
    report.failures.update(source.unlisted)
    plan = plan_resume(cache, source.keys, Path(source.root), cfg.shard_size, rank, world,
                       cfg.retry_failed)
    report.reused, report.changed, report.retried = plan.reused, plan.changed, plan.retried
    report.damaged_shards = plan.damaged
    report.loader_workers = (default_loader_workers(encoder.device)
                             if cfg.loader_workers is None else cfg.loader_workers)
    if plan.jobs:
        encoder.load(progress=cfg.progress)
    if cache is None:
        cache = create()
    discard_damaged(cache, plan)
    if plan.jobs:
        _run_shards(cfg, cache, encoder, source.root, plan.jobs, report)
    cache.refresh()
    known = cache.failures
    report.failures.update({k: known[k] for k in source.keys if k in known})
    # Counts that add up: each requested image is computed now, already cached, or failed
    # (a key computed but failed counts once, as failed).
    wanted, held = set(source.keys), set(cache.keys)
    done = {k for k in report.computed_keys if k in wanted and k not in report.failures}
    report.computed = len(done)
    report.reused = len((wanted & held) - done - set(report.failures))
    report.seconds = time.perf_counter() - start
    return report


def _largest_first(root: Path, keys: list[str]) -> list[str]:
    """``keys`` by image area, largest first, read from the file headers (no decoding).

    Models of dynamic resolution (Qwen2-VL) give larger images more tokens; batching images of
    similar size keeps padding low, and the largest batch comes first, so a batch that does not
    fit in memory fails at once. Unreadable files sort last; the loader reports them.
    """
    from PIL import Image

    def area(key: str) -> int:
        try:
            # Only regular files are opened: a FIFO would block here forever. A bomb's
            # warning is the loader's to report.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                im = Image.open(regular_file(resolve_key(root, key, "image list"), key))
            with im:
                return im.size[0] * im.size[1]
        except Exception:  # noqa: BLE001 - reported by the loader with its reason
            return 0

    areas = {k: area(k) for k in keys}
    return sorted(keys, key=lambda k: -areas[k])


def _run_shards(cfg: ExtractConfig, cache: SemanticCache, encoder: SemanticEncoder, root: Path,
                jobs: list[ShardJob], report: ExtractReport) -> None:
    """Per image, the pixels as uint8, when the model's processor allows it (mPLUG-Owl2,
    LLaVA, Qwen2-VL and Qwen2.5-VL): the first batch starts after one image per loader
    process, the batch is stacked in the main process (in pinned memory for a GPU) and
    normalised on the device. Otherwise per batch, the processor run in the loader
    processes."""
    workers = report.loader_workers
    prepare = encoder.prepare
    per_image = prepare.uint8_pixels
    pending = [(job.name, _largest_first(root, job.compute)) for job in jobs]
    batches = [shard_keys[i:i + cfg.batch_size] for _, shard_keys in pending
               for i in range(0, len(shard_keys), cfg.batch_size)]
    ahead = max(2 * cfg.batch_size, 4 * workers) if per_image else 4 * max(workers, 1)
    if per_image:
        results = ordered_load(_LoadPixels(root, prepare),
                               [k for b in batches for k in b], workers, ahead,
                               split=lambda key: [key],
                               died=lambda key: (key, None, None, KILLED))
        loaded = _pixel_batches(results, batches, prepare, encoder.device.type == "cuda")
    else:
        loaded = ordered_load(_LoadBatch(root, prepare), batches, workers, ahead,
                              split=lambda keys: [[k] for k in keys],
                              died=lambda keys: ([], [], {keys[0]: KILLED}, []))
    n_prompts = len(encoder.prompts.texts)
    bar = tqdm(total=sum(map(len, batches)), unit="img", desc="extract-semantics",
               disable=not cfg.progress, dynamic_ncols=True)
    job_iter = iter(jobs)
    job = next(job_iter)
    acc = _ShardAccumulator()
    for batch_keys, shas, failures, inputs in loaded:
        acc.failures.update(failures)
        if batch_keys:
            for batch in inputs:  # counted on the host copies: no wait for the device
                tokens, padding = encoder.tokens_run(batch)
                report.tokens += tokens
                report.padding_tokens += padding
                report.forward_passes += batch["attention_mask"].shape[0]
                report.model_calls += 1
            acc.add(batch_keys, shas, *encoder.encode_all(inputs))
        bar.update(len(batch_keys) + len(failures))
        if job is not None and acc.count == len(job.compute):
            new = acc.finish(job.compute, n_prompts, encoder.dim)
            cache.write_shard(job.name, merge_rows(job.kept, new, job.order))
            report.shards_written += 1
            report.computed += len(job.compute)
            report.computed_keys.update(job.compute)
            acc = _ShardAccumulator()
            job = next(job_iter, None)
    bar.close()


def _pixel_batches(results: Iterator, batches: list[list[str]], prepare: BatchPreparer,
                   pin: bool) -> Iterator:
    """Group the per-image results into ``batches`` (keys, shas, failures, inputs): the uint8
    pixels stacked in one (pinned) tensor, the text side made here."""
    for keys in batches:
        got = [next(results) for _ in keys]
        failures = {k: reason for k, _, _, reason in got if reason is not None}
        good = [(k, sha, px) for k, sha, px, reason in got if reason is None]
        inputs = []
        if good:
            inputs = prepare.all_prompts_pixels(
                prepare.batch_pixels([px for _, _, px in good], pin))
        yield [k for k, _, _ in good], [s for _, s, _ in good], failures, inputs


class _ShardAccumulator:
    """A shard's results as they come, left on the model's device: the copy to the host (and
    the finiteness check, which needs it) happens once per shard, not once per batch."""

    def __init__(self):
        self.keys: list[str] = []
        self.shas: list[str] = []
        self.vectors: list[torch.Tensor] = []
        self.zero_shot: list[torch.Tensor] = []
        self.failures: dict[str, str] = {}

    @property
    def count(self) -> int:
        return len(self.keys) + len(self.failures)

    def add(self, keys, shas, vectors, zero_shot) -> None:
        self.keys.extend(keys)
        self.shas.extend(shas)
        self.vectors.append(vectors)
        self.zero_shot.append(zero_shot)

    def finish(self, order: list[str], n_prompts: int, dim: int) -> ShardData:
        keys, shas = [], []
        vectors = np.zeros((0, n_prompts, dim), np.float16)
        zero_shot = np.zeros((0, n_prompts), np.float32)
        if self.keys:
            v, z = torch.cat(self.vectors), torch.cat(self.zero_shot)
            finite = torch.isfinite(v).flatten(1).all(1) & torch.isfinite(z).all(1)
            finite &= v.abs().flatten(1).amax(1) <= float(np.finfo(np.float16).max)
            keep = finite.cpu().numpy()  # the one wait for the device in a shard
            bad = "the MLLM produced a non-finite or float16-overflowing vector"
            self.failures.update({k: bad for k, ok in zip(self.keys, keep, strict=True) if not ok})
            keys = [k for k, ok in zip(self.keys, keep, strict=True) if ok]
            shas = [h for h, ok in zip(self.shas, keep, strict=True) if ok]
            if keys:
                vectors = v.to(torch.float16).cpu().numpy()[keep]
                zero_shot = z.to(torch.float32).cpu().numpy()[keep]
        position = {k: i for i, k in enumerate(order)}
        failures = sorted(self.failures.items(), key=lambda kv: position[kv[0]])
        return ShardData(keys, shas, vectors, zero_shot, failures)
