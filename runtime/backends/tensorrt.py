"""TensorRT engines behind the session protocol (NVIDIA machines only), with cuda-python memory, no torch.

Written against the API TensorRT 10 and 11 share: the name-based tensor API (``num_io_tensors``,
``get_tensor_name``, ``set_input_shape``, ``infer_shapes``, ``set_tensor_address``) and
``execute_async_v3`` on a non-default stream. TensorRT is imported lazily: this module imports on any
machine, and opening an engine without TensorRT raises ``TensorRTUnavailable`` naming the package.

Per engine: one execution context per optimisation profile (``prefill`` and ``decode`` for the decoder),
each call runs on the narrowest profile its input shapes fit. Host feeds are staged through pinned
buffers; outputs are sized from ``infer_shapes``. ``run_bound`` binds backend buffers by address; in the
``inplace`` KV layout each ``present_*`` output is bound to its ``past_*`` input's address (TensorRT's
KV-cache update writes in place). Decode steps that come back with the same bindings (``reuse``) run as a
captured CUDA graph, one per (batch, bound addresses); the small feeds are copied into the graph's fixed
input buffers with cudaMemcpyAsync before each launch.
"""

from __future__ import annotations

import logging
import math
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from runtime.backends import cuda
from runtime.backends.base import BackendConfig
from runtime.backends.buffers import Binding
from runtime.backends.tensorrt_package import tensorrt_module
from runtime.types import Unavailable

if TYPE_CHECKING:
    import tensorrt

    from runtime.manifest import Manifest

log = logging.getLogger(__name__)

_GRAPHS_KEPT = 32
"""Captured decode graphs kept per session (one per batch size and pool window in use)."""


@dataclass
class _Device:
    """A grow-only device allocation with its pinned host staging, for one tensor name."""

    address: int = 0
    nbytes: int = 0
    pinned: cuda.PinnedHost = field(default_factory=cuda.PinnedHost)

    def ensure(self, nbytes: int, sync: cuda.Stream) -> int:
        if nbytes > self.nbytes:
            rt = cuda.cudart()
            if self.address:
                sync.synchronize()
                cuda.check(rt.cudaFree(self.address))
                nbytes = max(nbytes, self.nbytes * 3 // 2)  # growing tensors (concat KV): not one malloc per step
            self.address = int(cuda.check(rt.cudaMalloc(max(nbytes, 1))))
            self.nbytes = max(nbytes, 1)
        return self.address

    def free(self) -> None:
        if self.address:
            cuda.check(cuda.cudart().cudaFree(self.address))
            self.address, self.nbytes = 0, 0
        self.pinned.free()


@dataclass
class _Captured:
    exec_handle: Any
    graph_handle: Any
    io: dict[str, _Device]
    output_shapes: dict[str, tuple[int, ...]]


class TensorRTSession:
    """One TensorRT engine.

    ``manifest``/``root``/``graph``: the artifacts the engine was built from; at open its recorded key is
    checked against this machine and a mismatch refuses with the rebuild command. ``aliases``: output ->
    input pairs that must share one address (the inplace KV layout's present -> past). ``profile_names``:
    the profiles' names in index order when there is no manifest (decode steps are graphed on "decode").
    """

    def __init__(
        self,
        path: Path,
        config: BackendConfig,
        *,
        manifest: Manifest | None = None,
        root: Path | None = None,
        graph: str | None = None,
        aliases: dict[str, str] | None = None,
        device_id: int = 0,
        cuda_graphs: bool = True,
        profile_names: list[str] | None = None,
    ) -> None:
        path = Path(path)
        trt = tensorrt_module()
        self._trt = trt
        gpu = cuda.probe(device_id)
        self.device_id = device_id
        profile_names = list(profile_names or [])
        if manifest is not None and graph is not None:
            from runtime.backends.engines import EngineMismatch, check_engine

            verdict = check_engine(manifest, Path(root or path.parent), graph, gpu, str(trt.__version__))
            if not verdict.ok:
                raise EngineMismatch(f"TensorRT engine {path} for graph {graph!r}: {verdict.reason}; rebuild it on "
                                     f"this machine: {verdict.rebuild}")
            profile_names = list(manifest.engines[graph].profiles)
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        try:
            plan = path.read_bytes()
        except OSError as exc:
            raise Unavailable(f"cannot read TensorRT engine {path}: {exc}") from exc
        engine: tensorrt.ICudaEngine | None = self._runtime.deserialize_cuda_engine(plan)
        if engine is None:
            raise Unavailable(f"TensorRT {trt.__version__} could not deserialize {path} (built by another TensorRT "
                              "version or for another GPU?): rebuild it with `unimp build-engines`")
        self._engine: tensorrt.ICudaEngine = engine
        self._path = path
        self._stream = cuda.Stream()
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self._inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self._outputs = [n for n in names if n not in set(self._inputs)]
        self._input_set = set(self._inputs)
        self._dtypes = {}
        for n in names:
            try:
                self._dtypes[n] = np.dtype(trt.nptype(engine.get_tensor_dtype(n)))
            except TypeError as exc:  # bf16 / fp8 / int4 I/O: numpy has no such type
                raise Unavailable(f"{path.name}: tensor {n!r} is {engine.get_tensor_dtype(n)}, which numpy cannot "
                                  "hold; export the graph with fp16 or fp32 inputs and outputs") from exc
        self._dynamic = {n for n in self._inputs if any(int(d) < 0 for d in engine.get_tensor_shape(n))}
        # inputs whose values decide output shapes (shape tensors): TensorRT reads them from host memory
        self._shape_inputs = {n for n in self._inputs if engine.is_shape_inference_io(n)}
        self._aliases = dict(aliases or {})
        for out, inp in self._aliases.items():
            if out not in self._outputs or inp not in self._input_set:
                raise ValueError(f"alias {out} -> {inp}: not an output -> input pair of {path.name}")
        count = int(engine.num_optimization_profiles)
        self._profile_names = profile_names if len(profile_names) == count else [f"profile{p}" for p in range(count)]
        # (min, max) per dynamic input and profile: which calls a profile can run
        self._ranges: list[dict[str, tuple[tuple[int, ...], tuple[int, ...]]]] = []
        for p in range(count):
            ranges = {}
            for n in self._dynamic:
                lo, _opt, hi = engine.get_tensor_profile_shape(n, p)
                ranges[n] = (tuple(int(x) for x in lo), tuple(int(x) for x in hi))
            self._ranges.append(ranges)
        self._contexts: list[tensorrt.IExecutionContext] = []
        for p in range(count):
            ctx = engine.create_execution_context()
            if ctx is None:
                raise Unavailable(f"TensorRT could not create an execution context for {path.name} (out of GPU memory?)")
            ctx.set_optimization_profile_async(p, self._stream.handle)
            self._contexts.append(ctx)
        self._stream.synchronize()
        self._io: list[dict[str, _Device]] = [{} for _ in range(count)]
        self._cuda_graphs = cuda_graphs
        self._graphs: OrderedDict[tuple[Any, ...], _Captured] = OrderedDict()
        self._lock = threading.Lock()
        self.last_profile = -1
        """Index of the profile the last call ran on (tests, logs)."""
        log.info("loaded TensorRT engine %s (%d profiles: %s) on %s", path.name, count,
                 ", ".join(self._profile_names), cuda.describe(gpu))

    # -- protocol ------------------------------------------------------------------------------------
    @property
    def input_names(self) -> list[str]:
        return list(self._inputs)

    @property
    def output_names(self) -> list[str]:
        return list(self._outputs)

    @property
    def providers(self) -> list[str]:
        return ["TensorRT"]

    @property
    def profile_names(self) -> list[str]:
        return list(self._profile_names)

    def allocate(self, shape: tuple[int, ...], dtype: type = np.float32) -> cuda.DeviceBuffer:
        return cuda.DeviceBuffer(shape, dtype, device_id=self.device_id, stream=self._stream)

    def run(self, feeds: dict[str, np.ndarray], outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        return self.run_bound(feeds, {}, list(outputs or self._outputs))

    def run_bound(
        self, feeds: dict[str, np.ndarray], bound: dict[str, Binding], outputs: list[str], *, reuse: bool = False
    ) -> dict[str, np.ndarray]:
        with self._lock:  # an execution context runs one call at a time
            return self._run_bound(feeds, bound, outputs, reuse)

    def _run_bound(
        self, feeds: dict[str, np.ndarray], bound: dict[str, Binding], outputs: list[str], reuse: bool
    ) -> dict[str, np.ndarray]:
        bound = self._with_aliases(bound)
        unknown = [n for n in [*feeds, *bound] if n not in self._dtypes]
        if unknown:
            raise ValueError(f"{self._path.name} has no tensor named {unknown[0]!r}")
        for n, b in bound.items():
            if np.dtype(b.dtype) != self._dtypes[n]:
                raise ValueError(f"{n} is bound as {np.dtype(b.dtype)} but the engine's tensor is {self._dtypes[n]}")
        missing = [n for n in self._inputs if n not in feeds and n not in bound]
        if missing:
            raise ValueError(f"{self._path.name}: input {missing[0]!r} is neither fed nor bound")
        # np.require keeps 0-d feeds 0-d (total_sequence_length is []; ascontiguousarray makes it (1,))
        arrays = {n: np.require(v, self._dtypes[n], "C") for n, v in feeds.items()}
        shapes = {n: tuple(a.shape) for n, a in arrays.items()}
        shapes.update({n: b.shape for n, b in bound.items() if n in self._input_set})
        p = self._select_profile(shapes)
        self.last_profile = p
        host_bound = {n: b for n, b in bound.items() if b.device != "cuda"}
        graphable = (self._cuda_graphs and reuse and not host_bound and not self._shape_inputs
                     and self._profile_names[p] == "decode")
        key = (p, tuple(sorted(shapes.items())), tuple(sorted((n, b.address) for n, b in bound.items())),
               tuple(outputs))
        captured = self._graphs.get(key) if graphable else None
        if captured is not None:
            self._graphs.move_to_end(key)
            return self._launch(captured, arrays, outputs)
        ctx = self._contexts[p]
        io = {} if graphable else self._io[p]
        for n in self._shape_inputs & set(arrays):
            staged = io.setdefault(n, _Device()).pinned.view(arrays[n].shape, arrays[n].dtype)
            staged[...] = arrays[n]
            ctx.set_tensor_address(n, io[n].pinned.address)
        out_shapes = self._set_shapes(ctx, shapes, bound)
        result = self._execute(ctx, io, arrays, bound, host_bound, outputs, out_shapes)
        if graphable:
            self._capture(key, ctx, io, out_shapes)
        return result

    # -- internals -----------------------------------------------------------------------------------
    def _with_aliases(self, bound: dict[str, Binding]) -> dict[str, Binding]:
        if not self._aliases:
            return bound
        out = dict(bound)
        for present, past in self._aliases.items():
            if past in bound and present not in bound:
                out[present] = bound[past]  # in place: the output is written where the input lives
            elif past in bound and bound[present].address != bound[past].address:
                raise ValueError(f"{present} must be bound to the same buffer as {past} (in-place KV layout)")
        return out

    def _select_profile(self, shapes: dict[str, tuple[int, ...]]) -> int:
        """The narrowest profile whose ranges hold every dynamic input's shape."""
        best, best_width = -1, math.inf
        for p, ranges in enumerate(self._ranges):
            fits = all(
                len(shapes[n]) == len(lo) and all(a <= s <= b for s, a, b in zip(shapes[n], lo, hi))
                for n, (lo, hi) in ranges.items()
            )
            width = sum(b - a for lo, hi in ranges.values() for a, b in zip(lo, hi))
            if fits and width < best_width:
                best, best_width = p, width
        if best < 0:
            detail = "; ".join(
                f"{self._profile_names[p]}: " + ", ".join(f"{n} {list(lo)}..{list(hi)}" for n, (lo, hi) in r.items())
                for p, r in enumerate(self._ranges)
            )
            got = ", ".join(f"{n} {list(shapes[n])}" for n in sorted(self._dynamic))
            raise ValueError(f"{self._path.name}: no optimisation profile fits the shapes {got} ({detail}); rebuild "
                             "the engine with wider profiles")
        return best

    def _set_shapes(self, ctx: tensorrt.IExecutionContext, shapes: dict[str, tuple[int, ...]], bound: dict[str, Binding]) -> dict[str, tuple[int, ...]]:
        for n in self._dynamic:
            if not ctx.set_input_shape(n, shapes[n]):
                raise ValueError(f"{self._path.name}: TensorRT refused the shape {list(shapes[n])} for input {n!r}")
        unresolved = ctx.infer_shapes()
        if unresolved:
            raise ValueError(f"{self._path.name}: the shapes of {list(unresolved)} are not specified enough")
        out_shapes = {n: tuple(int(d) for d in ctx.get_tensor_shape(n)) for n in self._outputs}
        for n, b in bound.items():
            if n not in self._input_set and tuple(b.shape) != out_shapes[n]:
                raise ValueError(f"{n} is bound as {list(b.shape)} but this call produces {list(out_shapes[n])}")
        return out_shapes

    def _execute(
        self, ctx: tensorrt.IExecutionContext, io: dict[str, _Device], arrays: dict[str, np.ndarray], bound: dict[str, Binding],
        host_bound: dict[str, Binding], outputs: list[str], out_shapes: dict[str, tuple[int, ...]],
    ) -> dict[str, np.ndarray]:
        rt = cuda.cudart()
        stream = self._stream
        h2d, d2h = rt.cudaMemcpyKind.cudaMemcpyHostToDevice, rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        for n, a in arrays.items():
            if n in self._shape_inputs:
                continue  # already in pinned host memory, bound before infer_shapes
            dev = io.setdefault(n, _Device())
            address = dev.ensure(a.nbytes, stream)
            staged = dev.pinned.view(a.shape, a.dtype)
            staged[...] = a
            cuda.check(rt.cudaMemcpyAsync(address, dev.pinned.address, a.nbytes, h2d, stream.handle))
            ctx.set_tensor_address(n, address)
        # host (numpy) bindings: staged through device memory, copied back after the run
        staged_host: dict[int, int] = {}
        for n, b in host_bound.items():
            nbytes = int(math.prod(b.shape)) * np.dtype(b.dtype).itemsize
            if b.address not in staged_host:
                dev = io.setdefault(f"host:{n}", _Device())
                staged_host[b.address] = dev.ensure(nbytes, stream)
                cuda.check(rt.cudaMemcpyAsync(staged_host[b.address], b.address, nbytes, h2d, stream.handle))
        for n, b in bound.items():
            ctx.set_tensor_address(n, staged_host.get(b.address, b.address) if n in host_bound else b.address)
        for n in self._outputs:
            if n in bound:
                continue
            shape = out_shapes[n]
            dev = io.setdefault(n, _Device())
            ctx.set_tensor_address(n, dev.ensure(int(math.prod(shape)) * self._dtypes[n].itemsize, stream))
        if not ctx.execute_async_v3(stream.handle):
            raise RuntimeError(f"{self._path.name}: TensorRT execute_async_v3 failed (see the TensorRT log)")
        return self._read_outputs(io, outputs, out_shapes, host_bound, staged_host, d2h)

    def _read_outputs(
        self, io: dict[str, _Device], outputs: list[str], out_shapes: dict[str, tuple[int, ...]],
        host_bound: dict[str, Binding], staged_host: dict[int, int], d2h: Any,
    ) -> dict[str, np.ndarray]:
        rt = cuda.cudart()
        stream = self._stream
        views = {}
        for n in outputs:
            if n not in io:
                raise ValueError(f"{n!r} is bound to a buffer, not returned: read it from the buffer")
            dev, shape = io[n], out_shapes[n]
            view = dev.pinned.view(shape, self._dtypes[n])
            cuda.check(rt.cudaMemcpyAsync(dev.pinned.address, dev.address, view.nbytes, d2h, stream.handle))
            views[n] = view
        for address, staged in staged_host.items():
            b = next(b for b in host_bound.values() if b.address == address)
            nbytes = int(math.prod(b.shape)) * np.dtype(b.dtype).itemsize
            cuda.check(rt.cudaMemcpyAsync(address, staged, nbytes, d2h, stream.handle))
        stream.synchronize()
        return {n: np.array(v) for n, v in views.items()}

    def _capture(self, key: tuple[Any, ...], ctx: tensorrt.IExecutionContext, io: dict[str, _Device],
                 out_shapes: dict[str, tuple[int, ...]]) -> None:
        """Capture the context's enqueue (shapes and addresses already set, run once) as a CUDA graph."""
        rt = cuda.cudart()
        handle = self._stream.handle
        try:
            # thread-local, as trtexec captures (samples/common/sampleDevice.h): a global-mode capture would make
            # every other thread's cudaMalloc / synchronous copy fail while it lasts (other sessions of a server)
            mode = rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
            cuda.check(rt.cudaStreamBeginCapture(handle, mode))
            try:
                ok = ctx.execute_async_v3(handle)
            finally:
                graph = cuda.check(rt.cudaStreamEndCapture(handle))
            if not ok:
                raise RuntimeError("execute_async_v3 failed during capture")
            exec_handle = cuda.check(rt.cudaGraphInstantiate(graph, 0))
        except RuntimeError as exc:
            log.warning("%s: CUDA graph capture failed (%s); decode steps run without graphs", self._path.name, exc)
            self._cuda_graphs = False
            for dev in io.values():
                dev.free()
            return
        if len(self._graphs) >= _GRAPHS_KEPT:
            _, old = self._graphs.popitem(last=False)
            self._release(old)
        self._graphs[key] = _Captured(exec_handle, graph, io, out_shapes)

    def _launch(self, captured: _Captured, arrays: dict[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
        rt = cuda.cudart()
        stream = self._stream
        for n, a in arrays.items():
            dev = captured.io[n]
            staged = dev.pinned.view(a.shape, a.dtype)
            staged[...] = a
            cuda.check(rt.cudaMemcpyAsync(dev.address, dev.pinned.address, a.nbytes,
                                          rt.cudaMemcpyKind.cudaMemcpyHostToDevice, stream.handle))
        cuda.check(rt.cudaGraphLaunch(captured.exec_handle, stream.handle))
        return self._read_outputs(captured.io, outputs, captured.output_shapes, {}, {},
                                  rt.cudaMemcpyKind.cudaMemcpyDeviceToHost)

    @property
    def captured_graphs(self) -> int:
        return len(self._graphs)

    def _release(self, captured: _Captured) -> None:
        rt = cuda.cudart()
        cuda.check(rt.cudaGraphExecDestroy(captured.exec_handle))
        cuda.check(rt.cudaGraphDestroy(captured.graph_handle))
        for dev in captured.io.values():
            dev.free()

    def close(self) -> None:
        """Free the engine's device memory (contexts, I/O buffers, captured graphs)."""
        if not self._contexts:
            return
        self._stream.synchronize()
        while self._graphs:
            self._release(self._graphs.popitem()[1])
        for io in self._io:
            for dev in io.values():
                dev.free()
        self._contexts = []
        self._stream.close()
