"""runtime.backends.cuda on a fake cudart: DeviceBuffer matches HostBuffer byte for byte, and every way a
machine can lack CUDA becomes a CudaUnavailable naming what is missing."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from runtime.backends import cuda
from runtime.backends.buffers import HostBuffer
from runtime.types import Unavailable
from tests.fakes.cudart import DeviceProp, FakeCudart, cudaError_t, install


def _device_array(fake: FakeCudart, buf: cuda.DeviceBuffer) -> np.ndarray:
    raw = fake.device_bytes(buf.address, buf.nbytes)
    return np.frombuffer(raw, buf.dtype).reshape(buf.shape)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_device_buffer_matches_host_buffer(monkeypatch: pytest.MonkeyPatch, dtype: type) -> None:
    fake = install(monkeypatch)
    shape = (6, 3, 10, 4)  # rows, heads, length, head_dim
    host, dev = HostBuffer(shape, dtype), cuda.DeviceBuffer(shape, dtype, stream=cuda.Stream())
    rng = np.random.default_rng(0)
    assert dev.nbytes == host.nbytes
    assert _device_array(fake, dev).tobytes() == host.array.tobytes()  # zero-filled like HostBuffer

    def both(name: str, *args: object) -> None:
        a, b = getattr(host, name)(*args), getattr(dev, name)(*args)
        assert a == b, name

    for row in range(shape[0]):
        data = rng.standard_normal((3, 7, 4)).astype(np.float64)  # cast on write, as HostBuffer does
        both("write", row, data, 2)
    both("write", 0, rng.standard_normal((3, 1, 4)), 9)
    both("copy_rows", np.array([4, 5]), np.array([0, 1]), 6)  # disjoint rows
    both("copy_rows", np.array([1, 2, 3]), np.array([0, 1, 2]), 8)  # shift: row 1 and 2 are read and written
    both("copy_rows", np.array([0, 2]), np.array([2, 0]), 10)  # swap
    both("copy_rows", np.array([3]), np.array([3]), 4)  # onto itself
    both("copy_rows", np.array([], np.int64), np.array([], np.int64), 4)
    both("copy_rows", np.array([5]), np.array([1]), 50)  # past the length: clamped
    assert _device_array(fake, dev).tobytes() == host.array.tobytes()
    for row, length in [(0, 10), (3, 4), (5, 0), (2, 12)]:
        a, b = host.read(row, length), dev.read(row, length)
        assert a.shape == b.shape and a.dtype == b.dtype
        assert a.tobytes() == b.tobytes()


def test_bind_windows_leading_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    install(monkeypatch)
    dev = cuda.DeviceBuffer((4, 2, 8, 3), np.float16, device_id=0)
    row_bytes = 2 * 8 * 3 * 2
    b = dev.bind(1, 3)
    assert (b.device, b.device_id, b.shape, b.dtype) == ("cuda", 0, (2, 2, 8, 3), np.dtype(np.float16))
    assert b.address == dev.address + row_bytes
    with pytest.raises(IndexError, match="outside"):
        dev.bind(2, 5)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_flat_views_match_host_buffer(monkeypatch: pytest.MonkeyPatch, dtype: type) -> None:
    """bind_flat / write_flat / read_flat: the first prod(shape) elements as one tensor, whatever the row
    layout (the concat layout's alternating past/present), the same bytes on both buffers."""
    fake = install(monkeypatch)
    shape = (4, 2, 6, 3)
    host, dev = HostBuffer(shape, dtype), cuda.DeviceBuffer(shape, dtype, stream=cuda.Stream())
    rng = np.random.default_rng(1)
    step = rng.standard_normal((3, 2, 5, 3))  # 3 rows of 5 positions: does not line up with the rows of 6
    assert host.write_flat(step) == dev.write_flat(step) == step.size * np.dtype(dtype).itemsize
    assert _device_array(fake, dev).tobytes() == host.array.tobytes()
    np.testing.assert_array_equal(host.array.reshape(-1)[: step.size], step.astype(dtype).reshape(-1))
    assert not host.array.reshape(-1)[step.size :].any()  # nothing past the view was written
    for view in [(3, 2, 5, 3), (3, 2, 6, 3), (1, 2, 1, 3), (0, 2, 4, 3)]:
        a, b = host.read_flat(view), dev.read_flat(view)
        assert a.shape == b.shape == view and a.dtype == b.dtype == np.dtype(dtype)
        assert a.tobytes() == b.tobytes()
    hb, db = host.bind_flat((3, 2, 7, 3)), dev.bind_flat((3, 2, 7, 3))
    assert (hb.device, hb.shape, hb.address) == ("cpu", (3, 2, 7, 3), host.array.ctypes.data)
    assert (db.device, db.shape, db.address, db.dtype) == ("cuda", (3, 2, 7, 3), dev.address, np.dtype(dtype))
    for buf in (host, dev):
        with pytest.raises(ValueError, match="exceeds"):
            buf.bind_flat((4, 2, 6, 4))  # one element per position too many
        with pytest.raises(ValueError, match="exceeds"):
            buf.write_flat(np.zeros((5, 2, 6, 3)))
        with pytest.raises(ValueError, match="exceeds"):
            buf.read_flat((4, 2, 7, 3))
    dev.free()
    with pytest.raises(RuntimeError, match="freed"):
        dev.read_flat((1, 1, 1, 1))


def test_free_releases_memory_once(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = install(monkeypatch)
    dev = cuda.DeviceBuffer((3, 2, 4, 2))
    dev.write(0, np.ones((2, 4, 2)))
    dev.copy_rows(np.array([1, 2]), np.array([0, 1]), 4)  # allocates scratch
    assert len(fake.device) == 2 and len(fake.pinned) == 1
    dev.free()
    dev.free()
    assert not fake.device and not fake.pinned
    with pytest.raises(RuntimeError, match="freed"):
        dev.bind(0, 1)


def test_to_device_and_back(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = install(monkeypatch)
    stream = cuda.Stream()
    address = cuda.check(fake.cudaMalloc(24))
    src = np.arange(6, dtype=np.float32)
    cuda.to_device(address, src[::1], stream)
    out = cuda.to_host(np.empty(6, np.float32), address, stream)
    np.testing.assert_array_equal(out, src)
    cuda.to_device(address, np.arange(12, dtype=np.float32)[::2], None)  # non-contiguous source
    np.testing.assert_array_equal(cuda.to_host(np.empty(6, np.float32), address), np.arange(0, 12, 2))
    stream.close()
    assert stream.handle == 0


def test_probe_reports_the_device(monkeypatch: pytest.MonkeyPatch) -> None:
    install(monkeypatch, FakeCudart(prop=DeviceProp(name=b"Orin\0\0junk", major=8, minor=7, totalGlobalMem=7 << 30)))
    info = cuda.probe(0)
    assert info == cuda.GpuInfo(0, "Orin", (8, 7), 7 << 30, True, 12060, 12060)
    assert "sm 8.7" in cuda.describe(info) and "CUDA 12.6" in cuda.describe(info)


def test_probe_without_driver_names_the_driver(monkeypatch: pytest.MonkeyPatch) -> None:
    # what cuda-bindings returns on a machine without the NVIDIA driver
    install(monkeypatch, FakeCudart(error=cudaError_t.cudaErrorInsufficientDriver))
    with pytest.raises(cuda.CudaUnavailable, match=r"cudaErrorInsufficientDriver.*driver") as info:
        cuda.probe()
    assert isinstance(info.value, Unavailable)


def test_probe_without_devices_or_with_a_wrong_id(monkeypatch: pytest.MonkeyPatch) -> None:
    install(monkeypatch, FakeCudart(devices=0))
    with pytest.raises(cuda.CudaUnavailable, match="no CUDA device"):
        cuda.probe()
    install(monkeypatch, FakeCudart(devices=2))
    with pytest.raises(cuda.CudaUnavailable, match="device 3 was requested but this machine has 2"):
        cuda.probe(3)


def test_missing_package_names_cuda_python(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "cuda", None)  # type: ignore[arg-type]
    monkeypatch.setitem(sys.modules, "cuda.bindings", None)  # type: ignore[arg-type]
    with pytest.raises(cuda.CudaUnavailable, match="cuda-python"):
        cuda.probe()
    with pytest.raises(cuda.CudaUnavailable, match="cuda-python"):
        cuda.DeviceBuffer((1, 1, 1, 1))


def test_check_unpacks_and_names_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    install(monkeypatch)
    ok = cudaError_t.cudaSuccess
    assert cuda.check((ok,)) is None
    assert cuda.check((ok, 5)) == 5
    assert cuda.check((ok, 1, 2)) == (1, 2)
    with pytest.raises(RuntimeError, match="cudaErrorMemoryAllocation") as info:
        cuda.check((cudaError_t.cudaErrorMemoryAllocation, None))
    assert not isinstance(info.value, Unavailable)
    with pytest.raises(cuda.CudaUnavailable, match="cudaErrorNoDevice"):
        cuda.check((cudaError_t.cudaErrorNoDevice, None))
