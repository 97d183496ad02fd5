"""`unimp preflight` on tiny hand-built graphs: each TensorRT rule rejects what it names and passes what it allows."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from export.preflight import Check, Report, SynthContext, check_model, check_profiles, run_corners, target
from export.trt_ops import TARGETS
from runtime.manifest import GraphEntry, TensorSpec


def _model(nodes: list[onnx.NodeProto], inputs: list[onnx.ValueInfoProto], outputs: list[onnx.ValueInfoProto],
           initializers: list[onnx.TensorProto] | None = None, opset: int = 17,
           extra_domains: tuple[str, ...] = ()) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=initializers or [])
    imports = [helper.make_opsetid("", opset), *(helper.make_opsetid(d, 1) for d in extra_domains)]
    return helper.make_model(graph, opset_imports=imports, ir_version=8)


def _vi(name: str, dims: list[int | str], dtype: int = TensorProto.FLOAT) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, dtype, dims)


def _relu(opset: int = 17) -> onnx.ModelProto:
    return _model([helper.make_node("Relu", ["x"], ["y"])], [_vi("x", ["n", 4])], [_vi("y", ["n", 4])], opset=opset)


def _entry(profiles: dict[str, dict[str, list[int]]]) -> GraphEntry:
    return GraphEntry(file="g.onnx", inputs=[TensorSpec("x", "float32", ["n", 4])], outputs=[], profiles=profiles)


def _fails(checks: list[Check], check: str) -> list[str]:
    return [c.detail for c in checks if c.check == check and c.status == "FAIL"]


def test_targets_record_opsets_and_later_ops() -> None:
    assert [TARGETS[t].max_opset for t in ("10.3", "10.x", "11")] == [20, 24, 25]
    for op in ("Attention", "TensorScatter", "RotaryEmbedding", "RMSNormalization"):
        assert TARGETS["10.3"].support(op) is None
        assert TARGETS["10.x"].support(op) is not None and TARGETS["11"].support(op) is not None
    assert TARGETS["10.x"].support("Attention").since == "10.14"  # type: ignore[union-attr]
    assert TARGETS["10.x"].support("TensorScatter").since == "10.15"  # type: ignore[union-attr]
    assert TARGETS["10.x"].support("Swish") is None and TARGETS["11"].support("Swish") is not None
    matmul = TARGETS["10.3"].support("MatMul")
    assert matmul is not None and "INT64" not in matmul.types and "FP16" in matmul.types


def test_a_plain_graph_passes_every_static_check() -> None:
    checks = check_model("g", _relu(), target("10.3"))
    assert not [c for c in checks if c.status == "FAIL"], checks
    assert {c.check for c in checks} == {"opset", "ops", "constants", "shapes", "dtypes"}


def test_opset_above_the_target_is_rejected_with_the_maximum() -> None:
    model = _relu(opset=24)
    (opset,) = _fails(check_model("g", model, target("10.3")), "opset")
    assert "opset 24 > 20" in opset and "export at opset <= 20" in opset
    assert not _fails(check_model("g", model, target("10.x")), "opset")
    assert _fails(check_model("g", _relu(opset=25), target("10.x")), "opset")
    assert not _fails(check_model("g", _relu(opset=25), target("11")), "opset")


@pytest.mark.parametrize(("op", "fix"), [
    ("GroupQueryAttention", "--kv-layout concat (TensorRT 10.3) or --attention onnx (TensorRT >= 10.15)"),
    ("MatMulNBits", "quantize with --format qdq"),
    ("DynamicQuantizeMatMul", "quantize with --format qdq"),
])
def test_custom_domain_ops_are_rejected_with_the_fix(op: str, fix: str) -> None:
    node = helper.make_node(op, ["x"], ["y"], domain="com.microsoft")
    model = _model([node], [_vi("x", ["n", 4])], [_vi("y", ["n", 4])], extra_domains=("com.microsoft",))
    for name in TARGETS:
        (failure,) = _fails(check_model("g", model, target(name)), "ops")
        assert failure.startswith(f"com.microsoft::{op} x1: custom-domain op") and fix in failure


def test_ops_newer_than_the_target_and_unsupported_ops_are_rejected() -> None:
    nodes = [helper.make_node("Swish", ["x"], ["s"]), helper.make_node("MatMulInteger", ["s", "s"], ["y"])]
    model = _model(nodes, [_vi("x", ["n", 4])], [_vi("y", ["n", 4], TensorProto.INT32)], opset=24)
    failures = _fails(check_model("g", model, target("10.x")), "ops")
    assert any(f.startswith("MatMulInteger x1: not supported") and "--format qdq" in f for f in failures)
    assert any(f.startswith("Swish x1: not in the TensorRT 10.x") for f in failures)
    assert not any(f.startswith("Swish") for f in _fails(check_model("g", model, target("11")), "ops"))


def test_data_dependent_shape_ops_are_rejected() -> None:
    model = _model([helper.make_node("NonZero", ["x"], ["y"])], [_vi("x", ["n", 4])],
                   [_vi("y", [2, "k"], TensorProto.INT64)])
    (failure,) = _fails(check_model("g", model, target("11")), "shapes")
    assert "NonZero x1" in failure and "data-dependent" in failure


def _qdq(zero_point: int) -> onnx.ModelProto:
    inits = [numpy_helper.from_array(np.array(0.1, np.float32), "scale"),
             numpy_helper.from_array(np.array(zero_point, np.int8), "zp")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "scale", "zp"], ["q"], name="q0"),
             helper.make_node("DequantizeLinear", ["q", "scale", "zp"], ["y"], name="dq0")]
    return _model(nodes, [_vi("x", ["n", 4])], [_vi("y", ["n", 4])], inits)


def test_nonzero_qdq_zero_points_are_rejected_and_zero_ones_pass() -> None:
    assert not _fails(check_model("g", _qdq(0), target("10.3")), "constants")
    failures = _fails(check_model("g", _qdq(3), target("10.3")), "constants")
    assert len(failures) == 2 and all("zero point 'zp' is not 0 (max |zp| 3)" in f for f in failures)
    assert failures[0].startswith("QuantizeLinear 'q0'") and failures[1].startswith("DequantizeLinear 'dq0'")


def test_axes_that_are_not_constants_are_rejected() -> None:
    starts = numpy_helper.from_array(np.array([0], np.int64), "starts")
    ends = numpy_helper.from_array(np.array([2], np.int64), "ends")
    node = helper.make_node("Slice", ["x", "starts", "ends", "axes"], ["y"], name="s0")
    model = _model([node], [_vi("x", ["n", 4]), _vi("axes", [1], TensorProto.INT64)], [_vi("y", ["n", 2])],
                   [starts, ends])
    (failure,) = _fails(check_model("g", model, target("10.3")), "constants")
    assert failure == "Slice 's0': input 3 ('axes') must be an initializer or Constant"
    unsq = _model([helper.make_node("Unsqueeze", ["x", "ax"], ["y"], name="u0")],
                  [_vi("x", ["n", 4])], [_vi("y", [1, "n", 4])],
                  [numpy_helper.from_array(np.array([0], np.int64), "ax")])
    assert not _fails(check_model("g", unsq, target("10.3")), "constants")


def test_float64_tensors_and_ops_on_types_tensorrt_lacks_are_rejected() -> None:
    model = _model([helper.make_node("Relu", ["x"], ["y"])], [_vi("x", ["n"], TensorProto.DOUBLE)],
                   [_vi("y", ["n"], TensorProto.DOUBLE)])
    failures = _fails(check_model("g", model, target("10.3")), "dtypes")
    assert any(f.startswith("'x' is DOUBLE") for f in failures)
    ints = _model([helper.make_node("MatMul", ["a", "a"], ["y"], name="mm")],
                  [_vi("a", [2, 2], TensorProto.INT64)], [_vi("y", [2, 2], TensorProto.INT64)])
    (failure,) = _fails(check_model("g", ints, target("10.x")), "dtypes")
    assert failure.startswith("MatMul 'mm' on INT64 ('a')")


def test_a_consistent_profile_passes() -> None:
    checks = check_profiles("g", _relu(), _entry({"x": {"min": [1, 4], "opt": [2, 4], "max": [8, 4]}}))
    assert [c.status for c in checks] == ["PASS"] and "n 1..8 (opt 2)" in checks[0].detail


@pytest.mark.parametrize(("profile", "reason"), [
    ({}, "x: dynamic input [n, 4] has no profile"),
    ({"x": {"min": [1, 4], "opt": [2, 4]}}, "x: profile lacks max"),
    ({"x": {"min": [1], "opt": [2], "max": [3]}}, "x: profile ranks min 1 / opt 1 / max 1 do not match"),
    ({"x": {"min": [4, 4], "opt": [2, 4], "max": [8, 4]}}, "x: dim 0 (n) needs 0 <= min <= opt <= max, got 4, 2, 8"),
    ({"x": {"min": [-1, 4], "opt": [2, 4], "max": [8, 4]}}, "x: dim 0 (n) needs 0 <= min <= opt <= max, got -1"),
    ({"x": {"min": [1, 4], "opt": [2, 3], "max": [8, 4]}}, "x: dim 1 is static 4, profile gives 4, 3, 4"),
    ({"x": {"min": [1, 4], "opt": [1, 4], "max": [1, 4]}, "z": {"min": [1], "opt": [1], "max": [1]}},
     "z: profile for a tensor that is not a graph input"),
])
def test_inconsistent_profiles_are_rejected_with_the_reason(profile: dict[str, dict[str, list[int]]],
                                                            reason: str) -> None:
    failures = _fails(check_profiles("g", _relu(), _entry(profile)), "profile")
    assert any(f.startswith(reason) for f in failures), failures


def _decoderish() -> onnx.ModelProto:
    """ids (b, seq), mask (b, past+seq), past (b, 2, past, 4): the symbols of the concat decoder."""
    nodes = [helper.make_node("Identity", ["ids"], ["o1"]), helper.make_node("Identity", ["mask"], ["o2"]),
             helper.make_node("Identity", ["past"], ["o3"])]
    inputs = [_vi("ids", ["b", "seq"], TensorProto.INT64), _vi("mask", ["b", "past+seq"], TensorProto.INT64),
              _vi("past", ["b", 2, "past", 4])]
    outputs = [_vi("o1", ["b", "seq"], TensorProto.INT64), _vi("o2", ["b", "past+seq"], TensorProto.INT64),
               _vi("o3", ["b", 2, "past", 4])]
    return _model(nodes, inputs, outputs)


def _decoder_entry(mask_max: int, past_batch_max: int = 4, past_max: int = 6) -> GraphEntry:
    return GraphEntry(file="d.onnx", inputs=[], outputs=[], profiles={
        "ids": {"min": [1, 1], "opt": [2, 1], "max": [4, 2]},
        "mask": {"min": [1, 1], "opt": [2, 4], "max": [4, mask_max]},
        "past": {"min": [1, 2, 0, 4], "opt": [2, 2, 3, 4], "max": [past_batch_max, 2, past_max, 4]},
    })


def test_shared_symbols_derived_dims_and_position_limits() -> None:
    model = _decoderish()
    ok = check_profiles("g", model, _decoder_entry(8), limits={"past+seq": 8})
    assert [c.status for c in ok] == ["PASS"], ok
    failures = _fails(check_profiles("g", model, _decoder_entry(8, past_batch_max=5)), "profile")
    assert any(f.startswith("b: inputs sharing it have different ranges: (1, 2, 4) on ids, mask; (1, 2, 5) on past")
               for f in failures), failures
    failures = _fails(check_profiles("g", model, _decoder_entry(9)), "profile")
    assert failures == ["mask: derived dim past+seq is (1, 4, 9), its parts give (1, 4, 8) (min, opt, max)"]
    failures = _fails(check_profiles("g", model, _decoder_entry(8), limits={"past+seq": 7}), "profile")
    assert failures == ["max past+seq = 8 exceeds the model's limit 7"]


def test_a_profile_whose_max_cannot_run_is_reported(tmp_path: Path) -> None:
    # Reshape to (2, -1, 4): runs for an even n, fails for the odd max
    shape = numpy_helper.from_array(np.array([2, -1, 4], np.int64), "shape")
    model = _model([helper.make_node("Reshape", ["x", "shape"], ["y"])], [_vi("x", ["n", 4])],
                   [_vi("y", [2, "m", 4])], [shape])
    path = tmp_path / "g.onnx"
    onnx.save(model, str(path))
    entry = _entry({"x": {"min": [2, 4], "opt": [2, 4], "max": [5, 4]}})
    lo, hi = run_corners("g", path, model, entry, ctx=SynthContext())
    assert lo.ok and lo.shapes == "min" and lo.seconds >= 0 and "x [2, 4]" in lo.detail
    assert not hi.ok and hi.shapes == "max" and "onnxruntime failed at the max shapes (x [5, 4])" in hi.detail


def test_report_renders_one_line_per_check_and_json() -> None:
    report = Report("ART", "10.3", "TensorRT 10.3 (JetPack 6)",
                    checks=[Check("decoder", "ops", "FAIL", "com.microsoft::GroupQueryAttention x4: ..."),
                            Check("vision", "opset", "PASS", "opset 17 <= 20")])
    text = report.render()
    assert "  decoder        ops        FAIL  com.microsoft::GroupQueryAttention x4" in text
    assert "FAIL: 1 failed check(s)" in text and "needs a GPU machine" in text
    data = json.loads(report.to_json())
    assert data["ok"] is False and data["checks"][0]["status"] == "FAIL" and data["target"] == "10.3"
    assert Report("ART", "10.3", "x", checks=[Check("v", "opset", "PASS", "")]).ok


def test_cli_rejects_an_unknown_target_and_a_missing_directory(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    from unimp.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["preflight", str(tmp_path), "--tensorrt", "9"])
    assert exc.value.code == 2
    assert main(["preflight", str(tmp_path / "nothing"), "--quiet"]) == 2
    assert "manifest.json not found" in capsys.readouterr().err


def test_node_restrictions_are_checked_on_the_node() -> None:
    scales = numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")

    def resize(**attrs: object) -> onnx.ModelProto:
        node = helper.make_node("Resize", ["x", "", "scales"], ["y"], name="r0", **attrs)
        return _model([node], [_vi("x", [1, 1, 2, 2])], [_vi("y", [1, 1, 4, 4])], [scales], opset=19)

    assert not _fails(check_model("g", resize(mode="linear"), target("10.3")), "constants")
    (failure,) = _fails(check_model("g", resize(mode="cubic", antialias=1), target("10.3")), "constants")
    assert failure == "Resize 'r0': antialias is not supported; mode 'cubic' (only nearest, linear)"
    ln = helper.make_node("LayerNormalization", ["x", "w"], ["y", "mean"], name="ln0")
    model = _model([ln], [_vi("x", [2, 4])], [_vi("y", [2, 4]), _vi("mean", [2, 1])],
                   [numpy_helper.from_array(np.ones(4, np.float32), "w")])
    (failure,) = _fails(check_model("g", model, target("10.3")), "constants")
    assert failure == "LayerNormalization 'ln0': only the first output (Y) is supported"


def test_cpu_dynamic_quantization_is_rejected_with_the_qdq_fix() -> None:
    nodes = [helper.make_node("DynamicQuantizeLinear", ["x"], ["q", "s", "zp"]),
             helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["y"])]
    model = _model(nodes, [_vi("x", ["n", 4])], [_vi("y", ["n", 4])])
    checks = check_model("g", model, target("10.3"))
    (op,) = _fails(checks, "ops")
    assert op.startswith("DynamicQuantizeLinear x1: not supported") and "quantize with --format qdq" in op
    types = _fails(checks, "dtypes")
    assert any("2 tensors inside the graph are UINT8 ('q', 'zp'): TensorRT takes UINT8 only as a network" in f
               for f in types), types
    assert any(f.startswith("DequantizeLinear") and "on UINT8" in f for f in types)
    assert _fails(checks, "constants") == ["DequantizeLinear 'y': zero point 'zp' must be a constant 0"]


def test_cli_choices_and_readme_match_the_targets() -> None:
    from unimp.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    parser = sub.choices["preflight"]  # type: ignore[attr-defined]
    option = next(a for a in parser._actions if a.dest == "tensorrt")
    assert list(option.choices) == list(TARGETS) and option.default == "10.3"
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Preflight", 1)[1].split("\n## ", 1)[0]
    for name, t in TARGETS.items():
        assert f"{t.max_opset} for `{name}`" in section
        assert f"max opset {t.max_opset}" in option.help
    assert "`unimp preflight ART [--tensorrt 10.3\\|10.x\\|11] [--no-run] [--json]`" in readme
