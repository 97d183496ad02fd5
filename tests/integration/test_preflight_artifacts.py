"""`unimp preflight` on the tiny demo exports: the concat layout is TensorRT-ready, the default inplace (GQA)
layout is rejected with the fix named."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from export.preflight import SynthContext, preflight, synthesize
from runtime.manifest import load_manifest
from unimp.cli import main


def test_tiny_concat_passes_for_tensorrt_10_3_with_runs_at_min_and_max(tiny_concat_artifacts: Path) -> None:
    report = preflight(tiny_concat_artifacts, "10.3")
    assert report.ok, report.render()
    graphs = set(load_manifest(tiny_concat_artifacts, verify=False).graphs)
    assert {(r.graph, r.shapes) for r in report.runs} == {(g, c) for g in graphs for c in ("min", "max")}
    assert all(r.ok and r.seconds > 0 for r in report.runs)
    assert {c.graph for c in report.checks if c.check == "profile" and c.status == "PASS"} == graphs


def test_tiny_concat_passes_for_tensorrt_10_x(tiny_concat_artifacts: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["preflight", str(tiny_concat_artifacts), "--tensorrt", "10.x", "--no-run", "--json", "--quiet"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["ok"] is True and data["target"] == "10.x" and data["runs"] == []
    assert all(c["status"] != "FAIL" for c in data["checks"])


def test_concat_decoder_profile_stays_within_the_positions(tiny_concat_artifacts: Path) -> None:
    m = load_manifest(tiny_concat_artifacts, verify=False)
    prof = m.graphs["decoder"].profiles
    seq_max = prof[m.names.input_ids]["max"][1]
    past_max = prof[m.names.past_key.format(layer=0)]["max"][2]
    assert seq_max + past_max == prof[m.names.attention_mask]["max"][1] == m.decoder.max_positions
    # synthesised max inputs are consistent: positions continue the past, image indices within the images
    model = onnx.load(str(tiny_concat_artifacts / m.graphs["decoder"].file), load_external_data=False)
    feeds = synthesize(model, m.graphs["decoder"], "max", SynthContext(m.names, m.decoder.vocab_size,
                                                                        m.vision.num_latents))
    pos = feeds[m.names.position_ids]
    assert pos[0, 0] == past_max and pos[0, -1] == past_max + seq_max - 1
    images = feeds[m.names.xattn_key.format(block=0)].shape[2] // m.vision.num_latents
    assert feeds[m.names.text_time].max() <= images and 0 <= feeds[m.names.input_ids].min()
    assert feeds[m.names.input_ids].max() < m.decoder.vocab_size
    assert np.all(feeds[m.names.attention_mask] == 1)


def test_default_inplace_export_is_rejected_with_the_fix(tiny_artifacts: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    for tensorrt in ("10.3", "10.x"):
        assert main(["preflight", str(tiny_artifacts), "--tensorrt", tensorrt, "--no-run", "--quiet"]) == 1
        out = capsys.readouterr().out
        lines = [ln for ln in out.splitlines() if " FAIL " in ln]
        assert len(lines) == 1, out
        assert lines[0].split()[:3] == ["decoder", "ops", "FAIL"]
        assert "com.microsoft::GroupQueryAttention" in lines[0]
        assert "--kv-layout concat (TensorRT 10.3) or --attention onnx (TensorRT >= 10.15)" in lines[0]
