"""The decoder with a static, in-place KV cache: ``com.microsoft.GroupQueryAttention`` per layer.

Each layer's K and V live in one buffer of shape (B, H, L, hd) per layer that is both a graph input
(``past_*``) and a graph output (``present_*``); the runtime binds both to the same memory, so the new
tokens' K/V are written at each row's own position and nothing else moves. Rows are right-aligned at
position 0 (no left padding): row b holds ``seqlens_k[b] + 1`` valid positions after the call, and attention
reads only those.

``GroupQueryAttention`` (onnxruntime contrib op, CPU and CUDA) with ``num_heads == kv_num_heads`` is plain
multi-head attention; ``do_rotary=1`` applies GPT-NeoX's rotate-half rotary (``rotary_interleaved=0``) to
the first ``2 * cos_cache.shape[1]`` dims of each head, at positions it derives from ``seqlens_k``:
``0..S-1`` for a first prompt (``S == total_sequence_length``), else ``past_b + i`` with
``past_b = seqlens_k[b] + 1 - S``. The eager forward below reproduces exactly that, so the same module
exports (the symbolic) and validates (the eager path); the tests also hold it to the concat decoder.
"""

from __future__ import annotations

import torch
from torch import nn

from export.modeling.lm import FlamingoLM, GPTNeoXLayer, rotate_half

KV = tuple[torch.Tensor, torch.Tensor]


def rotary_tables(lm: FlamingoLM) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin caches (max_positions, rotary_ndims / 2) of GPT-NeoX's rotary frequencies."""
    positions = torch.arange(lm.cfg.max_position_embeddings, dtype=torch.float32)
    freqs = positions[:, None] * lm.inv_freq[None, :]
    return freqs.cos(), freqs.sin()


def _rotate(x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (S, hd) at positions (S,): rotate-half rotary on the first 2 * cos.shape[1] dims."""
    r = 2 * cos.shape[1]
    c = torch.cat([cos[positions], cos[positions]], dim=-1)
    s = torch.cat([sin[positions], sin[positions]], dim=-1)
    return torch.cat([x[..., :r] * c + rotate_half(x[..., :r]) * s, x[..., r:]], dim=-1)


class GroupQueryAttention(torch.autograd.Function):
    """Exports as ``com.microsoft::GroupQueryAttention``; eager: the op's CPU semantics (see module doc)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: object, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past_k: torch.Tensor, past_v: torch.Tensor,
        seqlens_k: torch.Tensor, total: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, s, width = q.shape
        hd = width // heads
        first_prompt = s == int(total)
        out = torch.zeros_like(q)
        present_k, present_v = past_k.clone(), past_v.clone()
        for row in range(b):
            length = int(seqlens_k[row]) + 1
            past = 0 if first_prompt else length - s
            real = min(s, length - past)  # query positions that are real tokens (right padding beyond)
            positions = torch.arange(s) + past
            qr = q[row].view(s, heads, hd).transpose(0, 1)  # (H, S, hd)
            kr = k[row].view(s, heads, hd).transpose(0, 1)
            vr = v[row].view(s, heads, hd).transpose(0, 1)
            qr = _rotate(qr, positions.clamp(max=cos.shape[0] - 1), cos, sin)
            kr = _rotate(kr, positions.clamp(max=cos.shape[0] - 1), cos, sin)
            present_k[row, :, past : past + s] = kr
            present_v[row, :, past : past + s] = vr
            keys, values = present_k[row, :, : past + real], present_v[row, :, : past + real]
            scores = (qr[:, :real] @ keys.transpose(-1, -2)) * hd**-0.5  # (H, real, past+real)
            causal = torch.arange(past + real)[None, :] <= (torch.arange(real) + past)[:, None]
            scores = scores.masked_fill(~causal, float("-inf"))
            attended = torch.softmax(scores, dim=-1) @ values  # (H, real, hd)
            out[row, :real] = attended.transpose(0, 1).reshape(real, width)
        return out, present_k, present_v

    @staticmethod
    def symbolic(  # type: ignore[no-untyped-def]
        g, q, k, v, past_k, past_v, seqlens_k, total, cos, sin, heads: int,
    ):
        out, pk, pv = g.op(
            "com.microsoft::GroupQueryAttention", q, k, v, past_k, past_v, seqlens_k, total, cos, sin,
            num_heads_i=heads, kv_num_heads_i=heads, do_rotary_i=1, rotary_interleaved_i=0, outputs=3,
        )
        out.setType(q.type())
        pk.setType(past_k.type())
        pv.setType(past_v.type())
        return out, pk, pv


class StaticCacheDecoder(nn.Module):
    """FlamingoLM over in-place KV buffers (the ``inplace`` decoder layout; shares the LM's weights).

    input_ids, text_time: (B, S); seqlens_k: (B,) int32, each row's valid length after the call minus 1;
    total_sequence_length: () int32, the largest such length + 1; logits_index: (B,) int64, the position in
    [0, S) whose logits each row returns (its last real token); past: per layer K, V (B, H, L, hd);
    memory: per cross-attention block K, V (B, h, media, dh). Returns logits (B, V) and per layer K, V
    (B, H, L, hd), the same buffers updated at each row's positions.
    """

    def __init__(self, lm: FlamingoLM) -> None:
        super().__init__()
        self.lm = lm
        cos, sin = rotary_tables(lm)
        self.cos: torch.Tensor
        self.sin: torch.Tensor
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def forward(
        self, input_ids: torch.Tensor, seqlens_k: torch.Tensor, total: torch.Tensor, text_time: torch.Tensor,
        logits_index: torch.Tensor, past: list[KV], memory: list[KV],
    ) -> tuple[torch.Tensor, list[KV]]:
        lm = self.lm
        heads, hd = lm.cfg.num_attention_heads, lm.cfg.head_dim
        x = lm.gpt_neox.embed_in(input_ids)
        b, s, _ = x.shape
        presents: list[KV] = []
        block = 0
        layers: list[GPTNeoXLayer] = list(lm.gpt_neox.layers)  # type: ignore[arg-type]
        for i, layer in enumerate(layers):
            if str(i) in lm.gated_cross_attn_layers:
                x = lm.gated_cross_attn_layers[str(i)](x, memory[block], text_time, lm.num_latents)
                block += 1
            att = layer.attention
            h = layer.input_layernorm(x)
            qkv = att.query_key_value(h).view(b, s, heads, 3 * hd)
            q, k, v = (t.reshape(b, s, heads * hd) for t in qkv.chunk(3, dim=-1))
            out, pk, pv = GroupQueryAttention.apply(q, k, v, past[i][0], past[i][1], seqlens_k, total,
                                                    self.cos, self.sin, heads)
            attn = att.dense(out)
            if layer.parallel:
                x = x + attn + layer.mlp(layer.post_attention_layernorm(x))
            else:
                x = x + attn
                x = x + layer.mlp(layer.post_attention_layernorm(x))
            presents.append((pk, pv))
        hidden = lm.gpt_neox.final_layer_norm(x)
        index = logits_index[:, None, None].expand(b, 1, hidden.shape[-1])
        last = hidden.gather(1, index)[:, 0]  # (B, D): each row's last real token
        return lm.logits(last), presents
