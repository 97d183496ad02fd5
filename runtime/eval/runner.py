"""Run the served graphs (through the public ``Runtime`` API) on a split's users and score them.

``evaluate(runtime, users, config)`` returns one ``UserRecord`` per user (the model's answers: ranked
items per decode mode, the rating distribution, the explanation, the selected set); ``score`` turns
records into the report's metrics beside the baselines; the guard (``runtime.eval.guard``) compares two
runs' records request by request.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from runtime.eval import metrics as m
from runtime.eval.data import EvalUser
from runtime.types import (
    BeamOptions,
    DecodeMode,
    HistoryItem,
    PreferenceRequest,
    PreferenceResult,
    RecommendRequest,
    RuntimeError_,
    SamplingOptions,
    SearchRequest,
    SelectRequest,
)

log = logging.getLogger(__name__)

TASKS = ("recommend", "search", "rating", "explanation", "selection")
RANK_TASKS = ("recommend", "search")
TOP_K = 10
"""Items requested per recommendation / search (the largest cut-off)."""
MAX_SELECTED = 2
"""Selection sets have 1-2 suitable candidates (as in the paper), so at most two are selected."""


class EvalError(RuntimeError):
    """The runtime refused a user's request; the message names the user and the request field."""


@dataclass(frozen=True)
class EvalConfig:
    tasks: tuple[str, ...] = TASKS
    beam: bool = False
    """Also run the paper beam (``DecodeMode.BEAM``) and the constrained beam for recommend and search."""
    explain_tokens: int = 64
    """Greedy explanation length limit (new tokens)."""
    progress: bool = True


@dataclass
class UserRecord:
    """The model's answers for one user."""

    user_id: str
    ranked: dict[str, dict[str, list[tuple[str, float]]]] = field(default_factory=dict)
    """task (recommend/search) -> decode mode (fast/beam/beam_constrained) -> [(item id, score)], best first."""
    rating: int = 0
    """argmax of the rating distribution (the ``rate_r`` token the explanation starts with)."""
    expected_rating: float = 0.0
    rating_distribution: tuple[float, ...] = ()
    explanation: str = ""
    selected: tuple[int, ...] = ()
    """The selected set (see ``selected_set``), best first."""
    selection_scores: tuple[float, ...] = ()


def selected_set(scores: Sequence[float], max_selected: int = MAX_SELECTED) -> tuple[int, ...]:
    """The predicted selection set from the candidates' renormalised probabilities: the best candidate,
    plus each next best (up to ``max_selected`` in all) whose probability is at least uniform (1/n).
    Ties go to the lower index."""
    n = len(scores)
    if n == 0:
        return ()
    order = sorted(range(n), key=lambda i: (-scores[i], i))
    chosen = [order[0]]
    for i in order[1:max_selected]:
        if scores[i] >= 1.0 / n:
            chosen.append(i)
    return tuple(chosen)


def _history(user: EvalUser) -> tuple[HistoryItem, ...]:
    return tuple(HistoryItem(item_id=h.item_id, rating=h.rating, explanation=h.explanation) for h in user.history)


def _modes(config: EvalConfig) -> list[DecodeMode]:
    return [DecodeMode.FAST, DecodeMode.BEAM, DecodeMode.BEAM_CONSTRAINED] if config.beam else [DecodeMode.FAST]


def evaluate_user(runtime: Any, user: EvalUser, config: EvalConfig) -> UserRecord:
    """Every requested task for one user, through ``Runtime.recommend / search / explain /
    predict_preference / select_items``."""
    record = UserRecord(user.user_id)
    history = _history(user)
    for task in RANK_TASKS:
        if task not in config.tasks:
            continue
        record.ranked[task] = {}
        for mode in _modes(config):
            beam = BeamOptions(num_beams=TOP_K, num_return_sequences=TOP_K,
                               max_new_tokens=50 if task == "recommend" else 20)
            if task == "recommend":
                result = runtime.recommend(RecommendRequest(history, top_k=TOP_K, mode=mode, beam=beam,
                                                            user_id=user.user_id))
            else:
                result = runtime.search(SearchRequest(history, user.query, top_k=TOP_K, mode=mode, beam=beam,
                                                      user_id=user.user_id))
            record.ranked[task][mode.value] = [(it.item_id, it.score) for it in result.items]
    if "rating" in config.tasks or "explanation" in config.tasks:
        request = PreferenceRequest(history, HistoryItem(item_id=user.rating_item),
                                    SamplingOptions(max_new_tokens=config.explain_tokens), user_id=user.user_id)
        pref: PreferenceResult | None = None
        if "explanation" in config.tasks:
            for out in runtime.explain(request):
                if isinstance(out, PreferenceResult):
                    pref = out
        else:
            pref = runtime.predict_preference(request)
        if pref is None:
            raise EvalError(f"user {user.user_id}: explain ended without a result")
        record.rating, record.expected_rating = pref.rating, pref.expected_rating
        record.rating_distribution = pref.rating_distribution
        record.explanation = pref.explanation
    if "selection" in config.tasks and user.candidates:
        candidates = tuple(HistoryItem(item_id=c) for c in user.candidates)
        sel = runtime.select_items(SelectRequest(history, candidates, max_selected=min(MAX_SELECTED, len(candidates)),
                                                 user_id=user.user_id))
        record.selection_scores = sel.scores
        record.selected = selected_set(sel.scores)
    return record


def evaluate(runtime: Any, users: Sequence[EvalUser], config: EvalConfig, desc: str = "eval") -> tuple[list[UserRecord], float]:
    """Records for every user (with a progress bar) and the seconds taken."""
    from tqdm import tqdm

    t0 = time.perf_counter()
    records = []
    for user in tqdm(users, desc=desc, unit="user", disable=not config.progress):
        try:
            records.append(evaluate_user(runtime, user, config))
        except RuntimeError_ as exc:
            raise EvalError(f"user {user.user_id}: {exc}") from exc
    return records, time.perf_counter() - t0


# -- scoring ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Baselines:
    """What the baselines need: the admissible catalog and the train split's statistics."""

    items: tuple[str, ...]
    """Item ids the model can return (a token, available)."""
    popularity: Counter[str]
    """Occurrences over the train split's histories and next items."""
    common_explanation: str = ""
    """The train split's most frequent target explanation."""
    rating_mean: float = 3.0
    """The train split's mean target rating (the user-mean baseline of users without rated history)."""


def train_baselines(train: Sequence[EvalUser], items: Sequence[str]) -> Baselines:
    """Popularity counts over the train users' histories and next items, their most common explanation
    and mean rating."""
    popularity = m.popularity_counts([*u.history_ids, u.next_item] for u in train)
    texts = Counter(u.explanation for u in train if u.explanation)
    common = min(texts.items(), key=lambda kv: (-kv[1], kv[0]))[0] if texts else ""
    mean_rating = m.mean(float(u.rating) for u in train) if train else 3.0
    return Baselines(tuple(items), popularity, common, mean_rating)


def catalog_items(runtime: Any) -> tuple[str, ...]:
    """Item ids behind the model's item tokens that are available (what the fast path ranks)."""
    catalog = runtime.catalog
    available = catalog.available_mask()
    out = []
    for k in range(len(available)):
        entry = catalog.by_token(k)
        if entry is not None and available[k]:
            out.append(entry.item_id)
    return tuple(out)


def _rank_baselines(users: Sequence[EvalUser], task: str, base: Baselines) -> dict[str, dict[str, float]]:
    pop_rows, rnd_rows = [], []
    for user in users:
        target = user.next_item if task == "recommend" else user.search_item
        seen = set(user.history_ids)
        admissible = [i for i in base.items if i not in seen]  # the model excludes the history too
        pop_rows.append(m.score_metrics({i: float(base.popularity.get(i, 0)) for i in admissible}, target))
        rnd_rows.append(m.score_metrics(dict.fromkeys(admissible, 0.0), target))
    return {"popularity": m.mean_dicts(pop_rows), "random": m.mean_dicts(rnd_rows)}


def _rank_scores(users: Sequence[EvalUser], records: Sequence[UserRecord], task: str, mode: str) -> dict[str, float]:
    rows = []
    for user, rec in zip(users, records):
        target = user.next_item if task == "recommend" else user.search_item
        rows.append(m.ranked_list_metrics(rec.ranked[task][mode], target))
    return m.mean_dicts(rows) if rows else m.miss_metrics()


def _user_mean(user: EvalUser, fallback: float) -> float:
    rated = [h.rating for h in user.history if h.rating]
    return sum(rated) / len(rated) if rated else fallback


def score(users: Sequence[EvalUser], records: Sequence[UserRecord], config: EvalConfig,
          base: Baselines) -> dict[str, Any]:
    """The report's metric sections (one per requested task) with their baselines."""
    out: dict[str, Any] = {}
    n = len(users)
    for task in RANK_TASKS:
        if task not in config.tasks:
            continue
        section: dict[str, Any] = dict(_rank_scores(users, records, task, DecodeMode.FAST.value))
        section["count"] = n
        if config.beam:
            for mode in (DecodeMode.BEAM.value, DecodeMode.BEAM_CONSTRAINED.value):
                section[mode] = _rank_scores(users, records, task, mode)
        section["baseline"] = _rank_baselines(users, task, base)
        out[task] = section
    if "rating" in config.tasks:
        actual = [float(u.rating) for u in users]
        argmax = [float(r.rating) for r in records]
        expected = [r.expected_rating for r in records]
        user_mean = [_user_mean(u, base.rating_mean) for u in users]
        out["rating"] = {
            "mae": m.mae(argmax, actual), "rmse": m.rmse(argmax, actual),
            "mae_expected": m.mae(expected, actual), "rmse_expected": m.rmse(expected, actual),
            "count": n,
            "baseline": {
                "user_mean": {"mae": m.mae(user_mean, actual), "rmse": m.rmse(user_mean, actual)},
                "random": m.random_rating_errors(actual),
            },
        }
    if "explanation" in config.tasks:
        refs = [u.explanation for u in users]
        rows = [m.text_metrics(r.explanation, ref) for r, ref in zip(records, refs)]
        last = [next((h.explanation for h in reversed(u.history) if h.explanation), "") for u in users]
        baseline = {"user_last": m.mean_dicts([m.text_metrics(p, ref) for p, ref in zip(last, refs)])}
        if base.common_explanation:
            baseline["train_most_common"] = m.mean_dicts([m.text_metrics(base.common_explanation, ref) for ref in refs])
        out["explanation"] = {**(m.mean_dicts(rows) if rows else {}), "count": n, "baseline": baseline}
    if "selection" in config.tasks:
        pairs = [(u, r) for u, r in zip(users, records) if u.candidates]
        model = [m.set_prf(r.selected, u.selected) for u, r in pairs]
        rnd = [m.random_set_prf(len(u.candidates), len(r.selected), len(u.selected)) for u, r in pairs]
        pop = []
        for u, r in pairs:  # the most popular candidates, as many as the model selected (ties: lower index)
            order = sorted(range(len(u.candidates)), key=lambda i: (-base.popularity.get(u.candidates[i], 0), i))
            pop.append(m.set_prf(order[: len(r.selected)], u.selected))
        out["selection"] = {**_prf(model), "count": len(pairs),
                            "baseline": {"random": _prf(rnd), "popularity": _prf(pop)}}
    return out


def _prf(rows: Sequence[m.SetScores]) -> dict[str, float]:
    return {"precision": m.mean(r.precision for r in rows), "recall": m.mean(r.recall for r in rows),
            "f1": m.mean(r.f1 for r in rows)}
