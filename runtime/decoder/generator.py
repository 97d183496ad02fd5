"""``Generator``: one sequence (or beam group) that a decoding strategy drives step by step.

In the spirit of onnxruntime-genai's Generator: ``prefill(prompt)`` once, then ``step(tokens)`` (one token
per row, returns the next logits, batched with other generators by the batcher), ``fork(parents)`` for
beam search (row i continues row parents[i]; rows are copied inside the KV pool, never per step),
``release()`` at the end (``Batcher.admit`` does it). ``advance`` and ``advance_beams`` are the callables
the strategies in runtime.decoding take.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import numpy as np

from runtime.decoder.core import DecoderCore, Handle, PrefillInput, PrefillOutput
from runtime.decoder.kv_cache import PrefixEntry
from runtime.types import CancelToken, check_cancel


class Worker(Protocol):
    """What a generator needs of the batcher (runtime.decoder.batcher.Batcher): its core, and its thread."""

    core: DecoderCore

    def call(self, fn: Callable[[], Any]) -> Any: ...

    def submit_step(self, seq: Handle, tokens: np.ndarray, parents: np.ndarray | None = None) -> np.ndarray: ...


class Generator:
    def __init__(self, batcher: Worker, reserved: int, max_context: int) -> None:
        self._batcher = batcher
        self.reserved = reserved
        """Rows (beams) this sequence may grow to; reserved in the pool at admission."""
        self.max_context = max_context
        self.seq: Handle | None = None
        self.logits: np.ndarray | None = None
        """(rows, V) logits of the last call."""
        self.length = 0
        self.cancel: CancelToken | None = None

    @property
    def rows(self) -> int:
        return 0 if self.seq is None else self.seq.rows

    @property
    def room(self) -> int:
        """Tokens that still fit the maximum context."""
        return self.max_context - self.length

    def prefill(self, prompt: PrefillInput) -> PrefillOutput:
        """The prompt into this sequence's first row: (V,) logits, and the prefix entry it was asked for."""
        check_cancel(self.cancel)
        core = self._batcher.core

        def run() -> PrefillOutput:
            seq = core.open()
            try:
                out = core.prefill(seq, prompt)
            except BaseException:
                core.release(seq)
                raise
            self.seq = seq
            return out

        out: PrefillOutput = self._batcher.call(run)
        self.logits = out.logits[None]
        self.length = len(prompt.ids)
        return out

    def step(self, tokens: np.ndarray, parents: np.ndarray | None = None) -> np.ndarray:
        """One token per row -> (rows, V) logits; with ``parents``, row i first continues row parents[i]
        (the rows become len(parents), at most ``reserved``)."""
        check_cancel(self.cancel)
        assert self.seq is not None, "prefill first"
        if parents is not None:
            parents = np.asarray(parents, np.int64)
            if parents.size > self.reserved:
                raise ValueError(f"fork to {parents.size} rows, {self.reserved} reserved")
            if np.array_equal(parents, np.arange(self.seq.rows)):
                parents = None
        self.logits = self._batcher.submit_step(self.seq, tokens, parents)
        self.length += 1
        return self.logits

    def fork(self, parents: np.ndarray) -> None:
        """Row i continues row ``parents[i]`` without a step (the next ``step`` appends to the new rows)."""
        parents = np.asarray(parents, np.int64)
        if parents.size > self.reserved:
            raise ValueError(f"fork to {parents.size} rows, {self.reserved} reserved")
        seq = self.seq
        assert seq is not None, "prefill first"
        if np.array_equal(parents, np.arange(seq.rows)):
            return
        core = self._batcher.core
        self._batcher.call(lambda: core.fork(seq, parents))

    # -- the callables of runtime.decoding ---------------------------------------------------------------
    def advance(self, tokens: np.ndarray) -> np.ndarray:
        """Sampling: one token for the single row -> (V,) logits."""
        return self.step(tokens)[0]

    def advance_beams(self, parents: np.ndarray, tokens: np.ndarray) -> np.ndarray:
        """Beam search: fork to ``parents`` then append ``tokens`` -> (beams, V) logits (one batcher job)."""
        return self.step(tokens, parents)


__all__ = ["Generator", "PrefillInput", "PrefillOutput", "PrefixEntry"]
