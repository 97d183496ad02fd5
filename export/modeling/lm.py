"""GPT-NeoX (Hugging Face parameter names) with OpenFlamingo gated cross-attention, stateless.

Every tensor that changes between calls is an argument: the self-attention KV cache, the cross-attention
memory (per-block K/V of the media latents) and the per-token image index ``text_time``. Nothing is cached
on the modules, so the same code runs eager, exports to ONNX, and serves as the full-recompute reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from export.modeling.config import LMConfig
from export.modeling.vision import feed_forward

KV = tuple[torch.Tensor, torch.Tensor]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


class GPTNeoXAttention(nn.Module):
    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        self.heads = cfg.num_attention_heads
        self.head_dim = cfg.head_dim
        self.rotary_ndims = cfg.rotary_ndims
        self.query_key_value = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=cfg.attention_bias)
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=cfg.attention_bias)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, bias: torch.Tensor, past: KV
    ) -> tuple[torch.Tensor, KV]:
        b, t, _ = x.shape
        # GPT-NeoX interleaves per head: (B, T, H, 3*hd) -> q, k, v each (B, H, T, hd)
        qkv = self.query_key_value(x).view(b, t, self.heads, 3 * self.head_dim).transpose(1, 2)
        q, k, v = qkv.chunk(3, dim=-1)
        r = self.rotary_ndims
        q = torch.cat([q[..., :r] * cos + rotate_half(q[..., :r]) * sin, q[..., r:]], dim=-1)
        k = torch.cat([k[..., :r] * cos + rotate_half(k[..., :r]) * sin, k[..., r:]], dim=-1)
        k = torch.cat([past[0], k], dim=2)  # (B, H, P+T, hd)
        v = torch.cat([past[1], v], dim=2)
        scores = (q @ k.transpose(-1, -2)) * self.head_dim**-0.5 + bias  # (B, H, T, P+T)
        out = torch.softmax(scores, dim=-1) @ v
        out = out.transpose(1, 2).reshape(b, t, -1)
        return self.dense(out), (k, v)


class GPTNeoXMLP(nn.Module):
    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        if cfg.hidden_act not in ("gelu", "gelu_new", "gelu_fast"):
            raise ValueError(f"hidden_act {cfg.hidden_act!r} is not supported (gelu, gelu_new, gelu_fast)")
        self.approximate = "none" if cfg.hidden_act == "gelu" else "tanh"
        self.dense_h_to_4h = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.dense_4h_to_h = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(F.gelu(self.dense_h_to_4h(x), approximate=self.approximate))


class GPTNeoXLayer(nn.Module):
    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        self.parallel = cfg.use_parallel_residual
        self.input_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.post_attention_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.attention = GPTNeoXAttention(cfg)
        self.mlp = GPTNeoXMLP(cfg)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, bias: torch.Tensor, past: KV
    ) -> tuple[torch.Tensor, KV]:
        attn, present = self.attention(self.input_layernorm(x), cos, sin, bias, past)
        if self.parallel:
            return x + attn + self.mlp(self.post_attention_layernorm(x)), present
        h = x + attn
        return h + self.mlp(self.post_attention_layernorm(h)), present


class MaskedCrossAttention(nn.Module):
    """Text queries attend to the latents of exactly one image (``only_attend_immediate_media``)."""

    def __init__(self, dim: int, dim_visual: int, heads: int, dim_head: int) -> None:
        super().__init__()
        self.heads = heads
        self.dim_head = dim_head
        self.norm = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, heads * dim_head, bias=False)
        self.to_kv = nn.Linear(dim_visual, 2 * heads * dim_head, bias=False)
        self.to_out = nn.Linear(heads * dim_head, dim, bias=False)

    def memory(self, latents: torch.Tensor) -> KV:
        """(N, n, Dv) media latents -> K, V each (N, heads, n, dim_head). Computed once per image."""
        k, v = self.to_kv(latents).chunk(2, dim=-1)
        shape = (latents.shape[0], latents.shape[1], self.heads, self.dim_head)
        return k.reshape(shape).transpose(1, 2), v.reshape(shape).transpose(1, 2)

    def forward(self, x: torch.Tensor, memory: KV, text_time: torch.Tensor, num_latents: int) -> torch.Tensor:
        # x: (B, T, D); memory K/V: (B, h, S, dh) with S = images * num_latents; text_time: (B, T), 0 = no image
        b, t, _ = x.shape
        q = self.to_q(self.norm(x)).view(b, t, self.heads, self.dim_head).transpose(1, 2)
        k, v = memory
        scores = (q * self.dim_head**-0.5) @ k.transpose(-1, -2)  # (B, h, T, S)
        key_time = torch.arange(k.shape[2], device=x.device) // num_latents + 1  # (S,)
        allowed = text_time[:, None, :, None] == key_time[None, None, None, :]
        scores = torch.where(allowed, scores, torch.full_like(scores, torch.finfo(scores.dtype).min))
        attn = torch.softmax(scores, dim=-1)
        attn = torch.where((text_time == 0)[:, None, :, None], torch.zeros_like(attn), attn)
        out = (attn @ v).transpose(1, 2).reshape(b, t, -1)
        return self.to_out(out)


class GatedCrossAttentionBlock(nn.Module):
    def __init__(self, cfg: LMConfig, dim_visual: int) -> None:
        super().__init__()
        self.attn = MaskedCrossAttention(cfg.hidden_size, dim_visual, cfg.xattn_heads, cfg.xattn_dim_head)
        self.attn_gate = nn.Parameter(torch.zeros(1))
        self.ff = feed_forward(cfg.hidden_size, cfg.xattn_ff_mult)
        self.ff_gate = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, memory: KV, text_time: torch.Tensor, num_latents: int) -> torch.Tensor:
        x = self.attn(x, memory, text_time, num_latents) * self.attn_gate.tanh() + x
        return self.ff(x) * self.ff_gate.tanh() + x


class GPTNeoXModel(nn.Module):
    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        self.embed_in = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList([GPTNeoXLayer(cfg) for _ in range(cfg.num_hidden_layers)])
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)


class FlamingoLM(nn.Module):
    """GPT-NeoX causal LM with gated cross-attention blocks before the decoder layers ``cfg.xattn_layers``."""

    def __init__(self, cfg: LMConfig, dim_visual: int, num_latents: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.num_latents = num_latents
        self.gpt_neox = GPTNeoXModel(cfg)
        self.embed_out = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.gated_cross_attn_layers = nn.ModuleDict(
            {str(i): GatedCrossAttentionBlock(cfg, dim_visual) for i in cfg.xattn_layers}
        )
        rot = cfg.rotary_ndims
        inv_freq = 1.0 / (cfg.rotary_emb_base ** (torch.arange(0, rot, 2, dtype=torch.float32) / rot))
        self.inv_freq: torch.Tensor
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    @property
    def xattn_layers(self) -> list[int]:
        return self.cfg.xattn_layers

    def media_memory(self, latents: torch.Tensor) -> list[KV]:
        """(N, n, Dv) -> per cross-attention block (in ``xattn_layers`` order) K, V each (N, h, n, dh)."""
        blocks: list[GatedCrossAttentionBlock] = [self.gated_cross_attn_layers[str(i)] for i in self.xattn_layers]  # type: ignore[misc]
        return [b.attn.memory(latents) for b in blocks]

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        text_time: torch.Tensor,
        past: list[KV],
        memory: list[KV],
    ) -> tuple[torch.Tensor, list[KV]]:
        """One prefill or decode call.

        input_ids, position_ids, text_time: (B, T); attention_mask: (B, P+T) with 1 = real token;
        past: per layer K, V (B, H, P, hd); memory: per xattn block K, V (B, h, S, dh).
        Returns final hidden states (B, T, D) (after the final LayerNorm) and per layer present K, V (B, H, P+T, hd).
        """
        x = self.gpt_neox.embed_in(input_ids)
        t = input_ids.shape[1]
        p = past[0][0].shape[2]
        # rotary tables for the given positions: (B, 1, T, rot)
        freqs = position_ids.to(torch.float32)[..., None] * self.inv_freq
        emb = torch.cat([freqs, freqs], dim=-1)[:, None]
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        # causal + padding bias (B, 1, T, P+T): query i sits at absolute column p + i
        cols = torch.arange(p + t, device=x.device)
        rows = torch.arange(t, device=x.device) + p
        causal = cols[None, :] <= rows[:, None]  # (T, P+T)
        allowed = causal[None, None] & (attention_mask[:, None, None, :] > 0)
        bias = torch.where(allowed, torch.zeros((), dtype=x.dtype), torch.tensor(torch.finfo(x.dtype).min, dtype=x.dtype))
        presents: list[KV] = []
        block = 0
        for i, layer in enumerate(self.gpt_neox.layers):
            if str(i) in self.gated_cross_attn_layers:
                x = self.gated_cross_attn_layers[str(i)](x, memory[block], text_time, self.num_latents)
                block += 1
            x, present = layer(x, cos, sin, bias, past[i])
            presents.append(present)
        return self.gpt_neox.final_layer_norm(x), presents

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.embed_out(hidden)
