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


def test_temperature_sampling_matches_softmax() -> None:
    logits = np.array([1.0, 0.0, -1.0, 2.0, 0.5])
    rng = np.random.default_rng(3)
    draws = np.array([sample_token(logits, 0.7, 1.0, rng) for _ in range(20000)])
    expected = np.exp(logits / 0.7) / np.exp(logits / 0.7).sum()
    observed = np.bincount(draws, minlength=5) / draws.size
    np.testing.assert_allclose(observed, expected, atol=0.015)


def test_top_p_sampling_stays_in_nucleus_and_renormalises() -> None:
    probs = np.array([0.05, 0.5, 0.3, 0.15])
    rng = np.random.default_rng(5)
    draws = np.array([sample_token(np.log(probs), 1.0, 0.75, rng) for _ in range(10000)])
    assert set(draws.tolist()) == {1, 2}
    assert (draws == 1).mean() == pytest.approx(0.5 / 0.8, abs=0.02)


def test_seeded_generation_is_reproducible() -> None:
    rng = np.random.default_rng(0)
    table = rng.normal(size=(16, 32)).astype(np.float32)  # next logits depend on the last token

    def run(seed: int) -> tuple[int, ...]:
        config = SamplingConfig(temperature=1.0, top_p=0.9, seed=seed, max_new_tokens=12)
        gen = TokenGenerator(table[0, :32], lambda t: table[int(t[0]) % 16], config)
        return tuple(gen)

    assert run(1) == run(1)
    assert run(1) != run(2)


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
