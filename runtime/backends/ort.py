"""ONNX Runtime implementation of the session protocol."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnxruntime as ort

from runtime.backends.base import BackendConfig
from runtime.backends.buffers import Binding, HostBuffer
from runtime.types import Unavailable

log = logging.getLogger(__name__)

_PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}
_BINDINGS_KEPT = 16
"""IOBindings kept per session, keyed by their bound buffers (a pool window per batch shape)."""
_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


class OrtSession:
    """A graph on ONNX Runtime; the providers actually in use are confirmed and logged."""

    def __init__(self, path: Path, config: BackendConfig) -> None:
        path = Path(path)
        wanted = _PROVIDERS[config.provider]
        available = set(ort.get_available_providers())
        providers = [p for p in wanted if p in available]
        if wanted[0] not in available:
            # never fall back to the CPU silently: a GPU deployment that runs on the CPU is a failure
            raise Unavailable(
                f"provider {config.provider!r} needs onnxruntime's {wanted[0]}, which this onnxruntime build "
                f"({ort.__version__}, providers {sorted(available)}) lacks; install onnxruntime-gpu on a "
                "CUDA machine, or use provider 'cpu'"
            )
        options = ort.SessionOptions()
        options.intra_op_num_threads = config.intra_op_threads
        options.inter_op_num_threads = config.inter_op_threads
        options.graph_optimization_level = _LEVELS[config.graph_optimization]
        options.log_severity_level = 3
        if config.profile_prefix:
            options.enable_profiling = True
            options.profile_file_prefix = config.profile_prefix
        cache_dir = config.optimized_cache_dir or path.parent / ".ort-cache"
        cached = cache_dir / f"{path.stem}.{config.provider}.{config.graph_optimization}.onnx"
        source = path
        if config.graph_optimization != "disable" and config.provider == "cpu":
            if cached.is_file() and cached.stat().st_mtime >= path.stat().st_mtime:
                source = cached
                options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            else:
                try:
                    cache_dir.mkdir(parents=True, exist_ok=True)
                    options.optimized_model_filepath = str(cached)
                except OSError:
                    log.info("optimised-model cache %s is not writable; optimising in memory", cache_dir)
        self._session = ort.InferenceSession(str(source), sess_options=options, providers=providers)
        self._inputs = [i.name for i in self._session.get_inputs()]
        self._outputs = [o.name for o in self._session.get_outputs()]
        self._input_set = set(self._inputs)
        self._bindings: dict[int, tuple[dict[str, Binding], list[str], ort.IOBinding]] = {}
        self._device = config.provider
        log.info("loaded %s on %s", path.name, self._session.get_providers())

    @property
    def input_names(self) -> list[str]:
        return list(self._inputs)

    @property
    def output_names(self) -> list[str]:
        return list(self._outputs)

    @property
    def providers(self) -> list[str]:
        return list(self._session.get_providers())

    def run(self, feeds: dict[str, np.ndarray], outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        names = outputs or self._outputs
        values = self._session.run(names, feeds)
        return dict(zip(names, values))

    def end_profiling(self) -> str:
        """Stop profiling; the profile file's path."""
        return str(self._session.end_profiling())

    def allocate(self, shape: tuple[int, ...], dtype: type = np.float32) -> HostBuffer:
        if self._device != "cpu":
            raise Unavailable(f"device buffers for provider {self._device!r} are not implemented in this build")
        return HostBuffer(shape, dtype)

    def run_bound(
        self, feeds: dict[str, np.ndarray], bound: dict[str, Binding], outputs: list[str], *, reuse: bool = False
    ) -> dict[str, np.ndarray]:
        # reuse: the caller passes the same ``bound`` dict again (a decode step's pool window, step after step,
        # from one thread): its IOBinding is kept (with the dict, so the id stays its own) and only the small
        # host feeds are bound again
        cached = self._bindings.get(id(bound)) if reuse else None
        if cached is not None and cached[0] is bound and cached[1] == outputs:
            io = cached[2]
        else:
            io = self._session.io_binding()
            for name in outputs:  # first, so they lead get_outputs()
                io.bind_output(name, "cpu")
            for name, b in bound.items():
                bind = io.bind_input if name in self._input_set else io.bind_output
                bind(name, b.device, b.device_id, b.dtype, list(b.shape), b.address)
            if reuse:
                if len(self._bindings) >= _BINDINGS_KEPT:
                    self._bindings.pop(next(iter(self._bindings)))
                self._bindings[id(bound)] = (bound, list(outputs), io)
        # np.require keeps 0-d feeds 0-d (np.ascontiguousarray makes them (1,), which a [] input rejects)
        for name, value in feeds.items():
            io.bind_cpu_input(name, np.require(value, requirements="C"))
        self._session.run_with_iobinding(io)
        values = io.get_outputs()
        return {name: values[i].numpy() for i, name in enumerate(outputs)}
