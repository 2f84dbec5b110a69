"""How stage one runs the vision towers of transformers families, without changing a number.

* :func:`vision_once`: with fused prompts (``--fuse-prompts``) the batch holds every prompt's
  rows of the same images. The model's ``get_image_features`` then runs on each image once and
  its features are repeated for the rows of every prompt (prompt-major, as the rows are). The
  language side still sees one image per row: per-image metadata such as Qwen2-VL's
  ``image_grid_thw`` keeps one entry per row, and the model's own check that the image tokens
  match the features still runs.
* :func:`grouped_window_attention`: transformers runs the vision attention of the Qwen2-VL
  family (Qwen2-VL, Qwen2.5-VL) one window at a time under SDPA, a Python loop over every window
  of every image: for Qwen2.5-VL and an image of 1024 × 1024 px, about 90 windows per layer and
  image, each a handful of small kernels. Here the windows of one length are stacked and run as
  one SDPA call, so a layer makes one call per distinct window length; each window still attends
  to itself alone, with SDPA's arithmetic.

Both apply to agiqa's own forward passes only (context managers), so a model shared with other
code keeps its behaviour outside them.
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["GROUPED_ATTENTION", "grouped_window_attention", "supports_grouped_attention",
           "vision_once"]

# transformers hands the window boundaries (``cu_seq_lens_q``) to an attention function only
# when the implementation's name holds "flash" (``is_flash_attention_requested``); otherwise it
# loops over the windows itself.
GROUPED_ATTENTION = "agiqa_flash_grouped_sdpa"
# Model types whose vision attention loops over cu_seqlens windows under SDPA.
_WINDOWED = {"qwen2_vl", "qwen2_5_vl"}
# Per-image metadata the language side needs once per row; the vision tower once per image.
_PER_IMAGE_ARGS = ("image_grid_thw", "image_sizes")


# --------------------------------------------------------------------------- vision once

def _repeat_features(features: Any, repeats: int) -> Any:
    if torch.is_tensor(features):
        return torch.cat([features] * repeats)
    if isinstance(features, (list, tuple)):
        return features * repeats
    raise TypeError(f"cannot repeat image features of type {type(features).__name__}")


@contextmanager
def vision_once(base: Any, repeats: int) -> Iterator[None]:
    """Within this block, ``base.get_image_features`` runs the vision tower on the first
    ``1/repeats`` of the per-image metadata (the images themselves are given once) and returns
    the features repeated ``repeats`` times, one copy per prompt."""
    original = base.get_image_features
    params = list(inspect.signature(original).parameters)

    def first_images(value: Any, name: str) -> Any:
        if value is None:
            return None
        if len(value) % repeats:
            raise ValueError(f"{name} has {len(value)} entries, not a multiple of the "
                             f"{repeats} prompts sharing the images")
        return value[: len(value) // repeats]

    def once(*args: Any, **kwargs: Any) -> Any:
        args = list(args)  # the call keeps its form: decorators may fill arguments by name
        for name in _PER_IMAGE_ARGS:
            if name in kwargs:
                kwargs[name] = first_images(kwargs[name], name)
            elif name in params and params.index(name) < len(args):
                i = params.index(name)
                args[i] = first_images(args[i], name)
        out = original(*args, **kwargs)
        if hasattr(out, "pooler_output"):  # transformers 5: a model output
            out.pooler_output = _repeat_features(out.pooler_output, repeats)
            return out
        return _repeat_features(out, repeats)

    base.get_image_features = once  # an instance attribute: the class method stays untouched
    try:
        yield
    finally:
        del base.get_image_features


# --------------------------------------------------------------- grouped window attention

def supports_grouped_attention(model: Any) -> bool:
    """Whether ``model``'s vision tower runs SDPA window by window (the Qwen2-VL family)."""
    base = getattr(model, "model", model)
    visual = getattr(base, "visual", None)
    config = getattr(visual, "config", None)
    return getattr(model.config, "model_type", None) in _WINDOWED and config is not None \
        and getattr(config, "_attn_implementation", None) == "sdpa"


class _Plans:
    """The windows of a ``cu_seqlens`` tensor grouped by length, computed once per tensor (a
    vision pass hands every layer one of two tensors: windows, whole images)."""

    def __init__(self):
        self._entries: list[tuple[weakref.ref, list[tuple[int, torch.Tensor]]]] = []

    def __call__(self, cu: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
        for ref, plan in self._entries:
            if ref() is cu:
                return plan
        bounds = cu.tolist()  # one read-back per tensor, not per layer
        by_length: dict[int, list[int]] = {}
        for start, end in zip(bounds[:-1], bounds[1:], strict=True):
            if end > start:
                by_length.setdefault(end - start, []).append(start)
        plan = []
        for length, starts in sorted(by_length.items()):
            index = torch.tensor(starts)[:, None] + torch.arange(length)
            plan.append((length, index.reshape(-1).to(cu.device, non_blocking=True)))
        self._entries = [(r, p) for r, p in self._entries if r() is not None][-3:]
        self._entries.append((weakref.ref(cu), plan))
        return plan


_plans = _Plans()


def _grouped_sdpa(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: torch.Tensor | None = None, scaling: float | None = None,
                  dropout: float = 0.0, cu_seq_lens_q: torch.Tensor | None = None,
                  **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Attention over packed windows ([1, heads, tokens, dim] with ``cu_seq_lens_q``), one SDPA
    call per window length; returns [1, tokens, heads, dim] as transformers' functions do."""
    if cu_seq_lens_q is None or query.shape[0] != 1 or attention_mask is not None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask,
                                      scaling=scaling, dropout=dropout,
                                      is_causal=kwargs.get("is_causal", False))
    q, k, v = query[0], key[0], value[0]
    heads, tokens, dim = q.shape
    out = q.new_empty(tokens, heads, dim)
    for length, flat in _plans(cu_seq_lens_q):
        n = flat.numel() // length

        def take(x: torch.Tensor, flat=flat, n=n, length=length) -> torch.Tensor:
            return x.index_select(1, flat).view(heads, n, length, -1).transpose(0, 1)

        o = F.scaled_dot_product_attention(take(q), take(k), take(v), dropout_p=dropout,
                                           scale=scaling)  # [n, heads, length, dim]
        out.index_copy_(0, flat, o.permute(0, 2, 1, 3).reshape(n * length, heads, dim))
    return out.unsqueeze(0), None


_registered = False


def _register() -> None:
    global _registered
    if not _registered:
        from transformers import AttentionInterface

        AttentionInterface.register(GROUPED_ATTENTION, _grouped_sdpa)
        _registered = True


@contextmanager
def grouped_window_attention(model: Any) -> Iterator[None]:
    """Within this block, ``model``'s vision tower (see :func:`supports_grouped_attention`)
    runs its window attention one SDPA call per window length."""
    _register()
    config = getattr(model, "model", model).visual.config
    before = config._attn_implementation
    config._attn_implementation = GROUPED_ATTENTION
    try:
        yield
    finally:
        config._attn_implementation = before
