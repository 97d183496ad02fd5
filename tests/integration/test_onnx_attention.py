"""The ``inplace`` decoder in standard ONNX ops (``unimp export --attention onnx``): the graph itself.

The standard-op graph must hold only default-domain ops at opset 24, keep GQA's eager semantics, and
update the bound KV buffer in place. That it generates GQA's and concat's tokens (greedy and beam), their
logits within a scaled tolerance, and copies nothing per step in the runtime's pool is checked with the
other decoder forms in ``test_kv_layouts.py``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from export.modeling.static_cache import GroupQueryAttention, standard_attention
from runtime.engine import Runtime
from runtime.manifest import load_manifest
from tests.integration.layouts import FormRuntimes

COPY_WARNING = "in-place optimization not activated"


@pytest.fixture(scope="module")
def onnx_rt(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runtime]:
    opened = FormRuntimes(request, tmp_path_factory)
    yield opened("onnx")
    opened.close()


def test_standard_attention_equals_gqa_semantics_on_ragged_rows() -> None:
    """Eager forms, no export: right-padded first prompts of different lengths and decode steps at
    different past lengths give GQA's outputs (zeros at padded queries) and its K/V at every real position."""
    g = torch.Generator().manual_seed(0)
    heads, hd, cap = 2, 8, 12
    inv = 1.0 / (10000 ** (torch.arange(0, 4, 2, dtype=torch.float32) / 4))
    pos = torch.arange(32, dtype=torch.float32)[:, None] * inv[None]
    cos, sin = pos.cos(), pos.sin()
    for s, lengths, first in ((5, [5, 3, 1], True), (1, [7, 4, 9], False), (3, [6, 3, 10], False)):
        b = len(lengths)
        q, k, v = (torch.randn(b, s, heads * hd, generator=g) for _ in range(3))
        past_k, past_v = torch.randn(b, heads, cap, hd, generator=g), torch.randn(b, heads, cap, hd, generator=g)
        seqlens = torch.tensor([x - 1 for x in lengths], dtype=torch.int32)
        total = torch.tensor(s if first else max(lengths), dtype=torch.int32)
        want = GroupQueryAttention.apply(q, k, v, past_k, past_v, seqlens, total, cos, sin, heads)
        got = standard_attention(q, k, v, past_k, past_v, seqlens, total, cos, sin, heads)
        torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
        for row, length in enumerate(lengths):  # written positions beyond a row's length are unspecified
            torch.testing.assert_close(got[1][row, :, :length], want[1][row, :, :length], rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(got[2][row, :, :length], want[2][row, :, :length], rtol=1e-6, atol=1e-6)
        if first:
            assert torch.all(got[0][2, 1:] == 0) and torch.any(got[0][2, 0] != 0)


def test_graph_is_default_domain_opset_24(tiny_onnx_attention_artifacts: Path, tiny_artifacts: Path) -> None:
    m = load_manifest(tiny_onnx_attention_artifacts)
    assert m.decoder.kv_layout == "inplace" and m.decoder.attention == "onnx" and m.graphs["decoder"].opset == 24
    gqa_entry = load_manifest(tiny_artifacts).graphs["decoder"]
    assert [s.name for s in m.graphs["decoder"].inputs] == [s.name for s in gqa_entry.inputs]  # the same contract
    assert [s.shape for s in m.graphs["decoder"].outputs] == [s.shape for s in gqa_entry.outputs]
    model = onnx.load(str(tiny_onnx_attention_artifacts / "decoder.onnx"))
    assert [(o.domain, o.version) for o in model.opset_import] == [("", 24)]
    assert {n.domain for n in model.graph.node} == {""}
    scatters = [n for n in model.graph.node if n.op_type == "TensorScatter"]
    assert len(scatters) == 2 * m.decoder.num_layers
    for node in scatters:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs == {"axis": 2, "mode": b"linear"}
    assert not any(n.op_type in ("GroupQueryAttention", "Attention") for n in model.graph.node)
    outputs = {o for n in scatters for o in n.output}
    assert {f"present_{kv}.{i}" for kv in ("key", "value") for i in range(m.decoder.num_layers)} <= outputs
    gqa = onnx.load(str(tiny_artifacts / "decoder.onnx"))  # the walk tells the two forms apart
    assert any(n.domain == "com.microsoft" and n.op_type == "GroupQueryAttention" for n in gqa.graph.node)
    report = m.source["validation"]["decoder"]
    assert report["cases"] == 4 and report["max_abs_error"] < 1e-4


def _decode_feeds(m, batch: int, capacity: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:  # type: ignore[no-untyped-def]
    """Host feeds of one decode step (rows at lengths 5, 3, ...) and one KV buffer per past/present pair."""
    d, n = m.decoder, m.names
    lengths = np.array([5 - 2 * (r % 2) for r in range(batch)]) + 1
    feeds: dict[str, np.ndarray] = {
        n.input_ids: np.arange(1, batch + 1, dtype=np.int64)[:, None],
        n.seqlens_k: (lengths - 1).astype(np.int32),
        n.total_sequence_length: np.array(lengths.max(), np.int32),
        n.text_time: np.zeros((batch, 1), np.int64),
        n.logits_index: np.zeros(batch, np.int64),
    }
    rng = np.random.default_rng(0)
    for j in range(len(d.xattn_layers)):
        for tmpl in (n.xattn_key, n.xattn_value):
            feeds[tmpl.format(block=j)] = rng.standard_normal(
                (batch, d.xattn_heads, m.vision.num_latents, d.xattn_head_dim)).astype(np.float32)
    buffers = {tmpl.format(layer=i): rng.standard_normal((batch, d.num_heads, capacity, d.head_dim)).astype(np.float32)
               for i in range(d.num_layers) for tmpl in (n.past_key, n.past_value)}
    return feeds, buffers


def test_bound_cache_is_updated_in_place_without_a_copy(onnx_rt: Runtime, tiny_onnx_attention_artifacts: Path,
                                                        capfd: pytest.CaptureFixture[str]) -> None:
    """The served (ORT-optimised) graph with past and present bound to one buffer: present's address is the
    buffer's, the new token lands at each row's position, nothing else changes, and onnxruntime does not
    warn that it copied; run unbound, the same graph does warn (so the check can fail)."""
    m = onnx_rt.manifest
    served = sorted((tiny_onnx_attention_artifacts / ".ort-cache").glob("decoder.*.cpu.*.onnx"))
    assert served, "the runtime did not write its optimised decoder"
    options = ort.SessionOptions()
    options.log_severity_level = 2  # warnings on (the runtime itself logs errors only)
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(served[0]), sess_options=options, providers=["CPUExecutionProvider"])
    feeds, buffers = _decode_feeds(m, batch=3, capacity=16)
    before = {k: v.copy() for k, v in buffers.items()}
    lengths = feeds[m.names.seqlens_k].astype(np.int64) + 1
    io = session.io_binding()
    io.bind_output(m.names.logits, "cpu")
    presents = []
    for i in range(m.decoder.num_layers):
        for past, present in ((m.names.past_key, m.names.present_key), (m.names.past_value, m.names.present_value)):
            buf = buffers[past.format(layer=i)]
            io.bind_input(past.format(layer=i), "cpu", 0, np.float32, list(buf.shape), buf.ctypes.data)
            io.bind_output(present.format(layer=i), "cpu", 0, np.float32, list(buf.shape), buf.ctypes.data)
            presents.append(buf)
    for name, value in feeds.items():
        io.bind_cpu_input(name, value)
    capfd.readouterr()
    session.run_with_iobinding(io)
    bound_err = capfd.readouterr().err
    outputs = io.get_outputs()
    assert [o.data_ptr() for o in outputs[1:]] == [b.ctypes.data for b in presents]
    for name, buf in buffers.items():
        for row, length in enumerate(lengths):
            np.testing.assert_array_equal(buf[row, :, : length - 1], before[name][row, :, : length - 1])
            np.testing.assert_array_equal(buf[row, :, length:], before[name][row, :, length:])
            assert np.all(buf[row, :, length - 1] != before[name][row, :, length - 1])
    assert COPY_WARNING not in bound_err

    session.run(None, {**feeds, **before})
    assert COPY_WARNING in capfd.readouterr().err


def test_onnx_attention_needs_the_inplace_layout(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from export.specs import check_decoder_form
    from unimp.cli import main

    assert main(["export", "--demo", "tiny", "--out", str(tmp_path / "x"), "--kv-layout", "concat",
                 "--attention", "onnx", "--quiet"]) == 2
    assert capsys.readouterr().err.startswith("error: --attention: onnx needs --kv-layout inplace")
    assert not (tmp_path / "x").exists()  # refused before building anything
    with pytest.raises(ValueError, match="needs the inplace KV layout"):
        check_decoder_form("concat", "onnx")
    with pytest.raises(ValueError, match="attention must be one of"):
        check_decoder_form("inplace", "flash")
    check_decoder_form("inplace", "onnx")
    check_decoder_form("concat", "gqa")


def test_rewrite_refuses_a_graph_without_placeholders(tiny_artifacts: Path, tmp_path: Path) -> None:
    from export.modeling.static_cache import to_tensor_scatter

    copy = tmp_path / "decoder.onnx"
    copy.write_bytes((tiny_artifacts / "decoder.onnx").read_bytes())  # the GQA form: nothing to rewrite
    with pytest.raises(ValueError, match="TensorScatter placeholders"):
        to_tensor_scatter(copy)


def test_preflight_passes_for_tensorrt_10_x_and_rejects_10_3(tiny_onnx_attention_artifacts: Path) -> None:
    """The standard-op decoder is what `unimp preflight --tensorrt 10.x` accepts (onnxruntime runs it at the
    profile's min and max shapes, total_sequence_length 0-d); TensorRT 10.3 has no TensorScatter."""
    from export.preflight import preflight

    report = preflight(tiny_onnx_attention_artifacts, "10.x")
    assert report.ok, report.render()
    decoder_runs = [r for r in report.runs if r.graph == "decoder"]
    assert {r.shapes for r in decoder_runs} == {"min", "max"} and all(r.ok for r in decoder_runs)
    old = preflight(tiny_onnx_attention_artifacts, "10.3", run=False)
    failed = {(c.graph, c.check) for c in old.checks if c.status == "FAIL"}
    assert ("decoder", "ops") in failed and ("decoder", "opset") in failed
