"""Plain request/response types of the runtime's Python API.

The gRPC servicer converts protobuf messages into these at the edge; nothing below the server imports
generated protobuf code. All types are frozen dataclasses with validated, documented fields.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from enum import Enum


class ErrorKind(str, Enum):
    """The runtime's error taxonomy; the server maps each to one gRPC status code."""

    INVALID_REQUEST = "invalid_request"
    NOT_FOUND = "not_found"
    RESOURCE_EXHAUSTED = "resource_exhausted"
    UNAVAILABLE = "unavailable"
    CANCELLED = "cancelled"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    INTERNAL = "internal"


class ImageScheduler(str, Enum):
    """Denoising sampler of image generation, carried from the request down to the diffusion pipeline."""

    DEFAULT = "default"
    """The model's own scheduler class when the runtime implements it, DDIM otherwise."""
    DDIM = "ddim"
    EULER = "euler"
    EULER_ANCESTRAL = "euler_ancestral"
    DPMPP_2M = "dpmpp_2m"
    """Second-order multistep DPM-Solver++."""
    PNDM = "pndm"
    """Pseudo numerical methods (PLMS; Stable Diffusion 1.5's default)."""

    @classmethod
    def parse(cls, value: object) -> ImageScheduler:
        """The member for a member, its value or an alias (``euler_a``, ``dpm++_2m``, ``dpmsolver++``,
        ``plms``). Raises ValueError otherwise."""
        if isinstance(value, cls):
            return value
        if isinstance(value, str):
            name = _SCHEDULER_ALIASES.get(value, value)
            for member in cls:
                if member.value == name:
                    return member
        raise ValueError(f"unknown scheduler {value!r}; choose one of {', '.join(image_scheduler_choices())}")


class ImageModel(str, Enum):
    """Which image-generation path GenerateImage takes."""

    UNSPECIFIED = "unspecified"
    """Whatever the artifacts have; VQGAN (the paper's path) when they have both."""
    VQGAN = "vqgan"
    """The LLM writes 16x16 VQGAN code tokens (``img_k,``), the VQGAN decoder draws them (256x256)."""
    DIFFUSION = "diffusion"
    """The LLM writes a short text prompt, latent diffusion renders it."""


_SCHEDULER_ALIASES = {"euler_a": "euler_ancestral", "dpm++_2m": "dpmpp_2m", "dpmsolver++": "dpmpp_2m", "plms": "pndm"}


def image_scheduler_choices() -> tuple[str, ...]:
    """Every accepted scheduler name: the members' values, then the aliases."""
    return (*(m.value for m in ImageScheduler), *_SCHEDULER_ALIASES)


class RuntimeError_(Exception):
    """Base of runtime errors; ``field`` names the offending request field where there is one."""

    kind: ErrorKind = ErrorKind.INTERNAL

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class InvalidRequest(RuntimeError_):
    kind = ErrorKind.INVALID_REQUEST


class NotFound(RuntimeError_):
    kind = ErrorKind.NOT_FOUND


class Overloaded(RuntimeError_):
    kind = ErrorKind.RESOURCE_EXHAUSTED


class Unavailable(RuntimeError_):
    kind = ErrorKind.UNAVAILABLE


class Cancelled(RuntimeError_):
    kind = ErrorKind.CANCELLED


class DeadlineExceeded(RuntimeError_):
    kind = ErrorKind.DEADLINE_EXCEEDED


class CancelToken:
    """Set by the caller (client gone, deadline passed); checked by the runtime at every step boundary."""

    def __init__(self, deadline: float | None = None) -> None:
        self._event = threading.Event()
        self.deadline = deadline
        """time.monotonic() value after which the work is abandoned, or None."""

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()


def check_cancel(cancel: CancelToken | None) -> None:
    """Raise Cancelled / DeadlineExceeded when ``cancel`` says the work is abandoned."""
    if cancel is None:
        return
    if cancel.cancelled:
        raise Cancelled("request cancelled")
    if cancel.deadline is not None and time.monotonic() > cancel.deadline:
        raise DeadlineExceeded("deadline exceeded")


@dataclass(frozen=True)
class ItemMeta:
    """Amazon-style item attributes used in UniMP prompts (missing fields render as ``Unknown``)."""

    category: str = ""
    price: str = ""
    brand: str = ""
    title: str = ""


@dataclass(frozen=True)
class HistoryItem:
    """One item in a user's history: a catalog item by id, or an inline item (image + attributes)."""

    item_id: str = ""
    """Catalog id; when set, metadata and image latents come from the catalog."""
    meta: ItemMeta | None = None
    """Inline attributes (override the catalog's when both are given)."""
    image: bytes = b""
    """Inline encoded image (PNG/JPEG); encoded at request time."""
    rating: int = 0
    """1..5 for the preference task's history chunks; 0 if unknown."""
    explanation: str = ""


@dataclass(frozen=True)
class ItemFilter:
    exclude_history: bool = True
    """Never return items already in the history."""
    allow: tuple[str, ...] = ()
    """If non-empty, only these catalog ids may be returned."""
    categories: tuple[str, ...] = ()
    """If non-empty, only items in these categories may be returned."""


class DecodeMode(str, Enum):
    FAST = "fast"
    """One prefill, then top-k over the item-token slice."""
    BEAM = "beam"
    """Paper-parity beam search (HF semantics) over the whole vocabulary. Each hypothesis, best first,
    contributes the first item token it contains, if that item is admissible and not returned yet; the
    result holds the items the hypotheses spell: possibly fewer than top_k, possibly none (a model that
    does not answer with an item token). Scores: the hypotheses' length-penalised sequence scores."""
    BEAM_CONSTRAINED = "beam_constrained"
    """Beam search whose hypotheses can only spell admissible catalog items followed by EOS (a token trie
    built from the masks): exactly min(top_k, admissible items) distinct items. Needs num_beams >= top_k;
    max_new_tokens, length_penalty and early_stopping do not apply. Scores: sequence log-probabilities
    (item spelling and EOS, unpenalised)."""


SEARCH_BEAM_MAX_NEW_TOKENS = 20
"""Search's default beam length (the reference's max_new_tokens for search; recommendation uses 50)."""


@dataclass(frozen=True)
class BeamOptions:
    num_beams: int = 10
    num_return_sequences: int = 10
    max_new_tokens: int = 50
    length_penalty: float = 1.0
    early_stopping: bool = False


@dataclass(frozen=True)
class SamplingOptions:
    """Explanation decoding: greedy when temperature == 0 and num_beams == 1."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    num_beams: int = 1
    max_new_tokens: int = 64


@dataclass(frozen=True)
class RecommendRequest:
    history: tuple[HistoryItem, ...]
    top_k: int = 10
    mode: DecodeMode = DecodeMode.FAST
    filter: ItemFilter = field(default_factory=ItemFilter)
    beam: BeamOptions = field(default_factory=BeamOptions)
    tenant: str = ""
    """Salt for the prefix cache: entries never cross tenants."""
    user_id: str = ""
    """The user whose stored history the request carries ("" for none): tags the prefix-cache entries it
    computes, so that forgetting the user purges them."""
    cancel: CancelToken | None = None


@dataclass(frozen=True)
class SearchRequest:
    history: tuple[HistoryItem, ...]
    query: str
    top_k: int = 10
    mode: DecodeMode = DecodeMode.FAST
    filter: ItemFilter = field(default_factory=ItemFilter)
    beam: BeamOptions = field(default_factory=lambda: BeamOptions(max_new_tokens=SEARCH_BEAM_MAX_NEW_TOKENS))
    tenant: str = ""
    user_id: str = ""
    """The user whose stored history the request carries ("" for none): tags the prefix-cache entries it
    computes, so that forgetting the user purges them."""
    cancel: CancelToken | None = None


@dataclass(frozen=True)
class ScoredItem:
    item_id: str
    score: float
    """Log-probability (fast path: of the item token; beam: the length-penalised sequence score;
    constrained beam: the log-probability of the item's spelling and EOS)."""
    meta: ItemMeta | None = None


@dataclass(frozen=True)
class Timings:
    """Seconds spent per stage of one request."""

    vision: float = 0.0
    prefill: float = 0.0
    decode: float = 0.0
    total: float = 0.0
    first_token: float = 0.0
    tokens: int = 0
    prefix_cache_hit: bool = False


@dataclass(frozen=True)
class RecommendResult:
    items: tuple[ScoredItem, ...]
    timings: Timings = field(default_factory=Timings)


@dataclass(frozen=True)
class PreferenceRequest:
    history: tuple[HistoryItem, ...]
    target: HistoryItem
    sampling: SamplingOptions = field(default_factory=SamplingOptions)
    tenant: str = ""
    user_id: str = ""
    """The user whose stored history the request carries ("" for none): tags the prefix-cache entries it
    computes, so that forgetting the user purges them."""
    cancel: CancelToken | None = None


@dataclass(frozen=True)
class PreferenceResult:
    rating_distribution: tuple[float, ...]
    """P(rate_1..rate_5 | prompt), renormalised over the five rating tokens; sums to 1."""
    expected_rating: float
    rating: int
    """argmax of the distribution."""
    explanation: str = ""
    finish_reason: str = ""
    """"eos", "length", "cancelled"; "" when no text was generated (``predict_preference``)."""
    timings: Timings = field(default_factory=Timings)


@dataclass(frozen=True)
class TextPiece:
    """One streamed piece of explanation text (already incrementally detokenized)."""

    text: str


@dataclass(frozen=True)
class SelectRequest:
    history: tuple[HistoryItem, ...]
    candidates: tuple[HistoryItem, ...]
    """1..5 candidates, labelled s_0..s_{n-1} in the prompt."""
    max_selected: int = 2
    tenant: str = ""
    user_id: str = ""
    """The user whose stored history the request carries ("" for none): tags the prefix-cache entries it
    computes, so that forgetting the user purges them."""
    cancel: CancelToken | None = None


@dataclass(frozen=True)
class SelectResult:
    selected: tuple[int, ...]
    """Indices into the candidates, best first."""
    scores: tuple[float, ...]
    """Probability of each candidate's selection token s_i, renormalised over the candidates."""
    timings: Timings = field(default_factory=Timings)
