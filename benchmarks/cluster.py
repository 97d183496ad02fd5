"""``unimp bench --sections cluster``: Ray Serve scale-out on loopback.

The section re-runs this module in a private network namespace (Serve's gRPC proxy binds all
interfaces; ``runtime.deploy.sandbox``), with HOME, TMPDIR and Ray's temp dir under ``<out>/cluster``,
and reads back one JSON object. Inside, one Ray cluster measures on the same **trace of returning
shoppers** (``USERS`` users with stored histories, each coming back ``VISITS`` times for a Recommend by
``user_id``, visits interleaved in a seeded order):

- ``unimp serve`` in-process: sequential Recommend latency (the per-call baseline);
- the Serve ingress with 1 replica and with 2 replicas (affinity router): sequential latency (Serve's
  per-call overhead = its p50 minus unimp serve's), then the trace at ``CONCURRENCY`` clients:
  throughput and p50 / p99;
- 2 replicas with Serve's default power-of-two-choices router on the same trace.

Each configuration is a new application (a new name: Serve's proxy keeps a deployment's router across
redeploys), so its replicas start with empty prefix caches.

Prefix-cache hit rates are the replicas' own counters (``unimp-prefix-cache-hits`` / ``-misses`` trailing
metadata, the last value seen per replica), each configuration starting from freshly started replicas.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

USERS = 12
VISITS = 4
CONCURRENCY = 4
TOKEN = "bench-token"


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


def run(ctx: Any) -> dict[str, Any]:
    """The section: runs ``_main`` in a private network namespace and returns its JSON."""
    import importlib.util

    if importlib.util.find_spec("ray") is None:
        return {"skipped": "Ray Serve is not installed (pip install 'unimp-edge[ray]')"}
    from runtime.deploy.sandbox import SandboxError, netns_command, private_env

    workdir = (Path(ctx.out) / "cluster").resolve()
    if workdir.exists():
        import shutil

        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    argv = [sys.executable, "-m", "benchmarks.cluster", "--artifacts", str(Path(ctx.artifacts).resolve()),
            "--workdir", str(workdir)]
    if ctx.quick:
        argv.append("--quick")
    try:
        command = netns_command(argv)
    except SandboxError as exc:
        return {"skipped": str(exc)}
    env = private_env(workdir)
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=root, timeout=1800)
    lines = [line for line in done.stdout.splitlines() if line.startswith("UNIMP-CLUSTER ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"cluster benchmark failed ({done.returncode}): {done.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(lines[-1][len("UNIMP-CLUSTER "):])
    affinity, default = result["runs"]["2_replicas_affinity"], result["runs"]["2_replicas_default_router"]
    result["targets"] = [{
        "name": "prefix-cache hit rate, affinity router minus Serve's default router (2 replicas)",
        "value": round(affinity["prefix_cache_hit_rate"] - default["prefix_cache_hit_rate"], 4),
        "target": "> 0", "met": affinity["prefix_cache_hit_rate"] > default["prefix_cache_hit_rate"],
        "note": f"{USERS} shoppers x {VISITS} visits",
    }]
    return result


# -- inside the namespace -------------------------------------------------------------------------------


class Meter:
    """Per-replica prefix-cache counters seen in trailing metadata."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.counters: dict[str, tuple[int, int]] = {}
        self.replicas: dict[str, int] = {}
        self.users: dict[str, set[str]] = {}

    def note(self, trailing: Any, user: str = "") -> None:
        data = dict(trailing or ())
        replica = data.get("unimp-replica")
        if not replica:
            return
        hits, misses = int(data.get("unimp-prefix-cache-hits", 0)), int(data.get("unimp-prefix-cache-misses", 0))
        with self.lock:
            old = self.counters.get(replica, (0, 0))
            self.counters[replica] = (max(old[0], hits), max(old[1], misses))
            self.replicas[replica] = self.replicas.get(replica, 0) + 1
            if user:
                self.users.setdefault(user, set()).add(replica)

    def hit_rate(self) -> float:
        hits = sum(h for h, _ in self.counters.values())
        total = hits + sum(m for _, m in self.counters.values())
        return hits / total if total else 0.0


def _recommend(channel: Any, user: str, meter: Meter | None) -> float:
    from runtime.server.protos import personalization_pb2 as ppb

    request = ppb.RecommendRequest(user_id=user, options=ppb.DecodeOptions(top_k=5)).SerializeToString()
    started = time.perf_counter()
    _, call = channel.unary_unary("/unimp.v1.Personalization/Recommend").with_call(
        request, metadata=(("authorization", f"Bearer {TOKEN}"),), timeout=60)
    elapsed = time.perf_counter() - started
    if meter is not None:
        meter.note(call.trailing_metadata(), user)
    return elapsed


def _health(channel: Any, n: int) -> dict[str, float]:
    """Sequential grpc.health.v1 Check latency (no model, no store: the transport's own cost)."""
    from grpc_health.v1 import health_pb2

    request = health_pb2.HealthCheckRequest().SerializeToString()
    check = channel.unary_unary("/grpc.health.v1.Health/Check")
    times = []
    for _ in range(n):
        started = time.perf_counter()
        check(request, timeout=30)
        times.append(time.perf_counter() - started)
    return {"p50_ms": round(1e3 * _pct(times, 0.5), 2), "p99_ms": round(1e3 * _pct(times, 0.99), 2), "calls": n}


def _sequential(channel: Any, users: list[str], n: int) -> dict[str, float]:
    times = [_recommend(channel, users[i % len(users)], None) for i in range(n)]
    return {"p50_ms": round(1e3 * _pct(times, 0.5), 2), "p99_ms": round(1e3 * _pct(times, 0.99), 2), "calls": n}


def _trace(channel: Any, trace: list[str], meter: Meter) -> dict[str, Any]:
    times: list[float] = []
    started = time.perf_counter()
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        for elapsed in pool.map(lambda u: _recommend(channel, u, meter), trace):
            times.append(elapsed)
    wall = time.perf_counter() - started
    return {"requests": len(trace), "concurrency": CONCURRENCY, "throughput_rps": round(len(trace) / wall, 2),
            "p50_ms": round(1e3 * _pct(times, 0.5), 2), "p99_ms": round(1e3 * _pct(times, 0.99), 2),
            "prefix_cache_hit_rate": round(meter.hit_rate(), 4),
            "users_on_several_replicas": sum(1 for r in meter.users.values() if len(r) > 1),
            "prefix_cache_per_replica": {r: {"hits": h, "misses": m, "requests": meter.replicas.get(r, 0)}
                                         for r, (h, m) in sorted(meter.counters.items())}}


def _record_histories(channel: Any, users: list[str], item_count: int) -> None:
    from runtime.server.protos import personalization_pb2 as ppb

    for u, user in enumerate(users):
        for k in range(4):
            request = ppb.RecordInteractionRequest(user_id=user, item=ppb.HistoryItem(
                item_id=f"P{(u * 37 + k * 11) % item_count:05d}", rating=1 + (u + k) % 5))
            channel.unary_unary("/unimp.v1.Personalization/RecordInteraction")(
                request.SerializeToString(), metadata=(("authorization", f"Bearer {TOKEN}"),), timeout=60)


def _main() -> int:
    import grpc

    parser = argparse.ArgumentParser()
    parser.add_argument("--artifacts", type=Path, required=True)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()

    from runtime.deploy import app as deploy
    from runtime.deploy.sandbox import free_port, ray_temp_dir, wait_serving
    from runtime.server.app import ServerThread
    from runtime.server.config import AuthConfig, MetricsConfig, ServerConfig

    manifest = json.loads((args.artifacts / "manifest.json").read_text())
    item_count = int(manifest["tokens"]["item_count"])
    users = [f"shopper-{i}" for i in range(USERS)]
    trace = [u for _ in range(VISITS) for u in users]
    random.Random(0).shuffle(trace)
    sequential_calls = 20 if args.quick else 60
    port = free_port()

    def config(state: str, port: int, insecure: bool) -> ServerConfig:
        return ServerConfig(artifacts=args.artifacts, host="127.0.0.1", port=port, insecure=insecure,
                            state_dir=args.workdir / state, auth=AuthConfig(tokens={"bench": TOKEN}),
                            metrics=MetricsConfig(enabled=False))

    result: dict[str, Any] = {"users": USERS, "visits": VISITS, "trace_requests": len(trace),
                              "concurrency": CONCURRENCY, "runs": {}}
    local = ServerThread(config("local", 0, insecure=False))
    try:
        channel = grpc.insecure_channel(local.target)
        _record_histories(channel, users, item_count)
        _sequential(channel, users, 5)  # warm-up
        result["unimp_serve"] = _sequential(channel, users, sequential_calls)
        _health(channel, 5)
        result["unimp_serve_health_check"] = _health(channel, sequential_calls)
        channel.close()
    finally:
        local.stop()

    from ray import serve

    cluster_config = config("ray", port, insecure=True)
    runs: list[tuple[str, Callable[[], Any]]] = [
        ("1_replica", lambda: deploy.ClusterOptions(replicas=1)),
        ("2_replicas_affinity", lambda: deploy.ClusterOptions(replicas=2)),
        ("2_replicas_default_router", lambda: deploy.ClusterOptions(replicas=2, affinity=False)),
    ]
    t0 = time.perf_counter()
    first_options = runs[0][1]
    deploy.start_cluster(cluster_config, first_options(), temp_dir=ray_temp_dir(args.workdir),
                         http_port=free_port(), num_cpus=2)
    result["cluster_start_s"] = round(time.perf_counter() - t0, 2)
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        wait_serving(channel, 120)
        _record_histories(channel, users, item_count)
        previous = deploy.APP_NAME
        for i, (name, options) in enumerate(runs):
            if i > 0:  # a fresh application under a new name: new replicas, empty caches, its own router
                serve.delete(previous)
                previous = f"{deploy.APP_NAME}-{i}"
                deploy.deploy_app(cluster_config, options(), previous)
                wait_serving(channel, 120)
            record = _trace(channel, trace, Meter())
            if name != "2_replicas_default_router":
                _sequential(channel, users, 5)
                record["sequential"] = _sequential(channel, users, sequential_calls)
                record["overhead_vs_unimp_serve_p50_ms"] = round(
                    record["sequential"]["p50_ms"] - result["unimp_serve"]["p50_ms"], 2)
                _health(channel, 5)
                record["health_check"] = _health(channel, sequential_calls)
                record["health_check_overhead_p50_ms"] = round(
                    record["health_check"]["p50_ms"] - result["unimp_serve_health_check"]["p50_ms"], 2)
            result["runs"][name] = record
        channel.close()
    finally:
        deploy.stop_cluster()
    sys.stdout.write("UNIMP-CLUSTER " + json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(_main())
