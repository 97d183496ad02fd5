"""Backend-owned tensor memory that a session binds as a graph input and output without copying.

A ``Buffer`` is one allocation of shape (rows, ...); ``Binding`` names a contiguous window of its leading
rows as a tensor (device, element type, shape, address). The decoder's KV pool holds one buffer per layer
K and V and binds the window of the rows in a batch to ``past_*`` and ``present_*`` at once, so the graph
updates them in place. Row copies (beam forks, prefix loads, compaction) go through the buffer, never
through a fresh array per step. ``HostBuffer`` is the CPU implementation (numpy memory); a device backend
implements the same protocol over its own allocations (e.g. CUDA memory and cudaMemcpy).
"""

from __future__ import annotations

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


class HostBuffer:
    """A ``Buffer`` in host memory (numpy). Zero-filled lazily by the OS (untouched pages cost no RSS)."""

    def __init__(self, shape: tuple[int, ...], dtype: np.dtype | type = np.float32) -> None:
        self.array = np.zeros(shape, dtype)

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
