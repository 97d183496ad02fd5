"""export.shop: the shoppers' data contract, the split by user and taste-driven structure."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from export.catalog import build_catalog
from export.shop import SPLITS, build_shop, item_attributes, keywords, read_split

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    root = tmp_path_factory.mktemp("shop")
    records = build_catalog(root / "catalog", 200, seed=0, image_size=32)
    build_shop(root / "shop", records, 400, seed=0)
    return root, {r.item_id: r for r in records}


def _check_record(u: dict[str, Any], catalog: dict[str, Any]) -> None:
    assert set(u) == {"user_id", "history", "next_item", "query", "search_item", "rating_item", "rating",
                      "explanation", "candidates", "selected"}
    assert u["user_id"].startswith("U") and len(u["user_id"]) == 6
    assert len(u["history"]) >= 4
    seen = [h["item_id"] for h in u["history"]]
    assert len(set(seen)) == len(seen) and all(i in catalog for i in seen)
    for h in u["history"]:
        assert set(h) == {"item_id", "rating", "explanation"}
        assert isinstance(h["rating"], int) and 1 <= h["rating"] <= 5
        assert h["explanation"].strip() and h["explanation"].endswith(".")
    for key in ("next_item", "search_item", "rating_item"):
        assert u[key] in catalog and u[key] not in seen and catalog[u[key]].available, key
    assert u["query"] == keywords(item_attributes(catalog[u["search_item"]]))
    assert isinstance(u["rating"], int) and 1 <= u["rating"] <= 5
    assert u["explanation"].strip() and u["explanation"].endswith(".")
    cands = u["candidates"]
    assert 3 <= len(cands) <= 5 and len(set(cands)) == len(cands)
    assert all(c in catalog and c not in seen for c in cands)
    assert 1 <= len(u["selected"]) <= 2
    assert u["selected"] == sorted(u["selected"]) and all(0 <= i < len(cands) for i in u["selected"])


def test_every_split_follows_the_contract(shop: tuple[Path, dict[str, Any]]) -> None:
    root, catalog = shop
    users: dict[str, list[str]] = {}
    for split in SPLITS:
        lines = (root / "shop" / f"{split}.jsonl").read_text().splitlines()
        records = [json.loads(line) for line in lines]
        assert records == read_split(root / "shop", split)
        for u in records:
            _check_record(u, catalog)
        users[split] = [u["user_id"] for u in records]
    assert [len(users[s]) for s in SPLITS] == [320, 40, 40]
    everyone = users["train"] + users["validation"] + users["test"]
    assert len(set(everyone)) == len(everyone) == 400  # split by user: nobody is in two splits


def test_same_seed_same_files(shop: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    root, catalog = shop
    build_shop(tmp_path, list(catalog.values()), 400, seed=0)
    for split in SPLITS:
        assert (tmp_path / f"{split}.jsonl").read_bytes() == (root / "shop" / f"{split}.jsonl").read_bytes()
    build_shop(tmp_path, list(catalog.values()), 400, seed=1)
    assert (tmp_path / "test.jsonl").read_bytes() != (root / "shop" / "test.jsonl").read_bytes()


def test_targets_follow_the_history_tastes(shop: tuple[Path, dict[str, Any]]) -> None:
    """Next items share a category with the history far more often than 8 equally likely categories allow,
    ratings are higher for items in the history's categories, and suitable candidates share them too."""
    root, catalog = shop
    users = read_split(root / "shop", "train")
    same = sum(catalog[u["next_item"]].category in {catalog[h["item_id"]].category for h in u["history"]}
               for u in users)
    cats = [len({catalog[h["item_id"]].category for h in u["history"]}) for u in users]
    chance = sum(c / 8 for c in cats)
    assert same > 1.4 * chance and same / len(users) > 0.8
    inside, outside = [], []
    for u in users:
        hist = {catalog[h["item_id"]].category for h in u["history"]}
        (inside if catalog[u["rating_item"]].category in hist else outside).append(u["rating"])
    assert sum(inside) / len(inside) > sum(outside) / len(outside) + 1.0
    picked, others = [], []
    for u in users:
        hist = {catalog[h["item_id"]].category for h in u["history"]}
        for i, c in enumerate(u["candidates"]):
            (picked if i in u["selected"] else others).append(catalog[c].category in hist)
    assert sum(picked) / len(picked) > 0.8 > 0.5 > sum(others) / len(others)


def test_export_copies_the_shop_into_the_artifacts(tiny_artifacts: Path) -> None:
    from runtime.manifest import load_manifest, sha256_file

    manifest = load_manifest(tiny_artifacts)
    for split in SPLITS:
        rel = f"shop/{split}.jsonl"
        assert (tiny_artifacts / rel).read_bytes() == (tiny_artifacts / "checkpoint" / rel).read_bytes()
        assert manifest.files[rel] == sha256_file(tiny_artifacts / rel)
    catalog = {json.loads(line)["item_id"]: line for line in (tiny_artifacts / "catalog" / "items.jsonl").open()}
    for u in read_split(tiny_artifacts / "shop", "test"):
        assert all(h["item_id"] in catalog for h in u["history"]) and u["next_item"] in catalog
