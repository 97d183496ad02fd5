"""``unimp build-engines`` on a fake TensorRT: strongly typed networks from the ONNX graphs, the manifest's
profiles, the timing cache, manifest engine entries that serve then opens, and its errors."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from export.engines import BuildConfig, BuildError, build_engines, build_plan
from runtime.backends import BackendConfig, open_session
from runtime.backends.cuda import probe
from runtime.backends.engines import check_engines, engine_key, engine_profiles
from runtime.backends.tensorrt import TensorRTSession
from runtime.manifest import load_manifest
from tests.fakes import cudart as fake_cudart
from tests.fakes import tensorrt as fake_trt
from unimp.cli import main


@pytest.fixture
def art(tiny_artifacts: Path, tmp_path: Path) -> Path:
    root = tmp_path / "art"
    shutil.copytree(tiny_artifacts, root, ignore=shutil.ignore_patterns(".ort-cache", "checkpoint"))
    return root


def test_builds_and_records_engines(art: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    cudart = fake_cudart.install(monkeypatch)
    trt = fake_trt.install(monkeypatch, cudart)
    cache = art / "tc.bin"
    cache.write_bytes(b"old")
    rc = main(["build-engines", str(art), "--graphs", "vision,decoder", "--workspace-gb", "1.5", "--opt-level", "2",
               "--timing-cache", str(cache), "--quiet"])
    assert rc == 0, capsys.readouterr().err
    m = load_manifest(art)
    assert set(m.engines) == {"vision", "decoder"}
    gpu = probe()
    for graph, entry in m.engines.items():
        assert entry.key == engine_key(graph, m.graphs[graph], gpu, trt.__version__)
        assert (art / entry.file).is_file() and entry.file == f"engines/{graph}.engine"
    assert m.engines["decoder"].profiles == ["prefill", "decode"] and m.engines["vision"].profiles == ["default"]
    plans = list(trt.plans.values())
    for plan in plans:
        assert plan.build["flags"] == 1 << int(fake_trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
        assert plan.build["pools"] == {fake_trt.MemoryPoolType.WORKSPACE: int(1.5 * (1 << 30))}
        assert plan.build["level"] == 2 and plan.build["flags_set"] == []  # no weak-typing precision flags
    decoder_plan = plans[1]
    prefill, _ = engine_profiles("decoder", m.graphs["decoder"])
    ids = m.names.input_ids
    assert decoder_plan.profiles[0][ids] == tuple(tuple(prefill.shapes[ids][k]) for k in ("min", "opt", "max"))
    assert decoder_plan.profiles[1][ids][2][1] == 1  # decode: one token
    dynamic = {t.name for t in decoder_plan.tensors if t.mode == fake_trt.TensorIOMode.INPUT and -1 in t.shape}
    assert dynamic <= set(decoder_plan.profiles[1])  # every dynamic input has a range in every profile
    assert cache.read_bytes() == b"old+tuned+tuned"  # loaded and saved per engine
    assert "recorded 2 engine(s)" in capsys.readouterr().out
    assert all(c.ok for c in check_engines(m, art))
    # serve's factory now opens the decoder engine, with past and present aliased (inplace layout)
    session = open_session(art / m.graphs["decoder"].file, BackendConfig(provider="tensorrt"))
    assert isinstance(session, TensorRTSession) and session.profile_names == ["prefill", "decode"]
    if m.decoder.kv_layout == "inplace":
        assert session._aliases[m.names.present_key.format(layer=0)] == m.names.past_key.format(layer=0)
    out = session.run(_decoder_feeds(m, session), [m.names.logits])
    assert out[m.names.logits].shape == (1, m.decoder.vocab_size)


def _decoder_feeds(m, session: TensorRTSession) -> dict[str, np.ndarray]:  # type: ignore[no-untyped-def]
    engine = sys.modules["tensorrt"].engines[-1]  # type: ignore[attr-defined]
    feeds = {}
    for t in engine.inputs:
        lo = engine.get_tensor_profile_shape(t.name, 1)[0] if -1 in t.shape else t.shape
        feeds[t.name] = np.zeros(lo, fake_trt.nptype(t.dtype))
    return feeds


class _Bar:
    def __init__(self) -> None:
        self.postfixes: list[str] = []

    def set_postfix_str(self, text: str, refresh: bool = True) -> None:
        self.postfixes.append(text)


def test_progress_monitor_shows_tensorrt_phases(art: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # TensorRT calls phase_start(phase_name, parent_phase, num_steps); a nested phase has its parent second
    cudart = fake_cudart.install(monkeypatch)
    trt = fake_trt.install(monkeypatch, cudart)
    m = load_manifest(art)
    bar = _Bar()
    build_plan(trt, art / m.graphs["vision"].file, engine_profiles("vision", m.graphs["vision"]), BuildConfig(),
               tmp_path / "tc.bin", graph="vision", bar=bar)
    assert bar.postfixes == ["Building engine", "Building engine 1/2", "Tactic selection", "Tactic selection 1/3",
                             "Tactic selection 2/3", "Tactic selection 3/3", "Building engine 2/2"]


def test_precision_selects_graphs(art: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_trt.install(monkeypatch, fake_cudart.install(monkeypatch))
    with pytest.raises(BuildError, match=r"^--precision: no graph of this artifacts directory is fp16"):
        build_engines(art, BuildConfig(precision="fp16", progress=False))
    with pytest.raises(BuildError, match=r"^--precision: int8 was asked for but vision is fp32"):
        build_engines(art, BuildConfig(precision="int8", graphs=("vision",), progress=False))
    with pytest.raises(BuildError, match=r"^--graphs: 'unet' is not a graph"):
        build_engines(art, BuildConfig(graphs=("unet",), progress=False))
    with pytest.raises(BuildError, match=r"^--opt-level: must be 0..5"):
        build_engines(art, BuildConfig(opt_level=7))


def test_parser_rejection_names_the_graph(art: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_trt.install(monkeypatch, fake_cudart.install(monkeypatch))
    fake_trt.OnnxParser.reject = "In node 3 (importTensorScatter): UNSUPPORTED_NODE"
    with pytest.raises(BuildError, match=r"^graphs\.vision \(vision\.onnx\): TensorRT 10\.8\.0\.43's ONNX parser "
                                         r"rejected it: In node 3"):
        build_engines(art, BuildConfig(graphs=("vision",), progress=False))
    assert load_manifest(art).engines == {}


def test_without_tensorrt_fails_at_once(art: Path, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # type: ignore[arg-type]
    assert main(["build-engines", str(art), "--quiet"]) == 1
    assert "the tensorrt package is not installed" in capsys.readouterr().err
    import types

    monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))  # an installed stub package
    assert main(["build-engines", str(art), "--quiet"]) == 1
    assert "not TensorRT (no tensorrt.Builder)" in capsys.readouterr().err


def test_docs_agree_with_the_help() -> None:
    import argparse

    from unimp.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    parser = sub.choices["build-engines"]
    flags = [o for a in parser._actions for o in a.option_strings if o.startswith("--") and o not in ("--help", "--quiet")]
    root = Path(__file__).resolve().parents[2]
    doc = (root / "docs" / "tensorrt.md").read_text(encoding="utf-8")
    readme = (root / "README.md").read_text(encoding="utf-8")
    row = next(line for line in readme.splitlines() if line.startswith("| `unimp build-engines"))
    assert len(flags) == 6
    for flag in flags:
        assert f"{flag}" in doc, flag
        assert f"[{flag}" in row, flag
    assert f"`--workspace-gb` (default {parser.get_default('workspace_gb'):g})" in doc
    assert f"{parser.get_default('opt_level')} is TensorRT's default" in doc
