"""The KV pool of the ``inplace`` decoder layout: slots allocated once, written in place, never copied per step.

Per decoder layer one K and one V buffer of shape (slots, H, capacity, hd) and, per cross-attention block,
the K and V of each slot's last image (slots, h, n, dh), all owned by the backend (runtime.backends.buffers).
A sequence owns a ``RowSet``: its slots (one per beam) and their valid lengths. Active slots are always
the dense range [0, used): a sequence that leaves is replaced by the last active rows (``leave`` copies),
so a batched decode step binds one window of every buffer. ``capacity`` is the serving maximum context
plus one scratch position: a step runs every row of the window, and rows that did not submit a token
absorb theirs at their own next position (never read, overwritten by their next real token).

Copies are counted per cause in ``copied`` (bytes): ``join`` (a row's last-image cross-attention K/V
written at prefill), ``prefix`` (a cached prefix loaded into a slot, or a slot's prefix read out for the
cache), ``fork`` (beam rows duplicated from a parent), ``leave`` (compaction), ``step`` (by construction 0:
a decode step binds the buffers in place).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import numpy as np

from runtime.backends.base import Session
from runtime.backends.buffers import Binding, Buffer

COPY_CAUSES = ("join", "prefix", "fork", "leave", "step")


@dataclass
class RowSet:
    """A sequence's rows in the pool (its beams); ``slots`` change when the pool compacts."""

    slots: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    @property
    def rows(self) -> int:
        return int(self.slots.size)


class PoolFull(RuntimeError):
    pass


class KVPool:
    def __init__(
        self, session: Session, *, layers: int, heads: int, head_dim: int, blocks: int, xattn_heads: int,
        num_latents: int, xattn_head_dim: int, slots: int, max_context: int,
    ) -> None:
        self.slots = slots
        self.max_context = max_context
        self.capacity = max_context + 1
        kv_shape = (slots, heads, self.capacity, head_dim)
        mem_shape = (slots, xattn_heads, num_latents, xattn_head_dim)
        self.keys: list[Buffer] = [session.allocate(kv_shape) for _ in range(layers)]
        self.values: list[Buffer] = [session.allocate(kv_shape) for _ in range(layers)]
        self.memory_keys: list[Buffer] = [session.allocate(mem_shape) for _ in range(blocks)]
        self.memory_values: list[Buffer] = [session.allocate(mem_shape) for _ in range(blocks)]
        self.num_latents = num_latents
        self.lengths = np.zeros(slots, np.int64)
        """Valid positions per slot."""
        self.has_image = np.zeros(slots, np.int64)
        """1 if the slot's sequence has an image (the decode step's text_time)."""
        self.used = 0
        self._owner: list[RowSet | None] = [None] * slots
        self.copied = dict.fromkeys(COPY_CAUSES, 0)
        self._lock = threading.Lock()  # counters are read by metrics threads

    # -- accounting -------------------------------------------------------------------------------------
    @property
    def nbytes(self) -> int:
        return int(sum(b.nbytes for b in (*self.keys, *self.values, *self.memory_keys, *self.memory_values)))

    @property
    def row_bytes(self) -> int:
        return self.nbytes // max(1, self.slots)

    def kv_bytes_in_use(self) -> int:
        """Bytes of the valid KV positions of the active slots (what a concat cache would hold)."""
        per_position = sum(b.nbytes for b in (*self.keys, *self.values)) // max(1, self.slots * self.capacity)
        return int(self.lengths[: self.used].sum()) * per_position

    def _count(self, cause: str, nbytes: int) -> None:
        with self._lock:
            self.copied[cause] += int(nbytes)

    def copy_bytes(self) -> dict[str, int]:
        with self._lock:
            return dict(self.copied)

    # -- membership -------------------------------------------------------------------------------------
    def attach(self, rows: RowSet, count: int) -> np.ndarray:
        """``count`` new slots at the end of the active range, appended to ``rows``; returns them."""
        if self.used + count > self.slots:
            raise PoolFull(f"KV pool has {self.slots - self.used} free slots, {count} wanted")
        new = np.arange(self.used, self.used + count, dtype=np.int64)
        for s in new:
            self._owner[s] = rows
        self.lengths[new] = 0
        self.has_image[new] = 0
        self.used += count
        rows.slots = np.concatenate([rows.slots, new])
        return new

    def detach(self, rows: RowSet, which: np.ndarray | None = None) -> None:
        """Free ``which`` of ``rows``'s slots (all by default), moving the last active rows into the holes."""
        which = rows.slots if which is None else np.asarray(which, np.int64)
        keep = rows.slots[~np.isin(rows.slots, which)]
        rows.slots = keep
        for slot in sorted((int(s) for s in which), reverse=True):
            last = self.used - 1
            if slot != last:
                self._move(last, slot)
            self._owner[last] = None
            self.lengths[last] = 0
            self.used -= 1

    def _move(self, src: int, dst: int) -> None:
        owner = self._owner[src]
        assert owner is not None
        s, d = np.array([src]), np.array([dst])
        moved = 0
        length = int(self.lengths[src])
        for buf in (*self.keys, *self.values):
            moved += buf.copy_rows(d, s, length)
        for buf in (*self.memory_keys, *self.memory_values):
            moved += buf.copy_rows(d, s, self.num_latents)
        self._count("leave", moved)
        self.lengths[dst], self.has_image[dst] = self.lengths[src], self.has_image[src]
        self._owner[dst] = owner
        owner.slots = np.where(owner.slots == src, dst, owner.slots)

    def fork(self, rows: RowSet, parents: np.ndarray) -> None:
        """Row i becomes a copy of row parents[i] (beam search); the set grows or shrinks to len(parents).

        The first child of each parent keeps the parent's slot; only further children copy, into slots of
        parents that have no child (or new slots)."""
        parents = np.asarray(parents, np.int64)
        old = rows.slots.copy()
        if np.array_equal(parents, np.arange(old.size)):
            return
        new = np.full(parents.size, -1, np.int64)
        taken: set[int] = set()
        for i, p in enumerate(parents):
            if int(p) not in taken:
                new[i] = old[p]
                taken.add(int(p))
        spare = [int(old[j]) for j in range(old.size) if j not in taken]
        missing = int((new < 0).sum()) - len(spare)
        if missing > 0:
            spare += [int(s) for s in self.attach(rows, missing)]
        dst, src = [], []
        for child in np.flatnonzero(new < 0):
            new[child] = spare.pop(0)
            dst.append(int(new[child]))
            src.append(int(old[parents[child]]))
        if dst:
            d, s = np.array(dst), np.array(src)
            length = int(self.lengths[s].max())
            copied = 0
            for buf in (*self.keys, *self.values):
                copied += buf.copy_rows(d, s, length)
            for buf in (*self.memory_keys, *self.memory_values):
                copied += buf.copy_rows(d, s, self.num_latents)
            self._count("fork", copied)
            self.lengths[d], self.has_image[d] = self.lengths[s], self.has_image[s]
        rows.slots = new
        if spare:  # rows of parents without children
            holder = RowSet(np.array(spare, np.int64))
            for slot in spare:
                self._owner[slot] = holder
            self.detach(holder)

    # -- prefix cache -----------------------------------------------------------------------------------
    def load_prefix(self, slot: int, keys: tuple[np.ndarray, ...], values: tuple[np.ndarray, ...]) -> None:
        """A cached prefix (per layer (1, H, P, hd)) into positions [0, P) of ``slot``."""
        copied = 0
        for buf, k in zip(self.keys, keys):
            copied += buf.write(slot, k[0])
        for buf, v in zip(self.values, values):
            copied += buf.write(slot, v[0])
        self._count("prefix", copied)

    def read_prefix(self, slot: int, length: int) -> tuple[tuple[np.ndarray, ...], tuple[np.ndarray, ...]]:
        keys = tuple(buf.read(slot, length) for buf in self.keys)
        values = tuple(buf.read(slot, length) for buf in self.values)
        self._count("prefix", sum(a.nbytes for a in (*keys, *values)))
        return keys, values

    def write_memory(self, slot: int, memory: list[tuple[np.ndarray, np.ndarray]]) -> None:
        """The last image's cross-attention K, V per block ((h, n, dh) each) for ``slot``."""
        copied = 0
        for kb, vb, (k, v) in zip(self.memory_keys, self.memory_values, memory):
            copied += kb.write(slot, k) + vb.write(slot, v)
        self._count("join", copied)

    # -- binding ----------------------------------------------------------------------------------------
    def bind(self, start: int, stop: int) -> tuple[list[Binding], list[Binding], list[tuple[Binding, Binding]]]:
        """Rows [start, stop) of every layer's K, V and every block's memory K, V."""
        keys = [b.bind(start, stop) for b in self.keys]
        values = [b.bind(start, stop) for b in self.values]
        memory = [(k.bind(start, stop), v.bind(start, stop)) for k, v in zip(self.memory_keys, self.memory_values)]
        return keys, values, memory
