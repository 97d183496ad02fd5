"""Cross-attention K/V per catalog image, and the one call that gives a prompt its cross-attention memory.

The decoder's gated cross-attention blocks read each image through per-block keys and values that depend
only on the image's media latents (the ``media_kv`` graph). ``MediaKVStore`` keeps them for every catalog
image beside the latents (memory-mapped ``kv-*.npy`` shards of (rows, blocks, 2, h, n, dh) float32: float32
so that cached and request-time K/V agree to the last bits the graph gives), keyed by item id and image
digest like the latents, and fingerprinted by the ``media_kv`` graph's sha256 together with the latents'
fingerprint: re-exporting either graph invalidates the store, and a catalog edit (new image, delete)
invalidates the item's rows in both stores.

``MediaMemory.memory_for(images)`` is what the engine calls per prompt: catalog images come from the K/V
store, inline images go through vision + media_kv now. ``BackgroundEncoder`` fills the stores' pending items
after start-up (the server is SERVING meanwhile; a request encodes what it needs on first use), and
``encode_catalog`` is ``unimp catalog encode``: the same fill, ahead of time, on a build machine.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Self

import numpy as np

from runtime.backends.base import Provider, Session
from runtime.manifest import Manifest, ManifestError
from runtime.types import InvalidRequest, NotFound
from runtime.vision import (
    ImageCatalog,
    ImageInput,
    ItemStore,
    LatentStore,
    VisionEncoder,
    usable_cache_dir,
    vision_fingerprint,
)

log = logging.getLogger(__name__)

KV_DTYPE = np.float32
Memory = list[tuple[np.ndarray, np.ndarray]]
"""Per cross-attention block K, V: (images, h, num_latents, dh)."""


class MediaKVEncoder:
    """The ``media_kv`` graph: (N, n, Dv) media latents -> per block K, V (N, h, n, dh); thread-safe."""

    def __init__(self, session: Session, manifest: Manifest) -> None:
        names, d = manifest.names, manifest.decoder
        self._session = session
        self._input = names.media_latents
        if self._input not in session.input_names:
            raise ManifestError(f"media_kv graph has no input {self._input!r} (has {session.input_names})")
        self.blocks = len(d.xattn_layers)
        self.heads, self.head_dim = d.xattn_heads, d.xattn_head_dim
        self.num_latents, self.width = manifest.vision.num_latents, manifest.vision.width
        self.outputs = [(names.xattn_key.format(block=j), names.xattn_value.format(block=j)) for j in range(self.blocks)]
        missing = [n for pair in self.outputs for n in pair if n not in session.output_names]
        if missing:
            raise ManifestError(f"media_kv graph has no outputs {missing} (has {session.output_names})")
        entry = manifest.graphs.get("media_kv")
        profile = entry.profiles.get(self._input, {}) if entry is not None else {}
        self.max_batch = int(profile["max"][0]) if "max" in profile else 16
        self.fingerprint = media_kv_fingerprint(manifest)
        self._lock = threading.Lock()
        self.images_encoded = 0

    @property
    def item_shape(self) -> tuple[int, ...]:
        """One image's K/V as stored: (blocks, 2, h, n, dh)."""
        return (self.blocks, 2, self.heads, self.num_latents, self.head_dim)

    def encode(self, latents: np.ndarray) -> np.ndarray:
        """(N, n, Dv) latents -> (N, blocks, 2, h, n, dh) float32, in chunks of at most ``max_batch``."""
        if latents.ndim != 3 or latents.shape[1:] != (self.num_latents, self.width):
            raise ValueError(f"latents must have shape (N, {self.num_latents}, {self.width}), got {latents.shape}")
        out = np.empty((len(latents), *self.item_shape), KV_DTYPE)
        names = [n for pair in self.outputs for n in pair]
        for start in range(0, len(latents), self.max_batch):
            chunk = np.ascontiguousarray(latents[start : start + self.max_batch], np.float32)
            res = self._session.run({self._input: chunk}, names)
            for j, (k, v) in enumerate(self.outputs):
                out[start : start + len(chunk), j, 0] = res[k]
                out[start : start + len(chunk), j, 1] = res[v]
            with self._lock:
                self.images_encoded += len(chunk)
        return out


def media_kv_fingerprint(manifest: Manifest) -> str:
    """Identifies everything that determines an image's K/V: the media_kv graph and the latents' fingerprint."""
    entry = manifest.graphs.get("media_kv")
    d = manifest.decoder
    key = {
        "graph_sha256": entry.sha256 if entry is not None else "",
        "graph_file": entry.file if entry is not None else "",
        "precision": entry.precision if entry is not None else "",
        "latents": vision_fingerprint(manifest),
        "blocks": len(d.xattn_layers),
        "heads": d.xattn_heads,
        "head_dim": d.xattn_head_dim,
        "dtype": np.dtype(KV_DTYPE).name,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def default_kv_dir(latent_dir: Path) -> Path:
    """The K/V store beside a latent cache directory: ``<latents>-media-kv``."""
    latent_dir = Path(latent_dir)
    return latent_dir.with_name(f"{latent_dir.name}-media-kv")


class MediaKVStore(ItemStore):
    """Cross-attention K/V of every catalog image, computed from the latent store's latents (see module doc)."""

    SHARD_PREFIX = "kv-"
    KIND = "media_kv"

    def __init__(self, cache_dir: Path, latents: LatentStore, kv: MediaKVEncoder, catalog: ImageCatalog,
                 fingerprint: str, shard_items: int) -> None:
        super().__init__(cache_dir, catalog, kv.item_shape, np.dtype(KV_DTYPE), latents.batch, fingerprint,
                         shard_items)
        self._latents = latents
        self._kv = kv

    @classmethod
    def open(
        cls,
        cache_dir: Path,
        latents: LatentStore,
        kv: MediaKVEncoder,
        catalog: ImageCatalog,
        progress: bool = True,
        shard_items: int = 1024,
        fill: bool = True,
    ) -> Self:
        """Open (or build) the store; with ``fill``, compute every pending item's K/V now (see ItemStore).

        Open it after ``latents`` so that the catalog invalidates an item's latents before its K/V."""
        store = cls(usable_cache_dir(cache_dir, cls.SHARD_PREFIX), latents, kv, catalog, kv.fingerprint, shard_items)
        store._open(fill, progress)
        return store

    def _compute(self, item_ids: Sequence[str]) -> tuple[np.ndarray, list[int]]:
        try:
            latents, ok = self._latents.get(item_ids), list(range(len(item_ids)))
        except (InvalidRequest, NotFound):  # one bad image: the others still get their K/V
            rows, ok = [], []
            for i, item_id in enumerate(item_ids):
                try:
                    rows.append(self._latents.get([item_id]))
                    ok.append(i)
                except (InvalidRequest, NotFound) as exc:
                    log.warning("catalog item %s: no media K/V (%s)", item_id, exc)
            if not rows:
                return np.empty((0, *self._shape), self._dtype), ok
            latents = np.concatenate(rows)
        return self._kv.encode(latents), ok

    def _compute_strict(self, item_ids: Sequence[str]) -> np.ndarray:
        return self._kv.encode(self._latents.get(item_ids))


class PromptImage(Protocol):
    """One image of a prompt (``runtime.prompts.ResolvedItem`` is one): inline bytes, or a catalog item."""

    @property
    def image(self) -> ImageInput | None: ...

    @property
    def item_id(self) -> str: ...


class MediaMemory:
    """A prompt's cross-attention memory: catalog images' K/V from the store, inline images encoded now."""

    def __init__(self, vision: VisionEncoder, kv: MediaKVEncoder, store: MediaKVStore) -> None:
        self.vision = vision
        self.kv = kv
        self.store = store
        self.last_use = float("-inf")
        """``time.monotonic()`` of the latest ``memory_for`` call (start or end)."""

    def recently_used(self, quiet_s: float = 0.5) -> bool:
        """Whether a request asked for memory within the last ``quiet_s`` seconds (the background encoder
        then waits: requests come first)."""
        return time.monotonic() - self.last_use < quiet_s

    def memory_for(self, images: Sequence[PromptImage]) -> tuple[Memory, float]:
        """Per block K, V (M, h, n, dh) in prompt order, and the seconds it took.

        An inline image (``image`` set) is encoded through the vision and media_kv graphs; any other is a
        catalog item whose K/V come from the store (computed now if it is still pending). Undecodable inline
        bytes raise InvalidRequest(field="image"); an unknown item NotFound(field="item_id")."""
        t0 = time.perf_counter()
        self.last_use = time.monotonic()
        kv = self.kv
        m = len(images)
        entries = np.empty((m, *kv.item_shape), KV_DTYPE)  # (M, blocks, 2, h, n, dh)
        catalog_rows = [i for i, it in enumerate(images) if not it.image]
        inline_rows = [i for i, it in enumerate(images) if it.image]
        if catalog_rows:
            entries[catalog_rows] = self.store.get([images[i].item_id for i in catalog_rows])
        if inline_rows:
            inline = [images[i].image for i in inline_rows]
            entries[inline_rows] = kv.encode(self.vision.encode_images([x for x in inline if x is not None]))
        memory = [(np.ascontiguousarray(entries[:, j, 0]), np.ascontiguousarray(entries[:, j, 1]))
                  for j in range(kv.blocks)]
        self.last_use = time.monotonic()
        return memory, time.perf_counter() - t0


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
    from runtime.vision import default_cache_dir

    root = Path(artifacts)
    manifest = load_manifest(root, verify=True)
    backend = BackendConfig(provider=provider, intra_op_threads=threads)
    graphs = manifest.graphs
    vision = VisionEncoder(open_session(root / graphs["vision"].file, backend), manifest, max_batch=batch)
    kv = MediaKVEncoder(open_session(root / graphs["media_kv"].file, backend), manifest)
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

            codec = VQGANCodec(open_session(root / graphs["vqgan_encoder"].file, backend),
                               open_session(root / graphs["vqgan_decoder"].file, backend), manifest)
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
