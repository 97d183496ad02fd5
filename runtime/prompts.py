"""UniMP's evaluation prompts, byte for byte, and their tokenization.

Every chunk of an item with an image starts with ``<image>``; images are listed in prompt order so that
the i-th ``<image>`` token (1-based) attends to the i-th image's latents. An item without an image is the
same chunk without the ``<image> `` part (OpenFlamingo semantics: its text attends to the latest preceding
image, or to nothing before the first one). Eval prompts carry no BOS.

Preference history chunks: ``<image> {meta} <answer> rate_{r} {explanation} <|endofchunk|> ``; an unknown
rating (0) drops ``rate_{r} `` (``<image> {meta} <answer> {explanation} <|endofchunk|> ``), and with
neither rating nor explanation the chunk has no answer part (``<image> {meta} <|endofchunk|> ``).

Recommendation and search chunks name the item as ``item_{k}``; with semantic-ID items as its 4 tokens
written together, ``<image> {meta} item_aitem_bitem_citem_last_d <|endofchunk|> `` (see ``semantic_text``).
"""

from __future__ import annotations

from collections.abc import Sequence
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
IMAGE_CODES_QUESTION = "Query: {query} What is the generated Image ID to the query based on the history? <answer>"
IMAGE_CODES_HISTORY = 2
"""History chunks of the image-generation prompt (the paper uses two)."""


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
    has_image: bool = True
    """False for an item without any image (its chunk has no ``<image>`` token)."""
    semantic: tuple[int, ...] = ()
    """Semantic-ID items: the codes ``(a, b, c, d)`` the chunk spells instead of ``item_{token}``."""

    @property
    def image_tag(self) -> str:
        """``"<image> "`` opening the item's chunk, or "" for an item without an image."""
        return "<image> " if self.has_image else ""

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


def check_history_item(item: HistoryItem, path: str) -> None:
    """The one rule for a history item, applied when it is written (RecordInteraction) and when it is read
    (every task): a catalog id, or inline attributes and/or an image; a rating 0 (unknown) or 1..5."""
    if not item.item_id and not item.image and (item.meta is None or item.meta == ItemMeta()):
        raise InvalidRequest(f"{path}: needs an item_id, inline attributes or an inline image", field=path)
    if not 0 <= item.rating <= 5:
        raise InvalidRequest(f"{path}.rating: must be 0 (unknown) or 1..5, got {item.rating}",
                             field=f"{path}.rating")


def semantic_text(codes: tuple[int, ...]) -> str:
    """How a prompt spells a semantic id: ``item_a``, ``item_b``, ``item_c``, ``item_last_d`` written
    without separators (``item_3item_17item_250item_last_9``), as the reference joins them with
    ``--use_semantic`` (``"".join``); each piece is an added token, so the tokenizer splits them exactly."""
    *head, last = (int(c) for c in codes)
    return "".join(f"item_{c}" for c in head) + f"item_last_{last}"


def _recommend_chunk(item: ResolvedItem) -> str:
    if item.semantic:
        token = f"{semantic_text(item.semantic)} " if item.token >= 0 else ""
    else:
        token = f"item_{item.token} " if item.token >= 0 else ""
    return f"{item.image_tag}{render_meta(item.meta)} {token}<|endofchunk|> "


def _preference_chunk(item: ResolvedItem) -> str:
    explanation = sanitize(item.explanation)
    answer = " ".join(p for p in (f"rate_{item.rating}" if item.rating else "", explanation) if p)
    answer = f"<answer> {answer} " if answer else ""
    return f"{item.image_tag}{render_meta(item.meta)} {answer}<|endofchunk|> "


def _with_images(items: tuple[ResolvedItem, ...]) -> tuple[ResolvedItem, ...]:
    return tuple(i for i in items if i.has_image)


def _history(items: tuple[ResolvedItem, ...], max_history: int) -> tuple[ResolvedItem, ...]:
    if not items:
        raise InvalidRequest("history: must contain at least one item", field="history")
    return items[-max_history:] if max_history > 0 else items


def _prompt(prefix: str, rest: str, history: tuple[ResolvedItem, ...], after: tuple[ResolvedItem, ...] = ()) -> Prompt:
    images = _with_images(history)
    return Prompt(prefix + rest, images + _with_images(after), prefix,
                  tuple(i.token for i in history if i.token >= 0), len(images))


def recommendation_prompt(history: tuple[ResolvedItem, ...], max_history: int = DEFAULT_MAX_HISTORY) -> Prompt:
    items = _history(history, max_history)
    return _prompt("".join(_recommend_chunk(i) for i in items), RECOMMEND_QUESTION, items)


def search_prompt(history: tuple[ResolvedItem, ...], query: str, max_history: int = DEFAULT_MAX_HISTORY) -> Prompt:
    if not sanitize(query):
        raise InvalidRequest("query: must not be empty", field="query")
    items = _history(history, max_history)
    return _prompt("".join(_recommend_chunk(i) for i in items), SEARCH_QUESTION.format(query=sanitize(query)), items)


def preference_prompt(
    history: tuple[ResolvedItem, ...], target: ResolvedItem, max_history: int = DEFAULT_MAX_HISTORY
) -> Prompt:
    """Ratings 1..5 render as ``rate_r``; 0 (unknown) renders without it (see the module docstring)."""
    items = _history(history, max_history)
    for k, i in enumerate(items, start=len(history) - len(items)):
        if not 0 <= i.rating <= 5:
            raise InvalidRequest(f"history[{k}].rating: must be 0 (unknown) or 1..5", field=f"history[{k}].rating")
    question = target.image_tag + PREFERENCE_QUESTION.removeprefix("<image> ").format(meta=render_meta(target.meta))
    return _prompt("".join(_preference_chunk(i) for i in items), question, items, (target,))


def selection_prompt(
    history: tuple[ResolvedItem, ...], candidates: tuple[ResolvedItem, ...], max_history: int = DEFAULT_MAX_HISTORY
) -> Prompt:
    items = _history(history, max_history)
    if not 1 <= len(candidates) <= 5:
        raise InvalidRequest("candidates: item selection takes 1 to 5 candidates", field="candidates")
    prefix = SELECT_INTRO + "".join(f"{i.image_tag}{render_meta(i.meta)} <|endofchunk|> " for i in items)
    options = "".join(
        f"{c.image_tag}Selection s_{k} {render_meta(c.meta)} <|endofchunk|> " for k, c in enumerate(candidates)
    )
    return _prompt(prefix, SELECT_FROM + options + SELECT_QUESTION, items, candidates)


def image_code_text(codes: Sequence[int]) -> str:
    """``img_a,img_b,...``: one ``img_k,`` token per code (the comma belongs to the token), no spaces."""
    return "".join(f"img_{int(k)}," for k in codes)


def image_generation_prompt(
    history: tuple[ResolvedItem, ...], codes: Sequence[Sequence[int]], query: str,
    max_history: int = IMAGE_CODES_HISTORY,
) -> Prompt:
    """The paper's image-generation prompt: per history item (the newest ``max_history``, each with an
    image, and ``codes[i]`` its VQGAN codes) ``<image> Title {title} ID img_a,img_b,... <|endofchunk|> ``,
    then ``Query: {keywords} What is the generated Image ID to the query based on the history? <answer>``.
    """
    if len(codes) != len(history):
        raise ValueError(f"{len(history)} history items but {len(codes)} code lists")
    if not sanitize(query):
        raise InvalidRequest("query: must not be empty", field="query")
    keep = max(0, len(history) - max_history) if max_history > 0 else 0
    items, item_codes = history[keep:], codes[keep:]
    if any(not i.has_image for i in items):
        raise ValueError("every image-generation history item needs an image")
    prefix = "".join(
        f"<image> Title {_field(i.meta.title)} ID {image_code_text(c)} <|endofchunk|> " for i, c in zip(items, item_codes)
    )
    return _prompt(prefix, IMAGE_CODES_QUESTION.format(query=sanitize(query)), items)


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


def history_from_request(items: tuple[HistoryItem, ...], name: str = "history") -> tuple[HistoryItem, ...]:
    """Checks every item with ``check_history_item`` (whether a catalog id exists is checked when the
    engine resolves it against the catalog)."""
    for k, item in enumerate(items):
        check_history_item(item, f"{name}[{k}]")
    return items
