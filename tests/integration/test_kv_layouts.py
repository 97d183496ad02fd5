"""The decoder forms against each other: the in-place GQA pool (the reference) against the concat decoder,
the in-place layout in standard ops (``--attention onnx``) and full recompute.

The tiny demo is exported three times from the same seeded checkpoint (``tests/integration/layouts.py``):
``inplace`` (GroupQueryAttention over a static buffer bound as input and output), ``concat`` (present =
Concat(past, new)) and ``onnx`` (TensorScatter-24 + MatMul/Softmax over the same bound buffer). Greedy
and beam outputs must be token-identical between them and to recomputing the whole sequence each token;
the in-place pool must copy nothing per step and return to empty. Checks of the ``onnx`` graph itself
are in ``test_onnx_attention.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from runtime.backends.buffers import HostBuffer
from runtime.decoder.pool import KVPool, RowSet
from runtime.decoder.runner import PrefillRow
from runtime.engine import Runtime
from runtime.prompts import encode, preference_prompt
from runtime.server.metrics import ServerMetrics
from runtime.types import BeamOptions, DecodeMode, PreferenceRequest, RecommendRequest, SamplingOptions
from tests.integration.layouts import (
    HISTORY,
    RATED,
    FormRuntimes,
    explain,
    explain_concurrently,
    open_runtime,
    target,
)

OTHERS = ("concat", "onnx")
"""The forms checked against the ``inplace`` reference."""
POOLED = ("inplace", "onnx")
"""The forms that decode in the bound in-place pool."""


@pytest.fixture(scope="module")
def forms(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[str], Runtime]]:
    opened = FormRuntimes(request, tmp_path_factory)
    yield opened
    opened.close()


@pytest.fixture(scope="module")
def inplace(forms: Callable[[str], Runtime]) -> Runtime:
    return forms("inplace")


@pytest.fixture(scope="module", params=OTHERS)
def other(forms: Callable[[str], Runtime], request: pytest.FixtureRequest) -> Runtime:
    return forms(request.param)


@pytest.fixture(scope="module", params=("inplace", *OTHERS))
def form(forms: Callable[[str], Runtime], request: pytest.FixtureRequest) -> Runtime:
    return forms(request.param)


@pytest.fixture(scope="module", params=POOLED)
def pooled(forms: Callable[[str], Runtime], request: pytest.FixtureRequest) -> Runtime:
    return forms(request.param)


def _greedy_tokens(rt: Runtime, req: PreferenceRequest, n: int) -> list[int]:
    """Greedy tokens after the rating token by recomputing the whole sequence each token (no KV reuse)."""
    t = rt.manifest.tokens
    prompt = encode(preference_prompt(rt.resolve(req.history), rt.resolve((req.target,), "target")[0],
                                      rt.config.max_history), rt.tokenizer, t.endofchunk, t.image)
    memory, _ = rt.media.memory_for(prompt.prompt.images)
    ids = list(prompt.ids)
    logits = rt.decoder.prefill_batch([PrefillRow(np.array(ids), memory)])[0]
    rate = int(np.argmax(logits[t.rates])) + 1
    ids.append(t.rates[rate - 1])
    out: list[int] = []
    for _ in range(n):
        logits = rt.ban_special(np.zeros((1, 0)), rt.decoder.prefill_batch([PrefillRow(np.array(ids), memory)]))[0]
        token = int(np.argmax(logits))
        out.append(token)
        if token == t.eos:
            break
        ids.append(token)
    return out


def test_greedy_explain_matches_the_reference_and_full_recompute(inplace: Runtime, other: Runtime) -> None:
    req = PreferenceRequest(RATED, target(1), SamplingOptions(max_new_tokens=12))
    text_a, res_a = explain(inplace, req)
    text_b, res_b = explain(other, req)
    assert text_a == text_b and res_a.rating == res_b.rating and res_a.timings.tokens == res_b.timings.tokens
    np.testing.assert_allclose(res_b.rating_distribution, res_a.rating_distribution, rtol=1e-5, atol=1e-7)
    assert res_b.timings.tokens > 1
    for rt in (inplace, other):
        recomputed = _greedy_tokens(rt, req, 12)
        assert rt.tokenizer.decode(recomputed, skip_special_tokens=True).strip() == text_a


@pytest.mark.parametrize("mode", [DecodeMode.BEAM, DecodeMode.BEAM_CONSTRAINED])
def test_beam_modes_match_the_reference(inplace: Runtime, other: Runtime, mode: DecodeMode) -> None:
    beam = BeamOptions(num_beams=4, num_return_sequences=4, max_new_tokens=5)
    req = RecommendRequest(HISTORY, top_k=4, mode=mode, beam=beam)
    a, b = inplace.recommend(req), other.recommend(req)
    assert b.timings.tokens > 0 and (mode != DecodeMode.BEAM_CONSTRAINED or len(b.items) == 4)
    assert [i.item_id for i in a.items] == [i.item_id for i in b.items] and a.timings.tokens == b.timings.tokens
    np.testing.assert_allclose([i.score for i in b.items], [i.score for i in a.items], rtol=1e-5, atol=1e-6)


def test_beam_explanation_matches_the_reference(inplace: Runtime, other: Runtime) -> None:
    req = PreferenceRequest(RATED, target(2), SamplingOptions(max_new_tokens=6, num_beams=3))
    assert explain(inplace, req)[0] == explain(other, req)[0]


def test_padded_batch_prefill_equals_single_rows_and_the_reference(inplace: Runtime, other: Runtime) -> None:
    """Rows of three lengths in one call, right-padded (inplace, onnx) or left-padded (concat): each row's
    logits equal its own call's, and the batch equals the reference's."""
    t = inplace.manifest.tokens
    rows = []
    for k, history in enumerate((RATED[:1], RATED, RATED[:2])):
        prompt = encode(preference_prompt(inplace.resolve(history), inplace.resolve((target(k),), "target")[0]),
                        inplace.tokenizer, t.endofchunk, t.image)
        rows.append(PrefillRow(prompt.ids, inplace.media.memory_for(prompt.prompt.images)[0]))
    assert len({len(r.ids) for r in rows}) == 3
    reference = inplace.decoder.prefill_batch(rows)
    for rt in (inplace, other):
        batched = rt.decoder.prefill_batch(rows)
        for i, row in enumerate(rows):
            alone = rt.decoder.prefill_batch([row])[0]
            np.testing.assert_allclose(batched[i], alone, rtol=1e-5, atol=1e-5 * float(np.abs(alone).max()))
    scale = float(np.abs(reference).max())
    np.testing.assert_allclose(other.decoder.prefill_batch(rows), reference, rtol=1e-5, atol=1e-5 * min(1.0, scale))


def test_prefix_hit_decodes_like_a_miss(form: Runtime) -> None:
    """A prefix-cache hit continues the prompt after the cached positions (seq < total)."""
    rt = form
    rt.prefix_cache.clear()
    req = PreferenceRequest(RATED, target(3), SamplingOptions(max_new_tokens=8), tenant="hit")
    miss_text, miss = explain(rt, req)
    hit_text, hit = explain(rt, req)
    assert not miss.timings.prefix_cache_hit and hit.timings.prefix_cache_hit
    assert hit_text == miss_text
    np.testing.assert_allclose(hit.rating_distribution, miss.rating_distribution, rtol=1e-5, atol=1e-7)
    assert rt.stats()["kv_copy_bytes_prefix"] > 0  # the hit loaded the cached prefix once


def test_concurrent_streams_copy_nothing_per_step(inplace: Runtime, form: Runtime) -> None:
    """8 explain streams of different lengths at once, stepped together: each gives its one-at-a-time text
    (and the reference's); the in-place pool copies no KV per step, stays bound where it was and empties
    afterwards; the concat layout, counted the same way, copies on every step."""
    rt = form
    reqs = [PreferenceRequest(RATED[: 1 + k % 3], target(k), SamplingOptions(max_new_tokens=4 + 3 * k))
            for k in range(8)]
    alone = [explain(rt, r)[0] for r in reqs]
    assert alone == [explain(inplace, r)[0] for r in reqs]
    pool = rt.decoder.pool if rt.decoder.kv_layout == "inplace" else None  # type: ignore[attr-defined]
    addresses = [b.bind(0, 1).address for b in (*pool.keys, *pool.values)] if pool is not None else []
    before = rt.stats()
    results = explain_concurrently(rt, reqs)
    after = rt.stats()
    assert results == alone  # batched (joining late, leaving early) == one at a time
    assert after["decode_rows"] - before["decode_rows"] > after["decode_steps"] - before["decode_steps"]
    assert after["active_sequences"] == 0 and after["kv_pool_rows_used"] == 0 and after["kv_bytes"] == 0
    stepped = after["kv_copy_bytes_step"] - before["kv_copy_bytes_step"]
    if pool is not None:
        assert stepped == 0
        assert pool.used == 0
        assert [b.bind(0, 1).address for b in (*pool.keys, *pool.values)] == addresses  # bound where they were
        metrics = ServerMetrics()  # the Prometheus series the server exposes, from the same stats
        metrics.engine_stats = rt.stats
        assert metrics.registry.get_sample_value("unimp_decode_kv_copy_bytes_total", {"cause": "step"}) == 0.0
        assert metrics.registry.get_sample_value("unimp_decode_kv_pool_rows_used") == 0.0
    else:
        assert rt.decoder.kv_layout == "concat" and stepped > 0


def test_the_decoder_writes_the_pool_in_place(pooled: Runtime) -> None:
    """Positions past a row's length survive a step: onnxruntime used the bound buffer as both past and
    present (a separate present would have been zero-filled and copied)."""
    rt = pooled
    pool = rt.decoder.pool  # type: ignore[attr-defined]
    t = rt.manifest.tokens
    with rt.admit(None, rows=1) as gen:
        prompt = encode(preference_prompt(rt.resolve(RATED), rt.resolve((target(4),), "target")[0]),
                        rt.tokenizer, t.endofchunk, t.image)
        rt.prefill(prompt, "", None, generator=gen)
        slot = int(gen.seq.slots[0])  # type: ignore[union-attr]
        length = int(pool.lengths[slot])
        keys = pool.keys[0].array  # type: ignore[attr-defined]
        keys[slot, :, length + 1 :] = 7.0
        before = keys[slot, :, :length].copy()
        gen.step(np.array([t.rates[0]]))
        assert np.all(keys[slot, :, length + 1 :] == 7.0)
        np.testing.assert_array_equal(keys[slot, :, :length], before)
        assert np.any(keys[slot, :, length] != 7.0)  # the new token's K landed at the row's position


def test_pool_fork_and_compaction() -> None:
    """Forks copy only duplicated rows; leaving moves the last rows into the holes; contents follow."""

    class Alloc:
        def allocate(self, shape, dtype=np.float32):  # type: ignore[no-untyped-def]
            return HostBuffer(shape, dtype)

    pool = KVPool(Alloc(), layers=1, heads=1, head_dim=2, blocks=1, xattn_heads=1, num_latents=1,  # type: ignore[arg-type]
                  xattn_head_dim=2, slots=6, max_context=4)
    a, b = RowSet(), RowSet()
    pool.attach(a, 1)
    pool.attach(b, 1)
    k = pool.keys[0].array  # type: ignore[attr-defined]

    def mark(rows: RowSet) -> None:
        for r, s in enumerate(rows.slots):
            k[s, 0, :3] = 10 * (rows is b) + r + 1
            pool.lengths[s] = 3

    mark(a)
    mark(b)
    row_bytes = 3 * 2 * 4  # 3 positions x head_dim 2 x float32, K and V each
    pool.fork(b, np.array([0, 0, 0]))  # one row becomes three: two copies
    assert b.rows == 3 and pool.used == 4
    assert pool.copied["fork"] == 2 * (2 * row_bytes) + 2 * (2 * 2 * 4)  # K, V rows + memory rows
    assert all(k[s, 0, 0, 0] == 11 for s in b.slots)
    k[b.slots[1], 0, :3], k[b.slots[2], 0, :3] = 12, 13
    pool.fork(b, np.array([2, 1]))  # reorder and shrink: every parent keeps its slot, no copy
    assert pool.copied["fork"] == 2 * (2 * row_bytes) + 2 * (2 * 2 * 4)
    assert [k[s, 0, 0, 0] for s in b.slots] == [13, 12] and pool.used == 3
    pool.detach(a)  # the hole at slot 0 is filled by the last active row
    assert pool.used == 2 and sorted(int(s) for s in b.slots) == [0, 1]
    assert sorted(k[s, 0, 0, 0] for s in b.slots) == [12, 13] and pool.copied["leave"] > 0
    pool.detach(b)
    assert pool.used == 0 and pool.kv_bytes_in_use() == 0


def test_copy_counter_has_every_cause_from_startup(tiny_artifacts: Path, tmp_path: Path) -> None:
    """unimp_decode_kv_copy_bytes_total{cause} exposes every cause before any request."""
    rt = open_runtime(tiny_artifacts, tmp_path)
    try:
        metrics = ServerMetrics()
        metrics.engine_stats = rt.stats
        for cause in ("join", "prefix", "fork", "leave", "step"):
            assert metrics.registry.get_sample_value("unimp_decode_kv_copy_bytes_total", {"cause": cause}) == 0.0  # present, 0
        assert metrics.registry.get_sample_value("unimp_decode_kv_pool_bytes") == rt.decoder.pool_bytes > 0
        assert metrics.registry.get_sample_value("unimp_decode_kv_pool_rows_used") == 0.0
    finally:
        rt.close()
