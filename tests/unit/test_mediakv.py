"""runtime.mediakv: the per-catalog-image cross-attention K/V store and a prompt's memory."""

from __future__ import annotations

import io
import json
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from runtime.api import CatalogItem
from runtime.backends import BackendConfig, open_session
from runtime.catalog import Catalog
from runtime.manifest import Manifest, load_manifest
from runtime.types import ItemMeta, NotFound
from runtime.vision import LatentStore, VisionEncoder
from runtime.vision.catalog_encode import BackgroundEncoder
from runtime.vision.media_kv import (
    MediaKVEncoder,
    MediaKVStore,
    MediaMemory,
    default_kv_dir,
    media_kv_fingerprint,
)

KEEP = 6  # catalog items kept (the rest are deleted to keep encoding fast)


@dataclass(frozen=True)
class _Image:
    item_id: str = ""
    image: bytes | None = None


def _png(seed: int, size: int = 40) -> bytes:
    data = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(data).save(buf, format="PNG")
    return buf.getvalue()


def _ids() -> list[str]:
    return [f"P{k:05d}" for k in range(KEEP)]


@pytest.fixture(scope="module")
def manifest(tiny_artifacts: Path) -> Manifest:
    return load_manifest(tiny_artifacts)


@pytest.fixture(scope="module")
def sessions(tiny_artifacts: Path, manifest: Manifest) -> tuple[Any, Any]:
    cfg = BackendConfig(intra_op_threads=1)
    return (open_session(tiny_artifacts / manifest.graphs["vision"].file, cfg),
            open_session(tiny_artifacts / manifest.graphs["media_kv"].file, cfg))


@pytest.fixture()
def catalog(tiny_artifacts: Path, manifest: Manifest) -> Catalog:
    cat = Catalog(tiny_artifacts, manifest)
    for k in range(KEEP, manifest.tokens.item_count):
        cat.delete(f"P{k:05d}")
    return cat


class _Stores:
    def __init__(self, root: Path, catalog: Catalog, manifest: Manifest, sessions: tuple[Any, Any],
                 fill: bool = True, batch: int = 4) -> None:
        self.vision = VisionEncoder(sessions[0], manifest, max_batch=batch)
        self.kv = MediaKVEncoder(sessions[1], manifest)
        self.latents = LatentStore.open(root / "latents", catalog, self.vision, manifest, progress=False, fill=fill)
        self.store = MediaKVStore.open(default_kv_dir(root / "latents"), self.latents, self.kv, catalog,
                                       progress=False, fill=fill)
        self.memory = MediaMemory(self.vision, self.kv, self.store)

    def close(self) -> None:
        self.latents.close()
        self.store.close()


def _request_time(manifest: Manifest, sessions: tuple[Any, Any], images: list[bytes]) -> list[tuple[Any, Any]]:
    """What the engine computed before the store: fresh latents, then the media_kv graph on all of them."""
    latents = VisionEncoder(sessions[0], manifest).encode_images(images)  # (M, n, Dv)
    names = manifest.names
    out = sessions[1].run({names.media_latents: latents})
    return [(out[names.xattn_key.format(block=j)], out[names.xattn_value.format(block=j)])
            for j in range(len(manifest.decoder.xattn_layers))]


def _close(actual: np.ndarray, expected: np.ndarray) -> None:
    """Equal up to float32 rounding of differently batched kernels, scaled to the values."""
    scale = float(np.abs(expected).max())
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5 * scale)


def test_memory_equals_kv_computed_at_request_time(
    tmp_path: Path, catalog: Catalog, manifest: Manifest, sessions: tuple[Any, Any], tiny_artifacts: Path
) -> None:
    s = _Stores(tmp_path, catalog, manifest, sessions)
    assert s.store.encoded == KEEP and s.store.pending == 0
    inline = _png(1)
    prompt = [_Image("P00001"), _Image(image=inline), _Image("P00004"), _Image("P00001")]
    computed = s.kv.images_encoded
    memory, seconds = s.memory.memory_for(prompt)
    assert s.kv.images_encoded == computed + 1 and seconds >= 0  # only the inline image reached media_kv
    files = [(tiny_artifacts / "catalog" / "images" / f"{i}.png").read_bytes() for i in ("P00001", "P00004")]
    expected = _request_time(manifest, sessions, [files[0], inline, files[1], files[0]])
    d = manifest.decoder
    assert len(memory) == len(d.xattn_layers)
    for (k, v), (ek, ev) in zip(memory, expected):
        assert k.shape == (4, d.xattn_heads, manifest.vision.num_latents, d.xattn_head_dim) and k.dtype == np.float32
        assert k.flags.c_contiguous and v.flags.c_contiguous
        _close(k, ek)
        _close(v, ev)
        np.testing.assert_array_equal(k[0], k[3])  # the same catalog item: the same stored rows
    empty, _ = s.memory.memory_for([])
    assert all(k.shape[0] == 0 and v.shape[0] == 0 for k, v in empty)
    with pytest.raises(NotFound) as info:
        s.memory.memory_for([_Image("no-such-item")])
    assert info.value.field == "item_id"
    s.close()


def test_store_is_memory_mapped_and_sized_per_item(
    tmp_path: Path, catalog: Catalog, manifest: Manifest, sessions: tuple[Any, Any]
) -> None:
    s = _Stores(tmp_path, catalog, manifest, sessions)
    s.close()
    d, n = manifest.decoder, manifest.vision.num_latents
    shape = (len(d.xattn_layers), 2, d.xattn_heads, n, d.xattn_head_dim)
    index = json.loads((default_kv_dir(tmp_path / "latents") / "index.json").read_text())
    assert index["fingerprint"] == media_kv_fingerprint(manifest) and tuple(index["shape"]) == shape
    assert set(index["items"]) == set(_ids())
    again = _Stores(tmp_path, catalog, manifest, sessions, fill=False)
    assert again.store.pending == 0 and again.kv.images_encoded == 0 and again.vision.images_encoded == 0
    assert all(isinstance(a, np.memmap) for a in again.store._shards.values())
    assert again.store.disk_bytes() == KEEP * int(np.prod(shape)) * 4  # float32
    again.close()


def test_catalog_edits_invalidate_the_items_kv(
    tmp_path: Path, catalog: Catalog, manifest: Manifest, sessions: tuple[Any, Any]
) -> None:
    s = _Stores(tmp_path, catalog, manifest, sessions)
    before, _ = s.memory.memory_for([_Image(i) for i in _ids()])
    new_image = _png(7)
    catalog.upsert(CatalogItem("P00002", ItemMeta(title="new look"), token=2), image=new_image)
    catalog.delete("P00003")
    for store in (s.latents, s.store):
        assert "P00002" not in store and "P00003" not in store
        assert store.pending == 1  # P00002 is queued again; the deleted P00003 is not
    kept = ["P00000", "P00001", "P00004", "P00005"]
    after, _ = s.memory.memory_for([_Image(i) for i in [*kept, "P00002"]])
    rows = [_ids().index(i) for i in kept]
    for (k, v), (bk, bv) in zip(after, before):
        np.testing.assert_array_equal(k[:4], bk[rows])  # untouched rows are the stored ones
        np.testing.assert_array_equal(v[:4], bv[rows])
        assert not np.allclose(k[4], bk[2])
    expected = _request_time(manifest, sessions, [new_image])
    for (k, v), (ek, ev) in zip(after, expected):
        _close(k[4:], ek)
        _close(v[4:], ev)
    assert s.store.pending == 0 and s.store.stats()["encoded_on_demand"] == 1
    with pytest.raises(NotFound):
        s.memory.memory_for([_Image("P00003")])
    s.close()
    reopened = _Stores(tmp_path, catalog, manifest, sessions, fill=False)
    assert reopened.store.pending == 0 and "P00002" in reopened.store  # the first-use entry was persisted
    reopened.close()


@pytest.mark.parametrize("graph", ["media_kv", "vision"])
def test_a_changed_graph_invalidates_the_kv_store(
    tmp_path: Path, catalog: Catalog, manifest: Manifest, sessions: tuple[Any, Any], graph: str
) -> None:
    _Stores(tmp_path, catalog, manifest, sessions).close()
    kv_dir = default_kv_dir(tmp_path / "latents")
    old = set(kv_dir.glob("kv-*.npy"))
    changed = replace(manifest, graphs={**manifest.graphs, graph: replace(manifest.graphs[graph], sha256="0" * 64)})
    assert media_kv_fingerprint(changed) != media_kv_fingerprint(manifest)
    s = _Stores(tmp_path, catalog, changed, sessions, fill=False)
    assert s.store.pending == KEEP and s.store.encoded == 0
    assert not old & set(kv_dir.glob("kv-*.npy"))  # the stale shards were removed
    s.store.fill(progress=False)
    assert s.kv.images_encoded == KEEP
    s.close()


class _Interrupt(Exception):
    pass


def test_an_interrupted_fill_resumes_to_the_one_shot_result(
    tmp_path: Path, catalog: Catalog, manifest: Manifest, sessions: tuple[Any, Any]
) -> None:
    one_shot = _Stores(tmp_path / "one", catalog, manifest, sessions, batch=2)
    reference = one_shot.store.get(_ids())
    one_shot.close()

    part = _Stores(tmp_path / "part", catalog, manifest, sessions, fill=False, batch=2)
    real = part.kv.encode
    calls = []

    def failing(latents: np.ndarray) -> np.ndarray:
        calls.append(len(latents))
        if len(calls) == 2:
            raise _Interrupt("stopped")
        return real(latents)

    part.kv.encode = failing  # type: ignore[method-assign]
    part.latents.fill(progress=False)
    with pytest.raises(_Interrupt):
        part.store.fill(progress=False)
    assert part.store.encoded == 2 and part.store.pending == KEEP - 2  # the failed batch is pending again
    part.close()

    resumed = _Stores(tmp_path / "part", catalog, manifest, sessions, fill=False, batch=2)
    assert resumed.store.encoded == 2 and resumed.store.pending == KEEP - 2
    assert resumed.latents.pending == 0
    assert resumed.store.fill(progress=False) == KEEP - 2 and resumed.kv.images_encoded == KEEP - 2
    _close(resumed.store.get(_ids()), reference)
    resumed.close()


def test_background_encoder_fills_while_requests_use_first_use_entries(
    tmp_path: Path, catalog: Catalog, manifest: Manifest, sessions: tuple[Any, Any]
) -> None:
    s = _Stores(tmp_path, catalog, manifest, sessions, fill=False)
    requests = threading.Event()
    encoder = BackgroundEncoder([s.latents, s.store], idle_s=0.05, batch=2, busy=requests.is_set, max_defer_s=60)
    encoder.pause()  # the gate: nothing is encoded in the background until resume()
    encoder.start()
    assert not encoder.wait_idle(0.2) and s.store.pending == KEEP and s.latents.pending == KEEP
    s.memory.memory_for([_Image("P00005")])  # first use
    assert s.store.pending == KEEP - 1 and s.latents.pending == KEEP - 1
    requests.set()  # requests running: the encoder defers its batches
    encoder.resume()
    time.sleep(0.3)
    assert s.latents.pending == KEEP - 1 and encoder.batches == 0
    requests.clear()
    assert encoder.wait_idle(60) and encoder.error is None
    deadline = time.monotonic() + 10  # the last batch is counted just after its rows land
    while encoder.batches < 6 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.1)
    assert encoder.batches == 6  # 5 pending items per store, 2 per background batch
    assert s.latents.encoded == KEEP and s.store.encoded == KEEP
    catalog.upsert(CatalogItem("NEW-1", ItemMeta(title="fresh")), image=_png(3))  # wakes the encoder
    assert encoder.wait_idle(60) and "NEW-1" in s.store
    encoder.close()
    s.close()
    reopened = _Stores(tmp_path, catalog, manifest, sessions, fill=False)
    assert reopened.store.pending == 0 and reopened.latents.pending == 0  # committed on close
    reopened.close()
