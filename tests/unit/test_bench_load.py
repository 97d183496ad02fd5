"""The load section end to end on the tiny demo, with the smallest settings (no timing thresholds)."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks import load
from benchmarks.context import BenchContext


def test_shadow_links_everything_but_runtime_caches(tmp_path: Path) -> None:
    source = tmp_path / "artifacts"
    (source / "catalog").mkdir(parents=True)
    (source / "manifest.json").write_text("{}")
    for cache in load.RUNTIME_CACHES:
        (source / cache).mkdir()
    shadow = load.shadow_artifacts(source, tmp_path / "shadow")
    assert sorted(p.name for p in shadow.iterdir()) == ["catalog", "manifest.json"]
    assert (shadow / "manifest.json").resolve() == (source / "manifest.json").resolve()


def test_load_section_quick(tiny_artifacts: Path, tmp_path: Path) -> None:
    before = sorted(p.name for p in tiny_artifacts.iterdir())
    ctx = BenchContext(
        artifacts=tiny_artifacts, checkpoint=tiny_artifacts / "checkpoint", out=tmp_path, quick=True,
        extra={"load": {"requests_per_rpc": 4, "requests_mixed": 8, "explain_rounds": 1}},
    )
    result = load.run(ctx)
    json.dumps(result)  # JSON-serialisable as the harness needs
    assert {"startup", "load", "explain_scaling", "memory", "shutdown", "targets", "information", "plots"} <= set(result)

    startup = result["startup"]
    assert [s["latent_cache"] for s in startup["cold"]["starts"]] == ["cold"]
    assert [s["latent_cache"] for s in startup["warm"]["starts"]] == ["warm"]
    assert startup["cold"]["starts"][0]["images_pending"] == ctx.manifest["tokens"]["item_count"]
    assert startup["warm"]["median_s"] > 0
    # a tiny ctx.artifacts is served through a shadow directory: nothing is written into it
    assert result["served"]["via_shadow"] is True
    assert sorted(p.name for p in tiny_artifacts.iterdir()) == before

    levels = result["load"]["levels"]
    assert [lv["concurrency"] for lv in levels] == [1, 4]
    for level in levels:
        for rpc in load.RPCS:
            entry = level["rpcs"][rpc]
            assert entry["requests"] == 4 and entry["ok"] == 4, (rpc, entry)
            assert entry["throughput_rps"] > 0
            assert entry["errors"] == {} and entry["resource_exhausted"] == 0
            assert entry["p50_ms"] <= entry["p95_ms"] <= entry["p99_ms"]
            assert set(entry["cpu"]) == {"server_cores", "load_generator_cores", "other_cores"}
        assert level["rpcs"]["Explain"]["first_piece"]["p50_ms"] is not None
        assert level["mixed"]["requests"] == 8 and level["mixed"]["throughput_rps"] > 0
        # the mixed run interleaves all four RPCs
        assert all(level["mixed"]["rpcs"][rpc]["requests"] == 2 for rpc in load.RPCS)

    scaling = result["explain_scaling"]
    assert [r["streams"] for r in scaling["runs"]] == [1, 8]
    assert all(r["tokens"] > 0 and r["tokens_per_s"] > 0 for r in scaling["runs"])
    assert scaling["ratio"] > 0

    memory = result["memory"]
    assert memory["peak_rss_bytes"] >= memory["rss_bytes_end"] > 0
    assert memory["kv_cache_bytes_peak"] is not None and memory["prefix_cache_bytes_peak"] > 0
    graphs = ctx.manifest["graphs"]
    assert memory["weights_bytes"]["total"] == sum((tiny_artifacts / g["file"]).stat().st_size for g in graphs.values())

    assert result["shutdown"]["exit_code"] == 0 and result["shutdown"]["killed"] is False

    (target,) = result["targets"]
    assert set(target) == {"name", "value", "target", "met", "note"}
    plots = result["plots"]["load_by_rpc"]
    assert set(plots) == set(load.RPCS)
    for series in plots.values():
        assert series["concurrency"] == [1, 4]
        assert len(series["throughput_rps"]) == len(series["p99_ms"]) == 2

    text = load.render_markdown(result, "###")
    assert text.startswith("### Serving under load")
    rows = [line for line in text.splitlines() if line.startswith("| 4 | ")]
    assert len(rows) == len(load.RPCS) + 1  # one row per RPC plus the mixed run
