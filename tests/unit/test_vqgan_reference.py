"""The PyTorch VQGAN reference: taming-transformers' state-dict layout, checkpoint loading, quantization.

What was compared against taming-transformers: the fixture ``vqgan_imagenet_f16_1024_keys.json`` lists
every tensor name and shape of taming's ``VQModel`` (Encoder, Decoder, VectorQuantizer, quant_conv,
post_quant_conv; the training-only ``loss.*`` tensors excluded) built with the ``vqgan_imagenet_f16_1024``
config (ch 128, ch_mult 1,1,2,2,4, 2 residual blocks, attention at 16, z_channels 256, embed_dim 256,
n_embed 1024, resolution 256), recorded from taming-transformers 0.0.1's modules. The package itself is
not a dependency (it pulls pytorch-lightning and torchvision), so numerics are checked against the
architecture's definition instead: quantization as the nearest codebook entry, and the graph parity
tests in tests/parity/test_vqgan_onnx.py.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from export.modeling.vqgan import (
    IMAGENET_F16_1024,
    VQGANCheckpointError,
    VQGANConfig,
    VQModel,
    build_demo_vqgan,
    demo_vqgan_config,
    load_vqgan,
)

FIXTURE = Path(__file__).parent.parent / "fixtures" / "vqgan_imagenet_f16_1024_keys.json"


def test_state_dict_matches_taming_vqgan_imagenet_f16_1024_layout() -> None:
    expected = json.loads(FIXTURE.read_text())["tensors"]
    with torch.device("meta"):  # 72M parameters: names and shapes only
        model = VQModel(IMAGENET_F16_1024)
    got = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert sorted(set(got) - set(expected)) == [] and sorted(set(expected) - set(got)) == []
    assert {k: v for k, v in got.items() if expected[k] != v} == {}


def test_f16_1024_geometry() -> None:
    assert (IMAGENET_F16_1024.factor, IMAGENET_F16_1024.grid, IMAGENET_F16_1024.num_codes) == (16, 16, 256)
    demo = demo_vqgan_config()
    assert (demo.grid, demo.n_embed, demo.resolution) == (16, 1024, 256)


def test_taming_yaml_params_give_the_config() -> None:
    yaml_like = {"model": {"target": "taming.models.vqgan.VQModel", "params": {
        "embed_dim": 256, "n_embed": 1024, "ddconfig": {
            "double_z": False, "z_channels": 256, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
            "ch_mult": [1, 1, 2, 2, 4], "num_res_blocks": 2, "attn_resolutions": [16], "dropout": 0.0},
        "lossconfig": {"target": "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator"}}}}
    assert VQGANConfig.from_dict(yaml_like) == IMAGENET_F16_1024
    with pytest.raises(ValueError, match="double_z"):
        VQGANConfig.from_dict({"ddconfig": {"double_z": True}})


def _small() -> VQGANConfig:
    return replace(demo_vqgan_config(), resolution=64)


def test_checkpoint_with_loss_tensors_loads_and_round_trips(tmp_path: Path) -> None:
    cfg = _small()
    build_demo_vqgan(tmp_path, seed=3, cfg=cfg)
    data = torch.load(tmp_path / "model.ckpt", weights_only=True)
    data["state_dict"]["loss.discriminator.main.0.weight"] = torch.zeros(4, 3, 4, 4)  # like a taming checkpoint
    data["global_step"] = 10
    torch.save(data, tmp_path / "model.ckpt")
    loaded = load_vqgan(tmp_path)
    assert loaded.model.cfg == cfg and loaded.source["ignored_keys"] == 1
    for key, value in loaded.model.state_dict().items():
        torch.testing.assert_close(value, data["state_dict"][key], rtol=0, atol=0)


def test_missing_or_misshaped_tensor_names_it(tmp_path: Path) -> None:
    build_demo_vqgan(tmp_path, cfg=_small())
    data = torch.load(tmp_path / "model.ckpt", weights_only=True)
    del data["state_dict"]["quantize.embedding.weight"]
    torch.save(data, tmp_path / "model.ckpt")
    with pytest.raises(VQGANCheckpointError, match=r"quantize\.embedding\.weight"):
        load_vqgan(tmp_path)
    data["state_dict"]["quantize.embedding.weight"] = torch.zeros(7, 32)
    torch.save(data, tmp_path / "model.ckpt")
    with pytest.raises(VQGANCheckpointError, match=r"quantize\.embedding\.weight has shape \(7, 32\)"):
        load_vqgan(tmp_path)


def test_codes_are_the_nearest_codebook_entries_row_major() -> None:
    torch.manual_seed(0)
    model = VQModel(_small()).eval()
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        z = model.pre_quant(x)  # (2, D, 4, 4)
        codes = model.encode_indices(x)
    e = model.quantize.embedding.weight.detach().numpy()
    flat = z.numpy().transpose(0, 2, 3, 1).reshape(2, -1, e.shape[1])  # row-major positions
    brute = np.array([[int(np.argmin(((p - e) ** 2).sum(-1))) for p in row] for row in flat])
    assert codes.shape == (2, 16) and codes.dtype == torch.int64
    np.testing.assert_array_equal(codes.numpy(), brute)


def test_decode_looks_up_the_codebook_row_major() -> None:
    torch.manual_seed(1)
    model = VQModel(_small()).eval()
    codes = torch.randint(0, 1024, (1, 16))
    z = model.quantize.lookup(codes, 4)
    e = model.quantize.embedding.weight.detach()
    torch.testing.assert_close(z[0, :, 1, 2], e[codes[0, 1 * 4 + 2]], rtol=0, atol=0)
    with torch.no_grad():
        out = model.decode_indices(codes)
    assert out.shape == (1, 3, 64, 64) and torch.isfinite(out).all()
