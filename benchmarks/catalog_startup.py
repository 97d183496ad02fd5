"""Time to SERVING and Recommend latency with the catalog stores cold, or precomputed.

Usage (one scenario per process, so that every start is a real cold start of the code under test)::

    PYTHONPATH=<code root> python benchmarks/catalog_startup.py ART [--empty-cache] [--requests N] [--threads N]

Serves ``ART`` (a shadow of symlinks with copies of its caches keeps ART untouched; ``.ort-cache``, the
optimised graphs, is copied in every scenario) through the in-process
gRPC server, records seconds from server creation to health SERVING, then Recommend latency over gRPC
(3 catalog history items, top_k 10, fast mode): ``miss`` requests use a history no earlier request used
(prefix-cache miss), ``hit`` repeats the first history (prefix-cache hit). With a background encoder
(this branch) it measures once right after SERVING (``during_fill``) and once its pending count is 0
(``steady``); code without one encodes the catalog before SERVING, so only ``steady`` applies. Prints
one JSON object. Only the public server API is used, so the script runs against older code too.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def _shadow(art: Path, into: Path, keep_cache: bool) -> Path:
    into.mkdir(parents=True)
    for entry in art.iterdir():
        if entry.name in (".cache", ".ort-cache"):
            continue
        (into / entry.name).symlink_to(entry.resolve(), target_is_directory=entry.is_dir())
    if (art / ".ort-cache").is_dir():  # optimised graphs: the same for every scenario
        shutil.copytree(art / ".ort-cache", into / ".ort-cache")
    if keep_cache and (art / ".cache").is_dir():  # the catalog stores
        shutil.copytree(art / ".cache", into / ".cache")
    return into


def _pending(server: Any) -> float:
    m = server.server.metrics
    return sum(m.value("unimp_catalog_items_pending", {"store": s}) for s in ("latents", "media_kv", "vqgan_codes"))


def _latency(client: Any, histories: list[list[str]]) -> list[float]:
    out = []
    for history in histories:
        t0 = time.perf_counter()
        client.recommend(history, top_k=10)
        out.append(time.perf_counter() - t0)
    return out


def _ms(values: list[float]) -> float:
    return round(1000 * statistics.median(values), 2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("artifacts", type=Path)
    parser.add_argument("--empty-cache", action="store_true", help="start without ART/.cache (a fresh export)")
    parser.add_argument("--requests", type=int, default=10, help="requests per measurement")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads")
    args = parser.parse_args(argv)

    from runtime.client import UnimpClient
    from runtime.server.app import ServerThread
    from runtime.server.config import ServerConfig

    work = Path(tempfile.mkdtemp(prefix="unimp-catalog-startup-"))
    try:
        root = _shadow(args.artifacts, work / "art", keep_cache=not args.empty_cache)
        config = ServerConfig(port=0, state_dir=work / "state", artifacts=root)
        config.metrics.port = 0
        config.log.level = "WARNING"
        config.engine.intra_op_threads = args.threads
        n = args.requests
        # 3 items per history: histories 1.. are fresh (misses), history 0 repeats (hits)
        fresh = iter([[f"P{3 * k:05d}", f"P{3 * k + 1:05d}", f"P{3 * k + 2:05d}"] for k in range(1, 60)])
        result: dict[str, Any] = {"artifacts": str(args.artifacts), "empty_cache": args.empty_cache,
                                  "threads": args.threads, "requests": n}
        t0 = time.perf_counter()
        with ServerThread(config) as server, UnimpClient(server.target, timeout=600) as client:
            while client.health() != "SERVING":
                time.sleep(0.01)
            result["to_serving_s"] = round(time.perf_counter() - t0, 3)
            result["pending_at_serving"] = _pending(server)
            hit = ["P00000", "P00001", "P00002"]
            if result["pending_at_serving"]:
                misses = _latency(client, [next(fresh) for _ in range(n)])
                hits = _latency(client, [hit] * (n + 1))[1:]
                result["during_fill"] = {"miss_ms": _ms(misses), "hit_ms": _ms(hits),
                                         "pending_after": _pending(server)}
                while _pending(server):
                    time.sleep(0.05)
                result["fill_done_s"] = round(time.perf_counter() - t0, 3)
            misses = _latency(client, [next(fresh) for _ in range(n)])
            hits = _latency(client, [hit] * (n + 1))[1:]
            result["steady"] = {"miss_ms": _ms(misses), "hit_ms": _ms(hits)}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
