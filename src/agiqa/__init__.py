"""agiqa: quality assessment of AI-generated images the MA-AGIQA way.

A multimodal LLM reads each image under quality prompts (stage one, cached once); a MANIQA
backbone and a mixture-of-experts head are trained on the cached vectors (stage two).
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["Scorer", "__version__", "load_model"]


def __getattr__(name: str):
    # Heavy imports (torch, timm, transformers) only when these are used.
    if name == "load_model":
        from agiqa.models.agiqa_net import load_model

        return load_model
    if name == "Scorer":
        from agiqa.stages.score import Scorer

        return Scorer
    raise AttributeError(f"module 'agiqa' has no attribute {name!r}")
