"""unimp eval's metrics against hand-computed values on small fixtures."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from runtime.eval import metrics as m
from runtime.eval.data import EvalUser, HistoryEntry
from runtime.eval.runner import Baselines, _rank_baselines, selected_set, train_baselines


def close(actual: float, expected: float) -> None:
    np.testing.assert_allclose(actual, expected, rtol=1e-9, atol=1e-12)


# -- ranking ---------------------------------------------------------------------------------------------


def test_rank_one_is_a_hit_everywhere() -> None:
    out = m.rank_metrics(0, 0)
    for k in m.KS:
        close(out[f"hr@{k}"], 1.0)
        close(out[f"ndcg@{k}"], 1.0)
        close(out[f"mrr@{k}"], 1.0)


def test_rank_four_misses_the_top_three() -> None:
    out = m.rank_metrics(3, 0)
    assert out["hr@3"] == out["ndcg@3"] == out["mrr@3"] == 0.0
    close(out["hr@5"], 1.0)
    close(out["ndcg@5"], 1 / math.log2(5))  # 0.4307
    close(out["mrr@5"], 0.25)
    close(out["ndcg@10"], 1 / math.log2(5))


def test_ties_average_over_the_tied_ranks() -> None:
    out = m.rank_metrics(1, 2)  # rank uniform in {2, 3, 4}
    close(out["hr@3"], 2 / 3)
    close(out["ndcg@3"], (1 / math.log2(3) + 1 / math.log2(4)) / 3)
    close(out["mrr@3"], (1 / 2 + 1 / 3) / 3)
    close(out["hr@5"], 1.0)
    close(out["mrr@5"], (1 / 2 + 1 / 3 + 1 / 4) / 3)


def test_ranked_list_with_ties_and_misses() -> None:
    ranked = [("a", 0.9), ("b", 0.5), ("c", 0.5), ("d", 0.1)]
    out = m.ranked_list_metrics(ranked, "c")  # rank 2 or 3
    close(out["hr@3"], 1.0)
    close(out["mrr@3"], (1 / 2 + 1 / 3) / 2)
    close(out["ndcg@3"], (1 / math.log2(3) + 0.5) / 2)
    close(m.ranked_list_metrics(ranked, "d")["mrr@10"], 0.25)
    assert m.ranked_list_metrics(ranked, "zz") == m.miss_metrics()
    assert set(m.miss_metrics().values()) == {0.0}


def test_constant_scores_give_the_random_expectation() -> None:
    scores = {f"i{k}": 0.0 for k in range(20)}
    out = m.score_metrics(scores, "i7")
    close(out["hr@10"], 10 / 20)
    close(out["hr@3"], 3 / 20)
    close(out["mrr@10"], sum(1 / r for r in range(1, 11)) / 20)
    close(out["ndcg@5"], sum(1 / math.log2(r + 1) for r in range(1, 6)) / 20)


def _user(uid: str, history: list[str], next_item: str, **kw: object) -> EvalUser:
    fields: dict[str, object] = dict(query="q", search_item=next_item, rating_item=next_item, rating=3,
                                     explanation="", candidates=(), selected=())
    fields.update(kw)
    return EvalUser(uid, tuple(HistoryEntry(i, 4) for i in history), next_item, **fields)  # type: ignore[arg-type]


def test_popularity_counts_train_histories_and_next_items() -> None:
    train = [_user("u1", ["a", "b"], "a"), _user("u2", ["a", "c"], "d"), _user("u3", [], "a")]
    base = train_baselines(train, ["a", "b", "c", "d", "e"])
    assert base.popularity == {"a": 4, "b": 1, "c": 1, "d": 1}
    close(base.rating_mean, 3.0)


def test_popularity_baseline_excludes_the_history_and_averages_ties() -> None:
    base = Baselines(("a", "b", "c", "d", "e"), m.popularity_counts([["a", "a", "a", "b", "c"]]))
    # "a" is the most popular but in the history; "b" and "c" tie at 1, above "d" and "e" at 0
    user = _user("u", ["a"], "b")
    out = _rank_baselines([user], "recommend", base)
    close(out["popularity"]["hr@3"], 1.0)
    close(out["popularity"]["mrr@3"], (1 + 1 / 2) / 2)
    close(out["popularity"]["ndcg@3"], (1 + 1 / math.log2(3)) / 2)
    # random over the 4 admissible items
    close(out["random"]["hr@3"], 3 / 4)
    close(out["random"]["mrr@3"], (1 + 1 / 2 + 1 / 3) / 4)
    # a target in the history is a miss for both
    missed = _rank_baselines([_user("u", ["a"], "a")], "recommend", base)
    assert missed["popularity"]["hr@10"] == 0.0 and missed["random"]["hr@10"] == 0.0


# -- rating ----------------------------------------------------------------------------------------------


def test_mae_rmse() -> None:
    close(m.mae([1, 2, 5], [2, 2, 3]), 1.0)
    close(m.rmse([1, 2, 5], [2, 2, 3]), math.sqrt(5 / 3))
    with pytest.raises(ValueError):
        m.mae([1], [1, 2])


def test_random_rating_expectation() -> None:
    out = m.random_rating_errors([3, 1])
    close(out["mae"], (6 / 5 + 10 / 5) / 2)  # |r-3| sums to 6, |r-1| to 10
    close(out["rmse"], math.sqrt((10 / 5 + 30 / 5) / 2))  # squares sum to 10 and 30


def test_user_mean_baseline_in_the_rating_section() -> None:
    from runtime.eval.runner import EvalConfig, UserRecord, score

    users = [_user("u1", ["a", "b"], "c", rating=5), _user("u2", [], "c", rating=1)]
    recs = [UserRecord("u1", rating=4, expected_rating=4.5), UserRecord("u2", rating=2, expected_rating=1.0)]
    base = Baselines((), m.popularity_counts([]), rating_mean=2.5)
    out = score(users, recs, EvalConfig(tasks=("rating",)), base)["rating"]
    close(out["mae"], 1.0)
    close(out["rmse"], 1.0)
    close(out["mae_expected"], 0.25)
    close(out["rmse_expected"], math.sqrt(0.125))
    # user 1's history mean is 4 (error 1), user 2 has none: the train mean 2.5 (error 1.5)
    close(out["baseline"]["user_mean"]["mae"], 1.25)
    close(out["baseline"]["user_mean"]["rmse"], math.sqrt((1 + 2.25) / 2))


# -- text ------------------------------------------------------------------------------------------------


def test_text_metrics_on_one_substitution() -> None:
    out = m.text_metrics("the cat sat on the mat", "the cat is on the mat")
    close(out["rouge_1"], 5 / 6)
    close(out["rouge_2"], 3 / 5)
    close(out["rouge_l"], 5 / 6)
    close(out["bleu_1"], 5 / 6)
    close(out["unigram_precision"], 5 / 6)


def test_text_metrics_on_a_short_prediction() -> None:
    out = m.text_metrics("The CAT!", "the cat is on the mat")
    close(out["unigram_precision"], 1.0)
    close(out["bleu_1"], math.exp(1 - 6 / 2))  # brevity penalty
    close(out["rouge_1"], 2 * 1 * (1 / 3) / (1 + 1 / 3))
    close(out["rouge_2"], 2 * 1 * (1 / 5) / (1 + 1 / 5))
    close(out["rouge_l"], 0.5)


def test_clipping_lcs_and_empty_text() -> None:
    close(m.unigram_precision("the the the", "the cat"), 1 / 3)
    assert m.lcs_length("a b c d".split(), "a x c y d".split()) == 3
    close(m.rouge_l("a b c d", "a x c y d"), 2 * (3 / 4) * (3 / 5) / (3 / 4 + 3 / 5))
    assert m.text_metrics("", "the cat") == dict.fromkeys(("rouge_1", "rouge_2", "rouge_l", "bleu_1",
                                                           "unigram_precision"), 0.0)


# -- selection -------------------------------------------------------------------------------------------


def test_set_precision_recall_f1() -> None:
    s = m.set_prf([0, 1], [1])
    close(s.precision, 0.5)
    close(s.recall, 1.0)
    close(s.f1, 2 / 3)
    assert m.set_prf([2], [0, 1]) == m.SetScores(0.0, 0.0, 0.0)
    assert m.set_prf([], [0]) == m.SetScores(0.0, 0.0, 0.0)


@pytest.mark.parametrize(("n", "k", "a"), [(4, 2, 1), (5, 1, 2), (3, 2, 2)])
def test_random_selection_expectation_matches_enumeration(n: int, k: int, a: int) -> None:
    actual = list(range(a))
    draws = [m.set_prf(c, actual) for c in itertools.combinations(range(n), k)]
    exp = m.random_set_prf(n, k, a)
    close(exp.precision, m.mean(d.precision for d in draws))
    close(exp.recall, m.mean(d.recall for d in draws))
    close(exp.f1, m.mean(d.f1 for d in draws))


def test_selected_set_keeps_the_second_above_uniform() -> None:
    assert selected_set([0.5, 0.3, 0.2]) == (0,)
    assert selected_set([0.4, 0.4, 0.2]) == (0, 1)
    assert selected_set([0.1, 0.6, 0.3]) == (1,)
    assert selected_set([0.34, 0.26, 0.4]) == (2, 0)
    assert selected_set([0.25, 0.25, 0.25, 0.25]) == (0, 1)  # ties: lower index
    assert selected_set([]) == ()


def test_selection_section_and_its_same_size_random_baseline() -> None:
    """The random baseline draws, per user, as many candidates as the model selected."""
    from runtime.eval.runner import EvalConfig, UserRecord, score

    users = [_user("u1", ["a"], "b", candidates=("c", "d", "e", "f"), selected=(1,)),
             _user("u2", ["a"], "b", candidates=("c", "d", "e"), selected=(0, 2))]
    recs = [UserRecord("u1", selected=(1, 0)), UserRecord("u2", selected=(2,))]
    base = Baselines((), m.popularity_counts([["e", "e", "c"]]))
    out = score(users, recs, EvalConfig(tasks=("selection",)), base)["selection"]
    # model: u1 P 1/2 R 1 F1 2/3; u2 P 1 R 1/2 F1 2/3
    close(out["precision"], 0.75)
    close(out["recall"], 0.75)
    close(out["f1"], 2 / 3)
    # random, 2 of 4 with 1 right: P 1/4, R 2/4, F1 2*2*1/(4*3) = 1/3; 1 of 3 with 2 right: P 2/3, R 1/3,
    # F1 2*1*2/(3*3) = 4/9
    rnd = out["baseline"]["random"]
    close(rnd["precision"], (1 / 4 + 2 / 3) / 2)
    close(rnd["recall"], (2 / 4 + 1 / 3) / 2)
    close(rnd["f1"], (1 / 3 + 4 / 9) / 2)
    # popularity: u1 takes e, c (2 picks; e twice, c once): neither is d -> 0; u2 takes e: P 1, R 1/2
    pop = out["baseline"]["popularity"]
    close(pop["f1"], (0 + 2 / 3) / 2)
    assert out["count"] == 2
