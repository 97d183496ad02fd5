"""A small deterministic implementation of ``runtime.api.Engine`` for server tests.

Scores come from a hash of (history ids, item id), so answers are stable across runs. Knobs make
the engine slow (``step_delay``), block until released (``gate``), or fail the next call
(``fail_next``); counters record what happened (``calls``, ``cancelled``, ``finished``, ``steps_done``:
work steps, text pieces and denoising steps performed), which is how tests observe that a cancelled RPC
really stopped the engine's work.
"""

from __future__ import annotations

import hashlib
import io
import math
import threading
import time
from collections.abc import Iterator
from dataclasses import replace

from PIL import Image

from runtime.api import (
    CatalogItem,
    CatalogPage,
    ImageProgress,
    ImageRequest,
    ImageResult,
    require_image_scheduler,
)
from runtime.types import (
    Cancelled,
    CancelToken,
    DeadlineExceeded,
    DecodeMode,
    HistoryItem,
    InvalidRequest,
    ItemMeta,
    NotFound,
    PreferenceRequest,
    PreferenceResult,
    RecommendRequest,
    RecommendResult,
    RuntimeError_,
    ScoredItem,
    SearchRequest,
    SelectRequest,
    SelectResult,
    TextPiece,
    Timings,
    Unavailable,
)

CATEGORIES = ("Beauty", "Toys", "Sports", "Clothing")
EXPLANATION = "great value and it matches the brands this user keeps buying".split()


def _hash(*parts: str) -> float:
    digest = hashlib.sha256("\x1f".join(parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def tiny_png(size: int = 4, color: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="PNG")
    return buf.getvalue()


class FakeCatalog:
    """In-memory CatalogStore: sku-0000.. with model tokens 0..n-1."""

    def __init__(self, n: int = 40) -> None:
        self._lock = threading.Lock()
        self._items: dict[str, CatalogItem] = {}
        self._images: dict[str, bytes] = {}
        for k in range(n):
            item_id = f"sku-{k:04d}"
            meta = ItemMeta(category=CATEGORIES[k % len(CATEGORIES)], price=f"{5 + k}.99", brand=f"Brand{k % 7}",
                            title=f"Product {k}")
            self._items[item_id] = CatalogItem(item_id, meta, available=k % 9 != 8, token=k, has_image=k % 2 == 0)
            if k % 2 == 0:
                self._images[item_id] = tiny_png(color=(k * 5 % 256, 100, 150))

    def get(self, item_id: str) -> CatalogItem:
        with self._lock:
            try:
                return self._items[item_id]
            except KeyError:
                raise NotFound(f"unknown catalog item {item_id!r}", "item_id") from None

    def upsert(self, item: CatalogItem, image: bytes | None = None) -> CatalogItem:
        with self._lock:
            current = self._items.get(item.item_id)
            token = current.token if current is not None else -1
            if image is not None:
                self._images[item.item_id] = image
            stored = replace(item, token=token, has_image=item.item_id in self._images)
            self._items[item.item_id] = stored
            return stored

    def delete(self, item_id: str) -> None:
        with self._lock:
            if item_id not in self._items:
                raise NotFound(f"unknown catalog item {item_id!r}", "item_id")
            del self._items[item_id]
            self._images.pop(item_id, None)

    def page(self, page_size: int, page_token: str = "") -> CatalogPage:
        if page_size < 1:
            raise InvalidRequest("must be >= 1", "page_size")
        start = 0
        if page_token:
            if not page_token.startswith("o:") or not page_token[2:].isdigit():
                raise InvalidRequest("malformed page token", "page_token")
            start = int(page_token[2:])
        with self._lock:
            ids = sorted(self._items)
            chunk = tuple(self._items[i] for i in ids[start:start + page_size])
            more = start + page_size < len(ids)
        return CatalogPage(chunk, next_page_token=f"o:{start + page_size}" if more else "")

    def image(self, item_id: str) -> bytes:
        with self._lock:
            if item_id not in self._images:
                raise NotFound(f"no image for {item_id!r}", "item_id")
            return self._images[item_id]

    def all(self) -> list[CatalogItem]:
        with self._lock:
            return list(self._items.values())


class FakeEngine:
    """Deterministic Engine; see the module docstring."""

    def __init__(self, n_items: int = 40, diffusion: bool = True) -> None:
        self._catalog = FakeCatalog(n_items)
        self.diffusion = diffusion
        self.step_delay = 0.0
        """Seconds per decode / denoising step."""
        self.steps = 8
        """Steps a unary call takes (each checks the cancel token)."""
        self.gate: threading.Event | None = None
        """When set to an Event, calls wait for it (checking cancellation) before working."""
        self.fail_next: RuntimeError_ | None = None
        self.started = threading.Semaphore(0)
        """Released once per call when the call starts working."""
        self._lock = threading.Lock()
        self.calls: dict[str, int] = {}
        self.cancelled: dict[str, int] = {}
        self.finished: dict[str, int] = {}
        self.steps_done: dict[str, int] = {}
        self.last_request: object = None
        self.closed = False
        self.prefixes: dict[tuple[str, str], int] = {}
        """(tenant, user_id) -> requests served from that user's stored history (stands in for cached prefixes)."""
        self.forgotten: list[tuple[str, str]] = []

    # -- bookkeeping ---------------------------------------------------------------------------------

    @property
    def catalog(self) -> FakeCatalog:
        return self._catalog

    def _count(self, table: dict[str, int], name: str) -> None:
        with self._lock:
            table[name] = table.get(name, 0) + 1

    def _begin(self, name: str, request: object) -> None:
        self._count(self.calls, name)
        self.last_request = request
        user_id = getattr(request, "user_id", "")
        if user_id:
            owner = (getattr(request, "tenant", ""), user_id)
            with self._lock:
                self.prefixes[owner] = self.prefixes.get(owner, 0) + 1
        self.started.release()
        failure, self.fail_next = self.fail_next, None
        if failure is not None:
            raise failure

    def _check(self, name: str, cancel: CancelToken | None) -> None:
        if cancel is None:
            return
        if cancel.cancelled:
            self._count(self.cancelled, name)
            raise Cancelled("request cancelled")
        if cancel.deadline is not None and time.monotonic() > cancel.deadline:
            self._count(self.cancelled, name)
            raise DeadlineExceeded("deadline passed")

    def _work(self, name: str, cancel: CancelToken | None, steps: int) -> None:
        if self.gate is not None:
            while not self.gate.wait(0.01):
                self._check(name, cancel)
        for _ in range(steps):
            self._check(name, cancel)
            if self.step_delay:
                time.sleep(self.step_delay)
            self._count(self.steps_done, name)
        self._check(name, cancel)

    @staticmethod
    def _ids(history: tuple[HistoryItem, ...]) -> str:
        return ",".join(h.item_id or f"inline:{h.meta.title if h.meta else ''}:{len(h.image)}" for h in history)

    def _rank(self, name: str, request: RecommendRequest | SearchRequest, salt: str) -> RecommendResult:
        self._begin(name, request)
        self._work(name, request.cancel, self.steps)
        seen = {h.item_id for h in request.history if h.item_id}
        key = self._ids(request.history) + salt + request.tenant
        pool = []
        for item in self._catalog.all():
            if item.token < 0 or not item.available:
                continue
            if request.filter.exclude_history and item.item_id in seen:
                continue
            if request.filter.allow and item.item_id not in request.filter.allow:
                continue
            if request.filter.categories and item.meta.category not in request.filter.categories:
                continue
            pool.append((math.log(max(_hash(key, item.item_id), 1e-12)), item))
        pool.sort(key=lambda p: (-p[0], p[1].item_id))
        top = tuple(ScoredItem(item.item_id, score, item.meta) for score, item in pool[: request.top_k])
        self._count(self.finished, name)
        return RecommendResult(top, Timings(prefill=0.001, decode=0.002, total=0.003, first_token=0.001,
                                            tokens=1 if request.mode == DecodeMode.FAST else 4))

    # -- Engine ---------------------------------------------------------------------------------------

    def recommend(self, request: RecommendRequest) -> RecommendResult:
        return self._rank("recommend", request, "")

    def search(self, request: SearchRequest) -> RecommendResult:
        return self._rank("search", request, "|q:" + request.query)

    def _distribution(self, request: PreferenceRequest) -> tuple[float, ...]:
        key = self._ids(request.history) + "|t:" + self._ids((request.target,))
        weights = [0.5 + _hash(key, str(r)) for r in range(1, 6)]
        total = sum(weights)
        return tuple(w / total for w in weights)

    def _prediction(self, request: PreferenceRequest, text: str, finish: str, tokens: int) -> PreferenceResult:
        dist = self._distribution(request)
        return PreferenceResult(
            rating_distribution=dist,
            expected_rating=sum((i + 1) * p for i, p in enumerate(dist)),
            rating=1 + max(range(5), key=lambda i: dist[i]),
            explanation=text,
            finish_reason=finish,
            timings=Timings(prefill=0.001, decode=0.001 * tokens, total=0.002 + 0.001 * tokens, first_token=0.001,
                            tokens=tokens),
        )

    def predict_preference(self, request: PreferenceRequest) -> PreferenceResult:
        self._begin("predict_preference", request)
        self._work("predict_preference", request.cancel, self.steps)
        self._count(self.finished, "predict_preference")
        return self._prediction(request, "", "", 0)  # rating only, like the real engine

    def explain(self, request: PreferenceRequest) -> Iterator[TextPiece | PreferenceResult]:
        self._begin("explain", request)
        self._work("explain", request.cancel, 0)
        words = EXPLANATION[: request.sampling.max_new_tokens]
        pieces: list[str] = []
        try:
            for i, word in enumerate(words):
                self._check("explain", request.cancel)
                if self.step_delay:
                    time.sleep(self.step_delay)
                piece = word if i == 0 else " " + word
                pieces.append(piece)
                self._count(self.steps_done, "explain")
                yield TextPiece(piece)
        except GeneratorExit:
            self._count(self.cancelled, "explain")
            raise
        finish = "length" if len(words) < len(EXPLANATION) else "eos"
        self._count(self.finished, "explain")
        yield self._prediction(request, "".join(pieces), finish, len(words))

    def select_items(self, request: SelectRequest) -> SelectResult:
        self._begin("select_items", request)
        self._work("select_items", request.cancel, self.steps)
        key = self._ids(request.history)
        raw = [0.1 + _hash(key, self._ids((c,)), str(i)) for i, c in enumerate(request.candidates)]
        total = sum(raw)
        scores = tuple(r / total for r in raw)
        order = sorted(range(len(scores)), key=lambda i: -scores[i])[: request.max_selected]
        self._count(self.finished, "select_items")
        return SelectResult(selected=tuple(order), scores=scores, timings=Timings(prefill=0.001, tokens=2))

    def generate_image(self, request: ImageRequest) -> Iterator[ImageProgress | ImageResult]:
        self._begin("generate_image", request)
        if not self.diffusion:
            raise Unavailable("these artifacts have no diffusion graphs")
        require_image_scheduler(request.scheduler)  # the real engine's check, so the fake cannot drift
        cancel = request.cancel if isinstance(request.cancel, CancelToken) else None
        try:
            for step in range(1, request.steps + 1):
                self._check("generate_image", cancel)
                if self.step_delay:
                    time.sleep(self.step_delay)
                self._count(self.steps_done, "generate_image")
                yield ImageProgress(step=step, total=request.steps)
        except GeneratorExit:
            self._count(self.cancelled, "generate_image")
            raise
        titles = [h.meta.title if h.meta else h.item_id for h in request.history]
        prompt = f"{request.query}, in the style of {', '.join(titles[-2:])}"
        buf = io.BytesIO()
        Image.new("RGB", (request.width, request.height), (request.seed % 256, 80, 160)).save(buf, format="PNG")
        self._count(self.finished, "generate_image")
        yield ImageResult(png=buf.getvalue(), prompt=prompt, width=request.width, height=request.height,
                          timings={"unet": 0.01 * request.steps, "vae": 0.005})

    def forget_user(self, tenant: str, user_id: str) -> int:
        with self._lock:
            self.forgotten.append((tenant, user_id))
            return self.prefixes.pop((tenant, user_id), 0)

    def stats(self) -> dict[str, float]:
        with self._lock:
            done = sum(self.finished.values())
        return {"kv_bytes": 1024.0 * done, "prefix_cache_bytes": 4096.0, "prefix_cache_hits": float(done),
                "prefix_cache_misses": 2.0, "queue_depth": 0.0}

    def providers(self) -> dict[str, list[str]]:
        return {"decoder": ["CUDAExecutionProvider", "CPUExecutionProvider"], "vision": ["CPUExecutionProvider"]}

    def close(self) -> None:
        self.closed = True
