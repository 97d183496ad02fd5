"""UniMP's evaluation prompts, byte for byte, and their tokenization.

Every chunk of history starts with ``<image>``; images are listed in prompt order so that the i-th
``<image>`` token (1-based) attends to the i-th image's latents. Eval prompts carry no BOS.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from tokenizers import Tokenizer

from runtime.types import HistoryItem, InvalidRequest, ItemMeta

MAX_FIELD_WORDS = 20
DEFAULT_MAX_HISTORY = 4

RECOMMEND_QUESTION = "What is the next item recommended to the user? <answer>"
SEARCH_QUESTION = "Query: {query} What is the related item ID to the query based on the history? <answer>"
PREFERENCE_QUESTION = "<image> {meta} What is the rating and explanation for the item? <answer>"
SELECT_INTRO = "User history: "
SELECT_FROM = "Select from: "
SELECT_QUESTION = "Can you select the suitable item from above for the user? <answer> "


_SPECIALS = ("<image>", "<|endofchunk|>", "<answer>", "<|endoftext|>", "<PAD>")


def sanitize(text: str) -> str:
    """User text must not smuggle special tokens into the prompt."""
    for special in _SPECIALS:
        text = text.replace(special, " ")
    return " ".join(text.split())


def _field(value: str) -> str:
    words = sanitize(value).split()
    return " ".join(words[:MAX_FIELD_WORDS]) if words else "Unknown"


def render_meta(meta: ItemMeta) -> str:
    """``Category {cat} Price {price} Brand {brand} Title {title}``; each field cut to 20 words."""
    return (
        f"Category {_field(meta.category)} Price {_field(meta.price)} "
        f"Brand {_field(meta.brand)} Title {_field(meta.title)}"
    )


@dataclass(frozen=True)
class ResolvedItem:
    """A history item with its metadata and image source resolved against the catalog."""

    meta: ItemMeta
    item_id: str = ""
    """Catalog id ("" for inline items)."""
    token: int = -1
    """item_k index, or -1 if the model has no token for it."""
    image: bytes = b""
    """Inline image bytes (encoded at request time); empty for catalog images (cached latents)."""
    rating: int = 0
    explanation: str = ""

    @property
    def image_key(self) -> str:
        """Identity of the image for caching: the catalog id, or a digest of the inline bytes."""
        if self.image:
            import hashlib

            return "sha256:" + hashlib.sha256(self.image).hexdigest()
        return "item:" + self.item_id


@dataclass(frozen=True)
class Prompt:
    text: str
    images: tuple[ResolvedItem, ...]
    """One entry per ``<image>`` in the text, in order."""
    prefix_text: str
    """The user-history part (ends with the last history ``<|endofchunk|>``): shared across tasks."""
    history_tokens: tuple[int, ...] = ()
    """item_k indices of the history (excluded from recommendations by default)."""
    prefix_images: int = 0
    """How many of ``images`` lie inside the prefix."""


@dataclass(frozen=True)
class EncodedPrompt:
    prompt: Prompt
    ids: np.ndarray
    """(T,) int64 token ids of the whole prompt."""
    prefix_len: int
    """Tokens [0, prefix_len) form the cacheable history prefix (0 if there is none)."""
    extra: dict[str, int] = field(default_factory=dict)


def _recommend_chunk(item: ResolvedItem) -> str:
    token = f"item_{item.token} " if item.token >= 0 else ""
    return f"<image> {render_meta(item.meta)} {token}<|endofchunk|> "


def _history(items: tuple[ResolvedItem, ...], max_history: int) -> tuple[ResolvedItem, ...]:
    if not items:
        raise InvalidRequest("history must contain at least one item", field="history")
    return items[-max_history:] if max_history > 0 else items


def recommendation_prompt(history: tuple[ResolvedItem, ...], max_history: int = DEFAULT_MAX_HISTORY) -> Prompt:
    items = _history(history, max_history)
    prefix = "".join(_recommend_chunk(i) for i in items)
    return Prompt(prefix + RECOMMEND_QUESTION, items, prefix, tuple(i.token for i in items if i.token >= 0), len(items))


def search_prompt(history: tuple[ResolvedItem, ...], query: str, max_history: int = DEFAULT_MAX_HISTORY) -> Prompt:
    if not sanitize(query):
        raise InvalidRequest("query must not be empty", field="query")
    items = _history(history, max_history)
    prefix = "".join(_recommend_chunk(i) for i in items)
    text = prefix + SEARCH_QUESTION.format(query=sanitize(query))
    return Prompt(text, items, prefix, tuple(i.token for i in items if i.token >= 0), len(items))


def preference_prompt(
    history: tuple[ResolvedItem, ...], target: ResolvedItem, max_history: int = DEFAULT_MAX_HISTORY
) -> Prompt:
    items = _history(history, max_history)
    chunks = []
    for k, i in enumerate(items, start=len(history) - len(items)):
        if not 1 <= i.rating <= 5:
            raise InvalidRequest(f"history[{k}].rating: preference history items need a rating 1..5, got {i.rating}",
                                 field=f"history[{k}].rating")
        explanation = f" {sanitize(i.explanation)}" if sanitize(i.explanation) else ""
        chunks.append(f"<image> {render_meta(i.meta)} <answer> rate_{i.rating}{explanation} <|endofchunk|> ")
    prefix = "".join(chunks)
    text = prefix + PREFERENCE_QUESTION.format(meta=render_meta(target.meta))
    return Prompt(text, (*items, target), prefix, tuple(i.token for i in items if i.token >= 0), len(items))


def selection_prompt(
    history: tuple[ResolvedItem, ...], candidates: tuple[ResolvedItem, ...], max_history: int = DEFAULT_MAX_HISTORY
) -> Prompt:
    items = _history(history, max_history)
    if not 1 <= len(candidates) <= 5:
        raise InvalidRequest("item selection takes 1 to 5 candidates", field="candidates")
    prefix = SELECT_INTRO + "".join(f"<image> {render_meta(i.meta)} <|endofchunk|> " for i in items)
    options = "".join(
        f"<image> Selection s_{k} {render_meta(c.meta)} <|endofchunk|> " for k, c in enumerate(candidates)
    )
    text = prefix + SELECT_FROM + options + SELECT_QUESTION
    return Prompt(text, (*items, *candidates), prefix, tuple(i.token for i in items if i.token >= 0), len(items))


def encode(prompt: Prompt, tokenizer: Tokenizer, endofchunk_id: int, image_id: int) -> EncodedPrompt:
    """Tokenize the whole prompt (never piecewise: BPE merges across boundaries) and locate the prefix.

    The prefix ends at the last ``<|endofchunk|>`` of the history; as a special token it is a split point,
    so the tokens before it are the same whatever follows.
    """
    ids = np.asarray(tokenizer.encode(prompt.text, add_special_tokens=False).ids, dtype=np.int64)
    n_images = int((ids == image_id).sum())
    if n_images != len(prompt.images):
        raise InvalidRequest(
            f"prompt has {n_images} <image> tokens but {len(prompt.images)} images: "
            "item text must not contain '<image>'",
            field="history",
        )
    prefix_len = 0
    if prompt.prefix_text:
        eoc = np.flatnonzero(ids == endofchunk_id)
        chunks_in_prefix = prompt.prefix_text.count("<|endofchunk|>")
        if chunks_in_prefix and len(eoc) >= chunks_in_prefix:
            prefix_len = int(eoc[chunks_in_prefix - 1]) + 1
    return EncodedPrompt(prompt, ids, prefix_len)


def history_from_request(items: tuple[HistoryItem, ...]) -> tuple[HistoryItem, ...]:
    """Ratings are 1..5 when given (whether an item is a catalog id or an inline image is checked when
    the engine resolves it against the catalog)."""
    for k, item in enumerate(items):
        if item.rating and not 1 <= item.rating <= 5:
            raise InvalidRequest(f"history[{k}].rating must be 1..5", field=f"history[{k}].rating")
    return items
