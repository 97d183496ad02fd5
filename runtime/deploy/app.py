"""The Serve application of ``unimp serve --engine ray`` and of the Serve config file.

Two deployments in one application (``APP_NAME``):

- ``UnimpStore`` (one replica, ``num_cpus=0``): the single writer of the interaction store and the
  catalog edit journal (``runtime.deploy.store``);
- ``Unimp`` (the gRPC ingress; N replicas or autoscaled): ``runtime.deploy.replica.UnimpReplica``,
  routed by ``runtime.deploy.router.UserAffinityRouter``.

``build_app`` is the Python entry; ``app_builder`` is the import path a Serve config file
(``deploy/serve.yaml``: ``serve run``, KubeRay ``RayService``) names; ``run_cluster`` starts a
local Ray + Serve and blocks (the CLI).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runtime.server.config import ConfigError, ServerConfig, load_config

from .ingress import SERVICER_FUNCTION

logger = logging.getLogger(__name__)

APP_NAME = "unimp"
INGRESS = "Unimp"
STORE = "UnimpStore"
ROUTER = "runtime.deploy.router:UserAffinityRouter"
HTTP_PORT = 8000
"""Serve always starts its HTTP proxy too; ``run_cluster`` binds it to 127.0.0.1 (unused by unimp)."""


@dataclass(frozen=True)
class ClusterOptions:
    """How the application is scaled and routed."""

    replicas: int = 1
    autoscale: tuple[int, int] | None = None
    """(min, max) replicas; replaces ``replicas``."""
    replica_cpus: float = 0.0
    """Ray CPUs each replica reserves (0: do not reserve; the engine's own threads do the work)."""
    affinity: bool = True
    """Route by user affinity (False: Serve's default power-of-two-choices router)."""
    request_timeout_s: float | None = None

    def validate(self) -> None:
        if self.replicas < 1:
            raise ConfigError(f"replicas: must be >= 1, got {self.replicas}")
        if self.autoscale is not None:
            low, high = self.autoscale
            if low < 0 or high < 1 or low > high:
                raise ConfigError(f"autoscale: expected MIN:MAX with 0 <= MIN <= MAX and MAX >= 1, got {low}:{high}")
        if self.replica_cpus < 0:
            raise ConfigError(f"replica_cpus: must be >= 0, got {self.replica_cpus}")


def parse_autoscale(text: str) -> tuple[int, int]:
    """``"MIN:MAX"`` -> (min, max); raises ConfigError naming ``autoscale``."""
    low, sep, high = text.partition(":")
    try:
        if not sep:
            raise ValueError
        return int(low), int(high)
    except ValueError:
        raise ConfigError(f"autoscale: expected MIN:MAX (e.g. 1:4), got {text!r}") from None


def check_exposure(config: ServerConfig) -> None:
    """Serve's gRPC proxy listens on every interface ([::]:PORT) in plaintext: refuse unless acknowledged."""
    if config.tls.enabled:
        raise ConfigError("tls: Ray Serve's gRPC proxy cannot terminate TLS; terminate it in front of the proxy "
                          "(load balancer, ingress, service mesh) and drop tls.cert / tls.key")
    if not config.insecure:
        raise ConfigError(
            "insecure: Ray Serve's gRPC proxy binds all interfaces ([::]:PORT) in plaintext; put it behind a "
            "firewall and TLS termination (see the README's deployment section), configure tokens, and set "
            "insecure = true (--insecure) to acknowledge")
    if not config.auth.enabled:
        logger.warning("Serve's gRPC proxy listens on all interfaces without authentication")


def build_app(config: ServerConfig, options: ClusterOptions | None = None) -> Any:
    """The Serve application (call ``serve.run`` on it)."""
    from ray import serve
    from ray.serve.config import RequestRouterConfig

    from .replica import UnimpReplica
    from .store import StoreService

    options = options or ClusterOptions()
    options.validate()
    config.validate()
    deployment: Any = serve.deployment
    store = deployment(
        StoreService, name=STORE, num_replicas=1, ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=max(64, 4 * (config.max_inflight + config.max_inflight_cheap)),
    ).bind(str(Path(config.state_dir).resolve()))
    settings = ingress_settings(config, options)
    if "request_router_config" in settings:
        settings["request_router_config"] = RequestRouterConfig(**settings["request_router_config"])
    return deployment(UnimpReplica, **settings).bind(config, store)


def ingress_settings(config: ServerConfig, options: ClusterOptions) -> dict[str, Any]:
    """``serve.deployment`` options of the ingress deployment (the router config as a plain dict)."""
    settings: dict[str, Any] = {
        "name": INGRESS,
        "ray_actor_options": {"num_cpus": options.replica_cpus},
        "max_ongoing_requests": config.max_inflight + config.max_inflight_cheap,
        "graceful_shutdown_timeout_s": config.shutdown_grace_s,
        "health_check_period_s": 2.0,
        "health_check_timeout_s": 30.0,
    }
    if options.autoscale is not None:
        low, high = options.autoscale
        settings["autoscaling_config"] = {"min_replicas": low, "max_replicas": high,
                                          "target_ongoing_requests": max(1, config.max_inflight)}
    else:
        settings["num_replicas"] = options.replicas
    if options.affinity:
        settings["request_router_config"] = {"request_router_class": ROUTER, "request_routing_stats_period_s": 2.0}
    return settings


def grpc_options(port: int, request_timeout_s: float | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"port": port, "grpc_servicer_functions": [SERVICER_FUNCTION]}
    if request_timeout_s is not None:
        out["request_timeout_s"] = request_timeout_s
    return out


def app_builder(args: dict[str, Any]) -> Any:
    """Serve config entry (``import_path: runtime.deploy.app:app_builder``). ``args``: ``config`` (a unimp
    TOML file), ``overrides`` (dotted config keys), ``replicas``, ``autoscale`` ("MIN:MAX"),
    ``replica_cpus``, ``affinity``."""
    overrides = dict(args.get("overrides") or {})
    config = load_config(Path(args["config"]) if args.get("config") else None, overrides)
    autoscale = args.get("autoscale")
    options = ClusterOptions(
        replicas=int(args.get("replicas", 1)),
        autoscale=parse_autoscale(str(autoscale)) if autoscale else None,
        replica_cpus=float(args.get("replica_cpus", 0.0)),
        affinity=bool(args.get("affinity", True)),
    )
    return build_app(config, options)


def start_cluster(config: ServerConfig, options: ClusterOptions, *, temp_dir: Path | None = None,
                  http_port: int = HTTP_PORT, num_cpus: int | None = None) -> None:
    """Start a local Ray (loopback) and Serve with the gRPC ingress on ``config.port``; deploy the app."""
    from ray import serve

    check_exposure(config)
    options.validate()
    init: dict[str, Any] = {"_node_ip_address": "127.0.0.1", "include_dashboard": False,
                            "logging_level": logging.WARNING, "log_to_driver": False}
    if temp_dir is not None:
        init["_temp_dir"] = str(temp_dir)
    if num_cpus is not None:
        init["num_cpus"] = num_cpus
    os.environ.setdefault("RAY_SERVE_PROXY_USE_GRPC", "1")
    _init_ray(init, temp_dir)
    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": http_port},
                grpc_options=grpc_options(config.port, options.request_timeout_s))
    deploy_app(config, options)


def deploy_app(config: ServerConfig, options: ClusterOptions, name: str = APP_NAME) -> None:
    """Deploy (or update) the application on the running Serve instance.

    Serve's proxies keep the request router they built for a deployment (per application and deployment
    name) across redeploys: to switch routers, delete the application and deploy it under another name.
    """
    from ray import serve

    serve.run(build_app(config, options), name=name, route_prefix=f"/{name}", blocking=False)


RAY_START_ATTEMPTS = 3
"""Ray waits a fixed time for its raylet to register and for the GCS to write its port; on a loaded
machine either can pass. With a private
temp dir the half-started processes are identified and ended, and the start is tried again."""


def _init_ray(init: dict[str, Any], temp_dir: Path | None) -> None:
    import ray

    from .sandbox import processes_mentioning

    attempts = RAY_START_ATTEMPTS if temp_dir is not None else 1
    for attempt in range(1, attempts + 1):
        try:
            ray.init(**init)
            return
        except Exception as exc:
            # "... timed out during startup" (raylet) or "Timed out waiting for file .../gcs_server_port_..."
            if attempt == attempts or "timed out" not in str(exc).lower():
                raise
            logger.warning("Ray did not start (attempt %d of %d): %s; retrying", attempt, attempts, exc)
            try:
                ray.shutdown()
            except Exception:
                pass
            for pid in processes_mentioning(f"{temp_dir}/"):  # only processes of this private temp dir
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(1.0)


def stop_cluster() -> None:
    import ray
    from ray import serve

    try:
        serve.shutdown()
    finally:
        ray.shutdown()


def run_cluster(config: ServerConfig, options: ClusterOptions) -> int:
    """``unimp serve --engine ray``: serve until SIGTERM/SIGINT, then stop Serve and Ray."""
    start_cluster(config, options)
    logger.info("Ray Serve gRPC ingress on [::]:%d: %s, affinity routing %s", config.port,
                f"autoscaling {options.autoscale[0]}..{options.autoscale[1]} replicas" if options.autoscale
                else f"{options.replicas} replica(s)", "on" if options.affinity else "off")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    logger.info("signal received: stopping Serve and Ray")
    stop_cluster()
    return 0
