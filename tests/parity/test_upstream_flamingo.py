"""Parity of the reference model with the upstream implementation (open-flamingo 2.0.1 + open_clip).

A tiny OpenFlamingo model is built offline with the upstream factory (see ``tests/parity/upstream.py``),
written as one of our checkpoint directories and loaded with ``load_checkpoint``. Then, on a left-padded
batch of interleaved prompts with 0, 1 and 3 images:

- ``Flamingo.forward`` logits equal ``UniMP.full_logits`` within 1e-4 relative
  (``max |ours - upstream| / max |upstream|`` over the non-pad positions, upstream vocabulary columns);
- ``Flamingo.generate`` (beam search) returns the hypotheses, in order and with their scores, that
  ``runtime.decoding.beam.beam_search`` finds driven by the reference model.

Positions. Upstream ``forward`` passes no ``position_ids``, so GPT-NeoX uses ``arange(T)`` for every row,
pads included. With transformers 5.24 ``generate`` does not derive them from the mask either: it only
does so when the model's ``forward`` signature has a ``position_ids`` parameter, and
``FlamingoLMMixin.forward`` takes ``**kwargs``; so generation continues ``arange`` (prompt ``0..T-1``, then
``T, T+1, ...``), for padded rows too. Rotary embeddings only see position differences, so for the
non-pad tokens of a left-padded row ``arange`` and the runtime's ``cumsum(mask) - 1`` give the same
logits up to rounding; the tests use ``arange`` (what upstream does) and check that ``cumsum(mask) - 1``
gives the same logits and the same beams.

Vocabulary. Upstream adds ``<|endofchunk|>``, ``<image>``, ``<PAD>`` to the base tokenizer and resizes
the embeddings to that; the loader adds the same three first, in the same order, then UniMP's tokens.
So ids agree on the upstream vocabulary, which the comparisons are restricted to; the prompts contain
no UniMP token.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from export.checkpoints import LoadedCheckpoint, load_checkpoint
from export.modeling.config import CLIP_MEAN, CLIP_STD
from runtime.decoding.beam import BeamSearchConfig, beam_search
from tests.parity.upstream import VISION, Upstream, build_upstream

pytestmark = pytest.mark.slow

RTOL = 1e-4
PROMPTS = [
    # no image at all
    "User history: Query: comfortable running shoe for trail days. "
    "What is the related ID to the query based on the history?",
    # text before the only image
    "User history: Category Shoes Price 12.50 <image>Brand Kestrel Title Classic Red Loafer<|endofchunk|>"
    "What is the next item recommended to the user?",
    # three images, the first one at the start
    "<image>Category Toys Brand Playvale Title Kite<|endofchunk|><image>Category Books Title Cookbook"
    "<|endofchunk|>Select from: <image>Selection Bold Blue Puzzle<|endofchunk|>Can you select",
]
IMAGES_PER_ROW = [0, 1, 3]
NUM_BEAMS = 3
MAX_NEW_TOKENS = 12


@dataclass
class Batch:
    input_ids: torch.Tensor
    """int64 (B, T), left-padded with ``<PAD>``."""
    attention_mask: torch.Tensor
    pixels: list[torch.Tensor]
    """Per row (M_b, 3, S, S): the row's images, preprocessed once and fed to both models."""

    def vision_x(self) -> torch.Tensor:
        """Upstream's (B, T_img, 1, 3, S, S); rows with fewer images are padded with blank ones no token selects."""
        most = max(p.shape[0] for p in self.pixels)
        s = VISION.image_size
        out = torch.zeros(len(self.pixels), most, 1, 3, s, s)
        for b, p in enumerate(self.pixels):
            out[b, : p.shape[0], 0] = p
        return out


@dataclass
class Setup:
    up: Upstream
    ours: LoadedCheckpoint
    batch: Batch

    @property
    def vocab(self) -> int:
        return self.up.vocab_size

    def latents(self, ours: LoadedCheckpoint | None = None) -> list[torch.Tensor]:
        model = (ours or self.ours).model
        width, n = model.cfg.vision.width, model.num_latents
        with torch.no_grad():
            return [model.encode_images(p) if p.shape[0] else torch.zeros(0, n, width) for p in self.batch.pixels]


def preprocess(path: Path) -> torch.Tensor:
    """UniMP's preprocessing: bicubic stretch to S x S (no crop), [0, 1], CLIP mean/std."""
    s = VISION.image_size
    image = Image.open(path).convert("RGB").resize((s, s), Image.Resampling.BICUBIC)
    rgb = np.asarray(image, dtype=np.float32) / np.float32(255.0)
    x = (rgb - np.asarray(CLIP_MEAN, dtype=np.float32)) / np.asarray(CLIP_STD, dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1), dtype=np.float32))


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Setup:
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    up = build_upstream(tmp_path_factory.mktemp("upstream"))
    ours = load_checkpoint(up.checkpoint)
    enc = up.tokenizer(PROMPTS, padding="longest", return_tensors="pt")
    images = sorted((up.checkpoint / "catalog" / "images").glob("*.png"))
    pixels, used = [], 0
    for n in IMAGES_PER_ROW:
        pixels.append(torch.stack([preprocess(p) for p in images[used : used + n]]) if n else torch.zeros(0, 3, 224, 224))
        used += n
    return Setup(up, ours, Batch(enc["input_ids"], enc["attention_mask"], pixels))


def upstream_logits(setup: Setup) -> torch.Tensor:
    b = setup.batch
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # Flamingo.forward passes the renamed past_key_values
        return setup.up.flamingo(b.vision_x(), b.input_ids, attention_mask=b.attention_mask).logits


def our_logits(setup: Setup, positions: str = "arange", ours: LoadedCheckpoint | None = None) -> torch.Tensor:
    b = setup.batch
    mask = b.attention_mask
    if positions == "arange":
        position_ids = torch.arange(mask.shape[1]).expand_as(mask)
    else:
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    model = (ours or setup.ours).model
    with torch.no_grad():
        logits = model.full_logits(b.input_ids, mask, setup.latents(ours), setup.ours.vocab.image, position_ids)
    return logits[..., : setup.vocab]


def relative_error(ours: torch.Tensor, upstream: torch.Tensor, mask: torch.Tensor) -> float:
    keep = mask.bool()
    return float((ours[keep] - upstream[keep]).abs().max() / upstream[keep].abs().max())


# -- checkpoint and vocabulary ----------------------------------------------------------------------------


def test_checkpoint_loads_without_missing_or_unexpected_keys(setup: Setup) -> None:
    report = setup.ours.report
    assert report.missing == []
    assert report.unexpected == []
    ignored = {(key, Path(path).name) for key, path in report.ignored}
    vision_pt = torch.load(setup.up.checkpoint / "vision.pt", weights_only=True)
    text_tower = {(k, "vision.pt") for k in vision_pt if not k.startswith("visual.")}
    assert text_tower, "vision.pt should be a whole CLIP"
    # a whole CLIP's text tower and the CLIP projection (OpenFlamingo uses the patch tokens) are all that is left out
    assert ignored == text_tower | {("visual.proj", "vision.pt"), ("vision_encoder.proj", "checkpoint.pt")}


def test_vocabulary_lines_up_with_upstream(setup: Setup) -> None:
    up, vocab, tok = setup.up, setup.ours.vocab, setup.up.tokenizer
    assert setup.vocab == up.base_vocab + 3 == len(tok)
    assert vocab.endofchunk == up.flamingo.eoc_token_id == tok.convert_tokens_to_ids("<|endofchunk|>") == up.base_vocab
    assert vocab.image == up.flamingo.media_token_id == up.base_vocab + 1
    assert vocab.pad == tok.pad_token_id == up.base_vocab + 2
    assert vocab.eos == tok.eos_token_id == 0
    # every UniMP token comes after the upstream vocabulary
    assert vocab.size > setup.vocab
    assert min(vocab.answer, vocab.item_start, vocab.image_codes_start, *vocab.rates, *vocab.selections) == setup.vocab
    # the same token ids from both tokenizers, and none beyond the upstream vocabulary
    b = setup.batch
    for text, row, mask in zip(PROMPTS, b.input_ids, b.attention_mask):
        assert setup.ours.tokenizer.encode(text).ids == row[mask.bool()].tolist()
    assert int(b.input_ids.max()) < setup.vocab
    assert [int((row == vocab.image).sum()) for row in b.input_ids] == IMAGES_PER_ROW
    assert bool((b.attention_mask[:, 0] == 0).any()), "the batch should be left-padded"
    # the upstream embedding rows, resized ones included, were loaded as they are
    lm = setup.ours.model.lm
    flamingo_lm = up.flamingo.lang_encoder
    assert torch.equal(lm.gpt_neox.embed_in.weight[: setup.vocab], flamingo_lm.get_input_embeddings().weight)
    assert torch.equal(lm.embed_out.weight[: setup.vocab], flamingo_lm.get_output_embeddings().weight)


# -- logits -----------------------------------------------------------------------------------------------


def test_forward_logits_match_upstream(setup: Setup) -> None:
    upstream = upstream_logits(setup)
    mask = setup.batch.attention_mask
    assert upstream.shape == (*mask.shape, setup.vocab)
    ours = our_logits(setup, "arange")
    for row in range(mask.shape[0]):
        err = relative_error(ours[row], upstream[row], mask[row])
        assert err <= RTOL, f"row {row} ({IMAGES_PER_ROW[row]} images): relative error {err:.2e}"
    # the runtime's padding-aware positions give the same logits (rotary embeddings are shift-invariant)
    assert relative_error(our_logits(setup, "cumsum"), upstream, mask) <= RTOL


def test_images_change_the_logits(setup: Setup) -> None:
    """The comparison above is sensitive to the vision path: other images give other logits."""
    b = setup.batch
    swapped = Setup(setup.up, setup.ours, Batch(b.input_ids, b.attention_mask, [p.flip(0).roll(1, -1) for p in b.pixels]))
    ours, changed = our_logits(setup), our_logits(swapped)
    mask = b.attention_mask
    assert relative_error(changed[0], ours[0], mask[0]) == 0.0  # no image, no change
    for row in (1, 2):
        assert relative_error(changed[row], ours[row], mask[row]) > 10 * RTOL


@pytest.mark.parametrize("field", ["ln_post_on_tokens", "quick_gelu"])
def test_vision_flags_are_load_bearing(setup: Setup, field: str, tmp_path: Path) -> None:
    """Flipping a vision flag in unimp.json breaks parity: the flags in the checkpoint are the right ones."""
    copy = tmp_path / "checkpoint"
    shutil.copytree(setup.up.checkpoint, copy)
    meta = json.loads((copy / "unimp.json").read_text())
    meta["vision"][field] = not meta["vision"][field]
    (copy / "unimp.json").write_text(json.dumps(meta))
    flipped = load_checkpoint(copy)
    mask, upstream = setup.batch.attention_mask, upstream_logits(setup)
    for row in (1, 2):
        assert relative_error(our_logits(setup, ours=flipped)[row], upstream[row], mask[row]) > 10 * RTOL


# -- generation -------------------------------------------------------------------------------------------


def upstream_generate(setup: Setup) -> tuple[torch.Tensor, torch.Tensor]:
    """Flamingo.generate with beam search: (generated tokens (B*R, L), sequences_scores (B*R,))."""
    b = setup.batch
    with torch.no_grad():
        out = setup.up.flamingo.generate(
            b.vision_x(),
            b.input_ids,
            attention_mask=b.attention_mask,
            num_beams=NUM_BEAMS,
            num_return_sequences=NUM_BEAMS,
            max_new_tokens=MAX_NEW_TOKENS,
            length_penalty=1.0,
            early_stopping=False,
            do_sample=False,
            bad_words_ids=[[setup.ours.vocab.image]],
            return_dict_in_generate=True,
            output_scores=True,
        )
    return out.sequences[:, b.input_ids.shape[1] :], out.sequences_scores


def our_generate(setup: Setup, row: int, positions: str) -> Any:
    """runtime beam search on one prompt row, each step a full recompute of the reference model."""
    b = setup.batch
    prompt, prompt_mask = b.input_ids[row], b.attention_mask[row]
    latents = setup.latents()[row]
    vocab, image = setup.vocab, setup.ours.vocab.image
    model = setup.ours.model

    def logits_for(generated: list[list[int]]) -> np.ndarray:
        n, t = len(generated), len(generated[0])
        ids = torch.cat([prompt.expand(n, -1), torch.tensor(generated, dtype=torch.long).reshape(n, t)], dim=1)
        mask = torch.cat([prompt_mask.expand(n, -1), torch.ones(n, t, dtype=torch.long)], dim=1)
        if positions == "arange":
            position_ids = torch.arange(ids.shape[1]).expand_as(ids)
        else:
            position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            logits = model.full_logits(ids, mask, [latents] * n, image, position_ids)
        return logits[:, -1, :vocab].numpy()

    rows: list[list[int]] = [[]]

    def advance(parents: np.ndarray, tokens: np.ndarray) -> np.ndarray:
        nonlocal rows
        rows = [[*rows[int(p)], int(t)] for p, t in zip(parents, tokens)]
        return logits_for(rows)

    def no_image(input_ids: np.ndarray, scores: np.ndarray) -> np.ndarray:  # upstream's bad_words_ids
        scores = scores.copy()
        scores[:, image] = -np.inf
        return scores

    config = BeamSearchConfig(
        num_beams=NUM_BEAMS,
        num_return_sequences=NUM_BEAMS,
        max_new_tokens=MAX_NEW_TOKENS,
        length_penalty=1.0,
        early_stopping=False,
        eos_token_id=setup.up.flamingo.eoc_token_id,
    )
    return beam_search(logits_for([[]])[0], advance, config, logits_processor=no_image)


def test_generate_matches_runtime_beam_search(setup: Setup) -> None:
    tokens, scores = upstream_generate(setup)
    eoc = setup.up.flamingo.eoc_token_id
    ended = {True: 0, False: 0}
    for row in range(len(PROMPTS)):
        for positions in ("arange", "cumsum"):
            result = our_generate(setup, row, positions)
            for r, ours in enumerate(result.sequences()):
                theirs = tokens[row * NUM_BEAMS + r]
                n = len(ours)
                where = f"row {row} hypothesis {r} ({positions} positions)"
                assert theirs[:n].tolist() == ours.tolist(), where
                assert bool((theirs[n:] == eoc).all()), f"{where}: upstream goes on after {n} tokens"
                assert abs(float(scores[row * NUM_BEAMS + r]) - float(result.scores[r])) <= RTOL * max(
                    1.0, abs(float(result.scores[r]))
                ), where
                ended[int(ours[-1]) == eoc] += 1
    # hypotheses finished by EOS and by the length limit both occurred
    assert ended[True] > 0 and ended[False] > 0, ended
