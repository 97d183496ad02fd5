"""Persistent per-item stores of catalog images' encodings (``ItemStore``; ``LatentStore`` for latents).

Catalog items are encoded once: a store keeps their arrays in memory-mapped ``.npy`` shards on disk,
keyed by item id and by the digest of the item's image, and fingerprinted by what produced them (the
vision graph's sha256 for latents) so that a re-export invalidates the whole store. Opening a store does
not encode: what is missing is encoded ahead of time (``unimp catalog encode``), in the background while
serving, or when a request first needs it. Only images that arrive with a request reach the encoder for
every use.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Protocol

import numpy as np
from tqdm import tqdm

from runtime.api import CatalogPage
from runtime.manifest import Manifest
from runtime.types import InvalidRequest, NotFound
from runtime.vision.encoder import vision_fingerprint
from runtime.vision.preprocess import ImageInput

if TYPE_CHECKING:  # typing.Self is Python 3.11+; annotations are strings here (PEP 563)
    from typing import Self

log = logging.getLogger(__name__)

INDEX_NAME = "index.json"
LOCK_NAME = "lock"
INDEX_FORMAT = 1


class ItemEncoder(Protocol):
    """What a store encodes catalog images with (VisionEncoder; runtime.vqgan.CodeEncoder for codes)."""

    @property
    def item_shape(self) -> tuple[int, ...]: ...

    @property
    def max_batch(self) -> int: ...

    @property
    def image_size(self) -> int: ...

    @property
    def dtype(self) -> type:
        """numpy scalar type of the stored arrays."""
        ...

    def preprocess_one(self, image: ImageInput) -> np.ndarray: ...

    def encode(self, pixels: np.ndarray) -> np.ndarray: ...

    def encode_images(self, images: Sequence[ImageInput]) -> np.ndarray: ...


class ImageCatalog(Protocol):
    """What the stores need from a catalog (``runtime.catalog.Catalog`` provides it)."""

    def page(self, page_size: int, page_token: str = "") -> CatalogPage: ...

    def image(self, item_id: str) -> bytes: ...

    def image_digest(self, item_id: str) -> str:
        """sha256 of the item's current image bytes; changes whenever the image does."""
        ...

    def on_image_change(self, callback: Callable[[str], None]) -> None: ...


def default_cache_dir(artifacts: Path) -> Path:
    """Where the latents of an artifacts directory's catalog are kept by default."""
    return Path(artifacts) / ".cache" / "latents"


def _writable_dir(path: Path) -> bool:
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".probe-{uuid.uuid4().hex}"
        probe.write_bytes(b"")
        probe.unlink()
        return True
    except OSError:
        return False


def usable_cache_dir(cache_dir: Path, prefix: str) -> Path:
    """``cache_dir`` if it is writable, else a fresh temporary directory (entries are then recomputed on
    every start)."""
    cache_dir = Path(cache_dir)
    if _writable_dir(cache_dir):
        return cache_dir
    fallback = Path(tempfile.mkdtemp(prefix=f"unimp-{prefix}"))
    log.warning("cache %s is not writable; using %s for this process", cache_dir, fallback)
    return fallback


@dataclass
class _Row:
    shard: str
    row: int
    digest: str


@dataclass
class _Pending:
    latents: np.ndarray  # one item's entry, owned by the store
    digest: str


@dataclass
class _Writer:
    """The shard the background fill appends to: created at its final name with room for ``capacity`` rows;
    only rows that were written and flushed before the index names them are ever read back."""

    name: str
    array: np.ndarray  # writable memmap (capacity, *shape)
    used: int = 0


def _catalog_images(catalog: ImageCatalog, page_size: int = 1000) -> Iterator[str]:
    """Every catalog item id that has an image, in the catalog's page order."""
    token = ""
    while True:
        page = catalog.page(page_size, token)
        for item in page.items:
            if item.has_image:
                yield item.item_id
        if not page.next_page_token:
            return
        token = page.next_page_token


class ItemStore:
    """One array per catalog image, memory-mapped from ``cache_dir``; thread-safe. Subclasses say what is
    stored (``_compute``): media latents (``LatentStore``), VQGAN codes (``runtime.vqgan.CodeStore``),
    cross-attention K/V (``runtime.vision.media_kv.MediaKVStore``).

    On-disk layout: ``index.json`` ({fingerprint, shape, shards, items: id -> [shard, row, image digest]})
    and shards ``<prefix><uuid>.npy`` of shape (rows, *shape). The index is replaced atomically and only
    names rows that were written and flushed, so a crash (or an interrupted ``unimp catalog encode``) leaves
    a readable store that the next run completes. Entries are looked up in the in-memory overlay (``put``
    and on-demand encodes, persisted by ``flush``) first, then in the shards.

    Opening never has to encode: the items whose entry is missing or stale (their image digest changed)
    are *pending*, and ``fill_step`` encodes them a batch at a time (``fill`` runs it to the end, the
    background encoder runs it while serving); ``get`` encodes a pending item on first use. An image change
    or a delete (the catalog's callback) invalidates the item's entry; a changed image makes it pending again.
    """

    SHARD_PREFIX = "items-"
    KIND = "items"
    """Name of the store in logs, progress bars and metrics."""

    def __init__(
        self,
        cache_dir: Path,
        catalog: ImageCatalog,
        shape: tuple[int, ...],
        dtype: np.dtype,
        batch: int,
        fingerprint: str,
        shard_items: int,
        commit_s: float = 5.0,
    ) -> None:
        self.cache_dir = cache_dir
        self._catalog = catalog
        self._fingerprint = fingerprint
        self._shape = tuple(shape)
        self._dtype = np.dtype(dtype)
        self.batch = max(1, int(batch))
        """Items per ``fill_step``."""
        self._shard_items = max(1, shard_items)
        self._commit_s = commit_s
        self._lock = threading.RLock()
        self._rows: dict[str, _Row] = {}
        self._shards: dict[str, np.ndarray] = {}  # name -> memmap (rows, *shape)
        self._overlay: dict[str, _Pending] = {}
        self._todo: dict[str, str] = {}  # pending item id -> image digest, in catalog order
        self._inflight: set[str] = set()  # taken by a fill_step that has not finished
        self._changed: dict[str, int] = {}  # item id -> epoch of its last invalidation
        self._writer: _Writer | None = None
        self._last_commit = time.monotonic()
        self._dead_rows = 0
        self._dirty = False
        self._epoch = 0
        self._listeners: list[Callable[[], None]] = []
        self.hits = 0
        self.misses = 0
        self.encoded_on_demand = 0
        """Pending items that a request encoded before the fill reached them."""
        self.written = 0
        """Entries the fill wrote since opening."""
        self.read_only = False
        """Another store owns ``cache_dir``: read its committed shards, write nothing (see ``_lock_dir``)."""
        self._lock_file: IO[bytes] | None = None

    # -- what is stored (subclasses) ----------------------------------------------------------------
    def _compute(self, item_ids: Sequence[str]) -> tuple[np.ndarray, list[int]]:
        """Entries of ``item_ids`` for a fill: (len(ok), *shape) and the positions ``ok`` that have one
        (undecodable images are logged and left out)."""
        raise NotImplementedError

    def _compute_strict(self, item_ids: Sequence[str]) -> np.ndarray:
        """Entries of ``item_ids`` for a request: (len(item_ids), *shape); NotFound(field="item_id") for an
        item without an image, InvalidRequest(field="image") for one that does not decode."""
        raise NotImplementedError

    # -- opening -----------------------------------------------------------------------------------
    def _open(self, fill: bool, progress: bool) -> None:
        self._lock_dir()
        self._load_index()
        self._scan()
        self._catalog.on_image_change(self.invalidate)
        if fill:
            self.fill(progress)

    def _lock_dir(self) -> None:
        """Own ``cache_dir`` (an exclusive lock on ``cache_dir/lock`` held until ``close``). When another
        store holds it (another server, a running ``unimp catalog encode``), this one only reads the shards
        that store had committed: it never writes, and computes what is missing in memory."""
        handle = open(self.cache_dir / LOCK_NAME, "a+b")  # held until close()
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            self.read_only = True
            log.warning("%s cache %s is in use by another process or store; reading it without writing",
                        self.KIND, self.cache_dir)
            return
        self._lock_file = handle

    def _load_index(self) -> None:
        path = self.cache_dir / INDEX_NAME
        if not path.is_file():
            if not self.read_only:
                self._remove_unlisted(set())
            return
        try:
            index = json.loads(path.read_text(encoding="utf-8"))
            valid = (
                index.get("format") == INDEX_FORMAT
                and index.get("fingerprint") == self._fingerprint
                and tuple(index.get("shape", ())) == self._shape
            )
        except (OSError, ValueError, AttributeError, TypeError) as exc:
            log.warning("%s cache index %s is unreadable (%s); rebuilding", self.KIND, path, exc)
            valid = False
            index = {}
        if not valid:
            if index:
                log.info("%s cache %s was built for another graph; rebuilding", self.KIND, self.cache_dir)
            if not self.read_only:
                self._reset()
            return
        for name in index.get("shards", []):
            if not (isinstance(name, str) and name.startswith(self.SHARD_PREFIX) and name.endswith(".npy") and "/" not in name):
                log.warning("%s cache index %s names an unexpected shard %r; ignoring it", self.KIND, path, name)
                continue
            try:
                array = np.load(self.cache_dir / name, mmap_mode="r")
            except (OSError, ValueError) as exc:
                log.warning("%s shard %s is unreadable (%s); its items will be re-encoded", self.KIND, name, exc)
                continue
            if array.ndim != 1 + len(self._shape) or tuple(array.shape[1:]) != self._shape or array.dtype != self._dtype:
                log.warning("%s shard %s has shape %s %s; ignoring it", self.KIND, name, array.shape, array.dtype)
                continue
            self._shards[name] = array
        if not self.read_only:
            self._remove_unlisted(set(self._shards))
        try:
            for item_id, (shard, row, digest) in index.get("items", {}).items():
                if shard in self._shards and 0 <= int(row) < len(self._shards[shard]):
                    self._rows[str(item_id)] = _Row(shard, int(row), str(digest))
        except (AttributeError, TypeError, ValueError) as exc:
            log.warning("%s cache index %s is malformed (%s); rebuilding", self.KIND, path, exc)
            self._rows.clear()
            if not self.read_only:
                self._reset()
            return
        self._dead_rows = sum(len(a) for a in self._shards.values()) - len(self._rows)

    def _remove_unlisted(self, listed: set[str]) -> None:
        """Delete shards no index names (left by a crash before their first commit)."""
        for path in [*self.cache_dir.glob(f"{self.SHARD_PREFIX}*.npy"), *self.cache_dir.glob("*.tmp.npy")]:
            if path.name not in listed:
                try:
                    path.unlink()
                except OSError as exc:
                    log.warning("could not remove %s: %s", path, exc)

    def _reset(self) -> None:
        """Forget every persisted entry (a different graph, or a corrupt index)."""
        for pattern in (f"{self.SHARD_PREFIX}*.npy", "*.tmp.npy", INDEX_NAME):
            for path in self.cache_dir.glob(pattern):
                try:
                    path.unlink()
                except OSError as exc:
                    log.warning("could not remove %s: %s", path, exc)
        self._rows.clear()
        self._shards.clear()
        self._dead_rows = 0

    def _scan(self) -> None:
        """Queue every catalog image whose entry is missing or stale."""
        todo = {}
        for item_id in _catalog_images(self._catalog):
            try:
                digest = self._catalog.image_digest(item_id)
            except NotFound:
                continue
            row = self._rows.get(item_id)
            if row is None or row.digest != digest:
                todo[item_id] = digest
        with self._lock:
            self._todo = todo
        if todo:
            log.info("%s cache %s: %d cached, %d catalog images to encode", self.KIND, self.cache_dir,
                     len(self._rows), len(todo))
        else:
            log.info("%s cache %s: all %d catalog images cached", self.KIND, self.cache_dir, len(self._rows))

    # -- filling -----------------------------------------------------------------------------------
    @property
    def pending(self) -> int:
        """Catalog images without a current entry (queued or being encoded)."""
        with self._lock:
            return len(self._todo) + len(self._inflight - self._overlay.keys())

    @property
    def encoded(self) -> int:
        """Items with an entry (persisted or in the overlay)."""
        with self._lock:
            return len(self._rows.keys() | self._overlay.keys())

    def on_pending(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` whenever items become pending (the background encoder wakes up)."""
        with self._lock:
            self._listeners.append(callback)

    def fill(self, progress: bool = True, stop: threading.Event | None = None) -> int:
        """Encode every pending item, ``batch`` at a time, until none is left or ``stop`` is set; returns the
        number of items taken. Progress is committed as it goes: an interrupted fill loses at most the batch
        it was encoding."""
        total = 0
        bar = tqdm(total=self.pending, desc=f"catalog {self.KIND}", unit="img", disable=not progress)
        try:
            while stop is None or not stop.is_set():
                n = self.fill_step()
                if not n:
                    break
                total += n
                bar.update(n)
        finally:
            bar.close()
            self.commit()
        return total

    def fill_step(self, limit: int | None = None) -> int:
        """Encode up to ``batch`` (or ``limit``, if smaller) pending items into the open shard; returns how
        many were taken (0: none pending; always 0 for a read-only store)."""
        if self.read_only:
            return 0
        with self._lock:
            take: list[tuple[str, str]] = []
            size = self.batch if limit is None else max(1, min(self.batch, limit))
            for item_id in list(self._todo):
                if len(take) == size:
                    break
                take.append((item_id, self._todo.pop(item_id)))
            self._inflight.update(item_id for item_id, _ in take)
            epoch = self._epoch
            room = len(self._todo) + len(take)
        if not take:
            return 0
        try:
            entries, ok = self._compute([item_id for item_id, _ in take])  # (len(ok), *shape)
            with self._lock:
                fresh = [(take[i], k) for k, i in enumerate(ok) if self._changed.get(take[i][0], -1) <= epoch]
                if fresh:
                    writer = self._open_writer(room)
                    for j, ((item_id, digest), k) in enumerate(fresh):
                        if writer.used == len(writer.array):  # full: the next shard holds what is left
                            writer = self._open_writer(len(self._todo) + len(fresh) - j)
                        writer.array[writer.used] = entries[k]
                        if item_id in self._rows:
                            self._dead_rows += 1
                        self._rows[item_id] = _Row(writer.name, writer.used, digest)
                        self._overlay.pop(item_id, None)  # an on-demand encode of the same image
                        writer.used += 1
                    self.written += len(fresh)
                    self._dirty = True
                if not self._todo or time.monotonic() - self._last_commit >= self._commit_s:
                    self.commit()
        except BaseException:  # an encoder error or an interrupt: the batch stays pending
            with self._lock:
                requeue = {k: d for k, d in take if k not in self._changed or self._changed[k] <= epoch}
                self._todo = {**requeue, **self._todo}
            raise
        finally:
            with self._lock:
                self._inflight.difference_update(item_id for item_id, _ in take)
        return len(take)

    def _open_writer(self, room: int) -> _Writer:
        """The shard to append to, a new one (for at most ``room`` rows) when there is none or it is full."""
        w = self._writer
        if w is not None and w.used < len(w.array):
            return w
        self._close_writer()
        name = f"{self.SHARD_PREFIX}{uuid.uuid4().hex}.npy"
        rows = max(1, min(self._shard_items, room))
        array = np.lib.format.open_memmap(self.cache_dir / name, mode="w+", dtype=self._dtype,
                                          shape=(rows, *self._shape))
        self._shards[name] = array
        self._writer = _Writer(name, array)
        return self._writer

    def _close_writer(self) -> None:
        """Flush the open shard; its unused rows become dead rows (the lock is held)."""
        w, self._writer = self._writer, None
        if w is None:
            return
        w.array.flush()  # type: ignore[attr-defined]
        self._dead_rows += len(w.array) - w.used
        if w.used:
            self._shards[w.name] = np.load(self.cache_dir / w.name, mmap_mode="r")
        else:
            self._shards.pop(w.name, None)
            (self.cache_dir / w.name).unlink(missing_ok=True)
        self._dirty = True

    def commit(self) -> None:
        """Make the rows written so far durable: flush the open shard, then write the index."""
        if self.read_only:
            return
        with self._lock:
            if self._writer is not None:
                self._writer.array.flush()  # type: ignore[attr-defined]
                if not self._todo:
                    self._close_writer()
            self._write_index()
            self._last_commit = time.monotonic()

    def _write_index(self) -> None:
        """Atomically replace index.json with the current shard rows (the lock is held)."""
        index = {
            "format": INDEX_FORMAT,
            "fingerprint": self._fingerprint,
            "shape": list(self._shape),
            "dtype": self._dtype.name,
            "shards": sorted(self._shards),
            "items": {k: [r.shard, r.row, r.digest] for k, r in self._rows.items()},
        }
        tmp = self.cache_dir / f"{INDEX_NAME}.{uuid.uuid4().hex}.tmp"
        tmp.write_text(json.dumps(index), encoding="utf-8")
        os.replace(tmp, self.cache_dir / INDEX_NAME)

    # -- lookups -----------------------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of one item's entry: (num_latents, width) for latents."""
        return self._shape

    @property
    def dtype(self) -> np.dtype:
        return self._dtype

    def __contains__(self, item_id: object) -> bool:
        with self._lock:
            return item_id in self._overlay or item_id in self._rows

    def __len__(self) -> int:
        return self.encoded

    def get(self, item_ids: Sequence[str]) -> np.ndarray:
        """(len(item_ids), *shape), a fresh array the caller owns.

        Items without an entry are encoded from their catalog image now (and kept in the overlay); an id
        with neither raises NotFound(field="item_id").
        """
        out = np.empty((len(item_ids), *self._shape), dtype=self._dtype)  # (B, *shape)
        missing: dict[str, list[int]] = {}
        with self._lock:
            epoch = self._epoch
            for i, item_id in enumerate(item_ids):
                pending = self._overlay.get(item_id)
                if pending is not None:
                    out[i] = pending.latents
                    self.hits += 1
                    continue
                row = self._rows.get(item_id)
                if row is not None:
                    out[i] = self._shards[row.shard][row.row]
                    self.hits += 1
                    continue
                missing.setdefault(item_id, []).append(i)
                self.misses += 1
        if missing:
            ids = list(missing)
            digests = [self._digest_or_missing(item_id) for item_id in ids]
            entries = self._compute_strict(ids)  # (M, *shape)
            for j, item_id in enumerate(ids):
                out[missing[item_id]] = entries[j]
            with self._lock:
                for j, item_id in enumerate(ids):
                    if self._changed.get(item_id, -1) > epoch:
                        continue  # its image changed meanwhile: not cached
                    self._overlay[item_id] = _Pending(entries[j].copy(), digests[j])
                    if self._todo.pop(item_id, None) is not None:
                        self.encoded_on_demand += 1
                    self._dirty = True
        return out

    def _digest_or_missing(self, item_id: str) -> str:
        try:
            return self._catalog.image_digest(item_id)
        except NotFound as exc:
            raise NotFound(f"item_id: no {self.KIND} and no catalog image for item {item_id!r}",
                           field="item_id") from exc

    # -- edits -------------------------------------------------------------------------------------
    def put(self, item_id: str, entry: np.ndarray, digest: str | None = None) -> None:
        """Set ``item_id``'s entry (``shape``, or (1, *shape)); persisted by ``flush``.

        ``digest`` is the sha256 of the image it was computed from (default: the catalog's current one,
        or "" for items outside the catalog); a digest that no longer matches the catalog is re-encoded on
        the next open.
        """
        array = np.asarray(entry, dtype=self._dtype)
        if array.ndim == 1 + len(self._shape) and array.shape[0] == 1:
            array = array[0]
        if array.shape != self._shape:
            raise ValueError(f"{self.KIND} for {item_id!r} must have shape {self._shape}, got {np.shape(entry)}")
        if digest is None:
            try:
                digest = self._catalog.image_digest(item_id)
            except NotFound:
                digest = ""
        with self._lock:
            self._overlay[item_id] = _Pending(array.copy(), digest)
            self._todo.pop(item_id, None)
            self._dirty = True

    def invalidate(self, item_id: str) -> None:
        """Forget ``item_id``'s entry (its image changed or it was deleted); an item that still has an image
        is pending again (the background fill or the next ``get`` re-encodes it)."""
        with self._lock:
            self._epoch += 1
            epoch = self._epoch
            self._changed[item_id] = epoch
            self._todo.pop(item_id, None)
            dropped = self._overlay.pop(item_id, None) is not None
            if self._rows.pop(item_id, None) is not None:
                self._dead_rows += 1
                dropped = True
            if dropped:
                self._dirty = True
                log.debug("%s of %s invalidated", self.KIND, item_id)
        try:
            digest = self._catalog.image_digest(item_id)
        except NotFound:
            return  # deleted, or no image any more
        with self._lock:
            if self._changed.get(item_id) != epoch or item_id in self._overlay:
                return  # changed again meanwhile, or already re-encoded
            self._todo[item_id] = digest
            listeners = list(self._listeners)
        for callback in listeners:
            callback()

    def flush(self) -> None:
        """Persist the overlay as a new shard and the index; compacts when most shard rows are dead."""
        if self.read_only:
            return
        with self._lock:
            self._close_writer()
            if not self._dirty:
                return
            pending = dict(self._overlay)
            if pending:
                name = f"{self.SHARD_PREFIX}{uuid.uuid4().hex}.npy"
                tmp = self.cache_dir / f"{name[:-4]}.tmp.npy"
                np.save(tmp, np.stack([p.latents for p in pending.values()]))  # (M, *shape)
                os.replace(tmp, self.cache_dir / name)
                self._shards[name] = np.load(self.cache_dir / name, mmap_mode="r")
                for row, (item_id, p) in enumerate(pending.items()):
                    if item_id in self._rows:
                        self._dead_rows += 1
                    self._rows[item_id] = _Row(name, row, p.digest)
                self._overlay.clear()
            if self._dead_rows > len(self._rows):
                self._compact()
            self._drop_unused_shards()
            self._write_index()
            self._dirty = False

    def _compact(self) -> None:
        """Rewrite the live rows into one shard (the lock is held)."""
        name = f"{self.SHARD_PREFIX}{uuid.uuid4().hex}.npy"
        tmp = self.cache_dir / f"{name[:-4]}.tmp.npy"
        ids = list(self._rows)
        array = np.lib.format.open_memmap(tmp, mode="w+", dtype=self._dtype, shape=(len(ids), *self._shape))
        for i, item_id in enumerate(ids):
            r = self._rows[item_id]
            array[i] = self._shards[r.shard][r.row]
        array.flush()
        del array
        os.replace(tmp, self.cache_dir / name)
        self._shards[name] = np.load(self.cache_dir / name, mmap_mode="r")
        for i, item_id in enumerate(ids):
            self._rows[item_id] = _Row(name, i, self._rows[item_id].digest)
        self._dead_rows = 0
        log.info("%s cache %s compacted to %d rows", self.KIND, self.cache_dir, len(ids))

    def _drop_unused_shards(self) -> None:
        used = {r.shard for r in self._rows.values()}
        for name in [n for n in self._shards if n not in used]:
            self._dead_rows -= len(self._shards.pop(name))
            try:
                (self.cache_dir / name).unlink()
            except OSError as exc:
                log.warning("could not remove %s: %s", name, exc)
        self._dead_rows = max(0, self._dead_rows)

    def disk_bytes(self) -> int:
        """Bytes of the shards on disk (allocated rows, live or dead)."""
        with self._lock:
            return sum(int(a.nbytes) for a in self._shards.values())

    def stats(self) -> dict[str, float]:
        """Counters for metrics."""
        with self._lock:
            return {
                "hits": float(self.hits),
                "misses": float(self.misses),
                "items": float(len(self._rows.keys() | self._overlay.keys())),
                "overlay": float(len(self._overlay)),
                "pending": float(len(self._todo) + len(self._inflight - self._overlay.keys())),
                "encoded_on_demand": float(self.encoded_on_demand),
                "shards": float(len(self._shards)),
            }

    def close(self) -> None:
        """Flush the overlay and the open shard, and release the memory maps."""
        self.flush()
        with self._lock:
            self._shards.clear()
            self._rows.clear()
            if self._lock_file is not None:
                self._lock_file.close()  # releases the directory lock
                self._lock_file = None


class LatentStore(ItemStore):
    """Media latents of every catalog item (``latents-*.npy`` shards of (rows, num_latents, width)).

    The encoder decides what is stored per image (its ``item_shape`` and ``dtype``); ``runtime.vqgan.CodeStore``
    keeps VQGAN codes the same way with another encoder.
    """

    SHARD_PREFIX = "latents-"
    KIND = "latents"

    def __init__(
        self,
        cache_dir: Path,
        catalog: ImageCatalog,
        encoder: ItemEncoder,
        fingerprint: str,
        shard_items: int,
    ) -> None:
        super().__init__(cache_dir, catalog, tuple(encoder.item_shape), np.dtype(encoder.dtype), encoder.max_batch,
                         fingerprint, shard_items)
        self._encoder = encoder

    @classmethod
    def open(
        cls,
        cache_dir: Path,
        catalog: ImageCatalog,
        encoder: ItemEncoder,
        manifest: Manifest,
        progress: bool = True,
        shard_items: int = 4096,
        fingerprint: str | None = None,
        fill: bool = True,
        batch: int | None = None,
    ) -> Self:
        """Open (or build) the store for ``catalog`` and subscribe to the catalog's image changes. With
        ``fill``, encode every item whose entry is missing or stale now, ``batch`` images at a time (default:
        the encoder's); without, they stay pending (``fill_step``, or ``get`` on first use).

        An unwritable ``cache_dir`` falls back to a fresh temporary directory.
        """
        key = fingerprint if fingerprint is not None else vision_fingerprint(manifest)
        store = cls(usable_cache_dir(cache_dir, cls.SHARD_PREFIX), catalog, encoder, key, shard_items)
        if batch is not None:
            store.batch = max(1, batch)
        store._open(fill, progress)
        return store

    def _compute(self, item_ids: Sequence[str]) -> tuple[np.ndarray, list[int]]:
        pixels, ok = self._pixels(item_ids)
        if not ok:
            return np.empty((0, *self._shape), self._dtype), ok
        return self._encoder.encode(pixels), ok

    def _compute_strict(self, item_ids: Sequence[str]) -> np.ndarray:
        try:
            images = [self._catalog.image(item_id) for item_id in item_ids]
        except NotFound as exc:
            raise NotFound(str(exc), field="item_id") from exc
        return self._encoder.encode_images(images)

    def _pixels(self, item_ids: Sequence[str]) -> tuple[np.ndarray, list[int]]:
        """Preprocess the catalog images of ``item_ids``; undecodable ones are logged and left out."""
        arrays, ok = [], []
        e = self._encoder
        for i, item_id in enumerate(item_ids):
            try:
                arrays.append(e.preprocess_one(self._catalog.image(item_id)))
                ok.append(i)
            except (InvalidRequest, NotFound) as exc:
                log.warning("catalog item %s: no %s (%s)", item_id, self.KIND, exc)
        s = e.image_size
        pixels = np.stack(arrays) if arrays else np.empty((0, 3, s, s), dtype=np.float32)  # (b, 3, S, S)
        return pixels, ok

