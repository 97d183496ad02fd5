"""The ONNX Runtime GPU backend without a GPU: provider options derived from the manifest, startup refusals,
ORT's silent-fallback detection, and the device-binding and CUDA-graph code paths driven on ORT CPU through
a stand-in for runtime.backends.cuda over host memory."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar

import numpy as np
import onnxruntime as ort
import pytest

from runtime.backends import BackendConfig
from runtime.backends import ort as ort_backend
from runtime.backends.buffers import HostBuffer
from runtime.backends.providers import (
    DeviceFacts,
    ProviderSettingsError,
    cache_dirs,
    ort_providers,
    profile_shapes,
    shape_string,
    trt_profile_options,
)
from runtime.manifest import GraphEntry, ManifestError, TensorSpec, load_manifest
from runtime.types import Unavailable

REPO = Path(__file__).resolve().parents[2]
ORIN = DeviceFacts("Orin (nvgpu)", (8, 7), "10.3.0")


def _graph(**changes: Any) -> GraphEntry:
    graph = GraphEntry(
        file="decoder.onnx",
        inputs=[TensorSpec("input_ids", "int64", ["batch", "seq"]), TensorSpec("seqlens_k", "int32", ["batch"]),
                TensorSpec("total_sequence_length", "int32", []),
                TensorSpec("past_key.0", "float32", ["batch", 2, "capacity", 8])],
        outputs=[TensorSpec("logits", "float32", ["batch", 32])],
        sha256="ab" * 32,
        profiles={"input_ids": {"min": [1, 1], "opt": [4, 1], "max": [8, 512]},
                  "past_key.0": {"min": [1, 2, 2, 8], "opt": [4, 2, 512, 8], "max": [8, 2, 513, 8]}},
    )
    return replace(graph, **changes)


def _parse(text: str) -> dict[str, list[int]]:
    out = {}
    for part in text.split(","):
        name, dims = part.split(":")
        out[name] = [int(d) for d in dims.split("x")]
    return out


# -- option derivation ------------------------------------------------------------------------------------


def test_profile_strings_complete_dynamic_inputs_and_skip_static_ones() -> None:
    options = trt_profile_options(_graph())
    assert options == {
        "trt_profile_min_shapes": "input_ids:1x1,seqlens_k:1,past_key.0:1x2x2x8",
        "trt_profile_opt_shapes": "input_ids:4x1,seqlens_k:4,past_key.0:4x2x512x8",
        "trt_profile_max_shapes": "input_ids:8x512,seqlens_k:8,past_key.0:8x2x513x8",
    }
    assert shape_string({"a": [1, 2], "b": [3]}) == "a:1x2,b:3"


def test_dynamic_input_without_any_range_is_refused() -> None:
    graph = _graph(inputs=[*_graph().inputs, TensorSpec("extra", "int64", ["rows"])])
    with pytest.raises(ManifestError, match=r"^graphs\.decoder\.profiles\.extra: .*\['rows'\]"):
        profile_shapes(graph)


def test_profile_strings_of_the_tiny_manifest(tiny_artifacts: Path) -> None:
    manifest = load_manifest(tiny_artifacts, verify=False)
    assert trt_profile_options(manifest.graphs["vision"]) == {
        f"trt_profile_{level}_shapes": f"pixel_values:{'x'.join(map(str, shape))}"
        for level, shape in manifest.graphs["vision"].profiles["pixel_values"].items()
    }
    decoder = manifest.graphs["decoder"]
    options = trt_profile_options(decoder)
    for level in ("min", "opt", "max"):
        shapes = _parse(options[f"trt_profile_{level}_shapes"])
        for name, profile in decoder.profiles.items():  # every manifest profile, verbatim
            assert shapes[name] == profile[level]
        batch = decoder.profiles["input_ids"][level][0]
        assert shapes["seqlens_k"] == [batch] and shapes["logits_index"] == [batch]  # completed from batch
        assert "total_sequence_length" not in shapes  # a scalar needs no profile
        assert list(shapes) == [s.name for s in decoder.inputs if s.name in shapes]  # graph input order


def test_cache_directories_are_keyed_by_graph_gpu_and_tensorrt_version(tmp_path: Path) -> None:
    graph = _graph()
    engines, timing = cache_dirs(tmp_path, graph, ORIN)
    assert engines.parent == tmp_path / "engines" and timing.parent == tmp_path / "timing"
    assert engines.name == "decoder-abababababababab-orin-nvgpu-sm87-trt10.3.0"
    assert cache_dirs(tmp_path, graph, ORIN) == (engines, timing)
    other_graph = cache_dirs(tmp_path, _graph(sha256="cd" * 32), ORIN)
    assert other_graph[0] != engines and other_graph[1] == timing  # timings hold for any graph on this GPU
    for facts in (replace(ORIN, gpu_name="NVIDIA L4"), replace(ORIN, compute_capability=(8, 9)),
                  replace(ORIN, tensorrt_version="10.13.2")):
        changed = cache_dirs(tmp_path, graph, facts)
        assert changed[0] != engines and changed[1] != timing


def test_tensorrt_provider_options(tmp_path: Path) -> None:
    config = BackendConfig(provider="tensorrt", device_id=1, trt_workspace_gb=2.5, fp16=True, trt_optimization_level=4)
    providers = ort_providers(_graph(), config, ORIN, tmp_path)
    engines, timing = cache_dirs(tmp_path, _graph(), ORIN)
    assert providers == [
        ("TensorrtExecutionProvider", {
            "device_id": 1, "trt_builder_optimization_level": 4, "trt_max_workspace_size": int(2.5 * (1 << 30)),
            "trt_fp16_enable": True, **trt_profile_options(_graph()),
            "trt_engine_cache_enable": True, "trt_engine_cache_path": str(engines),
            "trt_timing_cache_enable": True, "trt_timing_cache_path": str(timing),
        }),
        ("CUDAExecutionProvider", {"device_id": 1, "arena_extend_strategy": "kNextPowerOfTwo"}),
        "CPUExecutionProvider",
    ]
    trt = providers[0][1]  # type: ignore[index]
    fp16_graph = ort_providers(_graph(precision="fp16"), config, ORIN, tmp_path)[0][1]  # type: ignore[index]
    assert "trt_fp16_enable" not in fp16_graph  # the graph already carries its precision
    plain = ort_providers(_graph(), BackendConfig(provider="tensorrt"), ORIN, tmp_path)[0][1]  # type: ignore[index]
    assert "trt_fp16_enable" not in plain and "trt_max_workspace_size" not in plain
    assert "trt_cuda_graph_enable" not in trt
    with pytest.raises(ProviderSettingsError, match=r"^fp16: TensorRT 11\.1\.0 removed weak typing"):
        ort_providers(_graph(), config, replace(ORIN, tensorrt_version="11.1.0"), tmp_path)


def test_cuda_graphs_only_for_the_decode_graph(tmp_path: Path) -> None:
    config = BackendConfig(provider="cuda", cuda_graph=True)
    assert ort_providers(_graph(), config, ORIN, tmp_path, decode_graph=True) == [
        ("CUDAExecutionProvider", {"device_id": 0, "arena_extend_strategy": "kSameAsRequested",
                                   "enable_cuda_graph": True}),
        "CPUExecutionProvider",
    ]
    assert ort_providers(_graph(), config, ORIN, tmp_path, decode_graph=False)[0] == (
        "CUDAExecutionProvider", {"device_id": 0, "arena_extend_strategy": "kNextPowerOfTwo"})
    trt = ort_providers(_graph(), replace(config, provider="tensorrt"), ORIN, tmp_path, decode_graph=True)
    assert "trt_cuda_graph_enable" not in trt[0][1]  # type: ignore[index]
    assert "enable_cuda_graph" not in trt[1][1]  # type: ignore[index]
    # the TensorRT EP keeps one graph per thread (no gpu_graph_id): decode windows would share it
    with pytest.raises(ProviderSettingsError, match=r"^cuda_graph: not with onnxruntime's TensorRT"):
        ort_backend.check_settings(replace(config, provider="tensorrt"), None)
    assert ort_providers(None, BackendConfig(), None, tmp_path) == ["CPUExecutionProvider"]


# -- startup refusals --------------------------------------------------------------------------------------


@dataclass
class _Info:
    name: str = "NVIDIA Test GPU"
    compute_capability: tuple[int, int] = (8, 9)


class _FakeDeviceBuffer(HostBuffer):
    """runtime.backends.cuda.DeviceBuffer's interface over host memory (binds as "cpu" for ORT CPU)."""

    made: ClassVar[list[_FakeDeviceBuffer]] = []

    def __init__(self, shape: tuple[int, ...], dtype: Any = np.float32, device_id: int = 0, stream: Any = None) -> None:
        super().__init__(shape, dtype)
        self.device_id = device_id
        _FakeDeviceBuffer.made.append(self)

    @property
    def address(self) -> int:
        return int(self.array.ctypes.data)

    def free(self) -> None:
        pass


def _fake_cuda(probe_error: str = "") -> SimpleNamespace:
    copies: list[str] = []

    def probe(device_id: int = 0) -> _Info:
        if probe_error:
            raise Unavailable(probe_error)
        return _Info()

    def to_device(dst: int, host: np.ndarray, stream: Any) -> None:
        copies.append("h2d")
        ctypes.memmove(dst, host.ctypes.data, host.nbytes)

    def to_host(host: np.ndarray, src: int, stream: Any) -> None:
        copies.append("d2h")
        ctypes.memmove(host.ctypes.data, src, host.nbytes)

    return SimpleNamespace(probe=probe, DeviceBuffer=_FakeDeviceBuffer, to_device=to_device, to_host=to_host,
                           copies=copies)


@pytest.fixture
def gpu_build(monkeypatch: pytest.MonkeyPatch) -> None:
    """onnxruntime claims the GPU providers (as onnxruntime-gpu does, with or without a usable GPU)."""
    monkeypatch.setattr(ort_backend.ort, "get_available_providers",
                        lambda: ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(ort_backend, "_facts", {})


@pytest.mark.parametrize("provider", ["cuda", "tensorrt"])
def test_cpu_onnxruntime_refuses_gpu_providers(monkeypatch: pytest.MonkeyPatch, provider: str) -> None:
    monkeypatch.setattr(ort_backend.ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    wanted = {"cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}[provider]
    with pytest.raises(Unavailable, match=rf"needs onnxruntime's {wanted}.*pip uninstall onnxruntime && "
                                          r"pip install onnxruntime-gpu"):
        ort_backend.require_provider(BackendConfig(provider=provider))  # type: ignore[arg-type]


def test_missing_device_and_tensorrt_libraries_are_named(monkeypatch: pytest.MonkeyPatch, gpu_build: None) -> None:
    monkeypatch.setattr(ort_backend, "cuda_api", lambda: _fake_cuda("cudaGetDeviceCount: no CUDA-capable device"))
    with pytest.raises(Unavailable, match="no CUDA-capable device"):
        ort_backend.require_provider(BackendConfig(provider="cuda"))
    monkeypatch.setattr(ort_backend, "cuda_api", lambda: _fake_cuda())
    monkeypatch.setattr(ort_backend, "tensorrt_version", lambda: "")
    with pytest.raises(Unavailable, match=r"TensorRT libraries .*libnvinfer\.so\.11 or libnvinfer\.so\.10"):
        ort_backend.require_provider(BackendConfig(provider="tensorrt"))
    monkeypatch.setattr(ort_backend, "tensorrt_version", lambda: "11.1.0")
    with pytest.raises(ProviderSettingsError, match=r"^fp16: TensorRT 11\.1\.0"):
        ort_backend.require_provider(BackendConfig(provider="tensorrt", fp16=True))
    facts = ort_backend.require_provider(BackendConfig(provider="tensorrt", device_id=0))
    assert facts == DeviceFacts("NVIDIA Test GPU", (8, 9), "11.1.0")


def test_settings_a_provider_cannot_honour_are_errors() -> None:
    with pytest.raises(ProviderSettingsError, match=r"^cuda_graph: needs provider cuda or tensorrt"):
        ort_backend.require_provider(BackendConfig(cuda_graph=True))
    with pytest.raises(ProviderSettingsError, match=r"^fp16: applies to the tensorrt provider only"):
        ort_backend.check_settings(BackendConfig(provider="cuda", fp16=True), None)


def test_runtime_open_refuses_a_missing_provider(tiny_artifacts: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from runtime.engine import Runtime, RuntimeConfig

    monkeypatch.setattr(ort_backend.ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    with pytest.raises(Unavailable, match=r"CUDAExecutionProvider.*onnxruntime-gpu"):
        Runtime.open(tiny_artifacts, RuntimeConfig(backend=BackendConfig(provider="cuda"), background_encode=False))


def test_runtime_open_refuses_a_missing_device(tiny_artifacts: Path, monkeypatch: pytest.MonkeyPatch,
                                               gpu_build: None) -> None:
    from runtime.engine import Runtime, RuntimeConfig

    monkeypatch.setattr(ort_backend, "cuda_api", lambda: _fake_cuda("CUDA driver not found (libcuda.so.1)"))
    with pytest.raises(Unavailable, match=r"CUDA driver not found \(libcuda\.so\.1\)"):
        Runtime.open(tiny_artifacts, RuntimeConfig(backend=BackendConfig(provider="cuda"), background_encode=False))


@pytest.mark.parametrize("provider", ["cuda", "tensorrt"])
def test_serve_refuses_a_missing_provider_before_the_port_opens(tmp_path: Path, provider: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime build has the GPU providers")  # CI and this workplace have the CPU wheel
    done = subprocess.run(
        [sys.executable, "-m", "unimp.cli", "serve", "--artifacts", str(tmp_path), "--provider", provider,
         "--port", "0", "--metrics-port", "0", "--state-dir", str(tmp_path / "state"), "--log-format", "text"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    log = done.stdout + done.stderr
    assert done.returncode == 2, log
    wanted = {"cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}[provider]
    assert f"invalid configuration: engine.provider: provider '{provider}' needs onnxruntime's {wanted}" in log
    assert "pip install onnxruntime-gpu" in log
    assert "listening on" not in log  # refused before the port opened


# -- ORT's own fallback ----------------------------------------------------------------------------------


class _SessionOn:
    """An ONNX Runtime CPU session that reports the given providers (what onnxruntime-gpu returns)."""

    def __init__(self, inner: ort.InferenceSession, providers: list[str]) -> None:
        self._inner, self._providers = inner, providers

    def get_providers(self) -> list[str]:
        return self._providers

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def _cpu_session_reporting(reported: list[str] | None, seen: list[Any]) -> Any:
    def create(source: str, options: ort.SessionOptions, providers: list[Any]) -> Any:
        seen.append(providers)
        inner = ort.InferenceSession(source, sess_options=options, providers=["CPUExecutionProvider"])
        return inner if reported is None else _SessionOn(inner, reported)

    return staticmethod(create)


def test_silent_fallback_of_onnxruntime_is_refused(tiny_artifacts: Path, monkeypatch: pytest.MonkeyPatch,
                                                   gpu_build: None, tmp_path: Path) -> None:
    manifest = load_manifest(tiny_artifacts, verify=False)
    entry = manifest.graphs["vision"]
    monkeypatch.setattr(ort_backend, "cuda_api", lambda: _fake_cuda())
    monkeypatch.setattr(ort_backend, "tensorrt_version", lambda: "10.3.0")
    seen: list[Any] = []
    monkeypatch.setattr(ort_backend.OrtSession, "_create", _cpu_session_reporting(None, seen))
    config = BackendConfig(provider="tensorrt", trt_cache_dir=tmp_path / "trt")
    with pytest.raises(Unavailable, match=r"^vision\.onnx: onnxruntime did not enable TensorrtExecutionProvider "
                                          r"\(the session runs on \['CPUExecutionProvider'\]\)"):
        ort_backend.OrtSession(tiny_artifacts / entry.file, config, entry)
    facts = DeviceFacts("NVIDIA Test GPU", (8, 9), "10.3.0")
    assert seen == [ort_providers(entry, config, facts, tmp_path / "trt")]  # the derived options reach ORT
    assert all(d.is_dir() for d in cache_dirs(tmp_path / "trt", entry, facts))
    # CUDA in use but TensorRT dropped is a fallback too
    monkeypatch.setattr(ort_backend.OrtSession, "_create",
                        _cpu_session_reporting(["CUDAExecutionProvider", "CPUExecutionProvider"], seen))
    with pytest.raises(Unavailable, match="did not enable TensorrtExecutionProvider"):
        ort_backend.OrtSession(tiny_artifacts / entry.file, config, entry)
    monkeypatch.setattr(ort_backend.OrtSession, "_create", _cpu_session_reporting(
        ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"], seen))
    session = ort_backend.OrtSession(tiny_artifacts / entry.file, config, entry)
    assert session.providers[0] == "TensorrtExecutionProvider"


# -- device buffers and CUDA graphs, on ORT CPU ---------------------------------------------------------------


def _core(artifacts: Path, decoder: Any) -> Any:
    from runtime.backends import open_session
    from runtime.decoder.core import InplaceCore

    manifest = load_manifest(artifacts, verify=False)
    media_kv = open_session(artifacts / manifest.graphs["media_kv"].file, BackendConfig(intra_op_threads=1))
    return InplaceCore(decoder, media_kv, manifest, slots=3, max_context=48)


def _decode(core: Any, steps: int) -> list[np.ndarray]:
    from runtime.decoder.core import PrefillInput

    m = core.m
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((1, m.vision.num_latents, m.vision.width)).astype(np.float32)
    prompts = [rng.integers(1, m.tokens.pad, size=n).astype(np.int64) for n in (9, 14)]
    prompts[1][3] = m.tokens.image
    memories = [core.media_kv(latents[:0]), core.media_kv(latents)]
    seqs = [core.open() for _ in prompts]
    logits = [core.prefill(s, PrefillInput(p, mem)).logits[None] for s, p, mem in zip(seqs, prompts, memories)]
    out = [np.concatenate(logits)]
    for _ in range(steps):
        tokens = [lg.argmax(-1) % m.tokens.pad for lg in logits]
        logits = core.step(seqs, tokens)
        out.append(np.concatenate(logits))
    for s in seqs:
        core.release(s)
    return out


def test_device_binding_and_cuda_graph_paths_on_cpu(tiny_artifacts: Path) -> None:
    manifest = load_manifest(tiny_artifacts, verify=False)
    entry = manifest.graphs["decoder"]
    path = tiny_artifacts / entry.file
    reference = _decode(_core(tiny_artifacts, ort_backend.OrtSession(path, BackendConfig(intra_op_threads=1))), 4)

    fake = _fake_cuda()
    _FakeDeviceBuffer.made.clear()
    session = ort_backend.OrtSession(path, BackendConfig(intra_op_threads=1, cuda_graph=True), entry,
                                     decode_graph=True, device_api=fake)
    graph_ids: list[str] = []
    run = session._session.run_with_iobinding

    def recording(io: ort.IOBinding, run_options: ort.RunOptions | None = None) -> None:
        graph_ids.append(run_options.get_run_config_entry("gpu_graph_id") if run_options else "")
        run(io, run_options)

    session._session.run_with_iobinding = recording  # type: ignore[method-assign]
    core = _core(tiny_artifacts, session)
    pool = [*core.pool.keys, *core.pool.values, *core.pool.memory_keys, *core.pool.memory_values]
    assert pool and all(isinstance(b, _FakeDeviceBuffer) for b in pool)  # allocate() gives device buffers
    got = _decode(core, 4)
    for want, have in zip(reference, got):
        np.testing.assert_allclose(have, want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()))
    # prefills (2) and the window's first step never run in a graph; the three later steps replay graph 1
    assert graph_ids == ["-1", "-1", "-1", "1", "1", "1"]
    assert session.cuda_graphs == 1
    feeds = len([n for n in session.input_names if not n.startswith(("past_", "xattn_"))])
    assert fake.copies.count("h2d") == 4 * feeds and fake.copies.count("d2h") == 3  # staged in, logits out
    staged = len(_FakeDeviceBuffer.made) - len(pool)
    assert staged == feeds + 1  # one fixed device buffer per host feed, plus the logits


def test_providers_reported_in_metrics_and_by_the_runtime(tiny_artifacts: Path) -> None:
    from runtime.engine import Runtime, RuntimeConfig
    from runtime.server.metrics import ServerMetrics

    runtime = Runtime.open(tiny_artifacts, RuntimeConfig(backend=BackendConfig(intra_op_threads=1),
                                                         background_encode=False, progress=False))
    try:
        providers = runtime.providers()
    finally:
        runtime.close()
    assert providers == {"vision": ["CPUExecutionProvider"], "media_kv": ["CPUExecutionProvider"],
                         "decoder": ["CPUExecutionProvider"]}
    metrics = ServerMetrics()
    assert metrics.value("unimp_backend_provider_info", {"graph": "decoder", "provider": "CPUExecutionProvider",
                                                          "rank": "0"}) == 0
    metrics.engine_providers = lambda: {"decoder": ["TensorrtExecutionProvider", "CUDAExecutionProvider"]}
    assert metrics.value("unimp_backend_provider_info", {"graph": "decoder", "provider": "TensorrtExecutionProvider",
                                                          "rank": "0"}) == 1
    assert metrics.value("unimp_backend_provider_info", {"graph": "decoder", "provider": "CUDAExecutionProvider",
                                                          "rank": "1"}) == 1
