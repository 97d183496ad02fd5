"""The paper's metrics in plain Python/numpy: ranking, rating, text overlap, set selection.

Ranking metrics take one relevant item per request (the next item, or the searched item) and its rank
``r`` (1-based): HR@k = [r <= k], NDCG@k = [r <= k] / log2(r + 1) (the ideal DCG is 1), MRR@k =
[r <= k] / r. Ties are broken uniformly at random and the metrics are the *expectation* over that draw:
an item with ``above`` strictly better and ``tied`` other equally scored items has a rank uniform in
``above + 1 .. above + tied + 1``. So a list of distinct scores gives its plain positions, a constant
score (the random baseline) gives k / n, and a popularity ranking with many equal counts is not credited
for an arbitrary tie order.

Text metrics tokenise like ``rouge_score``: lower-case, runs of ``[a-z0-9]`` are the tokens.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

KS: tuple[int, ...] = (3, 5, 10)
"""Cut-offs of HR / NDCG / MRR, as in the paper."""

_TOKEN = re.compile(r"[a-z0-9]+")


# -- ranking ---------------------------------------------------------------------------------------------


def rank_metrics(above: int, tied: int, ks: Sequence[int] = KS) -> dict[str, float]:
    """Expected ``hr@k``, ``ndcg@k``, ``mrr@k`` of a relevant item with ``above`` items scored strictly
    higher and ``tied`` other items scored equally (its rank uniform in above+1 .. above+tied+1)."""
    if above < 0 or tied < 0:
        raise ValueError(f"above and tied must be >= 0, got {above}, {tied}")
    out: dict[str, float] = {}
    n = tied + 1
    for k in ks:
        ranks = range(above + 1, min(above + tied + 1, k) + 1)  # the ranks within the cut-off
        out[f"hr@{k}"] = len(ranks) / n
        out[f"ndcg@{k}"] = sum(1.0 / math.log2(r + 1) for r in ranks) / n
        out[f"mrr@{k}"] = sum(1.0 / r for r in ranks) / n
    return out


def miss_metrics(ks: Sequence[int] = KS) -> dict[str, float]:
    """All ranking metrics 0 (the relevant item was not returned)."""
    return {f"{name}@{k}": 0.0 for k in ks for name in ("hr", "ndcg", "mrr")}


def ranked_list_metrics(ranked: Sequence[tuple[str, float]], target: str, ks: Sequence[int] = KS) -> dict[str, float]:
    """Metrics of ``target`` in a returned list of (item id, score), best first.

    A target absent from the list is a miss. Ties are resolved by the scores (see the module docstring);
    the list's order only matters through them."""
    scores = {item: score for item, score in ranked}
    if target not in scores:
        return miss_metrics(ks)
    s = scores[target]
    above = sum(1 for v in scores.values() if v > s)
    tied = sum(1 for v in scores.values() if v == s) - 1
    return rank_metrics(above, tied, ks)


def score_metrics(scores: dict[str, float], target: str, ks: Sequence[int] = KS) -> dict[str, float]:
    """Metrics of ``target`` when every admissible item has a score (a baseline's full ranking).

    ``scores`` holds the admissible items only; a target outside them is a miss."""
    if target not in scores:
        return miss_metrics(ks)
    s = scores[target]
    above = sum(1 for v in scores.values() if v > s)
    tied = sum(1 for v in scores.values() if v == s) - 1
    return rank_metrics(above, tied, ks)


def popularity_counts(sequences: Iterable[Iterable[str]]) -> Counter[str]:
    """Occurrences of each item id over the given id sequences (the train split's histories and next items)."""
    counts: Counter[str] = Counter()
    for seq in sequences:
        counts.update(seq)
    return counts


# -- rating ----------------------------------------------------------------------------------------------


def mae(predicted: Sequence[float], actual: Sequence[float]) -> float:
    """Mean absolute error; 0 for no pairs."""
    _same_length(predicted, actual)
    if not actual:
        return 0.0
    return sum(abs(p - a) for p, a in zip(predicted, actual)) / len(actual)


def rmse(predicted: Sequence[float], actual: Sequence[float]) -> float:
    """Root mean squared error; 0 for no pairs."""
    _same_length(predicted, actual)
    if not actual:
        return 0.0
    return math.sqrt(sum((p - a) ** 2 for p, a in zip(predicted, actual)) / len(actual))


def random_rating_errors(actual: Sequence[float], levels: Sequence[int] = (1, 2, 3, 4, 5)) -> dict[str, float]:
    """Expected MAE and RMSE of a rating drawn uniformly from ``levels`` (RMSE: the root of the expected
    mean squared error)."""
    if not actual:
        return {"mae": 0.0, "rmse": 0.0}
    n = len(levels)
    abs_err = sum(sum(abs(r - a) for r in levels) / n for a in actual) / len(actual)
    sq_err = sum(sum((r - a) ** 2 for r in levels) / n for a in actual) / len(actual)
    return {"mae": abs_err, "rmse": math.sqrt(sq_err)}


def _same_length(a: Sequence[object], b: Sequence[object]) -> None:
    if len(a) != len(b):
        raise ValueError(f"predictions and labels differ in length: {len(a)} vs {len(b)}")


# -- text ------------------------------------------------------------------------------------------------


def tokenize(text: str) -> list[str]:
    """Lower-cased alphanumeric runs (rouge_score's default tokenisation, without stemming)."""
    return _TOKEN.findall(text.lower())


def _ngrams(tokens: Sequence[str], n: int) -> Counter[tuple[str, ...]]:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def _f1(overlap: float, n_pred: int, n_ref: int) -> float:
    if overlap <= 0 or n_pred == 0 or n_ref == 0:
        return 0.0
    p, r = overlap / n_pred, overlap / n_ref
    return 2 * p * r / (p + r)


def rouge_n(prediction: str, reference: str, n: int) -> float:
    """ROUGE-N F-measure: clipped n-gram overlap, F1 of precision and recall."""
    pred, ref = _ngrams(tokenize(prediction), n), _ngrams(tokenize(reference), n)
    overlap = sum((pred & ref).values())
    return _f1(overlap, sum(pred.values()), sum(ref.values()))


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence (O(len(a) * len(b)) dynamic programme)."""
    if not a or not b:
        return 0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure (sentence level): LCS / prediction length and LCS / reference length, their F1."""
    pred, ref = tokenize(prediction), tokenize(reference)
    return _f1(lcs_length(pred, ref), len(pred), len(ref))


def unigram_precision(prediction: str, reference: str) -> float:
    """Clipped unigram precision: the paper's "BLEU" (no brevity penalty); 0 for an empty prediction."""
    pred, ref = Counter(tokenize(prediction)), Counter(tokenize(reference))
    total = sum(pred.values())
    return sum((pred & ref).values()) / total if total else 0.0


def bleu_1(prediction: str, reference: str) -> float:
    """Sentence BLEU-1: clipped unigram precision times the brevity penalty exp(1 - ref/pred) when the
    prediction is shorter than the reference (NLTK ``sentence_bleu`` with weights (1,))."""
    c, r = len(tokenize(prediction)), len(tokenize(reference))
    if c == 0:
        return 0.0
    bp = 1.0 if c >= r else math.exp(1.0 - r / c)
    return bp * unigram_precision(prediction, reference)


def text_metrics(prediction: str, reference: str) -> dict[str, float]:
    """``rouge_1``, ``rouge_2``, ``rouge_l`` (F-measures), ``bleu_1`` and ``unigram_precision`` of one pair."""
    return {
        "rouge_1": rouge_n(prediction, reference, 1),
        "rouge_2": rouge_n(prediction, reference, 2),
        "rouge_l": rouge_l(prediction, reference),
        "bleu_1": bleu_1(prediction, reference),
        "unigram_precision": unigram_precision(prediction, reference),
    }


# -- selection -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SetScores:
    precision: float
    recall: float
    f1: float


def set_prf(predicted: Iterable[int], actual: Iterable[int]) -> SetScores:
    """Set precision |P∩A|/|P|, recall |P∩A|/|A| and their F1 (0 where a denominator is 0)."""
    p, a = set(predicted), set(actual)
    hit = len(p & a)
    precision = hit / len(p) if p else 0.0
    recall = hit / len(a) if a else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return SetScores(precision, recall, f1)


def random_set_prf(num_candidates: int, num_selected: int, actual: int) -> SetScores:
    """Expected precision, recall and F1 of ``num_selected`` candidates drawn uniformly without replacement
    from ``num_candidates`` when ``actual`` of them are correct: the expected hit count is
    m * |A| / n, and every denominator is fixed, so E[P] = |A|/n, E[R] = m/n, E[F1] = 2m|A| / (n(m + |A|))."""
    n, m = num_candidates, num_selected
    if n <= 0 or m <= 0 or actual <= 0:
        return SetScores(0.0, 0.0, 0.0)
    return SetScores(actual / n, m / n, 2 * m * actual / (n * (m + actual)))


def mean(values: Iterable[float]) -> float:
    """Arithmetic mean; 0 for no values."""
    vals = list(values)
    return sum(vals) / len(vals) if vals else 0.0


def mean_dicts(rows: Sequence[dict[str, float]]) -> dict[str, float]:
    """Key-wise means of metric dictionaries that share their keys (``{}`` for no rows)."""
    if not rows:
        return {}
    return {key: mean(row[key] for row in rows) for key in rows[0]}
