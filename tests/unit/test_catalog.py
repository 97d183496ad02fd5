"""runtime.catalog: the demo catalog, edits, pages, token masks and persistence in a state dir."""

from __future__ import annotations

import io
import json
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from runtime.api import CatalogItem
from runtime.catalog import Catalog
from runtime.manifest import Manifest, load_manifest
from runtime.types import InvalidRequest, ItemMeta, NotFound


@pytest.fixture(scope="module")
def manifest(tiny_artifacts: Path) -> Manifest:
    return load_manifest(tiny_artifacts)


@pytest.fixture(scope="module")
def records(tiny_artifacts: Path) -> list[dict[str, Any]]:
    lines = (tiny_artifacts / "catalog" / "items.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


@pytest.fixture()
def catalog(tiny_artifacts: Path, manifest: Manifest) -> Catalog:
    return Catalog(tiny_artifacts, manifest)


def _png(color: tuple[int, int, int], size: tuple[int, int] = (12, 8)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def test_loads_the_demo_catalog(catalog: Catalog, records: list[dict[str, Any]], tiny_artifacts: Path) -> None:
    assert len(catalog) == len(records) == catalog.item_count == 200
    rec = records[3]
    item = catalog.get(rec["item_id"])
    assert item == CatalogItem(
        item_id=rec["item_id"],
        meta=ItemMeta(category=rec["category"], price=rec["price"], brand=rec["brand"], title=rec["title"]),
        available=rec["available"],
        token=rec["token"],
        has_image=True,
    )
    assert catalog.image(rec["item_id"]) == (tiny_artifacts / "catalog" / rec["image"]).read_bytes()
    assert catalog.token_of(rec["item_id"]) == rec["token"]
    assert catalog.by_token(rec["token"]) == item
    assert catalog.by_token(-1) is None and catalog.by_token(200) is None
    ids = [r["item_id"] for r in records[5:9]]
    np.testing.assert_array_equal(catalog.tokens_of(ids), [r["token"] for r in records[5:9]])
    assert catalog.tokens_of(ids).dtype == np.int64
    assert catalog.version == 0


def test_unknown_items_are_not_found(catalog: Catalog) -> None:
    for call in (catalog.get, catalog.image, catalog.delete, catalog.token_of, lambda i: catalog.tokens_of(["P00000", i])):
        with pytest.raises(NotFound) as info:
            call("nope")
        assert info.value.field == "item_id"


def test_masks(catalog: Catalog, records: list[dict[str, Any]]) -> None:
    expected = np.zeros(200, dtype=bool)
    for r in records:
        expected[r["token"]] = r["available"]
    assert 0 < (~expected).sum() < 200  # the demo has some unavailable items
    np.testing.assert_array_equal(catalog.available_mask(), expected)

    shoes = np.zeros(200, dtype=bool)
    for r in records:
        shoes[r["token"]] |= r["category"] in ("Shoes", "Books")
    np.testing.assert_array_equal(catalog.category_mask(["Shoes", "Books"]), shoes)
    np.testing.assert_array_equal(catalog.category_mask([" shoes", "BOOKS "]), shoes)
    assert not catalog.category_mask(["No Such Category"]).any()
    assert catalog.category_mask([]).all()

    # masks follow edits, and the returned arrays are copies
    mask = catalog.available_mask()
    first = next(r for r in records if r["available"])
    catalog.upsert(CatalogItem(first["item_id"], ItemMeta(category="Shoes"), available=False, token=first["token"]))
    assert mask[first["token"]] and not catalog.available_mask()[first["token"]]
    assert catalog.category_mask(["shoes"])[first["token"]]
    other = next(r for r in records if r["item_id"] != first["item_id"])
    catalog.delete(other["item_id"])
    assert not catalog.available_mask()[other["token"]]
    assert not catalog.category_mask([]).all() and catalog.by_token(other["token"]) is None


def test_upsert_delete_and_image_changes(catalog: Catalog) -> None:
    changed: list[str] = []
    catalog.on_image_change(changed.append)
    original = catalog.get("P00010")
    # metadata-only update keeps the image
    updated = catalog.upsert(CatalogItem("P00010", ItemMeta(title="Renamed"), available=False, token=10))
    assert updated.has_image and updated.meta.title == "Renamed" and not updated.available
    assert catalog.get("P00010") == updated and catalog.version == 1 and changed == []
    base_png = catalog.image("P00010")
    assert base_png.startswith(b"\x89PNG")
    digest = catalog.image_digest("P00010")

    png = _png((10, 200, 30))
    catalog.upsert(original, image=png)
    assert catalog.image("P00010") == png and catalog.image_digest("P00010") != digest != ""
    assert changed == ["P00010"] and catalog.version == 2

    # a new item without a token or image, then a token freed by a delete
    new = catalog.upsert(CatalogItem("NEW-1", ItemMeta(category="Toys"), has_image=True))
    assert new.token == -1 and not new.has_image
    with pytest.raises(NotFound) as info:
        catalog.image("NEW-1")
    assert info.value.field == "image"
    catalog.delete("P00020")
    assert changed == ["P00010", "P00020"]
    with pytest.raises(NotFound):
        catalog.get("P00020")
    catalog.upsert(CatalogItem("NEW-1", ItemMeta(category="Toys"), token=20))
    assert catalog.by_token(20) == catalog.get("NEW-1") and catalog.token_of("NEW-1") == 20
    assert len(catalog) == 200 and catalog.version == 5


def test_validation_errors_name_the_field(catalog: Catalog) -> None:
    cases: list[tuple[Any, str]] = [
        (lambda: catalog.upsert(CatalogItem("", ItemMeta())), "item_id"),
        (lambda: catalog.upsert(CatalogItem("   ", ItemMeta())), "item_id"),
        (lambda: catalog.upsert(CatalogItem("X", ItemMeta(), token=200)), "token"),
        (lambda: catalog.upsert(CatalogItem("X", ItemMeta(), token=-2)), "token"),
        (lambda: catalog.upsert(CatalogItem("X", ItemMeta(), token=5)), "token"),  # P00005's token
        (lambda: catalog.upsert(CatalogItem("X", ItemMeta()), image=b"not an image"), "image"),
        (lambda: catalog.upsert(CatalogItem("X", ItemMeta(title=3))), "meta.title"),  # type: ignore[arg-type]
        (lambda: catalog.page(0), "page_size"),
        (lambda: catalog.page(1001), "page_size"),
        (lambda: catalog.page(10, "garbage!"), "page_token"),
    ]
    for call, field in cases:
        with pytest.raises(InvalidRequest) as info:
            call()
        assert info.value.field == field, field
    assert "X" not in catalog and catalog.version == 0


def test_pages_are_stable_and_complete(catalog: Catalog) -> None:
    seen: list[str] = []
    token = ""
    while True:
        page = catalog.page(7, token)
        assert 1 <= len(page.items) <= 7
        seen += [item.item_id for item in page.items]
        if not page.next_page_token:
            break
        token = page.next_page_token
    assert seen == sorted(seen) and len(set(seen)) == 200

    # deleting and adding items between pages neither repeats nor skips the remaining ones
    first = catalog.page(50)
    catalog.delete(first.items[10].item_id)
    catalog.delete("P00060")
    catalog.upsert(CatalogItem("P00050a", ItemMeta()))
    second = catalog.page(50, first.next_page_token)
    ids = [item.item_id for item in second.items]
    assert ids[0] == "P00050" and ids[1] == "P00050a" and "P00060" not in ids
    assert catalog.page(1000).next_page_token == "" and len(catalog.page(1000).items) == 200 - 2 + 1


def test_edits_persist_across_reopen(tmp_path: Path, tiny_artifacts: Path, manifest: Manifest) -> None:
    png = _png((250, 10, 10), (30, 20))
    catalog = Catalog(tiny_artifacts, manifest, state_dir=tmp_path)
    catalog.upsert(CatalogItem("P00001", ItemMeta(title="Edited", brand="B"), available=False, token=1))
    catalog.upsert(CatalogItem("P00002", ItemMeta(title="New picture"), token=2), image=png)
    catalog.delete("P00003")
    catalog.upsert(CatalogItem("NEW-1", ItemMeta(category="Toys"), token=3), image=_png((1, 2, 3)))
    catalog.upsert(CatalogItem("NEW-2", ItemMeta(category="Toys")))
    catalog.delete("NEW-2")
    state = {item.item_id: item for item in catalog.page(1000).items}
    mask, version = catalog.available_mask(), catalog.version
    catalog.close()
    assert (tmp_path / "catalog.sqlite").is_file()

    reopened = Catalog(tiny_artifacts, manifest, state_dir=tmp_path)
    assert {item.item_id: item for item in reopened.page(1000).items} == state
    assert reopened.version == version == 6
    np.testing.assert_array_equal(reopened.available_mask(), mask)
    assert reopened.get("P00001").meta.title == "Edited" and reopened.get("P00001").has_image
    assert reopened.image("P00002") == png and reopened.image_digest("P00002") == catalog.image_digest("P00002")
    assert reopened.by_token(3) == reopened.get("NEW-1") and "P00003" not in reopened and "NEW-2" not in reopened
    # a metadata-only edit after reopening keeps the edited image
    reopened.upsert(CatalogItem("P00002", ItemMeta(title="Again"), token=2))
    reopened.close()
    assert Catalog(tiny_artifacts, manifest, state_dir=tmp_path).image("P00002") == png

    # without a state dir the base catalog is untouched
    fresh = Catalog(tiny_artifacts, manifest)
    assert fresh.get("P00001").meta.title != "Edited" and "P00003" in fresh and fresh.version == 0


def test_concurrent_edits(catalog: Catalog) -> None:
    def work(t: int) -> None:
        for i in range(25):
            catalog.upsert(CatalogItem(f"T{t}-{i}", ItemMeta(title=str(i))))

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert catalog.version == 100 and len(catalog) == 300


def test_a_recreated_item_keeps_its_model_token(tmp_path: Path, tiny_artifacts: Path, manifest: Manifest) -> None:
    catalog = Catalog(tiny_artifacts, manifest, state_dir=tmp_path)
    token = catalog.token_of("P00030")
    assert token >= 0
    catalog.delete("P00030")
    again = catalog.upsert(CatalogItem("P00030", ItemMeta(title="Back")))
    assert again.token == token and catalog.by_token(token) == again
    token31 = catalog.token_of("P00031")
    catalog.delete("P00031")
    catalog.close()
    # the tombstone remembers the token across a reopen
    reopened = Catalog(tiny_artifacts, manifest, state_dir=tmp_path)
    assert reopened.token_of("P00030") == token
    back = reopened.upsert(CatalogItem("P00031", ItemMeta(title="Back too")))
    assert back.token == token31 and reopened.by_token(token31) == back
    reopened.close()
    # a token explicitly handed to another item is not taken from it
    other = Catalog(tiny_artifacts, manifest)
    other.delete("P00040")
    other.upsert(CatalogItem("NEW-40", ItemMeta(), token=40))
    assert other.upsert(CatalogItem("P00040", ItemMeta())).token == -1 and other.token_of("NEW-40") == 40


def test_state_files_are_private(tmp_path: Path, tiny_artifacts: Path, manifest: Manifest) -> None:
    import os
    import stat

    state = tmp_path / "new" / "state"
    catalog = Catalog(tiny_artifacts, manifest, state_dir=state)
    catalog.upsert(CatalogItem("NEW-1", ItemMeta(title="x")))
    assert stat.S_IMODE(os.stat(state).st_mode) == 0o700
    files = [state / "catalog.sqlite", state / "catalog.sqlite-wal", state / "catalog.sqlite-shm"]
    for path in files:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600, path
    catalog.close()
    # files an older version left world-readable are narrowed on open
    os.chmod(files[0], 0o644)
    Catalog(tiny_artifacts, manifest, state_dir=state).close()
    assert stat.S_IMODE(os.stat(files[0]).st_mode) == 0o600
