"""The accuracy guard's agreement measures and threshold checks on hand-made records."""

from __future__ import annotations

import numpy as np
import pytest

from runtime.eval.guard import GuardThresholds, agreement, compare, overlap
from runtime.eval.runner import UserRecord

TASKS = ("recommend", "rating", "explanation", "selection")


def _rec(uid: str, items: list[str], rating: int, text: str, selected: tuple[int, ...]) -> UserRecord:
    return UserRecord(uid, ranked={"recommend": {"fast": [(i, -float(k)) for k, i in enumerate(items)]}},
                      rating=rating, expected_rating=float(rating), explanation=text, selected=selected)


def test_overlap_is_set_based() -> None:
    assert overlap(["a", "b", "c", "d"], ["d", "c", "x", "y"]) == 0.5
    assert overlap([], []) == 1.0
    assert overlap(["a"], []) == 0.0


def test_agreement_per_request() -> None:
    cand = [_rec("u1", ["a", "b"], 4, "nice", (0,)), _rec("u2", ["c", "d"], 2, "bad", (1, 0))]
    ref = [_rec("u1", ["b", "a"], 4, "nice", (0,)), _rec("u2", ["c", "e"], 3, "bad!", (0, 1))]
    out = agreement(cand, ref, TASKS)
    np.testing.assert_allclose(out["recommend"]["fast"]["top10_overlap"], (1.0 + 0.5) / 2)
    assert out["rating"]["agreement"] == 0.5
    assert out["rating"]["max_expected_diff"] == 1.0
    assert out["explanation"]["exact_match"] == 0.5
    assert out["selection"]["agreement"] == 1.0  # the same sets in another order
    with pytest.raises(ValueError):
        agreement(cand, ref[::-1], TASKS)


def test_compare_fails_on_each_threshold_and_passes_within_them() -> None:
    recs = [_rec("u1", ["a", "b"], 4, "nice", (0,))]
    report = {"recommend": {"hr@10": 0.30, "count": 1, "baseline": {"popularity": {"hr@10": 0.1}}},
              "rating": {"rmse": 1.0, "mae": 0.8}}
    same = compare(recs, recs, report, report, TASKS, GuardThresholds())
    assert same["passed"] and all(c["passed"] for c in same["checks"])
    assert same["differences"]["recommend"] == {"hr@10": 0.0}  # baselines and counts are not compared

    worse = {"recommend": {"hr@10": 0.28}, "rating": {"rmse": 1.0, "mae": 0.8}}
    out = compare(recs, recs, worse, report, TASKS, GuardThresholds())
    assert not out["passed"]
    assert [c["name"] for c in out["checks"] if not c["passed"]] == ["recommend.hr@10 difference"]
    assert compare(recs, recs, worse, report, TASKS, GuardThresholds(max_hr_diff=0.03))["passed"]

    flipped = [_rec("u1", ["a", "b"], 5, "nice", (0,))]
    out = compare(flipped, recs, report, report, TASKS, GuardThresholds())
    assert [c["name"] for c in out["checks"] if not c["passed"]] == ["rating agreement"]
