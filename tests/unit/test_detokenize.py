"""Incremental detokenization with a locally trained byte-level BPE tokenizer."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from runtime.decoding.detokenize import IncrementalDetokenizer, StrippedPieces

SPECIALS = ["<|endoftext|>", "<|endofchunk|>", "<answer>", "<PAD>"]
CORPUS = [
    "The user liked the café near the station and rated it rate_5.",
    "日本の抹茶 is great with a croissant; très bon, naïve résumé.",
    "Great gift 🎁 for coffee lovers ☕ and fans of 日本 design 🇯🇵.",
    "Category Beauty Price 12.99 Brand Unknown Title Crème brûlée lip balm",
    "Selection s_0 s_1 item_17 item_4 What is the next item recommended to the user?",
] * 20


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=330,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    tok.add_tokens(["item_17", "rate_5"])
    return tok


def stream(tok: Tokenizer, ids: list[int]) -> tuple[list[str], str]:
    detok = IncrementalDetokenizer(tok)
    pieces = []
    for i in ids:
        pieces.append(detok.push(i))
        # at every step the streamed text is a prefix of the final text
        assert tok.decode(ids, skip_special_tokens=True).startswith(detok.text)
    tail = detok.flush()
    return pieces, tail


TEXTS = [
    "café 日本 🎁",
    "日本の抹茶 ☕ très bon 🇯🇵!",
    " rate_5 Crème brûlée, naïve résumé 🎁🎁",
    "item_17 日本",
]


@pytest.mark.parametrize("text", TEXTS)
def test_stream_equals_full_decode_without_replacement_chars(tokenizer: Tokenizer, text: str) -> None:
    ids = tokenizer.encode(text).ids
    pieces, tail = stream(tokenizer, ids)
    assert "".join(pieces) + tail == tokenizer.decode(ids, skip_special_tokens=True) == text
    assert tail == ""
    assert all("\ufffd" not in p for p in pieces)


def test_tokenizer_really_splits_characters(tokenizer: Tokenizer) -> None:
    """The cases above are meaningful: some tokens decode to half a character on their own."""
    ids = [i for t in TEXTS for i in tokenizer.encode(t).ids]
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)


def test_special_tokens_are_skipped(tokenizer: Tokenizer) -> None:
    special = [tokenizer.get_vocab()[s] for s in SPECIALS]
    body = tokenizer.encode("日本 🎁 café").ids
    ids = [special[2], *body[:3], special[1], *body[3:], special[0]]
    pieces, tail = stream(tokenizer, ids)
    assert "".join(pieces) + tail == tokenizer.decode(ids, skip_special_tokens=True) == "日本 🎁 café"


def test_trailing_incomplete_character_is_flushed_like_the_full_decode(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("ok 🎁").ids
    for cut in range(1, len(ids)):
        head = ids[:cut]
        pieces, tail = stream(tokenizer, head)
        assert all("\ufffd" not in p for p in pieces)
        assert "".join(pieces) + tail == tokenizer.decode(head, skip_special_tokens=True)


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_random_ids_concatenate_to_full_decode(tokenizer: Tokenizer, data: st.DataObject) -> None:
    ids = data.draw(st.lists(st.integers(0, tokenizer.get_vocab_size() - 1), max_size=24))
    pieces, tail = stream(tokenizer, ids)
    full = tokenizer.decode(ids, skip_special_tokens=True)
    assert "".join(pieces) + tail == full
    if "\ufffd" not in full:
        assert all("\ufffd" not in p for p in [*pieces, tail])


@settings(max_examples=60, deadline=None)
@given(text=st.text(alphabet=st.sampled_from(list("ab é日本の🎁☕🇯🇵ñ€x")), max_size=20))
def test_random_text_round_trips(tokenizer: Tokenizer, text: str) -> None:
    ids = tokenizer.encode(text).ids
    pieces, tail = stream(tokenizer, ids)
    assert "".join(pieces) + tail == text
    assert all("\ufffd" not in p for p in pieces)


def test_extend_matches_push(tokenizer: Tokenizer) -> None:
    ids = np.array(tokenizer.encode("日本 café 🎁").ids)
    detok = IncrementalDetokenizer(tokenizer)
    assert detok.extend(ids.tolist()) + detok.flush() == "日本 café 🎁"
    assert detok.ids == tuple(ids.tolist())


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(alphabet=" \t\nab\u00a0\u3000", max_size=4), max_size=8))
def test_stripped_pieces_concatenate_to_the_stripped_text(pieces: list[str]) -> None:
    out = StrippedPieces()
    emitted = [out.push(p) for p in pieces]
    assert "".join(emitted) == "".join(pieces).strip() == out.text
    assert all(e == "" or (e.strip() and not e[-1].isspace()) for e in emitted)  # whitespace is held back


def test_stripped_pieces_hold_inner_whitespace_until_text_follows() -> None:
    out = StrippedPieces()
    assert [out.push(p) for p in (" ", " Great", " ", "fit. ", " ")] == ["", "Great", "", " fit.", ""]
    assert out.text == "Great fit."
