"""export.resume: the catalog-encode cache and the resumable training state of the demo training.

Determinism assumption of the equality checks: both runs are in this process, on the same CPU, with the
same torch thread count, so a resumed run repeats the uninterrupted run's arithmetic; the tolerance still
allows a few float32 ulps of each tensor's magnitude.
"""

from __future__ import annotations

import json
import math
import os
import signal
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from export.resume import MEDIA_CHUNK, STATE_JSON, ResumeOptions, StateError, TrainingStopped  # noqa: E402
from export.shop import read_split  # noqa: E402
from export.train import ShopExamples, TrainConfig, catalog_pixels, train  # noqa: E402

CFG = TrainConfig(steps=6, batch_size=3, lr=5e-3, warmup=2)


@pytest.fixture(scope="module")
def setup(tiny_artifacts: Path) -> dict[str, Any]:
    from export.catalog import CatalogRecord
    from export.checkpoints import load_checkpoint

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    loaded = load_checkpoint(tiny_artifacts / "checkpoint")
    lines = (tiny_artifacts / "catalog" / "items.jsonl").read_text().splitlines()
    records = [CatalogRecord(**json.loads(line)) for line in lines]
    examples = ShopExamples(records, loaded.tokenizer, loaded.vocab)
    pixels = catalog_pixels(tiny_artifacts / "catalog", records, loaded.model.cfg.vision.image_size)
    return {"ckpt": tiny_artifacts / "checkpoint", "examples": examples, "pixels": pixels,
            "users": read_split(tiny_artifacts / "shop", "train")[:16]}


class Counted:
    """A fresh seeded model whose image encoder counts its calls (and can fail on the k-th)."""

    def __init__(self, setup: dict[str, Any], fail_on: int | None = None) -> None:
        from export.checkpoints import load_checkpoint

        self.model = load_checkpoint(setup["ckpt"]).model
        self.calls = 0
        real = self.model.encode_images

        def encode(pixels: Any) -> Any:
            self.calls += 1
            if fail_on is not None and self.calls == fail_on:
                raise KeyboardInterrupt
            return real(pixels)

        self.model.encode_images = encode  # type: ignore[method-assign]


def _run(setup: dict[str, Any], model: Any, cfg: TrainConfig = CFG, **resume: Any) -> Any:
    options = ResumeOptions(**resume) if resume else None
    return train(model, setup["examples"], setup["users"], setup["pixels"], cfg, progress=False, resume=options)


def _assert_same_weights(a: Any, b: Any) -> None:
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        x, y = x.numpy(), y.numpy()
        scale = float(np.abs(x).max()) if x.size else 0.0
        np.testing.assert_allclose(y, x, rtol=1e-6, atol=8 * np.finfo(np.float32).eps * max(scale, 1e-30),
                                   err_msg=name)


def test_interrupted_training_resumes_to_the_uninterrupted_weights(setup: dict[str, Any], tmp_path: Path) -> None:
    chunks = math.ceil(len(setup["pixels"]) / MEDIA_CHUNK)
    whole = Counted(setup)
    full = _run(setup, whole.model, directory=tmp_path / "a")
    assert whole.calls == chunks

    first = Counted(setup)
    with pytest.raises(TrainingStopped) as stopped:
        _run(setup, first.model, directory=tmp_path / "b", stop_after=3)
    assert (stopped.value.reason, stopped.value.step, stopped.value.steps) == ("stop_after", 3, CFG.steps)
    assert stopped.value.exit_code == 0
    assert json.loads((tmp_path / "b" / STATE_JSON).read_text())["step"] == 3
    halfway = {n: p.detach().clone() for n, p in first.model.named_parameters()}

    resumed = Counted(setup)  # a new process: fresh seeded weights, the state and cache from disk
    result = _run(setup, resumed.model, directory=tmp_path / "b")
    assert resumed.calls == 0  # every catalog chunk came from the cache
    np.testing.assert_allclose(result.losses, full.losses, rtol=1e-5)
    _assert_same_weights(whole.model, resumed.model)
    moved = max(float((p.detach() - halfway[n]).abs().max()) for n, p in resumed.model.named_parameters())
    assert moved > 1e-4  # the resumed run did train the last three steps


def test_an_interrupted_catalog_encode_keeps_its_finished_chunks(setup: dict[str, Any], tmp_path: Path) -> None:
    chunks = math.ceil(len(setup["pixels"]) / MEDIA_CHUNK)
    broken = Counted(setup, fail_on=4)  # Ctrl-C during the 4th chunk
    with pytest.raises(KeyboardInterrupt):
        _run(setup, broken.model, directory=tmp_path)
    assert len(list(tmp_path.glob("media-*/chunk-*.pt"))) == 3
    again = Counted(setup)
    _run(setup, again.model, directory=tmp_path)
    assert again.calls == chunks - 3
    reference = Counted(setup)
    _run(setup, reference.model)  # no cache at all
    _assert_same_weights(reference.model, again.model)


def test_a_state_of_another_setup_is_refused_and_restart_discards_it(setup: dict[str, Any], tmp_path: Path) -> None:
    with pytest.raises(TrainingStopped):
        _run(setup, Counted(setup).model, directory=tmp_path, stop_after=2)
    other = TrainConfig(steps=8, batch_size=3, lr=5e-3, warmup=2)
    with pytest.raises(StateError, match=r"state\.json: .*step 2.*train\.steps: saved 6, now 8.*--restart"):
        _run(setup, Counted(setup).model, other, directory=tmp_path)
    import export.train as tr

    real = tr._setup
    with pytest.MonkeyPatch.context() as mp:  # an edited training module is another setup too
        mp.setattr(tr, "_setup", lambda *a: {**real(*a), "code_sha256": "edited"})
        with pytest.raises(StateError, match=r"code_sha256: saved '[0-9a-f]{20}', now 'edited'"):
            _run(setup, Counted(setup).model, directory=tmp_path)
    result = _run(setup, Counted(setup).model, other, directory=tmp_path, restart=True)
    assert len(result.losses) == 8
    assert json.loads((tmp_path / STATE_JSON).read_text())["step"] == 8
    assert len(list(tmp_path.glob("state-*.pt"))) == 1  # older payloads are removed


def test_corrupt_or_partial_states_are_detected(setup: dict[str, Any], tmp_path: Path) -> None:
    with pytest.raises(TrainingStopped):
        _run(setup, Counted(setup).model, directory=tmp_path, stop_after=2)
    payload = next(tmp_path.glob("state-*.pt"))
    data = payload.read_bytes()
    payload.write_bytes(data[: len(data) // 2])  # a partial copy
    with pytest.raises(StateError, match=r"state-000002\.pt: corrupt or partial .*--restart"):
        _run(setup, Counted(setup).model, directory=tmp_path)
    payload.write_bytes(data[:100] + bytes([data[100] ^ 1]) + data[101:])  # same size, one bit flipped
    with pytest.raises(StateError, match="corrupt or partial"):
        _run(setup, Counted(setup).model, directory=tmp_path)
    (tmp_path / STATE_JSON).write_text('{"version": 1, "step"')
    with pytest.raises(StateError, match=r"state\.json: corrupt training state"):
        _run(setup, Counted(setup).model, directory=tmp_path)


def test_sigint_saves_the_state_after_the_current_step(setup: dict[str, Any], tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    import export.train as tr

    real, calls = tr.batch_loss, []

    def loss(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return real(*args, **kwargs)

    monkeypatch.setattr(tr, "batch_loss", loss)
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(TrainingStopped) as stopped:
        _run(setup, Counted(setup).model, directory=tmp_path)
    assert (stopped.value.reason, stopped.value.step, stopped.value.exit_code) == ("SIGINT", 2, 130)
    assert json.loads((tmp_path / STATE_JSON).read_text())["step"] == 2
    assert signal.getsignal(signal.SIGINT) is before  # the handler is removed afterwards


def test_the_deadline_stops_with_the_state_saved(setup: dict[str, Any], tmp_path: Path) -> None:
    import time

    with pytest.raises(TrainingStopped) as stopped:  # past the deadline before the catalog encode
        _run(setup, Counted(setup).model, directory=tmp_path, deadline=time.monotonic())
    assert (stopped.value.reason, stopped.value.step, stopped.value.exit_code) == ("time", 0, 0)
    assert stopped.value.stage.startswith("catalog encode, 0/")
    assert not (tmp_path / STATE_JSON).exists()  # nothing trained yet: the catalog cache is the progress
    with pytest.raises(TrainingStopped):
        _run(setup, Counted(setup).model, directory=tmp_path, stop_after=1)
    with pytest.raises(TrainingStopped) as stopped:  # resumed past the deadline: one step, then saved
        _run(setup, Counted(setup).model, directory=tmp_path, deadline=time.monotonic())
    assert (stopped.value.reason, stopped.value.step, stopped.value.stage) == ("time", 2, "train")
    assert json.loads((tmp_path / STATE_JSON).read_text())["step"] == 2


@pytest.mark.parametrize("extra, message", [
    (["--restart", "--untrained"], "error: --restart: only with --demo"),
    (["--save-every", "-1"], "error: --save-every: must be >= 0"),
    (["--train-max-minutes", "0"], "error: --train-max-minutes: must be > 0"),
])
def test_export_resume_flags_are_checked(extra: list[str], message: str, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    from unimp.cli import main

    assert main(["export", "--demo", "tiny", "--out", str(tmp_path / "out"), "--quiet", *extra]) == 2
    assert capsys.readouterr().err.startswith(message)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("reason, code", [("time", 0), ("SIGTERM", 143)])
def test_export_reports_a_stopped_training(reason: str, code: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    import export.pipeline as pipeline
    from unimp.cli import main

    def stop(*args: Any, **kwargs: Any) -> Any:
        assert kwargs["train_max_minutes"] == 2.5 and kwargs["restart"]
        raise TrainingStopped(reason, 40, 300, tmp_path / "checkpoint" / ".train-cache")

    monkeypatch.setattr(pipeline, "export_demo", stop)
    argv = ["export", "--demo", "small", "--out", str(tmp_path), "--train-max-minutes", "2.5", "--restart"]
    assert main(argv) == code
    err = capsys.readouterr().err
    assert "(step 40/300)" in err and ".train-cache" in err
    assert err.rstrip().endswith(f"again to continue: unimp export --demo small --out {tmp_path} "
                                 "--train-max-minutes 2.5")
