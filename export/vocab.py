"""UniMP's vocabulary additions and a locally trained demo tokenizer (``tokenizers`` library only)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

from runtime.manifest import TokenIds

EOS = "<|endoftext|>"
ENDOFCHUNK = "<|endofchunk|>"
IMAGE = "<image>"
ANSWER = "<answer>"
PAD = "<PAD>"
RATES = [f"rate_{i}" for i in range(1, 6)]
SELECTIONS = [f"s_{i}" for i in range(5)]
NUM_IMAGE_CODES = 1024
SEMANTIC_CODES = 512
"""Semantic-ID items: the first three tokens of an id come from ``item_0..item_511``..."""
SEMANTIC_LAST_CODES = 32
"""... and the fourth from ``item_last_0..item_last_31`` (UniMP's ``--use_semantic`` vocabulary)."""


def item_token(k: int) -> str:
    return f"item_{k}"


def item_last_token(k: int) -> str:
    return f"item_last_{k}"


def image_code_token(k: int) -> str:
    return f"img_{k},"


@dataclass(frozen=True)
class AddedVocab(TokenIds):
    """The manifest's token ids after UniMP's additions, plus the resulting vocabulary size."""

    size: int = 0


def add_unimp_tokens(tok: Tokenizer, num_items: int, eos: str = EOS, semantic: bool = False) -> AddedVocab:
    """Add UniMP's tokens in OpenFlamingo's then UniMP's order and return their ids.

    Order: ``<|endofchunk|>``, ``<image>`` (OpenFlamingo), ``<PAD>`` if missing, ``<answer>`` (special);
    then ``rate_1..5``, ``s_0..4``, ``item_0..item_{N-1}``, ``img_0,..img_1023,`` as plain added tokens.
    Items must get contiguous ids: the item-slice fast path relies on it. With ``semantic`` (semantic-ID
    items, ``num_items`` is ignored) the item tokens are ``item_0..item_511`` then ``item_last_0..31``,
    as the reference adds them with ``--use_semantic``; ``item_start``/``item_count`` then describe the
    ``item_k`` codes and ``item_last_start``/``item_last_count`` the ``item_last_k`` codes.
    """
    specials = [ENDOFCHUNK, IMAGE]
    if tok.token_to_id(PAD) is None:
        specials.append(PAD)
    specials.append(ANSWER)
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    tok.add_tokens([AddedToken(t, normalized=True) for t in RATES + SELECTIONS])
    items = [item_token(k) for k in range(SEMANTIC_CODES if semantic else num_items)]
    tok.add_tokens([AddedToken(t, normalized=True) for t in items])
    lasts = [item_last_token(k) for k in range(SEMANTIC_LAST_CODES)] if semantic else []
    tok.add_tokens([AddedToken(t, normalized=True) for t in lasts])
    tok.add_tokens([AddedToken(image_code_token(k), normalized=True) for k in range(NUM_IMAGE_CODES)])

    def need(token: str) -> int:
        idx = tok.token_to_id(token)
        if idx is None:
            raise ValueError(f"token {token!r} is missing from the tokenizer")
        return idx

    item_ids = [need(t) for t in items]
    last_ids = [need(t) for t in lasts]
    for ids in (item_ids, last_ids):
        if ids and ids != list(range(ids[0], ids[0] + len(ids))):
            raise ValueError("item tokens did not receive contiguous ids (some already exist in the base vocabulary)")
    eos_id = need(eos)
    return AddedVocab(
        bos=eos_id,
        eos=eos_id,
        pad=need(PAD),
        image=need(IMAGE),
        endofchunk=need(ENDOFCHUNK),
        answer=need(ANSWER),
        rates=[need(t) for t in RATES],
        selections=[need(t) for t in SELECTIONS],
        item_start=item_ids[0] if item_ids else -1,
        item_count=len(items),
        item_last_start=last_ids[0] if last_ids else -1,
        item_last_count=len(last_ids),
        image_codes_start=need(image_code_token(0)),
        size=tok.get_vocab_size(with_added_tokens=True),
    )


def train_demo_tokenizer(corpus: Iterable[str], vocab_size: int) -> Tokenizer:
    """A GPT-NeoX-style byte-level BPE (``<|endoftext|>`` = id 0), trained on the given text."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    return tok
