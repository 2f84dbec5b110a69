"""Stage two: train the MANIQA backbone and the MoE head from cached semantic vectors.

Never loads the MLLM. Images are decoded and resized to uint8 224×224 once; every epoch after
that reads memory. The paper's protocol is the default (SPEC §4): Adam 1e-5 / 1e-5, batch 8,
30 epochs, MSE, cosine annealing stepped every iteration with T_max 50, rotation and vertical
flip augmentation, best epoch by validation SRCC + PLCC, one pass over the test split.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from agiqa import runtime as dist
from agiqa.cache import SemanticCache, check_fresh, open_cache
from agiqa.data.datasets import Dataset, load_dataset
from agiqa.data.pixels import normalize
from agiqa.data.splits import Split, make_split
from agiqa.errors import ConfigError, DatasetError, TrainingError
from agiqa.fileio import write_json
from agiqa.metrics import evaluate
from agiqa.models.agiqa_net import AgiqaNet, create_model, save_model
from agiqa.runtime import resolve_device
from agiqa.stages.predict import decode_pixels, predict

__all__ = ["SCORE_NORMS", "SEMANTIC_NORMS", "FitConfig", "FitResult", "fit_from_cache"]


# "none" trains on raw MOS (the paper); "zscore" trains on (mos - mean) / std of the training
# split and folds the inverse into the output layer, so the saved model still speaks MOS.
SCORE_NORMS = ("none", "zscore")
# "zscore" standardises each semantic dimension with the training split's mean and std and folds
# that into the first layer of each semantic expert, so the saved model takes raw vectors.
SEMANTIC_NORMS = ("none", "zscore")


@dataclass
class FitConfig:
    """Options of ``agiqa fit``; the defaults are the paper's protocol."""

    dataset: str
    root: Path
    cache: Path
    out: Path
    labels: Path | None = None
    target: str | None = None
    image_column: str | None = None
    score_column: str | None = None
    backbone: str = "vit_base_patch8_224"
    pretrained: bool = True
    backbone_weights: str | None = None
    epochs: int = 30
    batch_size: int = 8
    lr: float = 1e-5
    backbone_lr: float | None = None
    weight_decay: float = 1e-5
    t_max: int = 50
    split: str = "paper"
    seed: int = 20
    device: str = "auto"
    amp: bool | None = None
    augment: bool = True
    score_norm: str = "none"
    semantic_norm: str = "none"
    loader_workers: int = 2
    compile: bool = False
    eval_batch_size: int = 32
    resume: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        self.root, self.cache, self.out = Path(self.root), Path(self.cache), Path(self.out)
        for name in ("epochs", "batch_size", "eval_batch_size", "t_max"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, "
                                  f"got {getattr(self, name)}")
        if self.lr <= 0:
            raise ConfigError(f"--lr must be positive, got {self.lr}")
        if self.backbone_lr is not None and self.backbone_lr < 0:
            raise ConfigError(f"--backbone-lr must be 0 or more, got {self.backbone_lr}")
        if self.score_norm not in SCORE_NORMS:
            raise ConfigError(f"--score-norm must be one of {', '.join(SCORE_NORMS)}, "
                              f"got {self.score_norm!r}")
        if self.semantic_norm not in SEMANTIC_NORMS:
            raise ConfigError(f"--semantic-norm must be one of {', '.join(SEMANTIC_NORMS)}, "
                              f"got {self.semantic_norm!r}")


@dataclass
class FitResult:
    out: Path
    metrics: dict[str, float]
    best_epoch: int
    history: list[dict[str, Any]] = field(default_factory=list)


def _augment(pixels: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Per image: p=0.7 rotate by 90/180/270°, then p=0.7 flip the H axis (vertical flip)."""
    out = []
    for img in pixels:
        if torch.rand((), generator=gen) < 0.7:
            k = int(torch.randint(1, 4, (), generator=gen))
            img = torch.rot90(img, k, dims=(1, 2))
        if torch.rand((), generator=gen) < 0.7:
            img = torch.flip(img, dims=(1,))
        out.append(img)
    return torch.stack(out)


def _check_vectors(cache: SemanticCache, split: Split) -> None:
    from agiqa.errors import MissingVectorsError

    missing = [k for k in split.subset("all") if k not in cache]
    if missing:
        raise MissingVectorsError(missing, where=f"cache {cache.path}; run extract-semantics first")


def _loader_inputs(ds: Dataset, cfg: FitConfig):
    cache = open_cache(cfg.cache)
    split = make_split(ds, cfg.split, cfg.seed)
    for name in ("train", "val", "test"):
        if not split.subset(name):
            raise DatasetError(f"the {name} split is empty ({split.method}, {len(ds)} images)")
    _check_vectors(cache, split)
    check_fresh(cache, split.subset("all"), ds.root)  # vectors of changed images: refused
    return cache, split


def fit_from_cache(cfg: FitConfig) -> FitResult:
    """Train on ``cfg.dataset`` with vectors from ``cfg.cache``; write the run directory.

    Under ``torchrun`` every process trains a slice of each batch (DistributedDataParallel,
    NCCL on GPUs, gloo on CPUs); ``--batch-size`` stays the global batch, so the optimisation
    matches a one-process run. Rank 0 writes the run directory.
    """
    device = resolve_device(cfg.device)
    with dist.process_group(device):
        return _fit(cfg, device)


def _fit(cfg: FitConfig, device: torch.device) -> FitResult:
    main = dist.is_main()
    progress = cfg.progress and main
    ds = load_dataset(cfg.dataset, cfg.root, cfg.labels, cfg.target, cfg.image_column,
                      cfg.score_column)
    cache, split = _loader_inputs(ds, cfg)
    mos = {s.key: s.mos for s in ds.samples}
    keys = split.subset("all")
    vectors = torch.from_numpy(cache.read(keys, ("vectors",))["vectors"])
    pixels = decode_pixels(ds, keys, cfg.loader_workers, progress)
    index = {k: i for i, k in enumerate(keys)}
    part = {name: torch.tensor([index[k] for k in split.subset(name)]) for name in
            ("train", "val", "test")}
    targets = torch.tensor([mos[k] for k in keys], dtype=torch.float32)
    norm = _score_norm(cfg.score_norm, targets[part["train"]])
    sem_norm = _semantic_norm(cfg.semantic_norm, vectors[part["train"]])

    amp = (device.type == "cuda") if cfg.amp is None else cfg.amp
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    model = create_model(cfg.backbone, len(cache.prompts), cache.dim, cfg.pretrained,
                         cfg.backbone_weights).to(device)
    optim = torch.optim.Adam(_param_groups(model, cfg), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(optim, T_max=cfg.t_max, eta_min=0)
    gen = torch.Generator().manual_seed(cfg.seed)
    if not cfg.resume and ((cfg.out / "checkpoint.pt").exists()
                           or (cfg.out / "model.safetensors").exists()):
        raise ConfigError(f"{cfg.out} already holds a run; pass --resume or choose another --out")
    state = _Trainer(cfg, model, optim, sched, gen, device, amp)
    if cfg.resume:
        state.restore()
    dist.barrier()
    if main:
        cfg.out.mkdir(parents=True, exist_ok=True)
        split.write_csv(cfg.out / "split.csv")
    train_targets = targets if norm is None else (targets - norm["mean"]) / norm["std"]
    train_vectors = vectors if sem_norm is None else \
        (vectors.float() - sem_norm["mean"]) / sem_norm["std"]
    state.train(pixels, train_vectors, train_targets, part)

    model.load_state_dict(state.best_state)
    if norm is not None:
        _fold_score_norm(model, norm)
    if sem_norm is not None:
        _fold_semantic_norm(model, sem_norm)
    if not main:  # rank 0 scores the test split and writes the run directory
        dist.barrier()
        return FitResult(cfg.out, {}, state.best_epoch, state.history)
    scores, gates = predict(model, pixels, vectors, device, cfg.eval_batch_size, amp, True)
    test = part["test"]
    metrics = evaluate(scores[test].numpy(), targets[test].numpy())
    extra = {
        "semantics": cache.spec, "fingerprint": cache.fingerprint,
        "prompt_names": cache.prompt_names, "score_norm": norm,
        "semantic_norm": None if sem_norm is None else
        {"kind": cfg.semantic_norm, "folded_into": "head.semantic_experts"},
        "training": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
        "processes": dist.world_size(),
        "dataset": {"name": ds.name, "target": ds.target_column, "split": split.method},
    }
    save_model(model, cfg.out, extra)
    _write_outputs(cfg.out, keys, split, targets, scores, gates, cache.prompt_names, metrics,
                   state)
    (cfg.out / "checkpoint.pt").unlink(missing_ok=True)
    dist.barrier()
    return FitResult(cfg.out, metrics, state.best_epoch, state.history)


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


def _score_norm(kind: str, train_targets: torch.Tensor) -> dict[str, Any] | None:
    if kind == "none":
        return None
    std = float(train_targets.std()) if len(train_targets) > 1 else 0.0
    if not math.isfinite(std) or std == 0.0:
        raise DatasetError("--score-norm zscore: the training scores have no spread (std 0)")
    return {"kind": kind, "mean": float(train_targets.mean()), "std": std,
            "folded_into": "head.output"}


@torch.no_grad()
def _fold_score_norm(model: AgiqaNet, norm: dict[str, Any]) -> None:
    """Make the output layer predict MOS: y = (w·x + b)·std + mean."""
    out = model.head.output
    out.weight.mul_(norm["std"])
    out.bias.mul_(norm["std"]).add_(norm["mean"])


def _semantic_norm(kind: str, train_vectors: torch.Tensor) -> dict[str, torch.Tensor] | None:
    if kind == "none":
        return None
    v = train_vectors.float()
    return {"mean": v.mean(0), "std": v.std(0).clamp_min(1e-6) if len(v) > 1 else
            torch.ones_like(v[0])}


@torch.no_grad()
def _fold_semantic_norm(model: AgiqaNet, norm: dict[str, torch.Tensor]) -> None:
    """Make each semantic expert take raw vectors: W·(s − μ)/σ + b = (W/σ)·s + (b − W·μ/σ)."""
    for i, expert in enumerate(model.head.semantic_experts):
        linear = expert[0]
        mean, std = norm["mean"][i].to(linear.weight), norm["std"][i].to(linear.weight)
        linear.bias.sub_(linear.weight @ (mean / std))
        linear.weight.div_(std)


class _Trainer:
    """The epoch loop, its resumable state and the best-epoch selection."""

    def __init__(self, cfg, model, optim, sched, gen, device, amp):
        self.cfg, self.model, self.optim, self.sched = cfg, model, optim, sched
        self.gen, self.device, self.amp = gen, device, amp
        self.rank, self.world = dist.rank(), dist.world_size()
        self.main = self.rank == 0
        self.train_model = model
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            ids = [device.index] if device.type == "cuda" else None
            self.train_model = DistributedDataParallel(model, device_ids=ids)
        if cfg.compile:
            self.train_model = torch.compile(self.train_model)
        self.epoch, self.best_epoch, self.best_value = 0, -1, -math.inf
        self.best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        self.history: list[dict[str, Any]] = []

    def restore(self) -> None:
        path = self.cfg.out / "checkpoint.pt"
        if not path.exists():
            raise ConfigError(f"--resume: {path} not found (nothing to resume)")
        ck = torch.load(path, map_location="cpu", weights_only=True)
        self.model.load_state_dict(ck["model"])
        self.optim.load_state_dict(ck["optim"])
        self.sched.load_state_dict(ck["sched"])
        self.gen.set_state(ck["gen"])
        torch.set_rng_state(ck["torch_rng"])
        self.best_state = ck["best_state"]
        self.epoch, self.best_epoch = ck["epoch"], ck["best_epoch"]
        self.best_value = ck["best_value"]
        self.history = json.loads(ck["history"])

    def _checkpoint(self) -> None:
        from agiqa.fileio import atomic_path

        if not self.main:
            return

        ck = {"model": self.model.state_dict(), "optim": self.optim.state_dict(),
              "sched": self.sched.state_dict(), "gen": self.gen.get_state(),
              "torch_rng": torch.get_rng_state(),
              "best_state": self.best_state, "epoch": self.epoch, "best_epoch": self.best_epoch,
              "best_value": self.best_value, "history": json.dumps(self.history)}
        with atomic_path(self.cfg.out / "checkpoint.pt") as tmp:
            torch.save(ck, tmp)

    def train(self, pixels, vectors, targets, part) -> None:
        cfg = self.cfg
        train_idx = part["train"]
        while self.epoch < cfg.epochs:
            t0 = time.perf_counter()
            loss = self._train_epoch(pixels, vectors, targets, train_idx)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            train_seconds = time.perf_counter() - t0
            val = part["val"]
            pred = predict(self.model, pixels[val], vectors[val], self.device,
                           cfg.eval_batch_size, self.amp)
            m = evaluate(pred.numpy(), targets[val].numpy()) if len(val) >= 3 else \
                {"srcc": float("nan"), "plcc": float("nan")}
            value = m["srcc"] + m["plcc"]
            if self.best_epoch < 0 or (math.isfinite(value) and value > self.best_value):
                self.best_value, self.best_epoch = value, self.epoch
                self.best_state = {k: v.detach().cpu().clone()
                                   for k, v in self.model.state_dict().items()}
            row = {"epoch": self.epoch, "loss": loss, "val_srcc": m["srcc"],
                   "val_plcc": m["plcc"], "lr": self.optim.param_groups[0]["lr"],
                   "seconds": round(time.perf_counter() - t0, 3),
                   "train_seconds": round(train_seconds, 3),
                   "train_images_per_second": round(len(train_idx) / train_seconds, 2)}
            self.history.append(row)
            if self.main:
                with open(cfg.out / "train_log.jsonl", "a", encoding="utf-8") as f:
                    f.write(json.dumps(row) + "\n")
            if cfg.progress and self.main:
                tqdm.write(f"epoch {self.epoch}: loss {loss:.4f}  val SRCC {m['srcc']:.4f}  "
                           f"PLCC {m['plcc']:.4f}")
            self.epoch += 1
            self._checkpoint()

    def _train_epoch(self, pixels, vectors, targets, train_idx) -> float:
        """One epoch; every rank draws the same order and augmentation, then trains its slice
        of each global batch, so W processes follow the one-process optimisation."""
        cfg, model = self.cfg, self.train_model
        model.train()
        order = train_idx[torch.randperm(len(train_idx), generator=self.gen)]
        total, n = 0.0, 0
        steps = range(0, len(order), cfg.batch_size)
        bar = tqdm(steps, desc=f"epoch {self.epoch}", unit="step", leave=False,
                   disable=not (cfg.progress and self.main))
        for step, i in enumerate(bar):
            idx = order[i : i + cfg.batch_size]
            x = pixels[idx]
            if cfg.augment:
                x = _augment(x, self.gen)
            mine = slice(self.rank, None, self.world) if len(idx) >= self.world else slice(None)
            x = normalize(x[mine]).to(self.device, non_blocking=True)
            s = vectors[idx[mine]].to(self.device, torch.float32)
            y = targets[idx[mine]].to(self.device)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
                pred = model(x, s)
            err = torch.nn.functional.mse_loss(pred.float(), y, reduction="sum")
            # DDP averages gradients over ranks: scale so the result is the global batch mean.
            share = self.world / len(idx) if len(idx) >= self.world else 1.0 / len(idx)
            loss = err * share
            self.optim.zero_grad(set_to_none=True)
            loss.backward()
            batch_err, batch_n = dist.all_reduce_sum([err.item(), len(y)], self.device)
            if not math.isfinite(batch_err):
                raise TrainingError(f"the loss became {batch_err / batch_n} at epoch "
                                    f"{self.epoch}, step {step}; lower --lr or check the scores")
            self.optim.step()
            self.sched.step()
            total += batch_err
            n += batch_n
        return total / max(n, 1)


def _write_outputs(out: Path, keys, split: Split, targets, scores, gates, prompt_names,
                   metrics, state: _Trainer) -> None:
    import csv

    from agiqa.fileio import atomic_path
    from agiqa.stages.plots import plot_history, plot_scatter

    subset = {k: name for name in ("train", "val", "test") for k in split.subset(name)}
    with atomic_path(out / "predictions.csv") as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["key", "subset", "mos", "score",
                        *[f"gate_{n}" for n in prompt_names], "gate_image"])
            for i, k in enumerate(keys):
                w.writerow([k, subset[k], f"{targets[i]:.6g}", f"{scores[i]:.6g}",
                            *[f"{g:.6g}" for g in gates[i].tolist()]])
    write_json(out / "metrics.json", {"test": metrics, "best_epoch": state.best_epoch,
                                      "best_val_srcc_plcc": state.best_value,
                                      "history": state.history})
    test = [i for i, k in enumerate(keys) if subset[k] == "test"]
    plot_scatter(scores[test].numpy(), targets[test].numpy(), out / "scatter_test.png",
                 title=f"test SRCC {metrics['srcc']:.4f}  PLCC {metrics['plcc']:.4f}")
    plot_history(state.history, out / "training_curves.png")


def fit_repeats(cfg: FitConfig, repeats: int = 1) -> dict[str, Any]:
    """Run ``repeats`` fits on seeds ``seed..seed+repeats-1``; median and std of test metrics.

    One repeat writes the run directory ``cfg.out``; several write ``cfg.out/seed-S`` each and a
    ``summary.json`` beside them.
    """
    from dataclasses import replace

    with dist.process_group(resolve_device(cfg.device)):
        if repeats == 1:
            result = fit_from_cache(cfg)
            return {"out": str(cfg.out), "rows": {"test": result.metrics},
                    "best_epoch": result.best_epoch}
        rows: dict[str, dict[str, float]] = {}
        for i in range(repeats):
            seed = cfg.seed + i
            result = fit_from_cache(replace(cfg, seed=seed, out=cfg.out / f"seed-{seed}"))
            rows[f"seed {seed}"] = result.metrics
    if not dist.is_main():
        return {"out": str(cfg.out), "rows": rows, "repeats": repeats}
    names = list(next(iter(rows.values())))
    table = np.array([[r[k] for k in names] for r in rows.values()])
    rows["median"] = dict(zip(names, np.median(table, 0).tolist(), strict=True))
    rows["std"] = dict(zip(names, table.std(0, ddof=1).tolist(), strict=True))
    summary = {"out": str(cfg.out), "rows": rows, "repeats": repeats}
    write_json(cfg.out / "summary.json", summary)
    return summary
