"""ONNX export of a GraphSpec and numeric validation of the result against PyTorch."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from export.specs import GraphSpec
from runtime.manifest import GraphEntry, sha256_file

log = logging.getLogger(__name__)
OPSET = 17


def export_graph(spec: GraphSpec, path: Path) -> None:
    """Trace ``spec.module`` with its export sample and write a single-file ONNX graph (at ``OPSET``, then
    ``spec.postprocess`` when the spec has one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    feeds = spec.sample(spec.export_dims)
    args = tuple(feeds[s.name] for s in spec.inputs)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            spec.module,
            args,
            str(path),
            input_names=[s.name for s in spec.inputs],
            output_names=[s.name for s in spec.outputs],
            dynamic_axes=spec.dynamic_axes,
            opset_version=OPSET,
            do_constant_folding=True,
            dynamo=False,
        )
    if spec.postprocess is not None:
        spec.postprocess(path)


def reference_outputs(spec: GraphSpec, feeds: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    with torch.no_grad():
        out = (spec.reference or spec.module)(*(feeds[s.name] for s in spec.inputs))
    if isinstance(out, torch.Tensor):
        out = (out,)
    return {s.name: t.numpy() for s, t in zip(spec.outputs, out)}


def validate_graph(spec: GraphSpec, path: Path) -> dict[str, float]:
    """Run the graph on ONNX Runtime for every validation shape set; return max abs / rel errors.

    Raises AssertionError-free ValueError when an output exceeds the spec's tolerance.
    """
    # a rewritten graph (TensorScatter) run unbound warns on every call that it copies past to present:
    # expected here, so onnxruntime's process-wide logger shows errors only while validating it
    quiet = spec.postprocess is not None
    if quiet:
        ort.set_default_logger_severity(3)
    try:
        return _validate(spec, ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]))
    finally:
        if quiet:
            ort.set_default_logger_severity(2)  # onnxruntime's default


def _validate(spec: GraphSpec, session: ort.InferenceSession) -> dict[str, float]:
    worst_abs, worst_rel = 0.0, 0.0
    for dims in [spec.export_dims, *spec.validation_dims]:
        feeds = spec.sample(dims)
        ref = reference_outputs(spec, feeds)
        got = session.run(list(ref), {k: v.numpy() for k, v in feeds.items()})
        for (name, expected), actual in zip(ref.items(), got):
            if expected.shape != actual.shape:
                raise ValueError(f"{spec.name}: output {name} has shape {actual.shape}, PyTorch gives {expected.shape} ({dims})")
            if spec.check is not None:
                worst_abs = max(worst_abs, spec.check(feeds, expected, actual))
                continue
            diff = np.abs(expected - actual)
            abs_err = float(diff.max()) if diff.size else 0.0
            rel_err = float((diff / (np.abs(expected) + 1e-6)).max()) if diff.size else 0.0
            if not np.allclose(actual, expected, atol=spec.atol, rtol=spec.rtol):
                raise ValueError(
                    f"{spec.name}: output {name} differs from PyTorch by {abs_err:.3g} (atol {spec.atol}, rtol {spec.rtol}) at {dims}"
                )
            worst_abs = max(worst_abs, abs_err)
            worst_rel = max(worst_rel, min(rel_err, abs_err / (float(np.abs(expected).max()) + 1e-12)))
    return {"max_abs_error": worst_abs, "max_rel_error": worst_rel, "cases": 1 + len(spec.validation_dims)}


def graph_entry(spec: GraphSpec, root: Path, rel: str) -> GraphEntry:
    return GraphEntry(
        file=rel,
        inputs=spec.inputs,
        outputs=spec.outputs,
        precision="fp32",
        sha256=sha256_file(root / rel),
        opset=spec.opset,
        profiles=spec.profiles,
        tolerance={"atol": spec.atol, "rtol": spec.rtol},
    )
