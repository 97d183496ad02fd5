"""Personalised image generation, two paths (``ImageModel``):

* VQGAN (the paper's): the history's images as VQGAN codes in the paper's prompt; the LLM writes exactly
  grid * grid (256) ``img_k,`` tokens, constrained to the image-code slice at every step (greedy, or
  sampled with temperature / top_p / seed); the VQGAN decoder turns them into a 256x256 PNG. Progress
  comes once per code row (16 rows).
* diffusion: the LLM writes a short prompt from the user's history, diffusion renders it.

With ``ImageModel.UNSPECIFIED`` the VQGAN path is taken when the artifacts have its graphs, else diffusion.
"""

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
from runtime.prompts import (
    IMAGE_CODES_HISTORY,
    Prompt,
    ResolvedItem,
    encode,
    image_generation_prompt,
    render_meta,
    sanitize,
)
from runtime.tasks.context import TaskContext
from runtime.types import CancelToken, ImageModel, InvalidRequest, Unavailable, check_cancel

if TYPE_CHECKING:
    from runtime.vqgan import VQGANCodec

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


def write_prompt(rt: TaskContext, history: tuple[ResolvedItem, ...], query: str, cancel: CancelToken | None) -> str:
    """Greedy-decode a short description with the LLM and combine it with the query and the history's style."""
    text = personalised_prompt_text(history, query)
    images = tuple(i for i in history if i.has_image)  # one per <image> in the text, in order
    prompt = Prompt(text, images, "", (), len(images))
    detok = IncrementalDetokenizer(rt.tokenizer, skip_special_tokens=True)
    with rt.admit(cancel) as gen:
        pre = rt.prefill(prompt, tenant="", cancel=cancel, generator=gen)
        config = SamplingConfig(max_new_tokens=max(1, min(PROMPT_TOKENS, gen.room)), eos_token_id=rt.manifest.tokens.eos)
        for token in TokenGenerator(pre.logits, gen.advance, config, cancel=cancel, logits_processor=rt.ban_special):
            detok.push(token)
    written = sanitize(detok.text + detok.flush())
    return ", ".join(p for p in (query, style_summary(history), written) if p)


def generate_image(rt: TaskContext, pipeline: DiffusionPipeline, request: ImageRequest) -> Iterator[ImageProgress | ImageResult]:
    scheduler = require_image_scheduler(request.scheduler)
    query = sanitize(request.query)
    if not query:
        raise InvalidRequest("query must not be empty", field="query")
    cancel = request.cancel if isinstance(request.cancel, CancelToken) else None
    t0 = time.perf_counter()
    history = rt.resolve(tuple(request.history)) if request.history else ()
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


# -- VQGAN codes ----------------------------------------------------------------------------------


def choose_image_model(requested: object, has_vqgan: bool, has_diffusion: bool) -> ImageModel:
    """The path a request takes; Unavailable (field ``image_model``) when its graphs are missing."""
    if not isinstance(requested, ImageModel):
        choices = ", ".join(m.value for m in ImageModel)
        raise InvalidRequest(f"image_model: must be an ImageModel ({choices}), got {requested!r}", field="image_model")
    if requested == ImageModel.VQGAN and not has_vqgan:
        raise Unavailable("image_model: these artifacts have no VQGAN graphs (vqgan_encoder, vqgan_decoder); "
                          "export with --vqgan DIR to enable the VQGAN path", field="image_model")
    if requested == ImageModel.DIFFUSION and not has_diffusion:
        raise Unavailable("image_model: these artifacts have no diffusion graphs; export with --diffusion DIR "
                          "to enable the diffusion path", field="image_model")
    if requested == ImageModel.UNSPECIFIED:
        if has_vqgan:
            return ImageModel.VQGAN
        if has_diffusion:
            return ImageModel.DIFFUSION
        raise Unavailable("image_model: these artifacts have no image generation graphs (neither VQGAN nor "
                          "diffusion); export with --vqgan DIR or --diffusion DIR to enable GenerateImage",
                          field="image_model")
    return requested


def code_slice_mask(start: int, count: int):  # type: ignore[no-untyped-def]
    """A logits processor leaving only ids start..start+count-1 (the ``img_k,`` tokens) possible."""

    def mask(ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
        out = np.full_like(scores, -np.inf)
        out[..., start : start + count] = scores[..., start : start + count]
        return out

    return mask


def history_codes(rt: TaskContext, codec: VQGANCodec, items: tuple[ResolvedItem, ...]) -> list[list[int]]:
    """Codes of each item's image: the catalog's from the codes cache, inline ones encoded now."""
    out: list[list[int]] = [[] for _ in items]
    catalog = [k for k, i in enumerate(items) if not i.image]
    inline = [k for k, i in enumerate(items) if i.image]
    if catalog:
        assert rt.codes is not None
        for k, row in zip(catalog, rt.codes.get([items[k].item_id for k in catalog])):
            out[k] = [int(c) for c in row]
    if inline:
        for k, row in zip(inline, codec.encode_images([items[k].image for k in inline])):
            out[k] = [int(c) for c in row]
    return out


def check_code_sampling(temperature: float, top_p: float) -> None:
    if not 0 <= temperature <= 5:
        raise InvalidRequest(f"temperature: must be in 0..5, got {temperature}", field="temperature")
    if not 0 < top_p <= 1:
        raise InvalidRequest(f"top_p: must be in (0, 1], got {top_p}", field="top_p")


def generate_image_codes(rt: TaskContext, codec: VQGANCodec, request: ImageRequest) -> Iterator[ImageProgress | ImageResult]:
    """The VQGAN path (see the module docstring): progress per code row, then the PNG."""
    query = sanitize(request.query)
    if not query:
        raise InvalidRequest("query: must not be empty", field="query")
    check_code_sampling(request.temperature, request.top_p)
    cancel = request.cancel if isinstance(request.cancel, CancelToken) else None
    t_start = time.perf_counter()
    history = rt.resolve(tuple(request.history)) if request.history else ()
    items = tuple(i for i in history if i.has_image)[-IMAGE_CODES_HISTORY:]
    codes_of = history_codes(rt, codec, items)
    t = rt.manifest.tokens
    settings = codec.settings
    total = settings.num_codes
    room = rt.max_context - total
    # like the text tasks: the oldest history chunks go first until the prompt and its codes fit
    while True:
        enc = encode(image_generation_prompt(items, codes_of, query), rt.tokenizer, t.endofchunk, t.image)
        length = len(enc.ids)
        if length <= room or not items:
            break
        items, codes_of = items[1:], codes_of[1:]
    if length > room:
        raise InvalidRequest(f"query: the prompt is {length} tokens even without history and {total} image codes "
                             f"follow it; the context is {rt.max_context} tokens", field="query")
    if t.image_codes_start < 0:
        raise Unavailable("image_model: the vocabulary has no image-code tokens (img_0,..)", field="image_model")
    prompt_s = time.perf_counter() - t_start
    config = SamplingConfig(request.temperature, request.top_p, request.seed, max_new_tokens=total, eos_token_id=None)
    mask = code_slice_mask(t.image_codes_start, settings.n_embed)
    with rt.admit(cancel) as decoder:
        pre = rt.prefill(enc, tenant="", cancel=cancel, generator=decoder)
        t0 = time.perf_counter()
        gen = TokenGenerator(pre.logits, decoder.advance, config, cancel=cancel, logits_processor=mask)
        for produced, _ in enumerate(gen, start=1):
            if produced % settings.grid == 0:
                yield ImageProgress(produced // settings.grid, settings.grid)
        if gen.finish_reason == "cancelled":
            check_cancel(cancel)
    codes_s = time.perf_counter() - t0
    codes = np.asarray(gen.tokens, np.int64) - t.image_codes_start
    if codes.shape != (total,) or codes.min() < 0 or codes.max() >= settings.n_embed:
        raise RuntimeError(f"generated {codes.shape[0]} codes, expected {total} in 0..{settings.n_embed - 1}")
    t1 = time.perf_counter()
    pixels = codec.decode(codes[None])[0]
    decode_s = time.perf_counter() - t1
    from runtime.vqgan import to_png

    png = to_png(pixels)
    timings = {"prompt": prompt_s, "vision": pre.vision_s, "prefill": pre.prefill_s, "codes": codes_s,
               "vqgan_decoder": decode_s, "total": time.perf_counter() - t_start}
    yield ImageResult(png, enc.prompt.text, int(pixels.shape[2]), int(pixels.shape[1]), timings,
                      codes=tuple(int(c) for c in codes))
