"""``open_session``: a graph file on the backend a ``BackendConfig`` names."""

from __future__ import annotations

from pathlib import Path

from runtime.backends.base import BackendConfig, Session


def open_session(path: Path, config: BackendConfig) -> Session:
    """Open ``path`` with the backend the config names (TensorRT for .engine/.plan files)."""
    if config.provider == "tensorrt" and path.suffix in (".engine", ".plan"):
        from runtime.backends.tensorrt import TensorRTSession

        return TensorRTSession(path, config)
    from runtime.backends.ort import OrtSession

    return OrtSession(path, config)
