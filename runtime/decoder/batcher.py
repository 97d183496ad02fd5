"""Continuous batching: one worker thread owns the decoder core and runs every sequence's work.

A request admitted with ``admit(cancel, rows)`` gets a ``Generator`` (runtime.decoder.generator) and
drives it from its own thread. Its prefill, forks and release are jobs the worker runs between decode
steps (so the KV pool is only ever touched by the worker); its decode steps are gathered at a step
boundary and advanced together in ONE graph call: a sequence joins the running batch with its first step
and leaves when it stops stepping. Admission reserves the rows a request will need (its beams) up front,
so a request never waits for rows mid-decode: up to ``max_active`` sequences and ``rows`` pool slots are in
use, up to ``max_queued`` requests wait, and anything beyond is refused with Overloaded.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from runtime.decoder.core import DecoderCore, Handle
from runtime.decoder.generator import Generator
from runtime.types import CancelToken, InvalidRequest, Overloaded, Unavailable, check_cancel

__all__ = ["Batcher", "check_cancel"]

log = logging.getLogger(__name__)


@dataclass
class _Job:
    seq: Handle | None = None
    tokens: np.ndarray | None = None
    """A decode step (batched with others) when set; else ``call`` runs alone."""
    parents: np.ndarray | None = None
    """Beam search: fork the rows to these parents just before the step."""
    call: Callable[[], Any] | None = None
    done: threading.Event = field(default_factory=threading.Event)
    result: Any = None
    error: BaseException | None = None


class Batcher:
    def __init__(self, core: DecoderCore, max_active: int = 8, max_queued: int = 32, rows: int | None = None,
                 gather_ms: float = 2.0) -> None:
        self.core = core
        self.max_active = max_active
        self.max_queued = max_queued
        self.rows = rows if rows is not None else max_active
        """Pool slots (beams count one each) that admitted requests may reserve together."""
        self.gather_s = gather_ms / 1000.0
        self._cond = threading.Condition()
        self._pending: list[_Job] = []
        self._active: set[Generator] = set()
        self._reserved = 0
        self._waiting = 0
        self._stopped = False
        self.steps = 0
        self.batched_rows = 0
        self._worker = threading.Thread(target=self._loop, name="decode-batcher", daemon=True)
        self._worker.start()

    # -- admission ----------------------------------------------------------------------------------------
    @contextmanager
    def admit(self, cancel: CancelToken | None = None, rows: int = 1) -> Iterator[Generator]:
        """A generator with ``rows`` pool slots reserved; released (and its slots freed) on exit."""
        gen = self._acquire(cancel, rows)
        try:
            yield gen
        finally:
            self._release(gen)

    def _acquire(self, cancel: CancelToken | None, rows: int) -> Generator:
        if rows > self.rows:
            raise InvalidRequest(f"beams: {rows} rows needed, the KV pool has {self.rows} "
                                 "(unimp serve --kv-pool-bytes / --max-context)", field="")
        with self._cond:
            if self._stopped:
                raise Unavailable("the decoder is shutting down")
            if not self._fits(rows) and self._waiting >= self.max_queued:
                raise Overloaded(
                    f"decode queue full ({len(self._active)} active, {self._waiting} waiting); retry later"
                )
            self._waiting += 1
            try:
                while not self._fits(rows):
                    self._cond.wait(timeout=0.05)
                    check_cancel(cancel)
                    if self._stopped:
                        raise Unavailable("the decoder is shutting down")
            finally:
                self._waiting -= 1
            gen = Generator(self, rows, self.core.max_context)
            self._active.add(gen)
            self._reserved += rows
            return gen

    def _fits(self, rows: int) -> bool:
        return len(self._active) < self.max_active and self._reserved + rows <= self.rows

    def _release(self, gen: Generator) -> None:
        if gen.seq is not None:
            seq, gen.seq = gen.seq, None
            try:
                self.call(lambda: self.core.release(seq))
            except Unavailable:
                self.core.release(seq)  # the worker has stopped: nothing else touches the core
        with self._cond:
            if gen in self._active:
                self._active.discard(gen)
                self._reserved -= gen.reserved
            self._cond.notify_all()

    # -- stats --------------------------------------------------------------------------------------------
    @property
    def kv_bytes(self) -> int:
        return self.core.kv_bytes()

    @property
    def active(self) -> int:
        return len(self._active)

    @property
    def reserved_rows(self) -> int:
        return self._reserved

    @property
    def queue_depth(self) -> int:
        return self._waiting

    @property
    def pending_steps(self) -> int:
        """Decode steps submitted and not yet taken by the worker (they join the next batched call)."""
        with self._cond:
            return sum(1 for j in self._pending if j.tokens is not None)

    # -- work ---------------------------------------------------------------------------------------------
    def call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the worker, between decode steps; its result or exception comes back."""
        return self._submit(_Job(call=fn))

    def submit_step(self, seq: Handle, tokens: np.ndarray, parents: np.ndarray | None = None) -> np.ndarray:
        """One token per row of ``seq`` (after forking its rows to ``parents``) -> (rows, V) logits."""
        job = _Job(seq=seq, tokens=np.asarray(tokens, np.int64).reshape(-1), parents=parents)
        return self._submit(job)  # type: ignore[no-any-return]

    def _submit(self, job: _Job) -> Any:
        with self._cond:
            if self._stopped:
                raise Unavailable("the decoder is shutting down")
            self._pending.append(job)
            self._cond.notify_all()
        job.done.wait()
        if job.error is not None:
            raise job.error
        return job.result

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._stopped:
                    self._cond.wait()
                if self._stopped and not self._pending:
                    return
                calls = [j for j in self._pending if j.call is not None]
                if not calls:
                    # step boundary: give the other active sequences a moment to submit their next token
                    deadline = time.monotonic() + self.gather_s
                    while len(self._pending) < len(self._active) and time.monotonic() < deadline:
                        self._cond.wait(timeout=max(0.0, deadline - time.monotonic()))
                        if any(j.call is not None for j in self._pending):
                            break
                    calls = [j for j in self._pending if j.call is not None]
                if calls:  # prefills, forks and releases first: they are what lets sequences (re)join
                    jobs, self._pending = calls, [j for j in self._pending if j.call is None]
                else:
                    jobs, self._pending = self._pending, []
            if calls:
                for job in jobs:
                    try:
                        job.result = job.call()  # type: ignore[misc]
                    except BaseException as exc:  # the error belongs to that request
                        job.error = exc
                    job.done.set()
                continue
            stepping = []
            for job in jobs:
                if job.parents is not None:
                    try:
                        self.core.fork(job.seq, job.parents)  # type: ignore[arg-type]
                    except BaseException as exc:  # that request's error
                        job.error = exc
                        continue
                stepping.append(job)
            try:
                if stepping:
                    logits = self.core.step([j.seq for j in stepping], [j.tokens for j in stepping])  # type: ignore[misc]
                    for job, lg in zip(stepping, logits):
                        job.result = lg
            except BaseException as exc:  # the error belongs to the requests in this batch
                log.exception("decode step failed")
                for job in stepping:
                    job.error = exc
            self.steps += 1
            self.batched_rows += sum(0 if j.tokens is None else len(j.tokens) for j in jobs)
            for job in jobs:
                job.done.set()

    def close(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        self._worker.join(timeout=5)
