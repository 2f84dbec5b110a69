"""MA-AGIQA: the MANIQA backbone plus the MoE fusion of MLLM semantic vectors.

Large Multi-modality Model Assisted AI-Generated Image Quality Assessment
(Wang et al., ACM MM 2024), https://github.com/wangpuyi/MA-AGIQA.

A model directory is ``model.safetensors`` + ``config.json`` (architecture arguments, the
semantic fingerprint of the cache it was trained on, score normalisation, agiqa version).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from agiqa.errors import CheckpointError, ConfigError, ModelLoadError
from agiqa.fileio import atomic_path, read_json, write_json
from agiqa.models.maniqa import IMAGE_KEYS, ManiqaBackbone
from agiqa.models.moe import MoEHead
from agiqa.options import spell
from agiqa.presets import load_backbone_preset

__all__ = ["AgiqaNet", "ModelConfig", "ScoreMaps", "backbone_architecture", "create_model",
           "load_model", "pretrained_name", "resolve_pretrained", "save_model"]

# The ImageNet weights MA-AGIQA started from: timm 0.5.5's ``vit_base_patch8_224`` loaded the
# AugReg ImageNet-21k → 1k checkpoint (B_8-i21k-300ep-...-res_224.npz). timm ≥ 1.0 names it
# ``vit_base_patch8_224.augreg_in21k_ft_in1k``; its untagged name now means ``augreg2``.
PAPER_VIT = "vit_base_patch8_224.augreg_in21k_ft_in1k"

def backbone_architecture(backbone: str) -> dict[str, Any]:
    """The ``ModelConfig`` fields a backbone preset sets (built-in or ``$AGIQA_HOME``'s)."""
    return load_backbone_preset(backbone).architecture()


def pretrained_name(backbone: str) -> str | None:
    """The timm name (with tag) of a backbone's published weights; None: it has none."""
    preset = load_backbone_preset(backbone)
    return preset.timm_name if preset.pretrained else None


@dataclass
class ModelConfig:
    """Architecture arguments; ``ModelConfig(**d)`` refuses unknown keys."""

    backbone: str = "vit_base_patch8_224"
    num_prompts: int = 2
    semantic_dim: int = 4096
    timm_name: str = PAPER_VIT
    vit_args: dict[str, Any] = field(default_factory=dict)
    feature_blocks: list[int] = field(default_factory=lambda: [6, 7, 8, 9])
    maniqa_dim: int = 768
    swin_heads: int = 4
    window_size: int = 4
    dim_mlp: int = 768
    grid: int = 28
    drop: float = 0.1
    # None: PyTorch's default initialisation, as the official code. The tiny preset starts the
    # patch-score bias positive so its narrow ReLU head is alive (training from scratch only).
    score_bias_init: float | None = None
    # Ablations (not in the paper): the prompts whose semantic experts are used (indices into
    # the vectors' P prompts; None: all), the image expert, the fusion (moe, concat, mean).
    semantic_experts: list[int] | None = None
    image_expert: bool = True
    fusion: str = "moe"
    # What the image expert reads (not in the paper unless ``maniqa``): see ``IMAGE_KEYS``.
    image_key: str = "maniqa"

    @classmethod
    def for_backbone(cls, backbone: str, num_prompts: int, semantic_dim: int,
                     drop: float | None = None, **ablation: Any) -> ModelConfig:
        extra = {} if drop is None else {"drop": drop}
        return cls(backbone=backbone, num_prompts=num_prompts, semantic_dim=semantic_dim,
                   **backbone_architecture(backbone), **extra, **ablation)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def resolve_pretrained(backbone: str, pretrained: bool | None,
                       weights_file: str | None = None) -> bool:
    """Whether the ViT starts from published weights; ``None``: yes when the backbone has any.

    Raises:
        ConfigError: weights asked for a backbone that has none, or ``--no-pretrained`` with
            ``--backbone-weights``.
    """
    if pretrained_name(backbone) is None:
        if pretrained or weights_file:
            raise ConfigError(f"backbone {backbone!r} has no published weights (it always starts "
                              "from random weights); drop --pretrained and --backbone-weights")
        return False
    if weights_file and pretrained is False:
        raise ConfigError(f"{spell('pretrained', False)} and {spell('backbone_weights')} "
                          "contradict each other")
    return True if pretrained is None or weights_file else pretrained


def _weights_error(cfg: ModelConfig, e: Exception) -> ModelLoadError:
    hub = f"https://huggingface.co/timm/{cfg.timm_name}"
    return ModelLoadError(
        f"cannot load the ImageNet weights {cfg.timm_name} ({type(e).__name__}: {e}); "
        f"offline, download model.safetensors from {hub} on a connected machine and pass it "
        "with --backbone-weights FILE, or train from random weights with --no-pretrained")


def _create_vit(cfg: ModelConfig, pretrained: bool, weights_file: str | None) -> nn.Module:
    import timm

    kwargs: dict[str, Any] = dict(cfg.vit_args)
    if weights_file:
        if not Path(weights_file).is_file():
            raise ModelLoadError(f"{weights_file}: {spell('backbone_weights')} file not found")
        # timm reads the original AugReg .npz with its own loader, any other file as a state dict.
        kwargs["pretrained_cfg_overlay"] = {"file": str(weights_file),
                                            "custom_load": str(weights_file).endswith(".npz")}
        pretrained = True
    try:
        vit = timm.create_model(cfg.timm_name, pretrained=pretrained, num_classes=0, **kwargs)
    except Exception as e:  # noqa: BLE001 - a download or file failure of timm
        raise _weights_error(cfg, e) from None
    if vit.patch_embed.grid_size != (cfg.grid, cfg.grid):
        raise ConfigError(f"{cfg.timm_name} gives a {vit.patch_embed.grid_size} token grid, "
                          f"MA-AGIQA needs {cfg.grid}×{cfg.grid}")
    depth = len(vit.blocks)
    if max(cfg.feature_blocks) >= depth or min(cfg.feature_blocks) < 0:
        raise ConfigError(f"feature block {max(cfg.feature_blocks)} is out of range "
                          f"(0 to {depth - 1})")
    # Blocks after the last used one, the final norm and the head are never needed.
    vit.prune_intermediate_layers(cfg.feature_blocks, prune_norm=True, prune_head=True)
    return vit


@dataclass
class ScoreMaps:
    """What :meth:`AgiqaNet.forward_maps` returns; maps are [B, grid, grid] (28×28 for
    ViT-B/8 at 224 px, row-major over the image as the ViT's patches).

    Attributes:
        score: the model's score [B], the same as ``model(pixels, semantics)``.
        gates: the expert gate weights [B, P+1], the image expert last (a plain linear gate:
            they need not be positive nor sum to 1).
        patch_score: MANIQA's per-patch quality ``f`` (≥ 0).
        patch_weight: MANIQA's per-patch weight ``w`` (in (0, 1)).
        maniqa_score: ``sum(f·w) / sum(w)`` per image, the score MANIQA alone defines from the
            two maps. MA-AGIQA never computes it: its image expert reads ``f·w`` per patch, so
            this is the backbone's own view, on no calibrated scale.
        contribution: each patch's additive share of ``score`` through the image expert, with
            the gates as computed: ``score == contribution.sum((1, 2)) + remainder``.
        remainder: the part of ``score`` no patch carries (semantic experts and biases).
    """

    score: torch.Tensor
    gates: torch.Tensor
    patch_score: torch.Tensor
    patch_weight: torch.Tensor
    maniqa_score: torch.Tensor
    contribution: torch.Tensor
    remainder: torch.Tensor


class AgiqaNet(nn.Module):
    """``model(pixels, semantics, return_gates=False)``: pixels float [B, 3, 224, 224]
    (normalised), semantics [B, P, D] → scores [B] (and gates [B, P+1], image expert last).

    ``model.forward_maps(pixels, semantics)`` gives the same score with MANIQA's patch maps and
    each patch's share of the score (:class:`ScoreMaps`).
    """

    def __init__(self, cfg: ModelConfig, pretrained: bool = False,
                 backbone_weights: str | None = None):
        super().__init__()
        self.config = cfg
        vit = _create_vit(cfg, pretrained, backbone_weights)
        self.backbone = ManiqaBackbone(vit, cfg.feature_blocks, cfg.maniqa_dim, cfg.grid,
                                       cfg.swin_heads, cfg.window_size, cfg.dim_mlp, cfg.drop,
                                       cfg.score_bias_init, cfg.image_key)
        self.head = MoEHead(cfg.num_prompts, cfg.semantic_dim, self.backbone.key_width, cfg.drop,
                            cfg.semantic_experts, cfg.image_expert, cfg.fusion)

    @staticmethod
    def _check_inputs(pixels: torch.Tensor, semantics: torch.Tensor) -> None:
        if pixels.ndim != 4 or pixels.shape[1] != 3:
            raise ValueError(f"pixels must have shape [B, 3, H, W], got {list(pixels.shape)}")
        if semantics.shape[0] != pixels.shape[0]:
            raise ValueError(f"pixels hold {pixels.shape[0]} images, semantics "
                             f"{semantics.shape[0]}")

    def forward(self, pixels: torch.Tensor, semantics: torch.Tensor, return_gates: bool = False):
        self._check_inputs(pixels, semantics)
        key = self.backbone(pixels)
        scores, gates = self.head(key, semantics)
        return (scores, gates) if return_gates else scores

    def forward_maps(self, pixels: torch.Tensor, semantics: torch.Tensor) -> ScoreMaps:
        """The score with where it comes from: MANIQA's patch maps, the gates, and each patch's
        share of the score (:class:`ScoreMaps`). Same inputs and score as :meth:`forward`."""
        self._check_inputs(pixels, semantics)
        if self.config.image_key != "maniqa":
            raise ValueError(f"a model whose image key is {self.config.image_key!r} has no "
                             "patch maps (its image expert reads no per-patch values)")
        f, w = self.backbone.forward_patches(pixels)
        scores, gates = self.head(f * w, semantics)
        contribution = self.head.patch_contributions(f * w, gates)
        g = self.config.grid
        return ScoreMaps(score=scores, gates=gates, patch_score=f.unflatten(1, (g, g)),
                         patch_weight=w.unflatten(1, (g, g)),
                         maniqa_score=(f * w).sum(1) / w.sum(1),
                         contribution=contribution.unflatten(1, (g, g)),
                         remainder=scores - contribution.sum(1))


def create_model(backbone: str = "vit_base_patch8_224", num_prompts: int = 2,
                 semantic_dim: int = 4096, pretrained: bool | None = False,
                 backbone_weights: str | None = None, drop: float | None = None,
                 semantic_experts: list[int] | None = None, image_expert: bool = True,
                 fusion: str = "moe", image_key: str = "maniqa") -> AgiqaNet:
    """A new MA-AGIQA network.

    Args:
        backbone: a backbone preset (``agiqa presets list --kind backbones``).
        num_prompts: semantic vectors per image.
        semantic_dim: width of a semantic vector.
        pretrained: start the ViT from ``pretrained_name(backbone)``; None: when it has one.
        backbone_weights: a local file of those weights (offline machines).
        drop: dropout of the MANIQA and MoE layers (None: the paper's 0.1).
        semantic_experts: the prompts (indices) whose semantic experts are used (None: all).
        image_expert: use the image expert (the MANIQA key).
        fusion: ``moe`` (the paper's gate), ``concat`` or ``mean`` (:class:`MoEHead`).
        image_key: what the image expert reads, ``maniqa`` (the paper's per-patch key) or
            ``vit-stats`` (:data:`agiqa.models.maniqa.IMAGE_KEYS`).
    """
    if image_key not in IMAGE_KEYS:
        raise ConfigError(f"image key must be one of {', '.join(IMAGE_KEYS)}, not {image_key!r}")
    pretrained = resolve_pretrained(backbone, pretrained, backbone_weights)
    cfg = ModelConfig.for_backbone(backbone, num_prompts, semantic_dim, drop,
                                   semantic_experts=semantic_experts, image_expert=image_expert,
                                   fusion=fusion, image_key=image_key)
    return AgiqaNet(cfg, pretrained=pretrained, backbone_weights=backbone_weights)


def save_model(model: AgiqaNet, out: str | os.PathLike, extra: dict[str, Any]) -> None:
    """Write ``model.safetensors`` and ``config.json`` (atomically) into ``out``."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    out = Path(out)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    weights = out / "model.safetensors"
    try:
        out.mkdir(parents=True, exist_ok=True)
        with atomic_path(weights) as tmp:
            save_file(state, str(tmp))
    except (OSError, SafetensorError) as e:  # a full disk, a read-only folder
        reason = getattr(e, "strerror", None) or str(e)
        raise CheckpointError(f"{weights}: cannot write the model ({reason})") from None
    from agiqa import __version__

    config = {"architecture": "ma-agiqa", "model": model.config.to_dict(),
              "agiqa_version": __version__, **extra}
    write_json(out / "config.json", config)


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> AgiqaNet:
    """Load a run directory or an imported official checkpoint; returns the module in eval mode."""
    from safetensors.torch import load_file

    path = Path(path)
    cfg_file, weights = path / "config.json", path / "model.safetensors"
    if not cfg_file.is_file() or not weights.is_file():
        raise CheckpointError(f"{path}: not a model directory (needs config.json and "
                              "model.safetensors)")
    try:
        config = read_json(cfg_file)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{cfg_file}: not readable JSON ({e})") from None
    if not isinstance(config, dict) or config.get("architecture") != "ma-agiqa":
        raise CheckpointError(f"{cfg_file}: not an MA-AGIQA model")
    try:
        model_cfg = ModelConfig(**config["model"])
    except (TypeError, KeyError) as e:
        raise CheckpointError(f"{cfg_file}: bad model arguments ({e})") from None
    from safetensors import SafetensorError

    from agiqa.errors import ModelLoadError
    from agiqa.fileio import check_safetensors

    model = AgiqaNet(model_cfg)
    try:
        check_safetensors(weights, weights.stat().st_size)
        state = load_file(str(weights))
    except ModelLoadError as e:
        raise CheckpointError(str(e)) from None
    except (OSError, SafetensorError) as e:
        raise CheckpointError(f"{weights}: unreadable model weights ({e})") from None
    broken = [k for k, t in state.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if broken:
        shown = ", ".join(broken[:3]) + (", ..." if len(broken) > 3 else "")
        raise CheckpointError(f"{weights}: {len(broken)} weight tensor(s) hold NaN or infinite "
                              f"values ({shown}); this model cannot score")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{weights}: weights do not fit the config ({e})") from None
    return model.to(device).eval()
