"""The exported VQGAN graphs against the PyTorch reference they were exported from."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from export.modeling.vqgan import load_vqgan
from export.vqgan import encoder_index_check
from runtime.manifest import load_manifest
from runtime.vqgan import to_unit_range


@pytest.fixture(scope="module")
def vq(tiny_artifacts_with_vqgan: Path):  # type: ignore[no-untyped-def]
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    root = tiny_artifacts_with_vqgan
    manifest = load_manifest(root)
    model = load_vqgan(root / "checkpoint" / "vqgan").model
    sessions = {k: ort.InferenceSession(str(root / manifest.graphs[k].file), providers=["CPUExecutionProvider"])
                for k in ("vqgan_encoder", "vqgan_decoder")}
    return root, manifest, model, sessions


def test_manifest_records_both_graphs_with_settings(vq) -> None:  # type: ignore[no-untyped-def]
    _, manifest, _, _ = vq
    dec = manifest.graphs["vqgan_decoder"]
    assert (dec.extra["grid"], dec.extra["n_embed"], dec.extra["resolution"]) == (16, 1024, 256)
    assert dec.inputs[0].dtype == "int64" and dec.inputs[0].shape == ["images", 256]
    enc = manifest.graphs["vqgan_encoder"]
    assert enc.outputs[0].dtype == "int64" and enc.outputs[0].shape == ["images", 256]
    assert manifest.source["vqgan"]["validation"]["vqgan_decoder"]["cases"] == 2


def test_decoder_matches_pytorch_within_a_tolerance_scaled_to_the_pixels(vq) -> None:  # type: ignore[no-untyped-def]
    _, _, model, sessions = vq
    codes = torch.randint(0, 1024, (2, 256), generator=torch.Generator().manual_seed(42))
    with torch.no_grad():
        ref = model.decode_indices(codes).numpy()
    (got,) = sessions["vqgan_decoder"].run(None, {"codes": codes.numpy()})
    assert got.shape == (2, 3, 256, 256)
    scale = float(np.abs(ref).max())
    assert scale > 0.1  # a real image, not a zero output
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5 * scale)


def test_encoder_indices_match_pytorch_on_catalog_images(vq) -> None:  # type: ignore[no-untyped-def]
    root, _, model, sessions = vq
    images = sorted((root / "catalog" / "images").glob("*.png"))[:3]
    pixels = np.stack([to_unit_range(p.read_bytes(), 256) for p in images])
    with torch.no_grad():
        ref = model.encode_indices(torch.from_numpy(pixels)).numpy()
    (got,) = sessions["vqgan_encoder"].run(None, {"pixels": pixels})
    assert got.shape == (3, 256) and got.dtype == np.int64
    assert len(np.unique(ref)) > 1  # images differ, so codes do
    gap = encoder_index_check(model)({"pixels": torch.from_numpy(pixels)}, ref, got)  # ties only
    assert gap <= 1e-4


def test_encoder_check_rejects_indices_that_are_not_ties(vq) -> None:  # type: ignore[no-untyped-def]
    _, _, model, _ = vq
    pixels = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(5)) * 2 - 1
    with torch.no_grad():
        ref = model.encode_indices(pixels).numpy()
    wrong = ref.copy()
    wrong[0, 7] = (wrong[0, 7] + 1) % 1024
    with pytest.raises(ValueError, match="not ties"):
        encoder_index_check(model)({"pixels": pixels}, ref, wrong)
