"""Personalised image generation: the LLM writes a short prompt from the user's history, diffusion renders it."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np

from runtime.api import ImageProgress, ImageRequest, ImageResult, require_image_scheduler
from runtime.decoding.detokenize import IncrementalDetokenizer
from runtime.decoding.sampling import SamplingConfig, TokenGenerator
from runtime.diffusion.pipeline import DiffusionPipeline, GenerationParams, GenerationResult, StepProgress
from runtime.prompts import Prompt, ResolvedItem, render_meta, sanitize
from runtime.types import CancelToken, InvalidRequest

if TYPE_CHECKING:
    from runtime.engine import Runtime

PROMPT_TOKENS = 16
IMAGE_QUESTION = "Query: {query} What is the image description for the query based on the history? <answer>"


def personalised_prompt_text(history: tuple[ResolvedItem, ...], query: str) -> str:
    """A UniMP-style task prompt over the history items' attributes (the paper's image-generation layout)."""
    chunks = "".join(f"{i.image_tag}{render_meta(i.meta)} <|endofchunk|> " for i in history)
    return chunks + IMAGE_QUESTION.format(query=query)


def style_summary(history: tuple[ResolvedItem, ...]) -> str:
    """The shopper's dominant category and brands, as plain prompt words."""
    categories = Counter(i.meta.category for i in history if i.meta.category)
    brands = Counter(i.meta.brand for i in history if i.meta.brand)
    parts = []
    if categories:
        parts.append(f"{categories.most_common(1)[0][0].lower()} style")
    if brands:
        parts.append("like " + " and ".join(b for b, _ in brands.most_common(2)))
    return ", ".join(parts)


def write_prompt(rt: Runtime, history: tuple[ResolvedItem, ...], query: str, cancel: CancelToken | None) -> str:
    """Greedy-decode a short description with the LLM and combine it with the query and the history's style."""
    text = personalised_prompt_text(history, query)
    images = tuple(i for i in history if i.has_image)  # one per <image> in the text, in order
    prompt = Prompt(text, images, "", (), len(images))
    pre = rt._prefill(prompt, tenant="", cancel=cancel)
    detok = IncrementalDetokenizer(rt.tokenizer, skip_special_tokens=True)
    with rt.scheduler.admit(cancel) as slot:
        holder = {"state": pre.state}

        def advance(tokens: np.ndarray) -> np.ndarray:
            out, holder["state"] = slot.step(holder["state"], tokens, cancel)
            return out[0]

        gen = TokenGenerator(pre.logits, advance, SamplingConfig(max_new_tokens=PROMPT_TOKENS,
                                                                 eos_token_id=rt.manifest.tokens.eos),
                             cancel=cancel, logits_processor=rt._ban)
        for token in gen:
            detok.push(token)
    written = sanitize(detok.text + detok.flush())
    return ", ".join(p for p in (query, style_summary(history), written) if p)


def generate_image(rt: Runtime, pipeline: DiffusionPipeline, request: ImageRequest) -> Iterator[ImageProgress | ImageResult]:
    scheduler = require_image_scheduler(request.scheduler)
    query = sanitize(request.query)
    if not query:
        raise InvalidRequest("query must not be empty", field="query")
    cancel = request.cancel if isinstance(request.cancel, CancelToken) else None
    t0 = time.perf_counter()
    history = rt._resolve(tuple(request.history)) if request.history else ()
    prompt = write_prompt(rt, history, query, cancel) if history else query
    prompt_s = time.perf_counter() - t0
    params = GenerationParams(
        prompt=prompt,
        negative_prompt=request.negative_prompt,
        width=request.width or None,
        height=request.height or None,
        steps=request.steps,
        guidance_scale=request.guidance_scale,
        seed=request.seed,
        scheduler=scheduler,
    )
    for event in pipeline.stream(params, cancel=cancel):
        if isinstance(event, StepProgress):
            yield ImageProgress(event.step, event.total)
        elif isinstance(event, GenerationResult):
            timings = {"prompt": prompt_s, **event.timings.as_dict()}
            h, w = event.images.shape[1:3]
            yield ImageResult(event.png(0), prompt, int(w), int(h), timings)
