"""Cross-attention K/V per catalog image, and the one call that gives a prompt its cross-attention memory.

The decoder's gated cross-attention blocks read each image through per-block keys and values that depend
only on the image's media latents (the ``media_kv`` graph). ``MediaKVStore`` keeps them for every catalog
image beside the latents (memory-mapped ``kv-*.npy`` shards of (rows, blocks, 2, h, n, dh) float32: float32
so that cached and request-time K/V agree to the last bits the graph gives), keyed by item id and image
digest like the latents, and fingerprinted by the ``media_kv`` graph's sha256 together with the latents'
fingerprint: re-exporting either graph invalidates the store, and a catalog edit (new image, delete)
invalidates the item's rows in both stores.

``MediaMemory.memory_for(images)`` is what the engine calls per prompt: catalog images come from the K/V
store, inline images go through vision + media_kv now.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

from runtime.backends.base import Session
from runtime.manifest import Manifest, ManifestError
from runtime.types import InvalidRequest, NotFound
from runtime.vision.encoder import VisionEncoder, vision_fingerprint
from runtime.vision.preprocess import ImageInput
from runtime.vision.store import ImageCatalog, ItemStore, LatentStore, usable_cache_dir

if TYPE_CHECKING:  # typing.Self is Python 3.11+; annotations are strings here (PEP 563)
    from typing import Self

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
