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

import logging
import threading
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from runtime.backends.base import Session
from runtime.backends.buffers import Binding, Buffer, HostBuffer
from runtime.decoder.kv_cache import PrefixEntry, RowState
from runtime.decoder.pool import COPY_CAUSES, KVPool, RowSet
from runtime.decoder.runner import DecoderRunner, Memory, PrefillRow, prefix_entry
from runtime.manifest import Manifest

log = logging.getLogger(__name__)


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
        """Its KV on the host; stale while the sequence is in the core's resident batch."""

    @property
    def rows(self) -> int:
        return 0 if self.state is None else self.state.rows


@dataclass
class _Resident:
    """The sequences of the last decode step, in its order, whose present lives in a core buffer."""

    seqs: list[_ConcatSeq]
    states: list[RowState]
    """Each sequence's state when it joined (memory, has_image; its KV is stale)."""
    own: list[int]
    """Each sequence's own length (positions without this batch's left padding)."""
    next_pos: list[np.ndarray]
    mask: np.ndarray
    """(B, P) of the present in the current buffer."""
    memory: dict[str, np.ndarray]
    """The cross-attention K/V feeds (fixed while the batch lasts)."""
    text_time: np.ndarray
    current: int
    """Which of the two buffer sets holds the present."""
    dropped: set[_ConcatSeq] = field(default_factory=set)
    """Released sequences whose rows are left in the buffers (never read back)."""

    @property
    def length(self) -> int:
        return int(self.mask.shape[1])


class ConcatCore:
    """The ``concat`` layout over ``RowState`` arrays (``DecoderRunner``); every step copies the KV.

    ``resident`` (device backends): a step over the same sequences in the same order as the previous one,
    none of them touched in between, binds ``past_*`` to one of two buffer sets per layer (the last present,
    viewed as (B, H, P, hd)) and ``present_*`` to the other (B, H, P + 1, hd), then swaps them: the KV stays
    in backend memory and the runtime copies none of it (the graph's own Concat still writes the whole
    present into the other buffer). Any other operation on a resident sequence, or a step of another
    composition, first writes the resident present back into the sequences' ``RowState`` (counted under
    ``leave``); the step that starts a batch runs from the host states as without ``resident``. A batch
    wider than ``rows`` or longer than ``max_context`` runs on the host (logged once).
    """

    kv_layout = "concat"
    pool_bytes = 0

    def __init__(self, decoder: Session, media_kv: Session, manifest: Manifest, *, max_context: int,
                 resident: bool = False, rows: int = 8) -> None:
        self.runner = DecoderRunner(decoder, media_kv, manifest)
        self.max_context = min(max_context, manifest.decoder.max_positions)
        self._copied = dict.fromkeys(COPY_CAUSES, 0)
        self._live: set[_ConcatSeq] = set()
        self._lock = threading.Lock()
        self.resident = resident
        self.rows = rows
        self._res: _Resident | None = None
        self._res_bytes = 0
        self._warned = False
        self.buffers: list[list[tuple[Buffer, Buffer]]] = []
        """Two sets (A, B) of per-layer (K, V) buffers of rows * H * max_context * hd elements each."""
        if resident:
            d = manifest.decoder
            shape = (rows, d.num_heads, self.max_context, d.head_dim)
            self.buffers = [[(decoder.allocate(shape), decoder.allocate(shape)) for _ in range(d.num_layers)]
                            for _ in range(2)]
            self._capacity = int(np.prod(shape))

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
            res = set(self._res.seqs) if self._res is not None else set()
            host = sum(s.state.nbytes for s in self._live if s.state is not None and s not in res)
            return host + self._res_bytes

    def media_kv(self, latents: np.ndarray) -> Memory:
        return self.runner.media_kv(latents)

    def open(self) -> _ConcatSeq:
        seq = _ConcatSeq()
        with self._lock:
            self._live.add(seq)
        return seq

    def length(self, seq: Handle) -> int:
        assert isinstance(seq, _ConcatSeq)
        res = self._res
        if res is not None and seq in res.seqs:
            return int(res.next_pos[res.seqs.index(seq)].max())
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
        self._touch(seq)
        logits, seq.state, entry = self._prefill_state(prompt)
        return PrefillOutput(logits, entry)

    def prefill_private(self, prompt: PrefillInput) -> PrefillOutput:
        logits, _, entry = self._prefill_state(prompt)
        return PrefillOutput(logits, entry)

    def prefill_batch(self, rows: list[PrefillRow]) -> np.ndarray:
        """Several prompts in one left-padded call -> (B, V) last-token logits."""
        return self.runner.prefill(rows)[0]

    def step(self, seqs: list[Handle], tokens: list[np.ndarray]) -> list[np.ndarray]:
        res = self._res
        if res is not None and len(seqs) == len(res.seqs) and all(a is b for a, b in zip(seqs, res.seqs)):
            if max(int(p.max()) for p in res.next_pos) >= self.max_context:
                raise ValueError(f"a sequence reached the maximum context of {self.max_context} tokens")
            if self._fits(sum(st.rows for st in res.states), res.length + 1):
                return self._resident_step(res, tokens)
            self._write_back()  # grew past the buffers: on the host from here
        elif res is not None:
            self._write_back()  # another composition: the batch leaves the buffers
        states = [s.state for s in seqs]  # type: ignore[attr-defined]
        assert all(st is not None for st in states)
        if max(int(st.next_pos.max()) for st in states) >= self.max_context:  # type: ignore[union-attr]
            raise ValueError(f"a sequence reached the maximum context of {self.max_context} tokens")
        # the graph writes every row's whole past again (present = Concat(past, new)); batching several
        # sequences, or padding them to one length, also copies every past on the host first
        host = sum(st.nbytes for st in states) if len(states) > 1 else 0  # type: ignore[union-attr]
        if self.resident:
            rows = sum(st.rows for st in states)  # type: ignore[union-attr]
            length = max(st.length for st in states)  # type: ignore[union-attr]
            if self._fits(rows, length + 1):
                return self._join(seqs, states, tokens, host)  # type: ignore[arg-type]
            if not self._warned:
                self._warned = True
                log.warning("concat KV: a decode batch of %d rows x %d positions exceeds the resident buffers "
                            "(%d rows x %d positions); such batches run on the host", rows, length + 1, self.rows,
                            self.max_context)
        logits, new = self.runner.step(states, tokens)  # type: ignore[arg-type]
        present = sum(sum(k.nbytes + v.nbytes for k, v in zip(st.keys, st.values)) for st in new)
        self._count("step", present + host)
        for seq, st in zip(seqs, new):
            seq.state = st  # type: ignore[attr-defined]
        return logits

    def fork(self, seq: Handle, parents: np.ndarray) -> None:
        assert isinstance(seq, _ConcatSeq) and seq.state is not None
        parents = np.asarray(parents, np.int64)
        if np.array_equal(parents, np.arange(seq.state.rows)):
            return
        self._touch(seq)
        assert seq.state is not None
        seq.state = seq.state.select(parents)
        self._count("fork", seq.state.nbytes)

    def release(self, seq: Handle) -> None:
        assert isinstance(seq, _ConcatSeq)
        self._touch(seq, keep=False)
        seq.state = None
        with self._lock:
            self._live.discard(seq)

    # -- the resident batch ---------------------------------------------------------------------------
    def _fits(self, rows: int, length: int) -> bool:
        d = self.runner
        return self.resident and rows * d.heads * length * d.head_dim <= self._capacity

    def _bind(self, which: int, shape: tuple[int, ...], names: list[tuple[str, str]]) -> dict[str, Binding]:
        return {name: buf.bind_flat(shape) for (kn, vn), pair in zip(names, self.buffers[which])
                for name, buf in ((kn, pair[0]), (vn, pair[1]))}

    def _kv_shape(self, rows: int, length: int) -> tuple[int, int, int, int]:
        return rows, self.runner.heads, length, self.runner.head_dim

    def _join(self, seqs: list[_ConcatSeq], states: list[RowState], tokens: list[np.ndarray], host: int) -> list[np.ndarray]:
        """The first step of a batch: past from the host states, present into buffer set A."""
        r = self.runner
        length = max(st.length for st in states)
        feeds, mask = r.step_feeds(states, tokens)
        rows = int(mask.shape[0])
        name = r.m.names.logits
        bound = self._bind(0, self._kv_shape(rows, length + 1), r.present_names)
        r.calls += 1
        logits = r.decoder.run_bound(feeds, bound, [name])[name]
        memory = {kn: feeds[kn] for pair in r.memory_names for kn in pair}
        res = _Resident(list(seqs), list(states), [st.length + 1 for st in states], [st.next_pos + 1 for st in states],
                        mask, memory, feeds[r.m.names.text_time], 0)
        present = 2 * r.layers * rows * r.heads * (length + 1) * r.head_dim * 4
        self._count("step", present + host)  # as a host step: the graph wrote the whole present
        self._set_resident(res)
        return self._split_logits(states, logits)

    def _resident_step(self, res: _Resident, tokens: list[np.ndarray]) -> list[np.ndarray]:
        """past_* = the present of the last step in one buffer set, present_* into the other; no KV copy."""
        r = self.runner
        n = r.m.names
        rows, length = int(res.mask.shape[0]), res.length
        mask = np.concatenate([res.mask, np.ones((rows, 1), np.int64)], axis=1)
        feeds = {n.input_ids: np.concatenate([np.asarray(t, np.int64).reshape(-1) for t in tokens])[:, None],
                 n.position_ids: np.concatenate(res.next_pos)[:, None], n.attention_mask: mask,
                 n.text_time: res.text_time, **res.memory}
        nxt = 1 - res.current
        bound = self._bind(res.current, self._kv_shape(rows, length), r.past_names)
        bound.update(self._bind(nxt, self._kv_shape(rows, length + 1), r.present_names))
        r.calls += 1
        logits = r.decoder.run_bound(feeds, bound, [n.logits])[n.logits]
        res.mask, res.current = mask, nxt
        res.own = [o + 1 for o in res.own]
        res.next_pos = [p + 1 for p in res.next_pos]
        self._set_resident(res)
        return self._split_logits(res.states, logits)

    @staticmethod
    def _split_logits(states: list[RowState], logits: np.ndarray) -> list[np.ndarray]:
        out, start = [], 0
        for st in states:
            out.append(logits[start : start + st.rows])
            start += st.rows
        return out

    def _set_resident(self, res: _Resident | None) -> None:
        nbytes = 0
        if res is not None:
            r = self.runner
            kv = 2 * r.layers * int(res.mask.shape[0]) * r.heads * res.length * r.head_dim * 4
            mem = sum(a.nbytes for a in res.memory.values())
            nbytes = kv + mem + int(res.mask.nbytes)
        with self._lock:
            self._res, self._res_bytes = res, nbytes

    def _touch(self, seq: _ConcatSeq, keep: bool = True) -> None:
        """Before anything but a step reads or replaces ``seq``: a resident batch holding it goes back to
        the host. ``keep=False`` (a release): ``seq``'s rows are only marked dead, the others stay resident
        until they are touched or step in another batch (a batch whose sequences all leave is never read)."""
        res = self._res
        if res is None or seq not in res.seqs:
            return
        if keep:
            self._write_back()
            return
        res.dropped.add(seq)
        if all(s in res.dropped for s in res.seqs):
            self._set_resident(None)

    def _write_back(self) -> None:
        """The resident present into every live batch sequence's ``RowState`` (one read per layer K and V)."""
        res = self._res
        assert res is not None
        rows, length = int(res.mask.shape[0]), res.length
        shape = self._kv_shape(rows, length)
        keys = [pair[0].read_flat(shape) for pair in self.buffers[res.current]]
        values = [pair[1].read_flat(shape) for pair in self.buffers[res.current]]
        copied = sum(a.nbytes for a in (*keys, *values))
        start = 0
        for seq, st, own, pos in zip(res.seqs, res.states, res.own, res.next_pos):
            stop = start + st.rows
            if seq not in res.dropped:
                cut = length - own
                seq.state = RowState(
                    keys=[np.ascontiguousarray(k[start:stop, :, cut:]) for k in keys],
                    values=[np.ascontiguousarray(v[start:stop, :, cut:]) for v in values],
                    mask=res.mask[start:stop, cut:], next_pos=pos, memory=st.memory, has_image=st.has_image)
            start = stop
        self._count("leave", copied)
        self._set_resident(None)

