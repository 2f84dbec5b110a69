"""Dropout and stochastic depth whose masks come from a chosen generator.

``nn.Dropout`` and timm's ``DropPath`` draw their masks from torch's global generator, so two
runs trained in one process (or stacked and trained as one batched computation with
``torch.func.vmap``) would share or interleave one stream of masks. These modules draw from the
source set by the caller instead:

* :func:`draw_noise` (one run): masks drawn from that run's generator, in call order;
* :func:`replay_noise` (runs trained together): masks drawn before the forward, one list per
  run from each run's generator in the same order, stacked, and passed into the batched call;
* :func:`record_noise`: the shapes and keep probabilities of the masks a forward asks for.

A run draws the same masks alone as among others: same generator, same shapes, same order.
Without a source (a model trained by other code) they behave as ``nn.Dropout`` and timm's
``DropPath``. Both keep the parameter-free modules' places in the state dict.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DropPath", "Dropout", "draw_masks", "draw_noise", "record_noise", "replay_noise"]

_SOURCES: list[object] = []


class _Draw:
    def __init__(self, gen: torch.Generator):
        self.gen = gen

    def mask(self, shape: tuple[int, ...], keep: float, device: torch.device) -> torch.Tensor:
        return torch.rand(shape, generator=self.gen, device=device) < keep


class _Replay:
    def __init__(self, masks: Sequence[torch.Tensor]):
        self.masks, self.i = list(masks), 0

    def mask(self, shape: tuple[int, ...], keep: float, device: torch.device) -> torch.Tensor:
        if self.i >= len(self.masks) or tuple(self.masks[self.i].shape) != tuple(shape):
            got = tuple(self.masks[self.i].shape) if self.i < len(self.masks) else "none"
            raise RuntimeError(f"dropout mask {self.i}: the forward asks for {tuple(shape)}, "
                               f"the masks drawn for it are {got}")
        self.i += 1
        return self.masks[self.i - 1]


class _Record:
    def __init__(self):
        self.spec: list[tuple[tuple[int, ...], float]] = []

    def mask(self, shape: tuple[int, ...], keep: float, device: torch.device) -> torch.Tensor:
        self.spec.append((tuple(int(s) for s in shape), keep))
        return torch.ones(shape, dtype=torch.bool, device=device)


@contextlib.contextmanager
def _source(src: object) -> Iterator[object]:
    _SOURCES.append(src)
    try:
        yield src
    finally:
        _SOURCES.pop()


def draw_noise(gen: torch.Generator):
    """Masks of the forwards in the block come from ``gen`` (on the model's device)."""
    return _source(_Draw(gen))


def replay_noise(masks: Sequence[torch.Tensor]):
    """The forward in the block takes these masks, in order (:func:`draw_masks`)."""
    return _source(_Replay(masks))


def record_noise():
    """Record ``(shape, keep)`` of every mask the forward asks for: ``with record_noise() as r:
    model(x, s)`` then ``r.spec``. The forward sees masks of ones."""
    return _source(_Record())


def draw_masks(spec: Sequence[tuple[tuple[int, ...], float]], gen: torch.Generator,
               device: torch.device) -> list[torch.Tensor]:
    """The masks :func:`draw_noise` would draw for a forward of this ``spec``, drawn ahead."""
    return [torch.rand(shape, generator=gen, device=device) < keep for shape, keep in spec]


def _mask(shape, keep: float, device: torch.device) -> torch.Tensor | None:
    return _SOURCES[-1].mask(tuple(shape), keep, device) if _SOURCES else None  # type: ignore[attr-defined]


class Dropout(nn.Dropout):
    """``nn.Dropout`` drawing its mask from the source of :func:`draw_noise` or
    :func:`replay_noise`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        keep = 1.0 - self.p
        mask = _mask(x.shape, keep, x.device)
        if mask is None:
            return F.dropout(x, self.p, True, self.inplace)
        return x * mask / keep


class DropPath(nn.Module):
    """Stochastic depth (timm's ``DropPath``, scaled by the keep probability): one draw per
    sample, from the source of :func:`draw_noise`/:func:`replay_noise`."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.drop_prob == 0:
            return x
        keep = 1.0 - self.drop_prob
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        mask = _mask(shape, keep, x.device)
        if mask is None:
            mask = x.new_empty(shape).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"drop_prob={round(self.drop_prob, 3):0.3f}"
