"""Stage one: run the MLLM once per (image, prompt) and write the vectors to cache shards.

The run is cut into shards planned from the sorted image keys alone, so any number of
uncoordinated workers (``torchrun`` ranks, SLURM array tasks, ``--workers W --worker R``) fill
one cache: worker r of W takes the shards whose index is r modulo W. A shard is written whole
and renamed into place, so a killed run leaves only whole shards and a rerun does the rest.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from agiqa.cache import MANIFEST, SemanticCache, ShardData, semantic_spec
from agiqa.data.datasets import Dataset
from agiqa.data.images import list_images, regular_file, resolve_key
from agiqa.data.loader import KILLED, decode_file, ordered_load
from agiqa.errors import AgiqaError, ConfigError
from agiqa.models.mllm import BatchPreparer, SemanticEncoder
from agiqa.presets import load_prompts
from agiqa.stages.configs import ExtractConfig
from agiqa.stages.extraction.resume import ShardJob, discard_damaged, merge_rows, plan_resume

__all__ = ["KILLED", "ExtractConfig", "ExtractReport", "ImageSource", "compute_shards",
           "default_loader_workers", "extract_semantics", "ordered_load", "semantic_spec_of",
           "worker_slot"]


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
    """What ``agiqa extract-semantics`` did.

    Attributes:
        cache: the cache folder.
        requested: the images asked for (this worker's and the others').
        computed: images whose vectors this run computed.
        reused: images the cache already held.
        failures: image → the reason it failed (recorded in the cache; retried on a rerun).
        skipped_files: files that are not images (or whose names are not UTF-8).
        shards_written: shards this run wrote.
        changed: images computed again because their file changed since it was cached.
        retried: images that had failed before and were tried again.
        damaged_shards: shard → why it was damaged; rebuilt by this run.
        seconds: the wall time of the run.
        worker: this worker's index; workers: how many fill the cache.
        forward_passes: MLLM forward passes; model_calls: calls of the model.
        tokens: tokens of every forward pass; padding_tokens: the padding among them.
        loader_workers: the image decoding processes used.
        engine: ``local`` or ``ray``; on Ray, actors: the shards (and images) each actor wrote,
            reassigned: the shards handed out again after their actor died, engine_seconds:
            seconds to Ray joined, to every actor ready, and of the shards.
        computed_keys: the keys this run computed (failed ones included), for counts that add
            up.
    """

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
    engine: str = "local"
    # On Ray: shards (and images) each actor wrote, and the shards handed out again after the
    # actor that held them died.
    actors: dict[str, dict[str, int]] = field(default_factory=dict)
    reassigned: list[str] = field(default_factory=list)
    # On Ray: seconds from the start to Ray joined, to every actor ready, and of the shards.
    engine_seconds: dict[str, float] = field(default_factory=dict)
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
            **({"engine": self.engine, "actors": self.actors, "reassigned": self.reassigned,
                "engine_seconds": self.engine_seconds} if self.engine != "local" else {}),
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
        path = resolve_key(root, key, "image list")
    except AgiqaError as e:  # a refused path: recorded, never fatal
        return None, None, str(e)
    return decode_file(path, key)


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
            cfg.mllm, load_prompts(cfg.prompts), revision=cfg.revision, device=cfg.device,
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
        compute_shards(cfg, cache, encoder, source.root, plan.jobs, report)
    cache.refresh()
    settle_counts(report, cache, source.keys)
    report.seconds = time.perf_counter() - start
    return report


def settle_counts(report: ExtractReport, cache: SemanticCache, keys: list[str]) -> None:
    """The failures the cache records for ``keys``, and counts that add up: each requested
    image is computed now, already cached, or failed (a key computed but failed counts once,
    as failed), whichever engine computed them."""
    known = cache.failures
    report.failures.update({k: known[k] for k in keys if k in known})
    wanted, held = set(keys), set(cache.keys)
    done = {k for k in report.computed_keys if k in wanted and k not in report.failures}
    report.computed = len(done)
    report.reused = len((wanted & held) - done - set(report.failures))


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


def compute_shards(cfg: ExtractConfig, cache: SemanticCache, encoder: SemanticEncoder,
                   root: Path, jobs: list[ShardJob], report: ExtractReport) -> None:
    """Compute the images of ``jobs`` and write each shard whole, atomically, in order, adding
    the counts to ``report`` (a local run calls it with all its shards, a Ray actor with one).

    Per image, the pixels as uint8, when the model's processor allows it (mPLUG-Owl2,
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
