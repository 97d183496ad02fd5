"""The engine interface the gRPC server and the benchmarks program against.

``runtime.engine.Runtime`` implements it on the exported graphs; tests may substitute a fake.
All methods are synchronous and thread-safe; long ones honour ``request.cancel``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

from runtime.types import (
    ImageModel,
    ImageScheduler,
    InvalidRequest,
    ItemMeta,
    PreferenceRequest,
    PreferenceResult,
    RecommendRequest,
    RecommendResult,
    SearchRequest,
    SelectRequest,
    SelectResult,
    TextPiece,
)


@dataclass(frozen=True)
class CatalogItem:
    item_id: str
    """Stable catalog id (SKU)."""
    meta: ItemMeta
    available: bool = True
    token: int = -1
    """Index k of the model's item_k token, or -1 for items the model has no token for
    (they can appear in histories but are never recommended)."""
    has_image: bool = False


@dataclass(frozen=True)
class CatalogPage:
    items: tuple[CatalogItem, ...]
    next_page_token: str = ""


@dataclass(frozen=True)
class ImageRequest:
    history: tuple = ()
    query: str = ""
    negative_prompt: str = ""
    steps: int = 20
    guidance_scale: float = 7.5
    width: int = 64
    height: int = 64
    seed: int = 0
    scheduler: ImageScheduler = ImageScheduler.DDIM
    """DEFAULT: the model's own scheduler class when the runtime implements it, DDIM otherwise."""
    cancel: object | None = None
    model: ImageModel = ImageModel.UNSPECIFIED
    """Which path generates the image (see ImageModel)."""
    temperature: float = 0.0
    """VQGAN path: 0 is greedy (the paper's setting), otherwise sampling with ``top_p`` and ``seed``."""
    top_p: float = 1.0


def require_image_scheduler(value: object) -> ImageScheduler:
    """``ImageRequest.scheduler`` as engines accept it: an ImageScheduler member, nothing else
    (InvalidRequest on field ``scheduler``)."""
    if not isinstance(value, ImageScheduler):
        choices = ", ".join(m.value for m in ImageScheduler)
        raise InvalidRequest(f"scheduler: must be an ImageScheduler ({choices}), got {value!r}", field="scheduler")
    return value


@dataclass(frozen=True)
class ImageProgress:
    step: int
    total: int


@dataclass(frozen=True)
class ImageResult:
    png: bytes
    prompt: str
    width: int
    height: int
    timings: dict[str, float] = field(default_factory=dict)
    codes: tuple[int, ...] = ()
    """VQGAN path: the generated code grid, row-major (0..n_embed-1); empty for diffusion."""


class CatalogStore(Protocol):
    def get(self, item_id: str) -> CatalogItem: ...

    def upsert(self, item: CatalogItem, image: bytes | None = None) -> CatalogItem: ...

    def delete(self, item_id: str) -> None: ...

    def page(self, page_size: int, page_token: str = "") -> CatalogPage: ...

    def image(self, item_id: str) -> bytes: ...


class Engine(Protocol):
    @property
    def catalog(self) -> CatalogStore: ...

    def recommend(self, request: RecommendRequest) -> RecommendResult: ...

    def search(self, request: SearchRequest) -> RecommendResult: ...

    def predict_preference(self, request: PreferenceRequest) -> PreferenceResult: ...

    def explain(self, request: PreferenceRequest) -> Iterator[TextPiece | PreferenceResult]:
        """Yields TextPiece events as tokens are decoded, then one final PreferenceResult."""
        ...

    def select_items(self, request: SelectRequest) -> SelectResult: ...

    def generate_image(self, request: ImageRequest) -> Iterator[ImageProgress | ImageResult]:
        """Yields progress per denoising step (diffusion) or per code row (VQGAN), then the ImageResult.
        Raises Unavailable (field ``image_model``) when the chosen path's graphs are missing."""
        ...

    def forget_user(self, tenant: str, user_id: str) -> int:
        """Drop every cached prefix computed from (or served to) that tenant's user's stored history; returns
        how many were dropped."""
        ...

    def stats(self) -> dict[str, float]:
        """Counters for metrics: kv_bytes, prefix_cache_bytes, prefix_cache_hits, prefix_cache_misses, queue_depth."""
        ...

    def close(self) -> None: ...
