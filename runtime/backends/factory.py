"""``open_session``: a graph file on the backend a ``BackendConfig`` names."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from runtime.backends.base import BackendConfig, Session

if TYPE_CHECKING:
    from runtime.manifest import Manifest

log = logging.getLogger(__name__)


def open_session(path: Path, config: BackendConfig) -> Session:
    """Open ``path`` with the backend the config names.

    Provider ``tensorrt``: a .engine/.plan file, or an ONNX graph whose artifacts manifest lists a TensorRT
    engine for it (``unimp build-engines``), runs on native TensorRT; any other ONNX graph on ONNX Runtime's
    TensorRT execution provider.
    """
    path = Path(path)
    if config.provider == "tensorrt":
        from runtime.backends.tensorrt import TensorRTSession

        if path.suffix in (".engine", ".plan"):
            return TensorRTSession(path, config)
        found = _engine_for(path)
        if found is not None:
            root, graph = found
            from runtime.manifest import load_manifest

            manifest = load_manifest(root, verify=False)
            return TensorRTSession(root / manifest.engines[graph].file, config, manifest=manifest, root=root,
                                   graph=graph, aliases=_aliases(manifest, graph))
    from runtime.backends.ort import OrtSession

    return OrtSession(path, config)


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
