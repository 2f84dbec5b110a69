"""Import of official MA-AGIQA checkpoints (``torch.save`` of the module's state dict).

The file is read without pickle (``torch.load(weights_only=True)``); widths are inferred from
the tensor shapes, so narrower models import too; the modules the official forward never uses
are dropped and the rest is loaded strictly.
"""

from __future__ import annotations

import math
import os
import pickle
import re
from pathlib import Path
from typing import Any

import torch

from agiqa.errors import CheckpointError
from agiqa.models.agiqa_net import AgiqaNet, ModelConfig, save_model
from agiqa.options import spell

__all__ = ["UNUSED_MODULES", "import_official", "official_to_agiqa"]

UNUSED_MODULES = (
    "fc39_784", "encoder_layer", "fc_output", "fc4096_784_a.", "fc4096_784_b.", "quality",
    "fc784x3_1", "fc4096_1024_a", "fc4096_1024_b", "swintransformer1.downsample",
    "swintransformer2.downsample", "vit.head", "vit.norm", "vit.fc_norm",
)
_RENAMES = (
    ("fc784_784.", "head.image_expert."),
    ("fc4096_784_a2.", "head.semantic_experts.0."),
    ("fc4096_784_b2.", "head.semantic_experts.1."),
    ("gating.", "head.gating."),
    ("output_fc.", "head.output."),
)
_OFFICIAL_BLOCKS = [6, 7, 8, 9]


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(
            f"{path}: holds Python objects other than tensors, code that would run when the "
            "file is loaded; agiqa reads only tensors and refuses it: ask for a checkpoint of "
            "plain tensors") from None
    except Exception as e:  # noqa: BLE001 - a damaged or foreign file
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"{path}: not a loadable weights-only checkpoint ({first})") \
            from None
    for wrapper in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict) or not all(torch.is_tensor(v) for v in obj.values()):
        raise CheckpointError(f"{path}: expected a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def _infer_config(sd: dict[str, torch.Tensor], path: Path, vit_heads: int | None) -> ModelConfig:
    try:
        patch = sd["vit.patch_embed.proj.weight"]
        vit_dim, patch_size = patch.shape[0], patch.shape[-1]
        depth = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"vit\.blocks\.(\d+)\.", k)))
        mlp_ratio = sd["vit.blocks.0.mlp.fc1.weight"].shape[0] / vit_dim
        grid = math.isqrt(sd["vit.pos_embed"].shape[1] - 1)
        conv1 = sd["conv1.weight"]
        table = sd["swintransformer1.layers.0.blocks.0.attn.relative_position_bias_table"]
        dim_mlp = sd["swintransformer1.layers.0.blocks.0.mlp.fc1.weight"].shape[0]
        semantic_dim = sd["fc4096_784_a2.0.weight"].shape[1]
    except KeyError as e:
        raise CheckpointError(f"{path}: not an MA-AGIQA state dict (no {e})") from None
    if conv1.shape[1] != vit_dim * len(_OFFICIAL_BLOCKS):
        raise CheckpointError(f"{path}: conv1 takes {conv1.shape[1]} channels, expected "
                              f"{len(_OFFICIAL_BLOCKS)} ViT blocks of width {vit_dim}")
    window = (math.isqrt(table.shape[0]) + 1) // 2
    vit_args: dict[str, Any] = {}
    if vit_dim != 768 or depth != 12 or mlp_ratio != 4.0 or vit_heads:
        vit_args = {"embed_dim": vit_dim, "depth": depth, "mlp_ratio": mlp_ratio,
                    "num_heads": vit_heads or max(1, vit_dim // 64)}
    if patch_size != 8 or grid != 28:
        raise CheckpointError(f"{path}: a {grid}×{grid} grid of patch {patch_size}; MA-AGIQA "
                              "uses patch 8 at 224 px")
    return ModelConfig(
        backbone="vit_base_patch8_224" if not vit_args else "custom",
        num_prompts=2, semantic_dim=semantic_dim, vit_args=vit_args,
        feature_blocks=list(_OFFICIAL_BLOCKS), maniqa_dim=conv1.shape[0],
        swin_heads=table.shape[1], window_size=window, dim_mlp=dim_mlp, grid=grid,
    )


def official_to_agiqa(sd: dict[str, torch.Tensor], last_block: int = 9) -> dict[str, torch.Tensor]:
    """Rename official keys to agiqa's and drop the modules the official forward never uses."""
    out = {}
    for key, value in sd.items():
        if key.startswith(UNUSED_MODULES):
            continue
        m = re.match(r"vit\.blocks\.(\d+)\.", key)
        if m and int(m.group(1)) > last_block:
            continue
        for old, new in _RENAMES:
            if key.startswith(old):
                key = new + key[len(old):]
                break
        else:
            key = "backbone." + key
        out[key] = value
    return out


def _check_out(out: Path) -> None:
    """Refuse an ``out`` that holds anything but an earlier import: its ``config.json`` and
    ``model.safetensors`` would be replaced, and agiqa never replaces a file it did not write
    (a trained run's model included)."""
    from agiqa.fileio import read_json

    if not out.exists():
        return
    if not out.is_dir():
        raise CheckpointError(f"{spell('out', str(out))} is not a folder")
    names = {p.name for p in out.iterdir()}
    if not names:
        return
    try:
        config = read_json(out / "config.json")
        imported = isinstance(config, dict) and config.get("architecture") == "ma-agiqa" \
            and isinstance(config.get("source"), dict) \
            and "official_checkpoint" in config["source"]
    except (OSError, ValueError):
        imported = False
    if not imported or not names <= {"config.json", "model.safetensors"}:
        shown = ", ".join(sorted(names)[:3]) + (", ..." if len(names) > 3 else "")
        raise CheckpointError(f"{spell('out', str(out))} is not empty and holds no earlier import "
                              f"(it holds {shown}); agiqa never replaces files it did not "
                              "write: choose a new or empty folder")


def import_official(ckpt: str | os.PathLike, out: str | os.PathLike,
                    semantics: dict[str, Any] | None = None, vit_heads: int | None = None
                    ) -> AgiqaNet:
    """Turn an official checkpoint into an agiqa model directory.

    Args:
        ckpt: the official ``.pt`` / ``.pth`` file.
        out: the model directory to write.
        semantics: the semantic description the checkpoint's vectors come from, if known:
            ``semantics`` (a cache's ``manifest["semantics"]``), ``fingerprint``,
            ``prompt_names`` and optionally ``dim``, checked against the checkpoint's width.
        vit_heads: the ViT's attention heads, when the ViT is not the standard ViT-B/8
            (shapes do not tell it; default width // 64).
    """
    path = Path(ckpt)
    _check_out(Path(out))
    sd = _read_state_dict(path)
    cfg = _infer_config(sd, path, vit_heads)
    semantics = dict(semantics or {})
    dim = semantics.pop("dim", None)
    if dim is not None and int(dim) != cfg.semantic_dim:
        raise CheckpointError(
            f"{path}: the checkpoint takes semantic vectors of width {cfg.semantic_dim}, but "
            f"{semantics.get('semantics', {}).get('model', 'the MLLM')} gives {dim}")
    model = AgiqaNet(cfg)
    try:
        model.load_state_dict(official_to_agiqa(sd, max(cfg.feature_blocks)), strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: does not load into MA-AGIQA ({e})") from None
    extra = {"source": {"official_checkpoint": str(path.resolve())}, "score_norm": None}
    extra.update(semantics)
    save_model(model, out, extra)
    return model.eval()
