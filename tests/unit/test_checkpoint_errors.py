"""Checkpoint problems are reported with the file, and where it applies the key, that causes them."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from export.checkpoints import CheckpointError, build_demo_checkpoint, load_checkpoint


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_demo_checkpoint(tmp_path_factory.mktemp("demo") / "checkpoint", "tiny")


@pytest.fixture
def ckpt(demo: Path, tmp_path: Path) -> Path:
    """A private copy of the demo checkpoint to corrupt."""
    return Path(shutil.copytree(demo, tmp_path / "checkpoint"))


def edit_state(path: Path, **changes: torch.Tensor | None) -> None:
    """Rewrite a .pt state dict: set keys to tensors, or drop them (None)."""
    state = torch.load(path, weights_only=True)
    for key, value in changes.items():
        if value is None:
            del state[key]
        else:
            state[key] = value
    torch.save(state, path)


def test_the_demo_checkpoint_loads(demo: Path) -> None:
    report = load_checkpoint(demo).report
    assert report.missing == [] and report.unexpected == []


def test_missing_directory(tmp_path: Path) -> None:
    where = tmp_path / "nowhere"
    with pytest.raises(CheckpointError, match="does not exist") as err:
        load_checkpoint(where)
    assert str(where) in str(err.value)


def test_missing_unimp_json(ckpt: Path) -> None:
    (ckpt / "unimp.json").unlink()
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(ckpt)
    assert str(ckpt / "unimp.json") in str(err.value)


def test_invalid_unimp_json(ckpt: Path) -> None:
    (ckpt / "unimp.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON") as err:
        load_checkpoint(ckpt)
    assert str(ckpt / "unimp.json") in str(err.value)


def test_missing_tokenizer(ckpt: Path) -> None:
    (ckpt / "lm" / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(ckpt)
    assert str(ckpt / "lm" / "tokenizer.json") in str(err.value)


def test_missing_vision_weights(ckpt: Path) -> None:
    (ckpt / "vision.pt").unlink()
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(ckpt)
    assert str(ckpt / "vision.pt") in str(err.value)


def test_missing_lm_weights(ckpt: Path) -> None:
    (ckpt / "lm" / "model.safetensors").unlink()
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(ckpt)
    assert str(ckpt / "lm") in str(err.value)


@pytest.mark.parametrize("file", ["checkpoint.pt", "weights_epoch_1.pt"])
def test_wrong_shape_names_key_and_file(ckpt: Path, file: str) -> None:
    good = torch.load(ckpt / file, weights_only=True)["perceiver.latents"]
    edit_state(ckpt / file, **{"perceiver.latents": torch.zeros(good.shape[0] + 1, good.shape[1])})
    with pytest.raises(CheckpointError, match="shape mismatch") as err:
        load_checkpoint(ckpt)
    message = str(err.value)
    assert "perceiver.latents" in message
    assert str(ckpt / file) in message


def test_unknown_keys_are_reported_with_their_file(ckpt: Path) -> None:
    edit_state(ckpt / "weights_epoch_1.pt", **{"perceiver.extra_scale": torch.ones(3), "optimizer_step": torch.ones(1)})
    edit_state(ckpt / "vision.pt", **{"visual.extra_head.weight": torch.ones(2, 2)})
    report = load_checkpoint(ckpt).report
    assert set(report.unexpected) == {
        ("perceiver.extra_scale", str(ckpt / "weights_epoch_1.pt")),
        ("optimizer_step", str(ckpt / "weights_epoch_1.pt")),
        ("visual.extra_head.weight", str(ckpt / "vision.pt")),
    }
    assert report.missing == []
    summary = report.summary()
    assert "unexpected keys (3)" in summary
    assert f"perceiver.extra_scale ({ckpt / 'weights_epoch_1.pt'})" in summary


def test_missing_keys_raise_in_strict_mode(ckpt: Path) -> None:
    for file in ("checkpoint.pt", "weights_epoch_1.pt"):
        edit_state(ckpt / file, **{"perceiver.norm.weight": None})
    with pytest.raises(CheckpointError, match="not found in any checkpoint file") as err:
        load_checkpoint(ckpt)
    assert "perceiver.norm.weight" in str(err.value)
    # without strict the model loads and the report lists the key
    report = load_checkpoint(ckpt, strict=False).report
    assert report.missing == ["perceiver.norm.weight"]


def test_whole_clip_text_tower_is_ignored(ckpt: Path) -> None:
    """A whole CLIP's text tower has positional_embedding and transformer.* too; they are not the vision tower's."""
    edit_state(
        ckpt / "vision.pt",
        positional_embedding=torch.zeros(77, 32),
        **{"transformer.resblocks.0.ln_1.weight": torch.zeros(32), "token_embedding.weight": torch.zeros(10, 32)},
    )
    report = load_checkpoint(ckpt).report
    assert report.unexpected == [] and report.missing == []
    ignored = {key for key, path in report.ignored if path == str(ckpt / "vision.pt")}
    assert {"positional_embedding", "transformer.resblocks.0.ln_1.weight", "token_embedding.weight"} <= ignored


def test_vision_tower_state_dict_without_prefix(ckpt: Path) -> None:
    """vision.pt may hold the visual tower alone (open_clip's ``model.visual.state_dict()``)."""
    state = torch.load(ckpt / "vision.pt", weights_only=True)
    torch.save({k.removeprefix("visual."): v for k, v in state.items()}, ckpt / "vision.pt")
    loaded = load_checkpoint(ckpt)
    assert loaded.report.unexpected == [] and loaded.report.missing == []
    assert torch.equal(loaded.model.vision.positional_embedding, state["visual.positional_embedding"])
