"""Per-task latency of our Runtime (ONNX Runtime CPU): stages, TTFT/TPOT, prefix cache, inline images,
continuous-batching throughput and memory.

Every request goes through the public ``Runtime`` API, exactly as the gRPC servicer calls it. Stage times
come from the ``Timings`` each result carries; wall time is measured around the call as well (for
``explain``: until the first streamed piece, and until the stream ends). "Miss" means a prefix-cache miss
(the cache is cleared and the request uses a tenant never seen before); "hit" repeats a request whose
history prefix is already cached. Catalog latents are always precomputed (that is how the runtime serves);
the inline-image measurement shows what an image encoded at request time costs instead.
"""

from __future__ import annotations

import logging
import resource
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import numpy as np

from benchmarks.context import BenchContext
from runtime.backends import BackendConfig
from runtime.engine import Runtime, RuntimeConfig
from runtime.types import (
    HistoryItem,
    PreferenceRequest,
    PreferenceResult,
    RecommendRequest,
    SamplingOptions,
    SearchRequest,
    SelectRequest,
    TextPiece,
    Timings,
)

log = logging.getLogger(__name__)

SEARCH_QUERY = "lightweight running shoes for summer"
TTFT_HIT_TARGET = 0.25
"""Prefix-cache hit TTFT must be at most this fraction of the miss TTFT."""
STREAMS_TARGET = 4.0
"""Explain throughput with 8 concurrent streams must be at least this multiple of 1 stream's."""
STREAMS = (1, 8)


@dataclass(frozen=True)
class Sample:
    """One timed request: the engine's stage timings plus wall time measured around the call."""

    timings: Timings
    wall: float
    """Seconds from the call until the result (or the end of the stream)."""
    wall_first: float
    """Seconds from the call until the first streamed piece (== wall for unary calls)."""


@dataclass(frozen=True)
class Requests:
    """Builds one request per task for a given tenant (the prefix-cache salt)."""

    history: tuple[HistoryItem, ...]
    rated: tuple[HistoryItem, ...]
    target: HistoryItem
    candidates: tuple[HistoryItem, ...]
    new_tokens: int

    def recommend(self, tenant: str) -> RecommendRequest:
        return RecommendRequest(self.history, top_k=10, tenant=tenant)

    def search(self, tenant: str) -> SearchRequest:
        return SearchRequest(self.history, SEARCH_QUERY, top_k=10, tenant=tenant)

    def explain(self, tenant: str, rated: tuple[HistoryItem, ...] | None = None) -> PreferenceRequest:
        # greedy (temperature 0, one beam): the default serving configuration of the explanation stream
        return PreferenceRequest(rated or self.rated, self.target,
                                 SamplingOptions(max_new_tokens=self.new_tokens), tenant=tenant)

    def select(self, tenant: str) -> SelectRequest:
        return SelectRequest(self.history, self.candidates, max_selected=2, tenant=tenant)


# -- measuring one request -------------------------------------------------------------------------------


def _unary(call: Callable[[], Any]) -> Sample:
    t0 = time.perf_counter()
    result = call()
    wall = time.perf_counter() - t0
    return Sample(result.timings, wall, wall)


def _stream(events: Callable[[], Iterator[TextPiece | PreferenceResult]]) -> Sample:
    t0 = time.perf_counter()
    first = 0.0
    final: PreferenceResult | None = None
    for event in events():
        if isinstance(event, TextPiece):
            first = first or time.perf_counter() - t0
        else:
            final = event
    wall = time.perf_counter() - t0
    if final is None:
        raise RuntimeError("explain stream ended without a PreferenceResult")
    return Sample(final.timings, wall, first or wall)


def _median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else 0.0


def summarise(samples: list[Sample]) -> dict[str, float]:
    """Medians of every stage over ``samples`` (seconds), plus per-token decode time and TPOT."""
    t = [s.timings for s in samples]
    out = {
        "vision_s": _median([x.vision for x in t]),
        "prefill_s": _median([x.prefill for x in t]),
        "decode_s": _median([x.decode for x in t]),
        "total_s": _median([x.total for x in t]),
        "first_token_s": _median([x.first_token for x in t]),
        "wall_s": _median([s.wall for s in samples]),
        "wall_first_token_s": _median([s.wall_first for s in samples]),
        "tokens": _median([float(x.tokens) for x in t]),
        "prefix_cache_hit_rate": sum(x.prefix_cache_hit for x in t) / len(t) if t else 0.0,
        "samples": float(len(samples)),
    }
    out["other_s"] = max(0.0, out["total_s"] - out["vision_s"] - out["prefill_s"] - out["decode_s"])
    # per-token decode: decode time over the tokens produced (the rating step included in decode, for explain)
    per_token = [x.decode / x.tokens for x in t if x.tokens]
    out["decode_per_token_s"] = _median(per_token)
    # time per output token after the first one (the streaming client's view)
    tpot = [(x.total - x.first_token) / (x.tokens - 1) for x in t if x.tokens > 1]
    out["tpot_s"] = _median(tpot)
    return out


# -- engine statistics sampler ----------------------------------------------------------------------------


class PeakStats:
    """Polls ``Runtime.stats()`` on a thread and keeps the peak of each value (KV bytes while decoding)."""

    def __init__(self, rt: Runtime, interval_s: float = 0.005) -> None:
        self._rt = rt
        self._interval = interval_s
        self.peak: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="bench-stats", daemon=True)

    def __enter__(self) -> PeakStats:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self.sample()

    def sample(self) -> None:
        for key, value in self._rt.stats().items():
            self.peak[key] = max(self.peak.get(key, 0.0), float(value))

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            self.sample()


def rss_bytes() -> dict[str, int]:
    """Current (VmRSS) and peak (VmHWM) resident set of this process, in bytes."""
    out = {"rss": 0, "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    out["rss"] = int(line.split()[1]) * 1024
                elif line.startswith("VmHWM:"):
                    out["peak"] = int(line.split()[1]) * 1024
    except OSError:
        pass
    return out


def graph_bytes(ctx: BenchContext) -> dict[str, int]:
    """Bytes on disk of every graph in the manifest (external data files included)."""
    out = {}
    for name, graph in ctx.manifest["graphs"].items():
        path = ctx.artifacts / graph["file"]
        size = path.stat().st_size if path.is_file() else 0
        for data in path.parent.glob(path.name + ".data"):
            size += data.stat().st_size
        out[name] = size
    return out


# -- the section ------------------------------------------------------------------------------------------


def _open(ctx: BenchContext) -> Runtime:
    # no background fill of the catalog stores: it would share the CPUs with the measurements (the small
    # demo's 2,000 images take tens of minutes on 2 cores); the items the requests use are encoded first
    config = RuntimeConfig(backend=BackendConfig(intra_op_threads=ctx.threads), progress=not ctx.quick,
                           background_encode=False)
    return Runtime.open(ctx.artifacts, config)


def _prefetch(ctx: BenchContext, rt: Runtime, req: Requests) -> float:
    """Encode (or read) the latents and cross-attention K/V of every catalog item the section's requests
    use, before anything is timed; returns the seconds it took."""
    t0 = time.perf_counter()
    items = {h.item_id for history in ctx.histories(n_users=2, length=4) for h in history}
    items |= {h.item_id for h in (*req.history, *req.rated, req.target, *req.candidates)}
    ids = sorted(i for i in items if i)
    rt.latents.get(ids)
    rt.media_kv.get(ids)
    return time.perf_counter() - t0


def _requests(ctx: BenchContext, rt: Runtime) -> Requests:
    histories = ctx.histories(n_users=2, length=4)
    count = int(ctx.manifest["tokens"]["item_count"])
    used = {h.item_id for h in (*histories[0], *ctx.rated_history())}
    pool = [f"P{k:05d}" for k in range(count) if f"P{k:05d}" not in used]
    return Requests(
        history=histories[0],
        rated=ctx.rated_history(),
        target=HistoryItem(item_id=pool[0]),
        candidates=tuple(HistoryItem(item_id=i) for i in pool[1:6]),
        new_tokens=8 if ctx.quick else 32,
    )


def _measure_task(
    rt: Runtime, name: str, make: Callable[[str], Sample], repeats: int
) -> dict[str, dict[str, float]]:
    """Hit: one tenant, repeated after a first (warm-up) call cached its prefix. Miss: cleared cache and a
    tenant never seen before, per repeat."""
    tenant = f"hit-{name}"
    make(tenant)  # warm-up (first call of a shape: ORT allocations, code paths) and prefix-cache prime
    hits = [make(tenant) for _ in range(repeats)]
    misses = []
    for i in range(repeats):
        rt.prefix_cache.clear()
        misses.append(make(f"miss-{name}-{i}-{time.monotonic_ns()}"))
    log.info("tasks: %-9s miss %.1f ms, hit %.1f ms (median wall)", name,
             1e3 * _median([s.wall for s in misses]), 1e3 * _median([s.wall for s in hits]))
    return {"miss": summarise(misses), "hit": summarise(hits)}


def _inline_images(rt: Runtime, req: Requests, repeats: int) -> dict[str, Any]:
    """Catalog latents (precomputed) vs the same history sent as inline image bytes (encoded now)."""
    inline = tuple(
        HistoryItem(image=rt.catalog.image(h.item_id), meta=rt.catalog.get(h.item_id).meta) for h in req.history
    )
    out: dict[str, Any] = {"images": len(inline)}
    rt.recommend(RecommendRequest(inline, tenant="warm-inline"))  # first vision-graph call: warm-up
    for label, history in (("catalog", req.history), ("inline", inline)):
        samples = []
        for i in range(repeats):
            rt.prefix_cache.clear()
            request = RecommendRequest(history, tenant=f"img-{label}-{i}")
            samples.append(_unary(partial(rt.recommend, request)))
        out[label] = summarise(samples)
    out["encode_per_image_s"] = max(0.0, out["inline"]["vision_s"] - out["catalog"]["vision_s"]) / max(1, len(inline))
    log.info("tasks: vision catalog %.2f ms vs inline %.1f ms for %d images",
             1e3 * out["catalog"]["vision_s"], 1e3 * out["inline"]["vision_s"], len(inline))
    return out


def _concurrent_explain(rt: Runtime, requests: list[PreferenceRequest]) -> dict[str, float]:
    """Run ``requests`` at once, one thread each; aggregate tokens/s over the wall time of the slowest."""
    n = len(requests)
    results: list[Sample | BaseException] = [RuntimeError("not run")] * n
    barrier = threading.Barrier(n + 1)

    def worker(k: int) -> None:
        barrier.wait()
        try:
            results[k] = _stream(partial(rt.explain, requests[k]))
        except BaseException as exc:  # re-raised below, in the measuring thread
            results[k] = exc

    steps0, rows0 = rt.batcher.steps, rt.batcher.batched_rows
    threads = [threading.Thread(target=worker, args=(k,), name=f"bench-stream-{k}") for k in range(n)]
    for th in threads:
        th.start()
    barrier.wait()
    t0 = time.perf_counter()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t0
    errors = [r for r in results if isinstance(r, BaseException)]
    if errors:
        raise errors[0]
    samples = [r for r in results if isinstance(r, Sample)]
    tokens = sum(s.timings.tokens for s in samples)
    steps = rt.batcher.steps - steps0
    return {
        "wall_s": wall,
        "tokens": float(tokens),
        "tokens_per_s": tokens / wall,
        "mean_batch_rows": (rt.batcher.batched_rows - rows0) / steps if steps else 0.0,
        "ttft_s": _median([s.wall_first for s in samples]),
        "tpot_s": _median([(s.wall - s.wall_first) / max(1, s.timings.tokens - 1) for s in samples]),
    }


def _streams(ctx: BenchContext, rt: Runtime, req: Requests, repeats: int) -> dict[str, Any]:
    """Explain tokens/s with 1 and 8 concurrent streams (threads calling rt.explain), prefixes cached."""
    users = [
        tuple(replace(h, rating=1 + (u + k) % 5, explanation="Nice quality.") for k, h in enumerate(history))
        for u, history in enumerate(ctx.histories(n_users=max(STREAMS), length=4))
    ]
    requests = [req.explain(f"stream-{u}", rated) for u, rated in enumerate(users)]
    for request in requests:  # prime every user's prefix: the comparison is about decoding
        _stream(partial(rt.explain, request))
    out: dict[str, Any] = {"max_new_tokens": req.new_tokens, "streams": {}}
    with PeakStats(rt) as peak:
        for n in STREAMS:
            runs = [_concurrent_explain(rt, requests[:n]) for _ in range(repeats)]
            best = sorted(runs, key=lambda r: r["tokens_per_s"])[len(runs) // 2]  # the median run
            out["streams"][str(n)] = {**best, "runs": float(len(runs))}
            log.info("tasks: explain %d stream(s): %.1f tokens/s (mean batch %.1f rows)",
                     n, best["tokens_per_s"], best["mean_batch_rows"])
    one, many = out["streams"][str(STREAMS[0])], out["streams"][str(STREAMS[-1])]
    out["speedup"] = many["tokens_per_s"] / one["tokens_per_s"] if one["tokens_per_s"] else 0.0
    out["peak_kv_bytes"] = peak.peak.get("kv_bytes", 0.0)
    out["peak_prefix_cache_bytes"] = peak.peak.get("prefix_cache_bytes", 0.0)
    return out


def _prompt_tokens(rt: Runtime, req: Requests) -> dict[str, int]:
    """Prefix (cacheable history) and suffix token counts of the explain prompt."""
    from runtime.prompts import encode, history_from_request, preference_prompt

    t = rt.manifest.tokens
    history = rt.resolve(history_from_request(req.rated))
    (target,) = rt.resolve((req.target,), name="target")
    enc = encode(preference_prompt(history, target, rt.config.max_history), rt.tokenizer, t.endofchunk, t.image)
    return {"prompt": len(enc.ids), "prefix": int(enc.prefix_len), "suffix": len(enc.ids) - int(enc.prefix_len)}


def _media_kv_s(rt: Runtime, req: Requests, repeats: int) -> float:
    """Median time of the explain prompt's cross-attention memory as every request gets it: the catalog images'
    K/V read from the store (part of the ``vision`` stage)."""
    images = (*req.rated, req.target)
    rt.media.memory_for(images)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        rt.media.memory_for(images)
        times.append(time.perf_counter() - t0)
    return _median(times)


def runner_step_s(rt: Runtime, rows: int, prompt_len: int, steps: int) -> float:
    """Median time of one decoder step for ``rows`` rows of ``prompt_len`` context, through the decoder core
    alone (no batcher hand-off, no sampling): how much a batched step costs compared with a 1-row step.
    The rows are one prompt forked ``rows`` ways; the core is called from this thread while the batcher is
    idle (nothing else decodes during a benchmark)."""
    from benchmarks.floor import prompt_ids
    from runtime.decoder.core import PrefillInput

    m = rt.manifest
    latents = np.zeros((1, m.vision.num_latents, m.vision.width), np.float32)
    memory = rt.decoder.media_kv(latents)
    tokens = np.full(rows, m.tokens.item_start, np.int64)
    times = []
    with rt.admit(None, rows) as gen:
        gen.prefill(PrefillInput(prompt_ids(m, prompt_len), memory))
        gen.fork(np.zeros(rows, np.int64))
        assert gen.seq is not None
        rt.decoder.step([gen.seq], [tokens])  # warm-up for this batch shape
        for _ in range(min(steps, gen.room - 2)):
            t0 = time.perf_counter()
            rt.decoder.step([gen.seq], [tokens])
            times.append(time.perf_counter() - t0)
    return _median(times)


def run(ctx: BenchContext) -> dict[str, Any]:
    repeats = max(1, ctx.repeats)
    rss_start = rss_bytes()
    t_open = time.perf_counter()
    rt = _open(ctx)
    open_s = time.perf_counter() - t_open
    rss_open = rss_bytes()
    req = _requests(ctx, rt)
    log.info("tasks: catalog entries of the requests' items ready in %.1f s", _prefetch(ctx, rt, req))
    m = rt.manifest
    try:
        with PeakStats(rt) as peak:
            tasks = {
                "recommend": _measure_task(rt, "recommend", lambda tn: _unary(lambda: rt.recommend(req.recommend(tn))), repeats),
                "search": _measure_task(rt, "search", lambda tn: _unary(lambda: rt.search(req.search(tn))), repeats),
                "explain": _measure_task(rt, "explain", lambda tn: _stream(lambda: rt.explain(req.explain(tn))), repeats),
                "select_items": _measure_task(rt, "select", lambda tn: _unary(lambda: rt.select_items(req.select(tn))), repeats),
            }
            images = _inline_images(rt, req, repeats)
        streams = _streams(ctx, rt, req, max(1, min(repeats, 3)))
        context, steps = (64, 3) if ctx.quick else (160, 8)
        streams["runner_step_s"] = {str(n): runner_step_s(rt, n, context, steps) for n in STREAMS}
        streams["runner_step_context"] = context
        tokens = _prompt_tokens(rt, req)
        media_kv_s = _media_kv_s(rt, req, repeats)
        stats = rt.stats()
    finally:
        rt.close()

    explain = tasks["explain"]
    ttft_miss, ttft_hit = explain["miss"]["first_token_s"], explain["hit"]["first_token_s"]
    ttft_ratio = ttft_hit / ttft_miss if ttft_miss else 0.0
    prefix = {
        "explain_prompt_tokens": tokens,
        "ttft_miss_s": ttft_miss,
        "ttft_hit_s": ttft_hit,
        "media_kv_s": media_kv_s,
        "media_kv_images": len(req.rated) + 1,
        "ratio": ttft_ratio,
        "per_task_ratio": {
            name: (v["hit"]["first_token_s"] / v["miss"]["first_token_s"]) if v["miss"]["first_token_s"] else 0.0
            for name, v in tasks.items()
        },
    }
    d = m.decoder
    kv_itemsize = 2 if m.kv_dtype == "float16" else 4
    weights = graph_bytes(ctx)
    text_graphs = ("vision", "media_kv", "decoder")
    rss_end = rss_bytes()
    memory = {
        "rss_before_open_bytes": rss_start["rss"],
        "rss_after_open_bytes": rss_open["rss"],
        "peak_rss_bytes": rss_end["peak"],
        "weights_bytes": weights,
        "weights_bytes_text": sum(v for k, v in weights.items() if k in text_graphs),
        "weights_bytes_diffusion": sum(v for k, v in weights.items() if k not in text_graphs),
        "kv_bytes_per_token": 2 * d.num_layers * d.num_heads * d.head_dim * kv_itemsize,
        "kv_bytes_peak": max(peak.peak.get("kv_bytes", 0.0), streams["peak_kv_bytes"]),
        "prefix_cache_bytes_peak": max(peak.peak.get("prefix_cache_bytes", 0.0), streams["peak_prefix_cache_bytes"]),
        "prefix_cache_bytes_end": stats["prefix_cache_bytes"],
    }
    hit = explain["hit"]
    suffix_s = hit["prefill_s"]
    ttft_note = (
        f"hit TTFT {1e3 * ttft_hit:.1f} ms = vision {1e3 * hit['vision_s']:.1f} (the stored cross-attention K/V "
        f"of all {len(req.rated) + 1} images: {1e3 * media_kv_s:.1f}) + prefill of the "
        f"{tokens['suffix']}-token suffix ~{1e3 * suffix_s:.1f} + rating step to the first piece "
        f"{1e3 * max(0.0, ttft_hit - hit['vision_s'] - hit['prefill_s']):.1f}; the cached prefix is "
        f"{tokens['prefix']} of {tokens['prompt']} tokens, so prefill alone cannot drop below "
        f"{tokens['suffix'] / tokens['prompt']:.0%} of a miss's"
    )
    one, many = streams["streams"]["1"], streams["streams"][str(STREAMS[-1])]
    step = streams["runner_step_s"]
    step_1, step_n = step[str(STREAMS[0])], step[str(STREAMS[-1])]
    stream_note = (
        f"{one['tokens_per_s']:.1f} -> {many['tokens_per_s']:.1f} tokens/s; mean decode batch "
        f"{many['mean_batch_rows']:.1f} rows; TPOT {1e3 * one['tpot_s']:.1f} ms at 1 stream, "
        f"{1e3 * many['tpot_s']:.1f} ms at {STREAMS[-1]}; TTFT {1e3 * one['ttft_s']:.0f} -> "
        f"{1e3 * many['ttft_s']:.0f} ms ({STREAMS[-1]} prefills share the CPUs); the decoder step alone (runner, "
        f"{streams['runner_step_context']} tokens of context) takes {1e3 * step_1:.1f} ms for 1 row and "
        f"{1e3 * step_n:.1f} ms for {STREAMS[-1]} rows ({step_n / step_1 if step_1 else 0.0:.1f}x)"
    )
    targets = [
        {
            "name": f"explain TTFT with a prefix-cache hit <= {TTFT_HIT_TARGET:.0%} of a miss",
            "value": ttft_ratio,
            "target": TTFT_HIT_TARGET,
            "met": ttft_ratio <= TTFT_HIT_TARGET,
            "note": ttft_note,
        },
        {
            "name": f"explain throughput, {STREAMS[-1]} streams >= {STREAMS_TARGET}x 1 stream",
            "value": streams["speedup"],
            "target": STREAMS_TARGET,
            "met": streams["speedup"] >= STREAMS_TARGET,
            "note": stream_note,
        },
    ]
    return {
        "model": {"name": m.model_name, "parameters": int(m.source.get("parameters", 0)),
                  "layers": d.num_layers, "hidden": d.hidden_size, "vocab": d.vocab_size},
        "backend": "onnxruntime CPU",
        "threads": ctx.threads,
        "repeats": repeats,
        "open_s": open_s,
        "explain_new_tokens": req.new_tokens,
        "tasks": tasks,
        "prefix_cache": prefix,
        "inline_image": images,
        "concurrency": streams,
        "memory": memory,
        "targets": targets,
    }


# -- image generation (section "image") ------------------------------------------------------------------


def _image_samples(rt: Runtime, request: Any, repeats: int) -> tuple[list[dict[str, float]], Any]:
    """Timings of ``repeats`` GenerateImage runs after one warm-up, and the last result."""
    from runtime.api import ImageProgress, ImageResult

    samples: list[dict[str, float]] = []
    last: ImageResult | None = None
    for i in range(max(1, repeats) + 1):
        t0 = time.perf_counter()
        first_progress = 0.0
        result: ImageResult | None = None
        for event in rt.generate_image(request):
            if isinstance(event, ImageProgress):
                first_progress = first_progress or time.perf_counter() - t0
            elif isinstance(event, ImageResult):
                result = event
        wall = time.perf_counter() - t0
        if result is None:
            raise RuntimeError("generate_image ended without an ImageResult")
        if i:  # the first run is the warm-up
            samples.append({**result.timings, "wall": wall, "first_progress": first_progress})
            last = result
        log.info("image (%s): run %d/%d %.2f s", request.model.value, i, repeats, wall)
    return samples, last


def _stage_medians(samples: list[dict[str, float]]) -> dict[str, float]:
    keys = sorted({k for s in samples for k in s})
    return {f"{k}_s" if k != "steps" else k: _median([s[k] for s in samples if k in s]) for k in keys}


def run_image(ctx: BenchContext) -> dict[str, Any]:
    """GenerateImage per stage. Diffusion: LLM-written prompt, text encoder, UNet (per step), VAE decoder.
    VQGAN (key ``vqgan``): prompt, prefill, the 256 code tokens (codes/s), VQGAN decoder (ms)."""
    from runtime.api import ImageRequest
    from runtime.types import ImageModel

    graphs = ctx.manifest["graphs"]
    has_diffusion, has_vqgan = "unet" in graphs, "vqgan_decoder" in graphs
    if not has_diffusion and not has_vqgan:
        return {"skipped": "these artifacts have no image generation graphs (exported with --no-diffusion --no-vqgan)"}
    rt = _open(ctx)
    steps = 4 if ctx.quick else 20
    history = ctx.histories(n_users=1, length=4)[0]
    out: dict[str, Any] = {}
    try:
        if has_diffusion:
            request = ImageRequest(history=history, query="a summer outfit", steps=steps, seed=0,
                                   model=ImageModel.DIFFUSION)
            samples, result = _image_samples(rt, request, ctx.repeats)
            out.update({"steps": steps, "width": result.width, "height": result.height, "repeats": len(samples),
                        "stages": _stage_medians(samples)})
        else:
            out["diffusion"] = {"skipped": "these artifacts have no diffusion graphs"}
        if has_vqgan:
            request = ImageRequest(history=history, query="a summer outfit", model=ImageModel.VQGAN)
            samples, result = _image_samples(rt, request, 1 if ctx.quick else ctx.repeats)
            stages = _stage_medians(samples)
            codes = len(result.codes)
            out["vqgan"] = {"codes": codes, "width": result.width, "height": result.height, "repeats": len(samples),
                            "stages": stages, "codes_per_s": codes / stages["codes_s"] if stages["codes_s"] else 0.0,
                            "decoder_ms": 1e3 * stages["vqgan_decoder_s"]}
        else:
            out["vqgan"] = {"skipped": "these artifacts have no VQGAN graphs (export with --vqgan DIR)"}
    finally:
        rt.close()
    return out
