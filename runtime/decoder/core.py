"""Decoder cores: the two KV layouts behind one interface that generators and the batcher drive.

``InplaceCore`` runs the ``inplace`` graph (GroupQueryAttention) over a ``KVPool``: a sequence's rows are
pool slots, prefill writes straight into them, a decode step binds the pool in place. ``ConcatCore`` runs
the ``concat`` graph (present = Concat(past, new)) over ``RowState`` arrays: every step copies the KV
(counted under ``step``), which is what TensorRT 10.3 builds can run.

Both: ``prefill`` (into a sequence, on the batcher's thread), ``prefill_private`` (a prompt whose logits
are all a task needs: its own buffers, any thread), ``step`` (several sequences in ONE graph call),
``fork``, ``release``. A sequence is an opaque handle from ``open``.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from runtime.backends.base import Session
from runtime.backends.buffers import Binding, HostBuffer
from runtime.decoder.kv_cache import PrefixEntry, RowState
from runtime.decoder.pool import COPY_CAUSES, KVPool, RowSet
from runtime.decoder.runner import DecoderRunner, Memory, PrefillRow, prefix_entry
from runtime.manifest import Manifest


@dataclass(frozen=True)
class PrefillInput:
    """One prompt: token ids, its images' cross-attention memory, an optional cached prefix to start from,
    and how many leading positions to hand back as a new cache entry (0: none)."""

    ids: np.ndarray
    """(T,) int64."""
    memory: Memory
    """Per block K, V (M, h, n, dh) of the prompt's images in order; M may be 0."""
    images_in_prefix: int = 0
    prefix: PrefixEntry | None = None
    keep_prefix: int = 0


@dataclass(frozen=True)
class PrefillOutput:
    logits: np.ndarray
    """(V,) logits of the prompt's last position."""
    entry: PrefixEntry | None
    """The first ``keep_prefix`` positions, when asked for and not already a hit."""


class Handle(Protocol):
    @property
    def rows(self) -> int: ...


class DecoderCore(Protocol):
    kv_layout: str
    max_context: int

    def media_kv(self, latents: np.ndarray) -> Memory: ...
    def open(self) -> Handle: ...
    def prefill(self, seq: Handle, prompt: PrefillInput) -> PrefillOutput: ...
    def prefill_private(self, prompt: PrefillInput) -> PrefillOutput: ...
    def prefill_batch(self, rows: list[PrefillRow]) -> np.ndarray: ...
    def step(self, seqs: list[Handle], tokens: list[np.ndarray]) -> list[np.ndarray]: ...
    def fork(self, seq: Handle, parents: np.ndarray) -> None: ...
    def release(self, seq: Handle) -> None: ...
    def length(self, seq: Handle) -> int: ...
    def copy_bytes(self) -> dict[str, int]: ...
    def kv_bytes(self) -> int: ...
    @property
    def pool_bytes(self) -> int: ...
    @property
    def session(self) -> Session:
        """The decoder graph's session."""
        ...


def _last_image(memory: Memory) -> tuple[list[tuple[np.ndarray, np.ndarray]], int]:
    """Per block the last image's K, V (h, n, dh) and 1, or zeros and 0 when the prompt has no image."""
    if not memory or memory[0][0].shape[0] == 0:
        return [(np.zeros(k.shape[1:], np.float32), np.zeros(v.shape[1:], np.float32)) for k, v in memory], 0
    return [(k[-1], v[-1]) for k, v in memory], 1


class InplaceCore:
    kv_layout = "inplace"

    def __init__(self, decoder: Session, media_kv: Session, manifest: Manifest, *, slots: int, max_context: int) -> None:
        self.m = manifest
        self.decoder = decoder
        d, n = manifest.decoder, manifest.names
        self._media = DecoderRunner(decoder, media_kv, manifest)  # media K/V and memory batching only
        self.layers, self.blocks = d.num_layers, len(d.xattn_layers)
        self.heads, self.head_dim = d.num_heads, d.head_dim
        self.max_context = min(max_context, d.max_positions)
        self.pool = KVPool(decoder, layers=self.layers, heads=d.num_heads, head_dim=d.head_dim, blocks=self.blocks,
                           xattn_heads=d.xattn_heads, num_latents=manifest.vision.num_latents,
                           xattn_head_dim=d.xattn_head_dim, slots=slots, max_context=self.max_context)
        self.past = [(n.past_key.format(layer=i), n.past_value.format(layer=i)) for i in range(self.layers)]
        self.present = [(n.present_key.format(layer=i), n.present_value.format(layer=i)) for i in range(self.layers)]
        self.memory_names = [(n.xattn_key.format(block=j), n.xattn_value.format(block=j)) for j in range(self.blocks)]
        self.image_id = manifest.tokens.image
        self.calls = 0
        self._windows: dict[tuple[int, int], dict[str, Binding]] = {}
        self._private_copied = dict.fromkeys(COPY_CAUSES, 0)
        self._lock = threading.Lock()

    @property
    def pool_bytes(self) -> int:
        return self.pool.nbytes

    @property
    def session(self) -> Session:
        return self.decoder

    def media_kv(self, latents: np.ndarray) -> Memory:
        return self._media.media_kv(latents)

    def open(self) -> RowSet:
        return RowSet()

    def length(self, seq: Handle) -> int:
        assert isinstance(seq, RowSet)
        return int(self.pool.lengths[seq.slots].max()) if seq.rows else 0

    def kv_bytes(self) -> int:
        return self.pool.kv_bytes_in_use()

    def copy_bytes(self) -> dict[str, int]:
        out = self.pool.copy_bytes()
        with self._lock:
            for cause, value in self._private_copied.items():
                out[cause] += value
        return out

    # -- graph calls ------------------------------------------------------------------------------------
    def _feeds(self, ids: np.ndarray, lengths: np.ndarray, text_time: np.ndarray, index: np.ndarray) -> dict[str, np.ndarray]:
        n = self.m.names
        return {
            n.input_ids: ids, n.seqlens_k: (lengths - 1).astype(np.int32),
            n.total_sequence_length: np.array(lengths.max(), np.int32), n.text_time: text_time,
            n.logits_index: index.astype(np.int64),
        }

    def _bind_kv(self, keys: list, values: list) -> dict[str, Binding]:
        bound: dict[str, Binding] = {}
        for (pk, pv), (ok, ov), k, v in zip(self.past, self.present, keys, values):
            bound[pk] = bound[ok] = k
            bound[pv] = bound[ov] = v
        return bound

    def _run(self, ids: np.ndarray, lengths: np.ndarray, text_time: np.ndarray, index: np.ndarray,
             keys: list, values: list, memory: list) -> np.ndarray:
        """A prefill: ``keys``/``values`` Bindings (written in place), cross-attention memory host arrays."""
        feeds = self._feeds(ids, lengths, text_time, index)
        for (kn, vn), (k, v) in zip(self.memory_names, memory):
            feeds[kn], feeds[vn] = np.ascontiguousarray(k, np.float32), np.ascontiguousarray(v, np.float32)
        self.calls += 1
        logits = self.m.names.logits
        return self.decoder.run_bound(feeds, self._bind_kv(keys, values), [logits])[logits]

    def _window(self, lo: int, hi: int) -> dict[str, Binding]:
        """Every pool buffer's rows [lo, hi) bound to the graph's names; the same dict for the same window
        (the pool never moves its buffers), so the backend can keep the binding between steps."""
        bound = self._windows.get((lo, hi))
        if bound is None:
            keys, values, memory = self.pool.bind(lo, hi)
            bound = self._bind_kv(keys, values)
            for (kn, vn), (k, v) in zip(self.memory_names, memory):
                bound[kn], bound[vn] = k, v
            self._windows[(lo, hi)] = bound
        return bound

    def _prefill_rows(self, start: int, prompt: PrefillInput, keys: list, values: list,
                      write_prefix: bool) -> np.ndarray:
        """Prompt into rows [start, start+1) of ``keys``/``values`` (pool or private). Returns (V,) logits."""
        ids = np.asarray(prompt.ids, np.int64)
        t = len(ids)
        p = prompt.prefix.length if prompt.prefix is not None else 0
        images_before = prompt.prefix.images if prompt.prefix is not None else 0
        if prompt.prefix is not None and write_prefix:
            self.pool.load_prefix(start, prompt.prefix.keys, prompt.prefix.values)
        suffix = ids[p:]
        text_time = (images_before + np.cumsum(suffix == self.image_id))[None].astype(np.int64)
        memory = self._media.batch_memory([prompt.memory])
        lengths = np.array([t], np.int64)
        logits = self._run(suffix[None], lengths, text_time, np.array([len(suffix) - 1]), keys, values, memory)
        return logits[0]

    def prefill(self, seq: Handle, prompt: PrefillInput) -> PrefillOutput:
        """Into a new slot of ``seq`` (which holds no rows yet). Batcher thread only."""
        assert isinstance(seq, RowSet) and seq.rows == 0
        t = len(prompt.ids)
        if t > self.max_context:
            raise ValueError(f"prompt of {t} tokens exceeds the maximum context of {self.max_context}")
        (slot,) = self.pool.attach(seq, 1)
        keys, values, _ = self.pool.bind(int(slot), int(slot) + 1)
        logits = self._prefill_rows(int(slot), prompt, keys, values, write_prefix=True)
        self.pool.lengths[slot] = t
        last, has = _last_image(prompt.memory)
        self.pool.write_memory(int(slot), last)
        self.pool.has_image[slot] = has
        entry = None
        if prompt.keep_prefix and prompt.prefix is None:
            k, v = self.pool.read_prefix(int(slot), prompt.keep_prefix)
            entry = _frozen(k, v, prompt.keep_prefix, prompt.images_in_prefix)
        return PrefillOutput(logits, entry)

    def prefill_private(self, prompt: PrefillInput) -> PrefillOutput:
        """In buffers of the prompt's own length (no pool slot); any thread."""
        t = len(prompt.ids)
        shape = (1, self.heads, t, self.head_dim)
        kb = [HostBuffer(shape) for _ in range(self.layers)]
        vb = [HostBuffer(shape) for _ in range(self.layers)]
        copied = 0
        if prompt.prefix is not None:
            for buf, k in zip(kb, prompt.prefix.keys):
                copied += buf.write(0, k[0])
            for buf, v in zip(vb, prompt.prefix.values):
                copied += buf.write(0, v[0])
        logits = self._prefill_rows(0, prompt, [b.bind(0, 1) for b in kb], [b.bind(0, 1) for b in vb],
                                    write_prefix=False)
        entry = None
        if prompt.keep_prefix and prompt.prefix is None:
            p = prompt.keep_prefix
            keys = tuple(np.ascontiguousarray(b.array[:, :, :p]) for b in kb)
            values = tuple(np.ascontiguousarray(b.array[:, :, :p]) for b in vb)
            copied += sum(a.nbytes for a in (*keys, *values))
            entry = _frozen(keys, values, p, prompt.images_in_prefix)
        with self._lock:
            self._private_copied["prefix"] += copied
        return PrefillOutput(logits, entry)

    def prefill_batch(self, rows: list[PrefillRow]) -> np.ndarray:
        """Several prompts in one call, right-padded in private buffers -> (B, V) last-token logits (no
        prefix cache; for evaluation and reference checks)."""
        b, t = len(rows), max(len(r.ids) for r in rows)
        ids = np.full((b, t), self.m.tokens.pad, np.int64)
        lengths = np.array([len(r.ids) for r in rows], np.int64)
        text_time = np.zeros((b, t), np.int64)
        for i, r in enumerate(rows):
            ids[i, : len(r.ids)] = r.ids
            text_time[i, : len(r.ids)] = np.cumsum(r.ids == self.image_id)
        shape = (b, self.heads, t, self.head_dim)
        kb = [HostBuffer(shape) for _ in range(self.layers)]
        vb = [HostBuffer(shape) for _ in range(self.layers)]
        memory = self._media.batch_memory([r.memory for r in rows])
        # every row a first prompt (total == seq): the op reads each row's own length from seqlens_k
        return self._run(ids, lengths, text_time, lengths - 1, [x.bind(0, b) for x in kb],
                         [x.bind(0, b) for x in vb], memory)

    def step(self, seqs: list[Handle], tokens: list[np.ndarray]) -> list[np.ndarray]:
        """One token per row of every sequence, in one call over the pool window that holds them."""
        pool = self.pool
        slots = [s.slots for s in seqs]  # type: ignore[attr-defined]
        every = np.concatenate(slots)
        lo, hi = int(every.min()), int(every.max()) + 1
        if int(pool.lengths[every].max()) >= self.max_context:
            raise ValueError(f"a sequence reached the maximum context of {self.max_context} tokens")
        ids = np.zeros((hi - lo, 1), np.int64)
        for s, tok in zip(slots, tokens):
            ids[s - lo, 0] = np.asarray(tok, np.int64).reshape(-1)
        # rows in the window that did not submit write their token at their own next position (scratch)
        lengths = pool.lengths[lo:hi] + 1
        feeds = self._feeds(ids, lengths, pool.has_image[lo:hi, None].copy(), np.zeros(hi - lo, np.int64))
        self.calls += 1
        name = self.m.names.logits
        logits = self.decoder.run_bound(feeds, self._window(lo, hi), [name], reuse=True)[name]
        pool.lengths[every] += 1
        return [logits[s - lo] for s in slots]

    def fork(self, seq: Handle, parents: np.ndarray) -> None:
        assert isinstance(seq, RowSet)
        self.pool.fork(seq, parents)

    def release(self, seq: Handle) -> None:
        assert isinstance(seq, RowSet)
        if seq.rows:
            self.pool.detach(seq)


def _frozen(keys: tuple[np.ndarray, ...], values: tuple[np.ndarray, ...], length: int, images: int) -> PrefixEntry:
    for arr in (*keys, *values):
        arr.setflags(write=False)
    return PrefixEntry(keys, values, length, images)


class _ConcatSeq:
    def __init__(self) -> None:
        self.state: RowState | None = None

    @property
    def rows(self) -> int:
        return 0 if self.state is None else self.state.rows


class ConcatCore:
    """The ``concat`` layout over ``RowState`` arrays (``DecoderRunner``); every step copies the KV."""

    kv_layout = "concat"
    pool_bytes = 0

    def __init__(self, decoder: Session, media_kv: Session, manifest: Manifest, *, max_context: int) -> None:
        self.runner = DecoderRunner(decoder, media_kv, manifest)
        self.max_context = min(max_context, manifest.decoder.max_positions)
        self._copied = dict.fromkeys(COPY_CAUSES, 0)
        self._live: set[_ConcatSeq] = set()
        self._lock = threading.Lock()

    def _count(self, cause: str, nbytes: int) -> None:
        with self._lock:
            self._copied[cause] += int(nbytes)

    @property
    def session(self) -> Session:
        return self.runner.decoder

    def copy_bytes(self) -> dict[str, int]:
        with self._lock:
            return dict(self._copied)

    def kv_bytes(self) -> int:
        with self._lock:
            return sum(s.state.nbytes for s in self._live if s.state is not None)

    def media_kv(self, latents: np.ndarray) -> Memory:
        return self.runner.media_kv(latents)

    def open(self) -> _ConcatSeq:
        seq = _ConcatSeq()
        with self._lock:
            self._live.add(seq)
        return seq

    def length(self, seq: Handle) -> int:
        assert isinstance(seq, _ConcatSeq)
        return 0 if seq.state is None else int(seq.state.next_pos.max())

    def _prefill_state(self, prompt: PrefillInput) -> tuple[np.ndarray, RowState, PrefixEntry | None]:
        if len(prompt.ids) > self.max_context:
            raise ValueError(f"prompt of {len(prompt.ids)} tokens exceeds the maximum context of {self.max_context}")
        if prompt.prefix is not None:
            logits, state = self.runner.prefill_with_prefix(prompt.prefix, prompt.ids[prompt.prefix.length :], prompt.memory)
            self._count("prefix", prompt.prefix.nbytes)  # the graph concatenates the prefix into present
            return logits[0], state, None
        logits, state = self.runner.prefill([PrefillRow(prompt.ids, prompt.memory)])
        entry = None
        if prompt.keep_prefix:
            entry = prefix_entry(state, 0, prompt.keep_prefix, prompt.images_in_prefix)
            self._count("prefix", entry.nbytes)
        return logits[0], state, entry

    def prefill(self, seq: Handle, prompt: PrefillInput) -> PrefillOutput:
        assert isinstance(seq, _ConcatSeq)
        logits, seq.state, entry = self._prefill_state(prompt)
        return PrefillOutput(logits, entry)

    def prefill_private(self, prompt: PrefillInput) -> PrefillOutput:
        logits, _, entry = self._prefill_state(prompt)
        return PrefillOutput(logits, entry)

    def prefill_batch(self, rows: list[PrefillRow]) -> np.ndarray:
        """Several prompts in one left-padded call -> (B, V) last-token logits."""
        return self.runner.prefill(rows)[0]

    def step(self, seqs: list[Handle], tokens: list[np.ndarray]) -> list[np.ndarray]:
        states = [s.state for s in seqs]  # type: ignore[attr-defined]
        assert all(st is not None for st in states)
        if max(int(st.next_pos.max()) for st in states) >= self.max_context:  # type: ignore[union-attr]
            raise ValueError(f"a sequence reached the maximum context of {self.max_context} tokens")
        logits, new = self.runner.step(states, tokens)  # type: ignore[arg-type]
        # the graph writes every row's whole past again (present = Concat(past, new)); batching several
        # sequences, or padding them to one length, also copies every past on the host first
        present = sum(sum(k.nbytes + v.nbytes for k, v in zip(st.keys, st.values)) for st in new)
        host = sum(st.nbytes for st in states) if len(states) > 1 else 0  # type: ignore[union-attr]
        self._count("step", present + host)
        for seq, st in zip(seqs, new):
            seq.state = st  # type: ignore[attr-defined]
        return logits

    def fork(self, seq: Handle, parents: np.ndarray) -> None:
        assert isinstance(seq, _ConcatSeq) and seq.state is not None
        parents = np.asarray(parents, np.int64)
        if np.array_equal(parents, np.arange(seq.state.rows)):
            return
        seq.state = seq.state.select(parents)
        self._count("fork", seq.state.nbytes)

    def release(self, seq: Handle) -> None:
        assert isinstance(seq, _ConcatSeq)
        seq.state = None
        with self._lock:
            self._live.discard(seq)
