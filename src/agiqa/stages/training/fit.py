"""Stage two: train the MANIQA backbone and the MoE head from cached semantic vectors.

Never loads the MLLM. Images are decoded and resized to uint8 224×224 once; every epoch after
that reads memory. The official protocol is the default (the official ``main.py``):
the seed-20 70/10/20 split cut at ``int(n·0.7)``/``int(n·0.8)``, Adam 1e-5 / 1e-5, batch 8 with
the last partial training batch dropped, 30 epochs, MSE, cosine annealing stepped every
iteration with T_max 50, rotation and vertical flip augmentation, float32, the best epoch by
raw validation SRCC + Pearson PLCC; then one pass over the whole test split.
"""

from __future__ import annotations

import contextlib
import errno
import random
import sys
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from agiqa import runtime as dist
from agiqa.cache import SemanticCache, SemanticSpec, open_cache
from agiqa.data.datasets import load_dataset
from agiqa.data.pixel_cache import PixelCache
from agiqa.data.splits import Split, make_split
from agiqa.errors import ConfigError, DatasetError, MissingVectorsError, TrainingError
from agiqa.fileio import write_json, write_text
from agiqa.metrics import evaluate
from agiqa.models.agiqa_net import (
    AgiqaNet,
    create_model,
    pretrained_name,
    resolve_pretrained,
    save_model,
)
from agiqa.options import spell
from agiqa.runtime import resolve_device
from agiqa.stages.configs import FitConfig, model_experts
from agiqa.stages.predict import backbone_keys, inputs_of, predict, predict_keys
from agiqa.stages.rundir import (
    CHECKPOINT,
    SPLIT,
    SUMMARY,
    TRAIN_LOG,
    RunConfig,
    check_out,
    check_resume,
    check_split_unchanged,
    is_finished,
    mark_finished,
    read_metrics,
    run_folder,
    training_dict,
    write_outputs,
    write_training,
)
from agiqa.stages.training.norms import SCORE_NORMS, SEMANTIC_NORMS
from agiqa.stages.training.norms import fold_key_norm as _fold_key_norm
from agiqa.stages.training.norms import fold_score_norm as _fold_score_norm
from agiqa.stages.training.norms import fold_semantic_norm as _fold_semantic_norm
from agiqa.stages.training.norms import key_norm as _key_norm
from agiqa.stages.training.norms import score_norm as _score_norm
from agiqa.stages.training.norms import semantic_norm as _semantic_norm
from agiqa.stages.training.together import (
    Concurrency,
    RunInputs,
    choose_concurrency,
    train_together,
)
from agiqa.stages.training.trainer import (
    MIN_EVAL_IMAGES,
    DivergedError,
    ProtocolWarning,
    Trainer,
    caches_keys,
    new_adam,
    steps_per_epoch,
    validation_images,
)

__all__ = ["SCORE_NORMS", "SEMANTIC_NORMS", "FitConfig", "FitResult", "MetricSummary",
           "ProtocolWarning", "RunFailedWarning", "RunResult", "fit_repeats", "summarise"]


@dataclass
class MetricSummary:
    """One test metric over the finished runs of a series: mean, sample standard deviation
    (``ddof=1``; None for fewer than two runs) and the number of runs."""

    mean: float
    std: float | None
    n: int

    def to_dict(self) -> dict[str, Any]:
        return {"mean": self.mean, "std": self.std, "n": self.n}


@dataclass
class RunResult:
    """One run of ``fit``: where it is, its seeds, its test metrics, the selected epoch and its
    validation figures; or, for a run that diverged, the error (and no metrics)."""

    name: str
    out: Path
    seed: int
    split_seed: int
    test: dict[str, float] | None = None
    val: dict[str, float] | None = None
    best_epoch: int | None = None
    error: str | None = None
    history: list[dict[str, Any]] = field(default_factory=list, repr=False)

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "out": str(self.out), "seed": self.seed,
                "split_seed": self.split_seed, "test": self.test, "val": self.val,
                "best_epoch": self.best_epoch, "error": self.error}


@dataclass
class FitResult:
    """What ``fit`` returns: a series of runs (one run is a series of one), each run's result,
    the summary of each test metric over the finished runs, and how many trained at once."""

    out: Path
    runs: list[RunResult]
    summary: dict[str, MetricSummary]
    concurrency: dict[str, Any]
    repeats: int = 1
    split_seeds: int = 1

    @property
    def finished(self) -> list[RunResult]:
        return [r for r in self.runs if r.ok]

    @property
    def failed(self) -> list[RunResult]:
        return [r for r in self.runs if not r.ok]

    @property
    def test(self) -> dict[str, float]:
        """The test metrics of a single run (of the first finished run of a series)."""
        return self.finished[0].test or {} if self.finished else {}

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (``fit --json``, ``summary.json``)."""
        return {"out": str(self.out), "runs": [r.to_dict() for r in self.runs],
                "summary": {k: v.to_dict() for k, v in self.summary.items()},
                "concurrency": self.concurrency, "repeats": self.repeats,
                "split_seeds": self.split_seeds}


def summarise(runs: list[RunResult]) -> dict[str, MetricSummary]:
    """Mean, sample std (``ddof=1``) and n of each test metric over the finished runs."""
    tests = [r.test for r in runs if r.ok and r.test]
    if not tests:
        return {}
    out = {}
    for k in tests[0]:
        values = np.array([t[k] for t in tests], dtype=np.float64)
        out[k] = MetricSummary(float(values.mean()),
                               float(values.std(ddof=1)) if len(values) > 1 else None,
                               len(values))
    return out


def _check_split(split: Split, n: int, batch_size: int) -> None:
    """Refuse splits too small to select an epoch or report metrics, before any training."""
    sizes = {name: len(split.subset(name)) for name in ("train", "val", "test")}
    counts = ", ".join(f"{k} {v}" for k, v in sizes.items())
    if sizes["train"] < 1:
        raise DatasetError(f"the train split is empty ({split.method} of {n} images: {counts})")
    for name in ("val", "test"):
        if sizes[name] < MIN_EVAL_IMAGES:
            raise DatasetError(
                f"the {name} split has {sizes[name]} image(s) ({split.method} of {n} images: "
                f"{counts}); selecting an epoch and the test metrics need at least "
                f"{MIN_EVAL_IMAGES}: use more images or other --split ratios")
    steps_per_epoch(sizes["train"], batch_size)  # warns when no full batch fits
    validation_images(sizes["val"], batch_size)


def _check_vectors(cache: SemanticCache, split: Split) -> None:
    missing = [k for k in split.subset("all") if k not in cache]
    if missing:
        raise MissingVectorsError(missing, where=f"cache {cache.path}; run extract-semantics first")


def _run_keys(cfg: FitConfig, model: AgiqaNet, pixels: torch.Tensor,
              part: dict[str, torch.Tensor], device: torch.device):
    """A frozen backbone's key of every image, computed once (all None when the backbone
    trains or the pixels change per step): the keys training reads (standardised with
    ``--key-norm``), that norm, and the raw keys the final scoring reads (the norm folded)."""
    if not caches_keys(cfg):
        return None, None, None
    raw = backbone_keys(model, pixels, device, cfg.eval_batch_size, cfg.amp)
    k_norm = _key_norm(cfg.key_norm, raw[part["train"]])
    keys = raw if k_norm is None else (raw - k_norm["mean"]) / k_norm["std"]
    return keys, k_norm, raw


def _fold_norms(model: AgiqaNet, norm, sem_norm, k_norm) -> None:
    """Fold the training normalisations into the model: it takes raw inputs and gives MOS."""
    if norm is not None:
        _fold_score_norm(model, norm)
    if sem_norm is not None:
        _fold_semantic_norm(model, sem_norm)
    if k_norm is not None:
        _fold_key_norm(model, k_norm)


def _inputs(cfg: FitConfig, ds, cache: SemanticCache, split: Split, main: bool):
    """Keys, vectors, decoded pixels and MOS of every image of ``split``."""
    keys = split.subset("all")
    # Each file is read once; vectors of an image changed since extraction are refused.
    vectors, pixels = inputs_of(ds, keys, cache, cfg.loader_workers, cfg.progress and main,
                                PixelCache() if cfg.pixel_cache else None)
    mos = {s.key: s.mos for s in ds.samples}
    targets = torch.tensor([mos[k] for k in keys], dtype=torch.float32)
    return keys, vectors, pixels, targets


def _join_ranks(ok: bool, device: torch.device) -> None:
    """Every rank waits here for rank 0's run directory; if rank 0 failed, all of them stop."""
    if dist.world_size() == 1:
        return
    failed = dist.all_reduce_sum([0.0 if ok else 1.0], device)[0]
    if failed and ok:
        raise TrainingError("rank 0 failed after training (see its error); this rank stops too")


def _finish_run(cfg: FitConfig, device, model: AgiqaNet, trainer: Trainer, ds, cache, split,
                keys, pixels, vectors, targets, part, norm, sem_norm,
                raw_keys=None) -> dict[str, float]:
    """Score every image, then write the run's files, the finished marker last."""
    if raw_keys is None:
        scores, gates = predict(model, pixels, vectors, device, cfg.eval_batch_size, cfg.amp,
                                True)
    else:  # the frozen backbone's keys, as computed once: the head alone, the saved weights
        scores, gates = predict_keys(model, raw_keys, vectors, device, cfg.eval_batch_size,
                                     cfg.amp, True)
    test = part["test"]
    metrics = evaluate(scores[test].numpy(), targets[test].numpy())
    pretrained = resolve_pretrained(cfg.backbone, cfg.pretrained, cfg.backbone_weights)
    config = RunConfig(
        model={}, semantics=SemanticSpec.from_dict(cache.spec), fingerprint=cache.fingerprint,
        prompt_names=list(cache.prompt_names), score_norm=norm,
        semantic_norm=None if sem_norm is None else
        {"kind": cfg.semantic_norm, "folded_into": "head.semantic_experts"},
        key_norm=None if cfg.key_norm == "none" else
        {"kind": cfg.key_norm, "folded_into": "head.image_expert"},
        training=training_dict(cfg),
        backbone_weights={
            "pretrained": pretrained,
            "timm": pretrained_name(cfg.backbone) if pretrained else None,
            "file": str(cfg.backbone_weights) if cfg.backbone_weights else None},
        processes=dist.world_size(),
        dataset={"name": ds.name, "target": ds.target_column, "split": split.method})
    extra = {k: v for k, v in config.to_dict().items()
             if k not in ("model", "architecture", "agiqa_version")}
    save_model(model, cfg.out, extra)
    order = torch.cat([part["train"], part["val"], part["test"]])  # the split's own order
    ordered = [keys[i] for i in order.tolist()]
    zero_shot = cache.read(ordered, ("zero_shot",))["zero_shot"].mean(1)
    write_outputs(cfg.out, ordered, split, targets[order], scores[order], gates[order],
                  cache.prompt_names, metrics, trainer, cfg.selection, zero_shot)
    mark_finished(cfg.out)
    (cfg.out / CHECKPOINT).unlink(missing_ok=True)
    return metrics


def _param_groups(model: AgiqaNet, cfg: FitConfig) -> list[dict[str, Any]]:
    """One group at ``--lr`` (the paper); with ``--backbone-lr`` the ViT and MANIQA layers get
    their own rate (0 freezes them) and the MoE head keeps ``--lr``."""
    if cfg.backbone_lr is None:
        return [{"params": list(model.parameters())}]
    if cfg.backbone_lr == 0:
        model.backbone.requires_grad_(False)
        return [{"params": list(model.head.parameters())}]
    return [{"params": list(model.head.parameters())},
            {"params": list(model.backbone.parameters()), "lr": cfg.backbone_lr}]


def _check_options(cfg: FitConfig) -> None:
    """Refuse option combinations that cannot mean what they say, before any work."""
    if cfg.split_seeds > 1 and not (cfg.split == "paper" or cfg.split.startswith("random")):
        raise ConfigError(f"{spell('split_seeds', cfg.split_seeds)} draws random splits, but "
                          f"{spell('split', cfg.split)} is the same split every time; use "
                          f"{spell('split', 'paper')} or random:TRAIN,VAL,TEST, or "
                          f"{spell('repeats')} N to train one split N times")
    if cfg.key_norm != "none" and not caches_keys(cfg):  # before the run folder is made
        raise ConfigError(f"--key-norm {cfg.key_norm} needs each image's backbone key computed "
                          "once: not under torchrun nor with --compile")


def _runs(cfg: FitConfig) -> list[tuple[str, FitConfig]]:
    """The runs of ``cfg``: one (into ``cfg.out`` itself), or a series of them."""
    base = cfg.seed if cfg.split_seed is None else cfg.split_seed
    one = {"repeats": 1, "split_seeds": 1}
    if cfg.split_seeds > 1:  # N random splits, each trained with its own seed
        return [(f"split {base + i}", replace(cfg, seed=cfg.seed + i, split_seed=base + i,
                                              out=cfg.out / f"split-{base + i}", **one))
                for i in range(cfg.split_seeds)]
    if cfg.repeats > 1:  # the official train_test_num: the same split, the seed moves on
        return [(f"seed {cfg.seed + i}", replace(cfg, seed=cfg.seed + i, split_seed=base,
                                                 out=cfg.out / f"seed-{cfg.seed + i}", **one))
                for i in range(cfg.repeats)]
    return [(f"seed {cfg.seed}", cfg)]


@dataclass
class _Job:
    """A run to train: its name and config, whether it resumes, and what it trains on."""

    name: str
    cfg: FitConfig
    resume: bool
    split: Split | None = None
    norm: dict[str, Any] | None = None
    sem_norm: dict[str, torch.Tensor] | None = None
    inputs: RunInputs | None = None


def fit_repeats(cfg: FitConfig) -> FitResult:
    """Train one run, or a series; each run's test metrics and their mean ± sample std.

    One run (the default) writes the run directory ``cfg.out``. ``cfg.repeats`` N keeps the
    split (seed ``split_seed``, default ``seed``) and trains on seeds ``seed..seed+N-1`` into
    ``cfg.out/seed-S`` (the official ``train_test_num``); ``cfg.split_seeds`` N draws N splits
    (seeds ``split_seed..+N-1``) into ``cfg.out/split-S``; a series writes ``summary.json``
    beside its runs. Runs of a series train K at a time as one batched computation
    (:mod:`agiqa.stages.training.together`), the images decoded once for all of them.

    With ``resume``, finished runs are read back and unfinished ones continued from their
    checkpoint; a resume whose options would change a run is refused.

    Under ``torchrun`` every process trains a slice of each batch (DistributedDataParallel,
    NCCL on GPUs, gloo on CPUs); ``--batch-size`` stays the global batch, so the optimisation
    matches a one-process run. Rank 0 writes the run directories.

    Raises:
        ConfigError: ``--out`` holds other files or another run, or a resume would change the
            run (checked before any work); options that contradict each other.
        DatasetError: a split too small for the protocol.
        TrainingError: the loss diverged (of every run, for a series), or a run directory
            cannot be written (disk full).
    """
    _check_options(cfg)
    try:
        return _fit_series(cfg)
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EIO,
                           errno.EFBIG):
            raise
        where = e.filename or cfg.out
        raise TrainingError(f"{where}: cannot write the run ({e.strerror})") from None


def _fit_series(cfg: FitConfig) -> FitResult:
    runs = _runs(cfg)
    series = cfg.repeats > 1 or cfg.split_seeds > 1
    device = resolve_device(cfg.device)
    main = dist.is_main()
    with contextlib.ExitStack() as stack:
        if series:
            stack.enter_context(run_folder(cfg.out, cfg.resume, main, series=True))
        done: dict[str, RunResult] = {}
        jobs: list[_Job] = []
        for name, run in runs:  # every run's folder checked before any work
            if series and cfg.resume and is_finished(run.out):
                done[name] = _finished(name, run)
                continue
            resume = cfg.resume and (not series or (run.out / CHECKPOINT).is_file())
            check_out(run.out, resume)
            if resume:
                check_resume(run.out, training_dict(run))
            jobs.append(_Job(name, run, resume))
        if not series and jobs:  # one run: its folder locked before any work, as a series'
            stack.enter_context(run_folder(cfg.out, jobs[0].resume, main))
        stack.enter_context(dist.process_group(device))
        stack.enter_context(dist.tf32(cfg.tf32))
        concurrency = {"concurrent_runs": 1, "requested": cfg.concurrent_runs}
        if jobs:
            chosen, errors = _train(cfg, jobs, device, main, series)
            if chosen is not None:
                concurrency = chosen.to_dict()
            done.update(errors)
        results = [done[name] for name, _ in runs]
        for r in results:
            if not r.ok:
                if not series:
                    raise DivergedError(r.error)
                warnings.warn(f"{r.name} (seed {r.seed}) failed and is left out of the "
                              f"summary: {r.error}", RunFailedWarning, stacklevel=3)
        if not any(r.ok for r in results):
            raise TrainingError(f"every run of the series failed; the first: {results[0].error}")
        result = FitResult(cfg.out, results, summarise(results), concurrency, cfg.repeats,
                           cfg.split_seeds)
        if series and main:
            from agiqa import __version__

            write_json(cfg.out / SUMMARY, {"agiqa_version": __version__, **result.to_dict()})
            mark_finished(cfg.out)
    return result


def _train(cfg: FitConfig, jobs: list[_Job], device: torch.device, main: bool, series: bool
           ) -> tuple[Concurrency | None, dict[str, RunResult]]:
    """Train ``jobs``, K at a time, the images decoded once for all of them. Returns K's choice
    (None: one run alone) and each run's result."""
    ds = load_dataset(cfg.dataset, cfg.root, cfg.labels, cfg.target, cfg.image_column,
                      cfg.score_column)
    for job in jobs:
        job.split = make_split(ds, job.cfg.split, _split_seed(job.cfg))
        _check_split(job.split, len(ds), cfg.batch_size)
        if job.resume:
            check_split_unchanged(job.cfg.out, job.split)
    cache = open_cache(cfg.cache)
    for split in {id(j.split): j.split for j in jobs}.values():
        _check_vectors(cache, split)
    keys, vectors, pixels, targets = _inputs(cfg, ds, cache, jobs[0].split, main)
    index = {k: i for i, k in enumerate(keys)}
    for job in jobs:
        part = {sub: torch.tensor([index[k] for k in job.split.subset(sub)], dtype=torch.long)
                for sub in ("train", "val", "test")}
        with warnings.catch_warnings():  # warned once by _check_split
            warnings.simplefilter("ignore", ProtocolWarning)
            part["val_used"] = part["val"][: validation_images(len(part["val"]), cfg.batch_size)]
        job.norm = _score_norm(job.cfg.score_norm, targets[part["train"]])
        job.sem_norm = _semantic_norm(job.cfg.semantic_norm, vectors[part["train"]])
        job.inputs = RunInputs(
            vectors if job.sem_norm is None else
            (vectors.float() - job.sem_norm["mean"]) / job.sem_norm["std"],
            targets if job.norm is None else (targets - job.norm["mean"]) / job.norm["std"],
            part)

    concurrency, spec = None, []
    if series:
        if cfg.concurrent_runs != 1 and dist.world_size() == 1 and not cfg.compile:
            probe = _new_model(jobs[0].cfg, cache, device)
            _param_groups(probe, jobs[0].cfg)
            batch = min(cfg.batch_size, len(jobs[0].inputs.part["train"]))
            concurrency, spec = choose_concurrency(
                cfg.concurrent_runs, len(jobs), probe, batch, len(cache.prompts), cache.dim,
                device, cfg.amp, frozen=cfg.backbone_lr == 0)
            del probe
            if cfg.progress and main:
                tqdm.write(concurrency.describe(len(jobs)), file=sys.stderr)
        else:  # one at a time: --concurrent-runs 1, --compile, or under torchrun
            concurrency = Concurrency(1, cfg.concurrent_runs, None, None, str(device))

    results: dict[str, RunResult] = {}
    k = concurrency.runs if concurrency else 1
    for start in range(0, len(jobs), k):
        chunk = jobs[start : start + k]
        with contextlib.ExitStack() as folders:
            trainers, run_keys = [], []
            for job in chunk:
                if series:  # a run of a series: its folder, while it trains
                    folders.enter_context(run_folder(job.cfg.out, job.resume, main))
                trainer = _start(job, cache, device, main)
                trainer.keys, k_norm, raw = _run_keys(job.cfg, trainer.model, pixels,
                                                      job.inputs.part, device)
                job.inputs.keys = trainer.keys
                run_keys.append((k_norm, raw))
                trainers.append(trainer)
            dist.barrier()
            failed = _train_chunk(trainers, [j.inputs for j in chunk], pixels, spec)
            for i, job in enumerate(chunk):
                run = job.cfg
                if i in failed:
                    results[job.name] = RunResult(job.name, run.out, run.seed,
                                                  _split_seed(run), error=str(failed[i]))
                    continue
                trainer, model = trainers[i], trainers[i].model
                trainer.finish()
                k_norm, raw = run_keys[i]
                _fold_norms(model, job.norm, job.sem_norm, k_norm)
                metrics: dict[str, float] = {}
                ok = not main
                try:
                    if main:  # rank 0 scores the test split and writes the run directory
                        metrics = _finish_run(run, device, model, trainer, ds, cache,
                                              job.split, keys, pixels, vectors, targets,
                                              job.inputs.part, job.norm, job.sem_norm, raw)
                        ok = True
                finally:
                    _join_ranks(ok, device)
                results[job.name] = _run_result(job.name, run, metrics, trainer.best_epoch,
                                                trainer.history)
    return concurrency, results


def _start(job: _Job, cache: SemanticCache, device: torch.device, main: bool) -> Trainer:
    """The run's model, optimiser, schedule and trainer; restored from its checkpoint, or its
    first files written (the configuration, the split and an empty log)."""
    run = job.cfg
    model = _new_model(run, cache, device)
    optim = new_adam(_param_groups(model, run), run.lr, run.weight_decay, device)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(optim, T_max=run.t_max, eta_min=0)
    trainer = Trainer(run, model, optim, sched, torch.Generator().manual_seed(run.seed), device)
    if job.resume:
        trainer.restore()
    elif main:
        run.out.mkdir(parents=True, exist_ok=True)
        write_training(run.out, training_dict(run))
        job.split.write_csv(run.out / SPLIT)
        write_text(run.out / TRAIN_LOG, "")
    return trainer


def _train_chunk(trainers: list[Trainer], inputs: list[RunInputs], pixels: torch.Tensor,
                 spec: list) -> dict[int, DivergedError]:
    """Train every trainer to its last epoch: a run alone in the one-run loop, runs at one
    epoch together. Returns the runs that diverged (index → error)."""
    failed: dict[int, DivergedError] = {}
    for epoch in sorted({t.epoch for t in trainers}):  # resumed runs at one epoch
        at = [i for i, t in enumerate(trainers) if t.epoch == epoch and i not in failed]
        if len(at) == 1:  # alone: the one-run loop itself
            inp = inputs[at[0]]
            try:
                trainers[at[0]].train(pixels, inp.vectors, inp.targets, inp.part)
            except DivergedError as e:
                failed[at[0]] = e
            continue
        if at:
            got = train_together([trainers[i] for i in at], pixels, [inputs[i] for i in at],
                                 spec)
            failed.update({at[j]: e for j, e in got.items()})
    return failed


def _new_model(cfg: FitConfig, cache: SemanticCache, device: torch.device) -> AgiqaNet:
    """The run's model, initialised from its seed (alone or trained together alike)."""
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    ablation = model_experts(cfg.experts, cfg.fusion, cache.prompt_names, f"cache {cache.path}")
    return create_model(cfg.backbone, len(cache.prompts), cache.dim, cfg.pretrained,
                        cfg.backbone_weights, cfg.dropout, image_key=cfg.image_key,
                        **ablation).to(device)


class RunFailedWarning(UserWarning):
    """A run of a series diverged; the others went on."""


def _run_result(name: str, run: FitConfig, test: dict[str, float], best_epoch: int,
                history: list[dict[str, Any]]) -> RunResult:
    row = next((h for h in history if h.get("epoch") == best_epoch), None)
    val = None if row is None or "val_srcc" not in row else \
        {"srcc": row["val_srcc"], "plcc": row["val_plcc"]}
    return RunResult(name, run.out, run.seed, _split_seed(run), test, val, best_epoch,
                     history=history)


def _split_seed(run: FitConfig) -> int:
    return run.seed if run.split_seed is None else run.split_seed


def _finished(name: str, run: FitConfig) -> RunResult:
    """A run of a resumed series that had already finished."""
    m = read_metrics(run.out)
    return _run_result(name, run, m["test"], m["best_epoch"], m.get("history") or [])
