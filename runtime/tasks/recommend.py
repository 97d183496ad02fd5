"""Recommendation and personalized search: the UniMP item prompt, then the item ranking a request's mode
asks for (item-slice top-k of one forward pass, the paper's beam search, or a beam search constrained to
admissible items; semantic-ID items always through a constrained trie)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace

import numpy as np

from runtime.decoder.generator import Generator
from runtime.decoding.beam import AllowedTokensFn, BeamResult, BeamSearchConfig, beam_search
from runtime.decoding.itemslice import admissible_items, hypothesis_items, item_topk
from runtime.decoding.trie import TokenTrie
from runtime.limits import DEFAULT_BEAMS
from runtime.prompts import EncodedPrompt, recommendation_prompt, search_prompt
from runtime.tasks.context import Prefilled, TaskContext
from runtime.types import (
    BeamOptions,
    CancelToken,
    DecodeMode,
    InvalidRequest,
    ItemFilter,
    NotFound,
    RecommendRequest,
    RecommendResult,
    ScoredItem,
    SearchRequest,
    Timings,
)

_SENTINEL_FLOOR = -1.0e8
"""Beam scores at or below this are the search's -1e9 "no hypothesis" sentinel, not log-probabilities."""


def recommend(ctx: TaskContext, request: RecommendRequest) -> RecommendResult:
    history = ctx.resolve(request.history)
    prompt = ctx.fit(lambda n: recommendation_prompt(history, n), len(history), f"history[{len(history) - 1}]")
    return _rank_items(ctx, prompt, request.top_k, request.mode, request.filter, request.beam, request.tenant,
                            request.cancel, request.user_id)


def search(ctx: TaskContext, request: SearchRequest) -> RecommendResult:
    history = ctx.resolve(request.history)
    prompt = ctx.fit(lambda n: search_prompt(history, request.query, n), len(history), "query")
    return _rank_items(ctx, prompt, request.top_k, request.mode, request.filter, request.beam, request.tenant,
                            request.cancel, request.user_id)


def _check_decoding(ctx: TaskContext, top_k: int, mode: DecodeMode, beam: BeamOptions) -> None:
    """top_k, beam width and new tokens within ``config.limits`` (see runtime.limits for the semantics)."""
    lim = ctx.limits
    if not 1 <= top_k <= lim.max_top_k:
        raise InvalidRequest(f"top_k: must be in 1..{lim.max_top_k}, got {top_k}", field="top_k")
    if mode == DecodeMode.FAST:
        return
    if top_k > lim.beam_top_k_limit():
        raise InvalidRequest(
            f"top_k: is {top_k}, above the limit of {lim.beam_top_k_limit()} in beam mode (one item per beam)",
            field="top_k",
        )
    if not 1 <= beam.num_beams <= lim.max_beams:
        raise InvalidRequest(f"beam.num_beams: must be in 1..{lim.max_beams}, got {beam.num_beams}",
                             field="beam.num_beams")
    if mode == DecodeMode.BEAM_CONSTRAINED:
        return  # one item per beam; num_return_sequences and max_new_tokens do not apply
    if not 1 <= beam.num_return_sequences <= beam.num_beams:
        raise InvalidRequest(f"beam.num_return_sequences: must be in 1..num_beams ({beam.num_beams}), got "
                             f"{beam.num_return_sequences}", field="beam.num_return_sequences")
    if not 1 <= beam.max_new_tokens <= lim.max_new_tokens:
        raise InvalidRequest(f"beam.max_new_tokens: must be in 1..{lim.max_new_tokens}, got {beam.max_new_tokens}",
                             field="beam.max_new_tokens")


def _item_masks(ctx: TaskContext, item_filter: ItemFilter, history: tuple[int, ...]) -> dict[str, np.ndarray | None]:
    allow = None
    if item_filter.allow:
        allow = np.array([_token_for(ctx, item_id, f"filter.allow_item_ids[{i}]")
                          for i, item_id in enumerate(item_filter.allow)], np.int64)
    return {
        "exclude": np.array(history, np.int64) if item_filter.exclude_history and history else None,
        "unavailable": ~ctx.catalog.available_mask(),
        "allow": allow,
        "category_mask": ctx.catalog.category_mask(list(item_filter.categories)) if item_filter.categories else None,
    }


def _token_for(ctx: TaskContext, item_id: str, field_name: str) -> int:
    try:
        token = ctx.catalog.token_of(item_id)
    except NotFound as exc:
        raise NotFound(f"{field_name}: unknown catalog item {item_id!r}", field=field_name) from exc
    if token < 0:
        raise InvalidRequest(f"{field_name}: item {item_id!r} has no model token", field=field_name)
    return token


def _rank_items(
    ctx: TaskContext,
    prompt: EncodedPrompt,
    top_k: int,
    mode: DecodeMode,
    item_filter: ItemFilter,
    beam: BeamOptions,
    tenant: str,
    cancel: CancelToken | None,
    user_id: str = "",
) -> RecommendResult:
    _check_decoding(ctx, top_k, mode, beam)
    lim = ctx.limits
    if ctx.semantic_trie is not None and mode == DecodeMode.FAST and top_k > lim.beam_top_k_limit():
        raise InvalidRequest(
            f"top_k: is {top_k}, above the limit of {lim.beam_top_k_limit()} for semantic-ID items (fast mode "
            "is a constrained beam search, one item per beam)", field="top_k",
        )
    t_start = time.perf_counter()
    ctx.requests += 1
    t = ctx.manifest.tokens
    masks = _item_masks(ctx, item_filter, prompt.prompt.history_tokens)
    decode_s, tokens = 0.0, 0
    if ctx.semantic_trie is None and mode == DecodeMode.FAST:  # the prompt's logits alone
        pre = ctx.prefill(prompt, tenant, cancel, user_id)
        ranked = item_topk(pre.logits, t.item_start, t.item_count, top_k, **masks).pairs()  # type: ignore[arg-type]
    else:
        rows = beam.num_beams
        if ctx.semantic_trie is not None and mode == DecodeMode.FAST:
            rows = _semantic_fast_beams(ctx, top_k)
        with ctx.admit(cancel, rows) as gen:
            pre = ctx.prefill(prompt, tenant, cancel, user_id, gen)
            t0 = time.perf_counter()
            if ctx.semantic_trie is not None:
                ranked, tokens = _semantic_items(ctx, ctx.semantic_trie, pre, gen, top_k, mode, beam, masks, cancel)
            elif mode == DecodeMode.BEAM_CONSTRAINED:
                ranked, tokens = _constrained_beam_items(ctx, pre, gen, top_k, beam, masks, cancel)
            else:
                ranked, tokens = _beam_items(ctx, pre, gen, beam, masks, cancel)
                ranked = ranked[:top_k]
            decode_s = time.perf_counter() - t0
    items = []
    for index, score in ranked:
        entry = ctx.catalog.by_token(index)
        items.append(ScoredItem(entry.item_id if entry else f"item_{index}", float(score), entry.meta if entry else None))
    total = time.perf_counter() - t_start
    timings = Timings(pre.vision_s, pre.prefill_s, decode_s, total, pre.vision_s + pre.prefill_s, tokens, pre.hit)
    return RecommendResult(tuple(items), timings)


def _beam_items(ctx: TaskContext, pre: Prefilled, gen: Generator, beam: BeamOptions, masks: dict[str, np.ndarray | None],
    cancel: CancelToken | None,
) -> tuple[list[tuple[int, float]], int]:
    """Paper-parity beam search over the whole vocabulary; returns the items the hypotheses spell.

    Each hypothesis, best first, contributes the first item token it contains if that item is
    admissible and not contributed yet, scored by the hypothesis's length-penalised sequence score.
    Possibly fewer items than hypotheses, possibly none."""
    t = ctx.manifest.tokens
    result = _run_beams(ctx, pre, gen, _paper_beam_config(ctx, beam), cancel)
    ok = admissible_items(t.item_count, **masks)  # type: ignore[arg-type]
    return hypothesis_items(result, t.item_start, ok), int(result.steps)


def _paper_beam_config(ctx: TaskContext, beam: BeamOptions) -> BeamSearchConfig:
    """The request's beam options as HF-semantics beam search settings (the paper's DECODE_MODE_BEAM)."""
    t = ctx.manifest.tokens
    return BeamSearchConfig(
        num_beams=beam.num_beams,
        num_return_sequences=beam.num_return_sequences,
        max_new_tokens=beam.max_new_tokens,
        length_penalty=beam.length_penalty,
        early_stopping=beam.early_stopping,
        eos_token_id=t.eos,
        pad_token_id=t.pad,
    )


def _constrained_beam_items(ctx: TaskContext, pre: Prefilled, gen: Generator, top_k: int, beam: BeamOptions, masks: dict[str, np.ndarray | None],
    cancel: CancelToken | None,
) -> tuple[list[tuple[int, float]], int]:
    """Beam search constrained to admissible catalog items: min(top_k, admissible) distinct items.

    The trie spells admissible item ``k`` as the answer prefix (see ``_answer_prefix``), then
    ``item_k``, then EOS, so every hypothesis is one item and all have the same length; scores are
    unpenalised sequence log-probabilities (length_penalty 0). With ``num_beams >= top_k`` beams and
    at least ``top_k`` admissible items, the ``num_beams`` surviving beams after the item step are
    distinct admissible items, so ``top_k`` of them come back.
    """
    if beam.num_beams < top_k:
        raise InvalidRequest(f"beam.num_beams: must be >= top_k ({top_k}) in constrained beam mode, "
                             f"got {beam.num_beams}", field="beam.num_beams")
    t = ctx.manifest.tokens
    ok = admissible_items(t.item_count, **masks)  # type: ignore[arg-type]
    admissible = np.flatnonzero(ok)  # (A,) item indices
    if admissible.size == 0:
        return [], 0
    prefix = ctx.answer_prefix
    trie = TokenTrie.atomic_items(t.item_start, admissible, t.eos, prefix)
    cfg = BeamSearchConfig(
        num_beams=beam.num_beams,
        num_return_sequences=beam.num_beams,
        max_new_tokens=len(prefix) + 2,  # prefix, item, EOS
        length_penalty=0.0,
        eos_token_id=t.eos,
        pad_token_id=t.pad,
    )
    result = _run_beams(ctx, pre, gen, cfg, cancel, allowed_tokens=trie.allowed, ban=False)
    ranked: list[tuple[int, float]] = []
    seen: set[int] = set()
    for seq, score in zip(result.sequences(), result.scores):
        index = trie.lookup(seq)
        # rows that never left the search's -1e9 sentinel (fewer admissible items than beams) repeat items
        if index < 0 or index in seen or not score > _SENTINEL_FLOOR:
            continue
        seen.add(index)
        ranked.append((index, float(score)))
    return ranked[:top_k], int(result.steps)


def _semantic_fast_beams(ctx: TaskContext, top_k: int) -> int:
    """Beams of the constrained search that FAST mode runs for semantic-ID items."""
    return min(max(top_k, DEFAULT_BEAMS), ctx.limits.max_beams)


def _semantic_items(ctx: TaskContext, trie: TokenTrie, pre: Prefilled, gen: Generator, top_k: int, mode: DecodeMode, beam: BeamOptions,
    masks: dict[str, np.ndarray | None], cancel: CancelToken | None,
) -> tuple[list[tuple[int, float]], int]:
    """Semantic-ID items: (row, score) best first, from a beam search over 4-token ids.

    FAST and BEAM_CONSTRAINED run a beam search constrained to the admissible items' spellings
    (answer prefix, ``item_a item_b item_c item_last_d``, EOS: every beam is a valid, admissible id;
    unpenalised log-probabilities), FAST with ``num_beams = max(top_k, 10)`` capped by
    ``limits.max_beams``, BEAM_CONSTRAINED with the request's ``num_beams`` (>= top_k). BEAM is the
    paper's unconstrained search; a hypothesis counts when it spells a whole admissible id exactly.
    With at least as many beams as admissible items the constrained search is exact (every prefix of
    every admissible id survives each step)."""
    t = ctx.manifest.tokens
    ok = admissible_items(ctx.catalog.item_count, **masks)  # type: ignore[arg-type]
    if mode == DecodeMode.BEAM:
        result = _run_beams(ctx, pre, gen, _paper_beam_config(ctx, beam), cancel)
        return _trie_items(result, trie.masked(ok).lookup)[:top_k], int(result.steps)
    if mode == DecodeMode.FAST:
        num_beams = _semantic_fast_beams(ctx, top_k)
    else:
        num_beams = beam.num_beams
        if num_beams < top_k:
            raise InvalidRequest(f"beam.num_beams: must be >= top_k ({top_k}) in constrained beam mode, "
                                 f"got {num_beams}", field="beam.num_beams")
    view = trie.masked(ok)
    if len(view) == 0:
        return [], 0
    cfg = BeamSearchConfig(
        num_beams=num_beams,
        num_return_sequences=num_beams,
        max_new_tokens=trie.max_length + 1,  # prefix, 4 codes, EOS
        length_penalty=0.0,
        eos_token_id=t.eos,
        pad_token_id=t.pad,
    )
    result = _run_beams(ctx, pre, gen, cfg, cancel, allowed_tokens=view.allowed, ban=False)
    return _trie_items(result, view.lookup)[:top_k], int(result.steps)


def _trie_items(result: BeamResult, lookup: Callable[[np.ndarray], int]) -> list[tuple[int, float]]:
    """Distinct items the hypotheses spell (``lookup``: tokens -> item or -1), best first; rows still at
    the search's -1e9 sentinel (fewer admissible items than beams) are skipped."""
    ranked: list[tuple[int, float]] = []
    seen: set[int] = set()
    for seq, score in zip(result.sequences(), result.scores):
        index = lookup(seq)
        if index < 0 or index in seen or not score > _SENTINEL_FLOOR:
            continue
        seen.add(index)
        ranked.append((index, float(score)))
    return ranked


def _run_beams(ctx: TaskContext, pre: Prefilled, gen: Generator, cfg: BeamSearchConfig, cancel: CancelToken | None, *,
    allowed_tokens: AllowedTokensFn | None = None, ban: bool = True,
) -> BeamResult:
    """Beam search from the prefill on ``gen`` (its rows fork from the prompt row at the first step);
    ``ban``: no image, answer or pad token. New tokens are capped by the context left."""
    processor = ctx.ban_special if ban else None
    cfg = replace(cfg, max_new_tokens=max(1, min(cfg.max_new_tokens, gen.room)))
    return beam_search(pre.logits, gen.advance_beams, cfg, logits_processor=processor,
                       allowed_tokens=allowed_tokens, cancel=cancel)
