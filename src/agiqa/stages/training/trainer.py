"""The stage-two epoch loop as the official ``main.py`` runs it, with its resumable state.

Per epoch: shuffle the training split, train on full batches only (the official train loader's
``drop_last=True``), step the cosine schedule every iteration, then score the validation images
the official validation loader sees (batches of ``--batch-size``, the last partial one dropped,
split order) and keep the epoch with the best raw SRCC + raw Pearson PLCC (``eval_epoch``:
no logistic fit), starting from the official ``main_score = 0``.
"""

from __future__ import annotations

import errno
import json
import math
import pickle
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from agiqa import runtime as dist
from agiqa.data.pixels import normalize
from agiqa.errors import CheckpointError, TrainingError
from agiqa.fileio import atomic_path, remove_stale_temporaries, write_text
from agiqa.models.noise import draw_noise
from agiqa.stages.predict import predict, predict_keys
from agiqa.stages.rundir import CHECKPOINT, TRAIN_LOG

__all__ = ["CHECKPOINT_SECONDS", "MIN_EVAL_IMAGES", "DivergedError", "ProtocolWarning", "Trainer",
           "augment", "caches_keys", "select_epoch", "steps_per_epoch", "validation_figures",
           "validation_images"]


# Validation and test need this many images: correlations, and the 4 β of the logistic.
MIN_EVAL_IMAGES = 4


class DivergedError(TrainingError):
    """The loss of a run became NaN or infinite."""


class ProtocolWarning(UserWarning):
    """An official protocol rule could not apply as written; the message says what was done."""


# At most this long between two checkpoints of a run (its first and last epoch: always).
CHECKPOINT_SECONDS = 30.0


def steps_per_epoch(n_train: int, batch_size: int) -> int:
    """Optimiser steps of one epoch: full batches only (AGIQA-3K: 2087 // 8 = 260).

    When the training split is smaller than one batch, one step on all of it (with a warning).
    """
    if n_train >= batch_size:
        return n_train // batch_size
    warnings.warn(f"the official training loader drops the last partial batch of --batch-size "
                  f"{batch_size}, but the training split has only {n_train} image(s): each epoch "
                  f"trains one batch of {n_train} instead", ProtocolWarning, stacklevel=2)
    return 1


def validation_images(n_val: int, batch_size: int) -> int:
    """How many validation images (from the start, in split order) the selection scores.

    The official validation loader drops the last partial batch (AGIQA-3K: 298 → 296). When
    that leaves fewer than ``MIN_EVAL_IMAGES``, all ``n_val`` are used, with a warning.
    """
    used = n_val - n_val % batch_size
    if used >= MIN_EVAL_IMAGES:
        return used
    warnings.warn(f"the official validation loader drops the last partial batch of --batch-size "
                  f"{batch_size}, which would leave {used} of the {n_val} validation image(s) "
                  f"(selection needs {MIN_EVAL_IMAGES}): all {n_val} are used instead",
                  ProtocolWarning, stacklevel=2)
    return n_val


def validation_figures(pred, mos) -> dict[str, float]:
    """What ``eval_epoch`` computes: SRCC and Pearson PLCC of the raw predictions."""
    from scipy import stats

    pred, mos = np.asarray(pred, np.float64).ravel(), np.asarray(mos, np.float64).ravel()
    with warnings.catch_warnings():  # constant predictions: NaN, never selected
        warnings.simplefilter("ignore")
        srcc = float(stats.spearmanr(pred, mos)[0])
        plcc = float(stats.pearsonr(pred, mos)[0])
    return {"val_srcc": srcc, "val_plcc": plcc, "val_score": srcc + plcc}


def select_epoch(rows: list[dict[str, Any]]) -> int | None:
    """The official selection: ``if rho_s + rho_p > main_score`` with ``main_score = 0`` at the
    start. Returns the epoch, or None when no epoch scored above 0."""
    best, epoch = 0.0, None
    for row in rows:
        value = row["val_srcc"] + row["val_plcc"]
        if value > best:  # NaN compares False: never selected
            best, epoch = value, row["epoch"]
    return epoch


def new_adam(groups, lr: float, weight_decay: float, device: torch.device
             ) -> torch.optim.Adam:
    """The official Adam (L2 weight decay, no amsgrad) with its fused kernel where the device
    has one: one pass over each parameter instead of a dozen, the same update to float rounding.
    """
    return torch.optim.Adam(groups, lr=lr, weight_decay=weight_decay,
                            fused=device.type in ("cpu", "cuda"))


def augment(pixels: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
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


def _append_row(path: Path, row: dict[str, Any]) -> None:
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
    except OSError as e:
        raise OSError(e.errno, e.strerror, str(path)) from None


def _copy_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


class Trainer:
    """The epoch loop, its resumable state (``checkpoint.pt``) and the best-epoch selection."""

    def __init__(self, cfg, model, optim, sched, gen: torch.Generator, device: torch.device):
        self.cfg, self.model, self.optim, self.sched = cfg, model, optim, sched
        self.gen, self.device, self.amp = gen, device, cfg.amp
        # Dropout and stochastic-depth masks: the run's own stream, on the device, so that the
        # run draws the same masks alone or trained together with others (stages.together).
        self.noise = torch.Generator(device=device).manual_seed(cfg.seed)
        # Optimiser and schedule state as saved in checkpoint.pt (runs trained together keep
        # theirs in a stacked optimiser and replace this).
        self.optim_state = lambda: (self.optim.state_dict(), self.sched.state_dict())
        self.rank, self.world = dist.rank(), dist.world_size()
        self.main = self.rank == 0
        self.train_model = model
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            ids = [device.index] if device.type == "cuda" else None
            self.train_model = DistributedDataParallel(model, device_ids=ids)
        if cfg.compile:
            self.train_model = torch.compile(self.train_model)
        # --backbone-lr 0: the ViT and MANIQA layers are frozen and run in eval mode (no
        # dropout, no stochastic depth). With ``keys`` set (:func:`caches_keys`), each image's
        # backbone key was computed once and the steps run the head alone.
        self.frozen = cfg.backbone_lr == 0
        self.keys: torch.Tensor | None = None
        self._checkpointed = time.monotonic()
        self.epoch, self.best_epoch, self.best_value = 0, -1, 0.0
        self.best_state: dict[str, torch.Tensor] | None = None
        self.history: list[dict[str, Any]] = []
        self.log = Path(cfg.out) / TRAIN_LOG

    def restore(self) -> None:
        """Load ``checkpoint.pt``; drop temporaries of killed writers and log rows past it."""
        path = Path(self.cfg.out) / CHECKPOINT
        if self.main:
            remove_stale_temporaries(path.parent)
        try:
            ck = torch.load(path, map_location="cpu", weights_only=True)
            if "noise" not in ck:
                raise KeyError("noise")
            self.model.load_state_dict(ck["model"])
            self.optim.load_state_dict(ck["optim"])
            self.sched.load_state_dict(ck["sched"])
            # Every field checked before any is used: a checkpoint missing one, or with a
            # history that is not a list of epoch rows, is refused in one line.
            gen, noise, rng = ck["gen"], ck["noise"], ck["torch_rng"]
            history = json.loads(ck["history"])
            if not isinstance(history, list) or not all(
                    isinstance(r, dict) and isinstance(r.get("epoch"), int) for r in history):
                raise ValueError("its history is not a list of epoch rows")
            epoch, best_epoch = int(ck["epoch"]), int(ck["best_epoch"])
            best_value, best_state = float(ck["best_value"]), ck["best_state"]
            self.gen.set_state(gen)
            self.noise.set_state(noise)
            torch.set_rng_state(rng)
        except (OSError, RuntimeError, KeyError, ValueError, TypeError, EOFError,
                pickle.UnpicklingError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise CheckpointError(f"{path}: not a checkpoint agiqa can resume from "
                                  f"({type(e).__name__}: {first})") from None
        self.best_state = best_state
        self.epoch, self.best_epoch = epoch, best_epoch
        self.best_value = best_value
        self.history = history
        if self.main:  # rows of an epoch logged after the last checkpoint come again
            write_text(self.log, "".join(json.dumps(r) + "\n" for r in self.history))

    def _checkpoint(self) -> None:
        if not self.main:
            return
        optim, sched = self.optim_state()
        ck = {"model": _copy_state(self.model), "optim": optim, "sched": sched,
              "gen": self.gen.get_state(), "noise": self.noise.get_state(),
              "torch_rng": torch.get_rng_state(),
              "best_state": self.best_state, "epoch": self.epoch, "best_epoch": self.best_epoch,
              "best_value": self.best_value, "history": json.dumps(self.history)}
        path = Path(self.cfg.out) / CHECKPOINT
        self._checkpointed = time.monotonic()
        try:
            with atomic_path(path) as tmp:
                torch.save(ck, tmp)
        except OSError as e:
            raise OSError(e.errno or errno.EIO, e.strerror or f"cannot write ({e})",
                          str(path)) from None
        except RuntimeError as e:  # torch's zip writer on a full disk: "[enforce fail …]"
            first = (str(e).strip().splitlines() or ["no reason given"])[0]
            raise OSError(errno.EIO, f"the file was cut short, is the disk full? (torch: "
                                     f"{first})", str(path)) from None

    @property
    def done(self) -> bool:
        return self.epoch >= self.cfg.epochs

    def train(self, pixels, vectors, targets, part: dict[str, torch.Tensor]) -> None:
        while not self.done:
            t0 = time.perf_counter()
            loss, steps, images = self._train_epoch(pixels, vectors, targets, part["train"])
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.end_epoch(pixels, vectors, targets, part, loss, steps, images, t0,
                           time.perf_counter() - t0)

    def end_epoch(self, pixels, vectors, targets, part, loss: float, steps: int, images: int,
                  t0: float, train_seconds: float) -> None:
        """Validation, the official selection, the log row and the checkpoint of an epoch."""
        cfg = self.cfg
        val = part["val_used"]
        if self.keys is None:
            pred = predict(self.model, pixels[val], vectors[val], self.device,
                           cfg.eval_batch_size, self.amp)
        else:
            pred = predict_keys(self.model, self.keys[val], vectors[val], self.device,
                                cfg.eval_batch_size, self.amp)
        figures = validation_figures(pred.numpy(), targets[val].numpy())
        if cfg.selection == "last":  # validated and logged, but the last epoch is kept
            selected = self.epoch == cfg.epochs - 1
        else:
            selected = select_epoch([*self.history, {"epoch": self.epoch, **figures}]) == \
                self.epoch
        if selected:
            self.best_value, self.best_epoch = figures["val_score"], self.epoch
            self.best_state = _copy_state(self.model)
        row = {"epoch": self.epoch, "steps": steps, "train_images": images, "loss": loss,
               **figures, "val_images": len(val), "selected": bool(selected),
               "lr": self.sched.get_last_lr()[0],
               "seconds": round(time.perf_counter() - t0, 3),
               "train_seconds": round(train_seconds, 3),
               "train_images_per_second": round(images / train_seconds, 2)}
        self.history.append(row)
        if self.main:
            _append_row(self.log, row)
        if cfg.progress and self.main:
            tqdm.write(f"epoch {self.epoch}: loss {loss:.4f}  val SRCC "
                       f"{figures['val_srcc']:.4f}  PLCC {figures['val_plcc']:.4f}")
        self.epoch += 1
        # The first and last epochs always, others once CHECKPOINT_SECONDS have passed: a short
        # epoch (a head on cached keys: milliseconds) must not spend its time writing state.
        if self.epoch == 1 or self.done or \
                time.monotonic() - self._checkpointed >= CHECKPOINT_SECONDS:
            self._checkpoint()

    def finish(self) -> None:
        """Load the selected epoch's weights (the last epoch's, with a warning, if none)."""
        if self.best_state is not None:
            self.model.load_state_dict(self.best_state)
            return
        warnings.warn(f"no epoch reached a validation SRCC + PLCC above 0 (the official rule "
                      f"saves no model then): keeping the last epoch ({self.epoch - 1})",
                      ProtocolWarning, stacklevel=2)
        self.best_epoch = self.epoch - 1

    def _train_epoch(self, pixels, vectors, targets, train_idx) -> tuple[float, int, int]:
        """One epoch of full batches; every rank draws the same order and augmentation, then
        trains its slice of each global batch, so W processes follow the one-process
        optimisation. Returns (mean loss, optimiser steps, training images)."""
        cfg, model = self.cfg, self.train_model
        model.train()
        if self.frozen:
            self.model.backbone.eval()
        order = train_idx[torch.randperm(len(train_idx), generator=self.gen)]
        batch = min(cfg.batch_size, len(order))
        steps = len(order) // batch
        total, n = 0.0, 0
        bar = tqdm(range(steps), desc=f"epoch {self.epoch}", unit="step", leave=False,
                   disable=not (cfg.progress and self.main))
        for step in bar:
            idx = order[step * batch : (step + 1) * batch]
            batch_err, batch_n = self._step(pixels, vectors, targets, idx)
            if not math.isfinite(batch_err):
                raise DivergedError(f"the loss became {batch_err / batch_n} at epoch "
                                    f"{self.epoch}, step {step}; lower --lr or check the scores")
            total += batch_err
            n += batch_n
        return total / max(n, 1), steps, steps * batch

    def _step(self, pixels, vectors, targets, idx) -> tuple[float, float]:
        mine = slice(self.rank, None, self.world) if len(idx) >= self.world else slice(None)
        if self.keys is None:
            x = pixels[idx]
            if self.cfg.augment:
                x = augment(x, self.gen)
            x = normalize(x[mine]).to(self.device, non_blocking=True)
            forward = self.train_model
        else:
            x = self.keys[idx[mine]].to(self.device, non_blocking=True)
            forward = self._head
        s = vectors[idx[mine]].to(self.device, torch.float32)
        y = targets[idx[mine]].to(self.device)
        with draw_noise(self.noise), \
                torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            pred = forward(x, s)
        err = torch.nn.functional.mse_loss(pred.float(), y, reduction="sum")
        # DDP averages gradients over ranks: scale so the result is the global batch mean.
        share = self.world / len(idx) if len(idx) >= self.world else 1.0 / len(idx)
        self.optim.zero_grad(set_to_none=True)
        (err * share).backward()
        batch_err, batch_n = dist.all_reduce_sum([err.item(), len(y)], self.device)
        if math.isfinite(batch_err):
            self.optim.step()
            self.sched.step()
        return batch_err, batch_n

    def _head(self, keys: torch.Tensor, semantics: torch.Tensor) -> torch.Tensor:
        return self.model.head(keys, semantics)[0]


def caches_keys(cfg) -> bool:
    """Whether a run's backbone keys are computed once per image: the backbone is frozen
    (``--backbone-lr 0``), the pixels never change (``--no-augment``), one process, no compile."""
    return (cfg.backbone_lr == 0 and not cfg.augment and not cfg.compile
            and dist.world_size() == 1)
