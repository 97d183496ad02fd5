"""``open_session``: a graph file on the backend a ``BackendConfig`` names."""

from __future__ import annotations

from pathlib import Path

from runtime.backends.base import BackendConfig, Session
from runtime.manifest import GraphEntry


def open_session(path: Path, config: BackendConfig, graph: GraphEntry | None = None, *,
                 decode_graph: bool = False) -> Session:
    """Open ``path`` with the backend the config names (TensorRT for .engine/.plan files).

    ``graph``: the file's manifest entry (the TensorRT EP's profiles and engine cache key come from it);
    ``decode_graph``: the session runs the fixed-shape decode step (CUDA graphs with ``config.cuda_graph``)."""
    if config.provider == "tensorrt" and path.suffix in (".engine", ".plan"):
        from runtime.backends.tensorrt import TensorRTSession

        return TensorRTSession(path, config)
    from runtime.backends.ort import OrtSession

    return OrtSession(path, config, graph, decode_graph=decode_graph)
