"""Images -> media latents: UniMP preprocessing, the vision graph, and a persistent latent store.

Catalog items are encoded once: ``LatentStore`` keeps their media latents in memory-mapped ``.npy``
shards on disk, keyed by item id and by the digest of the item's image, and fingerprinted by the vision
graph's sha256 so that a re-export invalidates the whole cache. Only images that arrive with a request (or
items edited after start-up) reach the encoder while serving.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Self

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from runtime.api import CatalogPage
from runtime.backends.base import Session
from runtime.manifest import Manifest, ManifestError
from runtime.types import InvalidRequest, NotFound

log = logging.getLogger(__name__)

ImageInput = bytes | Image.Image
INDEX_NAME = "index.json"
INDEX_FORMAT = 1
LATENT_DTYPE = np.float32


# -- preprocessing ---------------------------------------------------------------------------------


def decode_image(data: ImageInput) -> Image.Image:
    """Decode encoded bytes (PNG, JPEG, ...) into an RGB image; bad bytes raise InvalidRequest(field="image")."""
    if isinstance(data, Image.Image):
        return data if data.mode == "RGB" else data.convert("RGB")
    if not isinstance(data, bytes | bytearray | memoryview):
        raise InvalidRequest(f"image must be encoded bytes or a PIL image, not {type(data).__name__}", field="image")
    if len(data) == 0:
        raise InvalidRequest("image is empty", field="image")
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            return img.convert("RGB")
    except (UnidentifiedImageError, Image.DecompressionBombError) as exc:
        raise InvalidRequest(f"image could not be decoded: {exc}", field="image") from exc
    except (OSError, ValueError, SyntaxError) as exc:  # truncated or corrupt data inside a known format
        raise InvalidRequest(f"image is corrupt or truncated: {exc}", field="image") from exc


def preprocess_one(image: ImageInput, size: int, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """One image -> (3, size, size) float32; see ``preprocess``."""
    rgb = decode_image(image)
    # stretch to exactly size x size (no crop, aspect ratio not kept), as Resize((s, s), BICUBIC) does on PIL
    resized = rgb.resize((size, size), Image.Resampling.BICUBIC)
    x: np.ndarray = np.asarray(resized, dtype=np.float32) / np.float32(255.0)  # (S, S, 3) in [0, 1]
    x = (x - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))  # (3, S, S)


def preprocess(
    images: Sequence[ImageInput], size: int, mean: Sequence[float], std: Sequence[float]
) -> np.ndarray:
    """UniMP preprocessing: RGB, bicubic stretch-resize to ``size`` x ``size``, /255, CLIP normalisation.

    Returns (N, 3, size, size) float32. Undecodable bytes raise InvalidRequest(field="image").
    """
    out = np.empty((len(images), 3, size, size), dtype=np.float32)  # (N, 3, S, S)
    for i, image in enumerate(images):
        out[i] = preprocess_one(image, size, mean, std)
    return out


# -- encoder ---------------------------------------------------------------------------------------


class VisionEncoder:
    """The vision graph (CLIP patch tokens -> Perceiver resampler): pixels -> media latents.

    Tensor names, sizes and normalisation come from the manifest. Thread-safe (the session is).
    """

    def __init__(self, session: Session, manifest: Manifest, max_batch: int | None = None) -> None:
        names = manifest.names
        if names.pixel_values not in session.input_names:
            raise ManifestError(f"vision graph has no input {names.pixel_values!r} (has {session.input_names})")
        if names.media_latents not in session.output_names:
            raise ManifestError(f"vision graph has no output {names.media_latents!r} (has {session.output_names})")
        self._session = session
        self._input = names.pixel_values
        self._output = names.media_latents
        self.image_size = manifest.vision.image_size
        self.num_latents = manifest.vision.num_latents
        self.width = manifest.vision.width
        self.mean = tuple(manifest.vision.mean)
        self.std = tuple(manifest.vision.std)
        entry = manifest.graphs.get("vision")
        self._input_dtype = np.dtype(entry.input(self._input).dtype) if entry is not None else np.dtype(np.float32)
        if max_batch is None:  # the largest batch the graph was profiled for, if any
            profile = entry.profiles.get(self._input, {}) if entry is not None else {}
            max_batch = int(profile["max"][0]) if "max" in profile else 16
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.max_batch = max_batch
        self._lock = threading.Lock()
        self.calls = 0
        """Session runs so far."""
        self.images_encoded = 0

    @property
    def item_shape(self) -> tuple[int, ...]:
        """Shape of one image's output: (num_latents, width)."""
        return (self.num_latents, self.width)

    dtype = LATENT_DTYPE

    def preprocess_one(self, image: ImageInput) -> np.ndarray:
        """One image -> (3, S, S) float32 with this model's size and normalisation."""
        return preprocess_one(image, self.image_size, self.mean, self.std)

    def preprocess(self, images: Sequence[ImageInput]) -> np.ndarray:
        """(N,) images -> (N, 3, S, S) float32 with this model's size and normalisation."""
        return preprocess(images, self.image_size, self.mean, self.std)

    def encode(self, pixels: np.ndarray) -> np.ndarray:
        """(N, 3, S, S) pixels -> (N, num_latents, width) float32, in chunks of at most ``max_batch`` images."""
        s = self.image_size
        if pixels.ndim != 4 or pixels.shape[1:] != (3, s, s):
            raise ValueError(f"pixels must have shape (N, 3, {s}, {s}), got {pixels.shape}")
        n = pixels.shape[0]
        out = np.empty((n, self.num_latents, self.width), dtype=LATENT_DTYPE)  # (N, n_lat, D)
        for start in range(0, n, self.max_batch):
            chunk = np.ascontiguousarray(pixels[start : start + self.max_batch], dtype=self._input_dtype)
            latents = self._session.run({self._input: chunk}, [self._output])[self._output]
            out[start : start + len(chunk)] = latents
            with self._lock:
                self.calls += 1
                self.images_encoded += len(chunk)
        return out

    def encode_images(self, images: Sequence[ImageInput]) -> np.ndarray:
        """Encoded images -> (N, num_latents, width); bad bytes raise InvalidRequest(field="image")."""
        return self.encode(self.preprocess(images))


# -- persistent latent store -----------------------------------------------------------------------


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
    """What the latent store needs from a catalog (``runtime.catalog.Catalog`` provides it)."""

    def page(self, page_size: int, page_token: str = "") -> CatalogPage: ...

    def image(self, item_id: str) -> bytes: ...

    def image_digest(self, item_id: str) -> str:
        """sha256 of the item's current image bytes; changes whenever the image does."""
        ...

    def on_image_change(self, callback: Callable[[str], None]) -> None: ...


def vision_fingerprint(manifest: Manifest) -> str:
    """Identifies everything that determines an image's latents: the vision graph and its preprocessing."""
    entry = manifest.graphs.get("vision")
    v = manifest.vision
    key = {
        "graph_sha256": entry.sha256 if entry is not None else "",
        "graph_file": entry.file if entry is not None else "",
        "precision": entry.precision if entry is not None else "",
        "image_size": v.image_size,
        "mean": list(v.mean),
        "std": list(v.std),
        "num_latents": v.num_latents,
        "width": v.width,
        "dtype": np.dtype(LATENT_DTYPE).name,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


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


@dataclass
class _Row:
    shard: str
    row: int
    digest: str


@dataclass
class _Pending:
    latents: np.ndarray  # (n_lat, D), owned by the store
    digest: str


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


class LatentStore:
    """Media latents of every catalog item, memory-mapped from ``cache_dir``; thread-safe.

    The encoder decides what is stored per image (its ``item_shape`` and ``dtype``); subclasses change
    the shard file prefix (``runtime.vqgan.CodeStore`` keeps VQGAN codes the same way).

    On-disk layout: ``index.json`` ({fingerprint, shape, shards, items: id -> [shard, row, image digest]})
    and append-only shards ``latents-<uuid>.npy`` of shape (rows, num_latents, width). Shards are written
    to a temporary name and renamed before the index (itself replaced atomically) refers to them, so a
    crash leaves the previous state readable. Latents are looked up in the in-memory overlay (``put`` and
    on-demand encodes, persisted by ``flush``) first, then in the shards.
    """

    SHARD_PREFIX = "latents-"

    def __init__(
        self,
        cache_dir: Path,
        catalog: ImageCatalog,
        encoder: ItemEncoder,
        fingerprint: str,
        shard_items: int,
    ) -> None:
        self.cache_dir = cache_dir
        self._catalog = catalog
        self._encoder = encoder
        self._fingerprint = fingerprint
        self._shape = tuple(encoder.item_shape)
        self._dtype = np.dtype(encoder.dtype)
        self._shard_items = shard_items
        self._lock = threading.RLock()
        self._rows: dict[str, _Row] = {}
        self._shards: dict[str, np.ndarray] = {}  # name -> read-only memmap (rows, n_lat, D)
        self._overlay: dict[str, _Pending] = {}
        self._dead_rows = 0
        self._dirty = False
        self._epoch = 0  # bumped by every invalidate: latents encoded across one are not cached
        self.hits = 0
        self.misses = 0

    # -- opening -----------------------------------------------------------------------------------
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
    ) -> Self:
        """Open (or build) the store for ``catalog``: encode, in batches, every item whose latents are missing
        or stale, persist them, and subscribe to the catalog's image changes.

        An unwritable ``cache_dir`` falls back to a fresh temporary directory (latents are then recomputed on
        every start).
        """
        cache_dir = Path(cache_dir)
        if not _writable_dir(cache_dir):
            fallback = Path(tempfile.mkdtemp(prefix=f"unimp-{cls.SHARD_PREFIX}"))
            log.warning("latent cache %s is not writable; using %s for this process", cache_dir, fallback)
            cache_dir = fallback
        key = fingerprint if fingerprint is not None else vision_fingerprint(manifest)
        store = cls(cache_dir, catalog, encoder, key, max(1, shard_items))
        store._load_index()
        store._fill(progress)
        catalog.on_image_change(store.invalidate)
        return store

    def _load_index(self) -> None:
        path = self.cache_dir / INDEX_NAME
        if not path.is_file():
            return
        try:
            index = json.loads(path.read_text(encoding="utf-8"))
            valid = (
                index.get("format") == INDEX_FORMAT
                and index.get("fingerprint") == self._fingerprint
                and tuple(index.get("shape", ())) == self._shape
            )
        except (OSError, ValueError, AttributeError, TypeError) as exc:
            log.warning("latent cache index %s is unreadable (%s); rebuilding", path, exc)
            valid = False
            index = {}
        if not valid:
            if index:
                log.info("latent cache %s was built for another vision graph; rebuilding", self.cache_dir)
            self._reset()
            return
        for name in index.get("shards", []):
            if not (isinstance(name, str) and name.startswith(self.SHARD_PREFIX) and name.endswith(".npy") and "/" not in name):
                log.warning("latent cache index %s names an unexpected shard %r; ignoring it", path, name)
                continue
            try:
                array = np.load(self.cache_dir / name, mmap_mode="r")
            except (OSError, ValueError) as exc:
                log.warning("latent shard %s is unreadable (%s); its items will be re-encoded", name, exc)
                continue
            if array.ndim != 1 + len(self._shape) or tuple(array.shape[1:]) != self._shape or array.dtype != self._dtype:
                log.warning("latent shard %s has shape %s %s; ignoring it", name, array.shape, array.dtype)
                continue
            self._shards[name] = array
        try:
            for item_id, (shard, row, digest) in index.get("items", {}).items():
                if shard in self._shards and 0 <= int(row) < len(self._shards[shard]):
                    self._rows[str(item_id)] = _Row(shard, int(row), str(digest))
        except (AttributeError, TypeError, ValueError) as exc:
            log.warning("latent cache index %s is malformed (%s); rebuilding", path, exc)
            self._reset()
            return
        live = len(self._rows)
        self._dead_rows = sum(len(a) for a in self._shards.values()) - live

    def _reset(self) -> None:
        """Forget every persisted latent (a different vision graph, or a corrupt index)."""
        for pattern in (f"{self.SHARD_PREFIX}*.npy", "*.tmp.npy", INDEX_NAME):
            for path in self.cache_dir.glob(pattern):
                try:
                    path.unlink()
                except OSError as exc:
                    log.warning("could not remove %s: %s", path, exc)
        self._rows.clear()
        self._shards.clear()
        self._dead_rows = 0

    def _fill(self, progress: bool) -> None:
        """Encode every catalog image that has no current latents, one shard at a time."""
        stale = []
        for item_id in _catalog_images(self._catalog):
            digest = self._catalog.image_digest(item_id)
            row = self._rows.get(item_id)
            if row is None or row.digest != digest:
                stale.append((item_id, digest))
        if not stale:
            log.info("latent cache %s: all %d catalog images cached", self.cache_dir, len(self._rows))
            return
        log.info("encoding %d catalog images into %s", len(stale), self.cache_dir)
        bar = tqdm(total=len(stale), desc="catalog latents", unit="img", disable=not progress)
        try:
            for start in range(0, len(stale), self._shard_items):
                self._write_shard(stale[start : start + self._shard_items], bar)
        finally:
            bar.close()

    def _write_shard(self, items: list[tuple[str, str]], bar: tqdm) -> None:
        name = f"{self.SHARD_PREFIX}{uuid.uuid4().hex}.npy"
        tmp = self.cache_dir / f"{name[:-4]}.tmp.npy"
        # (rows, n_lat, D) written in place so that a large catalog never sits in memory at once
        array = np.lib.format.open_memmap(tmp, mode="w+", dtype=self._dtype, shape=(len(items), *self._shape))
        written: list[int] = []  # rows that hold latents; undecodable images leave a dead row
        for start in range(0, len(items), self._encoder.max_batch):
            chunk = items[start : start + self._encoder.max_batch]
            pixels, ok = self._pixels([item_id for item_id, _ in chunk])
            if ok:
                rows = [start + i for i in ok]
                array[rows] = self._encoder.encode(pixels)  # (b, n_lat, D)
                written += rows
            bar.update(len(chunk))
        array.flush()
        del array
        if not written:
            tmp.unlink()
            return
        os.replace(tmp, self.cache_dir / name)
        with self._lock:
            self._shards[name] = np.load(self.cache_dir / name, mmap_mode="r")
            self._dead_rows += len(items) - len(written)
            for row in written:
                item_id, digest = items[row]
                if item_id in self._rows:
                    self._dead_rows += 1
                self._rows[item_id] = _Row(name, row, digest)
            self._write_index()

    def _pixels(self, item_ids: Sequence[str]) -> tuple[np.ndarray, list[int]]:
        """Preprocess the catalog images of ``item_ids``; undecodable ones are logged and left out."""
        arrays, ok = [], []
        e = self._encoder
        for i, item_id in enumerate(item_ids):
            try:
                arrays.append(e.preprocess_one(self._catalog.image(item_id)))
                ok.append(i)
            except (InvalidRequest, NotFound) as exc:
                log.warning("catalog item %s: no latents (%s)", item_id, exc)
        s = e.image_size
        pixels = np.stack(arrays) if arrays else np.empty((0, 3, s, s), dtype=np.float32)  # (b, 3, S, S)
        return pixels, ok

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

    def __contains__(self, item_id: object) -> bool:
        with self._lock:
            return item_id in self._overlay or item_id in self._rows

    def __len__(self) -> int:
        with self._lock:
            return len(self._rows.keys() | self._overlay.keys())

    def get(self, item_ids: Sequence[str]) -> np.ndarray:
        """(len(item_ids), num_latents, width) float32, a fresh array the caller owns.

        Items without cached latents are encoded from their catalog image (and kept in the overlay);
        an id with neither raises NotFound(field="item_id").
        """
        out = np.empty((len(item_ids), *self._shape), dtype=self._dtype)  # (B, n_lat, D)
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
            try:
                images = [self._catalog.image(item_id) for item_id in ids]
            except NotFound as exc:
                raise NotFound(str(exc), field="item_id") from exc
            latents = self._encoder.encode_images(images)  # (M, n_lat, D)
            for j, item_id in enumerate(ids):
                out[missing[item_id]] = latents[j]
            with self._lock:
                if self._epoch == epoch:  # no image changed meanwhile: the new latents are current
                    for j, item_id in enumerate(ids):
                        self._overlay[item_id] = _Pending(latents[j].copy(), digests[j])
                    self._dirty = True
        return out

    def _digest_or_missing(self, item_id: str) -> str:
        try:
            return self._catalog.image_digest(item_id)
        except NotFound as exc:
            raise NotFound(f"no latents and no catalog image for item {item_id!r}", field="item_id") from exc

    # -- edits -------------------------------------------------------------------------------------
    def put(self, item_id: str, latents: np.ndarray, digest: str | None = None) -> None:
        """Set ``item_id``'s latents ((num_latents, width) or (1, num_latents, width)); persisted by ``flush``.

        ``digest`` is the sha256 of the image they were computed from (default: the catalog's current one,
        or "" for items outside the catalog); a digest that no longer matches the catalog is re-encoded on
        the next open.
        """
        array = np.asarray(latents, dtype=self._dtype)
        if array.ndim == 1 + len(self._shape) and array.shape[0] == 1:
            array = array[0]
        if array.shape != self._shape:
            raise ValueError(f"latents for {item_id!r} must have shape {self._shape}, got {np.shape(latents)}")
        if digest is None:
            try:
                digest = self._catalog.image_digest(item_id)
            except NotFound:
                digest = ""
        with self._lock:
            self._overlay[item_id] = _Pending(array.copy(), digest)
            self._dirty = True

    def invalidate(self, item_id: str) -> None:
        """Forget ``item_id``'s latents (its image changed or it was deleted); the next ``get`` re-encodes."""
        with self._lock:
            self._epoch += 1
            dropped = self._overlay.pop(item_id, None) is not None
            if self._rows.pop(item_id, None) is not None:
                self._dead_rows += 1
                dropped = True
            if dropped:
                self._dirty = True
                log.debug("latents of %s invalidated", item_id)

    def flush(self) -> None:
        """Persist the overlay as a new shard and the index; compacts when most shard rows are dead."""
        with self._lock:
            if not self._dirty:
                return
            pending = dict(self._overlay)
            if pending:
                name = f"{self.SHARD_PREFIX}{uuid.uuid4().hex}.npy"
                tmp = self.cache_dir / f"{name[:-4]}.tmp.npy"
                np.save(tmp, np.stack([p.latents for p in pending.values()]))  # (M, n_lat, D)
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
        log.info("latent cache %s compacted to %d rows", self.cache_dir, len(ids))

    def _drop_unused_shards(self) -> None:
        used = {r.shard for r in self._rows.values()}
        for name in [n for n in self._shards if n not in used]:
            self._dead_rows -= len(self._shards.pop(name))
            try:
                (self.cache_dir / name).unlink()
            except OSError as exc:
                log.warning("could not remove %s: %s", name, exc)
        self._dead_rows = max(0, self._dead_rows)

    def stats(self) -> dict[str, float]:
        """Counters for metrics."""
        with self._lock:
            return {
                "latent_hits": float(self.hits),
                "latent_misses": float(self.misses),
                "latent_items": float(len(self._rows.keys() | self._overlay.keys())),
                "latent_pending": float(len(self._overlay)),
                "latent_shards": float(len(self._shards)),
            }

    def close(self) -> None:
        """Flush the overlay and release the memory maps."""
        self.flush()
        with self._lock:
            self._shards.clear()
            self._rows.clear()
