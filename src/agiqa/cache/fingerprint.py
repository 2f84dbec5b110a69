"""The cache fingerprint: sha256 of the canonical JSON of everything that shapes a vector."""

from __future__ import annotations

import hashlib
import json
from typing import Any

__all__ = ["CACHE_FORMAT_VERSION", "POOLING", "fingerprint_of", "semantic_spec"]

CACHE_FORMAT_VERSION = 1
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

    ``recipe`` (the turn, the padding and the pooling, :meth:`agiqa.presets.Recipe.spec`) is
    left out when ``None``, so the fingerprints of caches written before it existed stay the
    same.
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
    }
    if recipe is not None:
        spec["recipe"] = dict(recipe)
    return spec


def fingerprint_of(spec: dict[str, Any]) -> str:
    canonical = json.dumps(spec, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode()).hexdigest()
