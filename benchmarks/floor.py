"""The memory-bandwidth floor of batch-1 decoding, and how close the decoder gets to it.

At batch 1 every decode step streams the decoder's weights (all of them except the embedding table, of
which one row is read) and the KV cache of the context through the cores once; that traffic divided by
the machine's memory bandwidth is the fastest a step can be. Measured here:

* read bandwidth: a large GEMV on ONNX Runtime (``MatMul`` of a (1, K) input by a (K, N) float32
  initializer of 256 MiB or more, far beyond the caches) with ``ctx.threads`` intra-op threads, best of
  several runs: the weight bytes read per second, the access pattern of a batch-1 decode step. The copy
  bandwidth (``numpy.copyto``, read + write) is reported beside it; it understates reads.
* bytes per token: the decoder graph's initializers (onnx; the file size when onnx is not installed),
  less the embedding tables that are only gathered, plus the self-attention K/V read at a stated context
  length and the cross-attention memory of one image.
* per-token decode: the decoder core (runtime.decoder.core) directly, batch 1, after a prefill: the
  median of N timed steps, with the time inside the session recorded separately. Both KV layouts side by
  side: the artifacts' own decoder and the other layout exported from the same checkpoint (cached under
  ``<artifacts>/.cache/bench/``): ``inplace`` (GroupQueryAttention over a bound buffer) and ``concat``
  (present = Concat(past, new), fed back).

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
from runtime.decoder.core import ConcatCore, DecoderCore, InplaceCore, PrefillInput
from runtime.manifest import Manifest, load_manifest

log = logging.getLogger(__name__)

FLOOR_TARGET = 1.15
"""Measured per-token decode time (inplace layout) must be at most this multiple of the bandwidth floor."""
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


def measure_read_bandwidth(size_bytes: int, repeats: int, threads: int) -> dict[str, Any]:
    """Best-of-``repeats`` read bandwidth (GB/s) of an ONNX Runtime GEMV over a ``size_bytes`` weight."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    k = 4096
    n = max(1, size_bytes // (4 * k))
    weight = np.random.default_rng(0).standard_normal((k, n), dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "gemv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])],
        [numpy_helper.from_array(weight, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    del weight
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), sess_options=options, providers=["CPUExecutionProvider"])
    del model
    x = np.ones((1, k), np.float32)
    session.run(None, {"x": x})  # first touch
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        session.run(None, {"x": x})
        best = min(best, time.perf_counter() - t0)
    return {"gb_s": 4 * k * n / best / 1e9, "weight_bytes": 4 * k * n, "threads": threads, "repeats": repeats,
            "method": f"onnxruntime MatMul (1, {k}) x ({k}, {n}) float32; weight bytes / best time"}


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
    packed = {onnx.TensorProto.INT4, onnx.TensorProto.UINT4}  # two values per byte
    for init in graph.initializer:
        count = int(np.prod(init.dims)) if len(init.dims) else 1
        row = count // init.dims[0] if len(init.dims) and init.dims[0] else count
        if init.data_type in packed:
            sizes[init.name], row_bytes[init.name] = (count + 1) // 2, (row + 1) // 2
            continue
        itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(init.data_type)).itemsize
        sizes[init.name] = count * itemsize
        row_bytes[init.name] = row * itemsize
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

    def allocate(self, shape: tuple[int, ...], dtype: type = np.float32) -> Any:
        return self.inner.allocate(shape, dtype)

    def run_bound(self, feeds: dict[str, np.ndarray], bound: dict[str, Any], outputs: list[str], *,
                  reuse: bool = False) -> dict[str, np.ndarray]:
        t0 = time.perf_counter()
        out = self.inner.run_bound(feeds, bound, outputs, reuse=reuse)
        self.run_s += time.perf_counter() - t0
        self.calls += 1
        return out


def prompt_ids(manifest: Manifest, length: int) -> np.ndarray:
    """(T,) ids: one ``<image>`` then ordinary tokens; values do not change the work done."""
    vocab = manifest.decoder.vocab_size
    ids = (np.arange(length, dtype=np.int64) * 7 + 100) % min(vocab, 1000)
    ids[0] = manifest.tokens.image
    return ids


def open_core(layout: str, decoder: Session, media_kv: Session, manifest: Manifest, context: int) -> DecoderCore:
    """A one-slot decoder core of ``layout`` over the given sessions."""
    if layout == "inplace":
        return InplaceCore(decoder, media_kv, manifest, slots=1, max_context=context)
    return ConcatCore(decoder, media_kv, manifest, max_context=context)


def decode_steps(
    core: DecoderCore, session: TimedSession | None, manifest: Manifest, prompt_len: int, steps: int, warmup: int
) -> dict[str, Any]:
    """Prefill ``prompt_len`` tokens with one image, then time ``steps`` batch-1 greedy decode steps."""
    m = manifest
    latents = np.random.default_rng(0).standard_normal((1, m.vision.num_latents, m.vision.width)).astype(np.float32)
    memory = core.media_kv(latents)
    seq = core.open()
    try:
        out = core.prefill(seq, PrefillInput(prompt_ids(m, prompt_len), memory))
        token = np.array([int(np.argmax(out.logits))], np.int64)
        for _ in range(warmup):
            core.step([seq], [token])
        walls, inside = [], []
        for _ in range(steps):
            before = session.run_s if session else 0.0
            t0 = time.perf_counter()
            (logits,) = core.step([seq], [token])
            walls.append(time.perf_counter() - t0)
            inside.append((session.run_s - before) if session else 0.0)
            token = np.array([int(np.argmax(logits[0]))], np.int64)
    finally:
        core.release(seq)
    return {"step_s": walls, "session_s": inside}


def profile_decode(
    graph: Path, layout: str, manifest: Manifest, prompt_len: int, steps: int, media_kv: Session, threads: int,
    context: int,
) -> dict[str, Any]:
    """ONNX Runtime profile of ``steps`` decode steps: time per operator type, per step."""
    from runtime.backends.ort import OrtSession

    with tempfile.TemporaryDirectory(prefix="unimp-profile-") as tmp:
        backend = BackendConfig(intra_op_threads=threads, profile_prefix=str(Path(tmp) / "decode"))
        session = OrtSession(graph, backend)
        decode_steps(open_core(layout, session, media_kv, manifest, context), None, manifest, prompt_len, steps,
                     warmup=1)
        events = json.loads(Path(session.end_profiling()).read_text())
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
        "steps": len(runs),
        "model_run_s": run_s,
        "kernels_s": kernels,
        "ort_overhead_s": max(0.0, run_s - kernels),
        "note": "the profiler adds a fixed cost to every node: read the shares, not the absolute times",
        "top_ops": [{"op": op, "per_step_s": t / max(1, len(runs)), "share": t / max(1e-12, sum(by_op.values()))}
                    for op, t in top],
    }


def layout_graph(ctx: BenchContext, manifest: Manifest, layout: str) -> Path:
    """The decoder graph of ``layout``: the artifacts' own, or exported from their checkpoint (cached)."""
    if manifest.decoder.kv_layout == layout:
        return ctx.artifacts / manifest.graphs["decoder"].file
    cached = ctx.artifacts / ".cache" / "bench" / f"decoder-{layout}-{manifest.graphs['decoder'].sha256[:12]}.onnx"
    if not cached.is_file():
        from export.checkpoints import load_checkpoint
        from export.graphs import export_graph
        from export.specs import decoder_spec, inplace_decoder_spec

        log.info("floor: exporting the %s decoder from %s/checkpoint for comparison", layout, ctx.artifacts)
        model = load_checkpoint(ctx.artifacts / "checkpoint").model
        spec = (inplace_decoder_spec if layout == "inplace" else decoder_spec)(model, manifest.names)
        export_graph(spec, cached)
    return cached


# -- the section ----------------------------------------------------------------------------------------


def _measure_layout(ctx: BenchContext, manifest: Manifest, layout: str, media_kv: Session, prompt_len: int,
                    steps: int, warmup: int) -> dict[str, Any]:
    graph = layout_graph(ctx, manifest, layout)
    context = prompt_len + warmup + steps + 1
    timed = TimedSession(open_session(graph, BackendConfig(intra_op_threads=ctx.threads)))
    measured = decode_steps(open_core(layout, timed, media_kv, manifest, context), timed, manifest, prompt_len,
                            steps, warmup)
    per_token = float(statistics.median(measured["step_s"]))
    return {
        "graph": str(graph.relative_to(ctx.artifacts)),
        "weights": decoder_weight_bytes(graph),
        "per_token_s": per_token,
        "per_token_min_s": float(min(measured["step_s"])),
        "session_run_s": float(statistics.median(measured["session_s"])),
        # per step, so that a step descheduled by other work does not move time between the two parts
        "python_overhead_s": float(statistics.median([w - i for w, i in zip(measured["step_s"], measured["session_s"])])),
    }


def run(ctx: BenchContext) -> dict[str, Any]:
    manifest = load_manifest(ctx.artifacts, verify=False)
    d = manifest.decoder
    prompt_len, steps, warmup = (64, 8, 2) if ctx.quick else (256, 32, 3)
    size = (256 if ctx.quick else 512) * MiB
    reps = 3 if ctx.quick else max(5, ctx.repeats)

    log.info("floor: read bandwidth (GEMV over %d MiB, best of %d)", size // MiB, reps)
    bandwidth = measure_read_bandwidth(size, reps, ctx.threads)
    copy = measure_bandwidth(size, reps, ctx.threads)
    bandwidth["copy_gb_s"] = copy["gb_s"]
    log.info("floor: read %.1f GB/s (copy %.1f GB/s)", bandwidth["gb_s"], copy["gb_s"])

    context = prompt_len + warmup + steps // 2  # mean context length over the timed steps
    kv_itemsize = 2 if manifest.kv_dtype == "float16" else 4
    kv_per_position = 2 * d.num_layers * d.num_heads * d.head_dim * kv_itemsize
    xattn = 2 * len(d.xattn_layers) * d.xattn_heads * manifest.vision.num_latents * d.xattn_head_dim * 4
    media_kv = open_session(ctx.artifacts / manifest.graphs["media_kv"].file, BackendConfig(intra_op_threads=ctx.threads))

    layouts: dict[str, Any] = {}
    primary = d.kv_layout
    for layout in [primary] + [x for x in ("inplace", "concat") if x != primary]:
        log.info("floor: %s layout, %d steps after a %d-token prefill", layout, steps, prompt_len)
        try:
            r = _measure_layout(ctx, manifest, layout, media_kv, prompt_len, steps, warmup)
        except ImportError as exc:  # the other layout needs the export extra (torch) to build
            layouts[layout] = {"skipped": f"needs the export extra to build the {layout} decoder: {exc}"}
            continue
        r["bytes_per_token"] = r["weights"]["per_token"] + kv_per_position * context + xattn
        r["floor_s"] = r["bytes_per_token"] / (bandwidth["gb_s"] * 1e9)
        r["ratio"] = r["per_token_s"] / r["floor_s"]
        log.info("floor: %s %.2f ms/token, floor %.2f ms (%.2fx)", layout, 1e3 * r["per_token_s"],
                 1e3 * r["floor_s"], r["ratio"])
        layouts[layout] = r
    head = layouts[primary]
    weights = head["weights"]
    result: dict[str, Any] = {
        "bandwidth": bandwidth,
        "decoder": {
            "kv_layout": primary,
            "weights": weights,
            "context_tokens": context,
            "kv_bytes_per_position": kv_per_position,
            "kv_bytes_read": kv_per_position * context,
            "xattn_memory_bytes": xattn,
            "bytes_per_token": head["bytes_per_token"],
        },
        "layouts": layouts,
        "floor_s": head["floor_s"],
        "prompt_tokens": prompt_len,
        "steps": steps,
        "per_token_s": head["per_token_s"],
        "per_token_min_s": head["per_token_min_s"],
        "session_run_s": head["session_run_s"],
        "python_overhead_s": head["python_overhead_s"],
        "ratio": head["ratio"],
    }
    inplace = layouts.get("inplace", {})
    targets = []
    if "ratio" in inplace:
        met = inplace["ratio"] <= FLOOR_TARGET
        note = (
            f"{inplace['bytes_per_token'] / 1e6:.1f} MB/token (weights {inplace['weights']['per_token'] / 1e6:.1f} MB"
            f" + KV at {context} tokens {kv_per_position * context / 1e6:.1f} MB) at {bandwidth['gb_s']:.1f} GB/s "
            f"read = {1e3 * inplace['floor_s']:.2f} ms; measured {1e3 * inplace['per_token_s']:.2f} ms"
        )
        concat = layouts.get("concat", {})
        if "per_token_s" in concat:
            note += f"; concat layout {1e3 * concat['per_token_s']:.2f} ms ({concat['ratio']:.2f}x)"
        if not met:
            log.info("floor: target missed; profiling %d decode steps", steps)
            graph = layout_graph(ctx, manifest, "inplace")
            profile = profile_decode(graph, "inplace", manifest, prompt_len, steps, media_kv, ctx.threads,
                                     prompt_len + steps + 2)
            result["profile"] = profile
            top = ", ".join(f"{o['op']} {o['share']:.0%}" for o in profile["top_ops"][:4])
            note += (
                f"; per step: session {1e3 * inplace['session_run_s']:.2f} ms (profiled kernel time by op: {top}; "
                f"{profile['kernels_s'] / max(1e-12, profile['model_run_s']):.0%} of a profiled run is in "
                f"kernels), Python outside the session {1e3 * inplace['python_overhead_s']:.2f} ms"
            )
        targets.append({
            "name": f"batch-1 decode per token (inplace KV) <= {FLOOR_TARGET}x the read-bandwidth floor",
            "value": inplace["ratio"],
            "target": FLOOR_TARGET,
            "met": met,
            "note": note,
        })
    result["targets"] = targets
    return result
