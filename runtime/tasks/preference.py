"""Rating and explanation: the UniMP preference prompt; the rating distribution from its prefill, then
``rate_r`` and the explanation decoded (greedy, sampled, or beam) and streamed as text pieces."""

from __future__ import annotations

import time
from collections.abc import Iterator

import numpy as np

from runtime.decoder.generator import Generator
from runtime.decoding.beam import BeamSearchConfig, beam_search
from runtime.decoding.detokenize import IncrementalDetokenizer, StrippedPieces
from runtime.decoding.itemslice import rating_distribution
from runtime.decoding.sampling import SamplingConfig, TokenGenerator
from runtime.prompts import EncodedPrompt, preference_prompt
from runtime.tasks.context import Prefilled, TaskContext
from runtime.types import (
    InvalidRequest,
    PreferenceRequest,
    PreferenceResult,
    TextPiece,
    Timings,
    check_cancel,
)


def _preference_prompt(ctx: TaskContext, request: PreferenceRequest) -> EncodedPrompt:
    """The request's sampling options checked, and its rating prompt fitted to the model."""
    history = ctx.resolve(request.history)
    target = ctx.resolve_one(request.target, "target")
    s = request.sampling
    lim = ctx.limits
    if not 0 <= s.temperature <= 5:
        raise InvalidRequest(f"sampling.temperature: must be in 0..5, got {s.temperature}",
                             field="sampling.temperature")
    if not 0 < s.top_p <= 1:
        raise InvalidRequest(f"sampling.top_p: must be in (0, 1], got {s.top_p}", field="sampling.top_p")
    if not 1 <= s.max_new_tokens <= lim.max_new_tokens:
        raise InvalidRequest(f"sampling.max_new_tokens: must be in 1..{lim.max_new_tokens}, got {s.max_new_tokens}",
                             field="sampling.max_new_tokens")
    if not 1 <= s.num_beams <= lim.max_beams:
        raise InvalidRequest(f"sampling.num_beams: must be in 1..{lim.max_beams}, got {s.num_beams}",
                             field="sampling.num_beams")
    ctx.requests += 1
    return ctx.fit(lambda n: preference_prompt(history, target, n), len(history), "target")


def predict_preference(ctx: TaskContext, request: PreferenceRequest) -> PreferenceResult:
    """Rating only: the distribution over ``rate_1..rate_5`` from the prompt's prefill alone.

    No decode slot is taken and no text is generated (``explanation`` "", ``finish_reason`` "",
    ``timings.tokens`` 0); the distribution is the one ``explain`` reports for the same request.
    ``request.sampling`` is validated as for ``explain`` but not used."""
    t_start = time.perf_counter()
    pre = ctx.prefill(_preference_prompt(ctx, request), request.tenant, request.cancel, request.user_id)
    dist = rating_distribution(pre.logits, ctx.manifest.tokens.rates)
    return PreferenceResult(
        rating_distribution=tuple(float(p) for p in dist.probs),
        expected_rating=dist.expected,
        rating=dist.rating,
        timings=Timings(pre.vision_s, pre.prefill_s, 0.0, time.perf_counter() - t_start,
                        pre.vision_s + pre.prefill_s, 0, pre.hit),
    )


def explain(ctx: TaskContext, request: PreferenceRequest) -> Iterator[TextPiece | PreferenceResult]:
    """Rating distribution from the prefill; then ``rate_r`` (the argmax) and the explanation, streamed.

    The explanation is the decoded text without leading or trailing whitespace, and the streamed
    pieces concatenate to exactly that text (greedy, sampled, and beam: one piece, the whole text)."""
    t_start = time.perf_counter()
    prompt = _preference_prompt(ctx, request)
    with ctx.admit(request.cancel, max(1, request.sampling.num_beams)) as gen:
        pre = ctx.prefill(prompt, request.tenant, request.cancel, request.user_id, gen)
        yield from _explain_decode(ctx, request, pre, gen, t_start)


def _explain_decode(ctx: TaskContext, request: PreferenceRequest, pre: Prefilled, gen: Generator,
                    t_start: float) -> Iterator[TextPiece | PreferenceResult]:
    t = ctx.manifest.tokens
    s = request.sampling
    dist = rating_distribution(pre.logits, t.rates)
    detok = IncrementalDetokenizer(ctx.tokenizer, skip_special_tokens=True)
    stripped = StrippedPieces()
    first_token_s = 0.0
    produced = 0
    finish = "eos"
    t0 = time.perf_counter()
    rate_token = np.array([t.rates[dist.rating - 1]], np.int64)
    logits = gen.step(rate_token)
    max_new = max(1, min(s.max_new_tokens, gen.room))
    if s.num_beams > 1:
        cfg = BeamSearchConfig(num_beams=s.num_beams, max_new_tokens=max_new, eos_token_id=t.eos,
                               pad_token_id=t.pad)
        result = beam_search(logits[0], gen.advance_beams, cfg, logits_processor=ctx.ban_special,
                             cancel=request.cancel)
        best = result.sequences()[0]
        finish = "eos" if len(best) and int(best[-1]) == t.eos else "length"
        produced = len(best)
        first_token_s = time.perf_counter() - t_start
        piece = stripped.push(ctx.tokenizer.decode(best.tolist(), skip_special_tokens=True))
        if piece:
            yield TextPiece(piece)
    else:
        sampler = TokenGenerator(
            logits[0], gen.advance,
            SamplingConfig(s.temperature, s.top_p, s.seed, max_new, t.eos),
            cancel=request.cancel, logits_processor=ctx.ban_special,
        )
        while not sampler.is_done():
            token = sampler.step()
            if token is None:
                break
            produced += 1
            piece = stripped.push(detok.push(token))
            if piece:
                if not first_token_s:
                    first_token_s = time.perf_counter() - t_start
                yield TextPiece(piece)
        tail = stripped.push(detok.flush())
        if tail:
            yield TextPiece(tail)
        finish = sampler.finish_reason or "eos"
        if finish == "cancelled":
            check_cancel(request.cancel)
    decode_s = time.perf_counter() - t0
    yield PreferenceResult(
        rating_distribution=tuple(float(p) for p in dist.probs),
        expected_rating=dist.expected,
        rating=dist.rating,
        explanation=stripped.text,
        finish_reason=finish,
        timings=Timings(pre.vision_s, pre.prefill_s, decode_s, time.perf_counter() - t_start,
                        first_token_s or (pre.vision_s + pre.prefill_s), produced, pre.hit),
    )
