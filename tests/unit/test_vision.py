"""runtime.vision: preprocessing, the vision graph against PyTorch, and the persistent latent store."""

from __future__ import annotations

import io
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from runtime.api import CatalogItem
from runtime.backends import BackendConfig, open_session
from runtime.catalog import Catalog
from runtime.manifest import Manifest, load_manifest
from runtime.types import InvalidRequest, ItemMeta, NotFound
from runtime.vision import LatentStore, VisionEncoder, default_cache_dir, preprocess, vision_fingerprint

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
KEEP = 10  # catalog items the latent-store tests keep (the rest are deleted to keep encoding fast)


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _random_image(w: int, h: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    data = rng.integers(0, 256, size=(h, w, channels), dtype=np.uint8)
    return Image.fromarray(data[..., 0] if channels == 1 else data, mode)


def _reference(img: Image.Image, size: int) -> np.ndarray:
    """Written independently of runtime.vision: float64 arithmetic, channel by channel."""
    resized = np.array(img.convert("RGB").resize((size, size), resample=Image.Resampling.BICUBIC), dtype=np.float64)
    out = np.zeros((3, size, size))
    for c in range(3):
        out[c] = (resized[:, :, c] / 255.0 - MEAN[c]) / STD[c]
    return out


# -- preprocessing ---------------------------------------------------------------------------------


def test_preprocess_matches_an_independent_computation() -> None:
    images: list[Any] = [
        _random_image(96, 96, seed=1),
        _random_image(300, 80, seed=2),  # wide: stretched, not cropped
        _random_image(40, 130, "RGBA", seed=3),
        _random_image(64, 48, "L", seed=4),
    ]
    inputs: list[Any] = [_png(images[0]), images[1], _png(images[2]), images[3]]
    out = preprocess(inputs, 224, MEAN, STD)
    assert out.shape == (4, 3, 224, 224) and out.dtype == np.float32
    for i, img in enumerate(images):
        np.testing.assert_allclose(out[i], _reference(img, 224), rtol=1e-6, atol=1e-5)


def test_preprocess_matches_torch_normalisation() -> None:
    torch = pytest.importorskip("torch")
    img = _random_image(123, 77, seed=5)
    resized = img.resize((224, 224), Image.Resampling.BICUBIC)
    # what torchvision's ToTensor + Normalize compute, in torch
    t = torch.from_numpy(np.array(resized)).permute(2, 0, 1).float().div(255)
    t = (t - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]
    out = preprocess([_png(img)], 224, MEAN, STD)[0]
    np.testing.assert_allclose(out, t.numpy(), rtol=1e-6, atol=1e-6)


def test_non_square_images_are_stretched_not_cropped() -> None:
    # 400x100: the left eighth red, the rest blue. A centre crop would see only blue.
    data = np.zeros((100, 400, 3), dtype=np.uint8)
    data[:, :50] = (255, 0, 0)
    data[:, 50:] = (0, 0, 255)
    out = preprocess([Image.fromarray(data)], 64, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))[0]  # (3, 64, 64) in [0, 1]
    # the red band spans 64 / 8 = 8 columns at every row; column 2 is red, column 20 blue
    assert np.all(out[0, :, 2] > 0.99) and np.all(out[2, :, 2] < 0.01)
    assert np.all(out[0, :, 20] < 0.01) and np.all(out[2, :, 20] > 0.99)


@pytest.mark.parametrize("data", [b"", b"definitely not an image", _png(_random_image(16, 16))[:60]])
def test_bad_image_bytes_name_the_image_field(data: bytes) -> None:
    with pytest.raises(InvalidRequest) as info:
        preprocess([_png(_random_image(8, 8)), data], 32, MEAN, STD)
    assert info.value.field == "image"


# -- encoder ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def manifest(tiny_artifacts: Path) -> Manifest:
    return load_manifest(tiny_artifacts)


@pytest.fixture(scope="module")
def session(tiny_artifacts: Path, manifest: Manifest) -> Any:
    return open_session(tiny_artifacts / manifest.graphs["vision"].file, BackendConfig(intra_op_threads=1))


def _catalog_images(artifacts: Path, n: int) -> list[bytes]:
    return [(artifacts / "catalog" / "images" / f"P{k:05d}.png").read_bytes() for k in range(n)]


def test_encoder_matches_pytorch(tiny_artifacts: Path, manifest: Manifest, session: Any, tiny_reference: Any) -> None:
    torch = pytest.importorskip("torch")
    encoder = VisionEncoder(session, manifest, max_batch=2)
    pixels = encoder.preprocess(_catalog_images(tiny_artifacts, 5))  # (5, 3, 224, 224)
    latents = encoder.encode(pixels)
    v = manifest.vision
    assert latents.shape == (5, v.num_latents, v.width) and latents.dtype == np.float32
    assert encoder.calls == 3  # chunks of 2, 2, 1
    with torch.no_grad():
        expected = tiny_reference.model.encode_images(torch.from_numpy(pixels)).numpy()
    np.testing.assert_allclose(latents, expected, rtol=1e-5, atol=1e-4)
    # batched equals unbatched
    single = np.concatenate([encoder.encode(pixels[i : i + 1]) for i in range(5)])
    np.testing.assert_allclose(latents, single, rtol=1e-6, atol=1e-5)


def test_encoder_rejects_wrong_pixel_shapes(manifest: Manifest, session: Any) -> None:
    encoder = VisionEncoder(session, manifest)
    assert encoder.max_batch == manifest.graphs["vision"].profiles["pixel_values"]["max"][0]
    with pytest.raises(ValueError, match="shape"):
        encoder.encode(np.zeros((1, 3, 32, 32), dtype=np.float32))


# -- latent store ----------------------------------------------------------------------------------


@pytest.fixture()
def small_catalog(tiny_artifacts: Path, manifest: Manifest) -> Catalog:
    """The demo catalog cut down to its first KEEP items (in memory)."""
    catalog = Catalog(tiny_artifacts, manifest)
    for k in range(KEEP, manifest.tokens.item_count):
        catalog.delete(f"P{k:05d}")
    return catalog


def _ids() -> list[str]:
    return [f"P{k:05d}" for k in range(KEEP)]


def test_latent_store_is_built_once_and_memory_mapped(
    tmp_path: Path, small_catalog: Catalog, manifest: Manifest, session: Any, tiny_artifacts: Path
) -> None:
    encoder = VisionEncoder(session, manifest, max_batch=4)
    store = LatentStore.open(tmp_path, small_catalog, encoder, manifest, progress=False)
    assert encoder.images_encoded == KEEP and encoder.calls == 3  # batched: 4 + 4 + 2
    assert len(store) == KEEP
    cached = store.get(_ids())  # (KEEP, n, D)
    uncached = VisionEncoder(session, manifest).encode_images(_catalog_images(tiny_artifacts, KEEP))
    np.testing.assert_allclose(cached, uncached, rtol=1e-6, atol=1e-5)
    assert store.hits == KEEP and store.misses == 0

    index = json.loads((tmp_path / "index.json").read_text())
    assert index["fingerprint"] == vision_fingerprint(manifest) and set(index["items"]) == set(_ids())

    store.close()
    again = VisionEncoder(session, manifest)
    reopened = LatentStore.open(tmp_path, small_catalog, again, manifest, progress=False)
    assert again.images_encoded == 0 and again.calls == 0
    assert all(isinstance(a, np.memmap) for a in reopened._shards.values())
    out = reopened.get(list(reversed(_ids())))
    np.testing.assert_array_equal(out, cached[::-1])
    assert not isinstance(out, np.memmap)  # callers get their own array


def test_vision_graph_change_invalidates_the_cache(
    tmp_path: Path, small_catalog: Catalog, manifest: Manifest, session: Any
) -> None:
    LatentStore.open(tmp_path, small_catalog, VisionEncoder(session, manifest), manifest, progress=False).close()
    old_shards = set(tmp_path.glob("latents-*.npy"))
    entry = manifest.graphs["vision"]
    changed = replace(manifest, graphs={**manifest.graphs, "vision": replace(entry, sha256="0" * 64)})
    assert vision_fingerprint(changed) != vision_fingerprint(manifest)
    encoder = VisionEncoder(session, changed)
    LatentStore.open(tmp_path, small_catalog, encoder, changed, progress=False)
    assert encoder.images_encoded == KEEP
    assert not old_shards & set(tmp_path.glob("latents-*.npy"))  # stale shards were removed


def test_put_get_flush_and_image_changes(
    tmp_path: Path, small_catalog: Catalog, manifest: Manifest, session: Any, tiny_artifacts: Path
) -> None:
    encoder = VisionEncoder(session, manifest)
    store = LatentStore.open(tmp_path, small_catalog, encoder, manifest, progress=False)
    n, d = manifest.vision.num_latents, manifest.vision.width
    new = np.random.default_rng(0).standard_normal((n, d)).astype(np.float32)
    store.put("NEW-1", new)
    np.testing.assert_array_equal(store.get(["NEW-1"])[0], new)
    with pytest.raises(ValueError):
        store.put("NEW-2", new[:, :-1])
    with pytest.raises(NotFound) as info:
        store.get(["no-such-item"])
    assert info.value.field == "item_id"

    # replacing a catalog image invalidates its latents (the store subscribed); the next get re-encodes
    image = _png(_random_image(50, 70, seed=9))
    small_catalog.upsert(CatalogItem("P00001", ItemMeta(title="new look"), token=1), image=image)
    before, misses = encoder.images_encoded, store.misses
    got = store.get(["P00001", "P00002"])
    assert encoder.images_encoded == before + 1 and store.misses == misses + 1
    np.testing.assert_allclose(got[0], encoder.encode_images([image])[0], rtol=1e-6, atol=1e-6)
    # an item added to the catalog later is encoded on first use
    small_catalog.upsert(CatalogItem("NEW-3", ItemMeta(title="fresh")), image=_png(_random_image(30, 30, seed=3)))
    assert store.get(["NEW-3"]).shape == (1, n, d)

    store.close()
    counter = VisionEncoder(session, manifest)
    reopened = LatentStore.open(tmp_path, small_catalog, counter, manifest, progress=False)
    assert counter.images_encoded == 0  # the overlay was persisted with the new images' digests
    np.testing.assert_array_equal(reopened.get(["NEW-1"])[0], new)
    np.testing.assert_allclose(reopened.get(["P00001"]), got[:1], rtol=0, atol=0)

    # deleting an item drops its latents
    small_catalog.delete("P00003")
    assert "P00003" not in reopened


def test_stale_latents_are_re_encoded_on_open(
    tmp_path: Path, small_catalog: Catalog, manifest: Manifest, session: Any
) -> None:
    """An image edited while no store was listening (e.g. a crash before flush) is noticed by its digest."""
    LatentStore.open(tmp_path, small_catalog, VisionEncoder(session, manifest), manifest, progress=False).close()
    small_catalog.upsert(small_catalog.get("P00004"), image=_png(_random_image(20, 20, seed=4)))
    encoder = VisionEncoder(session, manifest)
    LatentStore.open(tmp_path, small_catalog, encoder, manifest, progress=False)
    assert encoder.images_encoded == 1


def test_unwritable_cache_dir_falls_back_to_a_temp_dir(
    tmp_path: Path, small_catalog: Catalog, manifest: Manifest, session: Any, tiny_artifacts: Path
) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    store = LatentStore.open(blocker / "latents", small_catalog, VisionEncoder(session, manifest), manifest,
                             progress=False)
    assert store.cache_dir != blocker / "latents" and (store.cache_dir / "index.json").is_file()
    assert default_cache_dir(tiny_artifacts) == tiny_artifacts / ".cache" / "latents"


def test_flush_compacts_dead_rows_and_a_corrupt_index_is_rebuilt(
    tmp_path: Path, small_catalog: Catalog, manifest: Manifest, session: Any
) -> None:
    store = LatentStore.open(tmp_path, small_catalog, VisionEncoder(session, manifest), manifest, progress=False)
    kept = store.get(_ids()[:2])
    for item_id in _ids()[2:]:
        store.invalidate(item_id)
    store.flush()  # 8 dead rows > 2 live ones: rewritten into one 2-row shard
    shards = list(tmp_path.glob("latents-*.npy"))
    assert len(shards) == 1 and np.load(shards[0], mmap_mode="r").shape[0] == 2
    store.close()
    encoder = VisionEncoder(session, manifest)
    reopened = LatentStore.open(tmp_path, small_catalog, encoder, manifest, progress=False)
    assert encoder.images_encoded == KEEP - 2
    np.testing.assert_array_equal(reopened.get(_ids()[:2]), kept)
    reopened.close()

    (tmp_path / "index.json").write_text("{not json")
    encoder = VisionEncoder(session, manifest)
    LatentStore.open(tmp_path, small_catalog, encoder, manifest, progress=False)
    assert encoder.images_encoded == KEEP


def test_a_store_in_use_is_read_without_being_written(
    tmp_path: Path, small_catalog: Catalog, manifest: Manifest, session: Any
) -> None:
    """A second store on a directory another one owns (a second server, a running `unimp catalog encode`)
    reads what was committed and computes the rest in memory; only the owner writes."""
    owner = LatentStore.open(tmp_path, small_catalog, VisionEncoder(session, manifest, max_batch=4), manifest,
                             progress=False, fill=False)
    assert owner.pending == KEEP and owner.encoded == 0
    assert owner.fill_step() == 4 and owner.pending == KEEP - 4  # one batch of the encoder's max_batch
    owner.commit()
    files = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    encoder = VisionEncoder(session, manifest)
    reader = LatentStore.open(tmp_path, small_catalog, encoder, manifest, progress=False)
    assert reader.read_only and not owner.read_only
    assert reader.encoded == 4 and reader.pending == KEEP - 4 and reader.fill_step() == 0
    np.testing.assert_array_equal(reader.get(_ids()[:4]), owner.get(_ids()[:4]))
    assert encoder.images_encoded == 0
    reader.get(_ids())  # the rest is encoded on first use, in memory only
    assert encoder.images_encoded == KEEP - 4 and reader.pending == 0
    reader.close()
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == files
    owner.fill()
    owner.close()
    reopened = LatentStore.open(tmp_path, small_catalog, encoder, manifest, progress=False, fill=False)
    assert not reopened.read_only and reopened.encoded == KEEP and reopened.pending == 0


def test_fill_rolls_over_to_new_shards_sized_for_what_is_left(
    tmp_path: Path, small_catalog: Catalog, manifest: Manifest, session: Any, tiny_artifacts: Path
) -> None:
    store = LatentStore.open(tmp_path, small_catalog, VisionEncoder(session, manifest, max_batch=3), manifest,
                             progress=False, shard_items=4)
    store.close()
    assert sorted(np.load(p, mmap_mode="r").shape[0] for p in tmp_path.glob("latents-*.npy")) == [2, 4, 4]
    encoder = VisionEncoder(session, manifest)
    reopened = LatentStore.open(tmp_path, small_catalog, encoder, manifest, progress=False)
    assert encoder.images_encoded == 0 and reopened.encoded == KEEP
    expected = VisionEncoder(session, manifest).encode_images(_catalog_images(tiny_artifacts, KEEP))
    np.testing.assert_allclose(reopened.get(_ids()), expected, rtol=1e-5, atol=1e-5 * float(np.abs(expected).max()))
    reopened.close()
