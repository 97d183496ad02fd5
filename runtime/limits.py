"""``Limits``: the one definition of every request bound, shared by the engine and the server.

The engine enforces the decoding bounds (``max_top_k``, ``max_beams``, ``max_new_tokens``) on every
request it is given; the server's ``[limits]`` section (``unimp serve --limits-*``) is this dataclass,
and ``runtime.server.convert`` enforces every field on the wire before the engine sees a request. The
proto comments and the README's limits table quote these defaults (a test compares them).

Beam semantics: a beam-mode Recommend/Search returns one item per finished beam, so its ``top_k``
may not exceed ``max_beams`` (rejected naming ``options.top_k``); fast mode ranks the item logits of
one forward pass and takes ``top_k`` up to ``max_top_k``. ``num_beams`` defaults to
``max(top_k, min(10, max_beams))``.
"""

from __future__ import annotations

from dataclasses import dataclass, field


def _help(text: str) -> dict[str, str]:
    """Field metadata carrying the field's documentation (shown by ``unimp serve --help``)."""
    return {"help": text}


DEFAULT_BEAMS = 10
"""num_beams when a request leaves it 0 (raised to top_k, capped by max_beams)."""


@dataclass
class Limits:
    """Bounds on requests; anything beyond them is INVALID_ARGUMENT (RESOURCE_EXHAUSTED for message size)."""

    max_message_bytes: int = field(
        default=16 * 1024 * 1024, metadata=_help("largest request or response message in bytes")
    )
    max_image_bytes: int = field(
        default=8 * 1024 * 1024, metadata=_help("largest encoded image in a request, in bytes")
    )
    max_image_pixels: int = field(
        default=4096 * 4096,
        metadata=_help(
            "largest image in pixels (width x height), checked from the header before decoding; "
            "also set as Pillow's Image.MAX_IMAGE_PIXELS for the whole process"
        ),
    )
    max_history_items: int = field(
        default=64, metadata=_help("most history items per request (stored and inline together)")
    )
    max_candidates: int = field(
        default=5, metadata=_help("most SelectItems candidates (the model has selection tokens s_0..s_4)")
    )
    max_top_k: int = field(
        default=100, metadata=_help("largest top_k of Recommend and Search in DECODE_MODE_FAST")
    )
    max_beams: int = field(
        default=16,
        metadata=_help(
            "most beams of beam search (options.beam.num_beams, sampling.num_beams); also the largest "
            "top_k in the beam modes, which return one item per beam"
        ),
    )
    max_new_tokens: int = field(
        default=512, metadata=_help("largest max_new_tokens of sampling and beam options")
    )
    max_text_chars: int = field(
        default=2048, metadata=_help("longest query, attribute, explanation or prompt text, in characters")
    )
    max_id_chars: int = field(default=128, metadata=_help("longest item_id or user_id, in characters"))
    max_filter_items: int = field(
        default=10000, metadata=_help("most allow_item_ids / categories in a filter")
    )
    max_image_side: int = field(
        default=1024, metadata=_help("largest width or height of a generated image, in pixels")
    )
    max_image_steps: int = field(default=150, metadata=_help("most denoising steps of GenerateImage"))
    max_page_size: int = field(default=1000, metadata=_help("largest ListItems page_size"))

    def beam_top_k_limit(self) -> int:
        """Largest top_k in beam mode: each returned item comes from its own beam."""
        return min(self.max_top_k, self.max_beams)

    def default_num_beams(self, top_k: int) -> int:
        """num_beams when a request leaves it 0: ``max(top_k, min(10, max_beams))``."""
        return max(top_k, min(DEFAULT_BEAMS, self.max_beams))
