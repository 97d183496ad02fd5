"""A stand-in for ``cuda.bindings.runtime`` on machines without a GPU: "device" memory is host memory
(ctypes buffers), copies are ``ctypes.memmove``, streams run their work at once unless they are being
captured, in which case the work is recorded and ``cudaGraphLaunch`` replays it. Device addresses are
checked against the live allocations, so an out-of-range copy fails the test instead of corrupting memory.
"""

from __future__ import annotations

import ctypes
import enum
import sys
import threading
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest


class cudaError_t(enum.IntEnum):
    cudaSuccess = 0
    cudaErrorInvalidValue = 1
    cudaErrorMemoryAllocation = 2
    cudaErrorInsufficientDriver = 35
    cudaErrorNoDevice = 100
    cudaErrorInvalidDevice = 101
    cudaErrorStreamCaptureUnsupported = 900


class cudaMemcpyKind(enum.IntEnum):
    cudaMemcpyHostToHost = 0
    cudaMemcpyHostToDevice = 1
    cudaMemcpyDeviceToHost = 2
    cudaMemcpyDeviceToDevice = 3


class cudaStreamCaptureMode(enum.IntEnum):
    cudaStreamCaptureModeGlobal = 0
    cudaStreamCaptureModeThreadLocal = 1
    cudaStreamCaptureModeRelaxed = 2


@dataclass
class DeviceProp:
    name: bytes = b"Fake GPU"
    major: int = 8
    minor: int = 7
    totalGlobalMem: int = 8 << 30
    integrated: int = 1


@dataclass
class Graph:
    ops: list[Callable[[], object]] = field(default_factory=list)


OK = cudaError_t.cudaSuccess
_Error = cudaError_t


class FakeCudart:
    """The subset of cudart the runtime calls. ``error`` makes every call fail with that code (a machine
    without a driver: cudaErrorInsufficientDriver)."""

    cudaError_t = cudaError_t
    cudaMemcpyKind = cudaMemcpyKind
    cudaStreamCaptureMode = cudaStreamCaptureMode
    cudaStreamNonBlocking = 1

    def __init__(self, devices: int = 1, prop: DeviceProp | None = None, error: _Error | None = None) -> None:
        self.devices = devices
        self.prop = prop or DeviceProp()
        self.error = error
        self.device: dict[int, ctypes.Array[ctypes.c_char]] = {}
        self.pinned: dict[int, ctypes.Array[ctypes.c_char]] = {}
        self.streams: set[int] = set()
        self.capturing: dict[int, Graph] = {}
        self.capture_modes: dict[int, tuple[cudaStreamCaptureMode, int]] = {}
        """Capturing stream -> (mode, id of the thread that began the capture)."""
        self.graphs: dict[int, Graph] = {}
        self.launches = 0
        self.calls: list[str] = []
        self._next = 1

    # -- helpers -------------------------------------------------------------------------------
    def _handle(self) -> int:
        self._next += 1
        return self._next

    def _fail(self) -> tuple[Any, None] | None:
        return (self.error, None) if self.error is not None else None

    def enqueue(self, stream: Any, op: Callable[[], object]) -> None:
        """Run ``op`` now, or record it when ``stream`` is being captured."""
        graph = self.capturing.get(int(stream or 0))
        if graph is not None:
            graph.ops.append(op)
        else:
            op()

    def _capture_forbids(self) -> tuple[Any] | None:
        """CUDA's capture-mode rule for "potentially unsafe" calls (cudaMalloc, cudaFree, synchronous copies):
        forbidden in a thread with its own non-relaxed capture, and in every thread while any thread has a
        global-mode capture."""
        me = threading.get_ident()
        for mode, thread in self.capture_modes.values():
            if mode == cudaStreamCaptureMode.cudaStreamCaptureModeGlobal or (
                    thread == me and mode != cudaStreamCaptureMode.cudaStreamCaptureModeRelaxed):
                return (cudaError_t.cudaErrorStreamCaptureUnsupported,)
        return None

    def check_device(self, address: int, nbytes: int) -> None:
        for base, buf in self.device.items():
            if base <= address and address + nbytes <= base + len(buf):
                return
        raise AssertionError(f"device range [{address:#x}, +{nbytes}) is not inside a live allocation")

    def device_bytes(self, address: int, nbytes: int) -> bytes:
        self.check_device(address, nbytes)
        return ctypes.string_at(address, nbytes)

    # -- device ---------------------------------------------------------------------------------
    def cudaGetErrorName(self, err: Any) -> tuple[Any, bytes]:
        return OK, cudaError_t(err).name.encode()

    def cudaGetDeviceCount(self) -> tuple[Any, Any]:
        self.calls.append("cudaGetDeviceCount")
        return self._fail() or (OK, self.devices)

    def cudaGetDeviceProperties(self, device: int) -> tuple[Any, Any]:
        if device >= self.devices:
            return cudaError_t.cudaErrorInvalidDevice, None
        return self._fail() or (OK, self.prop)

    def cudaDriverGetVersion(self) -> tuple[Any, Any]:
        return OK, 12060

    def cudaRuntimeGetVersion(self) -> tuple[Any, Any]:
        return OK, 12060

    def cudaDeviceSynchronize(self) -> tuple[Any]:
        return (OK,)

    # -- memory ---------------------------------------------------------------------------------
    def cudaMalloc(self, nbytes: int) -> tuple[Any, Any]:
        self.calls.append("cudaMalloc")
        if (failed := self._fail()) is not None:
            return failed
        if (forbidden := self._capture_forbids()) is not None:
            return forbidden[0], None
        buf = ctypes.create_string_buffer(b"\xa5" * nbytes, nbytes)  # garbage, as cudaMalloc gives
        address = ctypes.addressof(buf)
        self.device[address] = buf
        return OK, address

    def cudaFree(self, address: int) -> tuple[Any]:
        self.calls.append("cudaFree")
        if (forbidden := self._capture_forbids()) is not None:
            return forbidden
        if address not in self.device:
            return (cudaError_t.cudaErrorInvalidValue,)
        del self.device[address]
        return (OK,)

    def cudaMallocHost(self, nbytes: int) -> tuple[Any, Any]:
        buf = ctypes.create_string_buffer(nbytes)
        address = ctypes.addressof(buf)
        self.pinned[address] = buf
        return OK, address

    def cudaFreeHost(self, address: int) -> tuple[Any]:
        if address not in self.pinned:
            return (cudaError_t.cudaErrorInvalidValue,)
        del self.pinned[address]
        return (OK,)

    def cudaMemsetAsync(self, address: int, value: int, nbytes: int, stream: Any) -> tuple[Any]:
        self.check_device(address, nbytes)
        self.enqueue(stream, lambda: ctypes.memset(address, value, nbytes))
        return (OK,)

    def _check_kind(self, dst: int, src: int, nbytes: int, kind: Any) -> None:
        if kind in (cudaMemcpyKind.cudaMemcpyHostToDevice, cudaMemcpyKind.cudaMemcpyDeviceToDevice):
            self.check_device(dst, nbytes)
        if kind in (cudaMemcpyKind.cudaMemcpyDeviceToHost, cudaMemcpyKind.cudaMemcpyDeviceToDevice):
            self.check_device(src, nbytes)

    def cudaMemcpy(self, dst: int, src: int, nbytes: int, kind: Any) -> tuple[Any]:
        self._check_kind(dst, src, nbytes, kind)
        ctypes.memmove(dst, src, nbytes)
        return (OK,)

    def cudaMemcpyAsync(self, dst: int, src: int, nbytes: int, kind: Any, stream: Any) -> tuple[Any]:
        self.calls.append("cudaMemcpyAsync")
        self._check_kind(dst, src, nbytes, kind)
        self.enqueue(stream, lambda: ctypes.memmove(dst, src, nbytes))
        return (OK,)

    def cudaMemcpy2DAsync(
        self, dst: int, dpitch: int, src: int, spitch: int, width: int, height: int, kind: Any, stream: Any
    ) -> tuple[Any]:
        self.calls.append("cudaMemcpy2DAsync")
        if width > dpitch or width > spitch:
            return (cudaError_t.cudaErrorInvalidValue,)
        for r in range(height):
            self._check_kind(dst + r * dpitch, src + r * spitch, width, kind)

        def op() -> None:
            for r in range(height):
                ctypes.memmove(dst + r * dpitch, src + r * spitch, width)

        self.enqueue(stream, op)
        return (OK,)

    # -- streams and graphs ---------------------------------------------------------------------
    def cudaStreamCreateWithFlags(self, flags: int) -> tuple[Any, Any]:
        if (failed := self._fail()) is not None:
            return failed
        handle = self._handle()
        self.streams.add(handle)
        return OK, handle

    def cudaStreamSynchronize(self, stream: Any) -> tuple[Any]:
        if int(stream) in self.capturing:
            return (cudaError_t.cudaErrorInvalidValue,)  # synchronizing inside a capture is illegal
        return (OK,)

    def cudaStreamDestroy(self, stream: Any) -> tuple[Any]:
        self.streams.discard(int(stream))
        return (OK,)

    def cudaStreamBeginCapture(self, stream: Any, mode: Any) -> tuple[Any]:
        self.calls.append("cudaStreamBeginCapture")
        if not isinstance(mode, cudaStreamCaptureMode):
            return (cudaError_t.cudaErrorInvalidValue,)
        self.capturing[int(stream)] = Graph()
        self.capture_modes[int(stream)] = (mode, threading.get_ident())
        return (OK,)

    def cudaStreamEndCapture(self, stream: Any) -> tuple[Any, Any]:
        graph = self.capturing.pop(int(stream))
        self.capture_modes.pop(int(stream), None)
        handle = self._handle()
        self.graphs[handle] = graph
        return OK, handle

    def cudaGraphInstantiate(self, graph: Any, flags: int) -> tuple[Any, Any]:
        handle = self._handle()
        self.graphs[handle] = self.graphs[int(graph)]
        return OK, handle

    def cudaGraphLaunch(self, graph_exec: Any, stream: Any) -> tuple[Any]:
        self.calls.append("cudaGraphLaunch")
        self.launches += 1
        for op in self.graphs[int(graph_exec)].ops:
            op()
        return (OK,)

    def cudaGraphDestroy(self, graph: Any) -> tuple[Any]:
        return (OK,)

    def cudaGraphExecDestroy(self, graph_exec: Any) -> tuple[Any]:
        self.graphs.pop(int(graph_exec), None)
        return (OK,)


def install(monkeypatch: pytest.MonkeyPatch, fake: FakeCudart | None = None) -> FakeCudart:
    """Make ``from cuda.bindings import runtime`` return ``fake`` for this test only."""
    fake = fake or FakeCudart()
    cuda = types.ModuleType("cuda")
    bindings = types.ModuleType("cuda.bindings")
    bindings.runtime = fake  # type: ignore[attr-defined]
    cuda.bindings = bindings  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "cuda", cuda)
    monkeypatch.setitem(sys.modules, "cuda.bindings", bindings)
    monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", fake)  # type: ignore[arg-type]
    return fake
