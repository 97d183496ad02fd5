"""VQGAN (taming-transformers layout) -> two validated ONNX graphs, optional like the diffusion ones.

Source: a directory with ``model.ckpt`` (a taming ``VQModel`` checkpoint, e.g. ``vqgan_imagenet_f16_1024``)
and its config (``config.json``, or taming's ``*.yaml``; none means the f16/1024 config), loaded by
``export.modeling.vqgan.load_vqgan``. ``build_demo_vqgan`` writes a seeded one.

Graphs (files under ``<out>/vqgan/``):

* ``vqgan_encoder``: pixels (N, 3, R, R) float32 in [-1, 1] -> codes (N, g*g) int64, the argmin over
  the codebook computed inside the graph (ties to the lowest index), row-major over the g x g grid.
* ``vqgan_decoder``: codes (N, g*g) int64 -> pixels (N, 3, R, R) float32, nominally in [-1, 1].

Validation: the decoder's pixels against PyTorch within a tolerance scaled to their magnitude; the
encoder's indices must agree with PyTorch's except where two codebook entries are equally near
(a different index is accepted only when its distance equals the reference's minimum within a
tolerance scaled to the distances).

``GraphEntry.extra`` of both: ``roles`` (role -> tensor name: ``pixels``, ``codes``) and ``validation``;
``vqgan_decoder.extra`` also ``resolution``, ``grid``, ``n_embed``, ``embed_dim``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

from export.graphs import OPSET, export_graph, graph_entry, validate_graph
from export.modeling.vqgan import VQModel, load_vqgan
from export.specs import GraphSpec, Shapes
from runtime.manifest import GraphEntry, Manifest, TensorSpec

log = logging.getLogger(__name__)

SUBDIR = "vqgan"
KEYS = ("vqgan_encoder", "vqgan_decoder")
PIXELS, CODES = "pixels", "codes"


class VQGANExport(NamedTuple):
    graphs: dict[str, GraphEntry]
    meta: dict[str, Any]


class _Encoder(nn.Module):
    def __init__(self, model: VQModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.encode_indices(pixels)


class _Decoder(nn.Module):
    def __init__(self, model: VQModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        return self.model.decode_indices(codes)


def _generator(dims: Shapes, salt: int) -> torch.Generator:
    return torch.Generator().manual_seed(salt + 7919 * dims["images"])


def _batch_profile(shape: list[int | str], lo: int, opt: int, hi: int) -> dict[str, list[int]]:
    return {k: [n if isinstance(d, str) else d for d in shape] for k, n in (("min", lo), ("opt", opt), ("max", hi))}


def encoder_index_check(model: VQModel, rel_tol: float = 1e-4):  # type: ignore[no-untyped-def]
    """GraphSpec.check for the encoder: indices equal PyTorch's, or a tie within ``rel_tol`` of the distances."""

    def check(feeds: dict[str, torch.Tensor], expected: np.ndarray, actual: np.ndarray) -> float:
        if np.array_equal(expected, actual):
            return 0.0
        with torch.no_grad():
            d = model.quantize.distances(model.pre_quant(feeds[PIXELS])).numpy()  # (N, hw, K)
        n, p = np.nonzero(expected != actual)
        ref = d[n, p, expected[n, p]]
        got = d[n, p, actual[n, p]]
        scale = np.abs(d[n, p]).max(axis=-1) + 1e-12
        gap = float(np.max(np.abs(got - ref) / scale))
        if gap > rel_tol:
            raise ValueError(f"vqgan_encoder: {len(n)} code indices differ from PyTorch and are not ties "
                             f"(distance gap {gap:.3g} of the distance scale, tolerance {rel_tol})")
        return gap

    return check


def vqgan_specs(model: VQModel, max_batch: int = 8) -> list[GraphSpec]:
    c = model.cfg
    r, codes_n = c.resolution, c.num_codes
    pix = TensorSpec(PIXELS, "float32", ["images", 3, r, r])
    codes = TensorSpec(CODES, "int64", ["images", codes_n])

    def enc_sample(d: Shapes) -> dict[str, torch.Tensor]:
        return {PIXELS: torch.rand(d["images"], 3, r, r, generator=_generator(d, 1)) * 2 - 1}

    def dec_sample(d: Shapes) -> dict[str, torch.Tensor]:
        return {CODES: torch.randint(0, c.n_embed, (d["images"], codes_n), generator=_generator(d, 2))}

    enc = GraphSpec(
        "vqgan_encoder", _Encoder(model), [pix], [codes], enc_sample, {"images": 2}, [{"images": 1}],
        profiles={PIXELS: _batch_profile(pix.shape, 1, 4, max_batch)}, atol=0.0, rtol=0.0,
        check=encoder_index_check(model),
    )  # fmt: skip
    dec = GraphSpec(
        "vqgan_decoder", _Decoder(model), [codes], [pix], dec_sample, {"images": 2}, [{"images": 1}],
        profiles={CODES: _batch_profile(codes.shape, 1, 1, max_batch)}, atol=1e-4, rtol=1e-3,
    )  # fmt: skip
    return [enc, dec]


def export_vqgan(source: Path, out_dir: Path, progress: bool = True, *, max_batch: int = 8) -> VQGANExport:
    """Export and validate both graphs of the VQGAN in ``source`` under ``out_dir/vqgan/``."""
    loaded = load_vqgan(Path(source))
    model = loaded.model
    graphs: dict[str, GraphEntry] = {}
    reports: dict[str, dict[str, Any]] = {}
    with torch.no_grad():
        for spec in vqgan_specs(model, max_batch):
            rel = f"{SUBDIR}/{spec.name}.onnx"
            t0 = time.perf_counter()
            export_graph(spec, Path(out_dir) / rel)
            report = validate_graph(spec, Path(out_dir) / rel)
            report["export_s"] = round(time.perf_counter() - t0, 2)
            reports[spec.name] = report
            log.info("%s: exported and validated (%s)", spec.name, report)
            extra = {"roles": {"pixels": PIXELS, "codes": CODES}, "validation": report}
            graphs[spec.name] = replace(graph_entry(spec, Path(out_dir), rel), extra=extra)
    c = model.cfg
    graphs["vqgan_decoder"].extra.update(
        {"resolution": c.resolution, "grid": c.grid, "n_embed": c.n_embed, "embed_dim": c.embed_dim}
    )
    meta = {"source": Path(source).name, **loaded.source, "opset": OPSET, "validation": reports}
    return VQGANExport(graphs, meta)


def validate_vqgan(directory: Path, manifest: Manifest, source: Path) -> dict[str, dict[str, Any]]:
    """Re-validate the exported VQGAN graphs in ``directory`` against PyTorch rebuilt from ``source``."""
    model = load_vqgan(Path(source)).model
    result: dict[str, dict[str, Any]] = {}
    with torch.no_grad():
        for spec in vqgan_specs(model):
            entry = manifest.graphs[spec.name]
            result[spec.name] = validate_graph(spec, Path(directory) / entry.file)
    return result
