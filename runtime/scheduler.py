"""Continuous batching of decode steps across concurrent requests.

Each request owns a ``RowState`` (its sequence, or its beams) and calls ``step`` from its own thread. One
worker thread gathers the steps pending at a step boundary and advances them all in ONE decoder call:
a sequence joins the running batch with its first step and leaves when it stops stepping. ``admit``
bounds concurrency: up to ``max_active`` sequences decode, up to ``max_queued`` wait for a slot, and
anything beyond is refused with Overloaded instead of growing a queue.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from runtime.decoder.kv_cache import RowState
from runtime.decoder.runner import DecoderRunner
from runtime.types import Cancelled, CancelToken, DeadlineExceeded, Overloaded, Unavailable

log = logging.getLogger(__name__)


@dataclass
class _Job:
    state: RowState
    tokens: np.ndarray
    done: threading.Event = field(default_factory=threading.Event)
    logits: np.ndarray | None = None
    result: RowState | None = None
    error: BaseException | None = None


class Slot:
    """An admitted sequence; holds its KV bytes for accounting until released."""

    def __init__(self, scheduler: DecodeScheduler) -> None:
        self._scheduler = scheduler
        self.kv_bytes = 0
        self.released = False

    def step(self, state: RowState, tokens: np.ndarray, cancel: CancelToken | None = None) -> tuple[np.ndarray, RowState]:
        check_cancel(cancel)
        logits, new_state = self._scheduler._submit(state, tokens)
        self._scheduler._account(self, new_state.nbytes)
        return logits, new_state

    def track(self, state: RowState) -> None:
        """Account the KV a request holds outside a step (after prefill)."""
        self._scheduler._account(self, state.nbytes)


def check_cancel(cancel: CancelToken | None) -> None:
    if cancel is None:
        return
    if cancel.cancelled:
        raise Cancelled("request cancelled")
    if cancel.deadline is not None and time.monotonic() > cancel.deadline:
        raise DeadlineExceeded("deadline exceeded")


class DecodeScheduler:
    def __init__(self, runner: DecoderRunner, max_active: int = 8, max_queued: int = 32, gather_ms: float = 2.0) -> None:
        self.runner = runner
        self.max_active = max_active
        self.max_queued = max_queued
        self.gather_s = gather_ms / 1000.0
        self._cond = threading.Condition()
        self._pending: list[_Job] = []
        self._active: set[Slot] = set()
        self._waiting = 0
        self._stopped = False
        self.steps = 0
        self.batched_rows = 0
        self._worker = threading.Thread(target=self._loop, name="decode-scheduler", daemon=True)
        self._worker.start()

    # -- admission ----------------------------------------------------------------------------------------
    @contextmanager
    def admit(self, cancel: CancelToken | None = None) -> Iterator[Slot]:
        """Reserve a decode slot for one request; releases it (and its KV accounting) on exit."""
        slot = self._acquire(cancel)
        try:
            yield slot
        finally:
            self._release(slot)

    def _acquire(self, cancel: CancelToken | None) -> Slot:
        with self._cond:
            if self._stopped:
                raise Unavailable("the decoder is shutting down")
            if len(self._active) >= self.max_active and self._waiting >= self.max_queued:
                raise Overloaded(
                    f"decode queue full ({len(self._active)} active, {self._waiting} waiting); retry later"
                )
            self._waiting += 1
            try:
                while len(self._active) >= self.max_active:
                    self._cond.wait(timeout=0.05)
                    check_cancel(cancel)
                    if self._stopped:
                        raise Unavailable("the decoder is shutting down")
            finally:
                self._waiting -= 1
            slot = Slot(self)
            self._active.add(slot)
            return slot

    def _release(self, slot: Slot) -> None:
        with self._cond:
            slot.released = True
            slot.kv_bytes = 0
            self._active.discard(slot)
            self._cond.notify_all()

    def _account(self, slot: Slot, nbytes: int) -> None:
        with self._cond:
            if not slot.released:
                slot.kv_bytes = nbytes

    # -- stats --------------------------------------------------------------------------------------------
    @property
    def kv_bytes(self) -> int:
        with self._cond:
            return sum(s.kv_bytes for s in self._active)

    @property
    def active(self) -> int:
        return len(self._active)

    @property
    def queue_depth(self) -> int:
        return self._waiting

    @property
    def pending_steps(self) -> int:
        """Decode steps submitted and not yet taken by the worker (they join the next batched call)."""
        with self._cond:
            return len(self._pending)

    # -- stepping -----------------------------------------------------------------------------------------
    def _submit(self, state: RowState, tokens: np.ndarray) -> tuple[np.ndarray, RowState]:
        job = _Job(state, np.asarray(tokens, np.int64).reshape(-1))
        with self._cond:
            if self._stopped:
                raise Unavailable("the decoder is shutting down")
            self._pending.append(job)
            self._cond.notify_all()
        job.done.wait()
        if job.error is not None:
            raise job.error
        assert job.logits is not None and job.result is not None
        return job.logits, job.result

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._stopped:
                    self._cond.wait()
                if self._stopped and not self._pending:
                    return
                # step boundary: give the other active sequences a moment to submit their next token
                deadline = time.monotonic() + self.gather_s
                while len(self._pending) < len(self._active) and time.monotonic() < deadline:
                    self._cond.wait(timeout=max(0.0, deadline - time.monotonic()))
                jobs, self._pending = self._pending, []
            try:
                logits, states = self.runner.step([j.state for j in jobs], [j.tokens for j in jobs])
                for job, lg, st in zip(jobs, logits, states):
                    job.logits, job.result = lg, st
            except BaseException as exc:  # the error belongs to the requests in this batch
                log.exception("decode step failed")
                for job in jobs:
                    job.error = exc
            self.steps += 1
            self.batched_rows += sum(j.state.rows for j in jobs)
            for job in jobs:
                job.done.set()

    def close(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        self._worker.join(timeout=5)
