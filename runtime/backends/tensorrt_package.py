"""The ``tensorrt`` package, imported lazily and checked to be TensorRT itself.

A stub or placeholder package (``tensorrt-stubs``, PyPI's download shims) also makes ``import tensorrt``
succeed, so TensorRT is recognised by ``tensorrt.Builder`` and ``tensorrt.Runtime``, never by the import
alone. Shared by the engine builder (export/engines.py), the engine keys (runtime.backends.engines) and the
session (runtime.backends.tensorrt).
"""

from __future__ import annotations

from types import ModuleType

from runtime.types import Unavailable

_INSTALL = ("install TensorRT 10 or 11 for this machine's CUDA (pip install tensorrt-cu12 on x86; JetPack ships it "
            "on Jetson), or use provider 'cpu'/'cuda' with the ONNX graphs")


class TensorRTUnavailable(Unavailable):
    """TensorRT cannot be used here; the message names what is missing."""


def tensorrt_module() -> ModuleType:
    """The ``tensorrt`` package, checked to be the real one (a stub package also imports)."""
    try:
        import tensorrt
    except ImportError as exc:
        raise TensorRTUnavailable(f"the tensorrt package is not installed: {_INSTALL}") from exc
    if not hasattr(tensorrt, "Builder") or not hasattr(tensorrt, "Runtime"):
        where = getattr(tensorrt, "__file__", None) or list(getattr(tensorrt, "__path__", []))
        raise TensorRTUnavailable(
            f"'import tensorrt' found {where}, which is not TensorRT (no tensorrt.Builder): a stub or placeholder "
            f"package (e.g. tensorrt-stubs) is installed; uninstall it and {_INSTALL}"
        )
    return tensorrt
