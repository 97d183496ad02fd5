"""Runtimes over the tiny demo's decoder forms, opened once per test module, and the requests they share.

The forms come from the same seeded checkpoint (``tests/conftest.py``): ``inplace`` (GroupQueryAttention
over a static pool bound as past and present; the reference), ``concat`` (present = Concat(past, new),
left-padded batches) and ``onnx`` (the ``inplace`` layout in standard ops, TensorScatter-24).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from runtime.backends import BackendConfig
from runtime.engine import Runtime, RuntimeConfig
from runtime.types import HistoryItem, PreferenceRequest, PreferenceResult, TextPiece

HISTORY = tuple(HistoryItem(item_id=f"P{k:05d}") for k in (3, 17, 42, 8))
RATED = tuple(HistoryItem(item_id=f"P{k:05d}", rating=r, explanation=e)
              for k, r, e in ((5, 4, "Great fit."), (9, 2, "Too small."), (12, 5, "Love the colour.")))

FORMS: dict[str, tuple[str, str, str]] = {
    "inplace": ("tiny_artifacts", "inplace", "gqa"),
    "concat": ("tiny_concat_artifacts", "concat", "mha"),
    "onnx": ("tiny_onnx_attention_artifacts", "inplace", "onnx"),
}
"""Decoder form -> (artifacts fixture, KV layout, attention ops) the opened runtime must report."""


def open_runtime(artifacts: Path, cache: Path, **kw: Any) -> Runtime:
    """One intra-op thread, no progress bars, latents cached under ``cache``."""
    cfg = RuntimeConfig(backend=BackendConfig(intra_op_threads=1), progress=False, latent_cache_dir=cache, **kw)
    return Runtime.open(artifacts, cfg)


class FormRuntimes:
    """Opens each decoder form on first use (its artifacts fixture exported on demand) and closes them all."""

    def __init__(self, request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> None:
        self._request, self._tmp = request, tmp_path_factory
        self._open: dict[str, Runtime] = {}

    def __call__(self, form: str) -> Runtime:
        if form not in self._open:
            fixture, layout, attention = FORMS[form]
            rt = open_runtime(self._request.getfixturevalue(fixture), self._tmp.mktemp(f"lat_{form}"))
            assert rt.manifest.decoder.kv_layout == layout and rt.decoder.kv_layout == layout
            assert rt.manifest.decoder.attention == attention
            self._open[form] = rt
        return self._open[form]

    def close(self) -> None:
        for rt in self._open.values():
            rt.close()
        self._open.clear()


def explain(rt: Runtime, req: PreferenceRequest) -> tuple[str, PreferenceResult]:
    """The streamed explanation's text and the final result."""
    events = list(rt.explain(req))
    final = events[-1]
    assert isinstance(final, PreferenceResult)
    return "".join(e.text for e in events[:-1] if isinstance(e, TextPiece)), final


def explain_concurrently(rt: Runtime, reqs: list[PreferenceRequest]) -> list[str | None]:
    """Each request's explanation text, all of them streamed at once from their own threads."""
    results: list[str | None] = [None] * len(reqs)

    def run(i: int) -> None:
        results[i] = explain(rt, reqs[i])[0]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(reqs))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return results


def target(k: int) -> HistoryItem:
    return HistoryItem(item_id=f"P{20 + k:05d}")


def make_resident(rt: Runtime) -> Runtime:
    """``rt`` (a concat runtime on ONNX Runtime CPU) decoding with its KV in two alternating session
    buffers (``ConcatCore(resident=True)``, what a GPU provider gets), over the same sessions."""
    from runtime.decoder.core import ConcatCore

    host = rt.decoder
    assert isinstance(host, ConcatCore) and not host.resident
    core = ConcatCore(host.session, host.runner.media_kv_session, rt.manifest, max_context=host.max_context,
                      resident=True, rows=rt.batcher.rows)
    rt.decoder = core
    rt.batcher.core = core
    return rt
