"""`unimp catalog encode` and the engine's catalog stores: SERVING never waits for the catalog."""

from __future__ import annotations

import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from runtime.catalog import Catalog
from runtime.client import UnimpClient
from runtime.engine import Runtime, RuntimeConfig
from runtime.server.app import ServerThread
from runtime.server.config import ServerConfig
from runtime.types import HistoryItem
from runtime.vision import LatentStore
from runtime.vision.media_kv import MediaKVStore
from unimp.cli import build_parser, main


def _wait(predicate: Any, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def test_catalog_encode_help_documents_its_options() -> None:
    parser = build_parser()
    sub = next(a for a in parser._subparsers._group_actions if a.dest == "command")  # type: ignore[union-attr]
    catalog = sub.choices["catalog"]
    encode = next(a for a in catalog._subparsers._group_actions).choices["encode"]  # type: ignore[union-attr]
    text = encode.format_help()
    for flag in ("--batch", "--provider", "--threads", "--cache-dir", "ART", "continues where it stopped"):
        assert flag in text


def test_catalog_encode_resumes_after_an_interrupt_and_the_server_has_nothing_left(
    tiny_artifacts: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    cache = tmp_path / "latents"
    argv = ["catalog", "encode", str(tiny_artifacts), "--cache-dir", str(cache), "--batch", "32", "--threads", "2",
            "--quiet"]
    real = MediaKVStore._compute
    calls = []

    def interrupted(self: MediaKVStore, item_ids: Any) -> Any:
        calls.append(len(item_ids))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(self, item_ids)

    monkeypatch.setattr(MediaKVStore, "_compute", interrupted)
    assert main(argv) == 130  # Ctrl-C during the K/V pass
    assert "run the same command again" in capsys.readouterr().err
    monkeypatch.undo()

    assert main(argv) == 0
    out = capsys.readouterr().out
    items = 200  # the tiny demo catalog
    assert f"latents      {cache}: wrote 0; {items} items, 0 pending" in out  # the first run finished them
    assert f"media_kv     {cache}-media-kv: wrote {items - 64}; {items} items, 0 pending" in out  # 2 batches kept

    engine = Runtime.open(tiny_artifacts, RuntimeConfig(progress=False, latent_cache_dir=cache))
    try:
        stats = engine.stats()
        assert stats["catalog_pending.latents"] == 0 and stats["catalog_pending.media_kv"] == 0
        assert stats["catalog_encoded.media_kv"] == items
        # the engine's memory (stored K/V) equals K/V computed at request time from fresh latents
        ids = ["P00007", "P00003", "P00007"]
        memory, _ = engine.media.memory_for([HistoryItem(item_id=i) for i in ids])
        assert engine.media.kv.images_encoded == 0 and engine.vision.images_encoded == 0  # all from the stores
        images = [engine.catalog.image(i) for i in ids]
        expected = engine.decoder.media_kv(engine.vision.encode_images(images))
        for (k, v), (ek, ev) in zip(memory, expected):
            for a, e in ((k, ek), (v, ev)):
                np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-5 * float(np.abs(e).max()))
    finally:
        engine.close()


def _metric(port: int, name: str, store: str) -> float | None:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    for line in text.splitlines():
        if line.startswith(f'{name}{{store="{store}"}}'):
            return float(line.split()[-1])
    return None


def test_serving_while_the_background_encoder_is_held(tiny_artifacts: Path, tmp_path: Path) -> None:
    cache = tmp_path / "latents"
    engine = Runtime.open(tiny_artifacts, RuntimeConfig(progress=False, latent_cache_dir=cache,
                                                        background_encode=False))
    encoder = engine.catalog_encoder
    encoder.pause()  # the gate: the background encoder starts but encodes nothing until resume()
    encoder.start()
    items = 200
    config = ServerConfig(port=0, state_dir=tmp_path / "state")
    config.metrics.port = 0
    config.log.level = "WARNING"
    try:
        with ServerThread(config, engine) as srv, UnimpClient(srv.target, timeout=30) as client:
            assert client.health() == "SERVING"
            port = srv.server.metrics.port
            for store in ("latents", "media_kv"):
                assert _metric(port, "unimp_catalog_items_pending", store) == items
                assert _metric(port, "unimp_catalog_items_encoded", store) == 0
            result = client.recommend(["P00003", "P00017"], top_k=3)  # first use encodes just these two
            assert len(result.items) == 3
            for store in ("latents", "media_kv"):
                assert _metric(port, "unimp_catalog_items_pending", store) == items - 2
                assert _metric(port, "unimp_catalog_items_encoded", store) == 2
                assert _metric(port, "unimp_catalog_items_encoded_on_demand_total", store) == 2
            encoder.resume()
            assert _wait(lambda: engine.latents.encoded > 2 + 32, 120)  # the background is filling
            assert client.health() == "SERVING"
    finally:
        engine.close()  # stops the encoder mid-catalog and commits what it wrote
    assert not encoder._thread
    catalog = Catalog(tiny_artifacts, engine.manifest)
    reopened = LatentStore.open(cache, catalog, engine.vision, engine.manifest, progress=False, fill=False)
    assert 2 + 32 <= reopened.encoded and reopened.encoded + reopened.pending == items
    reopened.close()
