"""`unimp bench` end to end on the tiny demo (quick): the files it writes and the structure of its numbers."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from benchmarks import cli, report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cli.add_bench_arguments(parser)
    return parser.parse_args(list(argv))


@pytest.fixture(scope="module")
def bench_run(tiny_artifacts: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[int, Path]:
    out = tmp_path_factory.mktemp("bench")
    rc = cli.run_bench(_args("--preset", "tiny", "--quick", "--sections", "tasks,floor", "--repeats", "1",
                             "--artifacts", str(tiny_artifacts), "--out", str(out)))
    return rc, out


def _positive(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value > 0


def test_writes_json_markdown_and_plots(bench_run: tuple[int, Path]) -> None:
    rc, out = bench_run
    assert rc == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results["sections"]) == {"tasks", "floor"}
    assert results["config"]["preset"] == "tiny" and results["config"]["quick"] is True
    assert results["machine"]["cpus"] >= 1 and "contention" in results["machine"]
    assert "onnxruntime" in results["packages"]
    md = (out / "results.md").read_text()
    assert "## Targets" in md and "## Per-task latency" in md and "## Decode vs the memory-bandwidth floor" in md
    for name in ("latency_breakdown.png", "ttft_prefix_cache.png", "explain_streams.png", "decode_floor.png"):
        assert name in results["plots"]
        assert (out / "plots" / name).read_bytes()[:8] == PNG_MAGIC
        assert f"plots/{name}" in md


def test_task_numbers(bench_run: tuple[int, Path], tiny_artifacts: Path) -> None:
    _, out = bench_run
    tasks = json.loads((out / "results.json").read_text())["sections"]["tasks"]
    assert set(tasks["tasks"]) == {"recommend", "search", "explain", "select_items"}
    for name, conditions in tasks["tasks"].items():
        for label in ("miss", "hit"):
            s = conditions[label]
            for key in ("prefill_s", "total_s", "first_token_s", "wall_s"):
                assert _positive(s[key]), (name, label, key)
            assert s["vision_s"] >= 0 and s["total_s"] >= s["prefill_s"]
        # a miss never reuses a cached prefix; a hit always does
        assert conditions["miss"]["prefix_cache_hit_rate"] == 0.0
        assert conditions["hit"]["prefix_cache_hit_rate"] == 1.0
    explain = tasks["tasks"]["explain"]["miss"]
    assert explain["tokens"] >= 1 and _positive(explain["decode_per_token_s"]) and _positive(explain["decode_s"])
    assert explain["first_token_s"] <= explain["total_s"]
    assert _positive(tasks["prefix_cache"]["ratio"])
    tok = tasks["prefix_cache"]["explain_prompt_tokens"]
    assert 0 < tok["prefix"] < tok["prompt"] and tok["prefix"] + tok["suffix"] == tok["prompt"]
    img = tasks["inline_image"]
    assert img["images"] == 4 and img["inline"]["vision_s"] > img["catalog"]["vision_s"]
    streams = tasks["concurrency"]["streams"]
    assert set(streams) == {"1", "8"}
    assert streams["1"]["tokens"] == tasks["explain_new_tokens"]
    assert streams["8"]["tokens"] == 8 * tasks["explain_new_tokens"]
    assert streams["1"]["mean_batch_rows"] == 1.0 and streams["8"]["mean_batch_rows"] >= 1.0
    assert _positive(tasks["concurrency"]["speedup"])
    manifest = json.loads((tiny_artifacts / "manifest.json").read_text())
    d = manifest["decoder"]
    mem = tasks["memory"]
    assert mem["kv_bytes_per_token"] == 2 * d["num_layers"] * d["num_heads"] * d["head_dim"] * 4
    assert mem["weights_bytes_text"] == sum((tiny_artifacts / manifest["graphs"][g]["file"]).stat().st_size
                                            for g in ("vision", "media_kv", "decoder"))
    for key in ("peak_rss_bytes", "kv_bytes_peak", "prefix_cache_bytes_peak"):
        assert _positive(mem[key]), key
    assert {t["name"] for t in tasks["targets"]} and all(isinstance(t["met"], bool) for t in tasks["targets"])


def test_floor_numbers(bench_run: tuple[int, Path], tiny_artifacts: Path) -> None:
    _, out = bench_run
    results = json.loads((out / "results.json").read_text())
    floor = results["sections"]["floor"]
    bw = floor["bandwidth"]
    assert _positive(bw["gb_s"]) and _positive(bw["copy_gb_s"]) and bw["weight_bytes"] >= 256 << 20  # a read GEMV
    dec = floor["decoder"]
    w = dec["weights"]
    assert 0 < w["per_token"] < w["total"] <= w["file_bytes"]  # the embedding table counts one row
    assert dec["bytes_per_token"] == w["per_token"] + dec["kv_bytes_read"] + dec["xattn_memory_bytes"]
    assert floor["floor_s"] == pytest.approx(dec["bytes_per_token"] / (floor["bandwidth"]["gb_s"] * 1e9))
    for key in ("per_token_s", "session_run_s", "ratio"):
        assert _positive(floor[key]), key
    assert floor["ratio"] == pytest.approx(floor["per_token_s"] / floor["floor_s"])
    layouts = floor["layouts"]  # both KV layouts side by side: the artifacts' own and one exported for it
    assert set(layouts) == {"inplace", "concat"} and dec["kv_layout"] == "inplace"
    for r in layouts.values():
        assert _positive(r["per_token_s"]) and r["ratio"] == pytest.approx(r["per_token_s"] / r["floor_s"])
    assert floor["per_token_s"] == layouts["inplace"]["per_token_s"]
    (target,) = floor["targets"]
    assert target["met"] == (layouts["inplace"]["ratio"] <= 1.15)
    if not target["met"]:
        assert floor["profile"]["top_ops"] and all(_positive(o["per_step_s"]) for o in floor["profile"]["top_ops"])
    flat = [t for t in results["targets"] if t["section"] == "floor"]
    assert len(flat) == 1 and flat[0]["value"] == target["value"]


def test_missing_section_is_skipped(monkeypatch: pytest.MonkeyPatch, tiny_artifacts: Path, tmp_path: Path) -> None:
    monkeypatch.setitem(cli.SECTIONS, "load", cli.Section("benchmarks.not_written_yet", "run", "absent"))
    from benchmarks.context import BenchContext

    ctx = BenchContext(tiny_artifacts, tiny_artifacts / "checkpoint", tmp_path, quick=True)
    result = cli.run_section("load", ctx)
    assert "skipped" in result and "benchmarks.not_written_yet" in result["skipped"]
    assert cli.run_bench(_args("--sections", "tasks,nope", "--out", str(tmp_path))) == 2


def test_readme_section_is_replaced_between_markers(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text("# Title\n\n## Performance\n\nold text\n\n## Layout\n\nkept\n")
    plots = tmp_path / "plots"
    plots.mkdir()
    (plots / "a.png").write_bytes(PNG_MAGIC)
    results = {"config": {"preset": "tiny", "parameters": 1}, "machine": {"cpus": 2}, "targets": [
        {"section": "floor", "name": "x <= 1.5", "value": 2.0, "target": 1.5, "met": False, "note": "why"}],
        "sections": {}, "plots": ["a.png"]}
    report.update_readme(results, plots, readme, tmp_path / "docs" / "bench")
    text = readme.read_text()
    assert "old text" not in text and "## Layout\n\nkept" in text and text.count("## Performance") == 1
    assert "**missed**" in text and "(docs/bench/a.png)" in text and (tmp_path / "docs" / "bench" / "a.png").is_file()
    results["targets"][0]["met"] = True
    report.update_readme(results, plots, readme, tmp_path / "docs" / "bench")
    again = readme.read_text()
    assert again.count(report.START_MARKER) == 1 and "**met**" in again and "**missed**" not in again
    assert again.split(report.START_MARKER)[0] == text.split(report.START_MARKER)[0]
