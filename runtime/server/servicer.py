"""grpc.aio servicers of unimp.v1.Personalization and unimp.v1.Catalog.

Every RPC follows one path:

0. **start**: read the request id, peer, metadata and deadline from the servicer context once
   (``CallStart``); nothing later touches the context after the call may have been cancelled;
1. **admission** on the event loop: refuse with UNAVAILABLE while the engine loads or the server
   drains, with RESOURCE_EXHAUSTED when the call's bound is reached (``admission``: model slots and
   their decode-cost budget, or the separate bound of cheap catalog / interaction RPCs); otherwise
   take a slot, create the request's ``CancelToken`` (with the RPC deadline);
2. **work** in a worker thread: parse the raw bytes, validate and convert them (``convert``), read
   stored history (``store``), call the synchronous engine, convert the result back. Streaming RPCs
   run the engine's iterator in the thread and hand messages to the event loop through a queue;
3. **completion**: the slot is released when the worker thread finishes (not when the client goes
   away), so the limit bounds real engine work. Client cancellation, an expired deadline or server
   shutdown set the CancelToken; the engine stops at its next step boundary.

Handlers are registered from the service descriptors with raw-bytes requests, so malformed messages
are INVALID_ARGUMENT rather than grpc's INTERNAL, and a method without an implementation fails at
start-up rather than at call time.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import functools
import logging
import re
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Any

import grpc
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import Message

from runtime.api import CatalogItem, Engine, ImageResult
from runtime.prompts import check_history_item
from runtime.server import convert, errors, logs
from runtime.server.admission import CHEAP_RPCS, Admission, request_cost
from runtime.server.auth import Authenticator, Principal
from runtime.server.config import ServerConfig
from runtime.server.metrics import ServerMetrics
from runtime.server.protos import catalog_pb2 as cpb
from runtime.server.protos import personalization_pb2 as ppb
from runtime.server.store import StateStore
from runtime.types import (
    CancelToken,
    DeadlineExceeded,
    HistoryItem,
    InvalidRequest,
    ItemMeta,
    NotFound,
    Overloaded,
    PreferenceResult,
    TextPiece,
    Timings,
    Unavailable,
)

logger = logging.getLogger(__name__)

REQUEST_ID_KEY = "x-request-id"
_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")

PERSONALIZATION: ServiceDescriptor = ppb.DESCRIPTOR.services_by_name["Personalization"]
CATALOG: ServiceDescriptor = cpb.DESCRIPTOR.services_by_name["Catalog"]


class ServingState(str, Enum):
    LOADING = "loading"
    SERVING = "serving"
    FAILED = "failed"
    DRAINING = "draining"


@dataclass
class Call:
    """One admitted RPC, as seen by its worker thread."""

    rpc: str
    raw: bytes
    principal: Principal
    cancel: CancelToken
    request_id: str
    started: float = field(default_factory=time.perf_counter)
    first_token: float | None = None
    """perf_counter() of the first streamed token (Explain)."""
    pieces: int = 0
    timings: Timings | None = None
    stage_timings: dict[str, float] = field(default_factory=dict)
    """Image generation's per-component seconds (prompt, text_encoder, unet_per_step, vae_decoder; VQGAN:
    prompt, prefill, codes, vqgan_decoder)."""
    stored_history: int = 0
    """Stored interactions at the start of the engine's history (maps its indices to request paths)."""
    cost: int = 0
    """Admission cost held while the call runs (``admission.request_cost``; 0 for cheap RPCs)."""

    @property
    def tenant(self) -> str:
        return self.principal.tenant

    def mark_token(self) -> None:
        self.pieces += 1
        if self.first_token is None:
            self.first_token = time.perf_counter()


_DEADLINE_SLACK_S = 0.25
"""How long after a deadline the server's own wait gives up if grpc has not cancelled the handler."""
_DEADLINE_EPSILON_S = 0.05
"""A cancellation this close before the deadline read at start counts as the deadline passing: the
client's deadline starts when it creates the call, the server's when the call arrives, so the client
gives up (and cancels) slightly before the server's deadline does."""


@dataclass(frozen=True)
class CallStart:
    """What an RPC needs from its servicer context, read once when the handler starts."""

    request_id: str
    peer: str
    metadata: tuple[tuple[str, str | bytes], ...]
    deadline: float | None
    """time.monotonic() at which the client's deadline passes; None without a deadline."""
    started: float = field(default_factory=time.perf_counter)

    def expired(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline - _DEADLINE_EPSILON_S

    def wait_timeout(self) -> float | None:
        """Seconds the handler may wait for its worker before giving up on the deadline itself."""
        if self.deadline is None:
            return None
        return max(0.0, self.deadline - time.monotonic()) + _DEADLINE_SLACK_S


Work = Callable[[Call], Any]
"""A synchronous RPC implementation: returns a response message, or an iterator of them."""

_ITEM, _ERROR, _END = 0, 1, 2


class Servicer:
    """Implements both services on top of an Engine; owns admission, cancellation and metrics."""

    def __init__(
        self,
        config: ServerConfig,
        metrics: ServerMetrics,
        store: StateStore,
        authenticator: Authenticator,
        executor: concurrent.futures.ThreadPoolExecutor,
    ) -> None:
        self.config = config
        self.limits = config.limits
        self.metrics = metrics
        self.store = store
        self.auth = authenticator
        self.executor = executor
        self.engine: Engine | None = None
        self.state = ServingState.LOADING
        self.load_error = ""
        self.admission = Admission(config.max_inflight, config.max_inflight_cheap, config.max_inflight_cost)
        self._catalog_lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._idle = asyncio.Event()
        self._idle.set()
        self._impls: dict[str, Work] = {
            "Recommend": self._recommend,
            "Search": self._search,
            "PredictPreference": self._predict_preference,
            "Explain": self._explain,
            "SelectItems": self._select_items,
            "GenerateImage": self._generate_image,
            "RecordInteraction": self._record_interaction,
            "DeleteInteraction": self._delete_interaction,
            "ForgetUser": self._forget_user,
            "UpsertItem": self._upsert_item,
            "GetItem": self._get_item,
            "ListItems": self._list_items,
            "DeleteItem": self._delete_item,
        }

    # -- registration ------------------------------------------------------------------------------

    def generic_handlers(self) -> list[grpc.GenericRpcHandler]:
        """One generic handler per service, built from its descriptor."""
        out = []
        for service, module in ((PERSONALIZATION, ppb), (CATALOG, cpb)):
            handlers = {}
            for method in service.methods:
                impl = self._impls.get(method.name)
                if impl is None:
                    raise RuntimeError(f"{service.full_name}.{method.name} has no implementation")
                if method.client_streaming:
                    raise RuntimeError(f"{service.full_name}.{method.name}: client streaming is not supported")
                serializer = getattr(module, method.output_type.name).SerializeToString
                if method.server_streaming:
                    handlers[method.name] = grpc.unary_stream_rpc_method_handler(
                        functools.partial(self._serve_stream, method.name, impl), response_serializer=serializer)
                else:
                    handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                        functools.partial(self._serve_unary, method.name, impl), response_serializer=serializer)
            out.append(grpc.method_handlers_generic_handler(service.full_name, handlers))
        return out

    def method_kinds(self) -> dict[str, bool]:
        """Every implemented RPC by method name: True for a server stream (hosts other than grpc.aio)."""
        kinds = {}
        for service in (PERSONALIZATION, CATALOG):
            for method in service.methods:
                kinds[method.name] = method.server_streaming
        return kinds

    async def serve_unary(self, rpc: str, raw: bytes, context: Any) -> Message:
        """One unary RPC through the same path as the grpc.aio handlers; ``context`` is anything with the
        grpc.aio ServicerContext methods this module uses (invocation_metadata, time_remaining, peer,
        send_initial_metadata, abort). Used by hosts other than the grpc.aio server (runtime.deploy)."""
        return await self._serve_unary(rpc, self._impls[rpc], raw, context)

    def serve_stream(self, rpc: str, raw: bytes, context: Any) -> AsyncIterator[Message]:
        """One server-streaming RPC; see ``serve_unary``."""
        return self._serve_stream(rpc, self._impls[rpc], raw, context)

    # -- lifecycle -----------------------------------------------------------------------------------

    def set_engine(self, engine: Engine) -> None:
        self.engine = engine
        self.metrics.engine_stats = engine.stats
        self.metrics.engine_providers = getattr(engine, "providers", None)  # runtime.engine.Runtime has it
        if self.state is ServingState.LOADING:
            self.state = ServingState.SERVING

    async def wait_idle(self, timeout: float | None) -> bool:
        """Wait until no worker thread runs; returns False on timeout."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except TimeoutError:
            return False

    # -- admission -----------------------------------------------------------------------------------

    @property
    def inflight(self) -> int:
        """Admitted RPCs whose worker thread has not finished (model and cheap ones)."""
        return self.admission.inflight + self.admission.inflight_cheap

    def _admit(self, rpc: str, raw: bytes, start: CallStart) -> Call:
        if self.state is ServingState.DRAINING:
            self.metrics.rejected.labels(rpc, "shutdown").inc()
            raise Unavailable("the server is shutting down; retry on another instance")
        if self.state is ServingState.LOADING:
            self.metrics.rejected.labels(rpc, "loading").inc()
            raise Unavailable("the model is still loading; retry shortly (watch grpc.health.v1)")
        if self.state is ServingState.FAILED:
            self.metrics.rejected.labels(rpc, "failed").inc()
            raise Unavailable(f"the model failed to load: {self.load_error}")
        cost = 0 if rpc in CHEAP_RPCS else request_cost(rpc, raw, self.limits)
        refused = self.admission.refusal(rpc, cost)
        if refused is not None:
            reason, message = refused
            self.metrics.rejected.labels(rpc, reason).inc()
            raise Overloaded(message)
        principal = self.auth.principal(start.metadata)
        self.admission.take(rpc, cost)
        self._idle.clear()
        if rpc in CHEAP_RPCS:
            self.metrics.inflight_cheap.inc()
        else:
            self.metrics.inflight.inc()
            self.metrics.inflight_cost.inc(cost)
        return Call(rpc=rpc, raw=raw, principal=principal, cancel=CancelToken(deadline=start.deadline),
                    request_id=start.request_id, cost=cost)

    def _release(self, call: Call) -> None:
        self.admission.give_back(call.rpc, call.cost)
        if call.rpc in CHEAP_RPCS:
            self.metrics.inflight_cheap.dec()
        else:
            self.metrics.inflight.dec()
            self.metrics.inflight_cost.dec(call.cost)
        if self.admission.idle:
            self._idle.set()

    def _submit(self, call: Call, fn: Callable[[], Any]) -> concurrent.futures.Future[Any]:
        """Run fn in a worker thread with the current context; the call's slot is released when it ends."""
        loop = asyncio.get_running_loop()
        ctx = contextvars.copy_context()
        future = self.executor.submit(ctx.run, fn)

        def done(_: concurrent.futures.Future[Any]) -> None:
            try:
                loop.call_soon_threadsafe(self._release, call)
            except RuntimeError:  # loop already closed at shutdown
                pass

        future.add_done_callback(done)
        return future

    @staticmethod
    def _call_start(context: grpc.aio.ServicerContext) -> CallStart:
        """Everything later steps need from the context, read while the call is certainly alive."""
        metadata = tuple(context.invocation_metadata() or ())
        request_id = ""
        for key, value in metadata:
            if key == REQUEST_ID_KEY and isinstance(value, str) and _REQUEST_ID_RE.match(value):
                request_id = value
                break
        remaining = context.time_remaining()
        return CallStart(
            request_id=request_id or uuid.uuid4().hex[:16],
            peer=context.peer(),
            metadata=metadata,
            deadline=time.monotonic() + remaining if remaining is not None else None,
        )

    def _note_cancel(self, call: Call | None, rpc: str, start: CallStart) -> str:
        """Cancel the call's engine work; the reason (deadline or client) comes from the deadline read at start."""
        reason = "deadline" if start.expired() else "client"
        if call is not None:
            call.cancel.cancel()
            self.metrics.cancelled.labels(rpc, reason).inc()
        return reason

    def _finish(self, rpc: str, call: Call | None, code: grpc.StatusCode, start: CallStart,
                message: str = "") -> None:
        """Metrics and the access log line. Never touches the servicer context: it may be gone."""
        elapsed = time.perf_counter() - start.started
        self.metrics.requests.labels(rpc, code.name).inc()
        self.metrics.latency.labels(rpc).observe(elapsed)
        if call is not None and code is grpc.StatusCode.OK:
            t = call.timings
            if t is not None:
                for stage in ("vision", "prefill", "decode"):
                    if getattr(t, stage) > 0:
                        self.metrics.stage_seconds.labels(rpc, stage).observe(getattr(t, stage))
            for stage, seconds in call.stage_timings.items():
                self.metrics.stage_seconds.labels(rpc, stage).observe(seconds)
            if call.first_token is not None:
                self.metrics.time_to_first_token.labels(rpc).observe(call.first_token - call.started)
            elif t is not None and t.tokens > 0 and t.first_token > 0:
                self.metrics.time_to_first_token.labels(rpc).observe(t.first_token)
            if t is not None and t.tokens > 1 and t.decode > 0:
                self.metrics.tokens_per_second.labels(rpc).observe(t.tokens / t.decode)
            elif call.first_token is not None and call.pieces > 1:
                span = time.perf_counter() - call.first_token
                if span > 0:
                    self.metrics.tokens_per_second.labels(rpc).observe((call.pieces - 1) / span)
        extra = {"rpc": rpc, "code": code.name, "duration_ms": round(elapsed * 1000, 3), "peer": start.peer}
        if call is not None:
            extra["tenant"] = call.tenant
        if message:
            extra["error"] = message
        level = logging.WARNING if code is grpc.StatusCode.INTERNAL else logging.INFO
        logger.log(level, "%s %s", rpc, code.name, extra=extra)

    # -- serving -------------------------------------------------------------------------------------
    #
    # The servicer context is read once, in _call_start, and used afterwards only while the call is known
    # to be alive (send_initial_metadata before any work, abort for an error status). After the handler
    # is cancelled (client cancel, deadline, server stop) or the stream generator is closed, grpc.aio may
    # already have torn the call down: touching the context then (peer(), time_remaining(), abort()) is a
    # use-after-free in grpc's C core, so the cancellation branches use only what _call_start read.
    # Deadlines are left to grpc, which cancels the handler when they pass; the server's own wait only
    # backs that up, _DEADLINE_SLACK_S later, and then ends the call without touching the context either.

    @staticmethod
    async def _send_request_id(context: grpc.aio.ServicerContext, start: CallStart) -> None:
        """Initial metadata; a call that ended before it could be sent is treated as cancelled."""
        try:
            await context.send_initial_metadata(((REQUEST_ID_KEY, start.request_id),))
        except Exception as exc:  # the call is gone: the cancellation branch must not touch the context
            raise asyncio.CancelledError() from exc

    async def _serve_unary(self, rpc: str, impl: Work, raw: bytes, context: grpc.aio.ServicerContext) -> Message:
        start = self._call_start(context)
        logs.request_id.set(start.request_id)
        call: Call | None = None
        try:
            await self._send_request_id(context, start)
            call = self._admit(rpc, raw, start)
            admitted = call
            future = self._submit(call, lambda: impl(admitted))
            try:
                result: Message = await asyncio.wait_for(asyncio.wrap_future(future), start.wait_timeout())
            except TimeoutError:
                raise DeadlineExceeded("the deadline passed before the engine finished") from None
            self._finish(rpc, call, grpc.StatusCode.OK, start)
            return result
        except asyncio.CancelledError:
            reason = self._note_cancel(call, rpc, start)
            code = grpc.StatusCode.DEADLINE_EXCEEDED if reason == "deadline" else grpc.StatusCode.CANCELLED
            self._finish(rpc, call, code, start)
            raise
        except Exception as exc:
            if isinstance(exc, DeadlineExceeded):
                self._note_cancel(call, rpc, start)
            status = errors.status_for(exc, start.request_id)
            self._finish(rpc, call, status.code, start, status.message)
            if start.expired():  # grpc ends the call with DEADLINE_EXCEEDED (now, or has already)
                raise asyncio.CancelledError() from None
            await context.abort(status.code, status.message, trailing_metadata=status.trailing_metadata)
            raise  # abort() raises; this line is never reached

    async def _serve_stream(
        self, rpc: str, impl: Work, raw: bytes, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Message]:
        start = self._call_start(context)
        logs.request_id.set(start.request_id)
        call: Call | None = None
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()

        def post(kind: int, payload: Any) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, (kind, payload))
            except RuntimeError:  # loop closed: nobody is listening any more
                pass

        def produce(admitted: Call) -> None:
            messages: Iterator[Message] | None = None
            try:
                messages = impl(admitted)
                for message in messages:
                    if admitted.cancel.cancelled:
                        break
                    post(_ITEM, message)
                else:
                    post(_END, None)
            except BaseException as exc:
                post(_ERROR, exc)
            finally:
                close = getattr(messages, "close", None)
                if close is not None:
                    close()

        try:
            await self._send_request_id(context, start)
            call = self._admit(rpc, raw, start)
            admitted = call
            self._submit(call, lambda: produce(admitted))
            while True:
                try:
                    kind, payload = await asyncio.wait_for(queue.get(), start.wait_timeout())
                except TimeoutError:
                    raise DeadlineExceeded("the deadline passed before the stream finished") from None
                if kind == _ITEM:
                    yield payload
                elif kind == _ERROR:
                    raise payload
                else:
                    break
        except (asyncio.CancelledError, GeneratorExit):
            reason = self._note_cancel(call, rpc, start)
            code = grpc.StatusCode.DEADLINE_EXCEEDED if reason == "deadline" else grpc.StatusCode.CANCELLED
            self._finish(rpc, call, code, start)
            raise
        except Exception as exc:
            if call is not None:
                call.cancel.cancel()
            if isinstance(exc, DeadlineExceeded):
                self._note_cancel(call, rpc, start)
            status = errors.status_for(exc, start.request_id)
            self._finish(rpc, call, status.code, start, status.message)
            if start.expired():  # grpc ends the call with DEADLINE_EXCEEDED (now, or has already)
                raise asyncio.CancelledError() from None
            await context.abort(status.code, status.message, trailing_metadata=status.trailing_metadata)
            return
        self._finish(rpc, call, grpc.StatusCode.OK, start)

    # -- helpers for the worker threads ------------------------------------------------------------

    def _engine(self) -> Engine:
        if self.engine is None:
            raise Unavailable("the model is not loaded")
        return self.engine

    def _check_catalog_ids(self, items: tuple[HistoryItem, ...], field: str) -> None:
        catalog = self._engine().catalog
        for i, item in enumerate(items):
            if item.item_id:
                try:
                    catalog.get(item.item_id)
                except NotFound:
                    raise NotFound(f"unknown catalog item {item.item_id!r}", f"{field}[{i}].item_id") from None

    def _check_item(self, item: HistoryItem, field: str) -> None:
        if item.item_id:
            try:
                self._engine().catalog.get(item.item_id)
            except NotFound:
                raise NotFound(f"unknown catalog item {item.item_id!r}", f"{field}.item_id") from None

    def _history(self, msg: Any, call: Call) -> tuple[HistoryItem, ...]:
        """Stored interactions of msg.user_id (items since deleted are dropped), then msg.history."""
        uid = convert.user_id(msg, self.limits)
        inline = convert.inline_history(msg.history, self.limits)
        self._check_catalog_ids(inline, "history")
        stored: tuple[HistoryItem, ...] = ()
        if uid:
            catalog = self._engine().catalog
            kept = []
            for item in self.store.history(call.tenant, uid, self.config.history_limit):
                if item.item_id:
                    try:
                        catalog.get(item.item_id)
                    except NotFound:
                        continue
                kept.append(item)
            stored = tuple(kept)
        combined = convert.combine_history(stored, inline, uid, self.limits)
        call.stored_history = len(combined) - len(inline)
        return combined

    def _for_user(self, request: Any, msg: Any) -> Any:
        """The engine request carrying msg.user_id (tags the prefix-cache entries of the user's history)."""
        uid = convert.user_id(msg, self.limits)
        return replace(request, user_id=uid) if uid else request

    # -- Personalization -------------------------------------------------------------------------------

    def _recommend(self, call: Call) -> ppb.RecommendResponse:
        msg = convert.parse(ppb.RecommendRequest, call.raw)
        history = self._history(msg, call)
        request = self._for_user(convert.recommend_request(msg, history, call.tenant, call.cancel, self.limits), msg)
        with convert.request_paths(call.stored_history):
            result = self._engine().recommend(request)
        call.timings = result.timings
        return convert.recommend_response(result)

    def _search(self, call: Call) -> ppb.SearchResponse:
        msg = convert.parse(ppb.SearchRequest, call.raw)
        history = self._history(msg, call)
        request = self._for_user(convert.search_request(msg, history, call.tenant, call.cancel, self.limits), msg)
        with convert.request_paths(call.stored_history):
            result = self._engine().search(request)
        call.timings = result.timings
        return convert.search_response(result)

    def _preference(self, msg: ppb.PredictPreferenceRequest | ppb.ExplainRequest, call: Call) -> Any:
        history = self._history(msg, call)
        request = self._for_user(convert.preference_request(msg, history, call.tenant, call.cancel, self.limits), msg)
        self._check_item(request.target, "target")
        return request

    def _predict_preference(self, call: Call) -> ppb.PredictPreferenceResponse:
        msg = convert.parse(ppb.PredictPreferenceRequest, call.raw)
        request = self._preference(msg, call)
        with convert.request_paths(call.stored_history):
            result = self._engine().predict_preference(request)
        call.timings = result.timings
        return ppb.PredictPreferenceResponse(prediction=convert.prediction_to_proto(result))

    def _explain(self, call: Call) -> Iterator[ppb.ExplainResponse]:
        msg = convert.parse(ppb.ExplainRequest, call.raw)
        events = self._engine().explain(self._preference(msg, call))
        try:
            with convert.request_paths(call.stored_history):
                for event in events:
                    if isinstance(event, TextPiece):
                        call.mark_token()
                    elif isinstance(event, PreferenceResult):
                        call.timings = event.timings
                    yield convert.explain_event(event)
        finally:
            close = getattr(events, "close", None)
            if close is not None:
                close()

    def _select_items(self, call: Call) -> ppb.SelectItemsResponse:
        msg = convert.parse(ppb.SelectItemsRequest, call.raw)
        history = self._history(msg, call)
        request = self._for_user(convert.select_request(msg, history, call.tenant, call.cancel, self.limits), msg)
        self._check_catalog_ids(request.candidates, "candidates")
        with convert.request_paths(call.stored_history):
            result = self._engine().select_items(request)
        call.timings = result.timings
        return convert.select_response(result)

    def _generate_image(self, call: Call) -> Iterator[ppb.GenerateImageResponse]:
        msg = convert.parse(ppb.GenerateImageRequest, call.raw)
        history = self._history(msg, call)
        events = self._engine().generate_image(convert.image_request(msg, history, call.cancel, self.limits))
        try:
            with convert.request_paths(call.stored_history):
                for event in events:
                    if isinstance(event, ImageResult):
                        call.stage_timings = {k: v for k, v in event.timings.items()
                                              if k in ("prompt", "text_encoder", "unet_per_step", "vae_decoder",
                                                       "prefill", "codes", "vqgan_decoder")}
                    yield convert.image_event(event)
        finally:
            close = getattr(events, "close", None)
            if close is not None:
                close()

    def _record_interaction(self, call: Call) -> ppb.RecordInteractionResponse:
        msg = convert.parse(ppb.RecordInteractionRequest, call.raw)
        interaction = convert.interaction(msg, self.limits)
        check_history_item(interaction.item, "item")  # the rule every task reads stored history with
        self._check_item(interaction.item, "item")
        interaction_id, count = self.store.record_interaction(call.tenant, interaction.user_id, interaction.item,
                                                              interaction.occurred_at_ms)
        return ppb.RecordInteractionResponse(history_length=count, interaction_id=interaction_id)

    def _delete_interaction(self, call: Call) -> ppb.DeleteInteractionResponse:
        msg = convert.parse(ppb.DeleteInteractionRequest, call.raw)
        uid = convert.user_id(msg, self.limits, required=True)
        if msg.interaction_id <= 0:
            raise InvalidRequest(f"interaction_id: must be > 0, got {msg.interaction_id}", "interaction_id")
        if not self.store.delete_interaction(call.tenant, uid, msg.interaction_id):
            raise NotFound(f"interaction_id: user {uid!r} has no interaction {msg.interaction_id}", "interaction_id")
        prefixes = self._engine().forget_user(call.tenant, uid)  # cached prefixes may contain the deleted item
        count = self.store.count(call.tenant, uid)
        logger.info("deleted interaction %d of a user", msg.interaction_id,
                    extra={"rpc": call.rpc, "tenant": call.tenant, "user_id": uid,
                           "interaction_id": msg.interaction_id, "prefixes_removed": prefixes})
        return ppb.DeleteInteractionResponse(history_length=count)

    def _forget_user(self, call: Call) -> ppb.ForgetUserResponse:
        msg = convert.parse(ppb.ForgetUserRequest, call.raw)
        uid = convert.user_id(msg, self.limits, required=True)
        removed = self.store.forget_user(call.tenant, uid)
        prefixes = self._engine().forget_user(call.tenant, uid)
        logger.warning("forgot user: %d interactions and %d cached prefixes removed", removed, prefixes,
                       extra={"rpc": call.rpc, "audit": "forget_user", "tenant": call.tenant, "user_id": uid,
                              "interactions_removed": removed, "prefixes_removed": prefixes,
                              "request_id": call.request_id})
        return ppb.ForgetUserResponse(interactions_removed=removed, prefixes_removed=prefixes)

    # -- Catalog -------------------------------------------------------------------------------------

    def _upsert_item(self, call: Call) -> cpb.UpsertItemResponse:
        edit = convert.catalog_edit(convert.parse(cpb.UpsertItemRequest, call.raw), self.limits)
        catalog = self._engine().catalog
        with self._catalog_lock:  # read-modify-write of one item, and its journal entry, atomically
            try:
                current: CatalogItem | None = catalog.get(edit.item_id)
            except NotFound:
                current = None
            item = CatalogItem(
                item_id=edit.item_id,
                meta=edit.meta if edit.meta is not None else (current.meta if current else ItemMeta()),
                available=edit.available if edit.available is not None else (current.available if current else True),
                token=current.token if current else -1,
                has_image=edit.image is not None or (current.has_image if current else False),
            )
            stored = catalog.upsert(item, edit.image)
            self.store.record_upsert(stored, edit.image)
        return cpb.UpsertItemResponse(item=convert.catalog_item_to_proto(stored), created=current is None)

    def _get_item(self, call: Call) -> cpb.GetItemResponse:
        msg = convert.parse(cpb.GetItemRequest, call.raw)
        item_id = convert.check_id(msg.item_id, "item_id", self.limits)
        catalog = self._engine().catalog
        try:
            item = catalog.get(item_id)
            image = catalog.image(item_id) if msg.include_image and item.has_image else b""
        except NotFound as exc:
            raise NotFound(str(exc), exc.field or "item_id") from None
        return cpb.GetItemResponse(item=convert.catalog_item_to_proto(item), image=image)

    def _list_items(self, call: Call) -> cpb.ListItemsResponse:
        msg = convert.parse(cpb.ListItemsRequest, call.raw)
        size = convert.page_size(msg, self.limits)
        token = convert.page_token(msg, self.limits)
        try:
            page = self._engine().catalog.page(size, token)
        except InvalidRequest as exc:
            raise InvalidRequest(str(exc), exc.field or "page_token") from None
        return cpb.ListItemsResponse(items=[convert.catalog_item_to_proto(i) for i in page.items],
                                     next_page_token=page.next_page_token)

    def _delete_item(self, call: Call) -> cpb.DeleteItemResponse:
        msg = convert.parse(cpb.DeleteItemRequest, call.raw)
        item_id = convert.check_id(msg.item_id, "item_id", self.limits)
        with self._catalog_lock:
            try:
                self._engine().catalog.delete(item_id)
            except NotFound as exc:
                raise NotFound(str(exc), exc.field or "item_id") from None
            self.store.record_delete(item_id)
        return cpb.DeleteItemResponse()
