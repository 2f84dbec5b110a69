"""Optional training normalisations (not in the paper), folded into the saved model.

``--score-norm zscore`` trains on (mos − mean) / std of the training split and folds the inverse
into the output layer, so the saved model still speaks MOS. ``--semantic-norm zscore``
standardises each semantic dimension with the training split's statistics and folds that into
the first layer of each semantic expert, so the saved model takes raw vectors.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from agiqa.errors import DatasetError
from agiqa.models.agiqa_net import AgiqaNet
from agiqa.options import spell
from agiqa.stages.configs import KEY_NORMS, SCORE_NORMS, SEMANTIC_NORMS

__all__ = ["KEY_NORMS", "SCORE_NORMS", "SEMANTIC_NORMS", "fold_key_norm", "fold_score_norm",
           "fold_semantic_norm", "key_norm", "score_norm", "semantic_norm"]



def score_norm(kind: str, train_targets: torch.Tensor) -> dict[str, Any] | None:
    """Mean and std of the training MOS (``zscore``), or None."""
    if kind == "none":
        return None
    std = float(train_targets.std()) if len(train_targets) > 1 else 0.0
    if not math.isfinite(std) or std == 0.0:
        raise DatasetError(f"{spell('score_norm', 'zscore')}: the training scores have no "
                           "spread (std 0)")
    return {"kind": kind, "mean": float(train_targets.mean()), "std": std,
            "folded_into": "head.output"}


@torch.no_grad()
def fold_score_norm(model: AgiqaNet, norm: dict[str, Any]) -> None:
    """Make the output layer predict MOS: y = (w·x + b)·std + mean."""
    out = model.head.output
    out.weight.mul_(norm["std"])
    out.bias.mul_(norm["std"]).add_(norm["mean"])


def semantic_norm(kind: str, train_vectors: torch.Tensor) -> dict[str, torch.Tensor] | None:
    """Per-dimension mean and std of the training vectors (``zscore``), or None."""
    if kind == "none":
        return None
    v = train_vectors.float()
    return {"mean": v.mean(0), "std": v.std(0).clamp_min(1e-6) if len(v) > 1 else
            torch.ones_like(v[0])}


@torch.no_grad()
def fold_semantic_norm(model: AgiqaNet, norm: dict[str, torch.Tensor]) -> None:
    """Make each semantic expert take raw vectors: W·(s − μ)/σ + b = (W/σ)·s + (b − W·μ/σ)."""
    for i, expert in zip(model.head.prompt_index, model.head.semantic_experts, strict=True):
        linear = expert[0]
        mean, std = norm["mean"][i].to(linear.weight), norm["std"][i].to(linear.weight)
        linear.bias.sub_(linear.weight @ (mean / std))
        linear.weight.div_(std)


def key_norm(kind: str, train_keys: torch.Tensor) -> dict[str, torch.Tensor] | None:
    """Per-patch mean and std of the training split's backbone keys (``zscore``), or None."""
    return semantic_norm(kind, train_keys)


@torch.no_grad()
def fold_key_norm(model: AgiqaNet, norm: dict[str, torch.Tensor]) -> None:
    """Make the image expert take raw keys: W·(k − μ)/σ + b = (W/σ)·k + (b − W·μ/σ)."""
    linear = model.head.image_expert
    if linear is None:  # an ablation without the image expert never reads the keys
        return
    mean, std = norm["mean"].to(linear.weight), norm["std"].to(linear.weight)
    linear.bias.sub_(linear.weight @ (mean / std))
    linear.weight.div_(std)
