"""Stage two: train the MANIQA backbone and the MoE head from cached semantic vectors.

Never loads the MLLM. Images are decoded and resized to uint8 224×224 once; every epoch after
that reads memory. The official protocol is the default (the official ``main.py``):
the seed-20 70/10/20 split cut at ``int(n·0.7)``/``int(n·0.8)``, Adam 1e-5 / 1e-5, batch 8 with
the last partial training batch dropped, 30 epochs, MSE, cosine annealing stepped every
iteration with T_max 50, rotation and vertical flip augmentation, float32, the best epoch by
raw validation SRCC + Pearson PLCC; then one pass over the whole test split.
"""

from __future__ import annotations

import errno
import random
import sys
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from agiqa import runtime as dist
from agiqa.cache import SemanticCache, open_cache
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
from agiqa.runtime import resolve_device
from agiqa.stages.configs import FitConfig, model_experts
from agiqa.stages.predict import backbone_keys, inputs_of, predict, predict_keys
from agiqa.stages.rundir import check_out, run_folder, write_outputs
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

__all__ = ["SCORE_NORMS", "SEMANTIC_NORMS", "FitConfig", "FitResult", "ProtocolWarning",
           "RunFailedWarning", "fit_from_cache", "fit_repeats"]

@dataclass
class FitResult:
    out: Path
    metrics: dict[str, float]
    best_epoch: int
    history: list[dict[str, Any]] = field(default_factory=list)


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


def fit_from_cache(cfg: FitConfig) -> FitResult:
    """Train on ``cfg.dataset`` with vectors from ``cfg.cache``; write the run directory.

    Under ``torchrun`` every process trains a slice of each batch (DistributedDataParallel,
    NCCL on GPUs, gloo on CPUs); ``--batch-size`` stays the global batch, so the optimisation
    matches a one-process run. Rank 0 writes the run directory.

    Raises:
        ConfigError: ``--out`` holds other files or another run (checked before any work).
        DatasetError: a split too small for the protocol.
        TrainingError: the loss diverged, or the run directory cannot be written (disk full).
    """
    device = resolve_device(cfg.device)
    if cfg.key_norm != "none" and not caches_keys(cfg):  # before the run folder is made
        raise ConfigError(f"--key-norm {cfg.key_norm} needs each image's backbone key computed "
                          "once: not under torchrun nor with --compile")
    try:
        with run_folder(cfg.out, cfg.resume, dist.is_main()), dist.process_group(device), \
                dist.tf32(cfg.tf32):
            return _fit(cfg, device)
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EIO,
                           errno.EFBIG):
            raise
        where = e.filename or cfg.out
        raise TrainingError(f"{where}: cannot write the run ({e.strerror})") from None


def _fit(cfg: FitConfig, device: torch.device) -> FitResult:
    main = dist.is_main()
    ds = load_dataset(cfg.dataset, cfg.root, cfg.labels, cfg.target, cfg.image_column,
                      cfg.score_column)
    split_seed = cfg.seed if cfg.split_seed is None else cfg.split_seed
    split = make_split(ds, cfg.split, split_seed)
    _check_split(split, len(ds), cfg.batch_size)
    cache = open_cache(cfg.cache)
    _check_vectors(cache, split)

    model = _new_model(cfg, cache, device)
    optim = new_adam(_param_groups(model, cfg), cfg.lr, cfg.weight_decay, device)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(optim, T_max=cfg.t_max, eta_min=0)
    trainer = Trainer(cfg, model, optim, sched, torch.Generator().manual_seed(cfg.seed), device)

    keys, vectors, pixels, targets, part = _inputs(cfg, ds, cache, split, main)
    norm = _score_norm(cfg.score_norm, targets[part["train"]])
    sem_norm = _semantic_norm(cfg.semantic_norm, vectors[part["train"]])

    if cfg.resume:
        trainer.restore()
    dist.barrier()
    if main and not cfg.resume:
        cfg.out.mkdir(parents=True, exist_ok=True)
        split.write_csv(cfg.out / "split.csv")
        write_text(cfg.out / "train_log.jsonl", "")
    train_targets = targets if norm is None else (targets - norm["mean"]) / norm["std"]
    train_vectors = vectors if sem_norm is None else \
        (vectors.float() - sem_norm["mean"]) / sem_norm["std"]
    trainer.keys, k_norm, raw_keys = _run_keys(cfg, model, pixels, part, device)
    trainer.train(pixels, train_vectors, train_targets, part)
    trainer.finish()
    _fold_norms(model, norm, sem_norm, k_norm)

    metrics: dict[str, float] = {}
    ok = not main
    try:
        if main:  # rank 0 scores the test split and writes the run directory
            metrics = _finish_run(cfg, device, model, trainer, ds, cache, split, keys, pixels,
                                  vectors, targets, part, norm, sem_norm, raw_keys)
            ok = True
    finally:
        _join_ranks(ok, device)
    return FitResult(cfg.out, metrics, trainer.best_epoch, trainer.history)


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
    """Keys, vectors, decoded pixels and MOS of every image; index tensors of each subset."""
    keys = split.subset("all")
    # Each file is read once; vectors of an image changed since extraction are refused.
    vectors, pixels = inputs_of(ds, keys, cache, cfg.loader_workers, cfg.progress and main,
                                PixelCache() if cfg.pixel_cache else None)
    index = {k: i for i, k in enumerate(keys)}
    part = {name: torch.tensor([index[k] for k in split.subset(name)]) for name in
            ("train", "val", "test")}
    with warnings.catch_warnings():  # warned once by _check_split
        warnings.simplefilter("ignore", ProtocolWarning)
        part["val_used"] = part["val"][: validation_images(len(part["val"]), cfg.batch_size)]
    mos = {s.key: s.mos for s in ds.samples}
    targets = torch.tensor([mos[k] for k in keys], dtype=torch.float32)
    return keys, vectors, pixels, targets, part


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
    if raw_keys is None:
        scores, gates = predict(model, pixels, vectors, device, cfg.eval_batch_size, cfg.amp,
                                True)
    else:  # the frozen backbone's keys, as computed once: the head alone, the saved weights
        scores, gates = predict_keys(model, raw_keys, vectors, device, cfg.eval_batch_size,
                                     cfg.amp, True)
    test = part["test"]
    metrics = evaluate(scores[test].numpy(), targets[test].numpy())
    pretrained = resolve_pretrained(cfg.backbone, cfg.pretrained, cfg.backbone_weights)
    extra = {
        "semantics": cache.spec, "fingerprint": cache.fingerprint,
        "prompt_names": cache.prompt_names, "score_norm": norm,
        "semantic_norm": None if sem_norm is None else
        {"kind": cfg.semantic_norm, "folded_into": "head.semantic_experts"},
        "key_norm": None if cfg.key_norm == "none" else
        {"kind": cfg.key_norm, "folded_into": "head.image_expert"},
        "training": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
        "backbone_weights": {
            "pretrained": pretrained,
            "timm": pretrained_name(cfg.backbone) if pretrained else None,
            "file": str(cfg.backbone_weights) if cfg.backbone_weights else None},
        "processes": dist.world_size(),
        "dataset": {"name": ds.name, "target": ds.target_column, "split": split.method},
    }
    save_model(model, cfg.out, extra)
    order = torch.cat([part["train"], part["val"], part["test"]])  # the split's own order
    write_outputs(cfg.out, [keys[i] for i in order.tolist()], split, targets[order],
                  scores[order], gates[order], cache.prompt_names, metrics, trainer)
    (cfg.out / "checkpoint.pt").unlink(missing_ok=True)
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


def _runs(cfg: FitConfig) -> list[tuple[str, FitConfig]]:
    base = cfg.seed if cfg.split_seed is None else cfg.split_seed
    one = {"repeats": 1, "split_seeds": 1}
    if cfg.split_seeds > 1:  # N random splits, each trained with its own seed
        return [(f"split {base + i}", replace(cfg, seed=cfg.seed + i, split_seed=base + i,
                                              out=cfg.out / f"split-{base + i}", **one))
                for i in range(cfg.split_seeds)]
    # the official train_test_num: the same split, the training seed moves on
    return [(f"seed {cfg.seed + i}", replace(cfg, seed=cfg.seed + i, split_seed=base,
                                             out=cfg.out / f"seed-{cfg.seed + i}", **one))
            for i in range(cfg.repeats)]


def fit_repeats(cfg: FitConfig) -> dict[str, Any]:
    """Train several times; median and std (``np.std``, as the official code) of the test metrics.

    ``cfg.repeats`` N keeps the split (seed ``split_seed``, default ``seed``) and trains on seeds
    ``seed..seed+N-1`` into ``cfg.out/seed-S`` (the official ``train_test_num``);
    ``cfg.split_seeds`` N draws N splits (seeds ``split_seed..+N-1``) into ``cfg.out/split-S``.
    One run writes the run directory ``cfg.out``; several write a ``summary.json`` beside theirs.
    With ``resume``, finished runs of the series are read back and the others continued.
    """
    runs = _runs(cfg)
    device = resolve_device(cfg.device)
    if len(runs) == 1:
        result = fit_from_cache(cfg)
        return {"out": str(cfg.out), "rows": {"test": result.metrics},
                "best_epoch": result.best_epoch}
    for _, run in runs:  # before any work, as one run does
        if not (cfg.resume and (run.out / "model.safetensors").is_file()):
            check_out(run.out, cfg.resume and (run.out / "checkpoint.pt").is_file())
    rows: dict[str, dict[str, float]] = {}
    best: dict[str, int] = {}
    failed: dict[str, dict[str, Any]] = {}
    concurrency: Concurrency | None = None
    with run_folder(cfg.out, False, dist.is_main()), dist.process_group(device), \
            dist.tf32(cfg.tf32):
        done = {name: _finished(run.out) for name, run in runs
                if cfg.resume and (run.out / "model.safetensors").is_file()}
        pending = [(name, run) for name, run in runs if name not in done]
        together = pending and cfg.concurrent_runs != 1 and dist.world_size() == 1 and \
            not cfg.compile
        if together:
            concurrency, results = _series_together(cfg, pending, device)
            for name, result in results.items():
                if isinstance(result, DivergedError):
                    run = dict(pending)[name]
                    failed[name] = {"seed": run.seed, "split_seed": run.split_seed,
                                    "out": str(run.out), "error": str(result)}
                    warnings.warn(f"{name} (seed {run.seed}) failed and is left out of the "
                                  f"summary: {result}", RunFailedWarning, stacklevel=2)
                else:
                    done[name] = result
        for name, run in runs:
            if name in failed:
                continue
            if name in done:
                result = done[name]
            else:  # one at a time: --concurrent-runs 1, --compile, or under torchrun
                try:
                    result = fit_from_cache(replace(
                        run, resume=(run.out / "checkpoint.pt").is_file() and cfg.resume))
                except DivergedError as e:  # the other runs go on; the summary names this one
                    failed[name] = {"seed": run.seed, "split_seed": run.split_seed,
                                    "out": str(run.out), "error": str(e)}
                    warnings.warn(f"{name} (seed {run.seed}) failed and is left out of the "
                                  f"summary: {e}", RunFailedWarning, stacklevel=2)
                    continue
            rows[name], best[name] = result.metrics, result.best_epoch
        if not rows:
            raise TrainingError("every run of the series failed; the first: "
                                f"{next(iter(failed.values()))['error']}")
        rows = {name: rows[name] for name, _ in runs if name in rows}
        summary = {"out": str(cfg.out), "rows": rows, "best_epoch": best,
                   "repeats": cfg.repeats, "split_seeds": cfg.split_seeds,
                   "finished": list(rows), "failed": failed,
                   "concurrency": concurrency.to_dict() if concurrency else
                   {"concurrent_runs": 1, "requested": cfg.concurrent_runs}}
        if dist.is_main():
            names = list(next(iter(rows.values())))
            table = np.array([[r[k] for k in names] for r in rows.values()])
            rows["median"] = dict(zip(names, np.median(table, 0).tolist(), strict=True))
            rows["std"] = dict(zip(names, table.std(0).tolist(), strict=True))
            write_json(cfg.out / "summary.json", summary)
    return summary


def _series_together(cfg: FitConfig, pending: list[tuple[str, FitConfig]], device: torch.device
                     ) -> tuple[Concurrency, dict[str, FitResult | DivergedError]]:
    """Train the pending runs of a series K at a time (:mod:`agiqa.stages.training.together`), the
    images decoded once for all of them. Returns K's choice and each run's result or error."""
    ds = load_dataset(cfg.dataset, cfg.root, cfg.labels, cfg.target, cfg.image_column,
                      cfg.score_column)
    splits = [make_split(ds, run.split, run.split_seed) for _, run in pending]
    for split in splits:
        _check_split(split, len(ds), cfg.batch_size)
    cache = open_cache(cfg.cache)
    _check_vectors(cache, splits[0])
    keys, vectors, pixels, targets, _ = _inputs(cfg, ds, cache, splits[0], True)
    index = {k: i for i, k in enumerate(keys)}
    jobs = []
    for (name, run), split in zip(pending, splits, strict=True):
        part = {sub: torch.tensor([index[k] for k in split.subset(sub)], dtype=torch.long)
                for sub in ("train", "val", "test")}
        with warnings.catch_warnings():  # warned once by _check_split
            warnings.simplefilter("ignore", ProtocolWarning)
            part["val_used"] = part["val"][: validation_images(len(part["val"]), cfg.batch_size)]
        norm = _score_norm(run.score_norm, targets[part["train"]])
        sem_norm = _semantic_norm(run.semantic_norm, vectors[part["train"]])
        inputs = RunInputs(
            vectors if sem_norm is None else (vectors.float() - sem_norm["mean"]) / sem_norm["std"],
            targets if norm is None else (targets - norm["mean"]) / norm["std"], part)
        jobs.append((name, run, split, norm, sem_norm, inputs))

    probe = _new_model(pending[0][1], cache, device)
    _param_groups(probe, pending[0][1])
    batch = min(cfg.batch_size, len(jobs[0][5].part["train"]))
    concurrency, spec = choose_concurrency(cfg.concurrent_runs, len(pending), probe, batch,
                                           len(cache.prompts), cache.dim, device, cfg.amp,
                                           frozen=cfg.backbone_lr == 0)
    del probe
    if cfg.progress:
        tqdm.write(concurrency.describe(len(pending)), file=sys.stderr)

    results: dict[str, FitResult | DivergedError] = {}
    k = concurrency.runs
    for start in range(0, len(jobs), k):
        chunk = jobs[start : start + k]
        folders, trainers, run_keys = [], [], []
        try:
            for _name, run, split, *_ in chunk:
                resume = cfg.resume and (run.out / "checkpoint.pt").is_file()
                folder = run_folder(run.out, resume, True)
                folder.__enter__()
                folders.append(folder)
                model = _new_model(run, cache, device)
                optim = new_adam(_param_groups(model, run), run.lr, run.weight_decay, device)
                sched = torch.optim.lr_scheduler.CosineAnnealingLR(optim, T_max=run.t_max,
                                                                   eta_min=0)
                trainer = Trainer(run, model, optim, sched,
                                  torch.Generator().manual_seed(run.seed), device)
                if resume:
                    trainer.restore()
                else:
                    run.out.mkdir(parents=True, exist_ok=True)
                    split.write_csv(run.out / "split.csv")
                    write_text(run.out / "train_log.jsonl", "")
                inputs = chunk[len(trainers)][5]
                trainer.keys, k_norm, raw = _run_keys(run, model, pixels, inputs.part, device)
                inputs.keys = trainer.keys
                run_keys.append((k_norm, raw))
                trainers.append(trainer)
            failed: dict[int, DivergedError] = {}
            for epoch in sorted({t.epoch for t in trainers}):  # resumed runs at one epoch
                at = [i for i, t in enumerate(trainers) if t.epoch == epoch]
                if len(at) == 1:  # alone: the one-run loop itself
                    inp = chunk[at[0]][5]
                    try:
                        trainers[at[0]].train(pixels, inp.vectors, inp.targets, inp.part)
                    except DivergedError as e:
                        failed[at[0]] = e
                    continue
                got = train_together([trainers[i] for i in at], pixels,
                                     [chunk[i][5] for i in at], spec)
                failed.update({at[j]: e for j, e in got.items()})
            for i, (name, run, split, norm, sem_norm, _) in enumerate(chunk):
                if i in failed:
                    results[name] = failed[i]
                    continue
                trainer, model = trainers[i], trainers[i].model
                trainer.finish()
                k_norm, raw = run_keys[i]
                _fold_norms(model, norm, sem_norm, k_norm)
                part = chunk[i][5].part
                metrics = _finish_run(run, device, model, trainer, ds, cache, split, keys,
                                      pixels, vectors, targets, part, norm, sem_norm, raw)
                results[name] = FitResult(run.out, metrics, trainer.best_epoch, trainer.history)
        except BaseException as e:
            for folder in reversed(folders):
                folder.__exit__(type(e), e, e.__traceback__)
            raise
        for folder in reversed(folders):
            folder.__exit__(None, None, None)
    return concurrency, results


def _new_model(cfg: FitConfig, cache: SemanticCache, device: torch.device) -> AgiqaNet:
    """The run's model, initialised from its seed (as :func:`fit_from_cache` does)."""
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    ablation = model_experts(cfg.experts, cfg.fusion, cache.prompt_names, f"cache {cache.path}")
    return create_model(cfg.backbone, len(cache.prompts), cache.dim, cfg.pretrained,
                        cfg.backbone_weights, cfg.dropout, **ablation).to(device)


class RunFailedWarning(UserWarning):
    """A run of a series diverged; the others went on."""


def _finished(out: Path) -> FitResult:
    """A run of a resumed series that had already finished."""
    from agiqa.fileio import read_json

    m = read_json(out / "metrics.json")
    return FitResult(out, m["test"], m["best_epoch"], m["history"])
