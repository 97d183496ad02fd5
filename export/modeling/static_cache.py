"""The decoder with a static, in-place KV cache: ``com.microsoft.GroupQueryAttention`` per layer, or the
same contract in standard ONNX ops (``attention="onnx"``, below).

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

``attention="onnx"`` builds the same contract from standard ONNX ops only (what TensorRT >= 10.15 parses):
per layer an opset-24 ``TensorScatter`` (mode linear, ``write_indices`` = each row's past length, axis 2)
writes the new K/V into the bound buffer, then MatMul / Softmax attend over the first
``total_sequence_length`` positions under a causal mask derived from ``seqlens_k``; rotary positions come
from the same per-row past length. The TorchScript exporter (run at opset 17) has no TensorScatter, so the
scatter exports as a placeholder (``PLACEHOLDER_DOMAIN::TensorScatter``) that ``to_tensor_scatter``
rewrites into the default domain after converting the graph to opset 24. Its eager forward is the batched form of the GQA semantics
above; the export is validated against the per-row GQA reference.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from export.modeling.lm import FlamingoLM, GPTNeoXLayer, rotate_half

KV = tuple[torch.Tensor, torch.Tensor]
ATTENTIONS = ("gqa", "onnx")
"""Self-attention forms of the ``inplace`` decoder (``unimp export --attention``)."""
PLACEHOLDER_DOMAIN = "unimp.export"
TENSOR_SCATTER_OPSET = 24


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


class TensorScatter(torch.autograd.Function):
    """ONNX ``TensorScatter`` (mode linear) along axis 2: ``out[b, :, w[b] + s] = update[b, :, s]``.

    Exports as ``PLACEHOLDER_DOMAIN::TensorScatter`` (see ``to_tensor_scatter``)."""

    @staticmethod
    def forward(ctx: object, past: torch.Tensor, update: torch.Tensor,  # type: ignore[override]
                write_indices: torch.Tensor) -> torch.Tensor:
        out = past.clone()
        s = update.shape[2]
        for row in range(past.shape[0]):
            start = int(write_indices[row])
            out[row, :, start : start + s] = update[row]
        return out

    @staticmethod
    def symbolic(g, past, update, write_indices):  # type: ignore[no-untyped-def]
        out = g.op(f"{PLACEHOLDER_DOMAIN}::TensorScatter", past, update, write_indices, axis_i=2, mode_s="linear")
        out.setType(past.type())
        return out


def standard_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past_k: torch.Tensor, past_v: torch.Tensor,
    seqlens_k: torch.Tensor, total: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``GroupQueryAttention``'s semantics (same arguments and results) in ops that export as standard ONNX:
    TensorScatter for the cache write, MatMul / Softmax over the first ``total`` positions."""
    b, s, width = q.shape
    hd = width // heads
    seq = torch._shape_as_tensor(q)[1]  # traced as Shape: the graph keeps S dynamic
    total = total.to(torch.int64)
    length = seqlens_k.to(torch.int64) + 1  # (B,) valid length after the call
    first = torch.eq(total, seq)  # a first prompt: every row starts at 0
    past = torch.where(first, torch.zeros_like(length), length - seq)  # (B,) write index
    steps = torch.arange(s, dtype=torch.int64)  # traced as Range over S
    positions = past[:, None] + steps[None, :]  # (B, S)
    # Min, not Clip: TensorRT's Clip takes floating-point tensors only
    rot = torch.minimum(positions, torch.tensor(cos.shape[0] - 1, dtype=torch.int64))
    c = torch.cat([cos[rot], cos[rot]], dim=-1)[:, None]  # (B, 1, S, r)
    n = torch.cat([sin[rot], sin[rot]], dim=-1)[:, None]
    r = c.shape[-1]

    def rotary(x: torch.Tensor) -> torch.Tensor:
        x = x.view(b, s, heads, hd).transpose(1, 2)  # (B, H, S, hd)
        return torch.cat([x[..., :r] * c + rotate_half(x[..., :r]) * n, x[..., r:]], dim=-1)

    qr, kr = rotary(q), rotary(k)
    vr = v.view(b, s, heads, hd).transpose(1, 2)
    present_k = TensorScatter.apply(past_k, kr, past)
    present_v = TensorScatter.apply(past_v, vr, past)
    keys = torch.arange(present_k.shape[2], dtype=torch.int64)
    used = keys[: total]  # positions [0, total): nothing beyond the longest row is read
    kk = present_k.index_select(2, used)
    vv = present_v.index_select(2, used)
    scores = (qr @ kk.transpose(-1, -2)) * hd**-0.5  # (B, H, S, total)
    causal = used[None, None, :] <= positions[:, :, None]  # (B, S, total): key j visible to query i
    scores = scores.masked_fill(~causal[:, None], float("-inf"))
    attended = torch.softmax(scores, dim=-1) @ vv  # (B, H, S, hd)
    real = (steps[None, :] < (length - past)[:, None])[:, :, None]  # (B, S, 1): right padding -> zeros
    out = attended.transpose(1, 2).reshape(b, s, width)
    return torch.where(real, out, torch.zeros_like(out)), present_k, present_v


class StaticCacheDecoder(nn.Module):
    """FlamingoLM over in-place KV buffers (the ``inplace`` decoder layout; shares the LM's weights).

    input_ids, text_time: (B, S); seqlens_k: (B,) int32, each row's valid length after the call minus 1;
    total_sequence_length: () int32, the largest such length + 1; logits_index: (B,) int64, the position in
    [0, S) whose logits each row returns (its last real token); past: per layer K, V (B, H, L, hd);
    memory: per cross-attention block K, V (B, h, media, dh). Returns logits (B, V) and per layer K, V
    (B, H, L, hd), the same buffers updated at each row's positions. ``attention``: one of ``ATTENTIONS``.
    """

    def __init__(self, lm: FlamingoLM, attention: str = "gqa") -> None:
        super().__init__()
        if attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}, got {attention!r}")
        self.lm = lm
        self.attention = attention
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
            if self.attention == "onnx":
                out, pk, pv = standard_attention(q, k, v, past[i][0], past[i][1], seqlens_k, total,
                                                 self.cos, self.sin, heads)
            else:
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



def to_tensor_scatter(path: Path) -> None:
    """Rewrite an exported ``attention="onnx"`` decoder in place: convert it to opset 24 (onnx's version
    converter, which adapts every default-domain op) and turn each ``PLACEHOLDER_DOMAIN::TensorScatter``
    into the default domain's ``TensorScatter``-24 (axis 2, mode linear). Raises ValueError when the graph
    has no placeholder or any op outside the default domain remains."""
    import onnx
    from onnx import version_converter

    model = onnx.load(str(path))
    placeholders = [node for node in model.graph.node if node.domain == PLACEHOLDER_DOMAIN]
    if not placeholders or any(node.op_type != "TensorScatter" for node in placeholders):
        raise ValueError(f"{path}: expected {PLACEHOLDER_DOMAIN}::TensorScatter placeholders, found "
                         f"{sorted({n.op_type for n in placeholders})}")
    model = version_converter.convert_version(model, TENSOR_SCATTER_OPSET)
    for node in model.graph.node:
        if node.domain == PLACEHOLDER_DOMAIN:
            node.domain = ""
    kept = [op for op in model.opset_import if op.domain not in (PLACEHOLDER_DOMAIN, "", "ai.onnx")]
    del model.opset_import[:]
    model.opset_import.append(onnx.helper.make_opsetid("", TENSOR_SCATTER_OPSET))
    model.opset_import.extend(kept)
    foreign = sorted({node.domain for node in model.graph.node if node.domain not in ("", "ai.onnx")})
    if foreign:
        raise ValueError(f"{path}: ops outside the default domain remain: {foreign}")
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
