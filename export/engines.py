"""``unimp build-engines``: TensorRT engines built on the target GPU from an artifacts directory's graphs.

One engine per graph, from its ONNX file and the optimisation profiles runtime.backends.engines derives
from the manifest (the decoder: a ``prefill`` and a ``decode`` profile). The network is strongly typed:
precision comes from the ONNX graphs themselves (fp16 / Q/DQ graphs written by ``unimp quantize``), never
from builder flags, which is what TensorRT 10 and 11 both accept. A timing cache (per GPU model and
TensorRT version) is loaded before and saved after each build, so rebuilds on the same device are fast.
Every engine is recorded in the manifest's ``engines`` section with the key ``unimp serve --provider
tensorrt`` checks at load. Needs TensorRT and a GPU; without them it fails at once naming what is missing.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from runtime.backends.engines import Profile, engine_key, engine_profiles
from runtime.manifest import MANIFEST_NAME, EngineEntry, Manifest, ManifestError, load_manifest, sha256_file

if TYPE_CHECKING:
    import tensorrt

log = logging.getLogger(__name__)

PRECISIONS = ("fp16", "int8", "int4")
INPLACE_MIN_TENSORRT = (10, 15)
"""First TensorRT whose ONNX parser imports TensorScatter (the inplace KV layout's update op)."""


class BuildError(Exception):
    """Bad settings, a graph TensorRT rejects, or a missing TensorRT / GPU; the message starts with the flag
    or the graph concerned."""


@dataclass(frozen=True)
class BuildConfig:
    precision: str | None = None
    """Only graphs of this precision (``--graphs`` given: each must have it); None: every graph as exported."""
    workspace_gb: float = 4.0
    """TensorRT's WORKSPACE memory-pool limit for tactics, GiB."""
    out: Path | None = None
    """Where the engines go (default: ART/engines)."""
    graphs: tuple[str, ...] = ()
    """Graph keys to build (default: every graph of the manifest)."""
    timing_cache: Path | None = None
    """Timing cache file (default: OUT/timing-<gpu>-trt<version>.cache)."""
    opt_level: int = 3
    """builder_optimization_level, 0 (fast build; ignores the timing cache) .. 5 (slow build)."""
    progress: bool = True

    def validate(self) -> None:
        if self.precision is not None and self.precision not in PRECISIONS:
            raise BuildError(f"--precision: must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if not 0 < self.workspace_gb <= 1024:
            raise BuildError(f"--workspace-gb: must be in (0, 1024], got {self.workspace_gb}")
        if not 0 <= self.opt_level <= 5:
            raise BuildError(f"--opt-level: must be 0..5, got {self.opt_level}")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-").lower()


def select_graphs(manifest: Manifest, config: BuildConfig) -> list[str]:
    """The graph keys to build, checked against ``--graphs`` and ``--precision``."""
    known = list(manifest.graphs)
    for g in config.graphs:
        if g not in manifest.graphs:
            raise BuildError(f"--graphs: {g!r} is not a graph of this manifest ({', '.join(known)})")
    chosen = list(config.graphs) or known
    if config.precision is None:
        return chosen
    if config.graphs:
        wrong = [f"{g} is {manifest.graphs[g].precision}" for g in chosen if manifest.graphs[g].precision != config.precision]
        if wrong:
            raise BuildError(f"--precision: {config.precision} was asked for but {', '.join(wrong)}; build those from "
                             f"a {config.precision} artifacts directory written by `unimp quantize`")
        return chosen
    matching = [g for g in chosen if manifest.graphs[g].precision == config.precision]
    if not matching:
        found = ", ".join(f"{g} {manifest.graphs[g].precision}" for g in chosen)
        raise BuildError(f"--precision: no graph of this artifacts directory is {config.precision} ({found}); "
                         f"write a {config.precision} variant with `unimp quantize` and build from it")
    return matching


def _progress_monitor(trt: Any, bar: Any) -> Any:
    """A TensorRT IProgressMonitor that shows the current build phase on the graph's progress bar."""
    base = getattr(trt, "IProgressMonitor", None)
    if base is None or bar is None:
        return None

    class Monitor(base):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            super().__init__()
            self.phases: dict[str, tuple[int, int]] = {}

        # TensorRT calls phase_start(phase_name, parent_phase, num_steps): the trampoline in
        # python/src/infer/pyCore.cpp passes phaseName first, as the simple_progress_monitor sample expects
        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            self.phases[phase_name] = (0, num_steps)
            bar.set_postfix_str(phase_name, refresh=True)

        def step_complete(self, phase_name: str, step: int) -> bool:
            _, total = self.phases.get(phase_name, (0, 0))
            self.phases[phase_name] = (step + 1, total)
            bar.set_postfix_str(f"{phase_name} {step + 1}/{total}", refresh=True)
            return True  # False would cancel the build

        def phase_finish(self, phase_name: str) -> None:
            self.phases.pop(phase_name, None)

    return Monitor()


def build_plan(
    trt: Any, onnx_path: Path, profiles: list[Profile], config: BuildConfig, timing_cache: Path, *,
    graph: str, bar: Any = None,
) -> bytes:
    """One serialized engine: strongly typed network, the given profiles, the timing cache loaded and saved."""
    logger: tensorrt.Logger = trt.Logger(trt.Logger.WARNING)
    builder: tensorrt.Builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser: tensorrt.OnnxParser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # the path form also resolves external-data weights
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BuildError(f"graphs.{graph} ({onnx_path.name}): TensorRT {trt.__version__}'s ONNX parser rejected it: "
                         f"{errors or 'no details'} (`unimp preflight` checks the graphs against TensorRT's ONNX "
                         "operator support without a GPU)")
    cfg = builder.create_builder_config()
    cfg.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(config.workspace_gb * (1 << 30)))
    cfg.builder_optimization_level = config.opt_level
    inputs = [network.get_input(i) for i in range(network.num_inputs)]
    for profile in profiles:
        prof = builder.create_optimization_profile()
        for tensor in inputs:
            if all(int(d) >= 0 for d in tensor.shape):
                continue
            shapes = profile.shapes.get(tensor.name)
            if shapes is None:
                raise BuildError(f"graphs.{graph}.inputs.{tensor.name}: dynamic in the ONNX graph but the manifest "
                                 f"gives no profile for it (profile {profile.name!r})")
            prof.set_shape(tensor.name, shapes["min"], shapes["opt"], shapes["max"])
        if cfg.add_optimization_profile(prof) < 0:
            raise BuildError(f"graphs.{graph}: TensorRT rejected the {profile.name!r} optimisation profile "
                             f"{profile.shapes}")
    data = timing_cache.read_bytes() if timing_cache.is_file() else b""
    cache = cfg.create_timing_cache(data)
    cfg.set_timing_cache(cache, False)
    monitor = _progress_monitor(trt, bar)
    if monitor is not None:
        cfg.progress_monitor = monitor
    plan = builder.build_serialized_network(network, cfg)
    if plan is None:
        raise BuildError(f"graphs.{graph}: TensorRT could not build the engine (see its log above; a smaller "
                         "--workspace-gb or --opt-level helps when the device runs out of memory)")
    tuned = cfg.get_timing_cache()
    if tuned is not None:
        timing_cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = timing_cache.with_suffix(timing_cache.suffix + ".tmp")
        tmp.write_bytes(bytes(tuned.serialize()))
        os.replace(tmp, timing_cache)
    return bytes(plan)


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", version)[:2])


def build_engines(artifacts: Path | str, config: BuildConfig) -> dict[str, EngineEntry]:
    """Build the selected graphs' engines, record them in ``ARTIFACTS/manifest.json``; the new entries."""
    from runtime.backends import cuda
    from runtime.backends.tensorrt_package import TensorRTUnavailable, tensorrt_module

    config.validate()
    try:
        trt = tensorrt_module()
        gpu = cuda.probe()
    except (TensorRTUnavailable, cuda.CudaUnavailable) as exc:
        raise BuildError(f"unimp build-engines needs TensorRT and an NVIDIA GPU on this machine: {exc}") from exc
    root = Path(artifacts)
    try:
        manifest = load_manifest(root)
    except ManifestError as exc:
        raise BuildError(f"ART: {exc}") from exc
    graphs = select_graphs(manifest, config)
    version = str(trt.__version__)
    out = Path(config.out) if config.out is not None else root / "engines"
    out.mkdir(parents=True, exist_ok=True)
    timing = config.timing_cache or out / f"timing-{_slug(gpu.name)}-trt{_slug(version)}.cache"
    if "decoder" in graphs and manifest.decoder.kv_layout == "inplace":
        if manifest.decoder.attention == "gqa":
            log.warning("the decoder uses com.microsoft.GroupQueryAttention, an onnxruntime contrib op that "
                        "TensorRT's ONNX parser does not import; export it with --kv-layout concat for TensorRT")
        elif _version_tuple(version) < INPLACE_MIN_TENSORRT:
            log.warning("TensorRT %s predates TensorScatter import (10.15): the inplace decoder may not parse; "
                        "export with --kv-layout concat for this TensorRT (JetPack 6 ships 10.3)", version)
    log.info("building %s on %s with TensorRT %s", ", ".join(graphs), cuda.describe(gpu), version)
    from tqdm import tqdm

    entries: dict[str, EngineEntry] = {}
    bar = tqdm(graphs, desc="build-engines", unit="engine", disable=not config.progress)
    for graph in bar:
        entry = manifest.graphs[graph]
        bar.set_description(f"build-engines {graph}")
        try:
            profiles = engine_profiles(graph, entry)
        except ValueError as exc:
            raise BuildError(str(exc)) from exc
        started = time.perf_counter()
        plan = build_plan(trt, root / entry.file, profiles, config, timing, graph=graph, bar=bar)
        file = out / f"{graph}.engine"
        tmp = file.with_suffix(".engine.tmp")
        tmp.write_bytes(plan)
        os.replace(tmp, file)
        entries[graph] = EngineEntry(
            file=os.path.relpath(file, root), sha256=sha256_file(file),
            key=engine_key(graph, entry, gpu, version), profiles=[p.name for p in profiles],
        )
        log.info("built %s (%.1f MiB, profiles %s) in %.1f s", file, file.stat().st_size / 2**20,
                 ", ".join(p.name for p in profiles), time.perf_counter() - started)
        _record(root, {graph: entries[graph]})  # after every engine: a later failure keeps the earlier ones
    return entries


def _record(root: Path, entries: dict[str, EngineEntry]) -> None:
    """Add ``entries`` to the manifest's ``engines`` section (the rest of the file is kept as it is)."""
    path = root / MANIFEST_NAME
    data = json.loads(path.read_text(encoding="utf-8"))
    section = dict(data.get("engines") or {})
    section.update({g: asdict(e) for g, e in entries.items()})
    data["engines"] = section
    Manifest.from_dict(data)  # still readable
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def parse_graphs(text: str | None) -> tuple[str, ...]:
    return tuple(g.strip() for g in (text or "").split(",") if g.strip())


def main(args: Any) -> int:
    """The ``unimp build-engines`` command (arguments from unimp.cli)."""
    import sys

    config = BuildConfig(precision=args.precision, workspace_gb=args.workspace_gb, out=args.out,
                         graphs=parse_graphs(args.graphs), timing_cache=args.timing_cache, opt_level=args.opt_level,
                         progress=not args.quiet)
    try:
        entries = build_engines(args.artifacts, config)
    except BuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for graph, e in entries.items():
        print(f"  {graph:<13} {e.file:<28} TensorRT {e.key.tensorrt_version} on {e.key.gpu_name} "
              f"(sm {e.key.compute_capability}), {e.key.precision}, profiles {', '.join(e.profiles)}")
    print(f"recorded {len(entries)} engine(s) in {Path(args.artifacts) / MANIFEST_NAME}")
    return 0


def add_arguments(p: Any, precisions: Sequence[str] = PRECISIONS) -> None:
    p.add_argument("artifacts", type=Path, metavar="ART", help="artifacts directory (unimp export / unimp quantize)")
    p.add_argument("--precision", choices=list(precisions), default=None,
                   help="only the graphs of this precision; with --graphs, check each has it (precision is carried "
                        "by the ONNX graphs, e.g. from `unimp quantize`; default: every graph as exported)")
    p.add_argument("--workspace-gb", type=float, default=4.0, metavar="N",
                   help="TensorRT workspace memory-pool limit in GiB (default: %(default)s; lower it on an 8 GB Orin)")
    p.add_argument("--out", type=Path, default=None, metavar="DIR", help="engine directory (default: ART/engines)")
    p.add_argument("--graphs", default=None, metavar="G,G",
                   help="comma-separated graph keys to build (default: every graph in the manifest)")
    p.add_argument("--timing-cache", type=Path, default=None, metavar="PATH",
                   help="TensorRT timing cache, loaded and saved (default: OUT/timing-<gpu>-trt<version>.cache)")
    p.add_argument("--opt-level", type=int, choices=range(6), default=3, metavar="0-5",
                   help="builder optimisation level: 0 builds fastest (and skips the timing cache), 5 searches "
                        "longest (default: %(default)s)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
