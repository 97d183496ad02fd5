"""CUDA device memory, streams and copies through cuda-python (``cuda.bindings.runtime``), without torch.

Everything here imports on any machine: ``cudart()`` imports cuda-python lazily, and every failure a
GPU-less machine produces (package absent, no driver, no device) becomes a ``CudaUnavailable`` that names
what is missing. ``DeviceBuffer`` is the CUDA implementation of ``runtime.backends.buffers.Buffer``: one
``cudaMalloc`` per buffer, windows of leading rows bound as tensors, row copies as strided 2-D copies on the
device, host writes and reads staged through pinned memory.
"""

from __future__ import annotations

import ctypes
import math
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

from runtime.backends.buffers import Binding, flat_size
from runtime.types import Unavailable

_INSTALL_HINT = "pip install 'cuda-python>=12' matching the machine's CUDA major version (12 on JetPack 6)"
_UNAVAILABLE_ERRORS = frozenset(
    {
        "cudaErrorInsufficientDriver",
        "cudaErrorNoDevice",
        "cudaErrorInvalidDevice",
        "cudaErrorDevicesUnavailable",
        "cudaErrorStubLibrary",
        "cudaErrorCallRequiresNewerDriver",
        "cudaErrorSystemDriverMismatch",
        "cudaErrorCompatNotSupportedOnDevice",
        "cudaErrorSystemNotReady",
        "cudaErrorInitializationError",
    }
)
"""Errors meaning "no usable GPU here" rather than a bug: mapped to CudaUnavailable."""
_ERROR_HINTS = {
    "cudaErrorInsufficientDriver": "no NVIDIA driver is loaded, or it is older than this CUDA runtime",
    "cudaErrorNoDevice": "no CUDA device is visible (check CUDA_VISIBLE_DEVICES and the driver)",
    "cudaErrorInvalidDevice": "the requested CUDA device does not exist",
    "cudaErrorStubLibrary": "only the CUDA stub library was found, not the driver's libcuda",
}


class CudaUnavailable(Unavailable):
    """No usable CUDA here: the message names the missing package, driver or device."""


def cudart() -> ModuleType:
    """``cuda.bindings.runtime``, imported on first use."""
    try:
        from cuda.bindings import runtime
    except ImportError as exc:
        raise CudaUnavailable(f"the cuda-python package (cuda.bindings) is not installed: {_INSTALL_HINT}") from exc
    return runtime


def _error_name(rt: Any, err: Any) -> str:
    try:
        named = rt.cudaGetErrorName(err)
        raw = named[1] if isinstance(named, tuple) else named
        return raw.decode() if isinstance(raw, bytes) else str(raw)
    except Exception:
        return str(getattr(err, "name", err))


def check(ret: Any) -> Any:
    """Unpack a cuda-python result ``(err, *values)``: None, the one value, or a tuple of them.

    Raises CudaUnavailable for "no usable GPU" errors (no driver, no device) and RuntimeError, with the
    error's name, for any other failure.
    """
    rt = cudart()
    err, *values = ret if isinstance(ret, tuple) else (ret,)
    if err != rt.cudaError_t.cudaSuccess:
        name = _error_name(rt, err)
        if name in _UNAVAILABLE_ERRORS:
            hint = _ERROR_HINTS.get(name, "CUDA cannot be used on this machine")
            raise CudaUnavailable(f"CUDA is unavailable ({name}): {hint}")
        raise RuntimeError(f"CUDA call failed: {name}")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


@dataclass(frozen=True)
class GpuInfo:
    """What ``probe`` found: the device, and the driver and runtime versions (CUDA's 1000*major + 10*minor)."""

    device_id: int
    name: str
    compute_capability: tuple[int, int]
    total_memory: int
    """Bytes; on Jetson this is the shared system memory."""
    integrated: bool
    """True on Jetson (iGPU, unified memory)."""
    driver_version: int
    runtime_version: int


def _version(v: int) -> str:
    return f"{v // 1000}.{(v % 1000) // 10}"


def probe(device_id: int = 0) -> GpuInfo:
    """The CUDA device ``device_id``; CudaUnavailable naming the missing package, driver or device."""
    rt = cudart()
    try:
        count = int(check(rt.cudaGetDeviceCount()))
    except CudaUnavailable as exc:
        raise CudaUnavailable(f"cuda-python is installed but {exc}") from exc
    if count == 0:
        raise CudaUnavailable("the NVIDIA driver is loaded but reports no CUDA device")
    if not 0 <= device_id < count:
        raise CudaUnavailable(f"CUDA device {device_id} was requested but this machine has {count} (0..{count - 1})")
    props = check(rt.cudaGetDeviceProperties(device_id))
    name = props.name
    if isinstance(name, bytes):
        name = name.split(b"\0", 1)[0].decode(errors="replace")
    return GpuInfo(
        device_id=device_id,
        name=str(name),
        compute_capability=(int(props.major), int(props.minor)),
        total_memory=int(props.totalGlobalMem),
        integrated=bool(props.integrated),
        driver_version=int(check(rt.cudaDriverGetVersion())),
        runtime_version=int(check(rt.cudaRuntimeGetVersion())),
    )


def describe(info: GpuInfo) -> str:
    """One line for logs and doctor output."""
    cc = ".".join(map(str, info.compute_capability))
    kind = "integrated" if info.integrated else "discrete"
    return (
        f"{info.name} (sm {cc}, {info.total_memory / 2**30:.1f} GiB, {kind}; driver CUDA {_version(info.driver_version)}, "
        f"runtime CUDA {_version(info.runtime_version)})"
    )


class Stream:
    """A non-blocking CUDA stream (never the legacy default stream, which synchronizes with everything)."""

    def __init__(self) -> None:
        rt = cudart()
        self._raw: Any = check(rt.cudaStreamCreateWithFlags(rt.cudaStreamNonBlocking))
        self.handle: int = int(self._raw)

    def synchronize(self) -> None:
        check(cudart().cudaStreamSynchronize(self.handle))

    def close(self) -> None:
        if self.handle:
            check(cudart().cudaStreamDestroy(self.handle))
            self.handle = 0

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _stream_handle(stream: Stream | None) -> int:
    return stream.handle if stream is not None else 0


class PinnedHost:
    """Page-locked host memory (``cudaMallocHost``), grown on demand, viewed as numpy arrays."""

    def __init__(self) -> None:
        self.address = 0
        self.nbytes = 0

    def view(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """The first bytes of the pinned block as an array (valid until the next ``view``)."""
        need = int(math.prod(shape)) * dtype.itemsize
        if need > self.nbytes:
            self.free()
            self.address = int(check(cudart().cudaMallocHost(max(need, 1))))
            self.nbytes = max(need, 1)
        raw = (ctypes.c_ubyte * max(need, 1)).from_address(self.address)
        # uint8 first, then .view(dtype): ctypes has no float16/bfloat16 type
        return np.frombuffer(memoryview(raw), np.uint8, need).view(dtype).reshape(shape)

    def free(self) -> None:
        if self.address:
            check(cudart().cudaFreeHost(self.address))
            self.address, self.nbytes = 0, 0


def to_device(dst_address: int, host: np.ndarray, stream: Stream | None = None) -> None:
    """Copy the host array's bytes to ``dst_address`` (enqueued on ``stream``; ``host`` must stay alive
    until the stream reaches the copy: pageable memory is copied before this returns)."""
    rt = cudart()
    src = np.ascontiguousarray(host)
    check(rt.cudaMemcpyAsync(dst_address, src.ctypes.data, src.nbytes, rt.cudaMemcpyKind.cudaMemcpyHostToDevice,
                             _stream_handle(stream)))
    if src is not host:
        _sync(stream)  # the temporary contiguous copy dies here


def to_host(host: np.ndarray, src_address: int, stream: Stream | None = None) -> np.ndarray:
    """Copy ``host.nbytes`` bytes from ``src_address`` into ``host`` (C-contiguous); returns when they landed."""
    if not host.flags.c_contiguous:
        raise ValueError("to_host needs a C-contiguous destination array")
    rt = cudart()
    check(rt.cudaMemcpyAsync(host.ctypes.data, src_address, host.nbytes, rt.cudaMemcpyKind.cudaMemcpyDeviceToHost,
                             _stream_handle(stream)))
    _sync(stream)
    return host


def _sync(stream: Stream | None) -> None:
    if stream is not None:
        stream.synchronize()
    else:
        check(cudart().cudaDeviceSynchronize())


class DeviceBuffer:
    """A ``Buffer`` in CUDA memory: shape (rows, H, L, ...) where axis 2 is the sequence axis.

    Allocated once (``cudaMalloc``) and zero-filled, like ``HostBuffer``. Copies run on ``stream`` (the
    legacy default stream when None); ``write`` and ``read`` return after their copy completed.
    """

    def __init__(
        self, shape: tuple[int, ...], dtype: np.dtype | type = np.float32, device_id: int = 0,
        stream: Stream | None = None,
    ) -> None:
        if len(shape) < 3:
            raise ValueError(f"DeviceBuffer shape {shape} needs (rows, heads, length, ...)")
        self._shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        self.device_id = device_id
        self.stream = stream
        self._plane = int(math.prod(self._shape[3:])) * self.dtype.itemsize  # bytes of one sequence position
        self._pitch = self._shape[2] * self._plane  # bytes of one head's sequence
        self._row = self._shape[1] * self._pitch
        rt = cudart()
        self._nbytes = self._shape[0] * self._row
        self.address: int = int(check(rt.cudaMalloc(max(self._nbytes, 1))))
        check(rt.cudaMemsetAsync(self.address, 0, self._nbytes, _stream_handle(stream)))
        self._scratch = 0
        self._scratch_bytes = 0
        self._pinned = PinnedHost()

    @property
    def shape(self) -> tuple[int, ...]:
        return self._shape

    @property
    def nbytes(self) -> int:
        return self._nbytes

    def bind(self, start: int, stop: int) -> Binding:
        if not 0 <= start <= stop <= self._shape[0]:
            raise IndexError(f"rows [{start}, {stop}) are outside this buffer's {self._shape[0]} rows")
        self._live()
        return Binding("cuda", self.device_id, self.dtype, (stop - start, *self._shape[1:]),
                       self.address + start * self._row)

    def _live(self) -> None:
        if not self.address:
            raise RuntimeError("this DeviceBuffer was freed")

    def _copy2d(self, dst: int, dpitch: int, src: int, spitch: int, width: int, kind: Any) -> None:
        # one head per 2-D row: ``width`` bytes of each head's sequence, H heads
        check(cudart().cudaMemcpy2DAsync(dst, dpitch, src, spitch, width, self._shape[1], kind,
                                         _stream_handle(self.stream)))

    def copy_rows(self, dst: np.ndarray, src: np.ndarray, length: int) -> int:
        dst_rows = [int(r) for r in np.asarray(dst).reshape(-1)]
        src_rows = [int(r) for r in np.asarray(src).reshape(-1)]
        if not dst_rows or length <= 0:
            return 0
        if len(dst_rows) != len(src_rows):
            raise ValueError(f"copy_rows got {len(dst_rows)} destination rows and {len(src_rows)} sources")
        self._live()
        length = min(length, self._shape[2])
        width = length * self._plane
        kind = cudart().cudaMemcpyKind.cudaMemcpyDeviceToDevice
        if set(dst_rows) & set(src_rows):
            # a row is both read and written: every source goes to scratch first, so all are read before any write
            compact = self._shape[1] * width
            scratch = self._scratch_for(compact * len(src_rows))
            for i, s in enumerate(src_rows):
                self._copy2d(scratch + i * compact, width, self.address + s * self._row, self._pitch, width, kind)
            for i, d in enumerate(dst_rows):
                self._copy2d(self.address + d * self._row, self._pitch, scratch + i * compact, width, width, kind)
        else:
            for d, s in zip(dst_rows, src_rows):
                self._copy2d(self.address + d * self._row, self._pitch, self.address + s * self._row, self._pitch,
                             width, kind)
        return len(dst_rows) * self._shape[1] * width

    def _scratch_for(self, nbytes: int) -> int:
        if nbytes > self._scratch_bytes:
            rt = cudart()
            if self._scratch:
                _sync(self.stream)  # earlier copies may still read the old scratch
                check(rt.cudaFree(self._scratch))
            self._scratch = int(check(rt.cudaMalloc(nbytes)))
            self._scratch_bytes = nbytes
        return self._scratch

    def _check_row(self, row: int) -> None:
        if not 0 <= row < self._shape[0]:
            raise IndexError(f"row {row} is outside this buffer's {self._shape[0]} rows")

    def write(self, row: int, data: np.ndarray, offset: int = 0) -> int:
        self._check_row(row)
        self._live()
        data = np.asarray(data)
        heads, steps = data.shape[0], data.shape[1]
        if heads != self._shape[1] or tuple(data.shape[2:]) != self._shape[3:]:
            raise ValueError(f"write of {data.shape} into rows of {self._shape[1:]}")
        if offset < 0 or offset + steps > self._shape[2]:
            raise IndexError(f"positions [{offset}, {offset + steps}) exceed this buffer's length {self._shape[2]}")
        if steps == 0:
            return 0
        staged = self._pinned.view(tuple(data.shape), self.dtype)
        staged[...] = data
        width = steps * self._plane
        self._copy2d(self.address + row * self._row + offset * self._plane, self._pitch, self._pinned.address, width,
                     width, cudart().cudaMemcpyKind.cudaMemcpyHostToDevice)
        _sync(self.stream)  # the pinned block is reused by the next call
        return int(data.nbytes)

    def read(self, row: int, length: int) -> np.ndarray:
        self._check_row(row)
        self._live()
        length = max(0, min(length, self._shape[2]))
        out_shape = (1, self._shape[1], length, *self._shape[3:])
        if length == 0:
            return np.zeros(out_shape, self.dtype)
        staged = self._pinned.view(out_shape, self.dtype)
        width = length * self._plane
        self._copy2d(self._pinned.address, width, self.address + row * self._row, self._pitch, width,
                     cudart().cudaMemcpyKind.cudaMemcpyDeviceToHost)
        _sync(self.stream)
        return np.array(staged)

    def bind_flat(self, shape: tuple[int, ...]) -> Binding:
        shape = tuple(int(d) for d in shape)
        flat_size(shape, self._nbytes // self.dtype.itemsize)
        self._live()
        return Binding("cuda", self.device_id, self.dtype, shape, self.address)

    def read_flat(self, shape: tuple[int, ...]) -> np.ndarray:
        shape = tuple(int(d) for d in shape)
        flat_size(shape, self._nbytes // self.dtype.itemsize)
        self._live()
        out = np.empty(shape, self.dtype)
        if out.size:
            to_host(out, self.address, self.stream)
        return out

    def write_flat(self, data: np.ndarray) -> int:
        host = np.ascontiguousarray(data, self.dtype)
        flat_size(tuple(host.shape), self._nbytes // self.dtype.itemsize)
        self._live()
        if host.size:
            to_device(self.address, host, self.stream)
            _sync(self.stream)  # ``host`` may be a temporary: the copy has landed before it goes
        return int(host.nbytes)

    def free(self) -> None:
        """Release the device and pinned memory (idempotent)."""
        if not self.address:
            return
        rt = cudart()
        _sync(self.stream)
        check(rt.cudaFree(self.address))
        self.address = 0
        if self._scratch:
            check(rt.cudaFree(self._scratch))
            self._scratch, self._scratch_bytes = 0, 0
        self._pinned.free()
