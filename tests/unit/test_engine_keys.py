"""TensorRT engine profiles, cache keys, manifest engine entries and check_engines (no GPU needed)."""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import asdict, replace
from pathlib import Path

import pytest

from runtime.backends import engines
from runtime.backends.cuda import GpuInfo
from runtime.manifest import EngineEntry, GraphEntry, Manifest, TensorSpec, load_manifest, sha256_file
from tests.fakes import cudart as fake_cudart

ORIN = GpuInfo(0, "Orin", (8, 7), 7 << 30, True, 12060, 12060)
L4 = GpuInfo(0, "NVIDIA L4", (8, 9), 23 << 30, False, 12080, 12080)


def _inplace_decoder() -> GraphEntry:
    kv = ["batch", 2, "capacity", 4]
    inputs = [TensorSpec("input_ids", "int64", ["batch", "seq"]), TensorSpec("seqlens_k", "int32", ["batch"]),
              TensorSpec("total_sequence_length", "int32", []), TensorSpec("past_key.0", "float32", kv)]
    profiles = {"input_ids": {"min": [1, 1], "opt": [4, 1], "max": [16, 512]},
                "past_key.0": {"min": [1, 2, 2, 4], "opt": [4, 2, 512, 4], "max": [16, 2, 513, 4]}}
    return GraphEntry("decoder.onnx", inputs, [TensorSpec("logits", "float32", ["batch", 9])], sha256="ab" * 32,
                      profiles=profiles)


def test_decoder_gets_prefill_and_decode_profiles() -> None:
    prefill, decode = engines.engine_profiles("decoder", _inplace_decoder())
    assert (prefill.name, decode.name) == ("prefill", "decode")
    assert prefill.shapes["input_ids"] == {"min": [1, 1], "opt": [4, 128], "max": [16, 512]}
    assert decode.shapes["input_ids"] == {"min": [1, 1], "opt": [4, 1], "max": [16, 1]}
    # an input without a manifest profile takes the ranges of the dims it shares; static inputs get none
    assert decode.shapes["seqlens_k"] == {"min": [1], "opt": [4], "max": [16]}
    assert "total_sequence_length" not in decode.shapes
    assert decode.shapes["past_key.0"] == prefill.shapes["past_key.0"]


def test_composite_dims_and_single_profile_graphs() -> None:
    entry = GraphEntry("d.onnx", [TensorSpec("input_ids", "int64", ["batch", "seq"]),
                                  TensorSpec("past", "float32", ["batch", "past"]),
                                  TensorSpec("attention_mask", "int64", ["batch", "past+seq"])], [],
                       profiles={"input_ids": {"min": [1, 1], "opt": [2, 1], "max": [4, 64]},
                                 "past": {"min": [1, 0], "opt": [2, 10], "max": [4, 64]}})
    (_, decode) = engines.engine_profiles("decoder", entry)
    assert decode.shapes["attention_mask"] == {"min": [1, 1], "opt": [2, 11], "max": [4, 128]}
    # a decode step's past takes the positions the prompt range left: past + 1 new token reaches the mask's max
    assert decode.shapes["past"] == {"min": [1, 0], "opt": [2, 10], "max": [4, 127]}
    assert decode.shapes["input_ids"] == {"min": [1, 1], "opt": [2, 1], "max": [4, 1]}
    vision = GraphEntry("v.onnx", [TensorSpec("pixel_values", "float32", ["images", 3, 8, 8])], [],
                        profiles={"pixel_values": {"min": [1, 3, 8, 8], "opt": [2, 3, 8, 8], "max": [8, 3, 8, 8]}})
    assert [p.name for p in engines.engine_profiles("vision", vision)] == ["default"]
    bad = GraphEntry("b.onnx", [TensorSpec("x", "float32", ["n"])], [])
    with pytest.raises(ValueError, match=r"^graphs\.vision\.inputs\.x: no profile range for the symbolic dim 'n'"):
        engines.engine_profiles("vision", bad)


def test_key_changes_with_what_invalidates_an_engine() -> None:
    entry = _inplace_decoder()
    key = engines.engine_key("decoder", entry, ORIN, "10.3.0.30")
    assert (key.gpu_name, key.compute_capability, key.precision, key.graph_sha256) == ("Orin", "8.7", "fp32", "ab" * 32)
    assert engines.engine_key("decoder", entry, ORIN, "10.3.0.30") == key
    wider = replace(entry, profiles={**entry.profiles, "input_ids": {"min": [1, 1], "opt": [4, 1], "max": [16, 1024]}})
    assert engines.engine_key("decoder", wider, ORIN, "10.3.0.30").profile_hash != key.profile_hash
    diffs = engines.key_differences(key, engines.engine_key("decoder", replace(entry, sha256="cd" * 32), L4, "10.8.0.43"))
    assert diffs[0] == "built for TensorRT 10.3.0.30 on Orin (sm 8.7), this is TensorRT 10.8.0.43 on NVIDIA L4 (sm 8.9)"
    assert "ONNX graph changed" in diffs[1] and len(diffs) == 2
    assert engines.key_differences(key, key) == []


def _with_engine(tiny: Path, tmp_path: Path, key: engines.EngineKey, content: bytes = b"plan") -> Path:
    root = tmp_path / "art"
    root.mkdir()
    shutil.copy(tiny / "manifest.json", root / "manifest.json")
    (root / "vision.engine").write_bytes(content)
    data = json.loads((root / "manifest.json").read_text())
    entry = EngineEntry("vision.engine", sha256_file(root / "vision.engine"), key, ["default"])
    data["engines"] = {"vision": asdict(entry)}
    (root / "manifest.json").write_text(json.dumps(data))
    return root


def test_manifest_engine_entries_round_trip_and_old_manifests_load(tiny_artifacts: Path, tmp_path: Path) -> None:
    old = load_manifest(tiny_artifacts, verify=False)
    assert old.engines == {}  # a manifest written before engines existed
    key = engines.engine_key("vision", old.graphs["vision"], ORIN, "10.3.0.30")
    root = _with_engine(tiny_artifacts, tmp_path, key)
    m = load_manifest(root, verify=False)
    assert m.engines["vision"].key == key and m.engines["vision"].profiles == ["default"]
    assert Manifest.from_dict(json.loads(m.to_json())).engines == m.engines


def test_check_engines(tiny_artifacts: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    m0 = load_manifest(tiny_artifacts, verify=False)
    key = engines.engine_key("vision", m0.graphs["vision"], ORIN, "10.3.0.30")
    root = _with_engine(tiny_artifacts, tmp_path, key)
    m = load_manifest(root, verify=False)
    [ok] = engines.check_engines(m, root, gpu=ORIN, tensorrt_version="10.3.0.30")
    assert ok.ok and ok.reason == "" and ok.rebuild == f"unimp build-engines {root} --graphs vision"
    [bad] = engines.check_engines(m, root, gpu=L4, tensorrt_version="10.8.0.43")
    assert not bad.ok and "built for TensorRT 10.3.0.30 on Orin (sm 8.7), this is TensorRT 10.8.0.43 on NVIDIA L4" in bad.reason
    (root / "vision.engine").write_bytes(b"other")
    [mod] = engines.check_engines(m, root, gpu=ORIN, tensorrt_version="10.3.0.30")
    assert not mod.ok and "does not match its sha256" in mod.reason
    (root / "vision.engine").unlink()
    [gone] = engines.check_engines(m, root, gpu=ORIN, tensorrt_version="10.3.0.30")
    assert not gone.ok and "missing" in gone.reason
    # this machine: no NVIDIA driver
    fake_cudart.install(monkeypatch, fake_cudart.FakeCudart(error=fake_cudart.cudaError_t.cudaErrorInsufficientDriver))
    [nogpu] = engines.check_engines(m, root)
    assert not nogpu.ok and "cudaErrorInsufficientDriver" in nogpu.reason and "driver" in nogpu.reason
    fake_cudart.install(monkeypatch)
    import sys

    monkeypatch.setitem(sys.modules, "tensorrt", None)  # type: ignore[arg-type]
    [notrt] = engines.check_engines(m, root)
    assert not notrt.ok and "tensorrt package is not installed" in notrt.reason


def test_native_engines_need_tensorrt_not_onnxruntime_gpu(tiny_artifacts: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Engines for every graph: the startup check asks for TensorRT (not the ORT TensorRT EP); a graph left
    to onnxruntime keeps the execution-provider check."""
    import dataclasses

    from runtime.backends.base import BackendConfig
    from runtime.backends.factory import require_backend, uses_native_engines
    from runtime.manifest import EngineEntry, load_manifest
    from runtime.types import Unavailable

    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` raises ImportError
    manifest = load_manifest(tiny_artifacts, verify=False)
    key = engines.EngineKey("10.8.0", "NVIDIA L4", "8.9", "fp32", "p", "g")
    every = dataclasses.replace(manifest, engines={g: EngineEntry(f"engines/{g}.plan", "s", key) for g in manifest.graphs})
    some = dataclasses.replace(manifest, engines={"vision": every.engines["vision"]})
    trt = BackendConfig(provider="tensorrt")
    assert uses_native_engines(trt, every) and not uses_native_engines(trt, some)
    assert not uses_native_engines(BackendConfig(provider="cuda"), every)
    with pytest.raises(Unavailable, match="tensorrt package is not installed"):
        require_backend(trt, every)
    with pytest.raises(Unavailable, match="TensorrtExecutionProvider"):
        require_backend(trt, some)
