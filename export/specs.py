"""One spec per exported graph: export wrapper, I/O names with symbolic dims, sample inputs, profiles, tolerance.

The decoder contract (names in runtime.manifest.DecoderNames):

* ``media_kv``: media latents (N, n, Dv) -> per cross-attention block K, V (N, h, n, dh). Run once per image
  (never per decode step or per beam); the runtime concatenates a sequence's images along the key axis.
* ``decoder``: input_ids / position_ids / text_time (B, T), attention_mask (B, P+T), per layer past K, V
  (B, H, P, hd), per block cross-attention K, V (B, h, S, dh) -> last-position logits (B, V) and per layer
  present K, V (B, H, P+T, hd). ``text_time`` picks, per token, the 1-based image whose latents it sees
  (0 = none). Prefill passes all of a row's images (S = M * n); decode passes the row's last image (S = n)
  with text_time 1 (0 for rows without images), so one call advances rows with different past lengths and
  image counts.
* ``decoder`` in the ``inplace`` layout (``KV_LAYOUTS``; export.modeling.static_cache): input_ids / text_time
  (B, S), seqlens_k (B,) int32, total_sequence_length () int32, logits_index (B,) int64, per layer past K, V
  (B, H, L, hd) and the same cross-attention K, V -> logits (B, V) and per layer present K, V (B, H, L, hd),
  which the runtime binds to the past buffers (one memory, updated at each row's positions). Rows start
  at position 0 (right padding); no position ids or attention mask: the op derives them from seqlens_k.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from export.modeling.model import UniMP
from export.modeling.static_cache import (
    ATTENTIONS,
    TENSOR_SCATTER_OPSET,
    StaticCacheDecoder,
    to_tensor_scatter,
)
from runtime.manifest import DecoderNames, TensorSpec

Shapes = dict[str, int]


@dataclass
class GraphSpec:
    name: str
    module: nn.Module
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    sample: Callable[[Shapes], dict[str, torch.Tensor]]
    """Builds inputs for given symbolic sizes (export uses ``export_dims``; validation several sets)."""
    export_dims: Shapes
    validation_dims: list[Shapes]
    profiles: dict[str, dict[str, list[int]]] = field(default_factory=dict)
    atol: float = 1e-4
    rtol: float = 1e-3
    check: Callable[[dict[str, torch.Tensor], Any, Any], float] | None = None
    """Replaces the atol/rtol comparison (single-output graphs): (feeds, expected, actual) -> error,
    raising ValueError when the output is not acceptable (e.g. index outputs where ties may differ)."""
    reference: nn.Module | None = None
    """The PyTorch reference validation compares against (default: ``module``'s eager forward)."""
    opset: int = 17
    """Default-domain opset of the written graph (recorded in the manifest's graph entry)."""
    postprocess: Callable[[Path], None] | None = None
    """Rewrites the exported file in place before validation (e.g. placeholder ops -> opset-24 ops)."""

    @property
    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        axes: dict[str, dict[int, str]] = {}
        for spec in self.inputs + self.outputs:
            dyn = {i: d for i, d in enumerate(spec.shape) if isinstance(d, str)}
            if dyn:
                axes[spec.name] = dyn
        return axes


def _profile(spec: TensorSpec, lo: Shapes, opt: Shapes, hi: Shapes) -> dict[str, list[int]]:
    def concrete(dims: Shapes) -> list[int]:
        return [d if isinstance(d, int) else _eval(d, dims) for d in spec.shape]

    return {"min": concrete(lo), "opt": concrete(opt), "max": concrete(hi)}


def _eval(symbol: str, dims: Shapes) -> int:
    if "+" in symbol:
        return sum(dims[s.strip()] for s in symbol.split("+"))
    if "*" in symbol:
        a, b = (s.strip() for s in symbol.split("*"))
        return dims[a] * (int(b) if b.isdigit() else dims[b])
    return dims[symbol]


class _Vision(nn.Module):
    def __init__(self, model: UniMP) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.encode_images(pixel_values)


class _MediaKV(nn.Module):
    def __init__(self, model: UniMP) -> None:
        super().__init__()
        self.model = model

    def forward(self, media_latents: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(t for kv in self.model.lm.media_memory(media_latents) for t in kv)


KVPairs = list[tuple[torch.Tensor, torch.Tensor]]


def _split_caches(caches: tuple[torch.Tensor, ...], layers: int, blocks: int) -> tuple[KVPairs, KVPairs]:
    """The flat graph inputs after the scalars -> per layer past K, V and per block cross-attention K, V."""
    n = 2 * layers
    past = [(caches[2 * i], caches[2 * i + 1]) for i in range(layers)]
    memory = [(caches[n + 2 * j], caches[n + 2 * j + 1]) for j in range(blocks)]
    return past, memory


class _Decoder(nn.Module):
    def __init__(self, model: UniMP) -> None:
        super().__init__()
        self.model = model
        self.layers = model.cfg.lm.num_hidden_layers
        self.blocks = len(model.cfg.lm.xattn_layers)

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        text_time: torch.Tensor,
        *caches: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        past, memory = _split_caches(caches, self.layers, self.blocks)
        hidden, presents = self.model.lm(input_ids, position_ids, attention_mask, text_time, past, memory)
        logits = self.model.lm.logits(hidden[:, -1])  # (B, V): only the last position is ever sampled
        return (logits, *[t for kv in presents for t in kv])


def vision_spec(model: UniMP, names: DecoderNames) -> GraphSpec:
    v = model.cfg.vision
    n, dv = model.num_latents, v.width
    pix = TensorSpec(names.pixel_values, "float32", ["images", 3, v.image_size, v.image_size])
    out = TensorSpec(names.media_latents, "float32", ["images", n, dv])

    def sample(d: Shapes) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(d["images"])
        return {pix.name: torch.randn(d["images"], 3, v.image_size, v.image_size, generator=g)}

    lo, opt, hi = {"images": 1}, {"images": 4}, {"images": 32}
    return GraphSpec(
        "vision", _Vision(model), [pix], [out], sample, {"images": 2}, [{"images": 3}, {"images": 1}],
        profiles={pix.name: _profile(pix, lo, opt, hi)}, atol=1e-4, rtol=1e-3,
    )


def media_kv_spec(model: UniMP, names: DecoderNames) -> GraphSpec:
    c = model.cfg.lm
    n, dv = model.num_latents, model.cfg.vision.width
    lat = TensorSpec(names.media_latents, "float32", ["images", n, dv])
    outs = []
    for j in range(len(c.xattn_layers)):
        for tmpl in (names.xattn_key, names.xattn_value):
            outs.append(TensorSpec(tmpl.format(block=j), "float32", ["images", c.xattn_heads, n, c.xattn_dim_head]))

    def sample(d: Shapes) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(10 + d["images"])
        return {lat.name: torch.randn(d["images"], n, dv, generator=g)}

    lo, opt, hi = {"images": 1}, {"images": 4}, {"images": 32}
    return GraphSpec(
        "media_kv", _MediaKV(model), [lat], outs, sample, {"images": 2}, [{"images": 5}, {"images": 1}],
        profiles={lat.name: _profile(lat, lo, opt, hi)}, atol=1e-5, rtol=1e-4,
    )


def decoder_spec(model: UniMP, names: DecoderNames) -> GraphSpec:
    c = model.cfg.lm
    n = model.num_latents
    hd, h = c.head_dim, c.num_attention_heads
    ids = TensorSpec(names.input_ids, "int64", ["batch", "seq"])
    pos = TensorSpec(names.position_ids, "int64", ["batch", "seq"])
    mask = TensorSpec(names.attention_mask, "int64", ["batch", "past+seq"])
    ttime = TensorSpec(names.text_time, "int64", ["batch", "seq"])
    past, present, memory = [], [], []
    for i in range(c.num_hidden_layers):
        for tmpl in (names.past_key, names.past_value):
            past.append(TensorSpec(tmpl.format(layer=i), "float32", ["batch", h, "past", hd]))
        for tmpl in (names.present_key, names.present_value):
            present.append(TensorSpec(tmpl.format(layer=i), "float32", ["batch", h, "past+seq", hd]))
    for j in range(len(c.xattn_layers)):
        for tmpl in (names.xattn_key, names.xattn_value):
            memory.append(TensorSpec(tmpl.format(block=j), "float32", ["batch", c.xattn_heads, "media", c.xattn_dim_head]))
    logits = TensorSpec(names.logits, "float32", ["batch", c.vocab_size])

    def sample(d: Shapes) -> dict[str, torch.Tensor]:
        b, t, p, m = d["batch"], d["seq"], d["past"], d["media"]
        g = torch.Generator().manual_seed(b * 1000 + t * 100 + p)
        feeds: dict[str, torch.Tensor] = {
            ids.name: torch.randint(0, c.vocab_size, (b, t), generator=g),
            pos.name: (torch.arange(t) + p).expand(b, t).contiguous(),
            mask.name: torch.ones(b, p + t, dtype=torch.int64),
            ttime.name: torch.randint(0, m // n + 1, (b, t), generator=g),
        }
        if b > 1 and p + t > 2:
            feeds[mask.name][1, :2] = 0  # a left-padded row
        for spec in past:
            feeds[spec.name] = torch.randn(b, h, p, hd, generator=g)
        for spec in memory:
            feeds[spec.name] = torch.randn(b, c.xattn_heads, m, c.xattn_dim_head, generator=g)
        return feeds

    # One TensorRT profile covers prefill and decode, and every shape in its box must be one the model can
    # take: max past + max seq = the model's positions (the mask's max, past+seq, is then the positions).
    # Half the positions for a prompt, the rest for the past; longer prompts or contexts need a second profile.
    positions = c.max_position_embeddings
    dims_lo = {"batch": 1, "seq": 1, "past": 0, "media": n}
    dims_opt = {"batch": 4, "seq": 1, "past": min(256, positions - positions // 2), "media": n}
    dims_hi = {"batch": 16, "seq": positions // 2, "past": positions - positions // 2, "media": 8 * n}
    profiles = {s.name: _profile(s, dims_lo, dims_opt, dims_hi) for s in [ids, pos, mask, ttime, *past, *memory]}
    return GraphSpec(
        "decoder",
        _Decoder(model),
        [ids, pos, mask, ttime, *past, *memory],
        [logits, *present],
        sample,
        {"batch": 2, "seq": 5, "past": 3, "media": 2 * n},
        [
            {"batch": 3, "seq": 7, "past": 0, "media": 3 * n},  # prefill, several images
            {"batch": 4, "seq": 1, "past": 9, "media": n},  # decode step
            {"batch": 1, "seq": 1, "past": 1, "media": n},
        ],
        profiles=profiles,
        atol=1e-4,
        rtol=1e-3,
    )


class _InplaceDecoder(nn.Module):
    def __init__(self, model: UniMP, attention: str = "gqa") -> None:
        super().__init__()
        self.decoder = StaticCacheDecoder(model.lm, attention)
        self.layers = model.cfg.lm.num_hidden_layers
        self.blocks = len(model.cfg.lm.xattn_layers)

    def forward(
        self,
        input_ids: torch.Tensor,
        seqlens_k: torch.Tensor,
        total_sequence_length: torch.Tensor,
        text_time: torch.Tensor,
        logits_index: torch.Tensor,
        *caches: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        past, memory = _split_caches(caches, self.layers, self.blocks)
        logits, presents = self.decoder(input_ids, seqlens_k, total_sequence_length, text_time, logits_index,
                                        past, memory)
        return (logits, *[t for kv in presents for t in kv])


def inplace_decoder_spec(model: UniMP, names: DecoderNames, attention: str = "gqa") -> GraphSpec:
    """The ``inplace`` decoder. Validation cases: a first prompt (all rows full: ORT leaves the K/V of
    right-padding positions unspecified, so padded prompts are checked through the runtime's logits
    instead), decode steps with per-row lengths, and a prompt continued after a cached prefix.

    ``attention`` (export.modeling.static_cache.ATTENTIONS): "gqa" (com.microsoft.GroupQueryAttention,
    opset 17) or "onnx" (standard ops with TensorScatter-24, opset 24; the same I/O), validated against
    the GQA reference."""
    if attention not in ATTENTIONS:
        raise ValueError(f"attention must be one of {ATTENTIONS}, got {attention!r}")
    onnx_form = attention == "onnx"
    c = model.cfg.lm
    n = model.num_latents
    hd, h = c.head_dim, c.num_attention_heads
    ids = TensorSpec(names.input_ids, "int64", ["batch", "seq"])
    seqlens = TensorSpec(names.seqlens_k, "int32", ["batch"])
    total = TensorSpec(names.total_sequence_length, "int32", [])
    ttime = TensorSpec(names.text_time, "int64", ["batch", "seq"])
    index = TensorSpec(names.logits_index, "int64", ["batch"])
    past, present, memory = [], [], []
    for i in range(c.num_hidden_layers):
        for tmpl in (names.past_key, names.past_value):
            past.append(TensorSpec(tmpl.format(layer=i), "float32", ["batch", h, "capacity", hd]))
        for tmpl in (names.present_key, names.present_value):
            present.append(TensorSpec(tmpl.format(layer=i), "float32", ["batch", h, "capacity", hd]))
    for j in range(len(c.xattn_layers)):
        for tmpl in (names.xattn_key, names.xattn_value):
            memory.append(TensorSpec(tmpl.format(block=j), "float32", ["batch", c.xattn_heads, "media", c.xattn_dim_head]))
    logits = TensorSpec(names.logits, "float32", ["batch", c.vocab_size])

    def sample(d: Shapes) -> dict[str, torch.Tensor]:
        # "past": row 0's valid past length; row r has past - r (>= 0); "capacity": buffer length
        b, t, p, m, cap = d["batch"], d["seq"], d["past"], d["media"], d["capacity"]
        g = torch.Generator().manual_seed(b * 1000 + t * 100 + p)
        lengths = [max(0, p - r) + t for r in range(b)] if p else [t] * b
        feeds: dict[str, torch.Tensor] = {
            ids.name: torch.randint(0, c.vocab_size, (b, t), generator=g),
            seqlens.name: torch.tensor([x - 1 for x in lengths], dtype=torch.int32),
            total.name: torch.tensor(max(lengths), dtype=torch.int32),
            ttime.name: torch.randint(0, m // n + 1, (b, t), generator=g),
            index.name: torch.full((b,), t - 1, dtype=torch.int64),
        }
        for spec in past:
            buf = torch.zeros(b, h, cap, hd)  # beyond each row's past: zeros, as ORT writes a fresh present
            for r, x in enumerate(lengths):
                buf[r, :, : x - t] = torch.randn(h, x - t, hd, generator=g)
            feeds[spec.name] = buf
        for spec in memory:
            feeds[spec.name] = torch.randn(b, c.xattn_heads, m, c.xattn_dim_head, generator=g)
        return feeds

    cap = c.max_position_embeddings
    dims_lo = {"batch": 1, "seq": 1, "capacity": 2, "media": n}
    dims_opt = {"batch": 4, "seq": 1, "capacity": cap, "media": n}
    dims_hi = {"batch": 16, "seq": cap, "capacity": cap + 1, "media": 8 * n}
    profiles = {s.name: _profile(s, dims_lo, dims_opt, dims_hi) for s in [ids, seqlens, ttime, index, *past, *memory]}
    return GraphSpec(
        "decoder",
        _InplaceDecoder(model, attention),
        [ids, seqlens, total, ttime, index, *past, *memory],
        [logits, *present],
        sample,
        {"batch": 2, "seq": 5, "past": 0, "media": 2 * n, "capacity": 16},
        [
            {"batch": 3, "seq": 7, "past": 0, "media": 3 * n, "capacity": 12},  # first prompt, several images
            {"batch": 4, "seq": 1, "past": 9, "media": n, "capacity": 16},  # decode step, lengths 10, 9, 8, 7
            {"batch": 1, "seq": 4, "past": 6, "media": 2 * n, "capacity": 12},  # prompt after a cached prefix
        ],
        profiles=profiles,
        atol=1e-4,
        rtol=1e-3,
        reference=_InplaceDecoder(model) if onnx_form else None,
        opset=TENSOR_SCATTER_OPSET if onnx_form else 17,
        postprocess=to_tensor_scatter if onnx_form else None,
    )


KV_LAYOUTS = ("inplace", "concat")
"""Decoder KV layouts ``unimp export --kv-layout`` writes (runtime.manifest.DecoderDims.kv_layout)."""


def check_decoder_form(kv_layout: str, attention: str) -> None:
    """Raise ValueError unless (kv_layout, attention) is a decoder form ``unimp export`` writes: ``attention``
    ("gqa" or "onnx", see inplace_decoder_spec) chooses among ``inplace`` decoders only."""
    if kv_layout not in KV_LAYOUTS:
        raise ValueError(f"kv_layout must be one of {KV_LAYOUTS}, got {kv_layout!r}")
    if attention not in ATTENTIONS:
        raise ValueError(f"attention must be one of {ATTENTIONS}, got {attention!r}")
    if kv_layout != "inplace" and attention != "gqa":
        raise ValueError(f"attention {attention!r} needs the inplace KV layout (the concat layout is standard ops "
                         "already)")


def all_specs(model: UniMP, names: DecoderNames, kv_layout: str = "inplace", attention: str = "gqa") -> list[GraphSpec]:
    check_decoder_form(kv_layout, attention)
    decoder = inplace_decoder_spec(model, names, attention) if kv_layout == "inplace" else decoder_spec(model, names)
    return [vision_spec(model, names), media_kv_spec(model, names), decoder]
