"""export.train: training prompts are the served prompts, answer spans and weights, loss goes down."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from export.catalog import CatalogRecord  # noqa: E402
from export.shop import read_split  # noqa: E402
from export.train import TASKS, ShopExamples, TrainConfig, batch_loss, catalog_pixels, train  # noqa: E402
from runtime.types import HistoryItem  # noqa: E402


def _records(artifacts: Path) -> list[CatalogRecord]:
    import json

    lines = (artifacts / "catalog" / "items.jsonl").read_text().splitlines()
    return [CatalogRecord(**json.loads(line)) for line in lines]


@pytest.fixture(scope="module")
def examples(tiny_artifacts: Path, tiny_reference: Any) -> ShopExamples:
    return ShopExamples(_records(tiny_artifacts), tiny_reference.tokenizer, tiny_reference.vocab)


@pytest.fixture(scope="module")
def served(tiny_artifacts: Path) -> Any:
    from runtime.engine import Runtime

    rt = Runtime.open(tiny_artifacts)
    yield rt
    rt.close()


def _capture(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Record every prompt the engine encodes for serving."""
    import runtime.engine as engine

    seen: list[Any] = []
    real = engine.encode

    def spy(prompt: Any, *args: Any, **kwargs: Any) -> Any:
        enc = real(prompt, *args, **kwargs)
        seen.append(enc)
        return enc

    monkeypatch.setattr(engine, "encode", spy)
    return seen


@pytest.mark.parametrize("task", TASKS)
def test_training_prompts_are_the_served_prompts(
    task: str, examples: ShopExamples, served: Any, tiny_artifacts: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from runtime.types import PreferenceRequest, RecommendRequest, SearchRequest, SelectRequest

    user = read_split(tiny_artifacts / "shop", "test")[0]
    history = tuple(HistoryItem(item_id=h["item_id"], rating=h["rating"], explanation=h["explanation"])
                    for h in user["history"])
    seen = _capture(monkeypatch)
    if task == "recommend":
        served.recommend(RecommendRequest(history=history, top_k=3))
    elif task == "search":
        served.search(SearchRequest(query=user["query"], history=history, top_k=3))
    elif task == "preference":
        served.predict_preference(PreferenceRequest(target=HistoryItem(item_id=user["rating_item"]), history=history))
    else:
        cands = tuple(HistoryItem(item_id=c) for c in user["candidates"])
        served.select_items(SelectRequest(candidates=cands, history=history, max_selected=1))
    prompt, answer = examples.prompt(task, user)
    assert prompt.text.encode() == seen[-1].prompt.text.encode()
    example = examples.example(task, user)
    np.testing.assert_array_equal(example.ids[: example.slice_pos + 1], seen[-1].ids)
    assert example.slice_pos == len(seen[-1].ids) - 1  # the runtime reads the answer from this position
    tail = examples.tokenizer.decode(example.ids[example.slice_pos + 1:], skip_special_tokens=False)
    assert tail == answer + "<|endoftext|>"
    expected = {"recommend": f" item_{examples.resolved(user['next_item']).token}",
                "search": f" item_{examples.resolved(user['search_item']).token}",
                "preference": f" rate_{user['rating']} {user['explanation']}",
                "selection": " " + " ".join(f"s_{i}" for i in user["selected"])}[task]
    assert answer == expected.removeprefix(" ") if task == "selection" else answer == expected


def test_history_answer_spans_are_supervised(examples: ShopExamples, tiny_artifacts: Path) -> None:
    """Context reconstruction: every history item token (recommendation) and every history rating and
    explanation (preference) carries loss; the prompt's other tokens do not."""
    user = read_split(tiny_artifacts / "shop", "test")[0]
    v = examples.vocab
    rec = examples.example("recommend", user)
    supervised = [t for t, w in zip(rec.ids[: rec.slice_pos + 1], rec.weights) if w]
    tokens = [examples.resolved(h["item_id"]).token + v.item_start for h in user["history"][-4:]]
    assert supervised == tokens
    assert all(w > 0 for w in rec.weights[rec.slice_pos + 1:])
    pref = examples.example("preference", user)
    text = examples.tokenizer.decode([t for t, w in zip(pref.ids[: pref.slice_pos + 1], pref.weights) if w],
                                     skip_special_tokens=False)
    for h in user["history"][-4:]:
        assert f"rate_{h['rating']} {h['explanation']}" in text
    assert "Category" not in text and "<|endofchunk|>" not in text
    sel = examples.example("selection", user)
    assert not any(sel.weights[: sel.slice_pos + 1])
    assert sel.slice_target == [1 / len(user["selected"]) if i in user["selected"] else 0.0
                                for i in range(len(user["candidates"]))]


def test_a_few_training_steps_reduce_the_loss(examples: ShopExamples, tiny_artifacts: Path) -> None:
    from export.checkpoints import load_checkpoint

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    model = load_checkpoint(tiny_artifacts / "checkpoint").model
    users = read_split(tiny_artifacts / "shop", "train")[:8]
    pixels = catalog_pixels(tiny_artifacts / "catalog", examples.records, model.cfg.vision.image_size)
    fixed = [examples.example(t, u) for t in ("recommend", "preference") for u in users[:2]]
    with torch.no_grad():
        media = model.encode_images(pixels)
        before = float(batch_loss(model, fixed, None, examples.vocab, 2.0, 1.0, media))
    result = train(model, examples, users, pixels, TrainConfig(steps=12, batch_size=4, lr=5e-3, warmup=2),
                   progress=False)
    with torch.no_grad():
        after = float(batch_loss(model, fixed, None, examples.vocab, 2.0, 1.0, media))
    assert len(result.losses) == 12 and all(np.isfinite(result.losses))
    assert after < 0.9 * before
    assert all(p.requires_grad for p in model.parameters())  # the frozen vision is released afterwards


def test_selection_tags_cover_each_candidate_chunk(examples: ShopExamples, tiny_artifacts: Path) -> None:
    """The candidate-tag loss supervises every token of candidate k's chunk after its ``s_k`` (through
    the chunk's ``<|endofchunk|>``) with target k, and nothing else."""
    user = read_split(tiny_artifacts / "shop", "test")[0]
    v, tok = examples.vocab, examples.tokenizer
    sel = examples.example("selection", user)
    assert len(sel.tag_pos) == len(sel.tag_target) > 0
    for k, item_id in enumerate(user["candidates"]):
        positions = [p for p, t in zip(sel.tag_pos, sel.tag_target) if t == k]
        assert positions == list(range(positions[0], positions[-1] + 1))  # one contiguous span
        assert sel.ids[positions[0] - 1] == v.selections[k]  # right after the chunk's tag
        assert sel.ids[positions[-1]] == v.endofchunk
        text = tok.decode([sel.ids[p] for p in positions], skip_special_tokens=False)
        assert examples.resolved(item_id).meta.title in text
    assert max(sel.tag_pos) < sel.slice_pos  # the question and the answer carry no tag loss
    for task in ("recommend", "search", "preference"):
        other = examples.example(task, user)
        assert other.tag_pos == [] and other.tag_target == []


def test_augmented_training_prompts_are_served_prompts(examples: ShopExamples, served: Any, tiny_artifacts: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The augmented records (a reordered selection set, an earlier target) go through the same builders."""
    from runtime.types import RecommendRequest, SelectRequest

    user = read_split(tiny_artifacts / "shop", "test")[1]
    rng = np.random.default_rng(5)
    seen = _capture(monkeypatch)
    for task in ("selection", "recommend"):
        aug = examples.augmented(task, user, rng)
        history = tuple(HistoryItem(item_id=h["item_id"], rating=h["rating"], explanation=h["explanation"])
                        for h in aug["history"])
        if task == "selection":
            cands = tuple(HistoryItem(item_id=c) for c in aug["candidates"])
            served.select_items(SelectRequest(candidates=cands, history=history, max_selected=1))
        else:
            served.recommend(RecommendRequest(history=history, top_k=3))
        example = examples.example(task, aug)
        np.testing.assert_array_equal(example.ids[: example.slice_pos + 1], seen[-1].ids)


def test_selection_augmentation_reorders_the_same_set(examples: ShopExamples, tiny_artifacts: Path) -> None:
    user = read_split(tiny_artifacts / "shop", "test")[0]
    rng = np.random.default_rng(3)
    orders = set()
    for _ in range(20):
        aug = examples.augmented("selection", user, rng)
        assert sorted(aug["candidates"]) == sorted(user["candidates"])
        assert {aug["candidates"][i] for i in aug["selected"]} == {user["candidates"][i] for i in user["selected"]}
        assert aug["selected"] == sorted(aug["selected"]) and aug["history"] == user["history"]
        orders.add(tuple(aug["candidates"]))
    assert len(orders) > 1


def test_tag_loss_only_touches_selection_batches(examples: ShopExamples, tiny_artifacts: Path,
                                                 tiny_reference: Any) -> None:
    model = tiny_reference.model
    users = read_split(tiny_artifacts / "shop", "test")[:2]
    pixels = catalog_pixels(tiny_artifacts / "catalog", examples.records, model.cfg.vision.image_size)
    with torch.no_grad():
        media = model.encode_images(pixels)
        for task, changes in (("selection", True), ("recommend", False)):
            batch = [examples.example(task, u) for u in users]
            plain = float(batch_loss(model, batch, None, examples.vocab, 2.0, 1.0, media, tag_weight=0.0))
            tagged = float(batch_loss(model, batch, None, examples.vocab, 2.0, 1.0, media, tag_weight=1.0))
            # the tag loss is a mean cross-entropy over n >= 3 tags: about log(n) for the untrained model
            assert (tagged - plain > 0.5) if changes else tagged == plain


def test_train_preset_steps() -> None:
    from export.train import PRESETS, train_preset

    assert train_preset("tiny") == PRESETS["tiny"]
    short = train_preset("small", 20)
    assert short.steps == 20 and short.warmup == 2 and short.lr == PRESETS["small"].lr
    with pytest.raises(ValueError, match="--train-steps"):
        train_preset("tiny", 0)
    with pytest.raises(ValueError, match="unknown demo preset"):
        train_preset("huge")


@pytest.mark.parametrize("extra", [["--untrained"], ["--semantic-ids"], ["--train-steps", "0"]])
def test_export_train_steps_needs_a_trained_demo(extra: list[str], tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from unimp.cli import main

    argv = ["export", "--demo", "tiny", "--out", str(tmp_path / "out"), "--quiet", *extra]
    if "--train-steps" not in extra:
        argv += ["--train-steps", "5"]
    assert main(argv) == 2
    assert capsys.readouterr().err.startswith("error: --train-steps: ")
    assert not (tmp_path / "out").exists()
