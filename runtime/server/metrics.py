"""Prometheus metrics, served over HTTP on their own port.

Per RPC: request counts by status code, latency, time to first token and decode speed (from the
engine's Timings, or measured on the Explain stream), cancellations by reason (client, deadline) and
rejections by reason (overload: model slots full, overload_cheap: cheap-RPC slots full, cost: decode
budget full, loading, failed, shutdown); requests and decode budget in flight. Engine state (queue depth, KV cache and prefix
cache bytes, prefix-cache hits, misses and hit ratio; catalog images encoded and pending per store) is
read from ``engine.stats()`` at scrape time, and the execution providers each graph's session runs on from
``engine.providers()`` (``unimp_backend_provider_info{graph, provider, rank}``, rank 0 the one in use).

Each server has its own registry, so several servers can live in one process (tests).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

logger = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TOKENS_PER_SECOND_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000)


class _EngineStatsCollector(Collector):
    """Turns ``engine.stats()`` into gauges and counters at scrape time."""

    def __init__(self, stats: Callable[[], dict[str, float] | None]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        try:
            stats = self._stats()
        except Exception:
            logger.exception("engine.stats() failed during a metrics scrape")
            return
        if stats is None:
            return
        gauges = {
            "queue_depth": ("unimp_engine_queue_depth", "Requests waiting in the engine's decode batcher"),
            "kv_bytes": ("unimp_kv_cache_bytes", "Bytes of valid KV positions held by decoding sequences"),
            "prefix_cache_bytes": ("unimp_prefix_cache_bytes", "Bytes held by the prefix cache"),
            "kv_pool_bytes": ("unimp_decode_kv_pool_bytes",
                              "Bytes of the KV pool allocated at startup (inplace layout; 0 for concat)"),
            "kv_pool_rows": ("unimp_decode_kv_pool_rows", "KV rows (one per beam) the decode batcher hands out"),
            "kv_pool_rows_used": ("unimp_decode_kv_pool_rows_used", "KV rows reserved by admitted requests"),
        }
        for key, (name, doc) in gauges.items():
            if key in stats:
                yield GaugeMetricFamily(name, doc, value=float(stats[key]))
        copied = {k.removeprefix("kv_copy_bytes_"): v for k, v in stats.items() if k.startswith("kv_copy_bytes_")}
        if copied:
            family = CounterMetricFamily(
                "unimp_decode_kv_copy_bytes", "KV bytes copied by the decode path, by cause (join: a row's "
                "cross-attention memory at prefill, prefix: prefix-cache loads and stores, fork: beam rows, "
                "leave: pool compaction, step: per decode step, 0 in the inplace layout)", labels=["cause"])
            for cause, value in sorted(copied.items()):
                family.add_metric([cause], float(value))
            yield family
        hits, misses = stats.get("prefix_cache_hits"), stats.get("prefix_cache_misses")
        if hits is not None:
            yield CounterMetricFamily("unimp_prefix_cache_hits", "Prefix-cache lookups that hit", value=float(hits))
        if misses is not None:
            yield CounterMetricFamily("unimp_prefix_cache_misses", "Prefix-cache lookups that missed",
                                      value=float(misses))
        if hits is not None and misses is not None:
            total = float(hits) + float(misses)
            yield GaugeMetricFamily("unimp_prefix_cache_hit_ratio", "Prefix-cache hits / lookups since start",
                                    value=float(hits) / total if total else 0.0)
        yield from _catalog_store_metrics(stats)


_CATALOG_STORE_METRICS = {
    "catalog_encoded.": (GaugeMetricFamily, "unimp_catalog_items_encoded",
                         "Catalog images with a current entry in the store (latents, media_kv, vqgan_codes)"),
    "catalog_pending.": (GaugeMetricFamily, "unimp_catalog_items_pending",
                         "Catalog images the store has no entry for yet (encoded in the background or on first use)"),
    "catalog_on_demand.": (CounterMetricFamily, "unimp_catalog_items_encoded_on_demand",
                           "Pending catalog images a request encoded before the background encoder reached them"),
}


def _catalog_store_metrics(stats: dict[str, float]) -> Iterator[Metric]:
    """``catalog_<what>.<store>`` engine stats as one family per <what>, labelled by store."""
    for prefix, (family, name, doc) in _CATALOG_STORE_METRICS.items():
        samples = {k[len(prefix):]: v for k, v in stats.items() if k.startswith(prefix)}
        if not samples:
            continue
        metric = family(name, doc, labels=["store"])
        for store, value in sorted(samples.items()):
            metric.add_metric([store], float(value))
        yield metric


class _ProviderCollector(Collector):
    """``engine.providers()`` as an info gauge: 1 per (graph, provider), rank 0 the provider in use."""

    def __init__(self, providers: Callable[[], dict[str, list[str]] | None]) -> None:
        self._providers = providers

    def collect(self) -> Iterator[Metric]:
        try:
            providers = self._providers()
        except Exception:
            logger.exception("engine.providers() failed during a metrics scrape")
            return
        if not providers:
            return
        family = GaugeMetricFamily(
            "unimp_backend_provider_info", "ONNX Runtime execution providers of each graph's session (1 per "
            "provider; rank 0 is the one requested and in use, higher ranks run the nodes it rejects)",
            labels=["graph", "provider", "rank"])
        for graph, names in sorted(providers.items()):
            for rank, name in enumerate(names):
                family.add_metric([graph, name, str(rank)], 1.0)
        yield family


class ServerMetrics:
    """All metrics of one server."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.engine_stats: Callable[[], dict[str, float]] | None = None
        """Set once the engine is loaded."""
        self.engine_providers: Callable[[], dict[str, list[str]]] | None = None
        """Graph -> execution providers, set once an engine that reports them is loaded."""
        r = self.registry
        self.requests = Counter("unimp_requests", "RPCs finished, by method and status code", ["rpc", "code"],
                                registry=r)
        self.latency = Histogram("unimp_request_latency_seconds", "RPC latency as seen by the server", ["rpc"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.time_to_first_token = Histogram(
            "unimp_time_to_first_token_seconds", "Time from request arrival to the first generated token", ["rpc"],
            buckets=LATENCY_BUCKETS, registry=r)
        self.tokens_per_second = Histogram("unimp_tokens_per_second", "Decode speed of one request", ["rpc"],
                                           buckets=TOKENS_PER_SECOND_BUCKETS, registry=r)
        self.stage_seconds = Histogram(
            "unimp_stage_seconds",
            "Time per pipeline stage: vision, prefill, decode (text tasks); prompt, text_encoder, unet_per_step, "
            "vae_decoder (diffusion); prompt, prefill, codes, vqgan_decoder (VQGAN image codes)",
            ["rpc", "stage"], buckets=LATENCY_BUCKETS, registry=r)
        self.inflight = Gauge("unimp_inflight_requests", "Model requests admitted to the engine and not yet finished",
                              registry=r)
        self.inflight_cheap = Gauge("unimp_inflight_cheap_requests",
                                    "Catalog and interaction requests admitted and not yet finished", registry=r)
        self.inflight_cost = Gauge("unimp_inflight_cost", "Decode row-steps held by admitted model requests "
                                   "(the max_inflight_cost budget in use)", registry=r)
        self.cancelled = Counter("unimp_cancelled_requests", "Requests whose engine work was cancelled",
                                 ["rpc", "reason"], registry=r)
        self.rejected = Counter("unimp_rejected_requests", "Requests refused before reaching the engine",
                                ["rpc", "reason"], registry=r)
        r.register(_EngineStatsCollector(lambda: self.engine_stats() if self.engine_stats else None))
        r.register(_ProviderCollector(lambda: self.engine_providers() if self.engine_providers else None))
        self._http: Any = None
        self._thread: threading.Thread | None = None
        self.port: int | None = None

    def start_http(self, host: str, port: int) -> int:
        """Serve /metrics on host:port (0: any free port); returns the bound port."""
        self._http, self._thread = start_http_server(port, addr=host, registry=self.registry)
        self.port = int(self._http.server_address[1])
        logger.info("metrics on http://%s:%d/metrics", host, self.port)
        return self.port

    def stop_http(self) -> None:
        """Stop the endpoint without waiting for its poll loop (up to 0.5 s) to notice."""
        http, self._http, self._thread = self._http, None, None
        if http is None:
            return

        def shutdown() -> None:
            http.shutdown()
            http.server_close()

        threading.Thread(target=shutdown, name="unimp-metrics-stop", daemon=True).start()

    def value(self, name: str, labels: dict[str, str] | None = None) -> float:
        """Current value of one sample (0 if absent); for tests and diagnostics."""
        result = self.registry.get_sample_value(name, labels or {})
        return float(result) if result is not None else 0.0
