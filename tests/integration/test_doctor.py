"""`unimp doctor` on this CPU-only machine: what it finds, what it refuses, and the --bench report."""

from __future__ import annotations

import json
import shutil
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import pytest

from runtime import doctor
from unimp.cli import main


def test_this_machine_runs_cpu_only_and_says_why_not_gpu() -> None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.fail("this test describes a CPU-only machine: onnxruntime here has the CUDA provider")
    report = doctor.diagnose()
    assert report.path("cpu").available and report.path("cpu").reason == ""
    for name in ("ort-cuda", "ort-tensorrt"):
        status = report.path(name)
        assert not status.available and "onnxruntime-gpu" in status.reason and "ExecutionProvider" in status.reason
    assert not report.gpu["available"] and report.gpu["reason"]
    assert not report.tensorrt["available"] and "tensorrt" in report.tensorrt["reason"]
    native = report.path("tensorrt")
    assert not native.available and native.reason.startswith("TensorRT: ")
    assert report.onnxruntime["version"] == ort.__version__
    assert "CPUExecutionProvider" in report.onnxruntime["providers"]
    assert report.machine.get("python")


def test_both_onnxruntime_distributions_are_a_problem(monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    versions = {"onnxruntime": "1.32.0", "onnxruntime-gpu": "1.24.4"}
    monkeypatch.setattr(doctor, "_version", lambda dist: versions.get(dist))
    info, problems = doctor.check_onnxruntime()
    assert info["distributions"] == versions
    assert len(problems) == 1 and "onnxruntime 1.32.0 and onnxruntime-gpu 1.24.4" in problems[0]
    assert "pip install onnxruntime-gpu" in problems[0]
    assert main(["doctor"]) == 1
    assert "problem: onnxruntime: both" in capsys.readouterr().out


def test_a_stub_tensorrt_is_not_tensorrt(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))
    info = doctor.check_tensorrt()
    assert not info["available"] and "no tensorrt.Builder" in info["reason"]
    real = types.ModuleType("tensorrt")
    real.Builder = object  # type: ignore[attr-defined]
    real.__version__ = "10.3.0"  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "tensorrt", real)
    info = doctor.check_tensorrt()
    assert info["available"] and info["version"] == "10.3.0"


@dataclass(frozen=True)
class _Check:
    graph: str
    ok: bool
    reason: str
    rebuild: str


def test_engine_mismatch_names_the_rebuild(tiny_artifacts: Path, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    art = tmp_path / "art"
    art.mkdir()
    data = json.loads((tiny_artifacts / "manifest.json").read_text())
    key = {"tensorrt_version": "10.3.0", "gpu_name": "Orin", "compute_capability": "8.7", "precision": "fp16",
           "profile_hash": "0" * 64, "graph_sha256": "0" * 64}
    data["engines"] = {g: {"file": f"engines/{g}.engine", "sha256": "", "key": key, "profiles": []}
                       for g in ("decoder", "vision")}
    (art / "manifest.json").write_text(json.dumps(data))
    fake = types.ModuleType("runtime.backends.engines")
    fake.check_engines = lambda manifest, root: [  # type: ignore[attr-defined]
        _Check("decoder", False, "built for TensorRT 10.3 on Orin, this is 10.8 on NVIDIA L4",
               f"unimp build-engines {root}"),
        _Check("vision", True, "", ""),
    ]
    monkeypatch.setitem(sys.modules, "runtime.backends.engines", fake)
    monkeypatch.setattr(doctor, "check_gpu", lambda device_id=0: {"available": True, "name": "NVIDIA L4",
                                                                   "compute_capability": [8, 9]})
    monkeypatch.setattr(doctor, "check_tensorrt", lambda: {"available": True, "version": "10.8.0"})
    monkeypatch.setattr(doctor, "check_onnxruntime", lambda: ({"distributions": {"onnxruntime-gpu": "1.24.4"},
                                                               "version": "1.24.4", "providers": [
                                                                   "TensorrtExecutionProvider",
                                                                   "CUDAExecutionProvider",
                                                                   "CPUExecutionProvider"]}, []))
    report = doctor.diagnose(art)
    assert report.engines["checked"] and not report.engines["ok"]
    native = report.path("tensorrt")
    assert not native.available and "10.3 on Orin" in native.reason and f"unimp build-engines {art}" in native.reason
    assert any(p.startswith("engine decoder: built for TensorRT 10.3") for p in report.problems)
    assert report.path("ort-cuda").available
    # provider tensorrt would run the engines, so the execution provider is not timed on these artifacts
    ep = report.path("ort-tensorrt")
    assert not ep.available and "natively" in ep.reason


def test_doctor_bench_times_cpu_and_lists_the_rest(tiny_artifacts: Path, tmp_path: Path) -> None:
    art = tmp_path / "art"
    shutil.copytree(tiny_artifacts, art, ignore=shutil.ignore_patterns(".cache"))
    out = tmp_path / "report"
    rc = main(["doctor", "--artifacts", str(art), "--bench", "--repeats", "1", "--prompt-tokens", "16",
               "--threads", "1", "--out", str(out)])
    assert rc == 0
    data = json.loads((out / "doctor.json").read_text())
    paths = {p["name"]: p for p in data["paths"]}
    cpu = paths["cpu"]["bench"]
    assert cpu["repeats"] == 1 and cpu["prompt_tokens"] == 16
    for key in ("vision_ms_per_image_b1", "prefill_tokens_per_s", "decode_ms_per_step_b1", "decode_ms_per_step_b8",
                "decode_tokens_per_s_b8"):
        assert cpu[key] > 0, key
    assert cpu["decode_tokens_per_s_b8"] == pytest.approx(8e3 / cpu["decode_ms_per_step_b8"], rel=1e-9)
    assert cpu["providers"] == ["CPUExecutionProvider"]
    for name in ("ort-cuda", "ort-tensorrt", "tensorrt"):
        assert not paths[name]["available"] and paths[name]["reason"] and not paths[name]["bench"]
    assert data["machine"]["python"] and data["artifacts"] == str(art)
    md = (out / "doctor.md").read_text()
    assert "| cpu | yes |" in md and "| ort-cuda | no: " in md and "| tensorrt | no: TensorRT: " in md


def test_bench_needs_artifacts(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["doctor", "--bench"]) == 2
    assert capsys.readouterr().err.startswith("error: --bench: needs --artifacts")
