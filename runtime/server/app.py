"""Assembles the gRPC server: services, health, reflection, auth, TLS, metrics, store, lifecycle.

``create_server(config)`` opens ``runtime.engine.Runtime`` from ``config.artifacts``; tests and
embedders pass ``engine=`` (an object implementing ``runtime.api.Engine``) or ``engine_factory=``.

Lifecycle: ``start()`` binds nothing new (the port is bound by ``create_server``) but starts serving
with health NOT_SERVING, loads the engine in a worker thread, replays persisted catalog edits into
it, then flips health to SERVING. ``stop(grace)`` flips health to NOT_SERVING, refuses new RPCs with
UNAVAILABLE, lets in-flight RPCs finish for ``grace`` seconds, cancels the rest (their CancelTokens
are set), waits for their engine calls to stop, then closes the engine (if this server opened it, and
never while a call still runs in it) and the store.

Call ``create_server`` from a coroutine running on the event loop that will serve (grpc.aio binds
the server to it); ``ServerThread`` does that on a background thread for synchronous code.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from PIL import Image

from runtime.api import Engine
from runtime.limits import Limits
from runtime.server.auth import Authenticator, AuthInterceptor, check_bind_security
from runtime.server.config import ConfigError, EngineConfig, ServerConfig
from runtime.server.metrics import ServerMetrics
from runtime.server.servicer import CATALOG, PERSONALIZATION, Servicer, ServingState
from runtime.server.store import StateStore
from runtime.server.tls import server_credentials

if TYPE_CHECKING:
    from runtime.backends import BackendConfig

logger = logging.getLogger(__name__)

_CANCEL_WAIT_S = 5.0
"""Extra seconds stop() waits, after grace, for cancelled engine calls to reach a step boundary."""

SERVICE_NAMES = (PERSONALIZATION.full_name, CATALOG.full_name)
"""Services whose health follows the engine ("" is the whole server)."""


def backend_config(settings: EngineConfig) -> BackendConfig:
    """The ``[engine]`` settings that say how graphs run."""
    from runtime.backends import BackendConfig

    e = settings
    return BackendConfig(provider=e.provider, intra_op_threads=e.intra_op_threads, device_id=e.device_id,
                         trt_cache_dir=e.trt_cache_dir, trt_workspace_gb=e.trt_workspace_gb, fp16=e.fp16,
                         cuda_graph=e.cuda_graph)


def check_provider(settings: EngineConfig, artifacts: Path | None = None) -> None:
    """Refuse, before the port opens, an ``engine.provider`` this machine cannot run (the message names the
    missing package, library or device) or a GPU setting it cannot honour. Raises ConfigError. With
    ``artifacts`` whose manifest lists native TensorRT engines for every graph, TensorRT and a CUDA device
    are checked instead of onnxruntime's providers."""
    from runtime.backends.factory import require_backend, uses_native_engines
    from runtime.backends.ort import require_provider
    from runtime.backends.providers import ProviderSettingsError
    from runtime.manifest import ManifestError, load_manifest
    from runtime.types import Unavailable

    manifest = None
    if artifacts is not None and settings.provider == "tensorrt":
        try:
            manifest = load_manifest(artifacts, verify=False)
        except ManifestError:
            manifest = None  # reported when the engine loads
    try:
        if uses_native_engines(backend_config(settings), manifest):
            require_backend(backend_config(settings), manifest)
            logger.info("provider tensorrt: native TensorRT engines for every graph")
            return
        facts = require_provider(backend_config(settings))
    except ProviderSettingsError as exc:
        raise ConfigError(f"engine.{exc}") from exc
    except Unavailable as exc:
        raise ConfigError(f"engine.provider: {exc}") from exc
    if facts is not None:
        logger.info("provider %s on GPU %d: %s (compute capability %d.%d)%s", settings.provider, settings.device_id,
                    facts.gpu_name, *facts.compute_capability,
                    f", TensorRT {facts.tensorrt_version}" if facts.tensorrt_version else "")


def open_runtime(artifacts: Path, limits: Limits | None = None, settings: EngineConfig | None = None) -> Engine:
    """Open the real engine on an artifacts directory with the server's limits and ``[engine]`` settings."""
    from runtime.engine import Runtime, RuntimeConfig, SettingsError

    e = settings or EngineConfig()
    config = RuntimeConfig(
        backend=backend_config(e),
        max_active=e.max_active, max_queued=e.max_queued, prefix_cache_bytes=e.prefix_cache_bytes,
        max_context=e.max_context, kv_pool_bytes=e.kv_pool_bytes, limits=limits or Limits(),
    )
    try:
        engine: Engine = Runtime.open(artifacts, config)
    except SettingsError as exc:
        raise ConfigError(f"engine.{exc}") from exc
    return engine


class UnimpServer:
    """A bound grpc.aio server plus everything that lives and dies with it."""

    def __init__(
        self,
        config: ServerConfig,
        engine: Engine | None,
        engine_factory: Callable[[], Engine] | None,
    ) -> None:
        self.config = config
        self._engine = engine
        self._engine_factory = engine_factory
        self._owns_engine = engine is None
        self.metrics = ServerMetrics()
        self.store = StateStore(config.state_dir)
        self.executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=config.max_inflight + config.max_inflight_cheap + 2, thread_name_prefix="unimp-worker"
        )
        authenticator = Authenticator(config.auth)
        self.servicer = Servicer(config, self.metrics, self.store, authenticator, self.executor)
        self.health = health.aio.HealthServicer()
        options = [
            ("grpc.max_receive_message_length", config.limits.max_message_bytes),
            ("grpc.max_send_message_length", config.limits.max_message_bytes),
            ("grpc.so_reuseport", 0),
        ]
        self.grpc = grpc.aio.server(
            interceptors=[AuthInterceptor(authenticator, self._count_auth_rejection)], options=options
        )
        self.grpc.add_generic_rpc_handlers(tuple(self.servicer.generic_handlers()))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        if config.reflection:
            reflection.enable_server_reflection(
                (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), self.grpc
            )
        self.port = 0
        self.metrics_port: int | None = None
        self.loaded: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        """Resolves to True once the engine serves, False if it failed to load."""
        self._load_task: asyncio.Task[None] | None = None
        self._stopped = asyncio.Event()

    def _count_auth_rejection(self, method: str, code: grpc.StatusCode) -> None:
        rpc = method.rsplit("/", 1)[-1]
        self.metrics.requests.labels(rpc, code.name).inc()

    def bind(self) -> int:
        host = self.config.host
        address = f"[{host}]:{self.config.port}" if ":" in host and not host.startswith("[") else f"{host}:{self.config.port}"
        credentials = server_credentials(self.config.tls)
        try:
            if credentials is None:
                self.port = self.grpc.add_insecure_port(address)
            else:
                self.port = self.grpc.add_secure_port(address, credentials)
        except RuntimeError as exc:
            raise ConfigError(f"port: cannot bind {address} ({exc}); is the port in use?") from exc
        if self.port == 0:
            raise ConfigError(f"port: cannot bind {address}; is the port in use?")
        return self.port

    async def _set_health(self, status: int) -> None:
        for name in ("", *SERVICE_NAMES):
            await self.health.set(name, status)

    async def start(self) -> None:
        """Start serving (health NOT_SERVING), the metrics endpoint, and the engine load."""
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.grpc.start()
        if self.config.metrics.enabled:
            self.metrics_port = self.metrics.start_http(self.config.metrics.host, self.config.metrics.port)
        tls = "mutual TLS" if self.config.tls.client_ca else ("TLS" if self.config.tls.enabled else "plaintext")
        logger.info("listening on %s:%d (%s, auth %s)", self.config.host, self.port, tls,
                    "on" if self.config.auth.enabled else "off")
        self._load_task = asyncio.create_task(self._load())

    def _load_blocking(self) -> Engine:
        engine = self._engine
        if engine is None:
            if self._engine_factory is None:
                raise ConfigError("artifacts: no engine and no artifacts directory to open one from")
            engine = self._engine_factory()
        self.store.replay_catalog(engine.catalog)
        return engine

    async def _load(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            engine = await loop.run_in_executor(self.executor, self._load_blocking)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.servicer.state = ServingState.FAILED
            self.servicer.load_error = str(exc) or type(exc).__name__
            logger.error("the engine failed to load", exc_info=exc)
            if not self.loaded.done():
                self.loaded.set_result(False)
            return
        self._engine = engine
        self.servicer.set_engine(engine)
        if self.servicer.state is ServingState.SERVING:
            await self._set_health(health_pb2.HealthCheckResponse.SERVING)
            logger.info("engine loaded; serving")
        if not self.loaded.done():
            self.loaded.set_result(True)

    async def stop(self, grace: float | None = None) -> None:
        """Graceful shutdown: in-flight RPCs get ``grace`` seconds (config.shutdown_grace_s if None)."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        grace = self.config.shutdown_grace_s if grace is None else grace
        self.servicer.state = ServingState.DRAINING
        await self.health.enter_graceful_shutdown()
        logger.info("shutting down: %d request(s) in flight, grace %.1fs", self.servicer.inflight, grace)
        await self.grpc.stop(grace)
        if self._load_task is not None and not self._load_task.done():
            self._load_task.cancel()
        idle = await self.servicer.wait_idle(timeout=max(grace, 1.0) + _CANCEL_WAIT_S)
        if not idle:
            logger.warning("%d engine call(s) still running after cancellation; leaving the engine open",
                           self.servicer.inflight)
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.metrics.stop_http()
        if idle and self._owns_engine and self._engine is not None:  # never close it under a running call
            await asyncio.get_running_loop().run_in_executor(None, self._engine.close)
        self.store.close()
        if not self.loaded.done():
            self.loaded.set_result(False)
        logger.info("stopped")

    async def wait_for_termination(self) -> None:
        await self.grpc.wait_for_termination()


def create_server(
    config: ServerConfig,
    engine: Engine | None = None,
    *,
    engine_factory: Callable[[], Engine] | None = None,
) -> tuple[UnimpServer, int]:
    """Build and bind the server; returns it and the bound port. Call ``await server.start()`` next.

    With neither ``engine`` nor ``engine_factory``, opens ``runtime.engine.Runtime`` from
    ``config.artifacts`` in a worker thread after start (health is NOT_SERVING until it is loaded).
    A passed ``engine`` is not closed by ``stop()``; one the server opened is.
    Raises ConfigError for invalid or insecure configurations.
    """
    config.validate()
    check_bind_security(config)
    if engine is None and engine_factory is None:
        if config.artifacts is None:
            raise ConfigError("artifacts: required (the directory written by `unimp export`)")
        if not Path(config.artifacts).is_dir():
            raise ConfigError(f"artifacts: {config.artifacts} is not a directory")
        artifacts = Path(config.artifacts)
        check_provider(config.engine, artifacts)

        def engine_factory() -> Engine:
            return open_runtime(artifacts, config.limits, config.engine)

    Image.MAX_IMAGE_PIXELS = config.limits.max_image_pixels
    server = UnimpServer(config, engine, engine_factory)
    try:
        port = server.bind()
    except BaseException:
        server.store.close()
        server.executor.shutdown(wait=False)
        raise
    return server, port


class ServerThread:
    """Runs a server on its own event loop in a background thread (for synchronous callers and tests)."""

    def __init__(
        self,
        config: ServerConfig,
        engine: Engine | None = None,
        *,
        engine_factory: Callable[[], Engine] | None = None,
        wait_loaded: bool = True,
    ) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="unimp-server", daemon=True)
        self._thread.start()
        try:
            self.server, self.port = self.run(self._create(config, engine, engine_factory))
            if wait_loaded:
                self.run(asyncio.wait_for(asyncio.shield(self.server.loaded), 60))
        except BaseException:
            self._close_loop()
            raise

    async def _create(
        self, config: ServerConfig, engine: Engine | None, engine_factory: Callable[[], Engine] | None
    ) -> tuple[UnimpServer, int]:
        server, port = create_server(config, engine, engine_factory=engine_factory)
        await server.start()
        return server, port

    def run(self, coro: Any, timeout: float | None = 60) -> Any:
        """Run a coroutine on the server's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self, grace: float = 1.0) -> None:
        try:
            self.run(self.server.stop(grace), timeout=grace + 30)
        finally:
            self._close_loop()

    def _close_loop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        if not self._thread.is_alive():
            self.loop.close()

    def __enter__(self) -> ServerThread:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
