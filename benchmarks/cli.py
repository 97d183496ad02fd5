"""``unimp bench``: run the benchmark sections and write results.json, results.md and plots/.

Sections are imported lazily by name (``benchmarks.<module>``, each exposing ``run(ctx) -> dict``); a
section whose module is not present is skipped with a note, and a section that fails is recorded with its
error while the others still run. Sections run in a fixed order, the in-process Runtime measurements
first, so that the peak RSS they report is not inflated by the sections that load torch or allocate the
bandwidth arrays.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import shlex
import sys
import time
import traceback
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from benchmarks.context import BenchContext, machine_info
from benchmarks.report import SHARED_CORES

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Section:
    module: str
    function: str
    description: str


SECTIONS: dict[str, Section] = {  # in run order
    "tasks": Section("benchmarks.tasks", "run", "per-task latency, prefix cache, inline images, 1 vs 8 streams, memory"),
    "image": Section("benchmarks.tasks", "run_image", "GenerateImage per stage"),
    "floor": Section("benchmarks.floor", "run", "memory-bandwidth floor vs measured batch-1 decode"),
    "baselines": Section("benchmarks.baselines", "run", "upstream open-flamingo, PyTorch reference, diffusers"),
    "load": Section("benchmarks.load", "run", "gRPC load sweep, time to SERVING, server peak RSS"),
    "cluster": Section("benchmarks.cluster", "run",
                       "Ray Serve: 1 vs 2 replicas, per-call overhead, affinity vs default router hit rate"),
    "precision": Section("benchmarks.precision", "run",
                         "precision variants side by side: decode, prefill, vision, RSS, bytes, floor, guard"),
}
DEFAULT_SECTIONS = "tasks,floor,baselines,load,image"
PACKAGES = ("unimp-edge", "numpy", "onnxruntime", "onnx", "tokenizers", "torch", "transformers", "diffusers",
            "open-flamingo", "open_clip_torch", "grpcio", "matplotlib", "ray")


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", choices=["tiny", "small"], default="small",
                        help="demo model to benchmark (default: small, 253M parameters)")
    parser.add_argument("--artifacts", type=Path, default=None,
                        help="artifacts directory (default: out/bench-<preset>; the demo is exported there if missing)")
    parser.add_argument("--out", type=Path, default=Path("bench-results"),
                        help="where results.json, results.md and plots/ are written (default: bench-results)")
    parser.add_argument("--sections", default=DEFAULT_SECTIONS,
                        help=f"comma-separated sections to run, of {','.join(SECTIONS)} (default: all)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed repetitions per measurement after a warm-up (default 5, 2 with --quick)")
    parser.add_argument("--quick", action="store_true", help="fewer repeats, tokens and steps (smoke runs)")
    parser.add_argument("--variants", nargs="+", default=None, metavar="LABEL=DIR",
                        help="precision section: the artifacts directories to compare, e.g. fp32=ART int8=DIR "
                             "int4=DIR (`unimp quantize` outputs; the first is the reference of the ratios; "
                             "default: --artifacts alone)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="precision section: measure the variants this many times, interleaved (fp32, int8, "
                             "int4, fp32, ...), and report each ratio as the median of the rounds' ratios "
                             "(default 3, 1 with --quick)")
    parser.add_argument("--hugepages", action="store_true",
                        help="precision section: also measure every variant with glibc's malloc on transparent "
                             "huge pages (GLIBC_TUNABLES=glibc.malloc.hugetlb=1; glibc >= 2.35, THP mode madvise "
                             "or always) as LABEL+hp, against the first variant's +hp run")
    parser.add_argument("--threads", type=int, default=2,
                        help="intra-op threads for ONNX Runtime and torch, equal on both sides (default 2)")
    parser.add_argument("--update-readme", action="store_true",
                        help="also copy the plots to docs/bench/ and rewrite README.md's Performance results")


# -- machine load -----------------------------------------------------------------------------------------


def _busy_jiffies() -> int | None:
    try:
        with open("/proc/stat") as handle:
            fields = [int(x) for x in handle.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return sum(fields[:8]) - idle


def _own_cpu_s() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _loadavg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


class CpuMeter:
    """How many cores other processes kept busy while we ran: all busy CPU time (/proc/stat) minus ours."""

    def __init__(self) -> None:
        self._wall = time.perf_counter()
        self._busy = _busy_jiffies()
        self._own = _own_cpu_s()
        self._tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self._wall

    def read(self) -> dict[str, float]:
        wall = max(1e-9, self.elapsed)
        own = (_own_cpu_s() - self._own) / wall
        busy_now = _busy_jiffies()
        if self._busy is None or busy_now is None:
            return {"own_cores": own}
        busy = (busy_now - self._busy) / self._tick / wall
        return {"own_cores": round(own, 3), "busy_cores": round(busy, 3), "other_cores": round(max(0.0, busy - own), 3)}


# -- helpers ----------------------------------------------------------------------------------------------


def _versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def _json_default(value: Any) -> Any:
    import numpy as np

    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, set | frozenset | tuple):
        return list(value)
    return repr(value)


def _ensure_artifacts(artifacts: Path, preset: str) -> None:
    if (artifacts / "manifest.json").is_file():
        return
    print(f"no artifacts in {artifacts}: exporting the {preset} demo there (once) ...", flush=True)
    from export.pipeline import export_demo

    manifest = export_demo(preset, artifacts, seed=0, progress=True, with_diffusion=True, with_vqgan=True)
    print(f"exported {manifest.model_name} ({manifest.source.get('parameters', 0) / 1e6:.1f}M parameters)", flush=True)


def _checkpoint(artifacts: Path, manifest: dict[str, Any]) -> Path:
    source = Path(str(manifest.get("source", {}).get("checkpoint", "checkpoint")))
    return source if source.is_absolute() else artifacts / source


def _command(args: argparse.Namespace, order: list[str], artifacts: Path, out: Path, repeats: int) -> str:
    """The command line that reproduces this run."""
    parts = ["unimp", "bench", "--preset", str(args.preset), "--artifacts", str(artifacts), "--out", str(out),
             "--sections", ",".join(order), "--repeats", str(repeats), "--threads", str(args.threads)]
    if args.quick:
        parts.append("--quick")
    if getattr(args, "rounds", None):
        parts += ["--rounds", str(args.rounds)]
    if getattr(args, "hugepages", False):
        parts.append("--hugepages")
    if getattr(args, "variants", None):
        parts += ["--variants", *args.variants]
    return " ".join(shlex.quote(p) for p in parts)


def run_section(name: str, ctx: BenchContext) -> dict[str, Any]:
    """One section's results, or {"skipped": why} when its module is missing, or {"error": ...}."""
    spec = SECTIONS[name]
    try:
        module = importlib.import_module(spec.module)
    except ModuleNotFoundError as exc:
        if exc.name == spec.module:
            return {"skipped": f"{spec.module} is not present in this checkout"}
        return {"skipped": f"{spec.module} needs {exc.name!r}, which is not installed"}
    try:
        result = getattr(module, spec.function)(ctx)
    except Exception as exc:
        log.exception("section %s failed", name)
        return {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
    if not isinstance(result, dict):
        return {"error": f"{spec.module}.{spec.function} returned {type(result).__name__}, not a dict"}
    return result


def collect_targets(sections: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for name, result in sections.items():
        for t in result.get("targets", []) if isinstance(result, dict) else []:
            out.append({"section": name, "name": t.get("name"), "value": t.get("value"), "target": t.get("target"),
                        "met": bool(t.get("met")), "note": t.get("note", "")})
    return out


# -- the command ------------------------------------------------------------------------------------------


def run_bench(args: argparse.Namespace) -> int:
    from benchmarks import report

    names = [s.strip() for s in str(args.sections).split(",") if s.strip()]
    unknown = [s for s in names if s not in SECTIONS]
    if unknown or not names:
        print(f"error: unknown section(s) {unknown or names}; choose from {','.join(SECTIONS)}", file=sys.stderr)
        return 2
    if args.repeats is not None and args.repeats < 1:
        print("error: --repeats must be >= 1", file=sys.stderr)
        return 2
    if args.threads < 1:
        print("error: --threads must be >= 1", file=sys.stderr)
        return 2
    if getattr(args, "rounds", None) is not None and args.rounds < 1:
        print("error: --rounds must be >= 1", file=sys.stderr)
        return 2
    order = [s for s in SECTIONS if s in names]
    try:
        from benchmarks.precision import parse_variants

        variants = parse_variants(getattr(args, "variants", None))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    preset: str = args.preset
    artifacts = Path(args.artifacts) if args.artifacts else Path("out") / f"bench-{preset}"
    out = Path(args.out)
    try:
        _ensure_artifacts(artifacts, preset)
    except ImportError as exc:
        print(f"error: exporting the demo needs the export extra (pip install 'unimp-edge[export]'): {exc}",
              file=sys.stderr)
        return 2
    manifest = json.loads((artifacts / "manifest.json").read_text(encoding="utf-8"))
    demo = manifest.get("source", {}).get("demo")
    if args.artifacts and demo and demo != preset:
        log.warning("--preset %s but %s holds the %s demo; reporting it as %s", preset, artifacts, demo, demo)
        preset = str(demo)
    repeats = args.repeats or (2 if args.quick else 5)
    ctx = BenchContext(artifacts=artifacts, checkpoint=_checkpoint(artifacts, manifest), out=out, repeats=repeats,
                       quick=bool(args.quick), threads=int(args.threads),
                       extra={"preset": preset, "variants": variants, "rounds": getattr(args, "rounds", None),
                              "hugepages": bool(getattr(args, "hugepages", False))})
    out.mkdir(parents=True, exist_ok=True)

    started = datetime.now(timezone.utc)
    loadavg_start = _loadavg()
    meter = CpuMeter()
    results: dict[str, Any] = {
        "schema": 1,
        "command": _command(args, order, artifacts, out, repeats),
        "started_at": started.isoformat(timespec="seconds"),
        "machine": machine_info(),
        "packages": _versions(),
        "config": {
            "preset": preset, "artifacts": str(artifacts), "checkpoint": str(ctx.checkpoint), "out": str(out),
            "sections": order, "repeats": repeats, "quick": ctx.quick, "threads": ctx.threads,
            "model": manifest.get("model_name"), "parameters": manifest.get("source", {}).get("parameters", 0),
        },
        "sections": {},
        "section_seconds": {},
        "section_contention": {},
    }
    print(f"benchmarking {manifest.get('model_name')} from {artifacts}: {', '.join(order)} "
          f"({repeats} repeats, {ctx.threads} threads{', quick' if ctx.quick else ''})", flush=True)
    for i, name in enumerate(order, 1):
        print(f"[{i}/{len(order)}] {name}: {SECTIONS[name].description} ...", flush=True)
        t0, section_meter = time.perf_counter(), CpuMeter()
        result = run_section(name, ctx)
        elapsed = time.perf_counter() - t0
        results["sections"][name] = result
        results["section_seconds"][name] = round(elapsed, 2)
        results["section_contention"][name] = section_meter.read()
        state = ("skipped: " + str(result["skipped"]) if "skipped" in result
                 else "FAILED: " + str(result["error"]) if "error" in result else "done")
        print(f"      {name} {state} ({elapsed:.1f} s)", flush=True)

    contention: dict[str, Any] = dict(meter.read())
    contention.update({"loadavg_start": loadavg_start, "loadavg_end": _loadavg(),
                       "shared": contention.get("other_cores", 0.0) > SHARED_CORES
                       or any(c.get("other_cores", 0.0) > SHARED_CORES for c in results["section_contention"].values())})
    results["machine"]["contention"] = contention
    results["duration_s"] = round(meter.elapsed, 1)
    results["targets"] = collect_targets(results["sections"])
    results["plots"] = report.write_plots(results, out / "plots")
    (out / "results.json").write_text(json.dumps(results, indent=2, default=_json_default) + "\n", encoding="utf-8")
    (out / "results.md").write_text(report.render_markdown(results), encoding="utf-8")

    print(f"\nwrote {out / 'results.json'}, {out / 'results.md'} and {len(results['plots'])} plots in {out / 'plots'}")
    if contention.get("shared"):
        print(f"note: other processes kept {contention['other_cores']:.2f} cores busy on average: timings are noisy")
    for t in results["targets"]:
        value = t["value"] if isinstance(t["value"], int | float) else float("nan")
        print(f"  [{'met' if t['met'] else 'MISSED'}] {t['section']}: {t['name']}: {value:.3g}")
    if args.update_readme:
        report.update_readme(results, out / "plots", report.REPO_ROOT / "README.md", report.REPO_ROOT / "docs" / "bench")
        print(f"updated {report.REPO_ROOT / 'README.md'} and docs/bench/")
    failed = [n for n, r in results["sections"].items() if "error" in r]
    if failed:
        print(f"section(s) failed: {', '.join(failed)} (see results.json)", file=sys.stderr)
        return 1
    return 0
