"""A requested execution provider that this onnxruntime build lacks is an error, never a silent CPU run."""

from __future__ import annotations

from pathlib import Path

import onnxruntime as ort
import pytest

from runtime.backends import BackendConfig, open_session
from runtime.types import Unavailable


@pytest.mark.parametrize("provider", ["cuda", "tensorrt"])
def test_missing_gpu_provider_refuses_to_load(tiny_artifacts: Path, provider: str) -> None:
    wanted = {"cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}[provider]
    if wanted in ort.get_available_providers():
        pytest.skip(f"this onnxruntime build has {wanted}")  # only on a GPU build; CI has the CPU wheel
    with pytest.raises(Unavailable, match=wanted):
        open_session(tiny_artifacts / "vision.onnx", BackendConfig(provider=provider))  # type: ignore[arg-type]


def test_cpu_provider_loads(tiny_artifacts: Path) -> None:
    session = open_session(tiny_artifacts / "vision.onnx", BackendConfig(provider="cpu"))
    assert session.providers == ["CPUExecutionProvider"]
