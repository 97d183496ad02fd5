"""``open_session``: a graph file on the backend a ``BackendConfig`` names."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from runtime.backends.base import BackendConfig, Session
from runtime.manifest import GraphEntry

if TYPE_CHECKING:
    from runtime.manifest import Manifest

log = logging.getLogger(__name__)


def open_session(path: Path, config: BackendConfig, graph: GraphEntry | None = None, *,
                 decode_graph: bool = False) -> Session:
    """Open ``path`` with the backend the config names.

    Provider ``tensorrt``: a .engine/.plan file, or an ONNX graph whose artifacts manifest lists a TensorRT
    engine for it (``unimp build-engines``), runs on native TensorRT; any other ONNX graph on ONNX Runtime's
    TensorRT execution provider. ``graph``: the file's manifest entry (the execution providers' profiles and
    engine cache key come from it); ``decode_graph``: the session runs the fixed-shape decode step (CUDA
    graphs with ``config.cuda_graph``).
    """
    path = Path(path)
    if config.provider == "tensorrt":
        from runtime.backends.tensorrt import TensorRTSession

        if path.suffix in (".engine", ".plan"):
            return TensorRTSession(path, config)
        found = _engine_for(path)
        if found is not None:
            root, key = found
            from runtime.manifest import load_manifest

            manifest = load_manifest(root, verify=False)
            return TensorRTSession(root / manifest.engines[key].file, config, manifest=manifest, root=root,
                                   graph=key, aliases=_aliases(manifest, key))
    from runtime.backends.ort import OrtSession

    return OrtSession(path, config, graph, decode_graph=decode_graph)


def uses_native_engines(config: BackendConfig, manifest: Manifest | None) -> bool:
    """Provider ``tensorrt`` with an engine in the manifest for every graph: nothing runs on onnxruntime."""
    return (config.provider == "tensorrt" and manifest is not None and bool(manifest.engines)
            and set(manifest.graphs) <= set(manifest.engines))


def require_backend(config: BackendConfig, manifest: Manifest | None = None) -> None:
    """Refuse, before anything loads, a provider this machine cannot run, naming what is missing. Native
    TensorRT engines need the tensorrt package and a CUDA device, not onnxruntime-gpu; any graph left to
    onnxruntime needs its execution provider (runtime.backends.ort.require_provider)."""
    if uses_native_engines(config, manifest):
        from runtime.backends.cuda import probe
        from runtime.backends.tensorrt_package import tensorrt_module

        tensorrt_module()
        probe(config.device_id)
        return
    from runtime.backends.ort import require_provider

    require_provider(config)


def _engine_for(path: Path) -> tuple[Path, str] | None:
    """(artifacts root, graph key) when the manifest above ``path`` lists an engine for it."""
    from runtime.manifest import MANIFEST_NAME

    for root in list(path.resolve().parents)[:3]:
        file = root / MANIFEST_NAME
        if not file.is_file():
            continue
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return None
        engines = data.get("engines") or {}
        for graph, entry in data.get("graphs", {}).items():
            if graph in engines and (root / entry.get("file", "")).resolve() == path.resolve():
                return root, graph
        return None
    return None


def _aliases(manifest: Manifest, graph: str) -> dict[str, str]:
    """present -> past name pairs that share one buffer (the decoder's inplace KV layout)."""
    if graph != "decoder" or manifest.decoder.kv_layout != "inplace":
        return {}
    n = manifest.names
    pairs = {}
    for layer in range(manifest.decoder.num_layers):
        pairs[n.present_key.format(layer=layer)] = n.past_key.format(layer=layer)
        pairs[n.present_value.format(layer=layer)] = n.past_value.format(layer=layer)
    return pairs
