"""Inputs and predictions shared by fit, evaluate and score: decode once, predict in batches."""

from __future__ import annotations

import torch

from agiqa.cache import SemanticCache
from agiqa.data.datasets import Dataset
from agiqa.data.loader import read_images
from agiqa.data.pixel_cache import PixelCache
from agiqa.data.pixels import normalize
from agiqa.errors import BadImageError, StaleVectorsError
from agiqa.models.agiqa_net import AgiqaNet

__all__ = ["backbone_keys", "decode_pixels", "inputs_of", "predict", "predict_keys"]


def decode_pixels(ds: Dataset, keys: list[str], workers: int = 2, progress: bool = True,
                  pixel_cache: PixelCache | None = None) -> tuple[torch.Tensor, list[str]]:
    """Decode and resize every image once (:func:`agiqa.data.loader.read_images`): uint8
    [n, 3, 224, 224], and the sha256 of the bytes each was decoded from. With a
    ``pixel_cache``, an image whose bytes it knows is not decoded again, and what is decoded
    is kept there.

    Raises:
        BadImageError: naming the first image that cannot be read (a bad file, or one whose
            loader process the operating system killed twice) and how many others failed.
    """
    out = torch.empty((len(keys), 3, 224, 224), dtype=torch.uint8)
    shas: list[str] = [""] * len(keys)
    failures: dict[str, str] = {}
    files = [(ds.path(k), k) for k in keys]
    for d in read_images(files, workers, pixels=True, pixel_cache=pixel_cache,
                         progress=progress):
        if d.reason is not None:
            failures[keys[d.index]] = d.reason
        else:
            out[d.index] = d.value
            shas[d.index] = d.sha256
    if failures:
        (first, why), *others = failures.items()
        if others:
            shown = ", ".join(k for k, _ in others[:3]) + (", …" if len(others) > 3 else "")
            why += f" (and {len(others)} other image(s) that cannot be read: {shown})"
        raise BadImageError(first, why)
    return out, shas


def inputs_of(ds: Dataset, keys: list[str], cache: SemanticCache, workers: int = 2,
              progress: bool = True, pixel_cache: PixelCache | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Cached vectors [n, P, D] and decoded pixels of ``keys``, each file read once: the bytes
    decoded must be those the vectors were computed from, else nothing is returned.

    Raises:
        StaleVectorsError: naming the images whose file changed since extraction.
    """
    data = cache.read(keys, ("vectors", "sha256"))
    pixels, shas = decode_pixels(ds, keys, workers, progress, pixel_cache)
    changed = [k for k, new, old in zip(keys, shas, data["sha256"], strict=True) if new != old]
    if changed:
        raise StaleVectorsError(changed, str(cache.path))
    return torch.from_numpy(data["vectors"]), pixels


@torch.no_grad()
def predict(model: AgiqaNet, pixels: torch.Tensor, vectors: torch.Tensor, device: torch.device,
            batch_size: int = 32, amp: bool = False, with_gates: bool = False):
    """Scores (and gates) of uint8 pixels [n, 3, 224, 224] with vectors [n, P, D]."""
    model.eval()
    scores, gates = [], []
    for i in range(0, len(pixels), batch_size):
        x = normalize(pixels[i : i + batch_size]).to(device)
        s = vectors[i : i + batch_size].to(device, torch.float32)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            y, g = model(x, s, return_gates=True)
        scores.append(y.float().cpu())
        gates.append(g.float().cpu())
    scores = torch.cat(scores) if scores else torch.empty(0)
    gates = torch.cat(gates) if gates else torch.empty(0)
    return (scores, gates) if with_gates else scores


@torch.no_grad()
def backbone_keys(model: AgiqaNet, pixels: torch.Tensor, device: torch.device,
                  batch_size: int = 32, amp: bool = False) -> torch.Tensor:
    """The MANIQA key [n, tokens] of uint8 pixels [n, 3, 224, 224], the backbone in eval mode
    (no dropout, no stochastic depth): what a frozen backbone gives an image at every step."""
    was = model.backbone.training
    model.backbone.eval()
    keys = []
    try:
        for i in range(0, len(pixels), batch_size):
            x = normalize(pixels[i : i + batch_size]).to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                keys.append(model.backbone(x).float().cpu())
    finally:
        model.backbone.train(was)
    return torch.cat(keys) if keys else torch.empty(0, model.backbone.key_width)


@torch.no_grad()
def predict_keys(model: AgiqaNet, keys: torch.Tensor, vectors: torch.Tensor,
                 device: torch.device, batch_size: int = 32, amp: bool = False,
                 with_gates: bool = False):
    """Scores (and gates) from backbone keys [n, tokens] (:func:`backbone_keys`) with vectors
    [n, P, D]: the head alone, in eval mode; equal to :func:`predict` on the pixels the keys
    came from, to float rounding."""
    model.eval()
    scores, gates = [], []
    for i in range(0, len(keys), batch_size):
        k = keys[i : i + batch_size].to(device)
        s = vectors[i : i + batch_size].to(device, torch.float32)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            y, g = model.head(k, s)
        scores.append(y.float().cpu())
        gates.append(g.float().cpu())
    scores = torch.cat(scores) if scores else torch.empty(0)
    gates = torch.cat(gates) if gates else torch.empty(0)
    return (scores, gates) if with_gates else scores
