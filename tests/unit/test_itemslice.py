"""Item-slice top-k, rating distribution and candidate selection against direct softmax computations."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime.decoding.beam import BeamResult
from runtime.decoding.itemslice import (
    admissible_items,
    hypothesis_items,
    item_topk,
    rating_distribution,
    select_candidates,
)
from runtime.types import InvalidRequest

V, START, COUNT = 400, 120, 200


def reference_logprobs(logits: np.ndarray) -> np.ndarray:
    """Independent float64 log-softmax over the full vocabulary, sliced to the items."""
    x = logits.astype(np.float64)
    probs = np.exp(x - x.max())
    probs /= probs.sum()
    return np.log(probs)[START : START + COUNT]


def test_topk_equals_topk_of_full_softmax_slice() -> None:
    logits = np.random.default_rng(0).normal(0, 3, V).astype(np.float32)
    top = item_topk(logits, START, COUNT, 10)
    ref = reference_logprobs(logits)
    expected = np.argsort(-ref, kind="stable")[:10]
    assert top.indices.tolist() == expected.tolist()
    np.testing.assert_allclose(top.logprobs, ref[expected], atol=1e-9)
    assert np.all(np.diff(top.logprobs) <= 0)
    # the boost of out-of-slice tokens changes the normaliser: full-vocabulary softmax, not slice softmax
    boosted = logits.copy()
    boosted[:START] += 5.0
    assert item_topk(boosted, START, COUNT, 1).logprobs[0] < top.logprobs[0] - 1.0


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    k=st.integers(0, 30),
    n_exclude=st.integers(0, 60),
    n_unavailable=st.integers(0, 60),
    use_allow=st.booleans(),
    use_category=st.booleans(),
)
def test_masked_items_never_appear_and_k_is_capped(
    seed: int, k: int, n_exclude: int, n_unavailable: int, use_allow: bool, use_category: bool
) -> None:
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 2, V).astype(np.float32)
    exclude = rng.choice(COUNT, n_exclude, replace=False)
    unavailable = rng.random(COUNT) < n_unavailable / COUNT  # boolean-mask form
    allow = rng.choice(COUNT, 25, replace=False) if use_allow else None
    category = rng.random(COUNT) < 0.5 if use_category else None
    top = item_topk(
        logits, START, COUNT, k, exclude=exclude, unavailable=unavailable, allow=allow, category_mask=category
    )

    ok = np.ones(COUNT, dtype=bool)
    ok[exclude] = False
    ok &= ~unavailable
    if allow is not None:
        only = np.zeros(COUNT, dtype=bool)
        only[allow] = True
        ok &= only
    if category is not None:
        ok &= category
    assert len(top) == min(k, int(ok.sum()))
    assert all(ok[i] for i in top.indices)
    ref = reference_logprobs(logits)
    admissible = np.flatnonzero(ok)
    expected = admissible[np.argsort(-ref[admissible], kind="stable")][: len(top)]
    assert top.indices.tolist() == expected.tolist()
    np.testing.assert_allclose(top.logprobs, ref[expected], atol=1e-9)


def test_k_capped_and_empty_results() -> None:
    logits = np.zeros(V, dtype=np.float32)
    top = item_topk(logits, START, COUNT, 50, allow=[3, 1, 7])
    assert top.indices.tolist() == [1, 3, 7]  # equal scores: lower index first
    assert top.pairs()[0] == (1, pytest.approx(-np.log(V)))
    assert len(item_topk(logits, START, COUNT, 5, allow=[])) == 0
    assert len(item_topk(logits, START, COUNT, 0)) == 0


def test_invalid_masks_name_the_field() -> None:
    logits = np.zeros(V, dtype=np.float32)
    with pytest.raises(InvalidRequest) as err:
        item_topk(logits, START, COUNT, 5, exclude=[COUNT])
    assert err.value.field == "exclude"
    with pytest.raises(InvalidRequest) as err:
        admissible_items(COUNT, category_mask=np.ones(COUNT - 1, dtype=bool))
    assert err.value.field == "category_mask"
    with pytest.raises(ValueError):
        item_topk(logits, V - 10, COUNT, 5)


def test_rating_distribution() -> None:
    logits = np.random.default_rng(1).normal(0, 2, V).astype(np.float32)
    rate_ids = [10, 11, 12, 13, 14]
    dist = rating_distribution(logits, rate_ids)
    sub = logits[rate_ids].astype(np.float64)
    direct = np.exp(sub) / np.exp(sub).sum()
    np.testing.assert_allclose(dist.probs, direct, rtol=1e-12)
    assert dist.probs.sum() == pytest.approx(1.0, abs=1e-12)
    assert dist.expected == pytest.approx(float(np.dot([1, 2, 3, 4, 5], direct)))
    assert dist.rating == int(np.argmax(direct)) + 1


def test_rating_distribution_is_stable_for_large_logits() -> None:
    logits = np.zeros(V, dtype=np.float32)
    logits[[20, 21, 22, 23, 24]] = [1000.0, 1001.0, 999.0, 1000.0, 1000.0]
    dist = rating_distribution(logits, [20, 21, 22, 23, 24])
    assert np.isfinite(dist.probs).all() and dist.rating == 2


def test_select_candidates() -> None:
    logits = np.zeros(V, dtype=np.float32)
    sel_ids = [30, 31, 32, 33, 34]
    logits[sel_ids] = [0.5, 2.0, -1.0, 1.0, 9.0]  # s_4 is not a candidate when only 4 are offered
    sel = select_candidates(logits, sel_ids, num_candidates=4, max_selected=2)
    assert sel.selected == (1, 3)
    direct = np.exp([0.5, 2.0, -1.0, 1.0]) / np.exp([0.5, 2.0, -1.0, 1.0]).sum()
    np.testing.assert_allclose(sel.scores, direct, rtol=1e-12)
    with pytest.raises(InvalidRequest):
        select_candidates(logits, sel_ids, num_candidates=6, max_selected=2)


def test_hypothesis_items_take_each_hypothesis_first_admissible_item() -> None:
    eos, pad = 0, 0
    rows = [
        [5, START + 7, eos],  # item 7 (after a whitespace-like token)
        [START + 3, START + 9, eos],  # item 3: the first item token is the answer, item 9 is ignored
        [START + 7, eos, pad],  # item 7 again: already returned by a better hypothesis
        [6, 8, eos],  # no item token: nothing
        [START + 11, eos, pad],  # item 11: not admissible
        [START + COUNT, START + 2, eos],  # an id just past the slice is not an item; then item 2
    ]
    lengths = np.array([3, 3, 2, 3, 2, 3])
    scores = np.array([-1.0, -1.5, -2.0, -2.5, -3.0, -3.5], np.float32)
    hyp = BeamResult(tokens=np.array(rows, np.int64), scores=scores, lengths=lengths, steps=3)
    ok = np.ones(COUNT, bool)
    ok[11] = False
    got = hypothesis_items(hyp, START, ok)
    assert [i for i, _ in got] == [7, 3, 2]
    np.testing.assert_allclose([s for _, s in got], scores[[0, 1, 5]], rtol=0)
    assert hypothesis_items(hyp, START, np.zeros(COUNT, bool)) == []
