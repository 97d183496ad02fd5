"""TensorRT engines behind the same session protocol (NVIDIA machines only).

TensorRT is imported lazily: this module imports on any machine, and opening an engine without
TensorRT installed raises a clear error.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from runtime.backends.base import BackendConfig
from runtime.backends.buffers import Binding, Buffer


class TensorRTUnavailable(RuntimeError):
    pass


class TensorRTSession:
    def __init__(self, path: Path, config: BackendConfig) -> None:
        try:
            import tensorrt  # noqa: F401
        except ImportError as exc:
            raise TensorRTUnavailable(
                f"cannot open {path}: the tensorrt package is not installed (pip install 'unimp-edge[gpu]' "
                "on an NVIDIA machine), or use provider 'cpu'/'cuda' with the ONNX graphs"
            ) from exc
        raise TensorRTUnavailable("TensorRT engine execution is not implemented in this build")

    @property
    def input_names(self) -> list[str]:
        return []

    @property
    def output_names(self) -> list[str]:
        return []

    @property
    def providers(self) -> list[str]:
        return ["TensorRT"]

    def run(self, feeds: dict[str, np.ndarray], outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        raise TensorRTUnavailable("TensorRT engine execution is not implemented in this build")

    def allocate(self, shape: tuple[int, ...], dtype: type = np.float32) -> Buffer:
        raise TensorRTUnavailable("TensorRT engine execution is not implemented in this build")

    def run_bound(
        self, feeds: dict[str, np.ndarray], bound: dict[str, Binding], outputs: list[str], *, reuse: bool = False
    ) -> dict[str, np.ndarray]:
        raise TensorRTUnavailable("TensorRT engine execution is not implemented in this build")
