"""Protobuf <-> ``runtime.types`` at the edge, with validation that names the offending field.

Server direction (``*_request`` / ``*_response``): wire messages become the runtime's frozen
dataclasses; every bound in ``runtime.limits.Limits`` is enforced here and violations raise
``runtime.types.InvalidRequest`` whose ``field`` is the path in the request (``history[2].rating``).
Images are checked from their header (format, byte size, pixel count) before anything decodes them.

Client direction (``*_to_proto`` / ``*_from_proto``): used by ``runtime.client``.

Free text may not contain the prompt markers the model uses as structure (``<image>``,
``<|endofchunk|>``, ``<answer>``): a title cannot open a new history chunk.
"""

from __future__ import annotations

import contextlib
import io
import math
import re
import time
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, fields
from typing import Any, TypeVar

from google.protobuf.message import DecodeError, Message
from PIL import Image, UnidentifiedImageError

from runtime.api import CatalogItem, CatalogPage, ImageProgress, ImageRequest, ImageResult, ImageScheduler
from runtime.server.config import LimitsConfig
from runtime.server.errors import with_field
from runtime.server.protos import catalog_pb2 as cpb
from runtime.server.protos import personalization_pb2 as ppb
from runtime.types import (
    SEARCH_BEAM_MAX_NEW_TOKENS,
    BeamOptions,
    CancelToken,
    DecodeMode,
    HistoryItem,
    ImageModel,
    InvalidRequest,
    ItemFilter,
    ItemMeta,
    NotFound,
    PreferenceRequest,
    PreferenceResult,
    RecommendRequest,
    RecommendResult,
    RuntimeError_,
    SamplingOptions,
    ScoredItem,
    SearchRequest,
    SelectRequest,
    SelectResult,
    TextPiece,
    Timings,
)

M = TypeVar("M", bound=Message)

IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF")
PROMPT_MARKERS = ("<image>", "<|endofchunk|>", "<answer>")
_ALLOWED_CONTROLS = frozenset("\t\n\r")

# We compare pixel counts against our own limit before decoding; Pillow's warning adds nothing.
warnings.simplefilter("ignore", Image.DecompressionBombWarning)

_MODES = {ppb.DECODE_MODE_UNSPECIFIED: DecodeMode.FAST, ppb.DECODE_MODE_FAST: DecodeMode.FAST,
          ppb.DECODE_MODE_BEAM: DecodeMode.BEAM, ppb.DECODE_MODE_BEAM_CONSTRAINED: DecodeMode.BEAM_CONSTRAINED}
_MODE_PROTOS = {DecodeMode.FAST: ppb.DECODE_MODE_FAST, DecodeMode.BEAM: ppb.DECODE_MODE_BEAM,
                DecodeMode.BEAM_CONSTRAINED: ppb.DECODE_MODE_BEAM_CONSTRAINED}
_SCHEDULERS = {ppb.IMAGE_SCHEDULER_UNSPECIFIED: ImageScheduler.DDIM, ppb.IMAGE_SCHEDULER_DDIM: ImageScheduler.DDIM,
               ppb.IMAGE_SCHEDULER_EULER: ImageScheduler.EULER, ppb.IMAGE_SCHEDULER_PNDM: ImageScheduler.PNDM}
_IMAGE_MODELS = {ppb.IMAGE_MODEL_UNSPECIFIED: ImageModel.UNSPECIFIED, ppb.IMAGE_MODEL_VQGAN: ImageModel.VQGAN,
                 ppb.IMAGE_MODEL_DIFFUSION: ImageModel.DIFFUSION}
_FINISH = {"eos": ppb.FINISH_REASON_EOS, "length": ppb.FINISH_REASON_LENGTH,
           "cancelled": ppb.FINISH_REASON_CANCELLED}
_IMAGE_DEFAULTS: dict[str, Any] = {f.name: f.default for f in fields(ImageRequest)}
_SAMPLING_DEFAULTS = SamplingOptions()


# -- primitive validators ----------------------------------------------------------------------------


def parse(cls: type[M], raw: bytes) -> M:
    """Deserialize a request; malformed bytes are INVALID_ARGUMENT (not the INTERNAL grpc would send)."""
    try:
        return cls.FromString(raw)
    except (DecodeError, ValueError, RuntimeError) as exc:
        raise InvalidRequest(f"not a valid {cls.DESCRIPTOR.full_name} message ({exc})", "request") from None


def check_id(value: str, field: str, limits: LimitsConfig, required: bool = True) -> str:
    """item_id / user_id: 1..max_id_chars printable characters without whitespace."""
    if not value:
        if required:
            raise InvalidRequest("is required", field)
        return ""
    if len(value) > limits.max_id_chars:
        raise InvalidRequest(f"is {len(value)} characters long, above the limit of {limits.max_id_chars}", field)
    if not value.isprintable() or any(ch.isspace() for ch in value):
        raise InvalidRequest("must be printable characters without whitespace", field)
    return value


def check_text(value: str, field: str, limits: LimitsConfig, required: bool = False) -> str:
    """Free text: bounded length, no control characters, no prompt markers."""
    if not value.strip():
        if required:
            raise InvalidRequest("is required", field)
        return value
    if len(value) > limits.max_text_chars:
        raise InvalidRequest(f"is {len(value)} characters long, above the limit of {limits.max_text_chars}", field)
    if any(not ch.isprintable() and ch not in _ALLOWED_CONTROLS for ch in value):
        raise InvalidRequest("contains control characters", field)
    for marker in PROMPT_MARKERS:
        if marker in value:
            raise InvalidRequest(f"must not contain the prompt marker {marker}", field)
    return value


def check_image(data: bytes, field: str, limits: LimitsConfig) -> bytes:
    """Reject oversized, non-image or bomb images from the header, before any pixel is decoded."""
    if len(data) > limits.max_image_bytes:
        raise InvalidRequest(f"image is {len(data)} bytes, above the limit of {limits.max_image_bytes}", field)
    try:
        with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as img:  # parses the header only
            width, height = img.size
    except Image.DecompressionBombError:
        raise InvalidRequest(f"image has more than {limits.max_image_pixels} pixels", field) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError):
        raise InvalidRequest(f"is not a readable {', '.join(IMAGE_FORMATS)} image", field) from None
    if width < 1 or height < 1:
        raise InvalidRequest(f"image has an empty size {width}x{height}", field)
    if width * height > limits.max_image_pixels:
        raise InvalidRequest(
            f"image is {width}x{height} = {width * height} pixels, above the limit of {limits.max_image_pixels}",
            field,
        )
    try:
        with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as img:
            img.verify()  # structure and checksums (PNG chunk CRCs), still no pixel decoding
    except Exception:
        raise InvalidRequest("image is truncated or corrupt", field) from None
    return data


def _check_int(value: int, field: str, low: int, high: int) -> int:
    if not low <= value <= high:
        raise InvalidRequest(f"must be {low}..{high}, got {value}", field)
    return value


def _check_float(value: float, field: str, low: float, high: float, low_open: bool = False) -> float:
    if not math.isfinite(value) or value > high or value < low or (low_open and value <= low):
        bound = f"({low}, {high}]" if low_open else f"[{low}, {high}]"
        raise InvalidRequest(f"must be a finite number in {bound}, got {value}", field)
    return value


def _check_enum(value: int, table: dict[Any, Any], field: str) -> Any:
    if value not in table:
        raise InvalidRequest(f"unknown enum value {value}", field)
    return table[value]


# -- shared request pieces ---------------------------------------------------------------------------


def attributes(msg: cpb.ItemAttributes, field: str, limits: LimitsConfig) -> ItemMeta:
    return ItemMeta(
        category=check_text(msg.category, f"{field}.category", limits),
        price=check_text(msg.price, f"{field}.price", limits),
        brand=check_text(msg.brand, f"{field}.brand", limits),
        title=check_text(msg.title, f"{field}.title", limits),
    )


def history_item(msg: ppb.HistoryItem, field: str, limits: LimitsConfig) -> HistoryItem:
    """One HistoryItem; exactly one of item_id / inline_item."""
    source = msg.WhichOneof("source")
    rating = _check_int(msg.rating, f"{field}.rating", 0, 5)
    explanation = check_text(msg.explanation, f"{field}.explanation", limits)
    if source == "item_id":
        return HistoryItem(item_id=check_id(msg.item_id, f"{field}.item_id", limits), rating=rating,
                           explanation=explanation)
    if source == "inline_item":
        inline = msg.inline_item
        meta = attributes(inline.attributes, f"{field}.inline_item.attributes", limits)
        image = check_image(inline.image, f"{field}.inline_item.image", limits) if inline.image else b""
        if not image and meta == ItemMeta():
            raise InvalidRequest("needs attributes or an image", f"{field}.inline_item")
        return HistoryItem(meta=meta, image=image, rating=rating, explanation=explanation)
    raise InvalidRequest("set item_id or inline_item", field)


def inline_history(items: Sequence[ppb.HistoryItem], limits: LimitsConfig) -> tuple[HistoryItem, ...]:
    if len(items) > limits.max_history_items:
        raise InvalidRequest(f"has {len(items)} items, above the limit of {limits.max_history_items}", "history")
    return tuple(history_item(item, f"history[{i}]", limits) for i, item in enumerate(items))


def combine_history(
    stored: Sequence[HistoryItem], inline: Sequence[HistoryItem], user_id: str, limits: LimitsConfig
) -> tuple[HistoryItem, ...]:
    """Stored interactions (oldest first, trimmed to fit the limit), then the inline items."""
    room = max(0, limits.max_history_items - len(inline))
    combined = tuple(stored[len(stored) - room:] if room else ()) + tuple(inline)
    if not combined:
        if user_id:
            raise NotFound(f"no interactions are recorded for user {user_id!r} and the request has no history",
                           "user_id")
        raise InvalidRequest("is empty: give history items or a user_id with recorded interactions", "history")
    return combined


def _id_list(values: Iterable[str], field: str, limits: LimitsConfig) -> tuple[str, ...]:
    values = list(values)
    if len(values) > limits.max_filter_items:
        raise InvalidRequest(f"has {len(values)} entries, above the limit of {limits.max_filter_items}", field)
    return tuple(check_id(v, f"{field}[{i}]", limits) for i, v in enumerate(values))


def _text_list(values: Iterable[str], field: str, limits: LimitsConfig) -> tuple[str, ...]:
    values = list(values)
    if len(values) > limits.max_filter_items:
        raise InvalidRequest(f"has {len(values)} entries, above the limit of {limits.max_filter_items}", field)
    return tuple(check_text(v, f"{field}[{i}]", limits, required=True) for i, v in enumerate(values))


@dataclass(frozen=True)
class Decoding:
    """Validated DecodeOptions."""

    top_k: int
    mode: DecodeMode
    filter: ItemFilter
    beam: BeamOptions


def decode_options(msg: ppb.DecodeOptions, default_max_new: int, limits: LimitsConfig) -> Decoding:
    """Fast mode: top_k 1..max_top_k. Beam modes (paper and constrained): top_k 1..max_beams (one item per
    beam) and top_k <= num_beams <= max_beams; num_beams 0 means ``max(top_k, min(10, max_beams))``."""
    mode = _check_enum(msg.mode, _MODES, "options.mode")
    top_k = _check_int(msg.top_k, "options.top_k", 0, limits.max_top_k)
    beam_mode = mode in (DecodeMode.BEAM, DecodeMode.BEAM_CONSTRAINED)
    if beam_mode:
        cap = limits.beam_top_k_limit()
        if top_k > cap:
            raise InvalidRequest(
                f"is {top_k}, above the limit of {cap} in the beam modes (one item per beam, "
                f"limits.max_beams = {limits.max_beams}); use DECODE_MODE_FAST for up to {limits.max_top_k}",
                "options.top_k",
            )
        top_k = top_k or min(10, cap)
    else:
        top_k = top_k or min(10, limits.max_top_k)
    flt = msg.filter
    item_filter = ItemFilter(
        exclude_history=flt.exclude_history if flt.HasField("exclude_history") else True,
        allow=_id_list(flt.allow_item_ids, "options.filter.allow_item_ids", limits),
        categories=_text_list(flt.categories, "options.filter.categories", limits),
    )
    b = msg.beam
    num_beams = _check_int(b.num_beams, "options.beam.num_beams", 0, limits.max_beams)
    if beam_mode:
        num_beams = num_beams or limits.default_num_beams(top_k)
        if num_beams < top_k:
            raise InvalidRequest(f"must be >= options.top_k ({top_k}), got {num_beams}", "options.beam.num_beams")
    else:  # beam settings are ignored in fast mode; keep them valid for the engine
        num_beams = max(num_beams or limits.default_num_beams(1), 1)
    beam = BeamOptions(
        num_beams=num_beams,
        num_return_sequences=min(top_k, num_beams),
        max_new_tokens=_check_int(b.max_new_tokens, "options.beam.max_new_tokens", 0, limits.max_new_tokens)
        or default_max_new,
        length_penalty=_check_float(b.length_penalty, "options.beam.length_penalty", -10.0, 10.0)
        if b.HasField("length_penalty") else 1.0,
        early_stopping=b.early_stopping,
    )
    return Decoding(top_k, mode, item_filter, beam)


def sampling_options(msg: ppb.SamplingOptions, limits: LimitsConfig) -> SamplingOptions:
    return SamplingOptions(
        temperature=_check_float(msg.temperature, "sampling.temperature", 0.0, 5.0),
        top_p=_check_float(msg.top_p, "sampling.top_p", 0.0, 1.0) or 1.0,
        seed=msg.seed,
        num_beams=_check_int(msg.num_beams, "sampling.num_beams", 0, limits.max_beams) or 1,
        max_new_tokens=_check_int(msg.max_new_tokens, "sampling.max_new_tokens", 0, limits.max_new_tokens)
        or _SAMPLING_DEFAULTS.max_new_tokens,
    )


def user_id(msg: Any, limits: LimitsConfig, required: bool = False) -> str:
    return check_id(msg.user_id, "user_id", limits, required=required)


# -- engine field names -> request paths --------------------------------------------------------------

ENGINE_OPTION_FIELDS = frozenset({"top_k", "mode", "filter", "beam"})
"""Engine field names that sit under ``options`` in Recommend and Search requests."""
_HISTORY_INDEX = re.compile(r"^history\[(\d+)\]")


def request_path(field: str, stored_history: int = 0) -> str:
    """The request path of a field the engine names relative to its request dataclasses.

    ``top_k``, ``mode``, ``filter.*`` and ``beam.*`` live under ``options``; the engine's history is the
    stored interactions followed by the request's items, so ``history[k]`` is the request's
    ``history[k - stored_history]``, or ``user_id`` when it is one of the ``stored_history`` stored
    items. Other names (``sampling.top_p``, ``target``, ``candidates[1].item_id``, ``query``) are the same
    on the wire.
    """
    head = field.split(".", 1)[0].split("[", 1)[0]
    if head in ENGINE_OPTION_FIELDS:
        return f"options.{field}"
    match = _HISTORY_INDEX.match(field)
    if match and stored_history:
        k = int(match.group(1))
        return "user_id" if k < stored_history else f"history[{k - stored_history}]{field[match.end():]}"
    return field


@contextlib.contextmanager
def request_paths(stored_history: int = 0) -> Iterator[None]:
    """Re-raise the engine's errors (only around engine calls) naming request paths (``request_path``)."""
    try:
        yield
    except RuntimeError_ as exc:
        if exc.field is None:
            raise
        path = request_path(exc.field, stored_history)
        if path == exc.field:
            raise
        message = with_field(str(exc), exc.field, path)
        if path == "user_id":
            message = f"user_id: a stored interaction ({exc.field}): {message[len(path) + 2:]}"
        raise type(exc)(message, path) from exc


# -- server: requests --------------------------------------------------------------------------------


def recommend_request(
    msg: ppb.RecommendRequest, history: tuple[HistoryItem, ...], tenant: str, cancel: CancelToken,
    limits: LimitsConfig,
) -> RecommendRequest:
    d = decode_options(msg.options, BeamOptions().max_new_tokens, limits)
    return RecommendRequest(history=history, top_k=d.top_k, mode=d.mode, filter=d.filter, beam=d.beam,
                            tenant=tenant, cancel=cancel)


def search_query(msg: ppb.SearchRequest, limits: LimitsConfig) -> str:
    return check_text(msg.query, "query", limits, required=True)


def search_request(
    msg: ppb.SearchRequest, history: tuple[HistoryItem, ...], tenant: str, cancel: CancelToken,
    limits: LimitsConfig,
) -> SearchRequest:
    d = decode_options(msg.options, SEARCH_BEAM_MAX_NEW_TOKENS, limits)
    return SearchRequest(history=history, query=search_query(msg, limits), top_k=d.top_k, mode=d.mode,
                         filter=d.filter, beam=d.beam, tenant=tenant, cancel=cancel)


def preference_target(msg: ppb.PredictPreferenceRequest | ppb.ExplainRequest, limits: LimitsConfig) -> HistoryItem:
    if not msg.HasField("target"):
        raise InvalidRequest("is required", "target")
    return history_item(msg.target, "target", limits)


def preference_request(
    msg: ppb.PredictPreferenceRequest | ppb.ExplainRequest, history: tuple[HistoryItem, ...], tenant: str,
    cancel: CancelToken, limits: LimitsConfig,
) -> PreferenceRequest:
    return PreferenceRequest(history=history, target=preference_target(msg, limits),
                             sampling=sampling_options(msg.sampling, limits), tenant=tenant, cancel=cancel)


def select_candidates(msg: ppb.SelectItemsRequest, limits: LimitsConfig) -> tuple[HistoryItem, ...]:
    n = len(msg.candidates)
    if not 1 <= n <= limits.max_candidates:
        raise InvalidRequest(f"needs 1..{limits.max_candidates} candidates, got {n}", "candidates")
    return tuple(history_item(c, f"candidates[{i}]", limits) for i, c in enumerate(msg.candidates))


def select_request(
    msg: ppb.SelectItemsRequest, history: tuple[HistoryItem, ...], tenant: str, cancel: CancelToken,
    limits: LimitsConfig,
) -> SelectRequest:
    candidates = select_candidates(msg, limits)
    max_selected = _check_int(msg.max_selected, "max_selected", 0, len(candidates)) or min(2, len(candidates))
    return SelectRequest(history=history, candidates=candidates, max_selected=max_selected, tenant=tenant,
                         cancel=cancel)


def image_query(msg: ppb.GenerateImageRequest, limits: LimitsConfig) -> str:
    return check_text(msg.query, "query", limits, required=True)


def _image_side(value: int, field: str, limits: LimitsConfig) -> int:
    if value == 0:
        return int(_IMAGE_DEFAULTS[field])
    if not 8 <= value <= limits.max_image_side or value % 8:
        raise InvalidRequest(f"must be a multiple of 8 in 8..{limits.max_image_side}, got {value}", field)
    return value


def image_request(
    msg: ppb.GenerateImageRequest, history: tuple[HistoryItem, ...], cancel: CancelToken, limits: LimitsConfig
) -> ImageRequest:
    return ImageRequest(
        history=history,
        query=image_query(msg, limits),
        negative_prompt=check_text(msg.negative_prompt, "negative_prompt", limits),
        steps=_check_int(msg.steps, "steps", 0, limits.max_image_steps) or int(_IMAGE_DEFAULTS["steps"]),
        guidance_scale=_check_float(msg.guidance_scale, "guidance_scale", 0.0, 30.0)
        if msg.HasField("guidance_scale") else float(_IMAGE_DEFAULTS["guidance_scale"]),
        width=_image_side(msg.width, "width", limits),
        height=_image_side(msg.height, "height", limits),
        seed=msg.seed,
        scheduler=_check_enum(msg.scheduler, _SCHEDULERS, "scheduler"),
        cancel=cancel,
        model=_check_enum(msg.image_model, _IMAGE_MODELS, "image_model"),
        temperature=_check_float(msg.temperature, "temperature", 0.0, 5.0),
        top_p=_check_float(msg.top_p, "top_p", 0.0, 1.0, low_open=True) if msg.HasField("top_p") else 1.0,
    )


@dataclass(frozen=True)
class Interaction:
    """A validated RecordInteraction request."""

    user_id: str
    item: HistoryItem
    occurred_at_ms: int


def interaction(msg: ppb.RecordInteractionRequest, limits: LimitsConfig) -> Interaction:
    uid = user_id(msg, limits, required=True)
    if not msg.HasField("item"):
        raise InvalidRequest("is required", "item")
    item = history_item(msg.item, "item", limits)
    if msg.occurred_at_unix_ms < 0:
        raise InvalidRequest(f"must be >= 0, got {msg.occurred_at_unix_ms}", "occurred_at_unix_ms")
    return Interaction(uid, item, msg.occurred_at_unix_ms or int(time.time() * 1000))


# -- server: responses -------------------------------------------------------------------------------


def attributes_to_proto(meta: ItemMeta | None) -> cpb.ItemAttributes | None:
    if meta is None:
        return None
    return cpb.ItemAttributes(category=meta.category, price=meta.price, brand=meta.brand, title=meta.title)


def timings_to_proto(t: Timings) -> ppb.Timings:
    return ppb.Timings(vision_seconds=t.vision, prefill_seconds=t.prefill, decode_seconds=t.decode,
                       total_seconds=t.total, first_token_seconds=t.first_token, generated_tokens=t.tokens,
                       prefix_cache_hit=t.prefix_cache_hit)


def scored_items_to_proto(items: Iterable[ScoredItem]) -> list[ppb.ScoredItem]:
    return [ppb.ScoredItem(item_id=i.item_id, score=i.score, attributes=attributes_to_proto(i.meta)) for i in items]


def recommend_response(result: RecommendResult) -> ppb.RecommendResponse:
    return ppb.RecommendResponse(items=scored_items_to_proto(result.items), timings=timings_to_proto(result.timings))


def search_response(result: RecommendResult) -> ppb.SearchResponse:
    return ppb.SearchResponse(items=scored_items_to_proto(result.items), timings=timings_to_proto(result.timings))


def prediction_to_proto(result: PreferenceResult) -> ppb.PreferencePrediction:
    return ppb.PreferencePrediction(
        rating_distribution=list(result.rating_distribution),
        expected_rating=result.expected_rating,
        rating=result.rating,
        explanation=result.explanation,
        finish_reason=_FINISH.get(result.finish_reason, ppb.FINISH_REASON_UNSPECIFIED),
        timings=timings_to_proto(result.timings),
    )


def explain_event(event: TextPiece | PreferenceResult) -> ppb.ExplainResponse:
    if isinstance(event, TextPiece):
        return ppb.ExplainResponse(text=event.text)
    return ppb.ExplainResponse(result=prediction_to_proto(event))


def select_response(result: SelectResult) -> ppb.SelectItemsResponse:
    return ppb.SelectItemsResponse(selected_indices=list(result.selected), scores=list(result.scores),
                                   timings=timings_to_proto(result.timings))


def image_event(event: ImageProgress | ImageResult) -> ppb.GenerateImageResponse:
    if isinstance(event, ImageProgress):
        return ppb.GenerateImageResponse(progress=ppb.GenerationProgress(step=event.step, total_steps=event.total))
    return ppb.GenerateImageResponse(image=ppb.GeneratedImage(
        png=event.png, prompt=event.prompt, width=event.width, height=event.height,
        stage_seconds={str(k): float(v) for k, v in event.timings.items()}, codes=list(event.codes)))


def catalog_item_to_proto(item: CatalogItem) -> cpb.CatalogItem:
    return cpb.CatalogItem(item_id=item.item_id, attributes=attributes_to_proto(item.meta), available=item.available,
                           model_token=item.token, has_image=item.has_image)


# -- server: catalog requests ------------------------------------------------------------------------


@dataclass(frozen=True)
class CatalogEdit:
    """A validated UpsertItem request; None fields keep the current value."""

    item_id: str
    meta: ItemMeta | None
    image: bytes | None
    available: bool | None


def catalog_edit(msg: cpb.UpsertItemRequest, limits: LimitsConfig) -> CatalogEdit:
    return CatalogEdit(
        item_id=check_id(msg.item_id, "item_id", limits),
        meta=attributes(msg.attributes, "attributes", limits) if msg.HasField("attributes") else None,
        image=check_image(msg.image, "image", limits) if msg.image else None,
        available=msg.available if msg.HasField("available") else None,
    )


def page_size(msg: cpb.ListItemsRequest, limits: LimitsConfig) -> int:
    return _check_int(msg.page_size, "page_size", 0, limits.max_page_size) or min(100, limits.max_page_size)


def page_token(msg: cpb.ListItemsRequest, limits: LimitsConfig) -> str:
    if len(msg.page_token) > limits.max_text_chars or not msg.page_token.isprintable():
        raise InvalidRequest("is not a token returned by ListItems", "page_token")
    return msg.page_token


# -- client direction --------------------------------------------------------------------------------


def history_item_to_proto(item: HistoryItem | str) -> ppb.HistoryItem:
    """A HistoryItem (or a bare catalog id) as a wire message.

    The wire format names catalog items by id only: an item with both ``item_id`` and ``meta``/``image``
    raises ValueError.
    """
    if isinstance(item, str):
        return ppb.HistoryItem(item_id=item)
    if item.item_id:
        if item.meta is not None or item.image:
            raise ValueError(f"history item {item.item_id!r}: give item_id or meta/image, not both")
        return ppb.HistoryItem(item_id=item.item_id, rating=item.rating, explanation=item.explanation)
    return ppb.HistoryItem(
        inline_item=ppb.InlineItem(attributes=attributes_to_proto(item.meta), image=item.image),
        rating=item.rating, explanation=item.explanation,
    )


def history_to_proto(items: Iterable[HistoryItem | str]) -> list[ppb.HistoryItem]:
    return [history_item_to_proto(i) for i in items]


def decode_options_to_proto(
    top_k: int, mode: DecodeMode, item_filter: ItemFilter | None, beam: BeamOptions | None
) -> ppb.DecodeOptions:
    msg = ppb.DecodeOptions(top_k=top_k, mode=_MODE_PROTOS[DecodeMode(mode)])
    if item_filter is not None:
        msg.filter.exclude_history = item_filter.exclude_history
        msg.filter.allow_item_ids.extend(item_filter.allow)
        msg.filter.categories.extend(item_filter.categories)
    if beam is not None:
        msg.beam.num_beams = beam.num_beams
        msg.beam.max_new_tokens = beam.max_new_tokens
        msg.beam.length_penalty = beam.length_penalty
        msg.beam.early_stopping = beam.early_stopping
    return msg


def sampling_to_proto(s: SamplingOptions | None) -> ppb.SamplingOptions | None:
    if s is None:
        return None
    return ppb.SamplingOptions(temperature=s.temperature, top_p=s.top_p, seed=s.seed, num_beams=s.num_beams,
                               max_new_tokens=s.max_new_tokens)


def meta_from_proto(msg: cpb.ItemAttributes) -> ItemMeta:
    return ItemMeta(category=msg.category, price=msg.price, brand=msg.brand, title=msg.title)


def timings_from_proto(t: ppb.Timings) -> Timings:
    return Timings(vision=t.vision_seconds, prefill=t.prefill_seconds, decode=t.decode_seconds,
                   total=t.total_seconds, first_token=t.first_token_seconds, tokens=t.generated_tokens,
                   prefix_cache_hit=t.prefix_cache_hit)


def recommend_result_from_proto(msg: ppb.RecommendResponse | ppb.SearchResponse) -> RecommendResult:
    items = tuple(
        ScoredItem(item_id=i.item_id, score=i.score, meta=meta_from_proto(i.attributes) if i.HasField("attributes")
                   else None)
        for i in msg.items
    )
    return RecommendResult(items=items, timings=timings_from_proto(msg.timings))


_FINISH_NAMES = {v: k for k, v in _FINISH.items()}


def prediction_from_proto(msg: ppb.PreferencePrediction) -> PreferenceResult:
    return PreferenceResult(
        rating_distribution=tuple(msg.rating_distribution), expected_rating=msg.expected_rating,
        rating=msg.rating, explanation=msg.explanation, finish_reason=_FINISH_NAMES.get(msg.finish_reason, ""),
        timings=timings_from_proto(msg.timings),
    )


def explain_event_from_proto(msg: ppb.ExplainResponse) -> TextPiece | PreferenceResult:
    if msg.WhichOneof("event") == "result":
        return prediction_from_proto(msg.result)
    return TextPiece(text=msg.text)


def select_result_from_proto(msg: ppb.SelectItemsResponse) -> SelectResult:
    return SelectResult(selected=tuple(msg.selected_indices), scores=tuple(msg.scores),
                        timings=timings_from_proto(msg.timings))


def image_event_from_proto(msg: ppb.GenerateImageResponse) -> ImageProgress | ImageResult:
    if msg.WhichOneof("event") == "image":
        img = msg.image
        return ImageResult(png=img.png, prompt=img.prompt, width=img.width, height=img.height,
                           timings=dict(img.stage_seconds), codes=tuple(img.codes))
    return ImageProgress(step=msg.progress.step, total=msg.progress.total_steps)


def catalog_item_from_proto(msg: cpb.CatalogItem) -> CatalogItem:
    return CatalogItem(item_id=msg.item_id, meta=meta_from_proto(msg.attributes), available=msg.available,
                       token=msg.model_token, has_image=msg.has_image)


def catalog_page_from_proto(msg: cpb.ListItemsResponse) -> CatalogPage:
    return CatalogPage(items=tuple(catalog_item_from_proto(i) for i in msg.items), next_page_token=msg.next_page_token)
