"""The native TensorRT session on a fake ``tensorrt`` module and a fake cudart: profile and context choice
per call shape, output sizing, in-place KV binding, CUDA-graph capture keying, the engine-key refusal and
the errors of a machine without TensorRT."""

from __future__ import annotations

import json
import shutil
import sys
import threading
import types
from pathlib import Path

import numpy as np
import pytest

from runtime.backends import BackendConfig, open_session
from runtime.backends.buffers import HostBuffer
from runtime.backends.engines import EngineMismatch, engine_key
from runtime.backends.tensorrt import TensorRTSession
from runtime.backends.tensorrt_package import TensorRTUnavailable
from runtime.manifest import load_manifest
from tests.fakes import cudart as fake_cudart
from tests.fakes import tensorrt as fake_trt
from tests.fakes.tensorrt import DataType, FakePlan, FakeTensor, TensorIOMode

CFG = BackendConfig(provider="tensorrt")
CAP, H, D, V = 8, 2, 3, 5
IN, OUT = TensorIOMode.INPUT, TensorIOMode.OUTPUT


def _decoder_compute(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A KV-cache update (each row's tokens written at seqlens_k + 1 - seq ..) and logits from the cache."""
    ids, lens, past = feeds["input_ids"], feeds["seqlens_k"], feeds["past_key.0"]
    present = past.copy()
    for b in range(ids.shape[0]):
        end = int(lens[b]) + 1
        present[b, :, end - ids.shape[1] : end, :] = ids[b][None, :, None]
    logits = present.sum(axis=(1, 2, 3))[:, None] + np.arange(V, dtype=np.float32)
    return {"logits": logits, "present_key.0": present}


def _decoder_plan() -> FakePlan:
    kv = (-1, H, CAP, D)
    tensors = [FakeTensor("input_ids", IN, DataType.INT64, (-1, -1)), FakeTensor("seqlens_k", IN, DataType.INT32, (-1,)),
               FakeTensor("past_key.0", IN, DataType.FLOAT, kv), FakeTensor("logits", OUT, DataType.FLOAT, (-1, V)),
               FakeTensor("present_key.0", OUT, DataType.FLOAT, kv)]

    def profile(seq_hi: int) -> dict[str, tuple[tuple[int, ...], ...]]:
        return {"input_ids": ((1, 1), (2, 1), (4, seq_hi)), "seqlens_k": ((1,), (2,), (4,)),
                "past_key.0": ((1, H, CAP, D), (2, H, CAP, D), (4, H, CAP, D))}

    def shapes(inputs: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
        return {"logits": (inputs["input_ids"][0], V), "present_key.0": inputs["past_key.0"]}

    return FakePlan(tensors, [profile(CAP), profile(1)], shapes, _decoder_compute)


@pytest.fixture
def fakes(monkeypatch: pytest.MonkeyPatch) -> tuple[fake_cudart.FakeCudart, fake_trt.FakeTensorRT]:
    cudart = fake_cudart.install(monkeypatch)
    return cudart, fake_trt.install(monkeypatch, cudart)


def _session(tmp_path: Path, trt: fake_trt.FakeTensorRT, **kw: object) -> TensorRTSession:
    path = tmp_path / "decoder.engine"
    path.write_bytes(trt.register(_decoder_plan()))
    return TensorRTSession(path, CFG, aliases={"present_key.0": "past_key.0"}, profile_names=["prefill", "decode"],
                           **kw)  # type: ignore[arg-type]


def test_contexts_per_profile_and_choice_by_shape(tmp_path: Path, fakes: tuple) -> None:
    _, trt = fakes
    s = _session(tmp_path, trt)
    engine = trt.engines[-1]
    assert [c.profile for c in engine.contexts] == [0, 1]  # one context per profile, made once
    past = np.zeros((3, H, CAP, D), np.float32)
    out = s.run({"input_ids": np.ones((3, 4), np.int64), "seqlens_k": np.full(3, 3, np.int32), "past_key.0": past})
    assert s.last_profile == 0 and engine.contexts[0].executions == 1 and engine.contexts[1].executions == 0
    assert out["logits"].shape == (3, V) and out["present_key.0"].shape == (3, H, CAP, D)  # sized by infer_shapes
    np.testing.assert_allclose(out["logits"][:, 0], np.full(3, 4 * H * D, np.float32), rtol=1e-6)
    s.run({"input_ids": np.ones((2, 1), np.int64), "seqlens_k": np.zeros(2, np.int32), "past_key.0": past[:2]})
    assert s.last_profile == 1 and engine.contexts[1].executions == 1  # seq 1: the narrower decode profile
    assert ("input_ids", (2, 1)) in engine.contexts[1].shape_calls
    with pytest.raises(ValueError, match=r"no optimisation profile fits.*input_ids \[5, 1\]"):
        s.run({"input_ids": np.ones((5, 1), np.int64), "seqlens_k": np.zeros(5, np.int32),
               "past_key.0": np.zeros((5, H, CAP, D), np.float32)})


def test_cache_bound_in_place(tmp_path: Path, fakes: tuple) -> None:
    _, trt = fakes
    s = _session(tmp_path, trt, cuda_graphs=False)
    buf = s.allocate((4, H, CAP, D))
    bound = {"past_key.0": buf.bind(1, 3)}
    s.run_bound({"input_ids": np.array([[1, 2, 3], [4, 5, 6]]), "seqlens_k": np.array([2, 2], np.int32)}, bound,
                ["logits"])
    ctx = trt.engines[-1].contexts[0]
    assert ctx.addresses["past_key.0"] == ctx.addresses["present_key.0"] == bound["past_key.0"].address
    np.testing.assert_array_equal(buf.read(1, 3)[0, 0, :, 0], [1, 2, 3])
    np.testing.assert_array_equal(buf.read(2, 3)[0, 1, :, 2], [4, 5, 6])
    assert not buf.read(0, CAP).any() and not buf.read(3, CAP).any()  # rows outside the window untouched
    other = s.allocate((4, H, CAP, D))
    with pytest.raises(ValueError, match="same buffer"):
        s.run_bound({"input_ids": np.ones((1, 1), np.int64), "seqlens_k": np.zeros(1, np.int32)},
                    {"past_key.0": buf.bind(0, 1), "present_key.0": other.bind(0, 1)}, ["logits"])


def test_host_binding_is_staged_and_written_back(tmp_path: Path, fakes: tuple) -> None:
    _, trt = fakes
    s = _session(tmp_path, trt)
    host = HostBuffer((1, H, CAP, D))
    s.run_bound({"input_ids": np.array([[9, 8]]), "seqlens_k": np.array([1], np.int32)},
                {"past_key.0": host.bind(0, 1)}, ["logits"])
    np.testing.assert_array_equal(host.array[0, 0, :3, 0], [9, 8, 0])


def _reference(kv: np.ndarray, ids: np.ndarray, lens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    out = _decoder_compute({"input_ids": ids, "seqlens_k": lens, "past_key.0": kv})
    return out["logits"], out["present_key.0"]


def test_decode_steps_run_as_captured_graphs(tmp_path: Path, fakes: tuple) -> None:
    cudart, trt = fakes
    s = _session(tmp_path, trt)
    buf = s.allocate((4, H, CAP, D))
    window = {"past_key.0": buf.bind(0, 2)}
    kv = np.zeros((2, H, CAP, D), np.float32)
    for step in range(4):
        ids, lens = np.array([[10 + step], [20 + step]]), np.array([step, step], np.int32)
        logits = s.run_bound({"input_ids": ids, "seqlens_k": lens}, window, ["logits"], reuse=True)["logits"]
        ref, kv = _reference(kv, ids, lens)
        np.testing.assert_allclose(logits, ref, rtol=1e-6)  # the scalars reach the replayed graph
    assert cudart.calls.count("cudaStreamBeginCapture") == 1 and cudart.launches == 3
    np.testing.assert_array_equal(buf.read(1, 4)[0, 0, :, 0], [20, 21, 22, 23])
    # another batch size (another window): its own graph; the first one is kept
    s.run_bound({"input_ids": np.array([[1]]), "seqlens_k": np.array([0], np.int32)},
                {"past_key.0": buf.bind(3, 4)}, ["logits"], reuse=True)
    assert s.captured_graphs == 2
    # prefill shapes and calls without reuse are never graphed
    s.run_bound({"input_ids": np.ones((2, 3), np.int64), "seqlens_k": np.full(2, 6, np.int32)}, window, ["logits"],
                reuse=True)
    s.run_bound({"input_ids": np.array([[5], [6]]), "seqlens_k": np.array([7, 7], np.int32)}, dict(window), ["logits"])
    assert s.captured_graphs == 2 and cudart.calls.count("cudaStreamBeginCapture") == 2
    s.close()


def test_capture_leaves_other_threads_free_to_allocate(tmp_path: Path, fakes: tuple) -> None:
    # a server runs other sessions on other threads: a global-mode capture would make their cudaMalloc fail
    cudart, trt = fakes
    s = _session(tmp_path, trt)
    window = {"past_key.0": s.allocate((2, H, CAP, D)).bind(0, 2)}
    begin, seen = cudart.cudaStreamBeginCapture, []

    def begin_then_allocate_elsewhere(stream: object, mode: object) -> tuple:
        ret = begin(stream, mode)
        worker = threading.Thread(target=lambda: seen.append(cudart.cudaMalloc(64)[0]))
        worker.start()
        worker.join()
        return ret

    cudart.cudaStreamBeginCapture = begin_then_allocate_elsewhere
    for step in range(2):
        s.run_bound({"input_ids": np.array([[1], [2]]), "seqlens_k": np.array([step, step], np.int32)}, window,
                    ["logits"], reuse=True)
    assert seen == [fake_cudart.cudaError_t.cudaSuccess] and s.captured_graphs == 1
    s.close()


def test_missing_tensorrt_names_the_package(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # type: ignore[arg-type]
    with pytest.raises(TensorRTUnavailable, match="tensorrt package is not installed"):
        TensorRTSession(tmp_path / "x.engine", CFG)
    stub = types.ModuleType("tensorrt")  # what tensorrt-stubs' bare directory imports as
    monkeypatch.setitem(sys.modules, "tensorrt", stub)
    with pytest.raises(TensorRTUnavailable, match=r"not TensorRT.*stub"):
        open_session(tmp_path / "x.engine", CFG)


def _artifacts_with_engine(tiny: Path, tmp_path: Path, trt: fake_trt.FakeTensorRT, key: dict) -> Path:
    root = tmp_path / "art"
    root.mkdir()
    shutil.copy(tiny / "manifest.json", root / "manifest.json")
    (root / "engines").mkdir()
    plan = FakePlan([FakeTensor("pixel_values", IN, DataType.FLOAT, (-1, 3, 224, 224)),
                     FakeTensor("vision_out", OUT, DataType.FLOAT, (-1, 4))],
                    [{"pixel_values": ((1, 3, 224, 224), (4, 3, 224, 224), (32, 3, 224, 224))}],
                    lambda s: {"vision_out": (s["pixel_values"][0], 4)},
                    lambda f: {"vision_out": np.full((f["pixel_values"].shape[0], 4), 7.0, np.float32)})
    (root / "engines" / "vision.engine").write_bytes(trt.register(plan))
    data = json.loads((root / "manifest.json").read_text())
    data["engines"] = {"vision": {"file": "engines/vision.engine", "sha256": "", "key": key, "profiles": ["default"]}}
    (root / "manifest.json").write_text(json.dumps(data))
    return root


def test_factory_opens_the_manifest_engine(tiny_artifacts: Path, tmp_path: Path, fakes: tuple) -> None:
    _, trt = fakes
    from dataclasses import asdict

    from runtime.backends.cuda import probe

    manifest = load_manifest(tiny_artifacts, verify=False)
    key = engine_key("vision", manifest.graphs["vision"], probe(), trt.__version__)
    root = _artifacts_with_engine(tiny_artifacts, tmp_path, trt, asdict(key))
    session = open_session(root / "vision.onnx", CFG)
    assert isinstance(session, TensorRTSession) and session.providers == ["TensorRT"]
    out = session.run({"pixel_values": np.zeros((2, 3, 224, 224), np.float32)})
    np.testing.assert_array_equal(out["vision_out"], np.full((2, 4), 7.0))


def test_engine_key_mismatch_refuses_with_rebuild_command(tiny_artifacts: Path, tmp_path: Path, fakes: tuple) -> None:
    _, trt = fakes
    from dataclasses import asdict, replace

    from runtime.backends.cuda import probe

    manifest = load_manifest(tiny_artifacts, verify=False)
    key = replace(engine_key("vision", manifest.graphs["vision"], probe(), trt.__version__),
                  tensorrt_version="10.3.0.30", gpu_name="Orin", compute_capability="8.7")
    root = _artifacts_with_engine(tiny_artifacts, tmp_path, trt, asdict(key))
    with pytest.raises(EngineMismatch) as info:
        open_session(root / "vision.onnx", CFG)
    msg = str(info.value)
    assert "built for TensorRT 10.3.0.30 on Orin (sm 8.7), this is TensorRT 10.8.0.43 on Fake GPU (sm 8.7)" in msg
    assert f"unimp build-engines {root} --graphs vision" in msg
    assert not trt.engines  # refused before deserializing


def test_shape_tensor_inputs_are_read_from_host_memory(tmp_path: Path, fakes: tuple) -> None:
    cudart, trt = fakes
    plan = FakePlan([FakeTensor("x", IN, DataType.FLOAT, (-1,)), FakeTensor("n", IN, DataType.INT32, (), shape_io=True),
                     FakeTensor("y", OUT, DataType.FLOAT, (-1,))],
                    [{"x": ((1,), (4,), (8,))}],
                    lambda s: {"y": (int(s["n:value"]),)},  # the output's length is the value of n
                    lambda f: {"y": np.full(int(f["n"]), f["x"].sum(), np.float32)})
    path = tmp_path / "shape.engine"
    path.write_bytes(trt.register(plan))
    s = TensorRTSession(path, CFG, profile_names=["decode"])
    ctx = trt.engines[-1].contexts[0]
    out = s.run({"x": np.ones(3, np.float32), "n": np.array(5, np.int32)})
    np.testing.assert_array_equal(out["y"], np.full(5, 3.0))
    assert ctx.addresses["n"] in cudart.pinned and ctx.addresses["x"] in cudart.device
    s.run_bound({"x": np.ones(2, np.float32), "n": np.array(2, np.int32)}, {}, ["y"], reuse=True)
    assert s.captured_graphs == 0  # shape tensors change shapes: never graphed


def test_bound_dtype_must_match_the_engine(tmp_path: Path, fakes: tuple) -> None:
    _, trt = fakes
    s = _session(tmp_path, trt)
    half = s.allocate((1, H, CAP, D), np.float16)
    with pytest.raises(ValueError, match=r"past_key\.0 is bound as float16 but the engine's tensor is float32"):
        s.run_bound({"input_ids": np.ones((1, 1), np.int64), "seqlens_k": np.zeros(1, np.int32)},
                    {"past_key.0": half.bind(0, 1)}, ["logits"])
