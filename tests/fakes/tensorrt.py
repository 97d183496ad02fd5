"""A stand-in for the ``tensorrt`` package, injected into ``sys.modules`` by tests only.

It exposes the method names the runtime and the engine builder call (ICudaEngine, IExecutionContext,
Builder, OnnxParser, IBuilderConfig, IOptimizationProfile, ITimingCache, IProgressMonitor). A "plan" is a
key into ``FakeTensorRT.plans``: the engine's I/O tensors, its profiles and a numpy ``compute`` function.
``execute_async_v3`` reads the inputs from the bound addresses and writes the outputs to theirs through the
fake cudart (so it is recorded during a CUDA graph capture and replayed on launch), checking every address
lies inside a live allocation large enough for the tensor.
"""

from __future__ import annotations

import ctypes
import enum
import math
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.fakes.cudart import FakeCudart


class TensorIOMode(enum.Enum):
    NONE = 0
    INPUT = 1
    OUTPUT = 2


class DataType(enum.Enum):
    FLOAT = 0
    HALF = 1
    INT8 = 2
    INT32 = 3
    BOOL = 4
    INT64 = 8


_NP = {DataType.FLOAT: np.float32, DataType.HALF: np.float16, DataType.INT8: np.int8, DataType.INT32: np.int32,
       DataType.BOOL: np.bool_, DataType.INT64: np.int64}
_FROM_ONNX = {1: DataType.FLOAT, 10: DataType.HALF, 3: DataType.INT8, 6: DataType.INT32, 9: DataType.BOOL,
              7: DataType.INT64}


def nptype(dtype: DataType) -> type:
    return _NP[dtype]


class Logger:
    VERBOSE, INFO, WARNING, ERROR = 4, 3, 2, 1

    def __init__(self, severity: int = 2) -> None:
        self.severity = severity


class NetworkDefinitionCreationFlag(enum.IntEnum):
    EXPLICIT_BATCH = 0
    STRONGLY_TYPED = 1


class MemoryPoolType(enum.Enum):
    WORKSPACE = 0


class IProgressMonitor:
    def __init__(self) -> None:
        pass


@dataclass
class FakeTensor:
    name: str
    mode: TensorIOMode
    dtype: DataType
    shape: tuple[int, ...]
    """-1 for dynamic dims."""
    shape_io: bool = False
    """A shape tensor: its values are read from host memory."""


Compute = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]
ShapeFn = Callable[[dict[str, tuple[int, ...]]], dict[str, tuple[int, ...]]]


@dataclass
class FakePlan:
    tensors: list[FakeTensor]
    profiles: list[dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]]
    shape_fn: ShapeFn
    compute: Compute
    build: dict[str, Any] = field(default_factory=dict)
    """What the builder was given (flags, pools, level, profiles), for builder tests."""


class FakeContext:
    def __init__(self, engine: FakeEngine) -> None:
        self.engine = engine
        self.profile = 0
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.addresses: dict[str, int] = {}
        self.executions = 0
        self.shape_calls: list[tuple[str, tuple[int, ...]]] = []

    def set_optimization_profile_async(self, index: int, stream: int) -> bool:
        self.profile = index
        return True

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
        lo, _opt, hi = self.engine.plan.profiles[self.profile][name]
        self.shape_calls.append((name, tuple(shape)))
        if len(shape) != len(lo) or not all(a <= s <= b for s, a, b in zip(shape, lo, hi)):
            return False
        self.shapes[name] = tuple(shape)
        return True

    def _input_shape(self, t: FakeTensor) -> tuple[int, ...]:
        return self.shapes.get(t.name, t.shape)

    def infer_shapes(self) -> list[str]:
        return [t.name for t in self.engine.inputs if -1 in self._input_shape(t)]

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        t = self.engine.tensor(name)
        if t.mode == TensorIOMode.INPUT:
            return self._input_shape(t)
        shapes: dict[str, Any] = {i.name: self._input_shape(i) for i in self.engine.inputs}
        for i in self.engine.inputs:
            if i.shape_io:  # the values, read from host memory now (as TensorRT does in infer_shapes)
                nbytes = int(math.prod(self._input_shape(i))) * np.dtype(_NP[i.dtype]).itemsize
                raw = ctypes.string_at(self.addresses[i.name], nbytes)
                shapes[i.name + ":value"] = np.frombuffer(raw, _NP[i.dtype]).reshape(self._input_shape(i))
        return self.engine.plan.shape_fn(shapes)[name]

    def set_tensor_address(self, name: str, address: int) -> bool:
        self.addresses[name] = int(address)
        return True

    def execute_async_v3(self, stream_handle: int) -> bool:
        fake = self.engine.trt.cudart
        assert stream_handle in fake.streams, "execute_async_v3 on the default stream or an unknown stream"
        missing = [t.name for t in self.engine.plan.tensors if t.name not in self.addresses]
        assert not missing, f"no address set for {missing}"
        # like a captured graph, the enqueued work is frozen to today's shapes and addresses
        shapes = {t.name: self.get_tensor_shape(t.name) for t in self.engine.plan.tensors}
        addresses = dict(self.addresses)
        tensors = {t.name: t for t in self.engine.plan.tensors}
        for name, shape in shapes.items():
            nbytes = int(math.prod(shape)) * np.dtype(_NP[tensors[name].dtype]).itemsize
            if tensors[name].shape_io:
                assert addresses[name] in fake.pinned, f"shape tensor {name} must be in pinned host memory"
            else:
                fake.check_device(addresses[name], nbytes)

        def op() -> None:
            feeds = {}
            for t in self.engine.inputs:
                dt = np.dtype(_NP[t.dtype])
                nbytes = int(math.prod(shapes[t.name])) * dt.itemsize
                feeds[t.name] = np.frombuffer(ctypes.string_at(addresses[t.name], nbytes), dt).reshape(shapes[t.name])
            results = self.engine.plan.compute(feeds)
            for t in self.engine.outputs:
                value: np.ndarray = np.ascontiguousarray(results[t.name], _NP[t.dtype])
                assert value.shape == shapes[t.name], (t.name, value.shape, shapes[t.name])
                ctypes.memmove(addresses[t.name], value.ctypes.data, value.nbytes)

        self.executions += 1
        fake.enqueue(stream_handle, op)
        return True


class FakeEngine:
    def __init__(self, trt: FakeTensorRT, plan: FakePlan) -> None:
        self.trt = trt
        self.plan = plan
        self.inputs = [t for t in plan.tensors if t.mode == TensorIOMode.INPUT]
        self.outputs = [t for t in plan.tensors if t.mode == TensorIOMode.OUTPUT]
        self.contexts: list[FakeContext] = []

    def tensor(self, name: str) -> FakeTensor:
        return next(t for t in self.plan.tensors if t.name == name)

    @property
    def num_io_tensors(self) -> int:
        return len(self.plan.tensors)

    @property
    def num_optimization_profiles(self) -> int:
        return len(self.plan.profiles)

    def get_tensor_name(self, index: int) -> str:
        return self.plan.tensors[index].name

    def get_tensor_mode(self, name: str) -> TensorIOMode:
        return self.tensor(name).mode

    def get_tensor_dtype(self, name: str) -> DataType:
        return self.tensor(name).dtype

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        return self.tensor(name).shape

    def is_shape_inference_io(self, name: str) -> bool:
        return self.tensor(name).shape_io

    def get_tensor_profile_shape(self, name: str, profile: int) -> tuple[tuple[int, ...], ...]:
        return self.plan.profiles[profile][name]

    def create_execution_context(self) -> FakeContext:
        ctx = FakeContext(self)
        self.contexts.append(ctx)
        return ctx


class Runtime:
    def __init__(self, logger: Logger) -> None:
        self.logger = logger

    def deserialize_cuda_engine(self, data: bytes) -> FakeEngine | None:
        trt = sys.modules["tensorrt"]
        assert isinstance(trt, FakeTensorRT)
        plan = trt.plans.get(bytes(data))
        if plan is None:
            return None
        engine = FakeEngine(trt, plan)
        trt.engines.append(engine)
        return engine


# -- builder ----------------------------------------------------------------------------------------
class FakeNetwork:
    def __init__(self, flags: int) -> None:
        self.flags = flags
        self.inputs: list[FakeTensor] = []
        self.outputs: list[FakeTensor] = []

    @property
    def num_inputs(self) -> int:
        return len(self.inputs)

    @property
    def num_outputs(self) -> int:
        return len(self.outputs)

    def get_input(self, index: int) -> FakeTensor:
        return self.inputs[index]

    def get_output(self, index: int) -> FakeTensor:
        return self.outputs[index]


class OnnxParser:
    """Reads the ONNX graph's inputs and outputs (names, element types, dims) into the network."""

    reject: str | None = None

    def __init__(self, network: FakeNetwork, logger: Logger) -> None:
        self.network = network
        self.errors: list[str] = []

    def parse_from_file(self, path: str) -> bool:
        import onnx

        if OnnxParser.reject:
            self.errors = [OnnxParser.reject]
            return False
        model = onnx.load(path, load_external_data=False)

        def tensor(v: Any, mode: TensorIOMode) -> FakeTensor:
            t = v.type.tensor_type
            dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim)
            return FakeTensor(v.name, mode, _FROM_ONNX[t.elem_type], dims)

        init = {i.name for i in model.graph.initializer}
        self.network.inputs = [tensor(v, TensorIOMode.INPUT) for v in model.graph.input if v.name not in init]
        self.network.outputs = [tensor(v, TensorIOMode.OUTPUT) for v in model.graph.output]
        return True

    @property
    def num_errors(self) -> int:
        return len(self.errors)

    def get_error(self, index: int) -> str:
        return self.errors[index]


class FakeProfile:
    def __init__(self) -> None:
        self.shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]] = {}

    def set_shape(self, name: str, min: Any, opt: Any, max: Any) -> None:
        lo, mid, hi = tuple(min), tuple(opt), tuple(max)
        assert len(lo) == len(mid) == len(hi) and all(a <= b <= c for a, b, c in zip(lo, mid, hi)), (name, lo, mid, hi)
        self.shapes[name] = (lo, mid, hi)


class FakeTimingCache:
    def __init__(self, data: bytes) -> None:
        self.data = bytes(data)

    def serialize(self) -> bytes:
        return self.data + b"+tuned"


class FakeConfig:
    def __init__(self) -> None:
        self.pools: dict[Any, int] = {}
        self.builder_optimization_level = 3
        self.profiles: list[FakeProfile] = []
        self.timing_cache: FakeTimingCache | None = None
        self.progress_monitor: IProgressMonitor | None = None
        self.flags_set: list[Any] = []

    def set_memory_pool_limit(self, pool: Any, size: int) -> None:
        self.pools[pool] = size

    def add_optimization_profile(self, profile: FakeProfile) -> int:
        self.profiles.append(profile)
        return len(self.profiles) - 1

    def create_timing_cache(self, data: bytes) -> FakeTimingCache:
        return FakeTimingCache(data)

    def set_timing_cache(self, cache: FakeTimingCache, ignore_mismatch: bool) -> bool:
        self.timing_cache = cache
        return True

    def get_timing_cache(self) -> FakeTimingCache | None:
        return self.timing_cache

    def set_flag(self, flag: Any) -> None:
        self.flags_set.append(flag)


class Builder:
    def __init__(self, logger: Logger) -> None:
        self.logger = logger

    def create_network(self, flags: int) -> FakeNetwork:
        return FakeNetwork(flags)

    def create_builder_config(self) -> FakeConfig:
        return FakeConfig()

    def create_optimization_profile(self) -> FakeProfile:
        return FakeProfile()

    def build_serialized_network(self, network: FakeNetwork, config: FakeConfig) -> bytes | None:
        trt = sys.modules["tensorrt"]
        assert isinstance(trt, FakeTensorRT)
        monitor = config.progress_monitor
        if monitor is not None:
            # the real trampoline's argument order: phase_start(phase_name, parent_phase, num_steps)
            monitor.phase_start("Building engine", None, 2)  # type: ignore[attr-defined]
            monitor.step_complete("Building engine", 0)  # type: ignore[attr-defined]
            monitor.phase_start("Tactic selection", "Building engine", 3)  # type: ignore[attr-defined]
            for step in range(3):
                monitor.step_complete("Tactic selection", step)  # type: ignore[attr-defined]
            monitor.phase_finish("Tactic selection")  # type: ignore[attr-defined]
            monitor.step_complete("Building engine", 1)  # type: ignore[attr-defined]
            monitor.phase_finish("Building engine")  # type: ignore[attr-defined]
        outputs = {t.name: t for t in network.outputs}

        def shape_fn(inputs: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
            return {n: tuple(1 if d < 0 else d for d in t.shape) for n, t in outputs.items()}

        def compute(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            return {n: np.zeros(shape_fn({})[n], _NP[t.dtype]) for n, t in outputs.items()}

        plan = FakePlan([*network.inputs, *network.outputs], [p.shapes for p in config.profiles], shape_fn, compute,
                        build={"flags": network.flags, "pools": dict(config.pools),
                               "level": config.builder_optimization_level, "flags_set": list(config.flags_set)})
        return trt.register(plan)


class FakeTensorRT(types.ModuleType):
    """The module object; ``plans`` maps serialized bytes to plans."""

    def __init__(self, cudart: FakeCudart, version: str = "10.8.0.43") -> None:
        super().__init__("tensorrt")
        self.__version__ = version
        self.__file__ = str(Path(__file__))
        self.cudart = cudart
        self.plans: dict[bytes, FakePlan] = {}
        self.engines: list[FakeEngine] = []
        for name, value in [("TensorIOMode", TensorIOMode), ("DataType", DataType), ("nptype", nptype),
                            ("Logger", Logger), ("Runtime", Runtime), ("Builder", Builder),
                            ("OnnxParser", OnnxParser), ("NetworkDefinitionCreationFlag", NetworkDefinitionCreationFlag),
                            ("MemoryPoolType", MemoryPoolType), ("IProgressMonitor", IProgressMonitor)]:
            setattr(self, name, value)

    def register(self, plan: FakePlan) -> bytes:
        data = f"fake-plan-{len(self.plans)}".encode()
        self.plans[data] = plan
        return data


def install(monkeypatch: pytest.MonkeyPatch, cudart: FakeCudart, version: str = "10.8.0.43") -> FakeTensorRT:
    trt = FakeTensorRT(cudart, version)
    OnnxParser.reject = None
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    return trt
