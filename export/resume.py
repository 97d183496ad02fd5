"""Resumable demo training: an on-disk catalog-encode cache and a training state written atomically.

Both live under the demo checkpoint's ``.train-cache/`` (``unimp export --demo P --out DIR`` writes
``DIR/checkpoint/.train-cache/``)::

    media-<key>/chunk-00000.pt   media latents of catalog images 0..15, 16..31, ... (frozen vision only);
                                 ``key`` hashes the vision tower's and perceiver's weights and the
                                 preprocessed catalog pixels, so any change of config, seed or catalog
                                 starts a new cache (stale ones are removed)
    state.json                   the training position: step, numpy RNG state, loss curve, seconds, the
                                 setup it belongs to, and the payload's name, size and sha256
    state-<step>.pt              the payload: trained tensors, AdamW and scheduler state, torch RNG state

Every file is written to a temporary name and renamed into place, so an interrupt loses at most the chunk
or the steps since the last save. ``state.json`` is renamed last: it always names a complete payload; older
payloads are deleted after it.

Determinism: a run resumed from a state repeats the uninterrupted run's arithmetic on the same machine with
the same torch thread count (the thread count is recorded; a different one is warned about).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from export.checkpoints import CheckpointError

log = logging.getLogger(__name__)

CACHE_DIR = ".train-cache"
STATE_JSON = "state.json"
MEDIA_CHUNK = 16
"""Catalog images per cached chunk (about 24 s of encoding for ``small`` on 2 cores)."""
STATE_VERSION = 1


class StateError(CheckpointError):
    """A training state cannot be resumed (corrupt, partial or from another setup); names the file."""


class TrainingStopped(Exception):
    """Training stopped early with its state saved: ``reason`` is ``time``, ``SIGINT``, ``SIGTERM`` or
    ``stop_after``; ``step`` of ``steps`` optimizer steps are done (``stage`` says where it stopped)."""

    def __init__(self, reason: str, step: int, steps: int, state_dir: Path, stage: str = "train") -> None:
        self.reason, self.step, self.steps, self.state_dir, self.stage = reason, step, steps, Path(state_dir), stage
        super().__init__(f"training stopped ({reason}) at {stage}, step {step}/{steps}; state in {state_dir}")

    @property
    def exit_code(self) -> int:
        """0 for a planned stop (time limit, test hook), 128 + the signal number for a signal."""
        return {"SIGINT": 128 + signal.SIGINT, "SIGTERM": 128 + signal.SIGTERM}.get(self.reason, 0)


@dataclass
class ResumeOptions:
    """Where and how often ``export.train.train`` saves its state, and when it stops early."""

    directory: Path
    """The ``.train-cache`` directory (created on the first write)."""
    save_every: int = 0
    """Save every N optimizer steps (0: only when stopping and at the end)."""
    deadline: float | None = None
    """``time.monotonic()`` after which the catalog encode or training stops with the state saved."""
    restart: bool = False
    """Discard a saved training state instead of resuming it (the catalog cache is kept: it is keyed)."""
    stop_after: int | None = None
    """Test hook: stop (state saved) once this many optimizer steps are done."""


def sha256_path(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def tensor_digest(items: Iterable[tuple[str, torch.Tensor]]) -> str:
    """sha256 over names, dtypes, shapes and bytes of tensors."""
    h = hashlib.sha256()
    for name, t in items:
        t = t.detach().contiguous().cpu()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().data)  # the buffer: no copy of 1 GB of pixels
    return h.hexdigest()


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# -- stop requests: signals and the deadline --------------------------------------------------------------


class StopWatch:
    """Turns SIGINT/SIGTERM into a stop request checked between steps (a second signal aborts at once) and
    checks the deadline. Signal handlers are installed only in the main thread, inside ``armed()``."""

    def __init__(self, deadline: float | None) -> None:
        self.deadline = deadline
        self.signal: str | None = None

    def reason(self) -> str | None:
        if self.signal:
            return self.signal
        if self.deadline is not None and time.monotonic() >= self.deadline:
            return "time"
        return None

    @contextlib.contextmanager
    def armed(self) -> Iterator[StopWatch]:
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

        def handler(signum: int, frame: Any) -> None:
            name = signal.Signals(signum).name
            if self.signal:  # the second one: stop now, losing the steps since the last save
                signal.signal(signum, previous[signal.Signals(signum)])
                raise KeyboardInterrupt
            self.signal = name
            print(f"\n{name}: saving the training state after the current step (send it again to abort)",
                  flush=True)

        for s in previous:
            signal.signal(s, handler)
        try:
            yield self
        finally:
            for s, h in previous.items():
                signal.signal(s, h)


# -- the catalog-encode cache ------------------------------------------------------------------------------


def media_key(vision_state: Iterable[tuple[str, torch.Tensor]], pixels: torch.Tensor) -> str:
    """What the catalog's media latents depend on: the frozen encoder weights and the preprocessed pixels."""
    h = hashlib.sha256()
    h.update(tensor_digest(vision_state).encode())
    h.update(tensor_digest([("pixels", pixels)]).encode())
    h.update(f"chunk={MEDIA_CHUNK}".encode())
    return h.hexdigest()[:20]


def cached_media(
    encode: Callable[[torch.Tensor], torch.Tensor], pixels: torch.Tensor, key: str, directory: Path | None,
    watch: StopWatch | None = None, progress: bool = True, on_stop: Callable[[str, str], None] | None = None,
) -> torch.Tensor:
    """``encode`` over ``pixels`` in chunks of ``MEDIA_CHUNK``, each chunk read from / written to
    ``directory/media-<key>/`` (no caching when ``directory`` is None). A chunk that does not load or has
    the wrong shape is encoded again. Between chunks ``watch`` may ask to stop: ``on_stop(reason, stage)``
    is called (it raises)."""
    from tqdm import tqdm

    n = len(pixels)
    chunks = range(0, n, MEDIA_CHUNK)
    where = None
    if directory is not None:
        where = Path(directory) / f"media-{key}"
        where.mkdir(parents=True, exist_ok=True)
        for stale in Path(directory).glob("media-*"):
            if stale != where and stale.is_dir():
                log.info("removing the stale catalog cache %s", stale)
                shutil.rmtree(stale, ignore_errors=True)
    out: list[torch.Tensor | None] = []
    cached = 0
    with torch.no_grad():
        for c, start in enumerate(chunks):
            expect = min(MEDIA_CHUNK, n - start)
            path = where / f"chunk-{c:05d}.pt" if where is not None else None
            got = None
            if path is not None and path.is_file():
                try:
                    got = torch.load(path, map_location="cpu", weights_only=True)
                except Exception as exc:  # any unreadable chunk is encoded again
                    log.warning("%s: unreadable (%s); encoding it again", path, exc)
                if got is not None and (not isinstance(got, torch.Tensor) or got.shape[0] != expect):
                    log.warning("%s: wrong shape; encoding it again", path)
                    got = None
            if got is not None:
                cached += 1
            out.append(got)
    todo = [c for c, t in enumerate(out) if t is None]
    if cached and where is not None:
        log.info("catalog cache %s: %d of %d chunks reused", where, cached, len(out))
    bar = tqdm(total=n, initial=n - sum(min(MEDIA_CHUNK, n - c * MEDIA_CHUNK) for c in todo),
               desc="catalog encode", unit="img", disable=not progress)
    with torch.no_grad():
        for c in todo:
            if watch is not None and on_stop is not None and (reason := watch.reason()):
                bar.close()
                have = sum(len(t) for t in out if t is not None)
                on_stop(reason, f"catalog encode, {have}/{n} images cached")
            start = c * MEDIA_CHUNK
            t = encode(pixels[start:start + MEDIA_CHUNK]).contiguous()
            if where is not None:
                _atomic_torch_save(t, where / f"chunk-{c:05d}.pt")
            out[c] = t
            bar.update(len(t))
    bar.close()
    return torch.cat([t for t in out if t is not None]) if out else torch.zeros(0)


# -- the training state ------------------------------------------------------------------------------------


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): d}


def setup_differences(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """``name: saved X, now Y`` for each setting that differs (nested keys dotted)."""
    a, b = _flatten(json.loads(json.dumps(saved))), _flatten(json.loads(json.dumps(now)))
    return [f"{k}: saved {a.get(k, '(absent)')!r}, now {b.get(k, '(absent)')!r}"
            for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def save_state(directory: Path, setup: dict[str, Any], step: int, tensors: dict[str, Any],
               info: dict[str, Any]) -> Path:
    """Write the payload ``state-<step>.pt`` and then ``state.json`` naming it; remove older payloads."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    payload = directory / f"state-{step:06d}.pt"
    _atomic_torch_save(tensors, payload)
    record = {"version": STATE_VERSION, "step": step, "setup": setup, "payload": payload.name,
              "payload_bytes": payload.stat().st_size, "payload_sha256": sha256_path(payload), **info}
    _atomic_write_bytes(directory / STATE_JSON, json.dumps(record, indent=1).encode())
    for old in directory.glob("state-*.pt"):
        if old != payload:
            old.unlink(missing_ok=True)
    return payload


def discard_state(directory: Path) -> None:
    """Remove a saved training state (``state.json`` first, so a partial removal never looks resumable)."""
    directory = Path(directory)
    (directory / STATE_JSON).unlink(missing_ok=True)
    for p in directory.glob("state-*.pt"):
        p.unlink(missing_ok=True)


def load_state(directory: Path, setup: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """The saved ``(state.json record, payload tensors)``, or None when there is none.

    Raises StateError, naming the file and how to start over, when the state is corrupt or partial or was
    saved for a different setup (each differing setting listed)."""
    directory = Path(directory)
    path = directory / STATE_JSON
    if not path.is_file():
        return None
    hint = "pass --restart to discard it and train from the start"
    try:
        record = json.loads(path.read_text())
        if not isinstance(record, dict) or record.get("version") != STATE_VERSION:
            raise ValueError(f"not a version-{STATE_VERSION} training state")
        payload = directory / str(record["payload"])
        step = int(record["step"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise StateError(f"{path}: corrupt training state ({exc}); {hint}") from exc
    diffs = setup_differences(record.get("setup", {}), setup)
    if diffs:
        raise StateError(f"{path}: the saved training state (step {step}) belongs to a different setup: "
                         + "; ".join(diffs) + f"; run with the saved settings to resume it, or {hint}")
    if not payload.is_file():
        raise StateError(f"{payload}: missing (named by {path}); {hint}")
    size = payload.stat().st_size
    if size != record.get("payload_bytes") or sha256_path(payload) != record.get("payload_sha256"):
        raise StateError(f"{payload}: corrupt or partial ({size} bytes, expected {record.get('payload_bytes')}, "
                         f"or its sha256 differs from {path}); {hint}")
    try:
        tensors = torch.load(payload, map_location="cpu", weights_only=True)
    except Exception as exc:  # any load failure is a corrupt state
        raise StateError(f"{payload}: cannot be read ({exc}); {hint}") from exc
    if not isinstance(tensors, dict):
        raise StateError(f"{payload}: not a training state; {hint}")
    return record, tensors
