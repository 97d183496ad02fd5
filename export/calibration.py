"""Calibration feeds for static (``qdq``) int8 quantization, recorded from the runtime itself.

The fp32 source artifacts are opened with :class:`runtime.engine.Runtime` (its graph-optimised model and
latent caches in a temporary directory, never in the source) and asked demo requests built from the
catalog: rated histories of catalog items, a preference prediction with a short streamed explanation and
a recommendation per sample. Every ``Session.run`` of the vision, media_kv and decoder graphs is recorded:
vision sees the ``pixel_values`` of the runtime's own preprocessing of catalog images, media_kv the
latents the vision graph made of them, the decoder the real prompt feeds (prefills of realistic lengths
and decode steps with their past K/V). Needs the ``concat`` decoder layout (plain ``run`` calls); the
``inplace`` layout writes its K/V pool through IO binding and is refused before calibration.
"""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

GRAPH_INPUTS = {"vision": "pixel_values", "media_kv": "media_latents", "decoder": "input_ids"}
"""The input that tells the recorded graphs apart (the manifest's default names)."""
EXPLAIN_TOKENS = 8
HISTORY = 3


class FeedReader:
    """An ``onnxruntime.quantization.CalibrationDataReader`` over recorded feeds, with a progress bar."""

    def __init__(self, feeds: Sequence[dict[str, np.ndarray]], desc: str, progress: bool) -> None:
        from tqdm import tqdm

        self._feeds = iter(feeds)
        self._bar = tqdm(total=len(feeds), desc=desc, unit="feed", disable=not progress, leave=False)

    def get_next(self) -> dict[str, np.ndarray] | None:
        feed = next(self._feeds, None)
        if feed is None:
            self._bar.close()
        else:
            self._bar.update(1)
        return feed

    def __len__(self) -> int:  # pragma: no cover - informational
        return int(self._bar.total)


def _catalog_ids(artifacts: Path, catalog: str) -> list[str]:
    ids = []
    with (artifacts / catalog).open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                record = json.loads(line)
                if record.get("image"):
                    ids.append(str(record["item_id"]))
    return ids


@contextlib.contextmanager
def _recording(names: dict[str, str]) -> Iterator[dict[str, list[dict[str, np.ndarray]]]]:
    """Patch ``OrtSession.run`` to keep a copy of every feed of the graphs in ``names`` (graph -> input)."""
    from runtime.backends.ort import OrtSession

    recorded: dict[str, list[dict[str, np.ndarray]]] = {g: [] for g in names}
    by_input = {inp: g for g, inp in names.items()}
    lock = threading.Lock()
    original = OrtSession.run

    def run(self: OrtSession, feeds: dict[str, np.ndarray], outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        graph = next((by_input[n] for n in feeds if n in by_input), None)
        if graph is not None:
            with lock:
                recorded[graph].append({k: np.array(v, copy=True) for k, v in feeds.items()})
        return original(self, feeds, outputs)

    OrtSession.run = run  # type: ignore[method-assign]
    try:
        yield recorded
    finally:
        OrtSession.run = original  # type: ignore[method-assign]


def _spread(feeds: list[dict[str, np.ndarray]], n: int) -> list[dict[str, np.ndarray]]:
    """At most ``n`` feeds evenly spread over the recording (prefills and decode steps alike)."""
    if len(feeds) <= n:
        return feeds
    return [feeds[int(i)] for i in np.linspace(0, len(feeds) - 1, n).round().astype(int)]


@contextlib.contextmanager
def _runtime_logs_quiet() -> Iterator[None]:
    """The calibration runtime's INFO lines (graph loads, providers) only with ``unimp -v``."""
    logger = logging.getLogger("runtime")
    level = logger.level
    if not logging.getLogger("export").isEnabledFor(logging.DEBUG):
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def record_feeds(artifacts: Path, samples: int, graphs: Sequence[str], *, threads: int = 0,
                 progress: bool = True) -> dict[str, list[dict[str, np.ndarray]]]:
    """Up to ``samples`` feeds per graph of ``graphs`` (vision, media_kv, decoder), from ``samples`` demo
    requests on the fp32 ``artifacts``."""
    from tqdm import tqdm

    from runtime.backends import BackendConfig
    from runtime.engine import Runtime, RuntimeConfig
    from runtime.manifest import load_manifest
    from runtime.types import HistoryItem, PreferenceRequest, RecommendRequest, SamplingOptions

    manifest = load_manifest(artifacts, verify=False)
    names = {"vision": manifest.names.pixel_values, "media_kv": manifest.names.media_latents,
             "decoder": manifest.names.input_ids}
    names = {g: names[g] for g in graphs if g in names}
    ids = _catalog_ids(artifacts, manifest.catalog)
    if len(ids) < HISTORY + 1:
        raise ValueError(f"{artifacts / manifest.catalog}: {len(ids)} catalog items with images; calibration "
                         f"needs at least {HISTORY + 1}")
    with tempfile.TemporaryDirectory(prefix="unimp-calib-") as tmp, _recording(names) as recorded, \
            _runtime_logs_quiet():
        config = RuntimeConfig(backend=BackendConfig(intra_op_threads=threads, optimized_cache_dir=Path(tmp) / "ort"),
                               latent_cache_dir=Path(tmp) / "latents", background_encode=False, progress=False)
        rt = Runtime.open(artifacts, config)
        try:
            step = HISTORY + 1
            for k in tqdm(range(samples), desc="calibration requests", unit="req", disable=not progress,
                          leave=False):
                base = (k * step) % (len(ids) - step + 1)
                history = tuple(HistoryItem(item_id=ids[base + j], rating=1 + (k + j) % 5) for j in range(HISTORY))
                target = HistoryItem(item_id=ids[base + HISTORY])
                request = PreferenceRequest(history, target, SamplingOptions(max_new_tokens=EXPLAIN_TOKENS))
                for _ in rt.explain(request):
                    pass
                rt.recommend(RecommendRequest(history, top_k=5))
        finally:
            rt.close()
    return {g: _spread(recorded[g], samples) for g in names}


def describe(feeds: dict[str, list[dict[str, np.ndarray]]], graph: str) -> dict[str, Any]:
    """What the manifest records about one graph's calibration feeds."""
    got = feeds.get(graph, [])
    lengths = [int(f["input_ids"].shape[-1]) for f in got if "input_ids" in f]
    out: dict[str, Any] = {"feeds": len(got)}
    if lengths:
        out["input_ids_lengths"] = {"min": min(lengths), "max": max(lengths)}
    return out
