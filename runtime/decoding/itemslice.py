"""One-step decoding over a known token slice: recommendation top-k, rating and selection distributions.

With atomic item tokens (``item_0..item_{N-1}``, a contiguous id range), the next-item answer is one
softmax: after prefill, the log-probability of each item is its token's log-softmax over the FULL
vocabulary, so scores are comparable with beam search's first-step scores. Masks remove items that may
not be returned; ``top_k`` is capped at the number of admissible items.

Items are addressed by their index in the slice (``k`` for ``item_k``), not by token id.
``hypothesis_items`` reads items back out of free (unconstrained) beam-search hypotheses.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from runtime.decoding.beam import BeamResult, topk_desc
from runtime.types import InvalidRequest

IndexOrMask = np.ndarray | list[int] | tuple[int, ...]
"""Either integer item indices, or a boolean mask [item_count]."""


def log_softmax64(logits: np.ndarray) -> np.ndarray:
    """float64 log-softmax over the last axis."""
    x = np.asarray(logits, dtype=np.float64)
    peak = np.max(x, axis=-1, keepdims=True)
    shifted = x - peak
    return shifted - np.log(np.sum(np.exp(shifted), axis=-1, keepdims=True))


def _as_mask(value: IndexOrMask, count: int, name: str) -> np.ndarray:
    """bool [count]: True for the items named by ``value`` (indices or a boolean mask)."""
    arr = np.asarray(value)
    if arr.dtype == np.bool_:
        if arr.shape != (count,):
            raise InvalidRequest(f"{name} mask has shape {arr.shape}, expected ({count},)", field=name)
        return arr
    idx = arr.astype(np.int64, copy=False).reshape(-1)
    if idx.size and (idx.min() < 0 or idx.max() >= count):
        bad = idx[(idx < 0) | (idx >= count)][0]
        raise InvalidRequest(f"{name} names item index {int(bad)}, outside [0, {count})", field=name)
    mask = np.zeros(count, dtype=bool)
    mask[idx] = True
    return mask


def admissible_items(
    count: int,
    *,
    exclude: IndexOrMask | None = None,
    unavailable: IndexOrMask | None = None,
    allow: IndexOrMask | None = None,
    category_mask: np.ndarray | None = None,
) -> np.ndarray:
    """bool [count]: items that may be returned.

    ``exclude`` (e.g. history items) and ``unavailable`` remove items; ``allow``, when not None, keeps only
    the items it names (an empty allow-list admits nothing: pass None for "no allow-list");
    ``category_mask`` (bool [count]), when not None, keeps only items where it is True.
    """
    ok = np.ones(count, dtype=bool)
    if exclude is not None:
        ok &= ~_as_mask(exclude, count, "exclude")
    if unavailable is not None:
        ok &= ~_as_mask(unavailable, count, "unavailable")
    if allow is not None:
        ok &= _as_mask(allow, count, "allow")
    if category_mask is not None:
        cat = np.asarray(category_mask)
        if cat.dtype != np.bool_:
            raise InvalidRequest("category_mask must be a boolean mask", field="category_mask")
        ok &= _as_mask(cat, count, "category_mask")
    return ok


@dataclass(frozen=True)
class TopItems:
    """Best items first."""

    indices: np.ndarray
    """int64 [k]: item indices within the slice (token id = item_start + index)."""
    logprobs: np.ndarray
    """float64 [k]: log-probability of each item's token under the full-vocabulary softmax, descending."""

    def __len__(self) -> int:
        return int(self.indices.shape[0])

    def pairs(self) -> list[tuple[int, float]]:
        return [(int(i), float(s)) for i, s in zip(self.indices, self.logprobs)]


def item_topk(
    logits: np.ndarray,
    item_start: int,
    item_count: int,
    k: int,
    *,
    exclude: IndexOrMask | None = None,
    unavailable: IndexOrMask | None = None,
    allow: IndexOrMask | None = None,
    category_mask: np.ndarray | None = None,
) -> TopItems:
    """Top-``k`` admissible items from last-position logits [V]; see ``admissible_items`` for the masks.

    Scores are log-softmax over the full vocabulary, restricted to ids
    ``[item_start, item_start + item_count)``; ties go to the lower index. ``k`` is capped at the number
    of admissible items (the result may be empty).
    """
    row = np.asarray(logits).reshape(-1)  # [V]
    if k < 0:
        raise InvalidRequest(f"top_k must be >= 0, got {k}", field="top_k")
    if item_start < 0 or item_count < 0 or item_start + item_count > row.shape[0]:
        raise ValueError(
            f"item range [{item_start}, {item_start + item_count}) is outside the vocabulary of {row.shape[0]}"
        )
    scores = log_softmax64(row)[item_start : item_start + item_count]  # [count]
    ok = admissible_items(
        item_count, exclude=exclude, unavailable=unavailable, allow=allow, category_mask=category_mask
    )
    candidates = np.flatnonzero(ok)  # [n_ok]
    k = min(k, candidates.size)
    if k == 0:
        return TopItems(indices=np.zeros(0, dtype=np.int64), logprobs=np.zeros(0, dtype=np.float64))
    cand_scores = scores[candidates]  # [n_ok]
    chosen = topk_desc(cand_scores, k)  # [k]
    return TopItems(indices=candidates[chosen].astype(np.int64), logprobs=cand_scores[chosen])


def restricted_softmax(logits: np.ndarray, token_ids: np.ndarray | list[int] | tuple[int, ...]) -> np.ndarray:
    """float64 [n]: softmax over ``token_ids`` only (their logits renormalised among themselves)."""
    row = np.asarray(logits, dtype=np.float64).reshape(-1)  # [V]
    ids = np.asarray(token_ids, dtype=np.int64).reshape(-1)
    if ids.size == 0:
        raise ValueError("restricted_softmax needs at least one token id")
    if ids.min() < 0 or ids.max() >= row.shape[0]:
        raise ValueError(f"token ids {ids.tolist()} are outside the vocabulary of {row.shape[0]}")
    sub = row[ids]
    e = np.exp(sub - sub.max())
    return e / e.sum()


@dataclass(frozen=True)
class RatingDistribution:
    probs: np.ndarray
    """float64 [5]: P(rate_1..rate_5), renormalised over the rating tokens; sums to 1."""
    expected: float
    """sum_r r * P(rate_r)."""
    rating: int
    """1-based argmax (the lower rating on ties)."""


def rating_distribution(
    logits: np.ndarray, rate_ids: list[int] | tuple[int, ...] | np.ndarray
) -> RatingDistribution:
    """Distribution over the rating tokens ``rate_ids`` (ids of rate_1..rate_n, in order) from logits [V]."""
    probs = restricted_softmax(logits, rate_ids)  # [n]
    values = np.arange(1, probs.shape[0] + 1, dtype=np.float64)
    return RatingDistribution(
        probs=probs, expected=float(np.dot(values, probs)), rating=int(np.argmax(probs)) + 1
    )


@dataclass(frozen=True)
class Selection:
    selected: tuple[int, ...]
    """Candidate indices, best first (at most ``max_selected``)."""
    scores: tuple[float, ...]
    """P(s_i) for every candidate i (in candidate order), renormalised over the candidates; sums to 1."""


def select_candidates(
    logits: np.ndarray,
    selection_ids: list[int] | tuple[int, ...] | np.ndarray,
    num_candidates: int,
    max_selected: int,
) -> Selection:
    """Rank candidates s_0..s_{n-1} by their selection token's probability from logits [V].

    ``selection_ids`` are the ids of s_0, s_1, ... (at least ``num_candidates`` of them); only the first
    ``num_candidates`` compete. Ties go to the lower index.
    """
    ids = np.asarray(selection_ids, dtype=np.int64).reshape(-1)
    if not 1 <= num_candidates <= ids.size:
        raise InvalidRequest(
            f"{num_candidates} candidates given; between 1 and {ids.size} are supported", field="candidates"
        )
    if max_selected < 1:
        raise InvalidRequest(f"max_selected must be >= 1, got {max_selected}", field="max_selected")
    probs = restricted_softmax(logits, ids[:num_candidates])  # [n]
    order = np.argsort(-probs, kind="stable")[:max_selected]
    return Selection(selected=tuple(int(i) for i in order), scores=tuple(float(p) for p in probs))


def hypothesis_items(
    hypotheses: BeamResult, item_start: int, admissible: np.ndarray
) -> list[tuple[int, float]]:
    """(item index, sequence score) pairs that free beam-search hypotheses spell, best hypothesis first.

    Each hypothesis contributes the first item token it contains (``item_start <= id < item_start +
    len(admissible)``), if that item is admissible (bool [count]) and no better hypothesis contributed it;
    hypotheses without an item token contribute nothing. So there may be fewer items than hypotheses,
    or none.
    """
    ok = np.asarray(admissible, dtype=bool).reshape(-1)
    count = ok.shape[0]
    seen: set[int] = set()
    ranked = []
    for seq, score in zip(hypotheses.sequences(), hypotheses.scores):
        index = seq - item_start
        inside = np.flatnonzero((index >= 0) & (index < count))
        if inside.size == 0:
            continue
        first = int(index[inside[0]])  # the first item token of the hypothesis is its answer
        if ok[first] and first not in seen:
            seen.add(first)
            ranked.append((first, float(score)))
    return ranked
