"""The memory-bandwidth floor of batch-1 decoding, and how close the decoder gets to it.

At batch 1 every decode step streams the decoder's weights (all of them except the embedding table, of
which one row is read) and the KV cache of the context through the cores once; that traffic divided by
the machine's memory bandwidth is the fastest a step can be. Measured here:

* bandwidth: ``numpy.copyto`` of a large float64 array (256 MiB or more, far beyond the caches), best of
  several runs, on 1 thread and on ``ctx.threads`` threads (each copying a contiguous part); counted as
  bytes read + bytes written (2 x the array size) per second. The floor uses the higher of the two.
* bytes per token: the decoder graph's initializers (onnx; the file size when onnx is not installed),
  less the embedding tables that are only gathered, plus the self-attention K/V read at a stated context
  length and the cross-attention memory of one image.
* per-token decode: the runner (``runtime.decoder.runner.DecoderRunner``) directly, batch 1, after a
  prefill: the median of N timed steps, with the time inside ``session.run`` recorded separately.

When the ratio misses its target an ONNX Runtime profile of the decode steps (time by operator type) and
the per-step overhead outside ``session.run`` are included, so the reason is visible in the report.
"""

from __future__ import annotations

import json
import logging
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, wait
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.context import BenchContext
from runtime.backends import BackendConfig, open_session
from runtime.backends.base import Session
from runtime.decoder.runner import DecoderRunner, PrefillRow
from runtime.manifest import Manifest, load_manifest

log = logging.getLogger(__name__)

FLOOR_TARGET = 1.5
"""Measured per-token decode time must be at most this multiple of the bandwidth floor."""
MiB = 1 << 20


# -- bandwidth ------------------------------------------------------------------------------------------


def measure_bandwidth(size_bytes: int, repeats: int, threads: int) -> dict[str, Any]:
    """Best-of-``repeats`` copy bandwidth (GB/s, read + write) on 1 and on ``threads`` threads."""
    n = size_bytes // 8
    src = np.arange(n, dtype=np.float64)  # written once: every page is resident before timing
    dst = np.zeros_like(src)
    np.copyto(dst, src)  # first touch of dst outside the timed runs
    out: dict[str, Any] = {"array_bytes": n * 8, "repeats": repeats,
                           "method": "numpy.copyto of a float64 array; (read + write bytes) / best time"}
    configs = sorted({1, max(1, threads)})
    with ThreadPoolExecutor(max_workers=max(configs)) as pool:
        for k in configs:
            bounds = np.linspace(0, n, k + 1).astype(np.int64)
            best = float("inf")
            for _ in range(repeats):
                t0 = time.perf_counter()
                if k == 1:
                    np.copyto(dst, src)
                else:  # numpy releases the GIL inside large copies
                    wait([pool.submit(np.copyto, dst[a:b], src[a:b]) for a, b in pairwise(bounds)])
                best = min(best, time.perf_counter() - t0)
            out[f"threads_{k}_gb_s"] = 2 * n * 8 / best / 1e9
    out["gb_s"] = max(out[f"threads_{k}_gb_s"] for k in configs)
    del src, dst
    return out


# -- bytes per token ------------------------------------------------------------------------------------


def decoder_weight_bytes(path: Path) -> dict[str, Any]:
    """Initializer bytes of the decoder graph; tables only read through Gather count one row per token."""
    try:
        import onnx
        from onnx import helper
    except ImportError:
        size = path.stat().st_size
        return {"source": "file size (onnx not installed)", "total": size, "gathered": 0, "per_token": size}
    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    sizes: dict[str, int] = {}
    row_bytes: dict[str, int] = {}
    for init in graph.initializer:
        itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(init.data_type)).itemsize
        count = int(np.prod(init.dims)) if len(init.dims) else 1
        sizes[init.name] = count * itemsize
        row_bytes[init.name] = (count // init.dims[0] if len(init.dims) and init.dims[0] else count) * itemsize
    constants = 0
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.TENSOR:
                    t = attr.t
                    constants += int(np.prod(t.dims)) * np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
    consumers: dict[str, list[tuple[str, int]]] = {}
    for node in graph.node:
        for slot, name in enumerate(node.input):
            if name in sizes:
                consumers.setdefault(name, []).append((node.op_type, slot))
    gathered = [
        name for name, uses in consumers.items() if uses and all(op == "Gather" and slot == 0 for op, slot in uses)
    ]
    total = sum(sizes.values()) + constants
    gathered_bytes = sum(sizes[n] for n in gathered)
    per_token = total - gathered_bytes + sum(row_bytes[n] for n in gathered)
    return {
        "source": "onnx initializers + Constant tensors",
        "total": total,
        "gathered": gathered_bytes,
        "gathered_tensors": gathered,
        "per_token": per_token,
        "file_bytes": path.stat().st_size,
    }


# -- measured decode ------------------------------------------------------------------------------------


class TimedSession:
    """A Session that adds up the wall time spent inside ``run`` (to separate it from Python overhead)."""

    def __init__(self, inner: Session) -> None:
        self.inner = inner
        self.run_s = 0.0
        self.calls = 0

    @property
    def input_names(self) -> list[str]:
        return self.inner.input_names

    @property
    def output_names(self) -> list[str]:
        return self.inner.output_names

    @property
    def providers(self) -> list[str]:
        return self.inner.providers

    def run(self, feeds: dict[str, np.ndarray], outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        t0 = time.perf_counter()
        out = self.inner.run(feeds, outputs)
        self.run_s += time.perf_counter() - t0
        self.calls += 1
        return out


class _ProfiledOrt:
    """A raw onnxruntime session with profiling on, behind the Session protocol."""

    def __init__(self, path: Path, threads: int, optimized: bool, prefix: Path) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.enable_profiling = True
        options.profile_file_prefix = str(prefix)
        options.log_severity_level = 3
        options.graph_optimization_level = (
            ort.GraphOptimizationLevel.ORT_DISABLE_ALL if optimized else ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        )
        self.session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
        self._inputs = [i.name for i in self.session.get_inputs()]
        self._outputs = [o.name for o in self.session.get_outputs()]

    @property
    def input_names(self) -> list[str]:
        return list(self._inputs)

    @property
    def output_names(self) -> list[str]:
        return list(self._outputs)

    @property
    def providers(self) -> list[str]:
        return list(self.session.get_providers())

    def run(self, feeds: dict[str, np.ndarray], outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        names = outputs or self._outputs
        return dict(zip(names, self.session.run(names, feeds)))


def prompt_ids(manifest: Manifest, length: int) -> np.ndarray:
    """(T,) ids: one ``<image>`` then ordinary tokens; values do not change the work done."""
    vocab = manifest.decoder.vocab_size
    ids = (np.arange(length, dtype=np.int64) * 7 + 100) % min(vocab, 1000)
    ids[0] = manifest.tokens.image
    return ids


def decode_steps(
    runner: DecoderRunner, session: TimedSession | None, manifest: Manifest, prompt_len: int, steps: int, warmup: int
) -> dict[str, Any]:
    """Prefill ``prompt_len`` tokens with one image, then time ``steps`` batch-1 greedy decode steps."""
    m = manifest
    latents = np.random.default_rng(0).standard_normal((1, m.vision.num_latents, m.vision.width)).astype(np.float32)
    memory = runner.media_kv(latents)
    logits, state = runner.prefill([PrefillRow(prompt_ids(m, prompt_len), memory)])
    token = np.array([int(np.argmax(logits[0]))], np.int64)
    for _ in range(warmup):  # steps return new states: the prefilled state is reused below
        runner.step([state], [token])
    walls, inside = [], []
    for _ in range(steps):
        before = session.run_s if session else 0.0
        t0 = time.perf_counter()
        out, (state,) = runner.step([state], [token])
        walls.append(time.perf_counter() - t0)
        inside.append((session.run_s - before) if session else 0.0)
        token = np.array([int(np.argmax(out[0][0]))], np.int64)
    return {"step_s": walls, "session_s": inside}


def profile_decode(
    ctx: BenchContext, manifest: Manifest, prompt_len: int, steps: int, media_kv: Session
) -> dict[str, Any]:
    """ONNX Runtime profile of ``steps`` decode steps: time per operator type, per step."""
    graph = ctx.artifacts / manifest.graphs["decoder"].file
    cached = graph.parent / ".ort-cache" / f"{graph.stem}.cpu.all.onnx"
    optimized = cached.is_file()
    with tempfile.TemporaryDirectory(prefix="unimp-profile-") as tmp:
        session = _ProfiledOrt(cached if optimized else graph, ctx.threads, optimized, Path(tmp) / "decode")
        runner = DecoderRunner(session, media_kv, manifest)
        decode_steps(runner, None, manifest, prompt_len, steps, warmup=1)
        events = json.loads(Path(session.session.end_profiling()).read_text())
    runs = sorted((e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"),
                  key=lambda e: e["ts"])[-steps:]
    windows = [(e["ts"], e["ts"] + e["dur"]) for e in runs]
    by_op: dict[str, float] = {}
    for e in events:
        if e.get("cat") != "Node" or not str(e.get("name", "")).endswith("_kernel_time"):
            continue
        if any(a <= e["ts"] <= b for a, b in windows):
            op = str(e.get("args", {}).get("op_name", "?"))
            by_op[op] = by_op.get(op, 0.0) + e["dur"] * 1e-6
    kernels = sum(by_op.values()) / max(1, len(runs))
    run_s = sum(e["dur"] for e in runs) * 1e-6 / max(1, len(runs))
    top = sorted(by_op.items(), key=lambda kv: -kv[1])[:10]
    return {
        "graph": "optimised cache" if optimized else "original (optimised at load)",
        "steps": len(runs),
        "model_run_s": run_s,
        "kernels_s": kernels,
        "ort_overhead_s": max(0.0, run_s - kernels),
        "note": "the profiler adds a fixed cost to every node: read the shares, not the absolute times",
        "top_ops": [{"op": op, "per_step_s": t / max(1, len(runs)), "share": t / max(1e-12, sum(by_op.values()))}
                    for op, t in top],
    }


# -- the section ----------------------------------------------------------------------------------------


def run(ctx: BenchContext) -> dict[str, Any]:
    manifest = load_manifest(ctx.artifacts, verify=False)
    d = manifest.decoder
    prompt_len, steps = (64, 8) if ctx.quick else (256, 32)
    size = (256 if ctx.quick else 512) * MiB
    reps = 3 if ctx.quick else max(5, ctx.repeats)

    log.info("floor: copy bandwidth (%d MiB, best of %d)", size // MiB, reps)
    bandwidth = measure_bandwidth(size, reps, ctx.threads)
    log.info("floor: %.1f GB/s", bandwidth["gb_s"])

    graph = ctx.artifacts / manifest.graphs["decoder"].file
    weights = decoder_weight_bytes(graph)
    context = prompt_len + steps // 2  # mean context length over the timed steps
    kv_itemsize = 2 if manifest.kv_dtype == "float16" else 4
    kv_per_position = 2 * d.num_layers * d.num_heads * d.head_dim * kv_itemsize
    xattn = 2 * len(d.xattn_layers) * d.xattn_heads * manifest.vision.num_latents * d.xattn_head_dim * 4
    bytes_per_token = weights["per_token"] + kv_per_position * context + xattn
    floor_s = bytes_per_token / (bandwidth["gb_s"] * 1e9)

    log.info("floor: decoding %d steps after a %d-token prefill", steps, prompt_len)
    backend = BackendConfig(intra_op_threads=ctx.threads)
    timed = TimedSession(open_session(graph, backend))
    media_kv = open_session(ctx.artifacts / manifest.graphs["media_kv"].file, backend)
    runner = DecoderRunner(timed, media_kv, manifest)
    measured = decode_steps(runner, timed, manifest, prompt_len, steps, warmup=3)
    per_token = float(statistics.median(measured["step_s"]))
    in_session = float(statistics.median(measured["session_s"]))
    # per step, so that a step descheduled by other work does not move time between the two parts
    overhead = float(statistics.median([w - i for w, i in zip(measured["step_s"], measured["session_s"])]))
    ratio = per_token / floor_s
    met = ratio <= FLOOR_TARGET
    log.info("floor: %.2f ms/token measured, floor %.2f ms (%.2fx)", 1e3 * per_token, 1e3 * floor_s, ratio)

    result: dict[str, Any] = {
        "bandwidth": bandwidth,
        "decoder": {
            "weights": weights,
            "context_tokens": context,
            "kv_bytes_per_position": kv_per_position,
            "kv_bytes_read": kv_per_position * context,
            "xattn_memory_bytes": xattn,
            "bytes_per_token": bytes_per_token,
        },
        "floor_s": floor_s,
        "prompt_tokens": prompt_len,
        "steps": steps,
        "per_token_s": per_token,
        "per_token_min_s": float(min(measured["step_s"])),
        "session_run_s": in_session,
        "python_overhead_s": overhead,
        "ratio": ratio,
    }
    note = (
        f"{bytes_per_token / 1e6:.1f} MB/token (weights {weights['per_token'] / 1e6:.1f} MB + KV at {context} "
        f"tokens {kv_per_position * context / 1e6:.1f} MB) at {bandwidth['gb_s']:.1f} GB/s = "
        f"{1e3 * floor_s:.2f} ms; measured {1e3 * per_token:.2f} ms"
    )
    if not met:
        log.info("floor: target missed; profiling %d decode steps", steps)
        profile = profile_decode(ctx, manifest, prompt_len, steps, media_kv)
        result["profile"] = profile
        top = ", ".join(f"{o['op']} {o['share']:.0%}" for o in profile["top_ops"][:4])
        note += (
            f"; per step: session.run {1e3 * in_session:.2f} ms (profiled kernel time by op: {top}; "
            f"{profile['kernels_s'] / max(1e-12, profile['model_run_s']):.0%} of a profiled run is in kernels), "
            f"Python outside session.run {1e3 * overhead:.2f} ms"
        )
    result["targets"] = [{
        "name": f"batch-1 decode per token <= {FLOOR_TARGET}x the bandwidth floor",
        "value": ratio,
        "target": FLOOR_TARGET,
        "met": met,
        "note": note,
    }]
    return result
