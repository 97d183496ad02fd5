"""The Runtime's tasks on the tiny demo artifacts, checked against the PyTorch reference and against itself."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from runtime.backends import BackendConfig
from runtime.decoder.generator import Generator
from runtime.decoding.beam import BeamSearchConfig, beam_search
from runtime.engine import Runtime, RuntimeConfig
from runtime.prompts import encode
from runtime.types import (
    Cancelled,
    CancelToken,
    DecodeMode,
    HistoryItem,
    ItemFilter,
    Overloaded,
    PreferenceRequest,
    PreferenceResult,
    RecommendRequest,
    SamplingOptions,
    SearchRequest,
    SelectRequest,
    TextPiece,
)

HISTORY = tuple(HistoryItem(item_id=f"P{k:05d}") for k in (3, 17, 42, 8))
RATED = tuple(HistoryItem(item_id=f"P{k:05d}", rating=r, explanation=e)
              for k, r, e in ((5, 4, "Great fit."), (9, 2, "Too small."), (12, 5, "Love the colour.")))


@pytest.fixture(scope="module")
def rt(tiny_artifacts: Path, tmp_path_factory: pytest.TempPathFactory) -> Runtime:
    cfg = RuntimeConfig(backend=BackendConfig(intra_op_threads=1), progress=False,
                        latent_cache_dir=tmp_path_factory.mktemp("latents"))
    runtime = Runtime.open(tiny_artifacts, cfg)
    yield runtime
    runtime.close()


def _reference_last_logits(rt: Runtime, ref, prompt) -> np.ndarray:  # type: ignore[no-untyped-def]
    """Full recompute in PyTorch of the prompt the runtime builds (latents from the reference vision tower)."""
    enc = encode(prompt, rt.tokenizer, rt.manifest.tokens.endofchunk, rt.manifest.tokens.image)
    from runtime.vision import preprocess

    v = rt.manifest.vision
    pixels = preprocess([rt.catalog.image(it.item_id) for it in prompt.images], v.image_size, v.mean, v.std)
    with torch.no_grad():
        lat = ref.model.encode_images(torch.from_numpy(pixels))
        ids = torch.from_numpy(enc.ids)[None]
        return ref.model.full_logits(ids, torch.ones_like(ids), [lat], rt.manifest.tokens.image)[0, -1].numpy()


def test_fast_path_equals_item_slice_of_full_softmax(rt: Runtime, tiny_reference) -> None:  # type: ignore[no-untyped-def]
    from runtime.prompts import recommendation_prompt

    res = rt.recommend(RecommendRequest(HISTORY, top_k=10, filter=ItemFilter(exclude_history=False)))
    prompt = recommendation_prompt(rt.resolve(HISTORY))
    logits = _reference_last_logits(rt, tiny_reference, prompt).astype(np.float64)
    logp = logits - np.log(np.exp(logits - logits.max()).sum()) - logits.max()
    t = rt.manifest.tokens
    items = logp[t.item_start: t.item_start + t.item_count]
    available = rt.catalog.available_mask()
    items = np.where(available, items, -np.inf)
    expected = np.argsort(-items, kind="stable")[:10]
    got = [rt.catalog.token_of(i.item_id) for i in res.items]
    assert got == expected.tolist()
    np.testing.assert_allclose([i.score for i in res.items], items[expected], atol=1e-4)


def test_masked_items_never_appear(rt: Runtime) -> None:
    history_tokens = {rt.catalog.token_of(h.item_id) for h in HISTORY}
    res = rt.recommend(RecommendRequest(HISTORY, top_k=rt.config.limits.max_top_k))
    got = {rt.catalog.token_of(i.item_id) for i in res.items}
    assert not got & history_tokens
    unavailable = set(np.flatnonzero(~rt.catalog.available_mask()).tolist())
    assert unavailable and not got & unavailable
    allow = ("P00001", "P00002", "P00003", "P00050")
    res = rt.recommend(RecommendRequest(HISTORY, top_k=10, filter=ItemFilter(allow=allow)))
    assert {i.item_id for i in res.items} <= set(allow) - {"P00003"}
    res = rt.recommend(RecommendRequest(HISTORY, top_k=50, filter=ItemFilter(categories=("Shoes",))))
    assert res.items and all(i.meta is not None and i.meta.category == "Shoes" for i in res.items)


def test_beam_mode_returns_the_items_its_hypotheses_spell(rt: Runtime) -> None:
    """Paper-parity beam: each hypothesis's first item token, if admissible and new; possibly none."""
    from runtime.decoding.itemslice import admissible_items
    from runtime.prompts import recommendation_prompt
    from runtime.types import BeamOptions

    beam = BeamOptions(num_beams=4, num_return_sequences=4, max_new_tokens=6)
    res = rt.recommend(RecommendRequest(HISTORY, top_k=10, mode=DecodeMode.BEAM, beam=beam))
    prompt = recommendation_prompt(rt.resolve(HISTORY), rt.config.max_history)
    t = rt.manifest.tokens
    cfg = BeamSearchConfig(num_beams=4, num_return_sequences=4, max_new_tokens=6, eos_token_id=t.eos,
                           pad_token_id=t.pad)
    with rt.admit(None, rows=4) as gen:
        pre = rt.prefill(prompt, "", None, generator=gen)
        hyp = beam_search(pre.logits, gen.advance_beams, cfg, logits_processor=rt.ban_special)
    assert len(hyp.sequences()) == 4 and res.timings.tokens == hyp.steps >= 1
    ok = admissible_items(t.item_count, exclude=list(prompt.history_tokens), unavailable=~rt.catalog.available_mask())
    expected: list[tuple[str, float]] = []
    for seq, score in zip(hyp.sequences(), hyp.scores):
        first = [int(x) - t.item_start for x in seq if 0 <= int(x) - t.item_start < t.item_count][:1]
        if first and ok[first[0]] and all(rt.catalog.token_of(e[0]) != first[0] for e in expected):
            entry = rt.catalog.by_token(first[0])
            assert entry is not None
            expected.append((entry.item_id, float(score)))
    assert [i.item_id for i in res.items] == [e[0] for e in expected]  # on the random tiny model: often none
    np.testing.assert_allclose([i.score for i in res.items], [e[1] for e in expected], rtol=1e-5, atol=1e-6)


def _answer_logprobs(rt: Runtime, prompt, candidates: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:  # type: ignore[no-untyped-def]
    """Full prefills (no decode step) of the prompt, the prompt + " ", and prompt + " " + item_k for each
    candidate k: log p(" " | prompt), log p(item_k | prompt " ") over all items, log p(EOS | prompt " " item_k)."""
    from runtime.decoder.runner import PrefillRow
    from runtime.decoding.itemslice import log_softmax64

    t = rt.manifest.tokens
    enc = encode(prompt, rt.tokenizer, t.endofchunk, t.image)
    memory, _ = rt.media.memory_for(prompt.images)
    ws = rt.tokenizer.encode(" item_0", add_special_tokens=False).ids[:-1]
    assert [rt.tokenizer.id_to_token(i) for i in ws] == ["\u0120"]  # the demo's BPE: a whitespace token first
    logits0 = rt.decoder.prefill_batch([PrefillRow(enc.ids, memory)])
    logits1 = rt.decoder.prefill_batch([PrefillRow(np.concatenate([enc.ids, ws]), memory)])
    lp_ws = float(log_softmax64(logits0[0])[ws[0]])
    lp_items = log_softmax64(logits1[0])[t.item_start: t.item_start + t.item_count]
    lp_eos = np.zeros(0)
    if len(candidates):
        rows = [PrefillRow(np.concatenate([enc.ids, ws, [t.item_start + int(k)]]), memory) for k in candidates]
        lp_eos = log_softmax64(rt.decoder.prefill_batch(rows))[:, t.eos]
    return lp_ws, lp_items, lp_eos


@pytest.mark.parametrize("item_filter", [ItemFilter(), ItemFilter(categories=("Shoes",))], ids=["default", "shoes"])
def test_constrained_beam_equals_beam_search_over_the_item_trie(rt: Runtime, item_filter: ItemFilter) -> None:
    """With `` item_k`` spelled as [whitespace, item_k] then EOS, the beams after the item step are the
    item-slice top-num_beams (at the position after the whitespace), and each final score is
    log p(ws) + log p(item_k) + log p(EOS | item_k): the item-slice ranking plus the EOS term."""
    from runtime.decoding.itemslice import admissible_items
    from runtime.prompts import recommendation_prompt
    from runtime.types import BeamOptions

    top_k, nb = 5, 8
    res = rt.recommend(RecommendRequest(HISTORY, top_k=top_k, mode=DecodeMode.BEAM_CONSTRAINED, filter=item_filter,
                                        beam=BeamOptions(num_beams=nb)))
    assert res.timings.tokens == 3  # whitespace, item, EOS
    prompt = recommendation_prompt(rt.resolve(HISTORY), rt.config.max_history)
    t = rt.manifest.tokens
    category = rt.catalog.category_mask(list(item_filter.categories)) if item_filter.categories else None
    ok = admissible_items(t.item_count, exclude=list(prompt.history_tokens), unavailable=~rt.catalog.available_mask(),
                          category_mask=category)
    assert ok.sum() > nb
    lp_ws, lp_items, _ = _answer_logprobs(rt, prompt, np.zeros(0, np.int64))
    slice_scores = np.where(ok, lp_items, -np.inf)
    order = np.argsort(-slice_scores, kind="stable")
    survivors = order[:nb]  # the beams after the item step
    assert slice_scores[order[nb - 1]] - slice_scores[order[nb]] > 1e-4  # the cut is not a near-tie
    _, _, lp_eos = _answer_logprobs(rt, prompt, survivors)
    total = lp_ws + slice_scores[survivors] + lp_eos
    final = np.argsort(-total, kind="stable")[:top_k]
    assert np.all(-np.diff(total[np.argsort(-total)])[:top_k] > 1e-4)  # the ranking is not a near-tie

    got = [rt.catalog.token_of(i.item_id) for i in res.items]
    assert got == survivors[final].tolist()
    scores = np.array([i.score for i in res.items])
    np.testing.assert_allclose(scores, total[final], rtol=1e-5, atol=1e-5)
    # the item-slice ranking, up to the EOS term
    np.testing.assert_allclose(scores - lp_eos[final] - lp_ws, slice_scores[survivors[final]], rtol=1e-5, atol=1e-5)
    assert all(ok[k] for k in got) and len(set(got)) == top_k


def test_constrained_beam_returns_top_k_admissible_items_under_every_mask(rt: Runtime) -> None:
    from runtime.types import BeamOptions

    def run(top_k: int, item_filter: ItemFilter, history: tuple[HistoryItem, ...] = HISTORY) -> list[str]:
        res = rt.recommend(RecommendRequest(history, top_k=top_k, mode=DecodeMode.BEAM_CONSTRAINED,
                                            filter=item_filter, beam=BeamOptions(num_beams=16)))
        ids = [i.item_id for i in res.items]
        assert len(set(ids)) == len(ids)
        return ids

    history_ids = {h.item_id for h in HISTORY}
    unavailable = {rt.catalog.by_token(int(k)) for k in np.flatnonzero(~rt.catalog.available_mask())}
    unavailable_ids = {e.item_id for e in unavailable if e is not None}
    got = run(16, ItemFilter())
    assert len(got) == 16 and not set(got) & history_ids and not set(got) & unavailable_ids
    included = run(16, ItemFilter(exclude_history=False), history=HISTORY[:1] * 4)
    assert len(included) == 16
    allow = ("P00001", "P00002", "P00003", "P00050")
    assert set(run(10, ItemFilter(allow=allow))) == set(allow) - {"P00003"} - unavailable_ids  # fewer admissible
    assert len(run(2, ItemFilter(allow=allow))) == 2
    shoes = run(12, ItemFilter(categories=("Shoes",)))
    assert len(shoes) == 12 and all(rt.catalog.get(i).meta.category == "Shoes" for i in shoes)
    assert run(5, ItemFilter(allow=("P00003",))) == []  # nothing admissible: no item, no decoding
    search = rt.search(SearchRequest(HISTORY, query="red running shoe", top_k=7, mode=DecodeMode.BEAM_CONSTRAINED,
                                     beam=BeamOptions(num_beams=7)))
    assert len(search.items) == 7


def test_constrained_beam_needs_a_beam_per_item(rt: Runtime) -> None:
    from runtime.types import BeamOptions, InvalidRequest

    with pytest.raises(InvalidRequest) as bad:
        rt.recommend(RecommendRequest(HISTORY, top_k=6, mode=DecodeMode.BEAM_CONSTRAINED, beam=BeamOptions(num_beams=4)))
    assert bad.value.field == "beam.num_beams" and str(bad.value).startswith("beam.num_beams: ")


def test_prefix_cache_hit_equals_miss(rt: Runtime) -> None:
    rt.prefix_cache.clear()
    req = SearchRequest(HISTORY, query="red running shoe", top_k=10, tenant="store-1")
    miss = rt.search(req)
    hits_before = rt.prefix_cache.hits
    hit = rt.search(req)
    assert rt.prefix_cache.hits == hits_before + 1 and hit.timings.prefix_cache_hit and not miss.timings.prefix_cache_hit
    assert [i.item_id for i in hit.items] == [i.item_id for i in miss.items]
    np.testing.assert_allclose([i.score for i in hit.items], [i.score for i in miss.items], atol=1e-4)
    # the same history under another task reuses the prefix too; another tenant never does
    rec = rt.recommend(RecommendRequest(HISTORY, top_k=5, tenant="store-1"))
    assert rec.timings.prefix_cache_hit
    other = rt.recommend(RecommendRequest(HISTORY, top_k=5, tenant="store-2"))
    assert not other.timings.prefix_cache_hit


def test_rating_distribution_matches_reference(rt: Runtime, tiny_reference) -> None:  # type: ignore[no-untyped-def]
    from runtime.prompts import preference_prompt

    target = HistoryItem(item_id="P00033")
    res = rt.predict_preference(PreferenceRequest(RATED, target, SamplingOptions(max_new_tokens=4)))
    assert abs(sum(res.rating_distribution) - 1.0) < 1e-9
    prompt = preference_prompt(rt.resolve(RATED), rt.resolve((target,))[0])
    logits = _reference_last_logits(rt, tiny_reference, prompt)
    rates = logits[rt.manifest.tokens.rates].astype(np.float64)
    expected = np.exp(rates - rates.max()) / np.exp(rates - rates.max()).sum()
    np.testing.assert_allclose(res.rating_distribution, expected, atol=1e-5)
    assert res.rating == int(np.argmax(expected)) + 1
    assert abs(res.expected_rating - float(np.dot(np.arange(1, 6), expected))) < 1e-6


def _explained(rt: Runtime, req: PreferenceRequest) -> tuple[str, PreferenceResult]:
    """Drain an Explain stream: the joined text pieces and the final result."""
    events = list(rt.explain(req))
    final = events[-1]
    assert isinstance(final, PreferenceResult) and all(isinstance(e, TextPiece) for e in events[:-1])
    return "".join(e.text for e in events[:-1] if isinstance(e, TextPiece)), final


@pytest.mark.parametrize("opts", [
    SamplingOptions(max_new_tokens=10),
    SamplingOptions(temperature=1.5, seed=2, max_new_tokens=10),  # starts with a space on the tiny demo
    SamplingOptions(temperature=1.0, top_p=0.9, seed=5, max_new_tokens=16),
    SamplingOptions(num_beams=3, max_new_tokens=8),
], ids=["greedy", "sampled-space", "sampled", "beam"])
def test_streamed_pieces_join_to_the_explanation(rt: Runtime, opts: SamplingOptions) -> None:
    for target in ("P00021", "P00033", "P00050"):
        for history in (RATED, RATED[:1]):
            pieces, final = _explained(rt, PreferenceRequest(history, HistoryItem(item_id=target), opts))
            assert pieces == final.explanation
            assert final.explanation == final.explanation.strip() and final.timings.tokens >= 1


def test_predict_preference_is_rating_only(rt: Runtime) -> None:
    """The distribution from the prefill alone: Explain's distribution, no decode step, no text."""
    for target, history in (("P00021", RATED), ("P00044", RATED[1:])):
        req = PreferenceRequest(history, HistoryItem(item_id=target), SamplingOptions(max_new_tokens=12))
        _, explained = _explained(rt, req)
        before = rt.stats()
        res = rt.predict_preference(req)
        after = rt.stats()
        assert after["decode_steps"] == before["decode_steps"] and after["decode_rows"] == before["decode_rows"]
        assert after["kv_bytes"] == 0 and after["active_sequences"] == 0
        np.testing.assert_allclose(res.rating_distribution, explained.rating_distribution, rtol=1e-5, atol=1e-7)
        assert res.rating == explained.rating
        assert abs(res.expected_rating - explained.expected_rating) <= 1e-5 * explained.expected_rating
        assert res.explanation == "" and res.finish_reason == "" and res.timings.tokens == 0
        assert res.timings.decode == 0.0


def test_sampling_is_seeded(rt: Runtime) -> None:
    def run(seed: int, temperature: float = 1.0) -> str:
        opts = SamplingOptions(temperature=temperature, top_p=0.9, seed=seed, max_new_tokens=12)
        return _explained(rt, PreferenceRequest(RATED, HistoryItem(item_id="P00021"), opts))[1].explanation

    assert run(7) == run(7)  # same seed, same tokens
    sampled = [run(seed) for seed in range(5)]
    assert len(set(sampled)) >= 3  # different seeds, different samples (greedy decoding would give one)
    greedy = _explained(rt, PreferenceRequest(RATED, HistoryItem(item_id="P00021"),
                                              SamplingOptions(max_new_tokens=12)))[1].explanation
    assert run(1, temperature=0.0) == run(2, temperature=0.0) == greedy  # temperature 0 is argmax decoding
    assert any(text != greedy for text in sampled)


def test_selection_scores(rt: Runtime) -> None:
    cands = tuple(HistoryItem(item_id=f"P{k:05d}") for k in (60, 61, 62))
    res = rt.select_items(SelectRequest(HISTORY, cands, max_selected=2))
    assert len(res.selected) == 2 and len(res.scores) == 3
    assert abs(sum(res.scores) - 1) < 1e-9
    assert res.selected[0] == int(np.argmax(res.scores))


def test_batched_decoding_equals_unbatched(rt: Runtime, monkeypatch: pytest.MonkeyPatch) -> None:
    """Concurrent explanations (joining late, leaving early) are token-identical to one-at-a-time runs."""
    reqs = [PreferenceRequest(RATED[: 1 + k % 3], HistoryItem(item_id=f"P{20 + k:05d}"),
                              SamplingOptions(max_new_tokens=6 + 5 * k)) for k in range(4)]
    alone = [_explained(rt, r)[1].explanation for r in reqs]
    results: list[str | None] = [None] * len(reqs)
    batch_rows: list[int] = []
    step = rt.decoder.step
    others_waiting = threading.Event()

    def held_step(seqs, tokens):  # type: ignore[no-untyped-def]
        # Hold the first decode call until every other request has submitted its first step: they join
        # the running batch at the next call, whatever the machine's speed.
        rows = sum(s.rows for s in seqs)
        if not batch_rows:
            deadline = time.monotonic() + 60
            while rt.batcher.pending_steps < len(reqs) - rows and time.monotonic() < deadline:
                time.sleep(0.001)
            if rows + rt.batcher.pending_steps >= len(reqs):
                others_waiting.set()
        batch_rows.append(rows)
        return step(seqs, tokens)

    monkeypatch.setattr(rt.decoder, "step", held_step)
    # prefills run on the batcher's thread too: each request waits at its first step until all four have
    # prefilled, so the held first call above can wait for their steps
    all_prefilled = threading.Barrier(len(reqs))
    first_step = Generator.step
    started: set[int] = set()

    def gated_step(self, tokens, parents=None):  # type: ignore[no-untyped-def]
        if id(self) not in started:
            started.add(id(self))
            all_prefilled.wait(timeout=60)
        return first_step(self, tokens, parents)

    monkeypatch.setattr(Generator, "step", gated_step)

    def worker(i: int) -> None:
        results[i] = _explained(rt, reqs[i])[1].explanation

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(reqs))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert others_waiting.is_set(), batch_rows[:5]  # all four were decoding at once
    assert results == alone
    assert len(batch_rows) < sum(batch_rows)  # some steps carried several rows


def test_cancellation_frees_kv(rt: Runtime) -> None:
    token = CancelToken()
    req = PreferenceRequest(RATED, HistoryItem(item_id="P00030"), SamplingOptions(max_new_tokens=400), cancel=token)
    stream = rt.explain(req)
    seen_kv = []
    with pytest.raises(Cancelled):
        for n, _event in enumerate(stream):
            seen_kv.append(rt.stats()["kv_bytes"])
            if n == 3:
                token.cancel()
    assert max(seen_kv) > 0
    assert rt.stats()["kv_bytes"] == 0 and rt.stats()["active_sequences"] == 0


def test_overload_is_bounded(tiny_artifacts: Path, tmp_path: Path) -> None:
    cfg = RuntimeConfig(backend=BackendConfig(intra_op_threads=1), progress=False, max_active=1, max_queued=1,
                        latent_cache_dir=tmp_path)
    rt = Runtime.open(tiny_artifacts, cfg)
    try:
        with rt.batcher.admit():
            errors: list[BaseException] = []
            cancel = CancelToken()

            def wait_for_slot() -> None:
                try:
                    with rt.batcher.admit(cancel):
                        pass
                except Cancelled:
                    pass
                except BaseException as exc:
                    errors.append(exc)

            waiter = threading.Thread(target=wait_for_slot, daemon=True)
            waiter.start()
            deadline = time.monotonic() + 30
            while rt.batcher.queue_depth < 1 and time.monotonic() < deadline:
                time.sleep(0.005)  # until the waiter is queued, however slow the machine
            assert rt.batcher.queue_depth == 1
            with pytest.raises(Overloaded):
                list(rt.explain(PreferenceRequest(RATED, HistoryItem(item_id="P00030"))))
            rt.predict_preference(PreferenceRequest(RATED, HistoryItem(item_id="P00030")))  # no decode slot needed
            cancel.cancel()
            waiter.join(timeout=5)
            assert not errors and rt.batcher.queue_depth == 0
    finally:
        rt.close()


def test_serving_never_imports_torch(tiny_artifacts: Path, tmp_path: Path) -> None:
    code = f"""
import sys
from runtime.engine import Runtime, RuntimeConfig
from runtime.types import HistoryItem, RecommendRequest
rt = Runtime.open({str(tiny_artifacts)!r}, RuntimeConfig(progress=False, latent_cache_dir={str(tmp_path)!r}))
res = rt.recommend(RecommendRequest((HistoryItem(item_id="P00001"),), top_k=3))
assert len(res.items) == 3
bad = [m for m in ("torch", "transformers", "diffusers") if m in sys.modules]
print("LOADED", bad)
sys.exit(1 if bad else 0)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "LOADED []" in out.stdout


def test_bad_requests_name_the_field(rt: Runtime) -> None:
    from runtime.types import InvalidRequest, NotFound

    with pytest.raises(NotFound) as nf:
        rt.recommend(RecommendRequest((HistoryItem(item_id="P00001"), HistoryItem(item_id="nope"))))
    assert nf.value.field == "history[1].item_id"
    with pytest.raises(InvalidRequest) as bad:
        rt.recommend(RecommendRequest(HISTORY, top_k=0))
    assert bad.value.field == "top_k"
    with pytest.raises(InvalidRequest) as bad:
        rt.recommend(RecommendRequest(()))
    assert bad.value.field == "history"
    with pytest.raises(InvalidRequest) as bad:
        rt.search(SearchRequest(HISTORY, query="  "))
    assert bad.value.field == "query"
    with pytest.raises(NotFound) as nf:
        rt.recommend(RecommendRequest(HISTORY, filter=ItemFilter(allow=("P00001", "missing"))))
    assert nf.value.field == "filter.allow_item_ids[1]" and "'missing'" in str(nf.value)
    limits = rt.config.limits
    with pytest.raises(InvalidRequest) as bad:
        rt.recommend(RecommendRequest(HISTORY, top_k=limits.max_top_k + 1))
    assert bad.value.field == "top_k" and str(limits.max_top_k) in str(bad.value)
    with pytest.raises(InvalidRequest) as bad:
        rt.recommend(RecommendRequest(HISTORY, top_k=limits.max_beams + 1, mode=DecodeMode.BEAM))
    assert bad.value.field == "top_k" and str(limits.max_beams) in str(bad.value)
    with pytest.raises(InvalidRequest) as bad:
        rt.explain(PreferenceRequest(RATED, HistoryItem(item_id="P00021"),
                                     sampling=SamplingOptions(num_beams=limits.max_beams + 1))).__next__()
    assert bad.value.field == "sampling.num_beams"


def test_inline_image_is_encoded_at_request_time(rt: Runtime) -> None:
    """Cached vs uncached: an inline copy of a catalog image is encoded now and its cross-attention K/V
    equal the catalog store's."""
    from runtime.prompts import ResolvedItem

    entry = rt.catalog.get(HISTORY[-1].item_id)
    cached = ResolvedItem(entry.meta, entry.item_id, entry.token)
    inline = ResolvedItem(entry.meta, image=rt.catalog.image(entry.item_id))
    rt.media.memory_for((cached,))  # stored now if the background encoder has not reached it yet
    # the background fill of the catalog also counts vision calls: let it finish and hold it while counting
    assert rt.catalog_encoder.wait_idle(timeout=300)
    rt.catalog_encoder.pause()
    try:
        encoded_before = rt.vision.images_encoded
        memory, _ = rt.media.memory_for((cached, inline))
        assert rt.vision.images_encoded == encoded_before + 1
    finally:
        rt.catalog_encoder.resume()
    for k, v in memory:
        for x in (k, v):
            np.testing.assert_allclose(x[1], x[0], rtol=1e-5, atol=1e-5 * float(np.abs(x[0]).max()))
    got = rt.recommend(RecommendRequest((*HISTORY[:-1], HistoryItem(meta=entry.meta, image=inline.image)), top_k=5))
    assert len(got.items) == 5


def _fitting_query(rt: Runtime, history: tuple[HistoryItem, ...], chars: int) -> tuple[str, int]:
    """A ``chars``-long query whose prompt is too long with every history item but fits with some;
    returns it with the most history items that fit."""
    from runtime.prompts import search_prompt

    t = rt.manifest.tokens
    resolved = rt.resolve(history)
    limit = rt.manifest.decoder.max_positions - 1

    def tokens(query: str, n: int) -> int:
        return len(encode(search_prompt(resolved, query, n), rt.tokenizer, t.endofchunk, t.image).ids)

    for words in range(chars // 6, 0, -1):  # "Shoes " is one token; "blue mug " is many
        query = ("Shoes " * words + "blue mug " * chars)[:chars]
        if tokens(query, len(history)) > limit and tokens(query, 1) <= limit:
            return query, max(n for n in range(1, len(history) + 1) if tokens(query, n) <= limit)
    raise AssertionError("no query of that length fits only part of the history")


def test_long_prompts_drop_the_oldest_history(rt: Runtime) -> None:
    query, fits = _fitting_query(rt, HISTORY, 2048)
    assert len(query) == 2048 and 1 <= fits < len(HISTORY)
    full = rt.search(SearchRequest(HISTORY, query=query, top_k=5))
    newest = rt.search(SearchRequest(HISTORY[-fits:], query=query, top_k=5))
    assert [i.item_id for i in full.items] == [i.item_id for i in newest.items]
    np.testing.assert_allclose([i.score for i in full.items], [i.score for i in newest.items], rtol=1e-6, atol=1e-5)


def test_a_query_too_long_for_one_history_item_names_the_query(rt: Runtime) -> None:
    from runtime.types import InvalidRequest

    query = "blue mug " * 200  # about one token per character: longer than the model's positions
    with pytest.raises(InvalidRequest) as bad:
        rt.search(SearchRequest(HISTORY, query=query, top_k=5))
    limit = rt.manifest.decoder.max_positions - 1
    assert bad.value.field == "query"
    assert str(bad.value).startswith("query: the prompt is ") and f"at most {limit} prompt tokens" in str(bad.value)
