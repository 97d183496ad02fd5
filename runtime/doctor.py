"""``unimp doctor``: what this machine can run, and with ``--bench`` how fast each path runs the artifacts.

Checks: the onnxruntime distribution (``onnxruntime`` or ``onnxruntime-gpu``: both installed share one
package directory, and whichever was installed last wins, so that is reported as an error) and its
execution providers; the GPU through ``runtime.backends.cuda.probe`` (cuda-python); TensorRT (the real
bindings have ``tensorrt.Builder``: a stub package that only makes ``import tensorrt`` succeed does not
count); the CUDA driver and runtime versions; with ``--artifacts``, whether the manifest's TensorRT engines
match this GPU and TensorRT (``runtime.backends.engines.check_engines``).

Paths: ``cpu`` (ONNX Runtime CPU), ``ort-cuda`` (CUDA execution provider), ``ort-tensorrt`` (TensorRT
execution provider over the ONNX graphs) and ``tensorrt`` (native engines from ``unimp build-engines``).
``--bench`` opens the artifacts once per available path and times the same steps on each: the vision graph
(ms per image at batch 1 and at its largest batch), prefill (tokens/s) and decode (ms per token at batch 1;
ms per step and tokens/s at batch 8), reusing the benchmark helpers (``benchmarks.floor``, ``benchmarks.tasks``); a path that is not
available is listed with the reason. The report (``doctor.json`` and ``doctor.md``) records the machine
(CPU model, GPU, versions) so the README's support matrix can be filled from real runs.
"""

from __future__ import annotations

import json
import logging
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from runtime.backends.base import Provider

log = logging.getLogger(__name__)

ORT_DISTRIBUTIONS = ("onnxruntime", "onnxruntime-gpu")
PATHS = ("cpu", "ort-cuda", "ort-tensorrt", "tensorrt")
PROVIDER_OF: dict[str, Provider] = {"cpu": "cpu", "ort-cuda": "cuda", "ort-tensorrt": "tensorrt", "tensorrt": "tensorrt"}
"""The ``--provider`` each path is served with (``tensorrt`` runs engines when the manifest has them)."""
DECODE_BATCHES = (1, 8)


@dataclass
class PathStatus:
    name: str
    available: bool
    reason: str = ""
    """Why it is not available (or what was not checked)."""
    bench: dict[str, Any] = field(default_factory=dict)


@dataclass
class Report:
    machine: dict[str, Any]
    onnxruntime: dict[str, Any]
    gpu: dict[str, Any]
    tensorrt: dict[str, Any]
    engines: dict[str, Any]
    paths: list[PathStatus]
    problems: list[str]
    created: str = ""
    artifacts: str = ""

    def path(self, name: str) -> PathStatus:
        return next(p for p in self.paths if p.name == name)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# -- checks ---------------------------------------------------------------------------------------------


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def check_onnxruntime() -> tuple[dict[str, Any], list[str]]:
    installed = {d: v for d in ORT_DISTRIBUTIONS if (v := _version(d)) is not None}
    problems = []
    if len(installed) > 1:
        problems.append(
            "onnxruntime: both " + " and ".join(f"{d} {v}" for d, v in installed.items()) + " are installed; they "
            "share one package directory and the last one installed wins. Keep one: on a GPU machine "
            "`pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu`, elsewhere "
            "`pip uninstall -y onnxruntime-gpu`")
    info: dict[str, Any] = {"distributions": installed}
    try:
        import onnxruntime as ort
    except ImportError as exc:
        problems.append(f"onnxruntime: cannot be imported ({exc}); pip install onnxruntime (or onnxruntime-gpu)")
        info.update(version=None, providers=[], device=None)
        return info, problems
    info.update(version=ort.__version__, providers=list(ort.get_available_providers()), device=ort.get_device())
    return info, problems


def _cuda_version(value: int) -> str:
    """CUDA's encoded version (1000 * major + 10 * minor) as "major.minor"; "none" for 0."""
    return f"{value // 1000}.{value % 1000 // 10}" if value else "none"


def check_gpu(device_id: int = 0) -> dict[str, Any]:
    info: dict[str, Any] = {"cuda_python": _version("cuda-bindings") or _version("cuda-python")}
    try:
        from runtime.backends.cuda import probe
    except ImportError as exc:
        info.update(available=False, reason=f"runtime.backends.cuda is not in this build ({exc})")
        return info
    try:
        gpu = probe(device_id)
    except Exception as exc:  # CudaUnavailable names the missing package / driver / device
        info.update(available=False, reason=f"{type(exc).__name__}: {exc}")
        return info
    info.update(
        available=True, device_id=gpu.device_id, name=gpu.name, compute_capability=list(gpu.compute_capability),
        total_memory=gpu.total_memory, integrated=gpu.integrated, driver_version=_cuda_version(gpu.driver_version),
        runtime_version=_cuda_version(gpu.runtime_version),
    )
    return info


def check_tensorrt() -> dict[str, Any]:
    info: dict[str, Any] = {"distribution": next(
        (f"{d} {v}" for d in ("tensorrt", "tensorrt-cu12", "tensorrt-cu13", "tensorrt-stubs")
         if (v := _version(d)) is not None), None)}
    try:
        import tensorrt
    except ImportError as exc:
        info.update(available=False, version=None,
                    reason=f"the tensorrt package is not installed ({exc}); on Jetson it comes with JetPack, on x86 "
                           "pip install tensorrt (docs/jetson.md, docs/tensorrt.md)")
        return info
    except Exception as exc:  # PyPI's download stubs fail at import when libnvinfer is absent
        info.update(available=False, version=None, reason=f"import tensorrt failed: {type(exc).__name__}: {exc}")
        return info
    version = getattr(tensorrt, "__version__", None)
    if not hasattr(tensorrt, "Builder"):
        info.update(available=False, version=version,
                    reason="`import tensorrt` succeeds but it has no tensorrt.Builder: a stub or type-stub package, "
                           "not TensorRT's Python bindings")
        return info
    info.update(available=True, version=version, reason="")
    return info


def check_engines(artifacts: Path | None) -> dict[str, Any]:
    if artifacts is None:
        return {"checked": False, "reason": "no --artifacts given"}
    from runtime.manifest import load_manifest

    manifest = load_manifest(artifacts, verify=False)
    listed = sorted(getattr(manifest, "engines", None) or {})
    if not listed:  # a manifest reader that predates the engines section
        raw = json.loads((Path(artifacts) / "manifest.json").read_text(encoding="utf-8"))
        listed = sorted(raw.get("engines") or {})
    if not listed:
        return {"checked": False, "present": False, "reason": "the manifest lists no TensorRT engines (build them "
                f"on this machine with `unimp build-engines {artifacts}`)", "engines": []}
    try:
        from runtime.backends.engines import check_engines as check
    except ImportError as exc:
        return {"checked": False, "present": True, "engines": [],
                "reason": f"engine checks are not in this build (runtime.backends.engines: {exc})"}
    try:
        results = check(manifest, Path(artifacts))
    except Exception as exc:  # no GPU / TensorRT to compare against: say so
        return {"checked": False, "present": True, "engines": [], "reason": f"{type(exc).__name__}: {exc}"}
    engines = [{"graph": r.graph, "ok": bool(r.ok), "reason": r.reason, "rebuild": r.rebuild} for r in results]
    return {"checked": True, "present": True, "ok": all(e["ok"] for e in engines), "engines": engines, "reason": ""}


def _paths(ort_info: dict[str, Any], gpu: dict[str, Any], trt: dict[str, Any], engines: dict[str, Any]) -> list[PathStatus]:
    providers = set(ort_info.get("providers") or [])
    version = ort_info.get("version")
    gpu_reason = "" if gpu.get("available") else f"no usable GPU: {gpu.get('reason')}"
    out = [PathStatus("cpu", "CPUExecutionProvider" in providers,
                      "" if "CPUExecutionProvider" in providers else f"onnxruntime {version} has no CPU provider")]

    def ort_path(name: str, ep: str, extra: str = "") -> PathStatus:
        if ep not in providers:
            return PathStatus(name, False, f"onnxruntime {version} has no {ep} (providers: {sorted(providers)}): "
                                           "pip uninstall onnxruntime && pip install onnxruntime-gpu")
        if gpu_reason:
            return PathStatus(name, False, gpu_reason)
        return PathStatus(name, not extra, extra)

    out.append(ort_path("ort-cuda", "CUDAExecutionProvider"))
    out.append(ort_path("ort-tensorrt", "TensorrtExecutionProvider",
                        "" if trt.get("available") else f"TensorRT libraries: {trt.get('reason')}"))
    if not trt.get("available"):
        out.append(PathStatus("tensorrt", False, f"TensorRT: {trt.get('reason')}"))
    elif gpu_reason:
        out.append(PathStatus("tensorrt", False, gpu_reason))
    elif not engines.get("present"):
        out.append(PathStatus("tensorrt", False, engines.get("reason", "no engines")))
    elif not engines.get("checked") or not engines.get("ok"):
        bad = [f"{e['graph']}: {e['reason']} ({e['rebuild']})" for e in engines.get("engines", []) if not e["ok"]]
        out.append(PathStatus("tensorrt", False, "; ".join(bad) or engines.get("reason", "engines not checked")))
    else:
        out.append(PathStatus("tensorrt", True))
    if engines.get("present"):
        # provider tensorrt runs the engines when the manifest has them: the EP is not timed on these artifacts
        ep = next(p for p in out if p.name == "ort-tensorrt")
        if ep.available:
            ep.available = False
            ep.reason = ("the manifest has TensorRT engines, so provider tensorrt runs them natively (path tensorrt); "
                         "time the execution provider on an artifacts directory without engines")
    return out


def machine() -> dict[str, Any]:
    try:
        from benchmarks.context import machine_info

        info = machine_info()
    except ImportError:
        info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                "python": platform.python_version()}
    info["machine"] = platform.machine()
    try:
        info["jetson"] = Path("/etc/nv_tegra_release").read_text(encoding="utf-8").splitlines()[0].strip()
    except OSError:
        pass
    return info


def diagnose(artifacts: Path | None = None) -> Report:
    ort_info, problems = check_onnxruntime()
    gpu = check_gpu()
    trt = check_tensorrt()
    engines = check_engines(artifacts)
    if engines.get("checked") and not engines.get("ok"):
        problems.extend(f"engine {e['graph']}: {e['reason']}; rebuild: {e['rebuild']}"
                        for e in engines["engines"] if not e["ok"])
    return Report(machine=machine(), onnxruntime=ort_info, gpu=gpu, tensorrt=trt, engines=engines,
                  paths=_paths(ort_info, gpu, trt, engines), problems=problems,
                  created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                  artifacts=str(artifacts) if artifacts else "")


# -- bench ----------------------------------------------------------------------------------------------


def _median_s(call: Any, repeats: int) -> float:
    call()  # warm-up: first call of a shape
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return float(statistics.median(times))


def bench_path(artifacts: Path, path: str, repeats: int = 5, prompt_tokens: int = 64, decode_steps: int = 8,
               threads: int = 0) -> dict[str, Any]:
    """Open ``artifacts`` on ``path``'s provider and time vision, prefill and decode (medians)."""
    from benchmarks.floor import prompt_ids
    from benchmarks.tasks import runner_step_s
    from runtime.backends import BackendConfig
    from runtime.decoder.core import PrefillInput
    from runtime.engine import Runtime, RuntimeConfig

    config = RuntimeConfig(backend=BackendConfig(provider=PROVIDER_OF[path], intra_op_threads=threads),
                           background_encode=False, progress=False, max_active=max(DECODE_BATCHES))
    t0 = time.perf_counter()
    rt = Runtime.open(artifacts, config)
    open_s = time.perf_counter() - t0
    try:
        m = rt.manifest
        size = m.vision.image_size
        rng = np.random.default_rng(0)
        out: dict[str, Any] = {"open_s": open_s, "repeats": repeats}
        for batch in sorted({1, rt.vision.max_batch}):
            pixels = rng.standard_normal((batch, 3, size, size)).astype(np.float32)
            out[f"vision_ms_per_image_b{batch}"] = 1e3 * _median_s(lambda p=pixels: rt.vision.encode(p), repeats) / batch
        prompt = min(prompt_tokens, rt.max_context - decode_steps - 4)
        latents = rng.standard_normal((1, m.vision.num_latents, m.vision.width)).astype(np.float32)
        memory = rt.decoder.media_kv(latents)
        ids = prompt_ids(m, prompt)

        def prefill() -> None:
            seq = rt.decoder.open()
            try:
                rt.decoder.prefill(seq, PrefillInput(ids, memory))
            finally:
                rt.decoder.release(seq)

        out["prompt_tokens"] = prompt
        out["prefill_tokens_per_s"] = prompt / _median_s(prefill, repeats)
        for rows in DECODE_BATCHES:  # one step gives every row its next token
            step = runner_step_s(rt, rows, prompt, max(repeats, decode_steps))
            out[f"decode_ms_per_step_b{rows}"] = 1e3 * step
            out[f"decode_tokens_per_s_b{rows}"] = rows / step
        session = getattr(rt.vision, "_session", None)
        out["providers"] = list(session.providers) if session is not None else []
        return out
    finally:
        rt.close()


def run_bench(report: Report, artifacts: Path, repeats: int, prompt_tokens: int, threads: int) -> None:
    for status in report.paths:
        if not status.available:
            continue
        log.info("doctor: timing path %s", status.name)
        try:
            status.bench = bench_path(artifacts, status.name, repeats=repeats, prompt_tokens=prompt_tokens,
                                      threads=threads)
        except Exception as exc:  # one broken path must not hide the others' numbers
            status.bench = {"error": f"{type(exc).__name__}: {exc}"}
            report.problems.append(f"path {status.name}: benchmark failed: {type(exc).__name__}: {exc}")


# -- rendering ------------------------------------------------------------------------------------------

BENCH_COLUMNS = (
    ("vision_ms_per_image_b1", "vision ms/image (b1)"),
    ("vision_ms_per_image_bmax", "vision ms/image (max batch)"),
    ("prefill_tokens_per_s", "prefill tokens/s"),
    ("decode_ms_per_step_b1", "decode ms/token (b1)"),
    ("decode_ms_per_step_b8", "decode ms/step (b8)"),
    ("decode_tokens_per_s_b8", "decode tokens/s (b8)"),
)


def _bench_value(bench: dict[str, Any], key: str) -> str:
    if key == "vision_ms_per_image_bmax":
        batches = [k for k in bench if k.startswith("vision_ms_per_image_b") and k != "vision_ms_per_image_b1"]
        if not batches:
            return "-"
        key = batches[0]
        return f"{bench[key]:.2f} (b{key.rsplit('_b', 1)[1]})"
    value = bench.get(key)
    return "-" if value is None else f"{value:.1f}" if "tokens_per_s" in key else f"{value:.2f}"


def render_text(report: Report) -> str:
    o, g, t = report.onnxruntime, report.gpu, report.tensorrt
    dists = ", ".join(f"{d} {v}" for d, v in o["distributions"].items()) or "none"
    lines = [
        f"machine: {report.machine.get('cpu_model', report.machine.get('processor'))}, "
        f"{report.machine.get('cpus')} CPUs, Python {report.machine.get('python')}, {report.machine.get('platform')}",
        f"onnxruntime: {o.get('version')} ({dists}); providers: {', '.join(o.get('providers') or []) or 'none'}",
        ("gpu: " + (f"{g['name']}, compute capability {g['compute_capability'][0]}.{g['compute_capability'][1]}, "
                    f"{g['total_memory'] / 2**30:.1f} GiB{' (integrated)' if g.get('integrated') else ''}; CUDA driver "
                    f"{g['driver_version']}, runtime {g['runtime_version']}" if g.get("available")
                    else f"unavailable: {g.get('reason')}")),
        "tensorrt: " + (f"{t.get('version')}" if t.get("available") else f"unavailable: {t.get('reason')}"),
        f"cuda-python: {g.get('cuda_python') or 'not installed'}",
    ]
    e = report.engines
    if e.get("checked"):
        for eng in e["engines"]:
            lines.append(f"engine {eng['graph']}: {'matches' if eng['ok'] else 'MISMATCH: ' + eng['reason']}"
                         + ("" if eng["ok"] else f" (rebuild: {eng['rebuild']})"))
    elif report.artifacts:
        lines.append(f"engines: not checked: {e.get('reason')}")
    lines.append("paths:")
    for p in report.paths:
        state = "available" if p.available else f"unavailable: {p.reason}"
        if p.available and p.name != "cpu" and not p.bench:
            state += " (the provider is listed; only a run proves it works: --bench)"
        lines.append(f"  {p.name:<13} {state}")
        if p.bench and "error" not in p.bench:
            lines.append("    " + ", ".join(f"{label} {_bench_value(p.bench, key)}" for key, label in BENCH_COLUMNS))
        elif p.bench:
            lines.append(f"    benchmark failed: {p.bench['error']}")
    for problem in report.problems:
        lines.append(f"problem: {problem}")
    return "\n".join(lines)


def render_markdown(report: Report) -> str:
    g, o, t = report.gpu, report.onnxruntime, report.tensorrt
    out = [
        "# unimp doctor report",
        "",
        f"- created: {report.created}",
        f"- artifacts: `{report.artifacts}`" if report.artifacts else "- artifacts: none",
        f"- CPU: {report.machine.get('cpu_model', report.machine.get('processor'))} ({report.machine.get('cpus')} "
        f"CPUs), {report.machine.get('platform')}, Python {report.machine.get('python')}",
        f"- GPU: {g['name']} (compute capability {'.'.join(map(str, g['compute_capability']))}, CUDA driver "
        f"{g['driver_version']}, runtime {g['runtime_version']})" if g.get("available")
        else f"- GPU: none ({g.get('reason')})",
        f"- onnxruntime {o.get('version')} ({', '.join(f'{d} {v}' for d, v in o['distributions'].items())}); "
        f"providers {', '.join(o.get('providers') or [])}",
        f"- TensorRT: {t.get('version')}" if t.get("available") else f"- TensorRT: none ({t.get('reason')})",
    ]
    if report.machine.get("jetson"):
        out.append(f"- Jetson: {report.machine['jetson']}")
    out += ["", "| path | available | " + " | ".join(label for _, label in BENCH_COLUMNS) + " |",
            "|---|---|" + "---|" * len(BENCH_COLUMNS)]
    for p in report.paths:
        if p.bench and "error" not in p.bench:
            cells = [_bench_value(p.bench, key) for key, _ in BENCH_COLUMNS]
            out.append(f"| {p.name} | yes | " + " | ".join(cells) + " |")
        elif p.bench:
            out.append(f"| {p.name} | yes, failed: {p.bench['error']} | " + " | ".join("-" for _ in BENCH_COLUMNS) + " |")
        else:
            state = "yes (not timed)" if p.available else f"no: {p.reason}"
            out.append(f"| {p.name} | {state.replace('|', '/')} | " + " | ".join("-" for _ in BENCH_COLUMNS) + " |")
    timed = [p.bench for p in report.paths if p.bench and "error" not in p.bench]
    if timed:
        out += ["", f"Medians of {timed[0]['repeats']} repeats after a warm-up; prefill of "
                    f"{timed[0]['prompt_tokens']} tokens with one image; decode steps through the decoder core "
                    "(a batch-8 step gives each of 8 sequences its next token)."]
    if report.problems:
        out += ["", "## Problems", ""] + [f"- {p}" for p in report.problems]
    return "\n".join(out) + "\n"


def write_report(report: Report, out: Path) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    js, md = out / "doctor.json", out / "doctor.md"
    js.write_text(json.dumps(report.to_dict(), indent=2) + "\n", encoding="utf-8")
    md.write_text(render_markdown(report), encoding="utf-8")
    return js, md


# -- command line ---------------------------------------------------------------------------------------


def add_doctor_arguments(parser: Any) -> None:
    parser.description = (
        "Print what this machine can run: the onnxruntime package (onnxruntime or onnxruntime-gpu; both "
        "installed is a problem) and its providers, the GPU (cuda-python), TensorRT and CUDA versions, and with "
        "--artifacts whether the manifest's TensorRT engines match. --bench opens the artifacts on every "
        "available path (cpu, ort-cuda, ort-tensorrt, tensorrt) and times vision, prefill and decode side by "
        "side, writing doctor.json and doctor.md to --out. Exit 0 when no problem was found, 1 otherwise, 2 "
        "for bad usage.")
    parser.add_argument("--artifacts", type=Path, default=None, metavar="ART",
                        help="artifacts directory: check its engines (and what --bench runs)")
    parser.add_argument("--bench", action="store_true", help="time every available path on --artifacts")
    parser.add_argument("--out", type=Path, default=None, metavar="DIR",
                        help="write doctor.json and doctor.md here (default with --bench: doctor-report)")
    parser.add_argument("--repeats", type=int, default=5, metavar="N",
                        help="timed repetitions per measurement after one warm-up (default: %(default)s)")
    parser.add_argument("--prompt-tokens", type=int, default=64, metavar="N",
                        help="prefill length in tokens (default: %(default)s, capped by the model's context)")
    parser.add_argument("--threads", type=int, default=0, metavar="N",
                        help="ONNX Runtime intra-op threads (default: 0, all physical cores)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def run_doctor(args: Any) -> int:
    from runtime.manifest import ManifestError

    if args.bench and args.artifacts is None:
        print("error: --bench: needs --artifacts ART", file=sys.stderr)
        return 2
    for name in ("repeats", "prompt_tokens"):
        if getattr(args, name) < 1:
            print(f"error: --{name.replace('_', '-')}: must be >= 1, got {getattr(args, name)}", file=sys.stderr)
            return 2
    if args.threads < 0:
        print(f"error: --threads: must be >= 0, got {args.threads}", file=sys.stderr)
        return 2
    try:
        report = diagnose(args.artifacts)
        if args.bench:
            run_bench(report, args.artifacts, args.repeats, args.prompt_tokens, args.threads)
    except (ManifestError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(report.to_dict(), indent=2) if args.json else render_text(report))
    out = args.out if args.out is not None else (Path("doctor-report") if args.bench else None)
    if out is not None:
        js, md = write_report(report, out)
        print(f"wrote {js} and {md}", file=sys.stderr)
    return 1 if report.problems else 0
