"""Correctness of the baselines section on the tiny demo (no timing assertions).

The upstream OpenFlamingo model built from our checkpoint directory must be the reference model (same
logits within 1e-4 relative), the spot check must be able to fail, and ``run`` in quick mode must return
every section and target with the agreed fields.
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
if importlib.util.find_spec("open_flamingo") is None or importlib.util.find_spec("open_clip") is None:
    pytest.skip("the upstream packages (open-flamingo, open_clip_torch) are not installed", allow_module_level=True)
pytest.importorskip("diffusers")

from benchmarks.context import BenchContext  # noqa: E402
from benchmarks.upstream_model import (  # noqa: E402
    SPOT_CHECK_RTOL,
    UpstreamError,
    UpstreamModel,
    build_upstream_model,
    spot_check,
    upstream_state_dict,
)

TARGET_FIELDS = {"name", "value", "target", "met", "note"}


@pytest.fixture(scope="module")
def tiny_with_diffusion(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from export.pipeline import export_demo

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    out = tmp_path_factory.mktemp("baselines_tiny")
    export_demo("tiny", out, seed=0, progress=False, with_diffusion=True)
    return out


@pytest.fixture(scope="module")
def upstream(tiny_with_diffusion: Path) -> UpstreamModel:
    return build_upstream_model(tiny_with_diffusion / "checkpoint")


def test_upstream_model_from_checkpoint_has_the_reference_logits(upstream: UpstreamModel, tiny_with_diffusion: Path) -> None:
    """A real recommendation prompt (catalog images, item tokens): upstream forward == reference full_logits."""
    from runtime.catalog import Catalog
    from runtime.manifest import load_manifest
    from runtime.prompts import ResolvedItem, encode, recommendation_prompt
    from runtime.vision import preprocess

    assert upstream.spot_check_error <= SPOT_CHECK_RTOL
    assert upstream.kept_upstream == ["vision_encoder.proj"]
    manifest = load_manifest(tiny_with_diffusion)
    catalog = Catalog(tiny_with_diffusion, manifest)
    try:
        items = [catalog.get(f"P{k:05d}") for k in (3, 17, 42)]
        prompt = recommendation_prompt(tuple(ResolvedItem(i.meta, i.item_id, i.token) for i in items))
        ids = encode(prompt, upstream.reference.tokenizer, upstream.vocab.endofchunk, upstream.vocab.image).ids
        v = manifest.vision
        pixels = torch.from_numpy(preprocess([catalog.image(i.item_id) for i in items], v.image_size, v.mean, v.std))
    finally:
        catalog.close()
    x = torch.from_numpy(ids)[None]
    assert int((x >= upstream.vocab.item_start).sum()) >= 3  # the history's item tokens (resized rows) are in it
    model = upstream.reference.model
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        theirs = upstream.flamingo(pixels[None, :, None], x, attention_mask=torch.ones_like(x)).logits[0]
        ours = model.full_logits(x, torch.ones_like(x), [model.encode_images(pixels)], upstream.vocab.image)[0]
    assert theirs.shape == ours.shape == (len(ids), upstream.vocab.size)
    err = float((ours - theirs).abs().max() / theirs.abs().max())
    assert err <= 1e-4, err


def test_spot_check_detects_a_different_model(upstream: UpstreamModel) -> None:
    gate = upstream.flamingo.lang_encoder.gated_cross_attn_layers[1].attn_gate
    saved = gate.detach().clone()
    try:
        with torch.no_grad():
            gate.add_(0.5)
        assert spot_check(upstream.flamingo, upstream.reference) > 10 * SPOT_CHECK_RTOL
    finally:
        with torch.no_grad():
            gate.copy_(saved)
    assert spot_check(upstream.flamingo, upstream.reference) <= SPOT_CHECK_RTOL


def test_state_dict_mapping_refuses_gaps(upstream: UpstreamModel) -> None:
    reference = upstream.reference.model.state_dict()
    missing = dict(reference)
    missing.pop("perceiver.latents")
    with pytest.raises(UpstreamError, match="no reference counterpart"):
        upstream_state_dict(upstream.flamingo, missing)
    extra = {**reference, "lm.unknown.weight": torch.zeros(1)}
    with pytest.raises(UpstreamError, match="no place for"):
        upstream_state_dict(upstream.flamingo, extra)


def test_run_quick_returns_every_section(tiny_with_diffusion: Path, tmp_path: Path) -> None:
    from benchmarks import baselines

    ctx = BenchContext(artifacts=tiny_with_diffusion, checkpoint=tiny_with_diffusion / "checkpoint", out=tmp_path,
                       quick=True, repeats=1, threads=min(2, os.cpu_count() or 1))
    result: dict[str, Any] = baselines.run(ctx)
    assert set(result) >= {"conditions", "upstream_model", "recommendation", "reference", "explanation",
                           "onnxruntime_genai", "image_generation", "targets"}
    assert result["upstream_model"]["spot_check_rel_error"] <= SPOT_CHECK_RTOL

    rec = result["recommendation"]
    assert set(rec["median_s"]) >= {"upstream_beam", "runtime_fast", "runtime_beam", "reference_fast", "reference_beam"}
    assert all(v > 0 for v in rec["median_s"].values())
    profile = rec["beam_profile"]
    assert profile["runtime_decode_graph_calls"] == 3  # 4 new tokens: 3 decode calls after the prefill
    assert 0 < profile["runtime_decode_graph_s"] <= profile["runtime_decode_s"]
    row = rec["per_history"][0]
    assert len(row["fast_top"]) == 10 and len(set(row["fast_top"])) == 10
    assert not set(row["fast_top"]) & set(row["history"])  # history items are excluded
    # the same model and decoding on every side: the same rankings and the same hypotheses
    assert row["fast_top_equals_reference_fast_top"]
    assert row["fast_top_equals_upstream_first_step_items"]
    assert row["hypotheses"] == 10
    assert row["runtime_hypotheses_identical_to_upstream"] == 10
    assert row["reference_hypotheses_identical_to_upstream"] == 10
    assert row["runtime_beam_top"] == row["upstream_beam_top"]

    expl = result["explanation"]
    assert expl["runtime"]["tokens"] == expl["upstream_hf_generate"]["tokens"] == 4
    assert expl["agreement"]["runtime_rating"] == expl["agreement"]["reference_rating"]
    assert expl["agreement"]["runtime_text_equals_upstream"]
    assert expl["agreement"]["reference_tokens_equal_upstream"]

    assert result["onnxruntime_genai"]["comparable"] is False
    assert result["onnxruntime_genai"]["reasons"]

    sizes = result["image_generation"]["sizes"]
    assert sizes and sizes[0]["max_pixel_difference"] <= 2
    assert np.isfinite(sizes[0]["ratio_ours_over_diffusers"])

    targets = result["targets"]
    assert [t["name"] for t in targets] == [
        "recommend_fast_speedup_vs_paper_beam",
        "recommend_fast_top1_agreement",
        "recommend_beam_speedup_vs_paper_beam",
        "recommend_beam_top10_agreement",
        "explain_decode_tokens_per_s_vs_pytorch_eager",
        "image_generation_time_vs_diffusers",
    ]
    for t in targets:
        assert set(t) == TARGET_FIELDS
        assert isinstance(t["met"], bool) and t["note"]
