"""The official MA-AGIQA module re-written in the official code's own structure (forward hooks on
every ViT block, MANIQA's Swin, the official module names, the unused modules included): the
model of the official training loop that ``official_stage_two.py`` times. Widths are arguments,
so the loop also runs at the ``tiny`` backbone's widths.

It is not part of the package and not what the tests compare against: they compare agiqa with
the outputs of the real official code (``tests/fixtures/ma_agiqa``).
"""

import timm
import torch
import torch.nn as nn


class SaveOutput:
    def __init__(self):
        self.outputs = []

    def __call__(self, module, module_in, module_out):
        self.outputs.append(module_out)

    def clear(self):
        self.outputs = []


class TABlock(nn.Module):
    def __init__(self, dim, drop=0.1):
        super().__init__()
        self.c_q = nn.Linear(dim, dim)
        self.c_k = nn.Linear(dim, dim)
        self.c_v = nn.Linear(dim, dim)
        self.norm_fact = dim ** -0.5
        self.softmax = nn.Softmax(dim=-1)
        self.proj_drop = nn.Dropout(drop)

    def forward(self, x):
        _x = x
        B, C, N = x.shape
        q = self.c_q(x)
        k = self.c_k(x)
        v = self.c_v(x)
        attn = q @ k.transpose(-2, -1) * self.norm_fact
        attn = self.softmax(attn)
        x = (attn @ v).transpose(1, 2).reshape(B, C, N)
        x = self.proj_drop(x)
        return x + _x


def window_partition(x, window_size):
    B, H, W, C = x.shape
    x = x.view(B, H // window_size, window_size, W // window_size, window_size, C)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, window_size, window_size, C)


def window_reverse(windows, window_size, H, W):
    B = int(windows.shape[0] / (H * W / window_size / window_size))
    x = windows.view(B, H // window_size, W // window_size, window_size, window_size, -1)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(B, H, W, -1)


class Mlp(nn.Module):
    def __init__(self, in_features, hidden_features):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, in_features)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class WindowAttention(nn.Module):
    def __init__(self, dim, window_size, num_heads):
        super().__init__()
        self.window_size = (window_size, window_size)
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * window_size - 1) * (2 * window_size - 1), num_heads))
        coords = torch.stack(torch.meshgrid([torch.arange(window_size), torch.arange(window_size)],
                                            indexing="ij"))
        coords_flatten = torch.flatten(coords, 1)
        rel = coords_flatten[:, :, None] - coords_flatten[:, None, :]
        rel = rel.permute(1, 2, 0).contiguous()
        rel[:, :, 0] += window_size - 1
        rel[:, :, 1] += window_size - 1
        rel[:, :, 0] *= 2 * window_size - 1
        self.register_buffer("relative_position_index", rel.sum(-1))
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        self.softmax = nn.Softmax(dim=-1)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def forward(self, x, mask=None):
        B_, N, C = x.shape
        qkv = self.qkv(x).reshape(B_, N, 3, self.num_heads, C // self.num_heads)
        qkv = qkv.permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        q = q * self.scale
        attn = q @ k.transpose(-2, -1)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(
            N, N, -1).permute(2, 0, 1).contiguous()
        attn = attn + bias.unsqueeze(0)
        if mask is not None:
            nW = mask.shape[0]
            attn = attn.view(B_ // nW, nW, self.num_heads, N, N) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, self.num_heads, N, N)
        attn = self.softmax(attn)
        x = (attn @ v).transpose(1, 2).reshape(B_, N, C)
        return self.proj(x)


class SwinBlock(nn.Module):
    def __init__(self, dim, input_resolution, num_heads, window_size, shift_size, dim_mlp):
        super().__init__()
        self.input_resolution = input_resolution
        self.window_size = window_size
        self.shift_size = shift_size
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window_size, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, dim_mlp)
        if self.shift_size > 0:
            H, W = input_resolution
            img_mask = torch.zeros((1, H, W, 1))
            slices = (slice(0, -window_size), slice(-window_size, -shift_size),
                      slice(-shift_size, None))
            cnt = 0
            for h in slices:
                for w in slices:
                    img_mask[:, h, w, :] = cnt
                    cnt += 1
            mask_windows = window_partition(img_mask, window_size).view(-1, window_size ** 2)
            attn_mask = mask_windows.unsqueeze(1) - mask_windows.unsqueeze(2)
            attn_mask = attn_mask.masked_fill(attn_mask != 0, (-100.0)).masked_fill(
                attn_mask == 0, 0.0)
        else:
            attn_mask = None
        self.register_buffer("attn_mask", attn_mask)

    def forward(self, x):
        H, W = self.input_resolution
        B, L, C = x.shape
        shortcut = x
        x = self.norm1(x).view(B, H, W, C)
        if self.shift_size > 0:
            x = torch.roll(x, shifts=(-self.shift_size, -self.shift_size), dims=(1, 2))
        xw = window_partition(x, self.window_size).view(-1, self.window_size ** 2, C)
        aw = self.attn(xw, mask=self.attn_mask).view(-1, self.window_size, self.window_size, C)
        x = window_reverse(aw, self.window_size, H, W)
        if self.shift_size > 0:
            x = torch.roll(x, shifts=(self.shift_size, self.shift_size), dims=(1, 2))
        x = shortcut + x.view(B, H * W, C)
        return x + self.mlp(self.norm2(x))


class BasicLayer(nn.Module):
    def __init__(self, dim, input_resolution, depth, num_heads, window_size, dim_mlp):
        super().__init__()
        self.input_resolution = input_resolution
        self.blocks = nn.ModuleList([
            SwinBlock(dim, input_resolution, num_heads, window_size,
                      0 if i % 2 == 0 else window_size // 2, dim_mlp) for i in range(depth)])
        self.conv = nn.Conv2d(dim, dim, 3, 1, 1)

    def forward(self, x):
        for blk in self.blocks:
            x = blk(x)
        H, W = self.input_resolution
        B, L, C = x.shape
        x = x.permute(0, 2, 1).reshape(B, C, H, W)  # rearrange 'b (h w) c -> b c h w'
        x = torch.relu(self.conv(x))
        return x.reshape(B, C, H * W).permute(0, 2, 1)  # 'b c h w -> b (h w) c'


class SwinTransformer(nn.Module):
    def __init__(self, patches_resolution, depths, num_heads, embed_dim, window_size, dim_mlp,
                 scale=0.8):
        super().__init__()
        self.scale = scale
        self.dropout = nn.Dropout(p=0.1)
        self.downsample = nn.Conv2d(embed_dim, embed_dim, kernel_size=3, stride=2, padding=1)
        self.layers = nn.ModuleList([
            BasicLayer(embed_dim, patches_resolution, depths[i], num_heads[i], window_size, dim_mlp)
            for i in range(len(depths))])

    def forward(self, x):
        x = self.dropout(x)
        B, C, H, W = x.shape
        x = x.reshape(B, C, H * W).permute(0, 2, 1)
        for layer in self.layers:
            _x = x
            x = layer(x)
            x = self.scale * x + _x
        return x.permute(0, 2, 1).reshape(B, C, H, W)


class OfficialMAAGIQA(nn.Module):
    """The official module's layout: names, unused modules and forward order."""

    def __init__(self, embed_dim=768, vit_dim=768, vit_heads=12, dim_mlp=768, semantic_dim=4096,
                 num_heads=(4, 4), window_size=4, depths=(2, 2), img_size=224, patch_size=8,
                 drop=0.1, vit_depth=12, vit_mlp_ratio=4.0, feature_blocks=(6, 7, 8, 9)):
        super().__init__()
        self.input_size = img_size // patch_size
        self.feature_blocks = tuple(feature_blocks)
        n = self.input_size ** 2
        self.vit = timm.create_model("vit_base_patch8_224", pretrained=False, embed_dim=vit_dim,
                                     num_heads=vit_heads, depth=vit_depth,
                                     mlp_ratio=vit_mlp_ratio)
        self.save_output = SaveOutput()
        for layer in self.vit.modules():
            if isinstance(layer, timm.models.vision_transformer.Block):
                layer.register_forward_hook(self.save_output)
        self.tablock1 = nn.ModuleList([TABlock(n) for _ in range(2)])
        self.conv1 = nn.Conv2d(vit_dim * len(self.feature_blocks), embed_dim, 1, 1, 0)
        self.swintransformer1 = SwinTransformer((self.input_size,) * 2, depths, num_heads,
                                                embed_dim, window_size, dim_mlp)
        self.tablock2 = nn.ModuleList([TABlock(n) for _ in range(2)])
        self.conv2 = nn.Conv2d(embed_dim, embed_dim // 2, 1, 1, 0)
        self.swintransformer2 = SwinTransformer((self.input_size,) * 2, depths, num_heads,
                                                embed_dim // 2, window_size, dim_mlp)
        d2 = embed_dim // 2
        self.fc_score = nn.Sequential(nn.Linear(d2, d2), nn.ReLU(), nn.Dropout(drop),
                                      nn.Linear(d2, 1), nn.ReLU())
        self.fc_weight = nn.Sequential(nn.Linear(d2, d2), nn.ReLU(), nn.Dropout(drop),
                                       nn.Linear(d2, 1), nn.Sigmoid())
        # Modules of the official class that its forward never uses.
        self.fc39_784 = nn.Sequential(nn.Linear(39, 392), nn.ReLU(), nn.Dropout(drop),
                                      nn.Linear(392, n))
        self.encoder_layer = nn.TransformerEncoderLayer(d_model=n, nhead=8, batch_first=True)
        self.fc_output = nn.Sequential(nn.Linear(n, n // 2), nn.ReLU(), nn.Dropout(drop),
                                       nn.Linear(n // 2, 1))
        self.fc4096_784_a = nn.Linear(semantic_dim, n)
        self.fc4096_784_b = nn.Linear(semantic_dim, n)
        self.quality = nn.Sequential(nn.Linear(3 * n, 128), nn.Linear(128, 1))
        self.fc4096_784_a2 = nn.Sequential(nn.Linear(semantic_dim, n), nn.ReLU(), nn.Dropout(drop))
        self.fc4096_784_b2 = nn.Sequential(nn.Linear(semantic_dim, n), nn.ReLU(), nn.Dropout(drop))
        self.fc784x3_1 = nn.Sequential(nn.Linear(3 * n, 128), nn.Linear(128, 1))
        self.fc784_784 = nn.Linear(n, n)
        self.fc4096_1024_a = nn.Linear(semantic_dim, 1024)
        self.fc4096_1024_b = nn.Linear(semantic_dim, 1024)
        self.gating = nn.Linear(3 * n, 3)
        self.output_fc = nn.Linear(n, 1)

    def extract_feature(self, save_output):
        # The official code: x6..x9 = save_output.outputs[6..9][:, 1:], concatenated.
        return torch.cat([save_output.outputs[i][:, 1:] for i in self.feature_blocks], dim=2)

    def forward(self, x, tensor_a, tensor_b):
        self.vit(x)
        x = self.extract_feature(self.save_output)
        self.save_output.outputs.clear()
        B, L, C = x.shape
        h = self.input_size
        x = x.permute(0, 2, 1)  # 'b (h w) c -> b c (h w)'
        for tab in self.tablock1:
            x = tab(x)
        x = x.reshape(B, -1, h, h)
        x = self.conv1(x)
        x = self.swintransformer1(x)
        x = x.reshape(B, x.shape[1], h * h)
        for tab in self.tablock2:
            x = tab(x)
        x = x.reshape(B, -1, h, h)
        x = self.conv2(x)
        x = self.swintransformer2(x)
        x = x.reshape(B, x.shape[1], h * h).permute(0, 2, 1)  # 'b c h w -> b (h w) c'
        f = self.fc_score(x)
        w = self.fc_weight(x)
        key = (f * w).squeeze(-1)
        e_img = self.fc784_784(key)
        e_a = self.fc4096_784_a2(tensor_a)
        e_b = self.fc4096_784_b2(tensor_b)
        gate = self.gating(torch.cat([e_a, e_b, e_img], dim=1))
        mixed = gate[:, 0:1] * e_a + gate[:, 1:2] * e_b + gate[:, 2:3] * e_img
        return self.output_fc(mixed).squeeze(-1)
