"""The paper's image-generation prompt (VQGAN codes), byte for byte, and how it tokenizes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer

from runtime.manifest import load_manifest
from runtime.prompts import ResolvedItem, encode, image_code_text, image_generation_prompt
from runtime.types import InvalidRequest, ItemMeta

A = ResolvedItem(ItemMeta("Shoes", "59.99", "Kestrel", "Kestrel Bold Red Trail Runner"), "P1", 7)
B = ResolvedItem(ItemMeta("Beauty", "", "Glowen", "Night Cream"), "P2", 12)
C = ResolvedItem(ItemMeta(title="Wool Hat"), "P3", 3)
CODES_A = [5, 1023, 0, 17]
CODES_B = [100, 2, 2, 999]


def test_codes_render_as_img_tokens_with_their_commas() -> None:
    assert image_code_text([5, 1023, 0]) == "img_5,img_1023,img_0,"


def test_two_history_chunks_then_the_query_byte_for_byte() -> None:
    p = image_generation_prompt((A, B), [CODES_A, CODES_B], "red  running <image> shoes")
    assert p.text == (
        "<image> Title Kestrel Bold Red Trail Runner ID img_5,img_1023,img_0,img_17, <|endofchunk|> "
        "<image> Title Night Cream ID img_100,img_2,img_2,img_999, <|endofchunk|> "
        "Query: red running shoes What is the generated Image ID to the query based on the history? <answer>"
    )
    assert p.images == (A, B) and p.prefix_images == 2
    assert p.prefix_text.endswith("<|endofchunk|> ") and p.text.startswith(p.prefix_text)


def test_only_the_newest_two_items_and_untitled_is_unknown() -> None:
    untitled = ResolvedItem(ItemMeta(category="Toys"), "P4", 4)
    p = image_generation_prompt((A, B, untitled), [CODES_A, CODES_B, [9]], "hat")
    assert p.text.startswith("<image> Title Night Cream ID ")
    assert "<image> Title Unknown ID img_9, <|endofchunk|> Query: hat " in p.text
    assert "Kestrel" not in p.text and len(p.images) == 2


def test_no_history_is_the_query_alone_and_empty_query_is_refused() -> None:
    assert image_generation_prompt((), [], "hat").text == (
        "Query: hat What is the generated Image ID to the query based on the history? <answer>")
    with pytest.raises(InvalidRequest) as info:
        image_generation_prompt((A,), [CODES_A], "  <image> ")
    assert info.value.field == "query" and str(info.value).startswith("query: ")


def test_every_code_is_one_image_code_token(tiny_artifacts: Path) -> None:
    manifest = load_manifest(tiny_artifacts, verify=False)
    tok = Tokenizer.from_file(str(tiny_artifacts / manifest.tokenizer))
    t = manifest.tokens
    codes_a = list(np.random.default_rng(0).integers(0, 1024, 256))
    codes_c = [1, 10, 100, 1000, 101, 11] * 42 + [1023, 0, 1, 2]
    prompt = image_generation_prompt((A, C), [codes_a, codes_c], "wool hat")
    ids = encode(prompt, tok, t.endofchunk, t.image).ids
    in_slice = ids[(ids >= t.image_codes_start) & (ids < t.image_codes_start + 1024)]
    np.testing.assert_array_equal(in_slice - t.image_codes_start, np.array(codes_a + codes_c))
    assert int((ids == t.image).sum()) == 2 and int((ids == t.endofchunk).sum()) == 2
