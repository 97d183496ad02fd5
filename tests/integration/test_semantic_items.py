"""Semantic-ID artifacts on the real engine: export, prompts, masked constrained beams, exhaustive parity."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from runtime.api import CatalogItem
from runtime.catalog import SemanticTable
from runtime.decoder.runner import PrefillRow
from runtime.decoding.beam import BeamResult
from runtime.decoding.itemslice import log_softmax64
from runtime.engine import Runtime, RuntimeConfig
from runtime.manifest import ManifestError, load_manifest, sha256_file
from runtime.prompts import encode, recommendation_prompt, search_prompt
from runtime.tasks import recommend as recommend_task
from runtime.types import (
    BeamOptions,
    DecodeMode,
    HistoryItem,
    InvalidRequest,
    ItemFilter,
    RecommendRequest,
    SearchRequest,
)

HISTORY = ("P00003", "P00017", "P00042")
CONSTRAINED = (DecodeMode.FAST, DecodeMode.BEAM_CONSTRAINED)
RTOL, ATOL = 2e-5, 1e-4
"""Beam scores sum 6 float32 log-probabilities of about -8 each from KV-cached decode steps; the
exhaustive scores come from separate prefills: a few float32 ulps of the sum apart."""


@pytest.fixture(scope="module")
def rt(tiny_semantic_artifacts: Path) -> Iterator[Runtime]:
    engine = Runtime.open(tiny_semantic_artifacts, RuntimeConfig(progress=False))
    yield engine
    engine.close()


def _history(ids: tuple[str, ...] = HISTORY) -> tuple[HistoryItem, ...]:
    return tuple(HistoryItem(item_id=i) for i in ids)


def _table(root: Path) -> dict[str, list[int]]:
    data: dict[str, list[int]] = json.loads((root / "catalog" / "id2semantic.json").read_text())
    return data


# -- export and load --------------------------------------------------------------------------------------


def test_semantic_artifacts_export_and_load(tiny_semantic_artifacts: Path, rt: Runtime) -> None:
    root = tiny_semantic_artifacts
    manifest = load_manifest(root, verify=True)
    items, t = manifest.items, manifest.tokens
    assert items.kind == "semantic" and items.semantic_table == "catalog/id2semantic.json"
    assert items.semantic_sha256 == sha256_file(root / items.semantic_table) == manifest.files[items.semantic_table]
    assert items.code_counts == [512, 512, 512, 32]
    assert (t.item_count, t.item_last_count, t.item_last_start) == (512, 32, t.item_start + 512)
    assert manifest.decoder.vocab_size >= t.image_codes_start + 1024
    assert rt.tokenizer.id_to_token(t.item_start + 511) == "item_511"
    assert rt.tokenizer.id_to_token(t.item_last_start) == "item_last_0"
    table = _table(root)
    assert len(table) == len(rt.catalog) == rt.catalog.item_count == 200
    for row, (item_id, code) in enumerate(table.items()):
        assert rt.catalog.token_of(item_id) == row
        assert rt.catalog.semantic_codes(row) == tuple(code)
        assert rt.catalog.by_token(row).item_id == item_id  # type: ignore[union-attr]


def test_a_tampered_semantic_table_is_refused(tiny_semantic_artifacts: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(tiny_semantic_artifacts, copy, ignore=shutil.ignore_patterns(".cache", "checkpoint"))
    path = copy / "catalog" / "id2semantic.json"
    table = _table(copy)
    first, second = list(table)[:2]
    table[first] = table[second]
    path.write_text(json.dumps(table))
    with pytest.raises(ManifestError, match=r"id2semantic\.json does not match its sha256"):
        load_manifest(copy, verify=True)
    with pytest.raises(ManifestError, match=f"items '{first}' and '{second}' have the same semantic id"):
        SemanticTable.load(path)


# -- prompts ------------------------------------------------------------------------------------------------


def test_history_chunks_spell_the_four_tokens_byte_for_byte(rt: Runtime, tiny_semantic_artifacts: Path) -> None:
    table = _table(tiny_semantic_artifacts)
    history = rt.resolve(_history())
    prompt = recommendation_prompt(history)
    spelled = []
    for item in history:
        a, b, c, d = table[item.item_id]
        spelled.append(f"item_{a}item_{b}item_{c}item_last_{d}")
    from runtime.prompts import render_meta

    expected = "".join(f"<image> {render_meta(i.meta)} {s} <|endofchunk|> " for i, s in zip(history, spelled))
    assert prompt.text == expected + "What is the next item recommended to the user? <answer>"
    t = rt.manifest.tokens
    ids = encode(prompt, rt.tokenizer, t.endofchunk, t.image).ids.tolist()
    for item in history:
        a, b, c, d = table[item.item_id]
        codes = [t.item_start + a, t.item_start + b, t.item_start + c, t.item_last_start + d]
        k = ids.index(codes[0])
        assert ids[k : k + 4] == codes  # the four code tokens, adjacent, nothing merged or split
    assert sum(t.item_start <= i < t.item_last_start + 32 for i in ids) == 4 * len(history)


# -- decoding: validity and masks --------------------------------------------------------------------------


def _assert_valid(rt: Runtime, items: tuple, excluded: set[str] = frozenset()) -> None:  # type: ignore[assignment,type-arg]
    ids = [i.item_id for i in items]
    assert len(set(ids)) == len(ids)
    for item in items:
        entry = rt.catalog.get(item.item_id)
        assert entry.token >= 0 and entry.available and item.item_id not in excluded
    scores = [i.score for i in items]
    assert scores == sorted(scores, reverse=True)


@pytest.mark.parametrize("mode", CONSTRAINED)
def test_constrained_modes_return_valid_items_with_every_mask(rt: Runtime, mode: DecodeMode) -> None:
    beam = BeamOptions(num_beams=8)
    base = rt.recommend(RecommendRequest(_history(), top_k=8, mode=mode, beam=beam))
    assert len(base.items) == 8 and base.timings.tokens == 6  # prefix, 4 codes, EOS
    _assert_valid(rt, base.items, set(HISTORY))

    kept = rt.recommend(RecommendRequest(_history(), top_k=8, mode=mode, beam=beam,
                                         filter=ItemFilter(exclude_history=False)))
    _assert_valid(rt, kept.items)

    cats = ("Shoes", "Books")
    by_cat = rt.recommend(RecommendRequest(_history(), top_k=8, mode=mode, beam=beam, filter=ItemFilter(categories=cats)))
    assert len(by_cat.items) == 8 and {rt.catalog.get(i.item_id).meta.category for i in by_cat.items} <= set(cats)
    _assert_valid(rt, by_cat.items, set(HISTORY))

    allow = ("P00010", "P00011", "P00017", "P00120")
    allowed = rt.recommend(RecommendRequest(_history(), top_k=8, mode=mode, beam=beam, filter=ItemFilter(allow=allow)))
    assert {i.item_id for i in allowed.items} == set(allow) - set(HISTORY)  # all the admissible ones, no more

    search = rt.search(SearchRequest(_history(), "red running shoe", top_k=5, mode=mode, beam=beam))
    assert len(search.items) == 5
    _assert_valid(rt, search.items, set(HISTORY))


def test_unavailable_items_are_never_returned(rt: Runtime) -> None:
    first = rt.recommend(RecommendRequest(_history(), top_k=3)).items
    top = rt.catalog.get(first[0].item_id)
    rt.catalog.upsert(CatalogItem(top.item_id, top.meta, available=False, token=top.token))
    try:
        for mode in CONSTRAINED:
            again = rt.recommend(RecommendRequest(_history(), top_k=3, mode=mode, beam=BeamOptions(num_beams=3)))
            assert top.item_id not in {i.item_id for i in again.items} and len(again.items) == 3
            _assert_valid(rt, again.items, set(HISTORY))
    finally:
        rt.catalog.upsert(CatalogItem(top.item_id, top.meta, available=True, token=top.token))


def test_an_item_without_a_semantic_id_is_never_returned_and_is_spelled_without_one(rt: Runtime) -> None:
    table_rows = rt.catalog.item_count
    rt.catalog.upsert(CatalogItem("NEW-1", rt.catalog.get("P00001").meta, available=True, token=-1))
    try:
        history = rt.resolve(_history(("NEW-1", "P00003")))
        assert history[0].semantic == () and history[0].token == -1
        assert recommendation_prompt(history).history_tokens == (rt.catalog.token_of("P00003"),)
        out = rt.recommend(RecommendRequest(_history(("NEW-1",)), top_k=16, beam=BeamOptions(num_beams=16)))
        assert "NEW-1" not in {i.item_id for i in out.items} and rt.catalog.item_count == table_rows
    finally:
        rt.catalog.delete("NEW-1")


def test_fast_mode_top_k_is_bounded_by_the_beam_limit(rt: Runtime) -> None:
    limit = rt.config.limits.beam_top_k_limit()
    with pytest.raises(InvalidRequest, match=f"^top_k: is {limit + 1}, above the limit of {limit}") as info:
        rt.recommend(RecommendRequest(_history(), top_k=limit + 1))
    assert info.value.field == "top_k"
    assert len(rt.recommend(RecommendRequest(_history(), top_k=limit)).items) == limit
    with pytest.raises(InvalidRequest, match=r"^beam.num_beams: must be >= top_k \(4\)"):
        rt.recommend(RecommendRequest(_history(), top_k=4, mode=DecodeMode.BEAM_CONSTRAINED,
                                      beam=BeamOptions(num_beams=3)))


def test_paper_beam_mode_maps_exact_admissible_spellings_back(rt: Runtime, monkeypatch: pytest.MonkeyPatch) -> None:
    t = rt.manifest.tokens
    spell = rt.catalog.semantic.spellings(t)  # type: ignore[union-attr]
    ws = list(rt.answer_prefix)
    row_ok, row_hist = 5, rt.catalog.token_of(HISTORY[0])
    seqs = [
        [*ws, *spell[row_hist], t.eos],  # a valid id, but in the history
        [*ws, *spell[row_ok, :3], t.eos],  # a truncated id
        [*ws, *spell[row_ok], t.eos],  # valid and admissible
        [*ws, *spell[row_ok], t.eos],  # the same item again
        [*ws, *spell[7], t.item_start, t.eos],  # a valid id followed by more tokens: not an exact spelling
        [*ws, *spell[9], t.eos],
    ]
    width = max(map(len, seqs))
    tokens = np.array([s + [t.pad] * (width - len(s)) for s in seqs], np.int64)
    fake = BeamResult(tokens, np.linspace(-1, -6, len(seqs)).astype(np.float32),
                      np.array([len(s) for s in seqs], np.int64), steps=width)
    monkeypatch.setattr(recommend_task, "_run_beams", lambda *a, **k: fake)
    out = rt.recommend(RecommendRequest(_history(), top_k=6, mode=DecodeMode.BEAM,
                                        beam=BeamOptions(num_beams=6, num_return_sequences=6)))
    assert [i.item_id for i in out.items] == [rt.catalog.by_token(row_ok).item_id,  # type: ignore[union-attr]
                                              rt.catalog.by_token(9).item_id]  # type: ignore[union-attr]
    np.testing.assert_allclose([i.score for i in out.items], [fake.scores[2], fake.scores[5]], rtol=1e-6)


def test_paper_beam_mode_runs_on_the_real_model(rt: Runtime) -> None:
    out = rt.recommend(RecommendRequest(_history(), top_k=4, mode=DecodeMode.BEAM,
                                        beam=BeamOptions(num_beams=4, num_return_sequences=4, max_new_tokens=8)))
    assert out.timings.tokens >= 1
    _assert_valid(rt, out.items, set(HISTORY))  # the untrained demo rarely spells a whole id: maybe none


# -- decoding: the constrained beam against an exhaustive search ------------------------------------------


def _exhaustive(rt: Runtime, rows: np.ndarray, query: str | None = None) -> dict[int, float]:
    """Full log-probability of every given row's answer (prefix, 4 codes, EOS) by separate prefills of the
    prompt plus each proper prefix of the answer (teacher forcing without a KV cache)."""
    t = rt.manifest.tokens
    history = rt.resolve(_history())
    prompt = search_prompt(history, query) if query else recommendation_prompt(history)
    ids = encode(prompt, rt.tokenizer, t.endofchunk, t.image).ids
    memory, _ = rt.media.memory_for(prompt.images)
    spell = rt.catalog.semantic.spellings(t)  # type: ignore[union-attr]
    cache: dict[tuple[int, ...], np.ndarray] = {}

    def logprobs(prefix: tuple[int, ...]) -> np.ndarray:
        if prefix not in cache:
            logits = rt.decoder.prefill_batch([PrefillRow(np.concatenate([ids, np.array(prefix, np.int64)]), memory)])
            cache[prefix] = log_softmax64(logits[0])
        return cache[prefix]

    scores = {}
    for row in rows.tolist():
        answer = [*rt.answer_prefix, *spell[row].tolist(), t.eos]
        scores[row] = float(sum(logprobs(tuple(answer[:j]))[tok] for j, tok in enumerate(answer)))
    return scores


def _rows_of(rt: Runtime, item_ids: tuple[str, ...]) -> np.ndarray:
    return np.array([rt.catalog.token_of(i) for i in item_ids], np.int64)


def _pool(rt: Runtime, n: int) -> tuple[str, ...]:
    """``n`` items from two categories (ids sharing their first two codes), none in the history."""
    ids = [i for i in (f"P{k:05d}" for k in range(200))
           if rt.catalog.get(i).meta.category in ("Shoes", "Toys") and i not in HISTORY and rt.catalog.get(i).available]
    return tuple(ids[:n])


def _assert_top_k_equal(items: tuple, exhaustive: dict[int, float], rt: Runtime, top_k: int) -> None:  # type: ignore[type-arg]
    best = sorted(exhaustive.items(), key=lambda kv: -kv[1])[:top_k]
    got_rows = [rt.catalog.token_of(i.item_id) for i in items]
    assert len(got_rows) == len(best)
    # equal up to exact ties: the scores agree position by position, and each item's own score agrees
    np.testing.assert_allclose([i.score for i in items], [s for _, s in best], rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose([i.score for i in items], [exhaustive[r] for r in got_rows], rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize(("mode", "n"), [(DecodeMode.FAST, 10), (DecodeMode.BEAM_CONSTRAINED, 14)])
def test_constrained_beam_equals_exhaustive_search_when_beams_cover_the_ids(rt: Runtime, mode: DecodeMode, n: int) -> None:
    pool = _pool(rt, n)
    shared = {tuple(rt.catalog.semantic_codes(r)[:2]) for r in _rows_of(rt, pool)}
    assert len(shared) < n  # some ids share prefixes, so the beams really branch
    exhaustive = _exhaustive(rt, _rows_of(rt, pool))
    out = rt.recommend(RecommendRequest(_history(), top_k=5, mode=mode, beam=BeamOptions(num_beams=n),
                                        filter=ItemFilter(allow=pool)))
    _assert_top_k_equal(out.items, exhaustive, rt, 5)
    everything = rt.recommend(RecommendRequest(_history(), top_k=n, mode=DecodeMode.BEAM_CONSTRAINED,
                                               beam=BeamOptions(num_beams=n), filter=ItemFilter(allow=pool)))
    _assert_top_k_equal(everything.items, exhaustive, rt, n)  # the complete ranking of the admissible ids


def test_constrained_search_equals_exhaustive_search(rt: Runtime) -> None:
    pool = _pool(rt, 10)
    exhaustive = _exhaustive(rt, _rows_of(rt, pool), query="wooden puzzle")
    out = rt.search(SearchRequest(_history(), "wooden puzzle", top_k=4, filter=ItemFilter(allow=pool)))
    _assert_top_k_equal(out.items, exhaustive, rt, 4)


def test_narrow_constrained_beam_returns_admissible_ids_with_their_true_scores(rt: Runtime) -> None:
    pool = _pool(rt, 30)
    exhaustive = _exhaustive(rt, _rows_of(rt, pool))
    for beams in (1, 2, 4):
        out = rt.recommend(RecommendRequest(_history(), top_k=beams, mode=DecodeMode.BEAM_CONSTRAINED,
                                            beam=BeamOptions(num_beams=beams), filter=ItemFilter(allow=pool)))
        rows = [rt.catalog.token_of(i.item_id) for i in out.items]
        assert len(rows) == beams and set(rows) <= set(exhaustive)
        # each returned id's score is its exact log-probability, so none beats the exhaustive optimum
        np.testing.assert_allclose([i.score for i in out.items], [exhaustive[r] for r in rows], rtol=RTOL, atol=ATOL)
        assert out.items[0].score <= max(exhaustive.values()) + ATOL
    greedy = rt.recommend(RecommendRequest(_history(), top_k=1, mode=DecodeMode.BEAM_CONSTRAINED,
                                           beam=BeamOptions(num_beams=1), filter=ItemFilter(allow=pool)))
    assert rt.catalog.token_of(greedy.items[0].item_id) == _greedy_row(rt, pool, exhaustive)


def _greedy_row(rt: Runtime, pool: tuple[str, ...], exhaustive: dict[int, float]) -> int:
    """The id a one-beam search must pick: at each position the best admissible continuation."""
    t = rt.manifest.tokens
    spell = rt.catalog.semantic.spellings(t)  # type: ignore[union-attr]
    rows = list(exhaustive)
    history = rt.resolve(_history())
    prompt = recommendation_prompt(history)
    ids = encode(prompt, rt.tokenizer, t.endofchunk, t.image).ids
    memory, _ = rt.media.memory_for(prompt.images)
    prefix = list(rt.answer_prefix)
    depth = 0
    while len(rows) > 1:
        logits = rt.decoder.prefill_batch([PrefillRow(np.concatenate([ids, np.array(prefix, np.int64)]), memory)])
        nxt = {int(spell[r][depth]) for r in rows}
        best = max(nxt, key=lambda tok: float(logits[0][tok]))
        rows = [r for r in rows if int(spell[r][depth]) == best]
        prefix.append(best)
        depth += 1
    return rows[0]


def test_export_cli_passes_semantic_ids_to_the_demo(tiny_semantic_artifacts: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    import export.pipeline
    from unimp.cli import main

    calls: list[dict[str, object]] = []

    def fake_export_demo(preset: str, out: Path, **kwargs: object) -> object:
        calls.append({"preset": preset, **kwargs})
        return load_manifest(tiny_semantic_artifacts, verify=False)

    monkeypatch.setattr(export.pipeline, "export_demo", fake_export_demo)
    assert main(["export", "--demo", "tiny", "--semantic-ids", "--quiet", "--out", str(tmp_path)]) == 0
    assert main(["export", "--demo", "tiny", "--quiet", "--out", str(tmp_path)]) == 0
    assert [c["semantic_ids"] for c in calls] == [True, False] and calls[0]["preset"] == "tiny"
