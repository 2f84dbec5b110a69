"""The cache fingerprint: sha256 of the canonical JSON of everything that shapes a vector."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, fields
from typing import Any

from agiqa.fileio import LOCAL_REVISION_PREFIX

__all__ = ["CACHE_FORMAT_VERSION", "POOLING", "SemanticSpec", "fingerprint_of", "semantic_spec"]

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


@dataclass(frozen=True)
class SemanticSpec:
    """How the semantic vectors of a cache, or of a model's training, were computed: the typed
    form of :func:`semantic_spec`'s dict, as a cache's manifest and a run's ``config.json``
    record it (``"semantics"``). ``to_dict()`` gives that dict back key for key, so the
    fingerprint of a spec read from a file is the fingerprint recorded with it.
    """

    model: str
    prompts: tuple[str, ...]
    revision: str | None = None
    dtype: str = "float16"
    pooling: str = POOLING
    answer_prefix: str = ""
    rating_words: tuple[str, ...] = ()
    rating_weights: tuple[float, ...] = (5.0, 4.0, 3.0, 2.0, 1.0)
    format_version: int | None = None
    recipe: dict[str, Any] | None = None
    # keys of a file written by another version, kept so that the fingerprint is unchanged
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "semantics") -> SemanticSpec:
        """Read a recorded spec; a missing ``model`` or ``prompts`` is refused (ValueError
        naming ``where``)."""
        if not isinstance(d, dict) or not isinstance(d.get("model"), str) or \
                not isinstance(d.get("prompts"), list):
            raise ValueError(f"{where}: not a semantic description (needs model and prompts)")
        known = {f.name for f in fields(cls)} - {"extra"}
        values = {k: v for k, v in d.items() if k in known}
        for k in ("prompts", "rating_words", "rating_weights"):
            if isinstance(values.get(k), list):
                values[k] = tuple(values[k])
        return cls(**values, extra={k: v for k, v in d.items() if k not in known})

    def to_dict(self) -> dict[str, Any]:
        """The recorded form (:func:`semantic_spec`'s keys)."""
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        for k in ("prompts", "rating_words", "rating_weights"):
            d[k] = list(d[k])
        return {**d, **self.extra}

    @property
    def fingerprint(self) -> str:
        return fingerprint_of(self.to_dict())

    @property
    def pad_square(self) -> bool | None:
        """The recipe's padding to a square (None: no recipe recorded)."""
        return (self.recipe or {}).get("pad_square")
