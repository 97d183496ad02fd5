"""TensorRT engine cache keys: which profiles an engine is built with, what it is valid for, and whether
the engines a manifest lists can run on this machine.

An engine (a serialized TensorRT plan) runs only on the TensorRT version and GPU model that built it, and
is stale once its ONNX graph, precision or profiles change. ``unimp build-engines`` records an
``EngineKey`` per engine in the manifest; ``check_engines`` compares each one with this machine and says
what differs and the command that rebuilds it.

Profiles: every graph gets one profile from its manifest profiles (inputs without one take the ranges of
the symbolic dims they share with inputs that have one). The decoder gets two where its inputs have a
``seq`` dim that can be 1: ``prefill`` (the manifest ranges, opt at a typical prompt length) and
``decode`` (every ``seq`` dim pinned to 1: one new token per row), each run by its own execution context.
"""

from __future__ import annotations

import hashlib
import json
import shlex
from dataclasses import dataclass
from pathlib import Path

from runtime.backends.cuda import CudaUnavailable, GpuInfo, probe
from runtime.manifest import EngineEntry, EngineKey, GraphEntry, Manifest, TensorSpec, sha256_file
from runtime.types import Unavailable

__all__ = [
    "EngineCheck",
    "EngineEntry",
    "EngineKey",
    "EngineMismatch",
    "Profile",
    "check_engine",
    "check_engines",
    "engine_key",
    "engine_profiles",
    "profile_hash",
    "rebuild_command",
]

SEQ_DIM = "seq"
PAST_DIM = "past"
"""The concat layout's cached length (runtime.manifest DecoderDims: past K/V are (B, H, past, hd))."""
"""The symbolic dim of the tokens fed per call (decoder inputs ``input_ids``, ``text_time``, ...)."""
PREFILL_OPT_SEQ = 128
"""Prefill profile: the prompt length TensorRT tunes kernels for (clamped into the profile's range)."""
PROFILE_GRAPHS_WITH_DECODE = ("decoder",)

Range = tuple[int, int, int]


class EngineMismatch(Unavailable):
    """An engine in the manifest cannot run here (other TensorRT / GPU, stale graph): rebuild it."""


@dataclass(frozen=True)
class Profile:
    """One TensorRT optimisation profile: input name -> {"min": shape, "opt": shape, "max": shape}."""

    name: str
    shapes: dict[str, dict[str, list[int]]]


@dataclass(frozen=True)
class EngineCheck:
    graph: str
    ok: bool
    reason: str
    """Empty when ok; else what differs (or is missing)."""
    rebuild: str
    """The command that rebuilds this engine on this machine."""


def _dims(spec: TensorSpec) -> list[int | str]:
    return list(spec.shape)


def symbol_ranges(entry: GraphEntry) -> dict[str, Range]:
    """(min, opt, max) of each symbolic dim, read off the inputs that have a manifest profile."""
    ranges: dict[str, Range] = {}
    for spec in entry.inputs:
        prof = entry.profiles.get(spec.name)
        if not prof:
            continue
        for i, dim in enumerate(_dims(spec)):
            if isinstance(dim, str) and i < len(prof["min"]):
                ranges.setdefault(dim, (int(prof["min"][i]), int(prof["opt"][i]), int(prof["max"][i])))
    return ranges


def _range_of(dim: str, ranges: dict[str, Range], where: str) -> Range:
    if dim in ranges:
        return ranges[dim]
    parts = [p.strip() for p in dim.split("+")]
    if len(parts) > 1 and all(p in ranges for p in parts):
        lo, opt, hi = zip(*(ranges[p] for p in parts))
        return sum(lo), sum(opt), sum(hi)
    raise ValueError(f"{where}: no profile range for the symbolic dim {dim!r}")


def _base_shapes(graph: str, entry: GraphEntry) -> dict[str, dict[str, list[int]]]:
    ranges = symbol_ranges(entry)
    shapes: dict[str, dict[str, list[int]]] = {}
    for spec in entry.inputs:
        dims = _dims(spec)
        if not any(isinstance(d, str) for d in dims):
            continue  # static: no profile entry needed
        if spec.name in entry.profiles:
            prof = entry.profiles[spec.name]
            shapes[spec.name] = {k: [int(x) for x in prof[k]] for k in ("min", "opt", "max")}
            continue
        lo, opt, hi = [], [], []
        for d in dims:
            r = (d, d, d) if isinstance(d, int) else _range_of(d, ranges, f"graphs.{graph}.inputs.{spec.name}")
            lo.append(r[0])
            opt.append(r[1])
            hi.append(r[2])
        shapes[spec.name] = {"min": lo, "opt": opt, "max": hi}
    return shapes


def _pin_seq(entry: GraphEntry, shapes: dict[str, dict[str, list[int]]], value: int | None) -> dict[str, dict[str, list[int]]]:
    """A copy with every ``seq`` dim pinned to ``value`` (decode), or its opt moved to a typical prompt
    length (prefill, ``value`` None)."""
    out = {name: {k: list(v) for k, v in prof.items()} for name, prof in shapes.items()}
    seq_max = max((prof["max"][i] for spec in entry.inputs if (prof := shapes.get(spec.name))
                   for i, dim in enumerate(_dims(spec)) if dim == SEQ_DIM), default=1)
    for spec in entry.inputs:
        if spec.name not in out:
            continue
        prof = out[spec.name]
        for i, dim in enumerate(_dims(spec)):
            if dim == SEQ_DIM:
                if value is None:
                    prof["opt"][i] = max(prof["min"][i], min(PREFILL_OPT_SEQ, prof["max"][i]))
                else:
                    prof["min"][i] = prof["opt"][i] = prof["max"][i] = value
            elif dim == PAST_DIM and value is not None:
                # the manifest's one profile splits the positions between a prompt (seq) and its past; a
                # decode step's past may take all but the new tokens: past + seq stays within the positions
                prof["max"][i] += seq_max - value
    return out


def engine_profiles(graph: str, entry: GraphEntry) -> list[Profile]:
    """The optimisation profiles ``graph`` is built with, in index order."""
    shapes = _base_shapes(graph, entry)
    if graph in PROFILE_GRAPHS_WITH_DECODE:
        seq = [
            (prof["min"][i], prof["max"][i])
            for spec in entry.inputs
            if (prof := shapes.get(spec.name))
            for i, dim in enumerate(_dims(spec))
            if dim == SEQ_DIM
        ]
        if seq and all(lo <= 1 for lo, _ in seq) and any(hi > 1 for _, hi in seq):
            return [Profile("prefill", _pin_seq(entry, shapes, None)), Profile("decode", _pin_seq(entry, shapes, 1))]
    return [Profile("default", shapes)]


def profile_hash(profiles: list[Profile]) -> str:
    canonical = json.dumps([[p.name, p.shapes] for p in profiles], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def engine_key(graph: str, entry: GraphEntry, gpu: GpuInfo, tensorrt_version: str) -> EngineKey:
    """The key an engine of ``graph`` built here, now, gets."""
    return EngineKey(
        tensorrt_version=tensorrt_version,
        gpu_name=gpu.name,
        compute_capability=".".join(map(str, gpu.compute_capability)),
        precision=entry.precision,
        profile_hash=profile_hash(engine_profiles(graph, entry)),
        graph_sha256=entry.sha256,
    )


def rebuild_command(root: Path | str, graphs: list[str] | None = None, precision: str | None = None) -> str:
    """The ``unimp build-engines`` command line that rebuilds these engines."""
    parts = ["unimp", "build-engines", str(root)]
    if graphs:
        parts += ["--graphs", ",".join(graphs)]
    if precision and precision != "fp32":
        parts += ["--precision", precision]
    return shlex.join(parts)


def _where(key: EngineKey) -> str:
    return f"TensorRT {key.tensorrt_version} on {key.gpu_name} (sm {key.compute_capability})"


def key_differences(built: EngineKey, here: EngineKey) -> list[str]:
    """What differs between the key an engine was built for and this machine's, in words (empty: it matches)."""
    diffs = []
    if (built.tensorrt_version, built.gpu_name, built.compute_capability) != (
        here.tensorrt_version, here.gpu_name, here.compute_capability
    ):
        diffs.append(f"built for {_where(built)}, this is {_where(here)}")
    if built.graph_sha256 != here.graph_sha256:
        diffs.append("its ONNX graph changed since the build (sha256 "
                     f"{built.graph_sha256[:12] or '?'} -> {here.graph_sha256[:12] or '?'})")
    if built.precision != here.precision:
        diffs.append(f"built at precision {built.precision}, the graph is now {here.precision}")
    if built.profile_hash != here.profile_hash:
        diffs.append("the graph's optimisation profiles changed since the build")
    return diffs


def check_engine(
    manifest: Manifest, root: Path, graph: str, gpu: GpuInfo, tensorrt_version: str, *, verify_file: bool = True,
) -> EngineCheck:
    root = Path(root)
    entry = manifest.engines[graph]
    rebuild = rebuild_command(root, [graph], entry.key.precision)
    if graph not in manifest.graphs:
        return EngineCheck(graph, False, f"the manifest has no graph {graph!r} for this engine", rebuild)
    file = root / entry.file
    if not file.is_file():
        return EngineCheck(graph, False, f"engine file {file} is missing", rebuild)
    if verify_file and entry.sha256 and sha256_file(file) != entry.sha256:
        return EngineCheck(graph, False, f"engine file {file} does not match its sha256 (modified or truncated)",
                           rebuild)
    here = engine_key(graph, manifest.graphs[graph], gpu, tensorrt_version)
    diffs = key_differences(entry.key, here)
    return EngineCheck(graph, not diffs, "; ".join(diffs), rebuild)


def check_engines(
    manifest: Manifest, root: Path | str, *, gpu: GpuInfo | None = None, tensorrt_version: str | None = None,
) -> list[EngineCheck]:
    """One check per engine in the manifest, against this machine's GPU and TensorRT (probed when not given).

    Without a GPU or TensorRT every engine fails its check with the reason naming what is missing.
    """
    root = Path(root)
    graphs = list(manifest.engines)
    missing = ""
    if graphs and gpu is None:
        try:
            gpu = probe()
        except CudaUnavailable as exc:
            missing = str(exc)
    if graphs and tensorrt_version is None and not missing:
        from runtime.backends.tensorrt_package import TensorRTUnavailable, tensorrt_module

        try:
            tensorrt_version = str(tensorrt_module().__version__)
        except TensorRTUnavailable as exc:
            missing = str(exc)
    if missing or gpu is None or tensorrt_version is None:
        return [
            EngineCheck(g, False, f"cannot run TensorRT engines here: {missing}",
                        rebuild_command(root, [g], manifest.engines[g].key.precision))
            for g in graphs
        ]
    return [check_engine(manifest, root, g, gpu, tensorrt_version) for g in graphs]
