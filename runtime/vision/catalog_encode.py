"""Filling the catalog stores: ``BackgroundEncoder`` encodes their pending items after start-up (the
server is SERVING meanwhile; a request encodes what it needs on first use), and ``encode_catalog`` is
``unimp catalog encode``: the same fill, ahead of time, on a build machine.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from runtime.backends.base import Provider
from runtime.vision.encoder import VisionEncoder
from runtime.vision.media_kv import MediaKVEncoder, MediaKVStore, default_kv_dir
from runtime.vision.store import ItemStore, LatentStore

log = logging.getLogger(__name__)

log = logging.getLogger(__name__)


class BackgroundEncoder:
    """Fills the stores' pending items, ``batch`` at a time, in a daemon thread (stores in order: latents
    before the K/V computed from them); sleeps while nothing is pending and wakes when an edit makes an
    item pending. Requests come first: while ``busy()`` says they are running it waits before its next
    batch, up to ``max_defer_s`` (so that it still progresses under constant traffic). ``pause``/``resume``
    hold it between batches; ``close`` stops it after the current batch and commits what it wrote."""

    def __init__(self, stores: Sequence[ItemStore], idle_s: float = 30.0, batch: int = 8,
                 busy: Callable[[], bool] | None = None, max_defer_s: float = 5.0) -> None:
        self.stores = list(stores)
        self._idle_s = idle_s
        self.batch = max(1, batch)
        """Items per background batch: small, so that a request never waits long behind one."""
        self._busy = busy
        self._max_defer_s = max_defer_s
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._running = threading.Event()
        self._running.set()
        self._thread: threading.Thread | None = None
        self.batches = 0
        self.error: BaseException | None = None
        for store in self.stores:
            store.on_pending(self._wake.set)

    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="unimp-catalog-encoder", daemon=True)
        self._thread.start()

    def pause(self) -> None:
        """Hold the encoder before its next batch (requests still encode what they need on first use)."""
        self._running.clear()

    def resume(self) -> None:
        self._running.set()

    @property
    def pending(self) -> int:
        return sum(s.pending for s in self.stores)

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until no store it can write has pending items (True), or until ``timeout`` seconds pass,
        or while it is not running (paused, never started, stopped by an error): then False."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while any(s.pending and not s.read_only for s in self.stores):
            alive = self._thread is not None and self._thread.is_alive() and self._running.is_set()
            if not alive or (deadline is not None and time.monotonic() >= deadline):
                return False
            time.sleep(0.02)
        return True

    def _run(self) -> None:
        t0 = time.perf_counter()
        total = 0
        while not self._stop.is_set():
            self._running.wait()
            if self._stop.is_set():
                break
            self._wake.clear()
            self._defer()
            n = 0
            try:
                for store in self.stores:
                    n = store.fill_step(self.batch)
                    if n:
                        break
            except Exception as exc:  # keep serving: requests still encode on first use
                self.error = exc
                log.exception("background catalog encoding failed; pending items are encoded on first use")
                return
            if n:
                self.batches += 1
                total += n
                continue
            if total:
                log.info("catalog encoded in the background: %d entries in %.1fs", total, time.perf_counter() - t0)
                total = 0
            self._wake.wait(self._idle_s)
            t0 = time.perf_counter()

    def _defer(self) -> None:
        """Wait while requests are running (``busy``), at most ``max_defer_s``."""
        if self._busy is None:
            return
        deadline = time.monotonic() + self._max_defer_s
        while self._busy() and time.monotonic() < deadline and not self._stop.is_set():
            time.sleep(0.05)

    def close(self, timeout: float = 60.0) -> None:
        """Stop after the batch in progress and commit the stores' shards."""
        self._stop.set()
        self._running.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("the background catalog encoder did not stop within %.0fs", timeout)
            self._thread = None
        for store in self.stores:
            store.commit()


# -- unimp catalog encode ----------------------------------------------------------------------------


@dataclass(frozen=True)
class StoreReport:
    kind: str
    directory: Path
    encoded_now: int
    """Entries this run wrote."""
    skipped: int
    """Catalog images this run could not encode (undecodable or unreadable; logged)."""
    items: int
    """Items in the store after it."""
    pending: int
    """Catalog images still without an entry (undecodable ones, or an interrupted run)."""
    bytes_per_item: int
    disk_bytes: int


def encode_catalog(
    artifacts: Path,
    cache_dir: Path | None = None,
    batch: int | None = None,
    provider: Provider = "cpu",
    threads: int = 0,
    progress: bool = True,
) -> list[StoreReport]:
    """Precompute the latent and K/V stores of ``artifacts``' catalog (what ``unimp serve`` would encode in
    the background), ``batch`` images per graph call. Resumable: rerun after an interrupt to continue."""
    from runtime.backends import BackendConfig, open_session
    from runtime.catalog import Catalog
    from runtime.manifest import load_manifest
    from runtime.vision.store import default_cache_dir

    root = Path(artifacts)
    manifest = load_manifest(root, verify=True)
    backend = BackendConfig(provider=provider, intra_op_threads=threads)
    graphs = manifest.graphs
    vision = VisionEncoder(open_session(root / graphs["vision"].file, backend, graphs["vision"]), manifest, max_batch=batch)
    kv = MediaKVEncoder(open_session(root / graphs["media_kv"].file, backend, graphs["media_kv"]), manifest)
    if batch is not None:
        kv.max_batch = batch
    catalog = Catalog(root, manifest)
    latent_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir(root)
    stores: list[ItemStore] = []
    taken: dict[str, int] = {}
    try:
        latents = LatentStore.open(latent_dir, catalog, vision, manifest, progress=progress, fill=False, batch=batch)
        stores.append(latents)
        stores.append(MediaKVStore.open(default_kv_dir(latent_dir), latents, kv, catalog, progress=progress,
                                        fill=False))
        if "vqgan_encoder" in graphs and "vqgan_decoder" in graphs:
            from runtime.vqgan import CodeEncoder, CodeStore, VQGANCodec, default_codes_dir

            codec = VQGANCodec(open_session(root / graphs["vqgan_encoder"].file, backend, graphs["vqgan_encoder"]),
                               open_session(root / graphs["vqgan_decoder"].file, backend, graphs["vqgan_decoder"]), manifest)
            if batch is not None:
                codec.encode_batch = batch
            stores.append(CodeStore.open(default_codes_dir(latent_dir), catalog, CodeEncoder(codec), manifest,
                                         fingerprint=codec.fingerprint, fill=False, batch=batch))
        busy = [str(store.cache_dir) for store in stores if store.read_only]
        if busy:
            raise RuntimeError(f"{', '.join(busy)}: in use by another process (a server or another `unimp catalog "
                               "encode` on the same artifacts); stop it first")
        for store in stores:
            taken[store.KIND] = store.fill(progress)
        reports = []
        for store in stores:
            size = int(np.prod(store.shape)) * store.dtype.itemsize
            store.flush()
            reports.append(StoreReport(store.KIND, store.cache_dir, store.written,
                                       taken.get(store.KIND, 0) - store.written, store.encoded, store.pending, size,
                                       store.disk_bytes()))
        return reports
    finally:
        for store in stores:
            store.close()  # flushes what was written, also after an interrupt, and releases the directory
        catalog.close()
