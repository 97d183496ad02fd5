"""The `image` bench section's VQGAN row in quick mode on the tiny demo with VQGAN graphs."""

from __future__ import annotations

from pathlib import Path

from benchmarks import report
from benchmarks.context import BenchContext
from benchmarks.tasks import run_image


def test_image_section_reports_codes_per_second_and_decoder_ms(tiny_artifacts_with_vqgan: Path, tmp_path: Path) -> None:
    root = tiny_artifacts_with_vqgan
    ctx = BenchContext(root, root / "checkpoint", tmp_path, quick=True)
    result = run_image(ctx)
    vq = result["vqgan"]
    assert vq["codes"] == 256 and (vq["width"], vq["height"]) == (256, 256) and vq["repeats"] == 1
    stages = vq["stages"]
    assert all(stages[k] > 0 for k in ("codes_s", "vqgan_decoder_s", "prefill_s", "wall_s"))
    assert abs(vq["codes_per_s"] - 256 / stages["codes_s"]) <= 1e-9 * vq["codes_per_s"]
    assert abs(vq["decoder_ms"] - 1e3 * stages["vqgan_decoder_s"]) <= 1e-9 * vq["decoder_ms"]
    assert "skipped" in result["diffusion"]  # these artifacts have no diffusion graphs
    text = report.render_image(result, "###")
    assert "VQGAN codes (256x256" in text and "codes/s" in text and "VQGAN decoder" in text
