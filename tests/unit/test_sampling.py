"""Greedy / temperature / top-p sampling and the step-wise TokenGenerator."""

from __future__ import annotations

import numpy as np
import pytest

from runtime.decoding.sampling import (
    SamplingConfig,
    TokenGenerator,
    greedy_token,
    sample_token,
    top_p_filter,
)
from runtime.types import CancelToken


class ScriptedModel:
    """advance() returns logits that make ``script[i]`` the argmax at step i; records calls."""

    def __init__(self, script: list[int], vocab: int = 8) -> None:
        self.script = script
        self.vocab = vocab
        self.received: list[np.ndarray] = []

    def logits(self, step: int) -> np.ndarray:
        out = np.zeros(self.vocab, dtype=np.float32)
        out[self.script[step]] = 5.0
        return out

    def advance(self, tokens: np.ndarray) -> np.ndarray:
        assert tokens.dtype == np.int64 and tokens.shape == (1,)
        self.received.append(tokens.copy())
        return self.logits(len(self.received))[None, :]  # [1, V] is accepted as well as [V]


def test_greedy_ties_to_lowest_id() -> None:
    assert greedy_token(np.array([0.0, 2.0, 2.0, 1.0])) == 1


def test_top_p_keeps_smallest_nucleus() -> None:
    probs = np.array([0.05, 0.5, 0.3, 0.15])
    logits = np.log(probs)
    kept = lambda p: np.flatnonzero(np.isfinite(top_p_filter(logits, p))).tolist()  # noqa: E731
    assert kept(0.5) == [1]
    assert kept(0.6) == [1, 2]
    assert kept(0.79) == [1, 2]
    assert kept(0.81) == [1, 2, 3]
    assert kept(0.01) == [1]
    assert kept(1.0) == [0, 1, 2, 3]


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def _nucleus(probs: np.ndarray, top_p: float) -> set[int]:
    """Independent reference: the most likely tokens, in order, until their mass reaches top_p."""
    kept: set[int] = set()
    mass = 0.0
    for token in sorted(range(len(probs)), key=lambda i: (-probs[i], i)):
        if mass >= top_p:
            break
        kept.add(token)
        mass += probs[token]
    return kept


def _binomial_tolerance(expected: np.ndarray, draws: int) -> np.ndarray:
    """Five standard deviations of each empirical frequency (false alarm ~ 1e-6 per token)."""
    return 5 * np.sqrt(expected * (1 - expected) / draws) + 1 / draws


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_sampling_matches_softmax(temperature: float) -> None:
    logits = np.array([1.0, 0.0, -1.0, 2.0, 0.5])
    rng = np.random.default_rng(3)
    n = 20000
    draws = np.array([sample_token(logits, temperature, 1.0, rng) for _ in range(n)])
    expected = _softmax(logits / temperature)
    observed = np.bincount(draws, minlength=5) / n
    tolerance = _binomial_tolerance(expected, n)
    assert np.all(np.abs(observed - expected) <= tolerance), (observed, expected)
    # the tolerance is tight enough to tell the temperature apart (the check can fail)
    other = _softmax(logits / (temperature * 1.5))
    assert np.any(np.abs(observed - other) > tolerance)


@pytest.mark.parametrize(("temperature", "top_p"), [(1.0, 0.75), (2.0, 0.75), (0.8, 0.5), (1.0, 0.95)])
def test_top_p_sampling_stays_in_nucleus_and_renormalises(temperature: float, top_p: float) -> None:
    logits = np.log(np.array([0.05, 0.5, 0.3, 0.15]))
    probs = _softmax(logits / temperature)
    nucleus = _nucleus(probs, top_p)
    assert 1 <= len(nucleus) < 4  # a real cut in every case
    rng = np.random.default_rng(5)
    n = 10000
    draws = np.array([sample_token(logits, temperature, top_p, rng) for _ in range(n)])
    assert set(draws.tolist()) == nucleus  # nothing outside the nucleus, everything inside it drawn
    inside = np.array([i in nucleus for i in range(4)])
    expected = np.where(inside, probs, 0.0) / probs[inside].sum()
    observed = np.bincount(draws, minlength=4) / n
    assert np.all(np.abs(observed - expected) <= _binomial_tolerance(expected, n)), (observed, expected)


def test_temperature_zero_is_argmax_and_draws_nothing() -> None:
    rng = np.random.default_rng(11)
    for _ in range(50):
        logits = rng.normal(0, 3, 40)
        state = rng.bit_generator.state
        for top_p in (0.1, 0.9, 1.0):
            assert sample_token(logits, 0.0, top_p, rng) == int(np.argmax(logits))
        assert rng.bit_generator.state == state  # greedy consumes no randomness


TABLE = np.random.default_rng(0).normal(size=(16, 32)).astype(np.float32)
"""Next-token logits as a function of the last token (mod 16): a non-degenerate toy model."""


def _generate(seed: int, temperature: float = 1.0, top_p: float = 0.9, max_new_tokens: int = 12) -> tuple[int, ...]:
    config = SamplingConfig(temperature=temperature, top_p=top_p, seed=seed, max_new_tokens=max_new_tokens)
    return tuple(TokenGenerator(TABLE[0], lambda t: TABLE[int(t[0]) % 16], config))


def test_seeded_generation_is_reproducible_and_seed_dependent() -> None:
    for seed in (0, 1, 7, 2**40):
        assert _generate(seed) == _generate(seed)  # same seed, same tokens (fresh generators)
    samples = {_generate(seed) for seed in range(20)}
    assert len(samples) >= 15  # different seeds give different samples
    greedy = _generate(0, temperature=0.0)
    assert greedy not in samples  # sampling is not argmax decoding in disguise


def test_first_tokens_across_seeds_follow_the_nucleus_distribution() -> None:
    n = 4000
    first = np.array([_generate(seed, max_new_tokens=1)[0] for seed in range(n)])
    probs = _softmax(TABLE[0].astype(np.float64))
    nucleus = _nucleus(probs, 0.9)
    assert set(first.tolist()) <= nucleus
    inside = np.array([i in nucleus for i in range(32)])
    expected = np.where(inside, probs, 0.0) / probs[inside].sum()
    observed = np.bincount(first, minlength=32) / n
    assert np.all(np.abs(observed - expected) <= _binomial_tolerance(expected, n))


def test_temperature_zero_generation_is_greedy_whatever_the_seed() -> None:
    expected, token = [], int(np.argmax(TABLE[0]))
    for _ in range(12):
        expected.append(token)
        token = int(np.argmax(TABLE[token % 16]))
    assert _generate(1, temperature=0.0) == _generate(2, temperature=0.0) == tuple(expected)


def test_stops_on_eos_and_yields_it() -> None:
    model = ScriptedModel([4, 6, 2, 5, 5])
    gen = TokenGenerator(model.logits(0), model.advance, SamplingConfig(max_new_tokens=10, eos_token_id=2))
    assert list(gen) == [4, 6, 2]
    assert gen.finish_reason == "eos" and gen.is_done()
    assert [int(t[0]) for t in model.received] == [4, 6]  # no model call after the last token
    with pytest.raises(ValueError):
        gen.step()


def test_stops_at_length() -> None:
    model = ScriptedModel([4, 6, 7, 5, 5])
    gen = TokenGenerator(
        model.logits(0), model.advance, SamplingConfig(max_new_tokens=3, eos_token_id=(2, 3))
    )
    assert list(gen) == [4, 6, 7]
    assert gen.finish_reason == "length"
    assert len(model.received) == 2


def test_cancel_stops_before_the_next_model_call() -> None:
    model = ScriptedModel([4, 6, 7, 5, 5])
    token = CancelToken()
    gen = TokenGenerator(model.logits(0), model.advance, SamplingConfig(max_new_tokens=5), cancel=token)
    out = []
    for tok in gen:
        out.append(tok)
        if len(out) == 2:
            token.cancel()
    assert out == [4, 6]
    assert gen.finish_reason == "cancelled"
    assert len(model.received) == 1


def test_logits_processor_sees_generated_ids() -> None:
    model = ScriptedModel([4, 4, 4, 4])
    seen: list[list[int]] = []

    def no_repeat(ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
        seen.append(ids[0].tolist())
        out = scores.copy()
        out[0, ids[0]] = -np.inf
        return out

    gen = TokenGenerator(
        model.logits(0), model.advance, SamplingConfig(max_new_tokens=3), logits_processor=no_repeat
    )
    assert list(gen) == [4, 0, 1]
    assert seen == [[], [4], [4, 0]]


def test_config_validation() -> None:
    with pytest.raises(ValueError):
        SamplingConfig(top_p=0.0)
    with pytest.raises(ValueError):
        SamplingConfig(temperature=-1.0)
    with pytest.raises(ValueError):
        SamplingConfig(max_new_tokens=0)


def test_greedy_matches_transformers() -> None:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(1)
    config = transformers.GPTNeoXConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        initializer_range=0.5,
        eos_token_id=3,
        tie_word_embeddings=False,
    )
    model = transformers.GPTNeoXForCausalLM(config).eval()
    prompt = torch.tensor([[5, 9, 22, 41]])
    generation = transformers.GenerationConfig(
        max_new_tokens=10, do_sample=False, eos_token_id=3, pad_token_id=3
    )
    with torch.no_grad():
        ref = model.generate(prompt, attention_mask=torch.ones_like(prompt), generation_config=generation)
        cache = transformers.DynamicCache(config=config)
        first = model(input_ids=prompt, cache=cache, use_cache=True).logits[0, -1].numpy()

    def advance(tokens: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return (
                model(input_ids=torch.from_numpy(tokens)[None, :], cache=cache, use_cache=True)
                .logits[0, -1]
                .numpy()
            )

    gen = TokenGenerator(first, advance, SamplingConfig(max_new_tokens=10, eos_token_id=3))
    assert list(gen) == ref[0, prompt.shape[1] :].tolist()
