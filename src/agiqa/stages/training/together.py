"""Runs of a series trained together: stacked copies of the model, one batched computation.

``fit --repeats N`` and ``fit --split-seeds N`` train runs that differ only in their seeds (and
splits). Here K of them train at once: every parameter of the K models is stacked along a new
first dimension, and one ``torch.func.vmap`` of ``functional_call`` computes the K losses of a
step in one pass over the device. Each run keeps everything of its own:

* initialisation (its model is created from its seed, as alone), data order and augmentation
  (its CPU generator), dropout and stochastic-depth masks (its device generator, drawn ahead in
  the order the forward asks for them: :mod:`agiqa.models.noise`);
* Adam state: one Adam over the stacked parameters is K independent Adams, Adam being
  elementwise; the sum of the K losses gives each run its own gradient;
* cosine schedule (the runs share step counts, so one schedule is theirs), validation, epoch
  selection, checkpoint, log and run directory (each run's :class:`Trainer` does that, reading
  its parameters as views into the stack).

A run trained with others equals the same run trained alone, to float rounding (tested). A run
whose loss becomes NaN is stopped with its seed; the others go on.
"""

from __future__ import annotations

import copy
import math
import os
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap

from agiqa.data.pixels import normalize
from agiqa.errors import ConfigError
from agiqa.models.noise import draw_masks, record_noise, replay_noise
from agiqa.stages.training.trainer import DivergedError, Trainer, augment, new_adam

__all__ = ["Concurrency", "RunInputs", "choose_concurrency", "free_memory", "run_memory",
           "train_together"]


@dataclass
class RunInputs:
    """What one run trains on: its (normalised) vectors and targets, its split's indices, and
    its backbone keys when they are computed once (a frozen backbone, no augmentation)."""

    vectors: torch.Tensor
    targets: torch.Tensor
    part: dict[str, torch.Tensor]
    keys: torch.Tensor | None = None


@dataclass
class Concurrency:
    """How many runs train at once, and why."""

    runs: int
    requested: int | None
    per_run_bytes: int | None  # None: not measured (one run, or runs one at a time)
    free_bytes: int | None
    device: str

    def describe(self, total: int) -> str:
        if self.requested is not None:
            how = f"--concurrent-runs {self.requested}"
        elif self.device == "cpu":
            how = "the default on a CPU, where runs trained together are no faster"
        else:
            how = f"chosen from {_gib(self.free_bytes)} free on {self.device}"
        return (f"training {total} runs, {self.runs} at a time ({how}; about "
                f"{_gib(self.per_run_bytes)} per run)")

    def to_dict(self) -> dict[str, Any]:
        return {"concurrent_runs": self.runs, "requested": self.requested,
                "per_run_bytes": self.per_run_bytes, "free_bytes": self.free_bytes,
                "device": self.device}


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def free_memory(device: torch.device) -> int:
    """Bytes free for training on ``device``: CUDA's free memory, or the host's available RAM."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # no way to know: do not limit
        return 2**62


def run_memory(model: nn.Module, batch: int, num_prompts: int, dim: int,
               device: torch.device, amp: bool, frozen: bool = False) -> tuple[int, list]:
    """Estimated bytes one more run adds when trained together, and its dropout-mask spec.

    Parameters (with gradient and the two Adam moments where trained), the tensors one
    training forward of ``batch`` images keeps for the backward (measured on ``model``,
    counted twice for the backward's own buffers), the masks, the inputs. ``frozen``: the
    backbone runs in eval mode (``--backbone-lr 0``), drawing no masks.
    """
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() * p.element_size() for p in model.parameters()
                 if not p.requires_grad)
    seen = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal saved
        ptr = t.untyped_storage().data_ptr()
        if ptr not in seen:
            seen.add(ptr)
            saved += t.untyped_storage().nbytes()
        return t

    x = torch.zeros(batch, 3, 224, 224, device=device)
    s = torch.zeros(batch, num_prompts, dim, device=device)
    was = model.training
    model.train()
    if frozen:
        model.backbone.eval()
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
                record_noise() as rec, \
                torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            out = model(x, s)
        del out
    finally:
        model.train(was)
    masks = sum(math.prod(shape) for shape, _ in rec.spec)
    inputs = x.numel() * 4 + s.numel() * 4
    return 4 * trainable + frozen + 2 * saved + masks + inputs, rec.spec


def choose_concurrency(requested: int | None, pending: int, model: nn.Module, batch: int,
                       num_prompts: int, dim: int, device: torch.device,
                       amp: bool, frozen: bool = False) -> tuple[Concurrency, list]:
    """K for ``--concurrent-runs`` (None: as many as fit in 80 % of free memory, at most the
    pending runs); a requested K that does not fit is refused with the estimate."""
    per_run, spec = run_memory(model, batch, num_prompts, dim, device, amp, frozen)
    free = free_memory(device)
    fits = max(1, int(0.8 * free // max(per_run, 1)))
    if requested is None:
        # On a CPU the batched step measured no faster than the runs' own steps (the paper's
        # loop, tiny backbone: 1.03x) or slower (a head on cached keys: 0.65x): there the runs
        # go one after another, in one process that decodes the images once.
        runs = 1 if device.type == "cpu" else max(1, min(pending, fits))
    else:
        runs = min(requested, pending)
        if runs > 1 and runs * per_run > free:
            raise ConfigError(
                f"--concurrent-runs {requested}: {runs} runs together need about "
                f"{_gib(runs * per_run)} ({_gib(per_run)} per run), but {device} has "
                f"{_gib(free)} free; use --concurrent-runs {fits} or fewer")
    return Concurrency(runs, requested, per_run, free, str(device)), spec


class _FlatLinear(nn.Linear):
    """``nn.Linear`` on the rows of a flattened input: under ``vmap`` one batched matrix
    product per layer, instead of a weight expanded over every leading dimension."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim <= 2:
            return F.linear(x, self.weight, self.bias)
        y = F.linear(x.reshape(-1, x.shape[-1]), self.weight, self.bias)
        return y.reshape(*x.shape[:-1], y.shape[-1])


def _template(model: nn.Module) -> nn.Module:
    """A structural copy of the model whose tensors ``functional_call`` replaces."""
    t = copy.deepcopy(model)
    for m in t.modules():
        if type(m) is nn.Linear:
            m.__class__ = _FlatLinear
    return t


class _Group:
    """K trainers whose parameters, Adam state and schedule are stacked on the device."""

    def __init__(self, trainers: list[Trainer], spec: list, on_keys: bool = False):
        self.trainers, self.spec, self.on_keys = trainers, spec, on_keys
        first = trainers[0]
        self.device, self.cfg, self.frozen = first.device, first.cfg, first.frozen
        self.template = _template(first.model)
        k = len(trainers)
        named = [dict(t.model.named_parameters()) for t in trainers]
        self.params: dict[str, torch.Tensor] = {}
        for name, p in named[0].items():
            stacked = torch.stack([n[name].detach() for n in named])
            self.params[name] = stacked.requires_grad_(p.requires_grad)
            for r in range(k):  # each run's model reads the stack: no copy to keep in sync
                named[r][name].data = stacked.detach()[r]
        self.buffers = {name: torch.stack([dict(t.model.named_buffers())[name] for t in trainers])
                        for name, _ in first.model.named_buffers()}
        # On keys, the steps run the head alone: its own tensors, the same stacked storage.
        self.head_params = {n[5:]: p for n, p in self.params.items() if n.startswith("head.")}
        self.head_buffers = {n[5:]: b for n, b in self.buffers.items() if n.startswith("head.")}
        name_of = {id(p): n for n, p in named[0].items()}
        groups = []
        for g in first.optim.param_groups:
            groups.append({**{key: v for key, v in g.items() if key != "params"},
                           "params": [self.params[name_of[id(p)]] for p in g["params"]]})
        self.optim = new_adam(groups, first.cfg.lr, first.cfg.weight_decay, self.device)
        self.sched = torch.optim.lr_scheduler.CosineAnnealingLR(self.optim, T_max=first.cfg.t_max,
                                                                eta_min=0)
        states = [t.optim.state_dict() for t in trainers]
        if states[0]["state"]:  # resumed runs: their Adam moments, stacked
            stacked_state = {}
            for i, st in states[0]["state"].items():
                stacked_state[i] = {key: (torch.stack([s["state"][i][key] for s in states])
                                          if key != "step" else v) for key, v in st.items()}
            self.optim.load_state_dict({"state": stacked_state,
                                        "param_groups": states[0]["param_groups"]})
            for t in trainers:
                t.optim.state.clear()
        self.sched.load_state_dict(first.sched.state_dict())
        for r, t in enumerate(trainers):
            t.optim_state = (lambda r=r: self._state_of(r))

    def _state_of(self, r: int) -> tuple[dict[str, Any], dict[str, Any]]:
        """Run ``r``'s optimiser and schedule state, as its own Adam would hold them."""
        sd = self.optim.state_dict()
        k = len(self.trainers)
        state = {i: {key: (v[r].clone() if torch.is_tensor(v) and key != "step" and v.ndim and
                           v.shape[0] == k else v.clone() if torch.is_tensor(v) else v)
                     for key, v in st.items()} for i, st in sd["state"].items()}
        return {"state": state, "param_groups": copy.deepcopy(sd["param_groups"])}, \
            self.sched.state_dict()

    def release(self, keep_optim: bool) -> None:
        """Give each run its own tensors again (and, if asked, its Adam state)."""
        for r, t in enumerate(self.trainers):
            if keep_optim:
                optim, sched = self._state_of(r)
                t.optim.load_state_dict(optim)
                t.sched.load_state_dict(sched)
            t.optim_state = lambda t=t: (t.optim.state_dict(), t.sched.state_dict())
            for p in t.model.parameters():
                p.data = p.data.clone()

    def _loss(self, params, buffers, x, s, y, masks):
        with replay_noise(masks):
            if self.on_keys:
                pred = functional_call(self.template.head, (params, buffers), (x, s))[0]
            else:
                pred = functional_call(self.template, (params, buffers), (x, s))
        return F.mse_loss(pred.float(), y, reduction="sum")

    def epoch(self, pixels: torch.Tensor, inputs: list[RunInputs]
              ) -> tuple[list[float], int, int, dict[int, str]]:
        """One epoch of every run: mean losses, steps, images per run, failures by index."""
        cfg, dev, k = self.cfg, self.device, len(self.trainers)
        self.template.train()
        if self.frozen:
            self.template.backbone.eval()
        orders = [inp.part["train"][torch.randperm(len(inp.part["train"]), generator=t.gen)]
                  for t, inp in zip(self.trainers, inputs, strict=True)]
        n = len(orders[0])
        batch = min(cfg.batch_size, n)
        steps = n // batch
        totals, failed = [0.0] * k, {}
        batched = vmap(self._loss, randomness="error")
        for step in range(steps):
            xs, ss, ys = [], [], []
            for t, inp, order in zip(self.trainers, inputs, orders, strict=True):
                idx = order[step * batch : (step + 1) * batch]
                if self.on_keys:
                    xs.append(inp.keys[idx])
                else:
                    x = pixels[idx]
                    if cfg.augment:
                        x = augment(x, t.gen)
                    xs.append(normalize(x))
                ss.append(inp.vectors[idx])
                ys.append(inp.targets[idx])
            x = torch.stack(xs).to(dev, non_blocking=True)
            s = torch.stack(ss).to(dev, torch.float32)
            y = torch.stack(ys).to(dev)
            drawn = [draw_masks(self.spec, t.noise, dev) for t in self.trainers]
            masks = [torch.stack(m) for m in zip(*drawn, strict=True)] if self.spec else []
            params, buffers = ((self.head_params, self.head_buffers) if self.on_keys else
                               (self.params, self.buffers))
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cfg.amp):
                errs = batched(params, buffers, x, s, y, masks)
            self.optim.zero_grad(set_to_none=True)
            (errs.sum() / batch).backward()  # each run: its own batch-mean gradient
            self.optim.step()  # a diverged run's slice takes NaN; it is stopped below
            self.sched.step()
            for r, e in enumerate(errs.tolist()):
                if r in failed:
                    continue
                if not math.isfinite(e):
                    failed[r] = (f"the loss became {e / batch} at epoch "
                                 f"{self.trainers[r].epoch}, step {step}; lower --lr or check "
                                 "the scores")
                totals[r] += e
        return [tot / max(steps * batch, 1) for tot in totals], steps, steps * batch, failed


def train_together(trainers: list[Trainer], pixels: torch.Tensor, inputs: list[RunInputs],
                   spec: list) -> dict[int, DivergedError]:
    """Train every trainer to its last epoch, all at once; trainers must be at one epoch.

    Returns the runs that diverged (index → error); their trainers stop where they failed.
    """
    failed: dict[int, DivergedError] = {}
    active = [i for i, t in enumerate(trainers) if not t.done]
    while active:
        group = _Group([trainers[i] for i in active], spec,
                       on_keys=all(inputs[i].keys is not None for i in active))
        stopped = False
        while not stopped and not all(trainers[i].done for i in active):
            t0 = time.perf_counter()
            losses, steps, images, bad = group.epoch(pixels, [inputs[i] for i in active])
            if group.device.type == "cuda":
                torch.cuda.synchronize(group.device)
            train_seconds = time.perf_counter() - t0
            for r, i in enumerate(active):
                t = trainers[i]
                if r in bad:
                    failed[i] = DivergedError(bad[r])
                    continue
                t.sched.load_state_dict(group.sched.state_dict())
                inp = inputs[i]
                t.end_epoch(pixels, inp.vectors, inp.targets, inp.part, losses[r], steps,
                            images, t0, train_seconds)
            stopped = bool(bad)
        done = all(trainers[i].done for i in active)
        group.release(keep_optim=not done)
        active = [i for i in active if i not in failed and not trainers[i].done]
    return failed
