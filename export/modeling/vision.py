"""Vision tower (open_clip ``VisionTransformer`` parameter names) and OpenFlamingo's Perceiver resampler."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from export.modeling.config import PerceiverConfig, VisionConfig


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class _SelfAttention(nn.Module):
    """``nn.MultiheadAttention``'s parameters (in_proj_weight/bias, out_proj) with an export-friendly forward."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape  # (N, tokens, width)
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        q, k, v = qkv.view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)  # each (N, h, tokens, hd)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, d))


class _MLP(nn.Module):
    def __init__(self, width: int, hidden: int, quick_gelu: bool) -> None:
        super().__init__()
        self.c_fc = nn.Linear(width, hidden)
        self.gelu: nn.Module = QuickGELU() if quick_gelu else nn.GELU()
        self.c_proj = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.gelu(self.c_fc(x)))


class _ResidualBlock(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.width)
        self.attn = _SelfAttention(cfg.width, cfg.heads)
        self.ln_2 = nn.LayerNorm(cfg.width)
        self.mlp = _MLP(cfg.width, int(cfg.width * cfg.mlp_ratio), cfg.quick_gelu)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class _Transformer(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.resblocks = nn.ModuleList([_ResidualBlock(cfg) for _ in range(cfg.layers)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x)
        return x


class VisionTower(nn.Module):
    """pixels (N, 3, S, S) -> patch tokens (N, grid*grid, width); the CLS token is dropped as in OpenFlamingo."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        scale = cfg.width**-0.5
        self.conv1 = nn.Conv2d(3, cfg.width, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(cfg.width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(cfg.grid * cfg.grid + 1, cfg.width))
        self.ln_pre = nn.LayerNorm(cfg.width)
        self.transformer = _Transformer(cfg)
        self.ln_post = nn.LayerNorm(cfg.width)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.conv1(pixels)  # (N, width, grid, grid)
        x = x.flatten(2).transpose(1, 2)  # (N, grid*grid, width)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding
        x = self.transformer(self.ln_pre(x))
        if self.cfg.ln_post_on_tokens:
            x = self.ln_post(x)
        return x[:, 1:]


def feed_forward(dim: int, mult: int) -> nn.Sequential:
    """OpenFlamingo's FeedForward: LN, Linear (no bias), GELU, Linear (no bias); indices 0, 1, 3 hold weights."""
    inner = dim * mult
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, inner, bias=False), nn.GELU(), nn.Linear(inner, dim, bias=False))


class PerceiverAttention(nn.Module):
    def __init__(self, dim: int, dim_head: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.scale = dim_head**-0.5
        inner = dim_head * heads
        self.norm_media = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        # x: (N, v, D) media tokens; latents: (N, n, D); keys/values = concat(media, latents)
        x = self.norm_media(x)
        latents = self.norm_latents(latents)
        n, h = latents.shape[1], self.heads
        q = self.to_q(latents)
        k, v = self.to_kv(torch.cat([x, latents], dim=1)).chunk(2, dim=-1)
        q = q.view(q.shape[0], n, h, -1).transpose(1, 2) * self.scale  # (N, h, n, dh)
        k = k.view(k.shape[0], k.shape[1], h, -1).transpose(1, 2)  # (N, h, v+n, dh)
        v = v.view(v.shape[0], v.shape[1], h, -1).transpose(1, 2)
        attn = torch.softmax(q @ k.transpose(-1, -2), dim=-1)
        out = (attn @ v).transpose(1, 2).reshape(q.shape[0], n, -1)
        return self.to_out(out)


class PerceiverResampler(nn.Module):
    """(N, v, D) patch tokens -> (N, num_latents, D) media latents; each image independently."""

    def __init__(self, dim: int, cfg: PerceiverConfig) -> None:
        super().__init__()
        self.latents = nn.Parameter(torch.randn(cfg.num_latents, dim))
        self.layers = nn.ModuleList(
            [
                nn.ModuleList([PerceiverAttention(dim, cfg.dim_head, cfg.heads), feed_forward(dim, cfg.ff_mult)])
                for _ in range(cfg.depth)
            ]
        )
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        latents = self.latents.unsqueeze(0).expand(x.shape[0], -1, -1)
        for layer in self.layers:
            attn: nn.Module = layer[0]  # type: ignore[index]
            ff: nn.Module = layer[1]  # type: ignore[index]
            latents = attn(x, latents) + latents
            latents = ff(latents) + latents
        return self.norm(latents)
