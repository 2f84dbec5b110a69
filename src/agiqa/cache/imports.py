"""Import of the official MA-AGIQA semantic tensors into a semantic cache.

The official ``getFeature.py`` saves one ``torch.save`` file per image and prompt under its
``tensor_root``: the image name with ``.jpg`` (or ``.png``) replaced by ``""`` (Python's
``str.replace``, every occurrence), then ``_semantic_content.pt`` or ``_coherence.pt``; each holds
a float16 tensor of shape [1, 4096]. This module reads them without pickle
(``torch.load(weights_only=True)``) into whole shards of a cache, hashing every image file so
``agiqa cache verify`` works. A missing or malformed tensor, or a missing image, makes that image
a recorded failure with its reason, as in stage one; nothing is dropped silently.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from agiqa.cache.shards import ShardData
from agiqa.cache.store import SemanticCache, plan_shards
from agiqa.data.images import file_sha256

__all__ = ["ImportReport", "import_official_tensors", "official_tensor_name"]

_FLOAT16_MAX = float(np.finfo(np.float16).max)


@dataclass
class ImportReport:
    """What an import did: images imported, reused (shards already there) and failed."""

    cache: str
    requested: int
    imported: int = 0
    reused: int = 0
    failures: dict[str, str] = field(default_factory=dict)

    @property
    def exit_code(self) -> int:
        return 2 if self.failures else 0

    def to_dict(self) -> dict[str, Any]:
        return {"cache": self.cache, "requested": self.requested, "imported": self.imported,
                "reused": self.reused, "failed": len(self.failures), "failures": self.failures}


def official_tensor_name(key: str, prompt_name: str) -> str | None:
    """The file ``getFeature.py`` writes for image ``key`` and one prompt; ``None`` for an image
    that is neither ``.jpg`` nor ``.png`` (the official code refuses those)."""
    for ext in (".jpg", ".png"):
        if key.endswith(ext):
            return f"{key.replace(ext, '')}_{prompt_name}.pt"
    return None


def _read_tensor(path: Path, dim: int) -> tuple[np.ndarray | None, str | None]:
    """The [dim] vector of one official file, or the reason it cannot be used."""
    import pickle

    import torch

    if not path.is_file():
        return None, f"missing {path}"
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return None, f"{path}: not loadable without pickle ({first})"
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file
        return None, f"{path}: not a torch file ({type(e).__name__}: {e})"
    if not torch.is_tensor(obj):
        return None, f"{path}: holds a {type(obj).__name__}, not a tensor"
    if tuple(obj.shape) != (1, dim):
        return None, f"{path}: shape {list(obj.shape)}, expected [1, {dim}]"
    if not obj.is_floating_point():
        return None, f"{path}: dtype {obj.dtype}, expected a floating-point tensor"
    vector = obj[0].float().numpy()
    if not np.isfinite(vector).all() or np.abs(vector).max() > _FLOAT16_MAX:
        return None, f"{path}: non-finite or float16-overflowing values"
    return vector, None


def _read_image(root: Path, key: str, tensor_root: Path, prompt_names: list[str], dim: int
                ) -> tuple[np.ndarray | None, str | None, str]:
    """(vectors [P, D], sha256, "") for one image, or (None, None, reason)."""
    image = root / key
    if not image.is_file():
        return None, None, f"image not found under {root}"
    vectors = []
    for name in prompt_names:
        tensor_name = official_tensor_name(key, name)
        if tensor_name is None:
            return None, None, "the official code names tensors only for .jpg and .png images"
        vector, reason = _read_tensor(tensor_root / tensor_name, dim)
        if reason:
            return None, None, reason
        vectors.append(vector)
    return np.stack(vectors), file_sha256(image), ""


def import_official_tensors(
    tensor_root: str | os.PathLike,
    root: str | os.PathLike,
    keys: list[str],
    out: str | os.PathLike,
    semantics: dict[str, Any],
    prompt_names: list[str],
    dim: int,
    fmt: str | None = None,
    shard_size: int = 1024,
) -> ImportReport:
    """Read the official tensors of ``keys`` into the cache ``out``.

    Args:
        tensor_root: the folder ``getFeature.py`` wrote (its ``tensor_root``).
        root: the image root the keys are relative to (images are hashed).
        keys: the image keys (label-file names, ``/`` separated).
        out: the cache folder (created, or resumed: shards already there are kept).
        semantics: the semantic description the tensors were computed with (the official
            recipe's), whose fingerprint the cache takes.
        prompt_names: the prompt names, in the cache's order; each names a file suffix.
        dim: the vector width.
        fmt: the shard format of a new cache.
        shard_size: images per shard.
    """
    tensor_root, root = Path(tensor_root), Path(root)
    cache = SemanticCache.create(out, semantics, prompt_names, dim, fmt, root=root)
    report = ImportReport(str(out), len(keys))
    existing = set(cache.shard_names())
    p = len(prompt_names)
    for name, shard_keys in plan_shards(keys, shard_size):
        if name in existing:
            report.reused += len(shard_keys)
            continue
        good, shas, vectors, failures = [], [], [], []
        for key in shard_keys:
            vecs, sha, reason = _read_image(root, key, tensor_root, prompt_names, dim)
            if reason:
                failures.append((key, reason))
                continue
            good.append(key)
            shas.append(sha)
            vectors.append(vecs)
        stacked = np.stack(vectors).astype(np.float16) if vectors else \
            np.zeros((0, p, dim), np.float16)
        # The official tensors carry no zero-shot score.
        zero_shot = np.full((len(good), p), np.nan, np.float32)
        cache.write_shard(name, ShardData(good, shas, stacked, zero_shot, failures))
        report.imported += len(good)
    cache.refresh()
    known = cache.failures
    report.failures = {k: known[k] for k in keys if k in known}
    return report
