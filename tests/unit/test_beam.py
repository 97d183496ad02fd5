"""Beam search against Hugging Face ``generate`` on a tiny seeded GPT-NeoX, plus callback-contract checks."""

from __future__ import annotations

import numpy as np
import pytest

from runtime.decoding.beam import BeamSearchConfig, EarlyStopping, beam_search, log_softmax, topk_desc
from runtime.decoding.trie import TokenTrie

V = 96
EOS = 3
PAD = 1
PROMPT = [5, 17, 42, 8, 60]


# -- contract checks on a numpy toy model (no torch) ----------------------------------------------


class ToyModel:
    """Logits are a deterministic function of each row's full token sequence; records every call."""

    def __init__(self, vocab: int, prompt: list[int], eos: int, eos_bias: float = 0.0) -> None:
        self.vocab = vocab
        self.eos = eos
        self.eos_bias = eos_bias
        self.rows = [list(prompt)]
        self.calls: list[tuple[np.ndarray, np.ndarray]] = []

    def logits_for(self, seq: list[int]) -> np.ndarray:
        rng = np.random.default_rng(abs(hash(tuple(seq))) % (2**32))
        out = rng.normal(0.0, 3.0, self.vocab).astype(np.float32)  # [V]
        out[self.eos] += self.eos_bias
        return out

    def prompt_logits(self) -> np.ndarray:
        return self.logits_for(self.rows[0])

    def advance(self, parents: np.ndarray, tokens: np.ndarray) -> np.ndarray:
        assert parents.dtype == np.int64 and tokens.dtype == np.int64
        assert parents.shape == tokens.shape
        assert parents.min() >= 0 and parents.max() < len(self.rows)
        self.calls.append((parents.copy(), tokens.copy()))
        self.rows = [self.rows[p] + [int(t)] for p, t in zip(parents, tokens)]
        return np.stack([self.logits_for(r) for r in self.rows])  # [n, V]


def path_score(model: ToyModel, prompt: list[int], generated: np.ndarray, length_penalty: float) -> float:
    total = 0.0
    seq = list(prompt)
    for tok in generated.tolist():
        total += float(log_softmax(model.logits_for(seq))[tok])
        seq.append(tok)
    return total / (len(generated) ** length_penalty)


@pytest.mark.parametrize("early_stopping", [True, False, "never"])
def test_callback_contract_and_self_consistent_scores(early_stopping: EarlyStopping) -> None:
    model = ToyModel(40, PROMPT, eos=2, eos_bias=2.0)
    config = BeamSearchConfig(
        num_beams=4,
        num_return_sequences=4,
        max_new_tokens=6,
        length_penalty=1.0,
        early_stopping=early_stopping,
        eos_token_id=2,
        pad_token_id=0,
    )
    result = beam_search(model.prompt_logits(), model.advance, config)
    assert len(model.calls) == result.steps - 1
    assert model.calls and (model.calls[0][0] == 0).all()  # the beams fork from the single prompt row
    assert all(p.shape == (4,) for p, _ in model.calls)
    assert np.all(np.diff(result.scores) <= 0)
    for seq, score in zip(result.sequences(), result.scores):
        assert len(seq) == 6 or seq[-1] == 2
        assert score == pytest.approx(path_score(model, PROMPT, seq, 1.0), rel=1e-5, abs=1e-4)


def test_topk_desc_breaks_ties_towards_lower_index() -> None:
    values = np.array([1.0, 3.0, 3.0, -np.inf, 3.0, 2.0], dtype=np.float32)
    assert topk_desc(values, 2).tolist() == [1, 2]
    assert topk_desc(values, 4).tolist() == [1, 2, 4, 5]
    assert topk_desc(values, 10).tolist() == [1, 2, 4, 5, 0, 3]


def test_config_validation() -> None:
    with pytest.raises(ValueError):
        BeamSearchConfig(num_beams=2, num_return_sequences=3)
    with pytest.raises(ValueError):
        BeamSearchConfig(max_new_tokens=0)
    with pytest.raises(ValueError):
        BeamSearchConfig(early_stopping="sometimes")  # type: ignore[arg-type]


def test_cancel_before_advance() -> None:
    from runtime.types import Cancelled, CancelToken

    model = ToyModel(40, PROMPT, eos=2)
    token = CancelToken()
    token.cancel()
    with pytest.raises(Cancelled):
        beam_search(
            model.prompt_logits(),
            model.advance,
            BeamSearchConfig(num_beams=3, max_new_tokens=5),
            cancel=token,
        )
    assert model.calls == []


# -- parity with transformers -------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPTNeoXConfig(
        vocab_size=V,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        initializer_range=0.5,
        bos_token_id=0,
        eos_token_id=EOS,
        tie_word_embeddings=False,
    )
    model = transformers.GPTNeoXForCausalLM(config).eval()
    with torch.no_grad():  # make EOS likely after a few steps: a bias along the final LayerNorm's offset
        offset = torch.randn(32)
        offset = offset / offset.norm() * 8
        model.gpt_neox.final_layer_norm.bias.copy_(offset)
        model.lm_head.weight[EOS] += 0.12 * offset
    return torch, transformers, model


def run_ours(hf, config: BeamSearchConfig, **hooks):
    torch, transformers, model = hf
    prompt = torch.tensor([PROMPT])
    cache = transformers.DynamicCache(config=model.config)
    with torch.no_grad():
        first = model(input_ids=prompt, cache=cache, use_cache=True).logits[0, -1].float().numpy()

    def advance(parents: np.ndarray, tokens: np.ndarray) -> np.ndarray:
        cache.reorder_cache(torch.from_numpy(parents))
        with torch.no_grad():
            out = model(input_ids=torch.from_numpy(tokens)[:, None], cache=cache, use_cache=True)
        return out.logits[:, -1].float().numpy()

    return beam_search(first, advance, config, **hooks)


def run_hf(hf, config: BeamSearchConfig, **kwargs):
    torch, transformers, model = hf
    prompt = torch.tensor([PROMPT])
    generation = transformers.GenerationConfig(
        num_beams=config.num_beams,
        num_return_sequences=config.num_return_sequences,
        max_new_tokens=config.max_new_tokens,
        length_penalty=config.length_penalty,
        early_stopping=config.early_stopping,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
        do_sample=False,
        return_dict_in_generate=True,
        output_scores=True,
    )
    with torch.no_grad():
        out = model.generate(
            prompt, attention_mask=torch.ones_like(prompt), generation_config=generation, **kwargs
        )
    return out.sequences[:, len(PROMPT) :].numpy(), out.sequences_scores.numpy()


SETTINGS = [
    # num_beams, num_return_sequences, length_penalty, early_stopping, max_new_tokens
    (3, 3, 1.0, False, 12),
    (5, 5, 1.0, False, 12),
    (5, 3, 0.5, True, 12),
    (5, 5, 1.0, True, 12),
    (5, 2, 2.0, False, 12),
    (3, 2, 2.0, "never", 10),
    (3, 1, 0.5, "never", 8),
    (4, 4, -1.0, False, 12),
]


@pytest.mark.parametrize(("num_beams", "num_return", "length_penalty", "early_stopping", "max_new"), SETTINGS)
def test_matches_transformers(hf, num_beams, num_return, length_penalty, early_stopping, max_new) -> None:
    config = BeamSearchConfig(
        num_beams=num_beams,
        num_return_sequences=num_return,
        max_new_tokens=max_new,
        length_penalty=length_penalty,
        early_stopping=early_stopping,
        eos_token_id=EOS,
        pad_token_id=PAD,
    )
    ref_tokens, ref_scores = run_hf(hf, config)
    ours = run_ours(hf, config)
    np.testing.assert_array_equal(ours.tokens, ref_tokens)
    np.testing.assert_allclose(ours.scores, ref_scores, atol=1e-4, rtol=1e-5)


def test_eos_is_hit_before_max_length(hf) -> None:
    config = BeamSearchConfig(
        num_beams=5, num_return_sequences=5, max_new_tokens=12, eos_token_id=EOS, pad_token_id=PAD
    )
    ours = run_ours(hf, config)
    ended_by_eos = [len(s) < 12 and s[-1] == EOS for s in ours.sequences()]
    assert any(ended_by_eos)
    assert not all(ended_by_eos) or len(set(ours.lengths.tolist())) > 1


def test_logits_processor_with_prompt_matches_transformers(hf) -> None:
    torch, transformers, _ = hf

    class Penalty(transformers.LogitsProcessor):  # type: ignore[name-defined]  # subtract 1.5 from every token already present
        def __call__(self, input_ids, scores):
            return scores.scatter_add(1, input_ids, torch.full(input_ids.shape, -1.5))

    def penalty(input_ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
        out = scores.copy()
        for row, ids in enumerate(input_ids):
            np.add.at(out[row], ids, np.float32(-1.5))
        return out

    config = BeamSearchConfig(
        num_beams=4, num_return_sequences=3, max_new_tokens=10, eos_token_id=EOS, pad_token_id=PAD
    )
    ref_tokens, ref_scores = run_hf(
        hf, config, logits_processor=transformers.LogitsProcessorList([Penalty()])
    )
    ours = run_ours(hf, config, logits_processor=penalty, prompt_ids=np.array(PROMPT))
    np.testing.assert_array_equal(ours.tokens, ref_tokens)
    np.testing.assert_allclose(ours.scores, ref_scores, atol=1e-4, rtol=1e-5)


def make_items() -> list[list[int]]:
    """4-token item spellings over ids 40..95: 12 distinct first tokens, some shared prefixes."""
    rng = np.random.default_rng(7)
    firsts = rng.choice(np.arange(40, 96), size=12, replace=False)
    items = [[int(f), *rng.integers(40, 96, size=3).tolist()] for f in firsts]
    items.append([items[0][0], items[0][1], *rng.integers(40, 96, size=2).tolist()])
    items.append([items[1][0], *rng.integers(40, 96, size=3).tolist()])
    items.append([*items[2][:3], (items[2][3] - 40 + 1) % 56 + 40])
    return items


@pytest.mark.parametrize(
    ("num_beams", "num_return", "length_penalty", "early_stopping"),
    [
        (5, 5, 1.0, False),
        (3, 2, 0.5, True),
        (5, 3, 2.0, "never"),
    ],
)
def test_constrained_matches_transformers(hf, num_beams, num_return, length_penalty, early_stopping) -> None:
    items = make_items()
    trie = TokenTrie(items, eos_token_id=EOS)

    def prefix_fn(batch_id: int, sent) -> list[int]:
        return trie.allowed(sent[len(PROMPT) :].numpy()).tolist()

    config = BeamSearchConfig(
        num_beams=num_beams,
        num_return_sequences=num_return,
        max_new_tokens=8,
        length_penalty=length_penalty,
        early_stopping=early_stopping,
        eos_token_id=EOS,
        pad_token_id=PAD,
    )
    ref_tokens, ref_scores = run_hf(hf, config, prefix_allowed_tokens_fn=prefix_fn)
    ours = run_ours(hf, config, allowed_tokens=trie.allowed)
    np.testing.assert_array_equal(ours.tokens, ref_tokens)
    np.testing.assert_allclose(ours.scores, ref_scores, atol=1e-4, rtol=1e-5)
    for seq in ours.sequences():
        assert seq[-1] == EOS and trie.lookup(seq) >= 0
        assert seq[:-1].tolist() in items


def test_atomic_item_trie_spells_only_the_given_items_after_the_prefix() -> None:
    start, ws = 50, 7
    trie = TokenTrie.atomic_items(start, np.array([4, 9, 2]), eos_token_id=EOS, prefix=(ws,))
    assert len(trie) == 3
    assert trie.allowed([]).tolist() == [ws]
    assert trie.allowed([ws]).tolist() == [start + 2, start + 4, start + 9]
    assert trie.allowed([ws, start + 9]).tolist() == [EOS]
    assert trie.allowed([ws, start + 5]).tolist() == [EOS]  # off the trie: EOS only (a dead row)
    assert trie.lookup([ws, start + 9, EOS]) == 9 and trie.lookup([ws, start + 2]) == 2
    assert trie.lookup([start + 9, EOS]) == -1 and trie.lookup([ws]) == -1
    bare = TokenTrie.atomic_items(start, [1], eos_token_id=EOS)
    assert bare.allowed([]).tolist() == [start + 1] and bare.allowed([start + 1]).tolist() == [EOS]
