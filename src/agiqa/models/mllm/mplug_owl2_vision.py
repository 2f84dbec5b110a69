"""mPLUG-Owl2's visual side: the ViT-L/14 encoder at 448 px and the visual abstractor.

Module and parameter names follow the official `visual_encoder.py` (X-PLUG/mPLUG-Owl,
mPLUG-Owl2/mplug_owl2/model/visual_encoder.py), so checkpoints load key for key.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN

__all__ = ["AbstractorSettings", "VisionEmbeddings", "VisionModel", "VisionSettings",
           "VisualAbstractor", "AbstractorMultiHeadAttention"]


@dataclass(frozen=True)
class VisionSettings:
    """`visual_config["visual_model"]`, with the official defaults (ViT-L/14 at 448 px)."""

    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    image_size: int = 448
    patch_size: int = 14
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-6
    use_cls_token: bool = True
    use_post_layernorm: bool = True


@dataclass(frozen=True)
class AbstractorSettings:
    """`visual_config["visual_abstractor"]`, with the official defaults."""

    hidden_size: int = 1024
    encoder_hidden_size: int = 1024
    num_hidden_layers: int = 6
    num_attention_heads: int = 16
    intermediate_size: int = 2816
    num_learnable_queries: int = 64
    layer_norm_eps: float = 1e-6
    grid_size: int | None = None
    use_cls_token: bool = True


def sincos_1d(dim: int, positions: np.ndarray) -> np.ndarray:
    """MAE 1-D sin-cos embedding, float32 as the official numpy code computes it."""
    omega = np.arange(dim // 2, dtype=np.float32)
    omega /= dim / 2.0
    omega = 1.0 / 10000**omega
    out = np.einsum("m,d->md", positions.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_2d(dim: int, grid_size: int, cls_token: bool) -> np.ndarray:
    """MAE 2-D sin-cos embedding over a square grid, with a zero row for the class token."""
    axis = np.arange(grid_size, dtype=np.float32)
    grid = np.meshgrid(axis, axis)  # w first, as the official code
    grid = np.stack(grid, axis=0).reshape([2, 1, grid_size, grid_size])
    emb = np.concatenate([sincos_1d(dim // 2, grid[0]), sincos_1d(dim // 2, grid[1])], axis=1)
    if cls_token:
        emb = np.concatenate([np.zeros([1, dim]), emb], axis=0)
    return emb


class VisionEmbeddings(nn.Module):
    """Patch embedding, class token, learned positions, pre-LayerNorm."""

    def __init__(self, cfg: VisionSettings):
        super().__init__()
        if not cfg.use_cls_token:
            raise ValueError("mPLUG-Owl2 vision encoders without a class token are not supported")
        num_patches = (cfg.image_size // cfg.patch_size) ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.hidden_size))
        self.patch_embed = nn.Conv2d(3, cfg.hidden_size, cfg.patch_size, cfg.patch_size, bias=False)
        self.position_embedding = nn.Parameter(torch.zeros(1, num_patches + 1, cfg.hidden_size))
        self.pre_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(pixel_values).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], 1, -1).to(x.dtype), x], dim=1)
        x = x + self.position_embedding[:, : x.shape[1]].to(x.dtype)
        return self.pre_layernorm(x)


class VisionAttention(nn.Module):
    """Self-attention with a fused projection whose output interleaves q, k, v per head."""

    def __init__(self, cfg: VisionSettings):
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.query_key_value = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.query_key_value(x).reshape(b, n, self.num_heads, 3, d // self.num_heads)
        q, k, v = qkv.permute(3, 0, 2, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.dense(out.transpose(1, 2).reshape(b, n, d))


class VisionMLP(nn.Module):
    """fc1, activation (QuickGELU), fc2."""

    def __init__(self, cfg: VisionSettings):
        super().__init__()
        self.activation_fn = ACT2FN[cfg.hidden_act]
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation_fn(self.fc1(x)))


class VisionLayer(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, cfg: VisionSettings):
        super().__init__()
        self.self_attn = VisionAttention(cfg)
        self.input_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = VisionMLP(cfg)
        self.post_attention_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


class VisionEncoder(nn.Module):
    """The stack of vision blocks (key prefix `encoder.layers`)."""

    def __init__(self, cfg: VisionSettings):
        super().__init__()
        self.layers = nn.ModuleList(VisionLayer(cfg) for _ in range(cfg.num_hidden_layers))


class VisionModel(nn.Module):
    """ViT whose post-LayerNorm applies to every token, class token included."""

    def __init__(self, cfg: VisionSettings):
        super().__init__()
        self.embeddings = VisionEmbeddings(cfg)
        self.encoder = VisionEncoder(cfg)
        self.post_layernorm = None
        if cfg.use_post_layernorm:
            self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.embeddings(pixel_values)
        for layer in self.encoder.layers:
            x = layer(x)
        return self.post_layernorm(x) if self.post_layernorm is not None else x


class AbstractorMultiHeadAttention(nn.Module):
    """Queries attend to [queries; image tokens]; fixed sin-cos positions on queries and keys."""

    def __init__(self, cfg: AbstractorSettings):
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.query = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = nn.Linear(cfg.encoder_hidden_size, cfg.hidden_size)
        self.value = nn.Linear(cfg.encoder_hidden_size, cfg.hidden_size)
        self.cfg = cfg
        self.register_buffer("q_pos_embed", torch.empty(cfg.num_learnable_queries, cfg.hidden_size))
        grid = (cfg.grid_size or 32) ** 2 + int(cfg.use_cls_token)
        self.register_buffer("k_pos_embed", torch.empty(grid, cfg.hidden_size))
        self.reset_positions()

    def reset_positions(self) -> None:
        """Fill the position buffers as the official code computes them."""
        cfg = self.cfg
        queries = np.arange(cfg.num_learnable_queries, dtype=np.float32)
        init.copy_(self.q_pos_embed, torch.from_numpy(sincos_1d(cfg.hidden_size, queries)).float())
        keys = sincos_2d(cfg.hidden_size, cfg.grid_size or 32, cls_token=cfg.use_cls_token)
        init.copy_(self.k_pos_embed, torch.from_numpy(keys).float())

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)

    def forward(self, queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        q_pos = self.q_pos_embed.to(queries.dtype)
        k_pos = torch.cat([q_pos, self.k_pos_embed.to(queries.dtype)], dim=0)
        q = self._heads(self.query(queries + q_pos))
        k = self._heads(self.key(keys + k_pos))
        v = self._heads(self.value(keys))
        out = F.scaled_dot_product_attention(q, k, v)
        return out.transpose(1, 2).flatten(2)


class AbstractorMLP(nn.Module):
    """SwiGLU with a LayerNorm before the down projection."""

    def __init__(self, cfg: AbstractorSettings):
        super().__init__()
        self.act = nn.SiLU()
        self.w1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.w2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.w3 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.ffn_ln = nn.LayerNorm(cfg.intermediate_size, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(self.ffn_ln(self.act(self.w1(x)) * self.w3(x)))


class AbstractorCrossOutput(nn.Module):
    """Output projection and MLP, each with a residual."""

    def __init__(self, cfg: AbstractorSettings):
        super().__init__()
        self.out_proj = nn.Linear(cfg.encoder_hidden_size, cfg.encoder_hidden_size)
        self.norm2 = nn.LayerNorm(cfg.encoder_hidden_size)
        self.mlp = AbstractorMLP(cfg)

    def forward(self, context: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        x = residual + self.out_proj(context)
        return x + self.mlp(self.norm2(x))


class AbstractorAttention(nn.Module):
    """One abstractor block (key prefix `crossattention`); its LayerNorms use eps 1e-5."""

    def __init__(self, cfg: AbstractorSettings):
        super().__init__()
        self.attention = AbstractorMultiHeadAttention(cfg)
        self.output = AbstractorCrossOutput(cfg)
        self.norm1 = nn.LayerNorm(cfg.encoder_hidden_size)
        self.normk = nn.LayerNorm(cfg.encoder_hidden_size)

    def forward(self, queries: torch.Tensor, image_states: torch.Tensor) -> torch.Tensor:
        # As in the official code, the residual starts from the normed queries.
        queries = self.norm1(queries)
        keys = torch.cat([queries, self.normk(image_states)], dim=1)
        return self.output(self.attention(queries, keys), queries)


class AbstractorLayer(nn.Module):
    """Holds one block under the official name."""

    def __init__(self, cfg: AbstractorSettings):
        super().__init__()
        self.crossattention = AbstractorAttention(cfg)


class AbstractorEncoder(nn.Module):
    """The stack of abstractor blocks (key prefix `encoder.layers`)."""

    def __init__(self, cfg: AbstractorSettings):
        super().__init__()
        self.layers = nn.ModuleList(AbstractorLayer(cfg) for _ in range(cfg.num_hidden_layers))


class VisualAbstractor(nn.Module):
    """Learnable queries read the image tokens; projected to the LLM width, then `vit_eos`."""

    def __init__(self, cfg: AbstractorSettings, language_hidden_size: int):
        super().__init__()
        self.encoder = AbstractorEncoder(cfg)
        self.visual_fc = nn.Linear(cfg.hidden_size, language_hidden_size)
        self.query_embeds = nn.Parameter(torch.zeros(1, cfg.num_learnable_queries, cfg.hidden_size))
        self.vit_eos = nn.Parameter(torch.zeros(1, 1, language_hidden_size))

    def forward(self, image_states: torch.Tensor) -> torch.Tensor:
        x = self.query_embeds.expand(image_states.shape[0], -1, -1).to(image_states.dtype)
        for layer in self.encoder.layers:
            x = layer.crossattention(x, image_states)
        x = self.visual_fc(x)
        return torch.cat([x, self.vit_eos.expand(x.shape[0], -1, -1).to(x.dtype)], dim=1)
