"""The cache fingerprint: sha256 of the canonical JSON of everything that shapes a vector."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from agiqa.fileio import LOCAL_REVISION_PREFIX

__all__ = ["CACHE_FORMAT_VERSION", "POOLING", "fingerprint_of", "semantic_spec"]

# 2: single-file shards (a Zarr zip or an HDF5 file); 1 kept shards as folders. Part of every
# fingerprint, so vectors of one format never pass for the other's.
CACHE_FORMAT_VERSION = 2
POOLING = "masked_mean_last_hidden_state"


def semantic_spec(
    model: str,
    revision: str | None,
    dtype: str,
    prompts: list[str],
    answer_prefix: str,
    rating_words: list[str],
    rating_weights: list[float] | None = None,
    recipe: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The canonical description of how the semantic vectors of a cache were computed.

    ``recipe`` is the turn, the padding and the pooling (:meth:`agiqa.presets.Recipe.spec`);
    ``None`` is recorded as such.
    """
    spec = {
        "model": model,
        "revision": revision,
        "dtype": dtype,
        "prompts": list(prompts),
        "pooling": POOLING,
        "answer_prefix": answer_prefix,
        "rating_words": list(rating_words),
        "rating_weights": [float(w) for w in (rating_weights or [5, 4, 3, 2, 1])],
        "format_version": CACHE_FORMAT_VERSION,
        "recipe": dict(recipe) if recipe is not None else None,
    }
    return spec


def fingerprint_of(spec: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of ``spec``.

    A local model folder is identified by the content hash in its revision; its path is only a
    label (recorded, not hashed), so moving the folder keeps the fingerprint.
    """
    if str(spec.get("revision") or "").startswith(LOCAL_REVISION_PREFIX):
        spec = {**spec, "model": "local"}
    canonical = json.dumps(spec, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode()).hexdigest()
