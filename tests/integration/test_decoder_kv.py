"""Decoder contract: ONNX decoding with the KV cache equals full recompute in PyTorch, token for token.

The runner tests use the concat layout (DecoderRunner); the inplace layout's core is held to the same
full-recompute reference at the end (its layouts are also compared in test_kv_layouts.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from runtime.backends import BackendConfig, open_session
from runtime.decoder.kv_cache import RowState
from runtime.decoder.runner import DecoderRunner, PrefillRow, prefix_entry
from runtime.manifest import load_manifest

STEPS = 32


@pytest.fixture(scope="module")
def runner(tiny_concat_artifacts: Path) -> DecoderRunner:
    m = load_manifest(tiny_concat_artifacts)
    assert m.decoder.kv_layout == "concat"
    cfg = BackendConfig(intra_op_threads=1)
    return DecoderRunner(open_session(tiny_concat_artifacts / m.graphs["decoder"].file, cfg),
                         open_session(tiny_concat_artifacts / m.graphs["media_kv"].file, cfg), m)


def _latents(ref, n_images: int, seed: int) -> torch.Tensor:  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(n_images, 3, 224, 224, generator=g)
    with torch.no_grad():
        return ref.model.encode_images(pixels) if n_images else torch.zeros(0, 64, ref.model.cfg.vision.width)


def _prompt(ref, n_images: int, length: int, seed: int, text_first: int = 0) -> np.ndarray:  # type: ignore[no-untyped-def]
    """Random text with ``n_images`` <image> tokens; ``text_first`` tokens come before the first image."""
    rng = np.random.default_rng(seed)
    v = ref.vocab
    ids = rng.integers(1, v.pad, size=length)  # ordinary BPE tokens only
    slots = np.linspace(text_first, length - 2, n_images).astype(int) if n_images else []
    for s in slots:
        ids[s] = v.image
    return ids.astype(np.int64)


def _ban(logits: np.ndarray, image_id: int) -> np.ndarray:
    logits = logits.copy()
    logits[..., image_id] = -np.inf  # no generated token may open a new image (there is none to attend to)
    return logits


def _reference_greedy(ref, prompts: list[np.ndarray], latents: list[torch.Tensor]) -> np.ndarray:  # type: ignore[no-untyped-def]
    """Full recompute every step on the left-padded batch (no cache)."""
    b = len(prompts)
    t = max(len(p) for p in prompts)
    ids = torch.full((b, t), ref.vocab.pad, dtype=torch.long)
    mask = torch.zeros(b, t, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, t - len(p):] = torch.from_numpy(p)
        mask[i, t - len(p):] = 1
    out = []
    with torch.no_grad():
        for _ in range(STEPS):
            logits = ref.model.full_logits(ids, mask, latents, ref.vocab.image)[:, -1].numpy()
            nxt = _ban(logits, ref.vocab.image).argmax(-1)
            out.append(nxt)
            ids = torch.cat([ids, torch.from_numpy(nxt)[:, None]], dim=1)
            mask = torch.cat([mask, torch.ones(b, 1, dtype=torch.long)], dim=1)
    return np.stack(out, axis=1)


def _cached_greedy(runner: DecoderRunner, prompts: list[np.ndarray], latents: list[torch.Tensor]) -> np.ndarray:
    rows = [PrefillRow(p, runner.media_kv(lat.numpy())) for p, lat in zip(prompts, latents)]
    logits, state = runner.prefill(rows)
    out = []
    for _ in range(STEPS):
        nxt = _ban(logits, runner.image_id).argmax(-1)
        out.append(nxt)
        (logits,), (state,) = runner.step([state], [nxt])
    return np.stack(out, axis=1)


@pytest.mark.parametrize("batch", [1, 3])
def test_greedy_kv_cache_equals_full_recompute(runner: DecoderRunner, tiny_reference, batch: int) -> None:  # type: ignore[no-untyped-def]
    specs = [(2, 21, 3), (0, 9, 0), (3, 30, 0)][:batch]  # (images, length, text before the first image)
    prompts = [_prompt(tiny_reference, n, length, seed=i, text_first=tf) for i, (n, length, tf) in enumerate(specs)]
    latents = [_latents(tiny_reference, n, seed=10 + i) for i, (n, _, _) in enumerate(specs)]
    expected = _reference_greedy(tiny_reference, prompts, latents)
    got = _cached_greedy(runner, prompts, latents)
    np.testing.assert_array_equal(got, expected)


def test_prefill_logits_match_reference(runner: DecoderRunner, tiny_reference) -> None:  # type: ignore[no-untyped-def]
    prompts = [_prompt(tiny_reference, 2, 17, seed=5, text_first=4), _prompt(tiny_reference, 1, 8, seed=6)]
    latents = [_latents(tiny_reference, 2, 1), _latents(tiny_reference, 1, 2)]
    logits, _ = runner.prefill([PrefillRow(p, runner.media_kv(lat.numpy())) for p, lat in zip(prompts, latents)])
    for i, (p, lat) in enumerate(zip(prompts, latents)):
        with torch.no_grad():
            ref = tiny_reference.model.full_logits(torch.from_numpy(p)[None], torch.ones(1, len(p), dtype=torch.long),
                                                   [lat], tiny_reference.vocab.image)[0, -1].numpy()
        np.testing.assert_allclose(logits[i], ref, atol=1e-4, rtol=1e-3)


def test_text_before_first_image_ignores_media(runner: DecoderRunner, tiny_reference) -> None:  # type: ignore[no-untyped-def]
    """Tokens before the first <image> get a zero cross-attention output: their logits do not depend on images."""
    p = _prompt(tiny_reference, 1, 12, seed=3, text_first=11)  # the only image is the last-but-one token
    prefix = p[:10]
    a, _ = runner.prefill([PrefillRow(prefix, runner.media_kv(_latents(tiny_reference, 1, 1).numpy()))])
    b, _ = runner.prefill([PrefillRow(prefix, runner.media_kv(_latents(tiny_reference, 1, 2).numpy()))])
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-6)


def test_decode_attends_to_last_image(runner: DecoderRunner, tiny_reference) -> None:  # type: ignore[no-untyped-def]
    """After the prompt, generated tokens see the last image: changing an earlier image's latents only
    changes decode logits through the prompt KV, while changing the last image changes the step directly."""
    p = _prompt(tiny_reference, 2, 14, seed=4)
    lat = _latents(tiny_reference, 2, 7)
    logits, state = runner.prefill([PrefillRow(p, runner.media_kv(lat.numpy()))])
    nxt = logits.argmax(-1)
    (step_logits,), _ = runner.step([state], [nxt])
    swapped = RowState(state.keys, state.values, state.mask, state.next_pos,
                       runner.media_kv(_latents(tiny_reference, 1, 99).numpy()), state.has_image)
    (other,), _ = runner.step([swapped], [nxt])
    assert np.abs(step_logits - other).max() > 1e-4  # the last image's memory feeds the decode step
    with torch.no_grad():
        ids = torch.from_numpy(np.append(p, nxt))[None]
        ref = tiny_reference.model.full_logits(ids, torch.ones_like(ids), [lat], tiny_reference.vocab.image)[0, -1]
    np.testing.assert_allclose(step_logits[0], ref.numpy(), atol=1e-4, rtol=1e-3)


def test_prefix_reuse_equals_full_prefill(runner: DecoderRunner, tiny_reference) -> None:  # type: ignore[no-untyped-def]
    p = _prompt(tiny_reference, 3, 26, seed=8)
    lat = _latents(tiny_reference, 3, 3)
    mem = runner.media_kv(lat.numpy())
    full, state = runner.prefill([PrefillRow(p, mem)])
    cut = 15
    images_in_prefix = int((p[:cut] == runner.image_id).sum())
    entry = prefix_entry(state, 0, cut, images_in_prefix)
    reused, reused_state = runner.prefill_with_prefix(entry, p[cut:], mem)
    np.testing.assert_allclose(reused, full, atol=1e-4, rtol=1e-3)
    assert reused_state.length == state.length


def test_step_batches_states_with_different_lengths(runner: DecoderRunner, tiny_reference) -> None:  # type: ignore[no-untyped-def]
    """One decode call over two independent requests equals two separate calls."""
    a = _prompt(tiny_reference, 1, 7, seed=11)
    b = _prompt(tiny_reference, 2, 19, seed=12)
    la, sa = runner.prefill([PrefillRow(a, runner.media_kv(_latents(tiny_reference, 1, 4).numpy()))])
    lb, sb = runner.prefill([PrefillRow(b, runner.media_kv(_latents(tiny_reference, 2, 5).numpy()))])
    ta, tb = la.argmax(-1), lb.argmax(-1)
    (sep_a,), _ = runner.step([sa], [ta])
    (sep_b,), _ = runner.step([sb], [tb])
    (joint_a, joint_b), states = runner.step([sa, sb], [ta, tb])
    np.testing.assert_allclose(joint_a, sep_a, atol=1e-4, rtol=1e-3)
    np.testing.assert_allclose(joint_b, sep_b, atol=1e-4, rtol=1e-3)
    assert states[0].length == sa.length + 1 and states[1].length == sb.length + 1


@pytest.mark.parametrize("batch", [1, 3])
def test_inplace_greedy_equals_full_recompute(tiny_artifacts: Path, tiny_reference, batch: int) -> None:  # type: ignore[no-untyped-def]
    """The inplace core: each prompt prefilled into its own pool row (different lengths, 0-3 images), then
    all rows advanced together, one call per token."""
    from runtime.decoder.core import InplaceCore, PrefillInput

    m = load_manifest(tiny_artifacts)
    assert m.decoder.kv_layout == "inplace"
    cfg = BackendConfig(intra_op_threads=1)
    core = InplaceCore(open_session(tiny_artifacts / m.graphs["decoder"].file, cfg),
                       open_session(tiny_artifacts / m.graphs["media_kv"].file, cfg), m, slots=4, max_context=80)
    specs = [(2, 21, 3), (0, 9, 0), (3, 30, 0)][:batch]
    prompts = [_prompt(tiny_reference, n, length, seed=i, text_first=tf) for i, (n, length, tf) in enumerate(specs)]
    latents = [_latents(tiny_reference, n, seed=10 + i) for i, (n, _, _) in enumerate(specs)]
    expected = _reference_greedy(tiny_reference, prompts, latents)
    seqs = [core.open() for _ in prompts]
    logits = [core.prefill(s, PrefillInput(p, core.media_kv(lat.numpy()))).logits[None]
              for s, p, lat in zip(seqs, prompts, latents)]
    out = []
    for _ in range(STEPS):
        nxt = [_ban(lg, core.image_id).argmax(-1) for lg in logits]
        out.append(np.concatenate(nxt))
        logits = core.step(seqs, nxt)
    for s in seqs:
        core.release(s)
    np.testing.assert_array_equal(np.stack(out, axis=1), expected)
    assert core.pool.used == 0 and core.copy_bytes()["step"] == 0
