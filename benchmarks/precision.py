"""The precision ladder side by side: every variant directory of ``--variants`` measured in one run.

Per variant (``LABEL=DIR``; without ``--variants``, the benchmarked artifacts alone as ``fp32``): batch-1
decode per token (the decoder core, as in the ``floor`` section), prefill tokens per second, vision
milliseconds per image, peak RSS, the graph files' bytes, the bandwidth floor of its decoder (its weight
bytes per token, as stored, plus the KV and cross-attention memory read, over one read-bandwidth
measurement shared by all variants) and the accuracy guard numbers its manifest records.

Each variant is measured in a fresh child process (``python -m benchmarks.precision DIR``), one after the
other, so that its peak RSS is its own and one variant's allocations do not slow the next; the read
bandwidth is measured once in the parent.

The variants are measured in ``rounds`` interleaved passes (fp32, int8, int4, fp32, int8, int4, ...): an fp32
decode step is bound by memory bandwidth and a quantized one by compute, so a neighbour's load on a shared
machine moves the two apart; each round's ratio compares measurements taken seconds apart, and the reported
ratio is the median of the rounds' ratios (with their range).

With ``hugepages`` every variant is also measured with glibc's malloc on transparent huge pages
(``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``, read by glibc >= 2.35 at process start; the kernel's THP mode must
be ``madvise`` or ``always``) as ``LABEL+hp``, in the same rounds, and compared with the first variant's
``+hp`` run: a decode step streams every weight once, and 2 MiB pages save most of its TLB misses. Each
child reports its ``AnonHugePages``, so a machine where the setting takes no effect shows 0.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.context import BenchContext

log = logging.getLogger(__name__)

MiB = 1 << 20
TEXT_GRAPHS = ("decoder", "media_kv", "vision")
# decode time of a quantized decoder over the fp32 one, batch 1, after the in-place KV pool
DECODE_TARGETS = {"int8": 0.35, "int4": 0.30}
PROFILE_STEPS = 8
HUGEPAGES_TUNABLE = "glibc.malloc.hugetlb=1"
HP_SUFFIX = "+hp"


def parse_variants(values: list[str] | None) -> dict[str, Path]:
    """``["fp32=ART", "int8=DIR"]`` -> {label: path}; a bare DIR is labelled by its directory name."""
    out: dict[str, Path] = {}
    for value in values or []:
        label, sep, path = value.partition("=")
        if not sep:
            label, path = Path(value).name, value
        if not label or not path:
            raise ValueError(f"--variants: {value!r} is not LABEL=DIR")
        if label in out:
            raise ValueError(f"--variants: label {label!r} given twice")
        if not (Path(path) / "manifest.json").is_file():
            raise ValueError(f"--variants: {label}={path} holds no manifest.json")
        out[label] = Path(path)
    return out


def graph_bytes(artifacts: Path) -> dict[str, int]:
    """Bytes on disk of each text graph, its external data files included."""
    from runtime.manifest import load_manifest

    manifest = load_manifest(artifacts, verify=False)
    out: dict[str, int] = {}
    for name in TEXT_GRAPHS:
        path = artifacts / manifest.graphs[name].file
        total = path.stat().st_size
        try:
            from export.quantize import external_data_files

            total += sum(Path(f).stat().st_size for f in external_data_files(path))
        except ImportError:  # onnx not installed: the .onnx file alone
            pass
        out[name] = total
    return out


def _proc_bytes(path: str, key: str) -> int:
    """One ``KEY: N kB`` line of a ``/proc/self`` file in bytes, 0 off Linux or when absent."""
    try:
        with open(path) as handle:
            for line in handle:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _status_bytes(key: str) -> int:
    """A ``/proc/self/status`` memory line (``VmRSS``, ``VmHWM``: the peak RSS of this process image; unlike
    getrusage's ru_maxrss it does not inherit the parent's peak across fork + exec), 0 off Linux."""
    return _proc_bytes("/proc/self/status", key)


def _rss_bytes() -> int:
    return _status_bytes("VmRSS")


def _anon_huge_bytes() -> int:
    """Anonymous memory of this process on transparent huge pages (``/proc/self/smaps_rollup``), 0 off Linux."""
    return _proc_bytes("/proc/self/smaps_rollup", "AnonHugePages")


def hugepage_facts() -> dict[str, str]:
    """The kernel's transparent-huge-page mode and the C library, which decide whether the tunable acts."""
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
        mode = text[text.index("[") + 1:text.index("]")]
    except (OSError, ValueError):
        mode = "unknown"
    try:
        libc = os.confstr("CS_GNU_LIBC_VERSION") or "unknown"
    except (AttributeError, ValueError, OSError):
        libc = "unknown"
    return {"transparent_hugepage": mode, "libc": libc, "tunable": f"GLIBC_TUNABLES={HUGEPAGES_TUNABLE}"}


def child_env(hugepages: bool | None) -> dict[str, str]:
    """The environment of a measuring child: unchanged (None), or with glibc's huge-page tunable set (True) or
    removed (False), the other tunables kept."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    if hugepages is None:
        return env
    kept = [t for t in env.get("GLIBC_TUNABLES", "").split(":") if t and not t.startswith("glibc.malloc.hugetlb=")]
    tunables = [*kept, HUGEPAGES_TUNABLE] if hugepages else kept
    if tunables:
        env["GLIBC_TUNABLES"] = ":".join(tunables)
    else:
        env.pop("GLIBC_TUNABLES", None)
    return env


def measure_variant(artifacts: Path, threads: int, prompt_len: int, steps: int, warmup: int,
                    repeats: int) -> dict[str, Any]:
    """One variant's timings and memory in this process (run it in a fresh one: see ``_child``)."""
    from benchmarks.floor import TimedSession, decode_steps, open_core, prompt_ids
    from runtime.backends import BackendConfig, open_session
    from runtime.decoder.core import PrefillInput
    from runtime.manifest import load_manifest

    manifest = load_manifest(artifacts, verify=False)
    m = manifest
    backend = BackendConfig(intra_op_threads=threads)
    rss_start = _rss_bytes()
    t0 = time.perf_counter()
    vision = open_session(artifacts / m.graphs["vision"].file, backend)
    media_kv = open_session(artifacts / m.graphs["media_kv"].file, backend)
    timed = TimedSession(open_session(artifacts / m.graphs["decoder"].file, backend))
    load_s = time.perf_counter() - t0
    context = prompt_len + warmup + steps + 1
    core = open_core(m.decoder.kv_layout, timed, media_kv, m, context)

    pixels = np.random.default_rng(0).standard_normal((1, 3, m.vision.image_size, m.vision.image_size)).astype(np.float32)
    vision.run({m.names.pixel_values: pixels})  # warm-up
    vision_s = []
    for _ in range(repeats):
        t = time.perf_counter()
        vision.run({m.names.pixel_values: pixels})
        vision_s.append(time.perf_counter() - t)

    latents = np.random.default_rng(0).standard_normal((1, m.vision.num_latents, m.vision.width)).astype(np.float32)
    memory = core.media_kv(latents)
    ids = prompt_ids(m, prompt_len)
    prefill_s = []
    for i in range(repeats + 1):  # the first is a warm-up
        seq = core.open()
        try:
            t = time.perf_counter()
            core.prefill(seq, PrefillInput(ids, memory))
            if i:
                prefill_s.append(time.perf_counter() - t)
        finally:
            core.release(seq)
    measured = decode_steps(core, timed, m, prompt_len, steps, warmup)
    per_token = float(statistics.median(measured["step_s"]))
    return {
        "decoder_precision": m.graphs["decoder"].precision,
        "kv_layout": m.decoder.kv_layout,
        "load_s": load_s,
        "vision_s_per_image": float(statistics.median(vision_s)),
        "prefill_s": float(statistics.median(prefill_s)),
        "prefill_tokens_per_s": prompt_len / float(statistics.median(prefill_s)),
        "decode_s_per_token": per_token,
        "decode_min_s_per_token": float(min(measured["step_s"])),
        "rss_start_bytes": rss_start,
        "rss_bytes": _rss_bytes(),
        "peak_rss_bytes": _status_bytes("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "anon_huge_bytes": _anon_huge_bytes(),
    }


def _child(artifacts: Path, threads: int, prompt_len: int, steps: int, warmup: int, repeats: int,
           hugepages: bool | None = None) -> dict[str, Any]:
    env = child_env(hugepages)
    cmd = [sys.executable, "-m", "benchmarks.precision", str(artifacts), "--threads", str(threads),
           "--prompt", str(prompt_len), "--steps", str(steps), "--warmup", str(warmup), "--repeats", str(repeats)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"measuring {artifacts} failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def guard_numbers(artifacts: Path) -> dict[str, Any] | None:
    """The accuracy guard a quantized variant's manifest records (None for an unquantized directory)."""
    data = json.loads((artifacts / "manifest.json").read_text(encoding="utf-8"))
    section = (data.get("source") or {}).get("quantization")
    if not section:
        return None
    guard = section.get("guard")
    out: dict[str, Any] = {"precision": section.get("precision"), "format": section.get("format"),
                           "run": guard is not None}
    if guard is not None:
        out.update({"passed": guard.get("passed"), "failed_tasks": guard.get("failed_tasks", []),
                    "differences": guard.get("differences", {}), "split": guard.get("split"),
                    "users": guard.get("users"),
                    "tasks": {t: v.get("passed") for t, v in (guard.get("tasks") or {}).items()}})
    return out


def run(ctx: BenchContext) -> dict[str, Any]:
    from benchmarks.floor import decoder_weight_bytes, measure_read_bandwidth
    from runtime.manifest import load_manifest

    variants: dict[str, Path] = dict(ctx.extra.get("variants") or {}) or {"fp32": ctx.artifacts}
    prompt_len, steps, warmup = (64, 8, 2) if ctx.quick else (256, 32, 3)
    size = (64 if ctx.quick else 512) * MiB
    bandwidth = measure_read_bandwidth(size, 3 if ctx.quick else max(5, ctx.repeats), ctx.threads)
    context = prompt_len + warmup + steps // 2
    out: dict[str, Any] = {"bandwidth": bandwidth, "prompt_tokens": prompt_len, "steps": steps,
                           "context_tokens": context, "threads": ctx.threads, "variants": {}}
    rounds = max(1, int(ctx.extra.get("rounds") or (1 if ctx.quick else 3)))
    out["rounds"] = rounds
    # label -> (directory, huge pages: None leaves the environment as it is, True / False set / unset them)
    runs: dict[str, tuple[Path, bool | None]] = {label: (path, None) for label, path in variants.items()}
    first = next(iter(variants))
    if ctx.extra.get("hugepages"):
        out["hugepages"] = hugepage_facts()
        runs = {}
        for label, path in variants.items():
            runs[label] = (path, False)
            runs[label + HP_SUFFIX] = (path, True)
    measured: dict[str, list[dict[str, Any]]] = {label: [] for label in runs}
    for i in range(rounds):
        for label, (path, hugepages) in runs.items():
            log.info("precision: round %d/%d, %s (%s)", i + 1, rounds, label, path)
            measured[label].append(_child(path, ctx.threads, prompt_len, steps, warmup, ctx.repeats, hugepages))
    for label, (path, hugepages) in runs.items():
        manifest = load_manifest(path, verify=False)
        d = manifest.decoder
        kv_itemsize = 2 if manifest.kv_dtype == "float16" else 4
        kv = 2 * d.num_layers * d.num_heads * d.head_dim * kv_itemsize * context
        xattn = 2 * len(d.xattn_layers) * d.xattn_heads * manifest.vision.num_latents * d.xattn_head_dim * 4
        weights = decoder_weight_bytes(path / manifest.graphs["decoder"].file)
        files = graph_bytes(path)
        r: dict[str, Any] = {"artifacts": str(path), "precisions": {g: manifest.graphs[g].precision for g in TEXT_GRAPHS},
                             "file_bytes": files, "total_file_bytes": sum(files.values()),
                             "weight_bytes_per_token": weights["per_token"],
                             "bytes_per_token": weights["per_token"] + kv + xattn}
        r["floor_s"] = r["bytes_per_token"] / (bandwidth["gb_s"] * 1e9)
        r.update(combine_rounds(measured[label], prompt_len))
        r["floor_ratio"] = r["decode_s_per_token"] / r["floor_s"]
        r["guard"] = guard_numbers(path)
        r["hugepages"] = hugepages
        # the reference of its ratios: the first variant, measured the same way (+hp against the first's +hp)
        r["reference"] = first + HP_SUFFIX if hugepages else first
        out["variants"][label] = r
    for label, r in out["variants"].items():
        base = out["variants"][r["reference"]]
        # round i's ratio: this variant's decode time over its reference's, measured in the same pass
        ratios = [v / b for v, b in zip(r["decode_rounds_s"], base["decode_rounds_s"], strict=True)]
        r["decode_vs_first_rounds"] = ratios
        r["decode_vs_first"] = float(statistics.median(ratios))
        if r["hugepages"]:  # the same directory with the tunable over without it, per round
            plain = out["variants"][label.removesuffix(HP_SUFFIX)]["decode_rounds_s"]
            r["decode_vs_plain_rounds"] = [v / b for v, b in zip(r["decode_rounds_s"], plain, strict=True)]
            r["decode_vs_plain"] = float(statistics.median(r["decode_vs_plain_rounds"]))
    out["targets"] = _targets(out, {label: path for label, (path, _) in runs.items()}, prompt_len)
    return out


def combine_rounds(records: list[dict[str, Any]], prompt_len: int) -> dict[str, Any]:
    """One variant's child records (one per round) -> medians of the timings, the memory of the last round
    (a first round may also optimise the graphs and write the optimised-graph cache, which the later rounds
    read: the last is what a server start with a warm cache holds)."""
    first, last = records[0], records[-1]
    prefill = float(statistics.median(rec["prefill_s"] for rec in records))
    return {
        "decoder_precision": first["decoder_precision"],
        "kv_layout": first["kv_layout"],
        "load_s": float(statistics.median(rec["load_s"] for rec in records)),
        "vision_s_per_image": float(statistics.median(rec["vision_s_per_image"] for rec in records)),
        "prefill_s": prefill,
        "prefill_tokens_per_s": prompt_len / prefill,
        "decode_rounds_s": [rec["decode_s_per_token"] for rec in records],
        "decode_s_per_token": float(statistics.median(rec["decode_s_per_token"] for rec in records)),
        "decode_min_s_per_token": min(rec["decode_min_s_per_token"] for rec in records),
        "rss_start_bytes": last["rss_start_bytes"],
        "rss_bytes": last["rss_bytes"],
        "peak_rss_bytes": last["peak_rss_bytes"],
        "anon_huge_bytes": last.get("anon_huge_bytes", 0),
    }


def _profile(artifacts: Path, prompt_len: int, threads: int) -> dict[str, Any]:
    """The decode-step profile of one variant's decoder (benchmarks.floor.profile_decode)."""
    from benchmarks.floor import profile_decode
    from runtime.backends import BackendConfig, open_session
    from runtime.manifest import load_manifest

    m = load_manifest(artifacts, verify=False)
    media_kv = open_session(artifacts / m.graphs["media_kv"].file, BackendConfig(intra_op_threads=threads))
    return profile_decode(artifacts / m.graphs["decoder"].file, m.decoder.kv_layout, m, prompt_len, PROFILE_STEPS,
                          media_kv, threads, prompt_len + PROFILE_STEPS + 2)


def _ops(profile: dict[str, Any]) -> str:
    return ", ".join(f"{o['op']} {o['share']:.0%}" for o in profile["top_ops"][:4])


def _targets(out: dict[str, Any], variants: dict[str, Path], prompt_len: int) -> list[dict[str, Any]]:
    """One target per int8 / int4 variant: decode time vs its fp32 reference (the first variant, or the first's
    ``+hp`` run) and a passing guard. A missed ratio is explained by onnxruntime profiles of both decoders,
    taken in this process (one per directory: a ``+hp`` run shares its directory's profile)."""
    profiles: dict[Path, dict[str, Any]] = {}

    def profile(label: str) -> dict[str, Any]:
        path = variants[label]
        if path not in profiles:
            profiles[path] = _profile(path, prompt_len, out["threads"])
        return profiles[path]

    targets = []
    for label, v in out["variants"].items():
        base_label = v["reference"]
        base = out["variants"][base_label]
        precision = v["precisions"]["decoder"]
        if label == base_label or base["precisions"]["decoder"] != "fp32" or precision not in DECODE_TARGETS:
            continue
        target = DECODE_TARGETS[precision]
        guard = v.get("guard") or {}
        fast = v["decode_vs_first"] <= target
        guarded = bool(guard.get("run") and guard.get("passed"))
        ratios = v["decode_vs_first_rounds"]
        spread = ("" if len(ratios) == 1 else
                  f"median of {len(ratios)} interleaved rounds, range {min(ratios):.2f}-{max(ratios):.2f}x, "
                  f"{sum(x <= target for x in ratios)} of {len(ratios)} at or under {target}x; ")
        note = (spread + f"{1e3 * v['decode_s_per_token']:.2f} vs {1e3 * base['decode_s_per_token']:.2f} ms/token; weights "
                f"{v['weight_bytes_per_token'] / 1e6:.1f} vs {base['weight_bytes_per_token'] / 1e6:.1f} MB/token, "
                f"floor {1e3 * v['floor_s']:.2f} ms (measured {v['floor_ratio']:.2f}x it); guard: "
                + ("not run" if not guard.get("run") else "passed" if guarded
                   else "FAILED (" + ", ".join(guard.get("failed_tasks") or []) + ")"))
        if not fast:
            log.info("precision: %s misses %.2fx; profiling %d decode steps of it and of %s", label, target,
                     PROFILE_STEPS, base_label)
            base["profile"], v["profile"] = profile(base_label), profile(label)
            note += (f"; profiled kernel time by op: {label} {_ops(v['profile'])}; {base_label} "
                     f"{_ops(base['profile'])} (onnxruntime outside kernels {1e3 * v['profile']['ort_overhead_s']:.2f}"
                     f" vs {1e3 * base['profile']['ort_overhead_s']:.2f} ms per profiled step)")
        targets.append({"name": f"`{label}` ({precision}) decode <= {target}x `{base_label}`, guard passed",
                        "value": v["decode_vs_first"], "target": target, "met": fast and guarded, "note": note})
    return targets


def _guard_cell(g: dict[str, Any] | None) -> str:
    if g is None:
        return "(source)"
    if not g.get("run"):
        return "not run"
    diffs = g.get("differences") or {}
    shown = ", ".join(f"{k} {v:+.3f}" for k, v in diffs.items() if isinstance(v, int | float))
    verdict = "passed" if g.get("passed") else f"FAILED ({', '.join(g.get('failed_tasks') or [])})"
    return f"{verdict}; {shown}" if shown else verdict


def render_markdown(r: dict[str, Any], h: str) -> str:
    from benchmarks.report import ms, size, table

    rows = []
    for label, v in r.get("variants", {}).items():
        ratios = v.get("decode_vs_first_rounds") or [v["decode_vs_first"]]
        spread = f" ({min(ratios):.2f}-{max(ratios):.2f})" if len(ratios) > 1 and v.get("reference", label) != label else ""
        if "decode_vs_plain" in v:
            spread += f"; {v['decode_vs_plain']:.2f}x without"
        rows.append([f"`{label}`", v["precisions"]["decoder"], f"{ms(v['decode_s_per_token'])} ms",
                     f"{v['decode_vs_first']:.2f}x{spread}", f"{v['prefill_tokens_per_s']:.0f}",
                     f"{ms(v['vision_s_per_image'])} ms", size(v["peak_rss_bytes"]), size(v.get("anon_huge_bytes", 0)),
                     size(v["total_file_bytes"]),
                     f"{ms(v['floor_s'])} ms ({v['floor_ratio']:.2f}x)", _guard_cell(v.get("guard"))])
    bw = r.get("bandwidth", {})
    intro = (f"Batch 1, {r.get('threads')} threads, decode after a {r.get('prompt_tokens')}-token prefill "
             f"(median of {r.get('steps')} steps); floor = decoder weight bytes per token as stored + KV at "
             f"{r.get('context_tokens')} tokens + one image's cross-attention memory, at "
             f"{bw.get('gb_s', 0.0):.1f} GB/s read. Each variant measured in its own process, in "
             f"{r.get('rounds', 1)} interleaved round(s); times are medians over the rounds, \"vs first\" the median "
             "of the rounds' ratios (their range in brackets), memory that of the last round.")
    hp = r.get("hugepages")
    if hp:
        intro += (f" `+hp`: the same directory with {hp['tunable']} (THP mode `{hp['transparent_hugepage']}`, "
                  f"{hp['libc']}), its ratio against the first variant's `+hp` run; the others with the tunable "
                  "unset.")
    head = ["variant", "decoder", "decode / token", "vs first", "prefill tok/s", "vision / image", "peak RSS",
            "on huge pages", "graph bytes", "floor (measured/floor)", "guard (differences vs fp32)"]
    return f"{h} Precision variants\n\n{intro}\n\n{table(head, rows)}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="measure one artifacts directory (the precision section's child)")
    parser.add_argument("artifacts", type=Path)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt", type=int, default=256)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    a = parser.parse_args(argv)
    result = measure_variant(a.artifacts, a.threads, a.prompt, a.steps, a.warmup, a.repeats)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
