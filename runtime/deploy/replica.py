"""One Serve replica: the artifacts opened once, served by the same ``Servicer`` as ``unimp serve``.

Serve's gRPC proxy calls the ingress deployment's method named like the RPC with the request (raw
bytes, see ``runtime.deploy.ingress``) and a ``RayServegRPCContext``. ``ServeCallContext`` gives that
context the grpc.aio ``ServicerContext`` methods the servicer uses, so admission, validation, the
store, the engine call, error mapping and metrics are the servicer's own code:

- **status codes and messages** are set on Serve's context (which the proxy copies onto the client's
  call), with the same trailing metadata (``unimp-field``) as ``unimp serve`` on unary RPCs. A streaming
  RPC's error reaches the client with its code and message (which starts with the field path), but Serve
  2.60's proxy drops trailing metadata of a stream that fails before its first message;
- **initial metadata** cannot be sent from a replica: ``x-request-id`` travels as trailing metadata,
  with ``unimp-replica`` (the replica that served the call) and the replica's prefix-cache counters
  (``unimp-prefix-cache-hits`` / ``-misses``);
- **auth**: the proxy runs no interceptor, so the replica checks the token and the admin-only methods
  itself with the same ``Authenticator`` before the servicer sees the call;
- **deadlines**: the proxy does not forward the client's deadline; when it passes the client's call is
  cancelled, Serve cancels the replica's task, and the servicer's cancellation path sets the request's
  CancelToken (the engine stops at its next step). ``grpc_options.request_timeout_s`` bounds every call;
- **health**: the replica is ready when its constructor has opened the artifacts; ``check_health``
  (Serve's periodic health check) fails when the engine is not serving, and grpc.health.v1 Check
  through the ingress answers from a replica.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2

from runtime.server import errors
from runtime.server.app import open_runtime
from runtime.server.auth import PUBLIC_METHODS, Authenticator
from runtime.server.config import ServerConfig
from runtime.server.errors import PermissionDenied, Unauthenticated
from runtime.server.metrics import ServerMetrics
from runtime.server.protos import catalog_pb2 as cpb
from runtime.server.protos import personalization_pb2 as ppb
from runtime.server.servicer import CATALOG, PERSONALIZATION, Servicer, ServingState
from runtime.types import Unavailable

from .store import Reader, RemoteStore, prefetch

logger = logging.getLogger(__name__)

REPLICA_KEY = "unimp-replica"
PREFIX_HITS_KEY = "unimp-prefix-cache-hits"
PREFIX_MISSES_KEY = "unimp-prefix-cache-misses"


class _Aborted(Exception):
    """The servicer ended the call with a status (already set on Serve's context, which Serve keeps when
    the exception reaches its proxy). One string argument only: Ray pickles it on the way."""


class ServeCallContext:
    """The grpc.aio ServicerContext methods the servicer uses, over Serve's RayServegRPCContext."""

    def __init__(self, context: Any, replica: UnimpReplica) -> None:
        self._context = context
        self._replica = replica
        self._initial: list[tuple[str, str]] = []

    def invocation_metadata(self) -> tuple[tuple[str, Any], ...]:
        return tuple(self._context.invocation_metadata() or ())

    def time_remaining(self) -> float | None:
        return None  # not forwarded by Serve's proxy (see the module docstring)

    def peer(self) -> str:
        return str(self._context.peer())

    async def send_initial_metadata(self, metadata: Any) -> None:
        self._initial = [(str(k), str(v)) for k, v in metadata]

    def trailing(self, extra: Any = ()) -> None:
        """Set this call's trailing metadata: request id, replica, prefix-cache counters, then ``extra``."""
        self._context.set_trailing_metadata([*self._initial, *self._replica.identity(), *extra])

    async def abort(self, code: grpc.StatusCode, details: str = "", trailing_metadata: Any = ()) -> None:
        self.trailing(trailing_metadata)
        self._context.set_code(code)
        self._context.set_details(details)
        raise _Aborted(details or code.name)


def _reply_types() -> dict[str, type[Message]]:
    out: dict[str, type[Message]] = {}
    for service, module in ((PERSONALIZATION, ppb), (CATALOG, cpb)):
        for method in service.methods:
            out[method.name] = getattr(module, method.output_type.name)
    return out


_REPLIES = _reply_types()
_HISTORY_RPCS: dict[str, Any] = {
    m.name: getattr(ppb, m.input_type.name) for m in PERSONALIZATION.methods
    if m.name not in ("RecordInteraction", "DeleteInteraction", "ForgetUser")
}
"""RPCs that read the stored history of their ``user_id``."""
_METHOD_PATHS = {m.name: f"/{s.full_name}/{m.name}" for s in (PERSONALIZATION, CATALOG) for m in s.methods}


class UnimpReplica:
    """The ingress deployment's class (``runtime.deploy.app`` wraps it with ``serve.deployment``)."""

    def __init__(self, config: ServerConfig, store: Any) -> None:
        from ray import serve

        context = serve.get_replica_context()
        self.replica_id = context.replica_id.unique_id if context is not None else "local"
        self.config = config
        self.metrics = ServerMetrics()
        self.store = RemoteStore(store)
        self.executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=config.max_inflight + config.max_inflight_cheap + 2, thread_name_prefix="unimp-worker")
        self.auth = Authenticator(config.auth)
        self.servicer = Servicer(config, self.metrics, self.store, self.auth, self.executor)  # type: ignore[arg-type]
        if config.artifacts is None:
            raise ValueError("artifacts: required (the directory written by `unimp export`)")
        artifacts = Path(config.artifacts)

        def load() -> Any:
            engine = open_runtime(artifacts, config.limits, config.engine)
            self.store.replay_catalog(engine.catalog)  # blocking handle calls: not on the replica's loop
            return engine

        self.servicer.set_engine(self.executor.submit(load).result())
        self._sync_lock = asyncio.Lock()
        logger.info("replica %s serving %s", self.replica_id, config.artifacts)

    # -- identity and stats --------------------------------------------------------------------------

    def prefix_cache(self) -> tuple[int, int]:
        engine = self.servicer.engine
        stats = engine.stats() if engine is not None else {}
        return int(stats.get("prefix_cache_hits", 0)), int(stats.get("prefix_cache_misses", 0))

    def identity(self) -> list[tuple[str, str]]:
        hits, misses = self.prefix_cache()
        return [(REPLICA_KEY, self.replica_id), (PREFIX_HITS_KEY, str(hits)), (PREFIX_MISSES_KEY, str(misses))]

    def record_routing_stats(self) -> dict[str, Any]:
        """Serve's routing stats of this replica (read by the request router): prefix-cache hit rate."""
        hits, misses = self.prefix_cache()
        return {"prefix_cache_hits": hits, "prefix_cache_misses": misses,
                "prefix_cache_hit_rate": hits / (hits + misses) if hits + misses else 0.0}

    def check_health(self) -> None:
        """Serve's health check: raises unless the engine is serving."""
        if self.servicer.state is not ServingState.SERVING:
            raise RuntimeError(f"replica {self.replica_id} is {self.servicer.state.value}")

    # -- per call ------------------------------------------------------------------------------------

    def _reader(self, rpc: str, raw: bytes, call: ServeCallContext) -> Reader | None:
        """(tenant, user, limit) of the stored history this request will read, if any (best effort: a request
        that fails to parse or authenticate reads nothing and fails in the servicer)."""
        if rpc not in _HISTORY_RPCS:
            return None
        try:
            user_id = _HISTORY_RPCS[rpc].FromString(raw).user_id
            tenant = self.auth.principal(call.invocation_metadata()).tenant
        except Exception:
            return None
        if not user_id or len(user_id) > self.config.limits.max_id_chars:
            return None
        return tenant, user_id, self.config.history_limit

    async def _sync(self, reader: Reader | None = None) -> None:
        """Apply catalog edits and user forgets made through other replicas (see runtime.deploy.store); with
        ``reader``, the same store call prefetches the request's stored history."""
        async with self._sync_lock:
            changes = await self.store.changes(reader)
            if reader is not None and changes.history is not None:
                prefetch(reader, changes.history)
            if not changes.edits and not changes.forgets and changes.epoch == self.store.epoch:
                return
            engine = self.servicer.engine
            if engine is None:
                return

            def apply() -> None:
                with self.servicer._catalog_lock:
                    self.store.apply(changes, engine.catalog, engine.forget_user)

            await asyncio.get_running_loop().run_in_executor(self.executor, apply)

    async def _synced(self, rpc: str, raw: bytes, call: ServeCallContext) -> None:
        """``_sync``, or end the call with UNAVAILABLE when the store cannot be reached."""
        try:
            await self._sync(self._reader(rpc, raw, call))
        except Unavailable as exc:
            status = errors.status_for(exc)
            await call.abort(status.code, status.message)

    def _authorize(self, rpc: str, call: ServeCallContext) -> errors.Status | None:
        method = _METHOD_PATHS[rpc]
        if not self.auth.enabled or method in PUBLIC_METHODS:
            return None
        try:
            self.auth.authorize(self.auth.principal(call.invocation_metadata()), method)
        except (Unauthenticated, PermissionDenied) as exc:
            self.metrics.requests.labels(rpc, errors.status_for(exc).code.name).inc()
            return errors.status_for(exc)
        return None

    async def unary(self, rpc: str, raw: bytes, grpc_context: Any) -> Message:
        call = ServeCallContext(grpc_context, self)
        try:
            refused = self._authorize(rpc, call)
            if refused is not None:
                await call.abort(refused.code, refused.message)
            await self._synced(rpc, raw, call)
            result = await self.servicer.serve_unary(rpc, raw, call)
        except _Aborted:
            return _REPLIES[rpc]()  # the status on Serve's context is what the client gets
        call.trailing()
        return result

    async def stream(self, rpc: str, raw: bytes, grpc_context: Any) -> AsyncIterator[Message]:
        call = ServeCallContext(grpc_context, self)
        refused = self._authorize(rpc, call)
        if refused is not None:
            await call.abort(refused.code, refused.message)  # raises: Serve keeps the code and message
        await self._synced(rpc, raw, call)
        async for message in self.servicer.serve_stream(rpc, raw, call):
            call.trailing()
            yield message

    async def Check(self, raw: bytes, grpc_context: Any) -> health_pb2.HealthCheckResponse:
        """grpc.health.v1 Check through the ingress ('' and the unimp.v1 services)."""
        request = health_pb2.HealthCheckRequest.FromString(raw)
        known = ("", PERSONALIZATION.full_name, CATALOG.full_name)
        if request.service not in known:
            grpc_context.set_code(grpc.StatusCode.NOT_FOUND)
            grpc_context.set_details(f"service: unknown service {request.service!r}")
            return health_pb2.HealthCheckResponse()
        serving = self.servicer.state is ServingState.SERVING
        return health_pb2.HealthCheckResponse(
            status=health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING)

    def __del__(self) -> None:
        engine = getattr(getattr(self, "servicer", None), "engine", None)
        if engine is not None and self.servicer.inflight == 0:
            try:
                engine.close()
            except Exception:
                pass


def _add_rpc_methods() -> None:
    """One method per RPC, named like it (Serve's proxy calls the deployment method of the RPC's name)."""
    for service in (PERSONALIZATION, CATALOG):
        for method in service.methods:
            name = method.name
            if method.server_streaming:
                async def stream_rpc(self: UnimpReplica, request: bytes, grpc_context: Any,
                                     _rpc: str = name) -> AsyncIterator[Message]:
                    async for message in self.stream(_rpc, request, grpc_context):
                        yield message
                stream_rpc.__name__ = stream_rpc.__qualname__ = name
                setattr(UnimpReplica, name, stream_rpc)
            else:
                async def unary_rpc(self: UnimpReplica, request: bytes, grpc_context: Any,
                                    _rpc: str = name) -> Message:
                    return await self.unary(_rpc, request, grpc_context)
                unary_rpc.__name__ = unary_rpc.__qualname__ = name
                setattr(UnimpReplica, name, unary_rpc)


_add_rpc_methods()
