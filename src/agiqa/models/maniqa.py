"""MANIQA backbone as used by MA-AGIQA.

MANIQA: Multi-dimension Attention Network for No-Reference Image Quality Assessment
(Yang et al., CVPRW 2022), https://github.com/IIGROUP/MANIQA; used by MA-AGIQA
(Wang et al., ACM MM 2024), https://github.com/wangpuyi/MA-AGIQA.

Module names follow the official code so official checkpoints load with their own keys.
Two quirks are kept on purpose, because official weights depend on them: the transposed-attention
block reshapes (not transposes) its output back, and each Swin layer's output is added as
``0.8·layer(x) + x``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from torch import nn

from agiqa.models.noise import Dropout, DropPath

__all__ = ["IMAGE_KEYS", "ManiqaBackbone", "SwinStage", "TABlock"]

# What the image expert reads. ``maniqa`` (the paper): MANIQA's per-patch ``f·w``, one value per
# patch. ``vit-stats`` (not in the paper): the mean and the standard deviation over the patches
# of each channel of the ViT blocks' outputs, 2·C·k values; the MANIQA layers are then unused.
IMAGE_KEYS = ("maniqa", "vit-stats")


class TABlock(nn.Module):
    """Transposed attention block: attention across channels of a (B, C, N) tensor."""

    def __init__(self, dim: int, drop: float = 0.1):
        super().__init__()
        self.c_q = nn.Linear(dim, dim)
        self.c_k = nn.Linear(dim, dim)
        self.c_v = nn.Linear(dim, dim)
        self.norm_fact = dim**-0.5
        self.proj_drop = Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, n = x.shape
        q, k, v = self.c_q(x), self.c_k(x), self.c_v(x)
        attn = torch.softmax(q @ k.transpose(-2, -1) * self.norm_fact, dim=-1)
        # Official quirk: a reshape of the transposed result, not a transpose back.
        y = (attn @ v).transpose(1, 2).reshape(b, c, n)
        return x + self.proj_drop(y)


def _window_partition(x: torch.Tensor, ws: int) -> torch.Tensor:
    b, h, w, c = x.shape
    x = x.view(b, h // ws, ws, w // ws, ws, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, ws * ws, c)


def _window_reverse(windows: torch.Tensor, ws: int, h: int, w: int) -> torch.Tensor:
    b = windows.shape[0] // ((h // ws) * (w // ws))
    x = windows.view(b, h // ws, w // ws, ws, ws, -1)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(b, h, w, -1)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class WindowAttention(nn.Module):
    def __init__(self, dim: int, window_size: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        ws = window_size
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * ws - 1) ** 2, num_heads))
        coords = torch.stack(torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing="ij"))
        flat = coords.flatten(1)
        rel = (flat[:, :, None] - flat[:, None, :]).permute(1, 2, 0).contiguous()
        rel[:, :, 0] += ws - 1
        rel[:, :, 1] += ws - 1
        rel[:, :, 0] *= 2 * ws - 1
        self.register_buffer("relative_position_index", rel.sum(-1))
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        trunc_normal_(self.relative_position_bias_table, std=0.02)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        bw, n, c = x.shape
        qkv = self.qkv(x).reshape(bw, n, 3, self.num_heads, c // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        bias = bias.view(n, n, -1).permute(2, 0, 1)
        attn = (q * self.scale) @ k.transpose(-2, -1) + bias.unsqueeze(0)
        if mask is not None:
            nw = mask.shape[0]
            attn = attn.view(bw // nw, nw, self.num_heads, n, n) + mask[None, :, None]
            attn = attn.view(-1, self.num_heads, n, n)
        attn = torch.softmax(attn, dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(bw, n, c))


class SwinBlock(nn.Module):
    def __init__(self, dim: int, resolution: int, num_heads: int, window_size: int,
                 shift_size: int, dim_mlp: int, drop_path: float):
        super().__init__()
        self.resolution, self.window_size, self.shift_size = resolution, window_size, shift_size
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window_size, num_heads)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, dim_mlp)
        mask = self._shift_mask() if shift_size > 0 else None
        self.register_buffer("attn_mask", mask)

    def _shift_mask(self) -> torch.Tensor:
        r, ws, s = self.resolution, self.window_size, self.shift_size
        img = torch.zeros(1, r, r, 1)
        cnt = 0
        for hs in (slice(0, -ws), slice(-ws, -s), slice(-s, None)):
            for wsl in (slice(0, -ws), slice(-ws, -s), slice(-s, None)):
                img[:, hs, wsl, :] = cnt
                cnt += 1
        win = _window_partition(img, ws).squeeze(-1)
        mask = win.unsqueeze(1) - win.unsqueeze(2)
        return mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, length, c = x.shape
        r, ws, s = self.resolution, self.window_size, self.shift_size
        shortcut = x
        x = self.norm1(x).view(b, r, r, c)
        if s:
            x = torch.roll(x, shifts=(-s, -s), dims=(1, 2))
        x = _window_reverse(self.attn(_window_partition(x, ws), self.attn_mask), ws, r, r)
        if s:
            x = torch.roll(x, shifts=(s, s), dims=(1, 2))
        x = shortcut + self.drop_path(x.reshape(b, length, c))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class SwinLayer(nn.Module):
    def __init__(self, dim, resolution, depth, num_heads, window_size, dim_mlp, drop_paths):
        super().__init__()
        self.resolution = resolution
        self.blocks = nn.ModuleList(
            SwinBlock(dim, resolution, num_heads, window_size,
                      0 if i % 2 == 0 else window_size // 2, dim_mlp, drop_paths[i])
            for i in range(depth)
        )
        self.conv = nn.Conv2d(dim, dim, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            x = blk(x)
        b, n, c = x.shape
        x = x.transpose(1, 2).reshape(b, c, self.resolution, self.resolution)
        return F.relu(self.conv(x)).flatten(2).transpose(1, 2)


class SwinStage(nn.Module):
    """MANIQA's ``SwinTransformer``: input dropout, then layers added as ``scale·layer(x) + x``."""

    def __init__(self, dim: int, resolution: int = 28, depths=(2, 2), num_heads=(4, 4),
                 window_size: int = 4, dim_mlp: int = 768, drop_rate: float = 0.1,
                 drop_path_rate: float = 0.1, scale: float = 0.8):
        super().__init__()
        self.scale = scale
        self.resolution = resolution
        self.dropout = Dropout(drop_rate)
        dpr = [x.item() for x in torch.linspace(0, drop_path_rate, sum(depths))]
        self.layers = nn.ModuleList()
        for i, depth in enumerate(depths):
            start = sum(depths[:i])
            self.layers.append(SwinLayer(dim, resolution, depth, num_heads[i], window_size,
                                         dim_mlp, dpr[start : start + depth]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        x = self.dropout(x).flatten(2).transpose(1, 2)
        for layer in self.layers:
            x = self.scale * layer(x) + x
        return x.transpose(1, 2).reshape(b, c, h, w)


class ManiqaBackbone(nn.Module):
    """ViT features → TAB ×2 → conv → Swin → TAB ×2 → conv → Swin → patch heads → key [B, N].

    The ViT (a timm ``VisionTransformer``) runs only up to the last block whose output is used;
    later blocks and the classification head are pruned. ``drop`` is the dropout and the
    stochastic-depth rate alike (both 0.1 in the official code).
    """

    def __init__(self, vit: nn.Module, feature_blocks=(6, 7, 8, 9), embed_dim: int = 768,
                 grid: int = 28, swin_heads: int = 4, window_size: int = 4,
                 dim_mlp: int | None = None, drop: float = 0.1,
                 score_bias_init: float | None = None, key: str = "maniqa"):
        super().__init__()
        if key not in IMAGE_KEYS:
            raise ValueError(f"image key must be one of {', '.join(IMAGE_KEYS)}, not {key!r}")
        self.key = key
        self.vit = vit
        self.feature_blocks = tuple(int(i) for i in feature_blocks)
        self.grid = grid
        n = grid * grid
        dim1, dim2 = embed_dim, embed_dim // 2
        dim_mlp = dim_mlp or embed_dim
        vit_width = vit.embed_dim
        self.tablock1 = nn.ModuleList(TABlock(n, drop) for _ in range(2))
        self.conv1 = nn.Conv2d(vit_width * len(self.feature_blocks), dim1, 1, 1, 0)
        self.swintransformer1 = SwinStage(dim1, grid, (2, 2), (swin_heads,) * 2, window_size,
                                          dim_mlp, drop, drop)
        self.tablock2 = nn.ModuleList(TABlock(n, drop) for _ in range(2))
        self.conv2 = nn.Conv2d(dim1, dim2, 1, 1, 0)
        self.swintransformer2 = SwinStage(dim2, grid, (2, 2), (swin_heads,) * 2, window_size,
                                          dim_mlp, drop, drop)
        self.fc_score = nn.Sequential(nn.Linear(dim2, dim2), nn.ReLU(), Dropout(drop),
                                      nn.Linear(dim2, 1), nn.ReLU())
        self.fc_weight = nn.Sequential(nn.Linear(dim2, dim2), nn.ReLU(), Dropout(drop),
                                       nn.Linear(dim2, 1), nn.Sigmoid())
        if score_bias_init is not None:
            # The patch score ends in a ReLU: a narrow head can start with it dead on every
            # patch (no gradient ever reaches the backbone). A positive bias starts it alive.
            nn.init.constant_(self.fc_score[3].bias, score_bias_init)
        if key == "vit-stats":
            # The MANIQA layers are unused: frozen, so that no optimiser nor DistributedDataParallel
            # (under torchrun) waits for a gradient they never get. Their weights stay in the
            # state dict, as a model of the paper's key has them.
            for name, module in self.named_children():
                if name != "vit":
                    module.requires_grad_(False)

    @property
    def num_tokens(self) -> int:
        return self.grid * self.grid

    @property
    def key_width(self) -> int:
        """Values per image of the key :meth:`forward` returns."""
        if self.key == "vit-stats":
            return 2 * self.vit.embed_dim * len(self.feature_blocks)
        return self.num_tokens

    def forward_vit(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenated ViT block outputs without the class token → (B, C·k, N)."""
        feats = self.vit.forward_intermediates(
            x, indices=list(self.feature_blocks), norm=False, output_fmt="NLC",
            intermediates_only=True,
        )
        return torch.cat(feats, dim=2).transpose(1, 2)

    def forward_patches(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The two patch heads: quality ``f`` [B, N] (≥ 0) and weight ``w`` [B, N] (in (0, 1)).

        MANIQA's own image score is ``sum(f·w) / sum(w)``; MA-AGIQA instead passes the
        per-patch product ``f·w`` (:meth:`forward`) to its image expert.
        """
        g = self.grid
        x = self.forward_vit(x)
        for tab in self.tablock1:
            x = tab(x)
        x = self.swintransformer1(self.conv1(x.unflatten(2, (g, g))))
        x = x.flatten(2)
        for tab in self.tablock2:
            x = tab(x)
        x = self.swintransformer2(self.conv2(x.unflatten(2, (g, g))))
        x = x.flatten(2).transpose(1, 2)  # (B, N, dim2)
        return self.fc_score(x).squeeze(-1), self.fc_weight(x).squeeze(-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The key [B, N]: patch quality times patch weight, one value per patch; with
        ``key="vit-stats"`` the ViT features' mean and std over the patches [B, 2·C·k]."""
        if self.key == "vit-stats":
            feats = self.forward_vit(x)  # (B, C·k, N)
            return torch.cat([feats.mean(2), feats.std(2)], dim=1)
        f, w = self.forward_patches(x)
        return f * w
