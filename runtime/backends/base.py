"""The backend-neutral session protocol that ONNX Runtime and TensorRT both implement."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import numpy as np

from runtime.backends.buffers import Binding, Buffer

Provider = Literal["cpu", "cuda", "tensorrt"]


@dataclass(frozen=True)
class BackendConfig:
    """How graphs are executed."""

    provider: Provider = "cpu"
    """Execution provider; "cpu" (ONNX Runtime CPU) is the embedded default."""
    intra_op_threads: int = 0
    """Threads inside one operator; 0 lets ONNX Runtime choose (all physical cores)."""
    inter_op_threads: int = 1
    optimized_cache_dir: Path | None = None
    """Where graph-optimised models are cached on disk (None: next to the graph, in .ort-cache/)."""
    graph_optimization: Literal["disable", "basic", "extended", "all"] = "all"
    profile_prefix: str | None = None
    """ONNX Runtime profiling to files with this prefix (benchmarks; ``end_profiling`` returns the file)."""
    device_id: int = 0
    """CUDA device of the cuda and tensorrt providers."""
    trt_cache_dir: Path | None = None
    """TensorRT EP engine and timing caches (None: next to the graph, in .cache/trt/); one subdirectory per
    graph sha256 + GPU + compute capability + TensorRT version (runtime.backends.providers)."""
    trt_workspace_gb: float = 0.0
    """TensorRT builder workspace limit in GiB; 0 leaves TensorRT's default (the device's memory)."""
    trt_optimization_level: int = 3
    """TensorRT builder optimisation level 0..5 (3 is TensorRT's default; higher builds longer)."""
    fp16: bool = False
    """TensorRT EP: let TensorRT 10 pick fp16 kernels for fp32 graphs (``trt_fp16_enable``). TensorRT 11 has
    no such flag (weak typing was removed): export fp16 graphs instead; asking for it there is an error."""
    cuda_graph: bool = False
    """Capture the fixed-shape decode step in CUDA graphs (cuda/tensorrt providers, inplace KV layout); one
    graph per decode window. Untested on hardware."""


class Session(Protocol):
    """One loaded graph. ``run`` returns fresh arrays the caller owns; ``run_bound`` also reads and writes
    backend buffers in place (runtime.backends.buffers), for the decoder's KV cache."""

    @property
    def input_names(self) -> list[str]: ...

    @property
    def output_names(self) -> list[str]: ...

    @property
    def providers(self) -> list[str]: ...

    def run(self, feeds: dict[str, np.ndarray], outputs: list[str] | None = None) -> dict[str, np.ndarray]: ...

    def allocate(self, shape: tuple[int, ...], dtype: type = np.float32) -> Buffer:
        """Memory this session's device can bind (host memory for the CPU provider)."""
        ...

    def run_bound(
        self, feeds: dict[str, np.ndarray], bound: dict[str, Binding], outputs: list[str], *, reuse: bool = False
    ) -> dict[str, np.ndarray]:
        """Run with host ``feeds``, tensors (inputs or outputs) ``bound`` to backend memory, and the host
        ``outputs`` returned. Binding an input and an output to the same address updates it in place.
        ``reuse``: the same bindings come back (a decode step, from one thread): the backend may keep them."""
        ...
