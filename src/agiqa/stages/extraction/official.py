"""The semantic fingerprint of the official MA-AGIQA vectors: mPLUG-Owl2 under its official
recipe, the paper's prompts (semantic content first, then coherence), float16.

Imports of official tensors (``agiqa cache import-pt``) and checkpoints
(``agiqa import-official``) record it, so that caches and models made from them match what
``agiqa extract-semantics --model mplug-owl2`` computes, and ``score-folder`` runs that MLLM.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from agiqa.cache import fingerprint_of, semantic_spec
from agiqa.errors import ConfigError
from agiqa.models.mllm.recipe import identify_mllm
from agiqa.presets import DEFAULT_PROMPTS, load_prompts

__all__ = ["OFFICIAL_DTYPE", "OFFICIAL_MLLM", "OFFICIAL_RECIPE", "official_semantics"]

OFFICIAL_MLLM = "mplug-owl2"
OFFICIAL_RECIPE = "mplug-owl2-official"
OFFICIAL_DTYPE = "float16"


def official_semantics(mllm: str = OFFICIAL_MLLM, dtype: str = OFFICIAL_DTYPE,
                       prompts: str = DEFAULT_PROMPTS) -> dict[str, Any]:
    """The semantic description of vectors computed by ``mllm`` with the official recipe.

    Args:
        mllm: an mPLUG-Owl2-family preset, hub id or local folder.
        dtype: the dtype the vectors were computed in (the official ``getFeature.py``: float16).
        prompts: the prompt set; its names give the order of the semantic experts.

    Returns:
        ``{"semantics": spec, "fingerprint": ..., "prompt_names": [...], "dim": D}``, the
        fields a model directory and a cache manifest record.
    """
    if Path(mllm).exists():  # recorded absolute, so score-folder finds it from anywhere
        mllm = str(Path(mllm).resolve())
    identity = identify_mllm(mllm, fetch=False)
    if identity.resolved_revision is None:  # a hub id without a pinned commit: ask the hub
        identity = identify_mllm(mllm)
    if identity.recipe.name != OFFICIAL_RECIPE:
        raise ConfigError(
            f"{mllm} is not an mPLUG-Owl2 model (model_type {identity.model_type!r}); the "
            "official vectors come from mPLUG-Owl2 under its official recipe")
    if identity.resolved_revision is None:
        raise ConfigError(
            f"{identity.model_id}: its commit is unknown (no pinned revision, not in the hub "
            "cache); download it first or name a local folder")
    if identity.dim is None:
        raise ConfigError(f"{identity.model_id}: its config.json gives no hidden_size")
    p = load_prompts(prompts)
    spec = semantic_spec(identity.model_id, identity.resolved_revision, dtype, p.texts,
                         p.answer_prefix, p.rating_words, p.rating_weights,
                         identity.recipe.spec())
    return {"semantics": spec, "fingerprint": fingerprint_of(spec),
            "prompt_names": list(p.names), "dim": identity.dim}
