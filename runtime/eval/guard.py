"""The accuracy guard: two artifact sets on the same users, metric differences and per-request agreement.

``compare`` takes the candidate's and the reference's records (same users, same order) and reports, and
checks them against ``GuardThresholds``; ``unimp eval ART --against REF`` exits non-zero when a check
fails. Agreement is measured request by request, so it catches a changed model even where the averaged
metrics happen to match:

- top-10 overlap: |A ∩ B| / max(|A|, |B|) of the two returned item sets (1 when both are empty), per
  recommendation / search request and decode mode, averaged;
- rating agreement: the share of requests whose argmax rating is equal;
- explanation exact match: the share of explanations that are the same string;
- selection agreement: the share of requests with the same selected set.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from runtime.eval.metrics import mean
from runtime.eval.runner import RANK_TASKS, UserRecord


@dataclass(frozen=True)
class GuardThresholds:
    """Limits of ``unimp eval --against`` (each has a flag of the same name)."""

    max_hr_diff: float = 0.01
    """|HR@10 - reference HR@10| of recommendation and search, every decode mode run (1 point absolute)."""
    min_overlap: float = 0.9
    """Mean top-10 item overlap with the reference, per ranking task and decode mode."""
    min_rating_agreement: float = 0.95
    """Share of rating requests with the reference's argmax rating."""
    max_rmse_diff: float = 0.05
    """|RMSE - reference RMSE| of the argmax rating."""
    max_rouge_l_diff: float = 0.01
    """|ROUGE-L F - reference ROUGE-L F| of the explanations (1 point absolute)."""
    min_selection_agreement: float = 0.9
    """Share of selection requests with the reference's selected set."""
    min_explanation_match: float = 0.0
    """Share of explanations equal to the reference's (0: reported, not enforced; greedy text diverges
    for good after one different token)."""


@dataclass(frozen=True)
class Check:
    name: str
    value: float
    limit: float
    kind: str
    """"max" (value <= limit passes) or "min" (value >= limit passes)."""

    @property
    def passed(self) -> bool:
        return self.value <= self.limit if self.kind == "max" else self.value >= self.limit


def overlap(a: Sequence[str], b: Sequence[str]) -> float:
    """|A ∩ B| / max(|A|, |B|) of two item lists as sets; 1 when both are empty."""
    sa, sb = set(a), set(b)
    size = max(len(sa), len(sb))
    return len(sa & sb) / size if size else 1.0


def agreement(candidate: Sequence[UserRecord], reference: Sequence[UserRecord], tasks: Sequence[str]) -> dict[str, Any]:
    """Per-request agreement of two runs over the same users."""
    if [r.user_id for r in candidate] != [r.user_id for r in reference]:
        raise ValueError("the two runs did not evaluate the same users in the same order")
    out: dict[str, Any] = {}
    for task in RANK_TASKS:
        if task not in tasks or not candidate:
            continue
        modes = candidate[0].ranked.get(task, {}).keys()
        out[task] = {
            mode: {"top10_overlap": mean(overlap([i for i, _ in c.ranked[task][mode]], [i for i, _ in r.ranked[task][mode]])
                                         for c, r in zip(candidate, reference))}
            for mode in modes
        }
    if "rating" in tasks:
        out["rating"] = {
            "agreement": mean(float(c.rating == r.rating) for c, r in zip(candidate, reference)),
            "max_expected_diff": max((abs(c.expected_rating - r.expected_rating) for c, r in zip(candidate, reference)),
                                     default=0.0),
        }
    if "explanation" in tasks:
        out["explanation"] = {"exact_match": mean(float(c.explanation == r.explanation)
                                                  for c, r in zip(candidate, reference))}
    if "selection" in tasks:
        out["selection"] = {"agreement": mean(float(set(c.selected) == set(r.selected))
                                              for c, r in zip(candidate, reference))}
    return out


def _numbers(section: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Flattened numeric metrics of a report section (nested modes as ``beam.hr@10``), no baselines/counts."""
    out: dict[str, float] = {}
    for key, value in section.items():
        if key in ("baseline", "count"):
            continue
        if isinstance(value, dict):
            out.update(_numbers(value, f"{prefix}{key}."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[prefix + key] = float(value)
    return out


def differences(candidate: dict[str, Any], reference: dict[str, Any], tasks: Sequence[str]) -> dict[str, dict[str, float]]:
    """Candidate minus reference for every metric of every task section both reports have."""
    out = {}
    for task in tasks:
        if task in candidate and task in reference:
            a, b = _numbers(candidate[task]), _numbers(reference[task])
            out[task] = {k: a[k] - b[k] for k in a if k in b}
    return out


def checks(diffs: dict[str, dict[str, float]], agree: dict[str, Any], limits: GuardThresholds) -> list[Check]:
    out = []
    for task in RANK_TASKS:
        if task in diffs:
            for key, value in diffs[task].items():
                if key.endswith("hr@10"):
                    out.append(Check(f"{task}.{key} difference", abs(value), limits.max_hr_diff, "max"))
        for mode, values in agree.get(task, {}).items():
            out.append(Check(f"{task}.{mode} top-10 overlap", values["top10_overlap"], limits.min_overlap, "min"))
    if "rating" in agree:
        out.append(Check("rating agreement", agree["rating"]["agreement"], limits.min_rating_agreement, "min"))
    if "rating" in diffs and "rmse" in diffs["rating"]:
        out.append(Check("rating.rmse difference", abs(diffs["rating"]["rmse"]), limits.max_rmse_diff, "max"))
    if "explanation" in diffs and "rouge_l" in diffs["explanation"]:
        out.append(Check("explanation.rouge_l difference", abs(diffs["explanation"]["rouge_l"]),
                         limits.max_rouge_l_diff, "max"))
    if "selection" in agree:
        out.append(Check("selection agreement", agree["selection"]["agreement"], limits.min_selection_agreement, "min"))
    if "explanation" in agree:
        out.append(Check("explanation exact match", agree["explanation"]["exact_match"],
                         limits.min_explanation_match, "min"))
    return out


def compare(candidate_records: Sequence[UserRecord], reference_records: Sequence[UserRecord],
            candidate: dict[str, Any], reference: dict[str, Any], tasks: Sequence[str],
            limits: GuardThresholds) -> dict[str, Any]:
    """The ``guard`` section of the report: differences, agreement, thresholds, checks, verdict."""
    diffs = differences(candidate, reference, tasks)
    agree = agreement(candidate_records, reference_records, tasks)
    result = checks(diffs, agree, limits)
    return {
        "differences": diffs,
        "agreement": agree,
        "thresholds": asdict(limits),
        "checks": [{"name": c.name, "value": c.value, "limit": c.limit, "kind": c.kind, "passed": c.passed}
                   for c in result],
        "passed": all(c.passed for c in result),
    }
