"""`unimp serve`'s [engine] settings reach the Runtime: provider, threads, batching width, prefix cache."""

from __future__ import annotations

from pathlib import Path

import onnxruntime as ort
import pytest

from runtime.server.app import open_runtime
from runtime.server.config import ConfigError, EngineConfig, load_config
from runtime.types import HistoryItem, RecommendRequest, SearchRequest, Unavailable


def test_settings_reach_the_runtime(tiny_artifacts: Path) -> None:
    settings = EngineConfig(intra_op_threads=1, max_active=3, max_queued=5, prefix_cache_bytes=0)
    rt = open_runtime(tiny_artifacts, settings=settings)
    try:
        assert rt.config.backend.intra_op_threads == 1 and rt.config.backend.provider == "cpu"  # type: ignore[attr-defined]
        assert rt.batcher.max_active == 3 and rt.batcher.max_queued == 5  # type: ignore[attr-defined]
        request = RecommendRequest(tuple(HistoryItem(item_id=i) for i in ("P00003", "P00017")), top_k=3)
        first, second = rt.recommend(request), rt.recommend(request)
        assert [i.item_id for i in first.items] == [i.item_id for i in second.items]
        assert not second.timings.prefix_cache_hit  # a 0-byte prefix cache keeps nothing
        assert rt.prefix_cache.bytes == 0  # type: ignore[attr-defined]
    finally:
        rt.close()


def test_a_missing_provider_is_a_startup_error(tiny_artifacts: Path) -> None:
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime build has CUDA")  # CI installs the CPU wheel
    with pytest.raises(Unavailable, match="CUDAExecutionProvider"):
        open_runtime(tiny_artifacts, settings=EngineConfig(provider="cuda"))


def test_flags_and_validation(tmp_path: Path) -> None:
    config = load_config(overrides={"engine.provider": "cpu", "engine.max_active": "4",
                                    "engine.prefix_cache_bytes": "1048576"})
    assert config.engine.max_active == 4 and config.engine.prefix_cache_bytes == 1 << 20
    with pytest.raises(ConfigError, match=r"^engine\.max_active: must be >= 1"):
        load_config(overrides={"engine.max_active": "0"})
    with pytest.raises(ConfigError, match=r"^engine\.provider: must be one of cpu, cuda, tensorrt"):
        load_config(overrides={"engine.provider": "rocm"})


def test_gpu_settings_reach_the_backend_config(tmp_path: Path) -> None:
    from runtime.server.app import backend_config

    config = load_config(overrides={"engine.provider": "tensorrt", "engine.device_id": "1",
                                    "engine.trt_cache_dir": str(tmp_path), "engine.trt_workspace_gb": "1.5",
                                    "engine.fp16": True, "engine.cuda_graph": "true"})
    backend = backend_config(config.engine)
    assert (backend.provider, backend.device_id, backend.trt_cache_dir, backend.trt_workspace_gb, backend.fp16,
            backend.cuda_graph) == ("tensorrt", 1, tmp_path, 1.5, True, True)
    for key, value, message in (
        ("engine.fp16", True, r"^engine\.fp16: needs engine\.provider cuda or tensorrt \(provider is cpu\)"),
        ("engine.cuda_graph", True, r"^engine\.cuda_graph: needs engine\.provider cuda or tensorrt"),
        ("engine.device_id", "-1", r"^engine\.device_id: must be >= 0"),
        ("engine.trt_workspace_gb", "-2", r"^engine\.trt_workspace_gb: must be a finite number >= 0"),
    ):
        with pytest.raises(ConfigError, match=message):
            load_config(overrides={key: value})
    with pytest.raises(ConfigError, match=r"^engine\.fp16: applies to the tensorrt provider only"):
        load_config(overrides={"engine.provider": "cuda", "engine.fp16": True})


def test_serve_provider_flag_is_the_engine_setting() -> None:
    import argparse

    from runtime.server.cli_commands import add_serve_arguments, serve_overrides

    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    for flag in ("--provider", "--engine-provider"):
        assert serve_overrides(parser.parse_args([flag, "tensorrt"])) == {"engine.provider": "tensorrt"}


def test_context_and_kv_pool_settings(tiny_artifacts: Path) -> None:
    """--engine-max-context bounds prompts (named error); --engine-kv-pool-bytes sizes the pool in rows,
    and a pool smaller than one request of max_beams beams is a startup error naming the setting."""
    from runtime.engine import pool_row_bytes
    from runtime.manifest import load_manifest
    from runtime.types import InvalidRequest

    manifest = load_manifest(tiny_artifacts)
    row = pool_row_bytes(manifest, 64)
    rt = open_runtime(tiny_artifacts, settings=EngineConfig(max_context=64, kv_pool_bytes=20 * row))
    try:
        assert rt.max_context == 64 and rt.batcher.rows == 20  # type: ignore[attr-defined]
        assert rt.decoder.pool.nbytes == 20 * row  # type: ignore[attr-defined]
        long = SearchRequest((HistoryItem(item_id="P00003"),), query="red running shoe " * 20, top_k=3)
        with pytest.raises(InvalidRequest, match=r"^query: .*\(64 positions\)"):
            rt.search(long)
    finally:
        rt.close()
    with pytest.raises(ConfigError, match=r"^engine\.kv_pool_bytes: .* fewer than limits\.max_beams"):
        open_runtime(tiny_artifacts, settings=EngineConfig(max_context=64, kv_pool_bytes=3 * row))
    config = load_config(overrides={"engine.max_context": "128", "engine.kv_pool_bytes": "1048576"})
    assert config.engine.max_context == 128 and config.engine.kv_pool_bytes == 1 << 20
