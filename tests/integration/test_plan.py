"""`unimp plan`: the budget's numbers against sums computed by hand from the tiny artifacts."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from runtime.boards import BOARDS, GB, get_board
from runtime.engine import RuntimeConfig
from runtime.limits import Limits
from runtime.manifest import load_manifest
from runtime.plan import PlanError, PlanSettings, make_plan, plan_with_suggestions
from unimp.cli import main


def _file_bytes(root: Path, rel: str) -> int:
    path = root / rel
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.is_file() else 0)


def _images(root: Path) -> int:
    lines = (root / "catalog" / "items.jsonl").read_text().splitlines()
    return sum(1 for line in lines if line.strip() and json.loads(line).get("image"))


def test_plan_matches_hand_computed_sums(tiny_artifacts: Path) -> None:
    m = load_manifest(tiny_artifacts, verify=False)
    d, v = m.decoder, m.vision
    board = get_board("orin-nano-8gb")
    plan = make_plan(tiny_artifacts, board, PlanSettings(context=128))
    by_name = {line.name: line for line in plan.lines}

    for name, entry in m.graphs.items():
        line = by_name[f"weights: {name}"]
        assert line.bytes == _file_bytes(tiny_artifacts, entry.file) and not line.estimate

    rows = RuntimeConfig().max_active + Limits().max_beams - 1  # what `unimp serve` allocates by default
    assert plan.slots == rows == 23
    kv = 2 * d.num_layers * d.num_heads * d.head_dim * (128 + 1) * rows * 4  # context + 1 scratch position
    memory = 2 * len(d.xattn_layers) * d.xattn_heads * v.num_latents * d.xattn_head_dim * rows * 4
    assert by_name["kv pool: self-attention K/V"].bytes == kv
    assert by_name["kv pool: last-image cross-attention K/V"].bytes == memory

    images = _images(tiny_artifacts)
    assert images > 0 and plan.catalog_images == images
    assert by_name["catalog: media latents"].bytes == images * v.num_latents * v.width * 4
    assert by_name["catalog: cross-attention K/V"].bytes == (
        images * len(d.xattn_layers) * 2 * d.xattn_heads * v.num_latents * d.xattn_head_dim * 4)
    assert by_name["prefix cache (LRU budget)"].bytes == RuntimeConfig().prefix_cache_bytes

    # unified memory: every line counts against the board, minus the OS share
    assert plan.device_bytes == sum(line.bytes for line in plan.lines) and plan.host_bytes == 0
    assert plan.budget_bytes == board.total_memory - board.reserved_bytes
    assert plan.fits

    # the KV lines scale with rows and context exactly
    bigger = make_plan(tiny_artifacts, board, PlanSettings(context=256, slots=5))
    big = {line.name: line.bytes for line in bigger.lines}
    assert big["kv pool: self-attention K/V"] == 2 * d.num_layers * d.num_heads * d.head_dim * 257 * 5 * 4


def test_serve_config_sets_the_rows(tiny_artifacts: Path, tmp_path: Path) -> None:
    toml = tmp_path / "serve.toml"
    toml.write_text("[engine]\nmax_active = 2\nmax_context = 64\n[limits]\nmax_beams = 4\n")
    assert main(["plan", str(tiny_artifacts), "--board", "agx-orin-64gb", "--config", str(toml), "--json"]) == 0
    from runtime.plan import runtime_config_from_server

    plan = make_plan(tiny_artifacts, get_board("agx-orin-64gb"), config=runtime_config_from_server(toml))
    assert (plan.slots, plan.context) == (2 + 4 - 1, 64)


def test_other_precision_is_a_labelled_estimate(tiny_artifacts: Path) -> None:
    m = load_manifest(tiny_artifacts, verify=False)
    plan = make_plan(tiny_artifacts, get_board("orin-nx-16gb"), PlanSettings(precision="int4"))
    decoder = next(line for line in plan.lines if line.name == "weights: decoder")
    size = _file_bytes(tiny_artifacts, m.graphs["decoder"].file)
    assert decoder.estimate and decoder.bytes == int(size * (0.5 + 4 / 32) / 4.0)
    fp16 = make_plan(tiny_artifacts, get_board("orin-nx-16gb"), PlanSettings(precision="fp16", context=100))
    kv = next(line for line in fp16.lines if line.name == "kv pool: self-attention K/V")
    d = m.decoder
    assert kv.estimate and kv.bytes == 2 * d.num_layers * d.num_heads * d.head_dim * 101 * fp16.slots * 2


def test_a_board_where_it_does_not_fit_says_so(tiny_artifacts: Path, capsys: pytest.CaptureFixture[str]) -> None:
    board = get_board("orin-nano-8gb")
    settings = PlanSettings(slots=4000)  # ~10 GB of KV at the model's 1024 positions
    plan = plan_with_suggestions(tiny_artifacts, board, settings)
    assert not plan.fits and plan.device_bytes > plan.budget_bytes
    (rows,) = [s for s in plan.suggestions if s.startswith("fewer KV rows")]
    n = int(rows.split("--slots ")[1].split()[0])
    assert make_plan(tiny_artifacts, board, replace(settings, slots=n)).fits
    assert not make_plan(tiny_artifacts, board, replace(settings, slots=n + 1)).fits

    assert main(["plan", str(tiny_artifacts), "--board", "orin-nano-8gb", "--slots", "4000"]) == 1
    out = capsys.readouterr().out
    assert "DOES NOT FIT" in out and f"--slots {n} fits" in out


def test_discrete_gpu_splits_device_and_host(tiny_artifacts: Path) -> None:
    plan = make_plan(tiny_artifacts, BOARDS["x86-16gb"], PlanSettings(context=64))
    host = {line.name for line in plan.lines if line.where == "host"}
    assert {"catalog: media latents", "catalog: cross-attention K/V"} <= host
    assert plan.device_bytes + plan.host_bytes == sum(line.bytes for line in plan.lines)
    assert plan.budget_bytes == 16 * GB - BOARDS["x86-16gb"].reserved_bytes


def test_bad_options_name_the_option(tiny_artifacts: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(PlanError, match=r"^--context: must be in 1\.\.1024"):
        make_plan(tiny_artifacts, get_board("orin-nano-8gb"), PlanSettings(context=5000))
    with pytest.raises(PlanError, match=r"^--slots: must be >= 1"):
        make_plan(tiny_artifacts, get_board("orin-nano-8gb"), PlanSettings(slots=0))
    assert main(["plan", str(tiny_artifacts), "--board", "orin-nano-8gb", "--reserve-gb", "-1"]) == 2
    assert capsys.readouterr().err.startswith("error: --reserve-gb: must be >= 0")
    with pytest.raises(PlanError, match=r"^engine\.kv_pool_bytes: 1000 bytes hold 0 KV rows"):
        make_plan(tiny_artifacts, get_board("orin-nano-8gb"), config=RuntimeConfig(kv_pool_bytes=1000))
    few = make_plan(tiny_artifacts, get_board("orin-nano-8gb"), PlanSettings(slots=2))
    assert any("fewer than limits.max_beams (16)" in note for note in few.notes)
