"""Semantic-ID items: the id2semantic table, the vocabulary they need and how prompts spell them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer

from export.catalog import CATEGORIES
from export.semantic_ids import demo_semantic_ids
from export.vocab import add_unimp_tokens, train_demo_tokenizer
from runtime.catalog import SemanticTable
from runtime.manifest import ManifestError
from runtime.prompts import ResolvedItem, recommendation_prompt, search_prompt, semantic_text
from runtime.types import ItemMeta


def _write(tmp_path: Path, data: object) -> Path:
    path = tmp_path / "id2semantic.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def test_table_keeps_file_order_and_reads_the_reference_string_form(tmp_path: Path) -> None:
    table = SemanticTable.load(_write(tmp_path, {"b": [1, 2, 3, 4], "a": "511,0,7,31"}))
    assert table.item_ids == ("b", "a")
    assert table.codes.tolist() == [[1, 2, 3, 4], [511, 0, 7, 31]]
    assert not table.codes.flags.writeable


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"a": [1, 2, 3]}, "expected 4 codes"),
        ({"a": [512, 2, 3, 4]}, "expected 4 codes"),
        ({"a": [1, 2, 3, 32]}, "expected 4 codes"),
        ({"a": [1, 2, 3, -1]}, "expected 4 codes"),
        ({"a": "1,2,x,3"}, "malformed"),
        ({"a": [1, 2, 3, 4], "b": "1,2,3,4"}, "'a' and 'b' have the same semantic id"),
        ({}, "non-empty"),
        ([[1, 2, 3, 4]], "non-empty JSON object"),
    ],
)
def test_table_rejects_invalid_ids(tmp_path: Path, data: object, message: str) -> None:
    with pytest.raises(ManifestError, match=message):
        SemanticTable.load(_write(tmp_path, data))


def test_demo_ids_are_collision_free_in_range_and_share_category_prefixes() -> None:
    cats = list(CATEGORIES)
    ids = [f"P{k:05d}" for k in range(400)]
    categories = [cats[k % len(cats)] for k in range(400)]
    table = demo_semantic_ids(ids, categories, seed=0)
    codes = np.array([table[i] for i in ids])
    assert list(table) == ids
    assert len({tuple(c) for c in codes.tolist()}) == len(ids)
    assert codes[:, :3].min() >= 0 and codes[:, :3].max() < 512
    assert codes[:, 3].min() >= 0 and codes[:, 3].max() < 32
    first = {c: {int(codes[k, 0]) for k in range(400) if categories[k] == c} for c in cats}
    assert all(len(v) == 1 for v in first.values()) and len({next(iter(v)) for v in first.values()}) == len(cats)
    assert demo_semantic_ids(ids, categories, seed=0) == table
    assert demo_semantic_ids(ids, categories, seed=1) != table


def test_semantic_vocabulary_has_512_codes_then_32_last_codes() -> None:
    base = train_demo_tokenizer(["Category Shoes Price 1 item Title"], 300)
    tok = Tokenizer.from_str(base.to_str())
    vocab = add_unimp_tokens(tok, num_items=9999, semantic=True)
    assert vocab.item_count == 512 and vocab.item_last_count == 32
    assert vocab.item_last_start == vocab.item_start + 512
    assert tok.token_to_id("item_511") == vocab.item_start + 511
    assert tok.token_to_id("item_last_31") == vocab.item_last_start + 31
    assert tok.token_to_id("item_512") is None
    assert vocab.image_codes_start == vocab.item_last_start + 32
    atomic = add_unimp_tokens(Tokenizer.from_str(base.to_str()), num_items=7)
    assert atomic.item_count == 7 and atomic.item_last_start == -1 and atomic.item_last_count == 0
    # the prompt's unseparated spelling tokenizes into exactly the 4 code tokens
    ids = tok.encode(" item_1item_11item_111item_last_1", add_special_tokens=False).ids
    assert ids[-4:] == [vocab.item_start + 1, vocab.item_start + 11, vocab.item_start + 111, vocab.item_last_start + 1]


M_A = "Category Shoes Price 59.99 Brand Kestrel Title Kestrel Bold Red Trail Runner"
A = ResolvedItem(ItemMeta("Shoes", "59.99", "Kestrel", "Kestrel Bold Red Trail Runner"), "P1", 7,
                 semantic=(12, 3, 400, 7))
B = ResolvedItem(ItemMeta("Beauty", "", "Glowen", "Night Cream"), "P2", -1, has_image=False)


def test_semantic_history_chunk_byte_for_byte() -> None:
    assert semantic_text((12, 3, 400, 7)) == "item_12item_3item_400item_last_7"
    p = recommendation_prompt((A, B))
    assert p.text == (
        f"<image> {M_A} item_12item_3item_400item_last_7 <|endofchunk|> "
        "Category Beauty Price Unknown Brand Glowen Title Night Cream <|endofchunk|> "
        "What is the next item recommended to the user? <answer>"
    )
    assert p.history_tokens == (7,)  # the table row, for the exclude-history mask
    s = search_prompt((A,), "red shoes")
    assert s.text == (f"<image> {M_A} item_12item_3item_400item_last_7 <|endofchunk|> "
                      "Query: red shoes What is the related item ID to the query based on the history? <answer>")
