"""ONNX Runtime execution-provider lists with their options, derived from a graph's manifest entry.

Pure functions: no onnxruntime import, no device access. The caller (runtime.backends.ort) probes the
device and the TensorRT version once and passes them in as ``DeviceFacts``, so every option here is
testable on a machine without a GPU.

TensorRT EP: the optimisation profile comes from the manifest's ``profiles`` (min/opt/max per input);
dynamic inputs the manifest gives no profile for get one from the ranges of the same symbolic dims in
other inputs (``seqlens_k: [batch]`` takes the ``batch`` range of ``input_ids``). Engines are cached in a
directory keyed by graph sha256 + GPU name + compute capability + TensorRT version (an engine is valid
only for exactly that combination); the timing cache, which records kernel timings valid for any graph on
one GPU and TensorRT version, is shared by every graph in a directory keyed by GPU + TensorRT version.
Written against the ONNX Runtime TensorRT and CUDA EP option names (ORT 1.18+); tested on hardware: no.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runtime.backends.base import BackendConfig, Provider
from runtime.manifest import GraphEntry, ManifestError

EXECUTION_PROVIDERS: dict[Provider, list[str]] = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}
"""ONNX Runtime providers each ``BackendConfig.provider`` registers, in priority order; the first must be
the one a session actually uses (runtime.backends.ort refuses the session otherwise)."""

ProviderList = list[str | tuple[str, dict[str, Any]]]
"""What ``onnxruntime.InferenceSession(providers=...)`` takes."""

_GIB = 1 << 30


class ProviderSettingsError(ValueError):
    """A backend setting that this device or TensorRT version cannot honour (message starts with the
    setting's name, e.g. ``fp16: ...``)."""


@dataclass(frozen=True)
class DeviceFacts:
    """What the provider options depend on, probed once per process."""

    gpu_name: str
    compute_capability: tuple[int, int]
    tensorrt_version: str = ""
    """``major.minor.patch`` of the TensorRT libraries ONNX Runtime loads ("" for the cuda provider)."""

    @property
    def tensorrt_major(self) -> int:
        head = self.tensorrt_version.split(".", 1)[0]
        return int(head) if head.isdigit() else 0


def shape_string(shapes: dict[str, list[int]]) -> str:
    """``{"a": [1, 2], "b": [3]}`` -> ``"a:1x2,b:3"`` (the TensorRT EP's profile format)."""
    return ",".join(f"{name}:{'x'.join(str(int(d)) for d in shape)}" for name, shape in shapes.items())


def profile_shapes(graph: GraphEntry) -> dict[str, dict[str, list[int]]]:
    """The TensorRT profile of every dynamic input, as {"min"|"opt"|"max": {input: shape}} in graph input
    order: the manifest's profiles, completed for dynamic inputs it has none for from the ranges of their
    symbolic dims in profiled inputs. Static inputs need no profile and are left out. Raises ManifestError
    naming an input whose dims no profile covers."""
    ranges: dict[str, tuple[int, int, int]] = {}
    for spec in graph.inputs:
        profile = graph.profiles.get(spec.name)
        if profile is None:
            continue
        for axis, dim in enumerate(spec.shape):
            if isinstance(dim, str) and axis < len(profile["min"]):
                ranges.setdefault(dim, (profile["min"][axis], profile["opt"][axis], profile["max"][axis]))
    out: dict[str, dict[str, list[int]]] = {"min": {}, "opt": {}, "max": {}}
    for spec in graph.inputs:
        profile = graph.profiles.get(spec.name)
        if profile is not None:
            for level in out:
                out[level][spec.name] = [int(d) for d in profile[level]]
            continue
        dynamic = [d for d in spec.shape if isinstance(d, str)]
        if not dynamic:
            continue
        missing = [d for d in dynamic if d not in ranges]
        if missing:
            raise ManifestError(
                f"graphs.{Path(graph.file).stem}.profiles.{spec.name}: no TensorRT profile for the dynamic input "
                f"{spec.name} {spec.shape} and no other input gives a range for {missing}; re-export the "
                "artifacts with profiles for every dynamic input"
            )
        for i, level in enumerate(out):
            out[level][spec.name] = [ranges[d][i] if isinstance(d, str) else int(d) for d in spec.shape]
    return out


def trt_profile_options(graph: GraphEntry) -> dict[str, str]:
    """``trt_profile_{min,opt,max}_shapes`` for the graph ({} when it has no dynamic input)."""
    shapes = profile_shapes(graph)
    if not shapes["min"]:
        return {}
    return {f"trt_profile_{level}_shapes": shape_string(shapes[level]) for level in ("min", "opt", "max")}


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-").lower() or "unknown"


def device_key(facts: DeviceFacts) -> str:
    """``<gpu>-sm<major><minor>-trt<version>``: what a TensorRT engine or timing cache is valid for."""
    major, minor = facts.compute_capability
    return f"{_slug(facts.gpu_name)}-sm{major}{minor}-trt{_slug(facts.tensorrt_version or 'none')}"


def engine_cache_key(graph: GraphEntry, facts: DeviceFacts) -> str:
    """The engine cache directory name: the graph's sha256 (its first 16 hex digits; the file's own
    digest when the manifest has none recorded) and ``device_key``."""
    digest = graph.sha256 or hashlib.sha256(graph.file.encode()).hexdigest()
    return f"{Path(graph.file).stem}-{digest[:16]}-{device_key(facts)}"


def cache_dirs(root: Path, graph: GraphEntry, facts: DeviceFacts) -> tuple[Path, Path]:
    """(engine cache, timing cache) directories under ``root`` for this graph on this device."""
    return root / "engines" / engine_cache_key(graph, facts), root / "timing" / device_key(facts)


def cuda_options(config: BackendConfig, *, cuda_graph: bool) -> dict[str, Any]:
    """CUDA EP options. With a CUDA graph the arena grows by exactly what is requested
    (``kSameAsRequested``), so an allocation after capture fails loudly instead of being hidden by slack."""
    options: dict[str, Any] = {
        "device_id": config.device_id,
        "arena_extend_strategy": "kSameAsRequested" if cuda_graph else "kNextPowerOfTwo",
    }
    if cuda_graph:
        options["enable_cuda_graph"] = True
    return options


def tensorrt_options(graph: GraphEntry | None, config: BackendConfig, facts: DeviceFacts,
                     cache_root: Path) -> dict[str, Any]:
    """TensorRT EP options: profiles, engine and timing caches, workspace, optimisation level, fp16. Never
    ``trt_cuda_graph_enable``: runtime.backends.ort.check_settings refuses ``cuda_graph`` for this EP."""
    options: dict[str, Any] = {
        "device_id": config.device_id,
        "trt_builder_optimization_level": config.trt_optimization_level,
    }
    if config.trt_workspace_gb > 0:
        options["trt_max_workspace_size"] = int(config.trt_workspace_gb * _GIB)
    if config.fp16:
        if facts.tensorrt_major >= 11:
            raise ProviderSettingsError(
                f"fp16: TensorRT {facts.tensorrt_version} removed weak typing, so the TensorRT EP has no fp16 "
                "switch; export fp16 graphs instead (the precision of the ONNX graph is what TensorRT 11 runs) "
                "and leave fp16 off"
            )
        if graph is None or graph.precision == "fp32":
            options["trt_fp16_enable"] = True
    if graph is not None:
        options.update(trt_profile_options(graph))
        engines, timing = cache_dirs(cache_root, graph, facts)
        options.update({
            "trt_engine_cache_enable": True, "trt_engine_cache_path": str(engines),
            "trt_timing_cache_enable": True, "trt_timing_cache_path": str(timing),
        })
    return options


def ort_providers(graph: GraphEntry | None, config: BackendConfig, facts: DeviceFacts | None, cache_root: Path,
                  *, decode_graph: bool = False) -> ProviderList:
    """The ``providers`` argument of ``onnxruntime.InferenceSession`` for ``graph`` under ``config``.

    ``facts`` describes the device (required for cuda and tensorrt); ``decode_graph``: the session runs the
    fixed-shape decode step, the only one CUDA graphs are captured for (``config.cuda_graph``). Without a
    manifest entry (``graph`` None) the TensorRT EP gets no profile and no engine cache: it then builds an
    engine for each new input shape at run time."""
    chain = EXECUTION_PROVIDERS[config.provider]
    if config.provider == "cpu":
        return list(chain)
    if facts is None:
        raise ValueError(f"provider {config.provider!r} needs the device's facts (runtime.backends.ort probes them)")
    cuda_graph = config.cuda_graph and decode_graph
    out: ProviderList = []
    if config.provider == "tensorrt":
        # the TensorRT EP captures the graph itself; the CUDA EP then runs only what TensorRT rejected
        out.append(("TensorrtExecutionProvider", tensorrt_options(graph, config, facts, cache_root)))
        out.append(("CUDAExecutionProvider", cuda_options(config, cuda_graph=False)))
    else:
        out.append(("CUDAExecutionProvider", cuda_options(config, cuda_graph=cuda_graph)))
    out.append("CPUExecutionProvider")
    return out
