"""Self-attention KV cache of a group of rows (one request's sequence, or its beams) and the prefix cache."""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np


@dataclass
class RowState:
    """Decoder state of n rows that advance together (a request's sequence or its beams).

    keys/values: per layer (n, H, L, hd); mask: (n, L) 1 = real token; next_pos: (n,) position of the next
    token; memory: per cross-attention block K, V (n, h, num_latents, dh) of each row's LAST image, which
    every generated token attends to; has_image: (n,) 1 if the row has any image (text_time for decode).
    """

    keys: list[np.ndarray]
    values: list[np.ndarray]
    mask: np.ndarray
    next_pos: np.ndarray
    memory: list[tuple[np.ndarray, np.ndarray]]
    has_image: np.ndarray

    @property
    def rows(self) -> int:
        return int(self.mask.shape[0])

    @property
    def length(self) -> int:
        return int(self.mask.shape[1])

    @property
    def nbytes(self) -> int:
        kv = sum(k.nbytes + v.nbytes for k, v in zip(self.keys, self.values))
        mem = sum(k.nbytes + v.nbytes for k, v in self.memory)
        return int(kv + mem + self.mask.nbytes)

    def select(self, rows: np.ndarray) -> RowState:
        """Rows reordered / forked by index (beam search parents); shares nothing writable with self."""
        idx = np.asarray(rows, dtype=np.int64)
        return RowState(
            keys=[k[idx] for k in self.keys],
            values=[v[idx] for v in self.values],
            mask=self.mask[idx],
            next_pos=self.next_pos[idx],
            memory=[(k[idx], v[idx]) for k, v in self.memory],
            has_image=self.has_image[idx],
        )


def left_pad(array: np.ndarray, length: int, axis: int) -> np.ndarray:
    """Zero-pad ``array`` on the left of ``axis`` up to ``length``."""
    missing = length - array.shape[axis]
    if missing <= 0:
        return array
    widths = [(0, 0)] * array.ndim
    widths[axis] = (missing, 0)
    return np.pad(array, widths)


@dataclass(frozen=True)
class PrefixEntry:
    """KV of one row's prompt prefix (no padding): per layer (1, H, P, hd)."""

    keys: tuple[np.ndarray, ...]
    values: tuple[np.ndarray, ...]
    length: int
    images: int

    @property
    def nbytes(self) -> int:
        return int(sum(k.nbytes + v.nbytes for k, v in zip(self.keys, self.values)))


def prefix_key(tenant: str, ids: np.ndarray, image_keys: list[str]) -> str:
    """Content key: tenant salt + prefix token ids + the identity of every image in the prefix."""
    digest = hashlib.sha256()
    digest.update(tenant.encode() + b"\0")
    digest.update(np.ascontiguousarray(ids, dtype=np.int64).tobytes())
    for key in image_keys:
        digest.update(b"\0" + key.encode())
    return digest.hexdigest()


Owner = tuple[str, str]
"""(tenant, user_id) of a stored history a prefix was computed from."""


class PrefixCache:
    """LRU of prompt-prefix KV under a byte budget, with hit/miss/byte counters. Thread-safe.

    Entries are tagged with the (tenant, user) whose stored history they were computed from or served,
    so that ``forget`` can purge them when the user's history is deleted.
    """

    def __init__(self, budget_bytes: int) -> None:
        self.budget = budget_bytes
        self._entries: OrderedDict[str, PrefixEntry] = OrderedDict()
        self._owners: dict[str, set[Owner]] = {}
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        self.bytes = 0
        self.evictions = 0

    def get(self, key: str, owner: Owner | None = None) -> PrefixEntry | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            if owner is not None:
                self._owners.setdefault(key, set()).add(owner)
            return entry

    def put(self, key: str, entry: PrefixEntry, owner: Owner | None = None) -> None:
        if entry.nbytes > self.budget:
            return
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self.bytes -= old.nbytes
            self._entries[key] = entry
            self.bytes += entry.nbytes
            if owner is not None:
                self._owners.setdefault(key, set()).add(owner)
            while self.bytes > self.budget and self._entries:
                evicted_key, evicted = self._entries.popitem(last=False)
                self._owners.pop(evicted_key, None)
                self.bytes -= evicted.nbytes
                self.evictions += 1

    def forget(self, owner: Owner) -> int:
        """Drop every entry tagged with ``owner``; returns how many were dropped."""
        with self._lock:
            keys = [key for key, owners in self._owners.items() if owner in owners]
            for key in keys:
                del self._owners[key]
                entry = self._entries.pop(key, None)
                if entry is not None:
                    self.bytes -= entry.nbytes
        return len(keys)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._owners.clear()
            self.bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0
