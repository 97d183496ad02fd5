"""Backend-owned tensor memory that a session binds as a graph input and output without copying.

A ``Buffer`` is one allocation of shape (rows, ...); ``Binding`` names a contiguous window of its leading
rows as a tensor (device, element type, shape, address). The decoder's KV pool holds one buffer per layer
K and V and binds the window of the rows in a batch to ``past_*`` and ``present_*`` at once, so the graph
updates them in place. Row copies (beam forks, prefix loads, compaction) go through the buffer, never
through a fresh array per step. The concat decoder layout on a device backend instead views the first elements
of a buffer as one tensor of the step's shape (``bind_flat``): its past in one buffer, its present written
into a second, the two swapped each step. ``HostBuffer`` is the CPU implementation (numpy memory); a device backend
implements the same protocol over its own allocations (e.g. CUDA memory and cudaMemcpy).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import numpy as np


@dataclass(frozen=True)
class Binding:
    """A tensor in backend memory: what IOBinding's ``bind_input``/``bind_output`` (or TensorRT's
    ``set_tensor_address``) take."""

    device: str
    """"cpu" or "cuda"."""
    device_id: int
    dtype: np.dtype
    shape: tuple[int, ...]
    address: int


class Buffer(Protocol):
    @property
    def shape(self) -> tuple[int, ...]: ...

    @property
    def nbytes(self) -> int: ...

    def bind(self, start: int, stop: int) -> Binding:
        """Rows [start, stop) as one tensor (contiguous: rows are the leading axis)."""
        ...

    def copy_rows(self, dst: np.ndarray, src: np.ndarray, length: int) -> int:
        """Row dst[i] <- row src[i] (all src read before any write), the first ``length`` positions of the
        sequence axis (axis 2). Returns the bytes copied."""
        ...

    def write(self, row: int, data: np.ndarray, offset: int = 0) -> int:
        """Host ``data`` (H, T, hd) into ``row`` at sequence positions [offset, offset + T). Returns bytes."""
        ...

    def read(self, row: int, length: int) -> np.ndarray:
        """A host copy (1, H, length, hd) of the first ``length`` positions of ``row``."""
        ...

    def bind_flat(self, shape: tuple[int, ...]) -> Binding:
        """The first prod(``shape``) elements as one contiguous tensor of ``shape`` (ignoring the row layout)."""
        ...

    def read_flat(self, shape: tuple[int, ...]) -> np.ndarray:
        """A host copy of the first prod(``shape``) elements, as ``shape``."""
        ...

    def write_flat(self, data: np.ndarray) -> int:
        """Host ``data`` (any shape, cast to the buffer's type) into the first ``data.size`` elements. Returns bytes."""
        ...


def flat_size(shape: tuple[int, ...], capacity: int) -> int:
    """Elements of a flat view of ``shape`` in a buffer of ``capacity`` elements; ValueError if it exceeds it."""
    n = math.prod(shape)
    if n > capacity or min(shape, default=0) < 0:
        raise ValueError(f"a flat view of shape {tuple(shape)} ({n} elements) exceeds this buffer's {capacity}")
    return n


class HostBuffer:
    """A ``Buffer`` in host memory (numpy). Zero-filled lazily by the OS (untouched pages cost no RSS)."""

    def __init__(self, shape: tuple[int, ...], dtype: np.dtype | type = np.float32) -> None:
        self.array = np.zeros(shape, dtype)
        self._address = int(self.array.ctypes.data)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)

    @property
    def nbytes(self) -> int:
        return int(self.array.nbytes)

    def bind(self, start: int, stop: int) -> Binding:
        window = self.array[start:stop]
        return Binding("cpu", 0, self.array.dtype, tuple(window.shape), int(window.ctypes.data))

    def copy_rows(self, dst: np.ndarray, src: np.ndarray, length: int) -> int:
        if len(dst) == 0 or length <= 0:
            return 0
        rows = self.array[src, :, :length]  # fancy indexing: a copy, so overlapping moves are safe
        self.array[dst, :, :length] = rows
        return int(rows.nbytes)

    def write(self, row: int, data: np.ndarray, offset: int = 0) -> int:
        self.array[row, :, offset : offset + data.shape[1]] = data
        return int(data.nbytes)

    def read(self, row: int, length: int) -> np.ndarray:
        return np.array(self.array[row : row + 1, :, :length])

    def _flat(self, shape: tuple[int, ...]) -> np.ndarray:
        n = flat_size(shape, self.array.size)
        return self.array.reshape(-1)[:n].reshape(shape)

    def bind_flat(self, shape: tuple[int, ...]) -> Binding:
        shape = tuple(int(d) for d in shape)
        flat_size(shape, self.array.size)
        return Binding("cpu", 0, self.array.dtype, shape, self._address)

    def read_flat(self, shape: tuple[int, ...]) -> np.ndarray:
        return np.array(self._flat(tuple(shape)))

    def write_flat(self, data: np.ndarray) -> int:
        data = np.asarray(data)
        self._flat(tuple(data.shape))[...] = data
        return int(data.size * self.array.itemsize)
