"""The concat layout with its KV resident in two alternating buffers (``ConcatCore(resident=True)``, the
path GPU providers take), on ONNX Runtime CPU: token-identical to the host concat path and to the in-place
reference, no KV copied while a batch's composition is stable, one counted write-back when it changes, and
the decoder bound to the same two buffer sets in turn."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from runtime.decoder.core import ConcatCore, PrefillInput
from runtime.engine import Runtime
from runtime.prompts import encode, preference_prompt
from runtime.types import BeamOptions, DecodeMode, PreferenceRequest, RecommendRequest, SamplingOptions
from tests.integration.layouts import (
    HISTORY,
    RATED,
    explain,
    explain_concurrently,
    make_resident,
    open_runtime,
    target,
)


@pytest.fixture(scope="module")
def inplace(tiny_artifacts: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runtime]:
    rt = open_runtime(tiny_artifacts, tmp_path_factory.mktemp("lat_inplace"))
    yield rt
    rt.close()


@pytest.fixture(scope="module")
def host(tiny_concat_artifacts: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runtime]:
    rt = open_runtime(tiny_concat_artifacts, tmp_path_factory.mktemp("lat_host"))
    yield rt
    rt.close()


@pytest.fixture(scope="module")
def resident(tiny_concat_artifacts: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runtime]:
    rt = make_resident(open_runtime(tiny_concat_artifacts, tmp_path_factory.mktemp("lat_resident")))
    assert isinstance(rt.decoder, ConcatCore) and rt.decoder.resident
    yield rt
    rt.close()


def _close(actual: np.ndarray, expected: np.ndarray) -> None:
    scale = float(np.abs(expected).max())
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-6 * max(scale, 1e-3))


def test_greedy_explain_matches_host_and_reference(inplace: Runtime, host: Runtime, resident: Runtime) -> None:
    req = PreferenceRequest(RATED, target(1), SamplingOptions(max_new_tokens=12))
    before, host_before = resident.stats(), host.stats()
    (text_r, res_r), (text_h, res_h) = explain(resident, req), explain(host, req)
    after, host_after = resident.stats(), host.stats()
    assert text_r == text_h == explain(inplace, req)[0] and res_r.timings.tokens == res_h.timings.tokens > 2
    np.testing.assert_allclose(res_r.rating_distribution, res_h.rating_distribution, rtol=1e-6, atol=1e-7)
    # one stream: only the step that starts its batch copies (what the host path copies on each step);
    # its release drops the resident KV unread
    stepped = after["kv_copy_bytes_step"] - before["kv_copy_bytes_step"]
    assert 0 < stepped < (host_after["kv_copy_bytes_step"] - host_before["kv_copy_bytes_step"]) / 2
    assert after["kv_copy_bytes_leave"] == before["kv_copy_bytes_leave"] and after["kv_bytes"] == 0


@pytest.mark.parametrize("mode", [DecodeMode.BEAM, DecodeMode.BEAM_CONSTRAINED])
def test_beam_modes_match_host_and_reference(inplace: Runtime, host: Runtime, resident: Runtime,
                                             mode: DecodeMode) -> None:
    beam = BeamOptions(num_beams=4, num_return_sequences=4, max_new_tokens=5)
    req = RecommendRequest(HISTORY, top_k=4, mode=mode, beam=beam)
    a, b, c = resident.recommend(req), host.recommend(req), inplace.recommend(req)
    assert a.timings.tokens > 0 and [i.item_id for i in a.items] == [i.item_id for i in b.items]
    assert [i.item_id for i in a.items] == [i.item_id for i in c.items] and a.timings.tokens == b.timings.tokens
    np.testing.assert_allclose([i.score for i in a.items], [i.score for i in b.items], rtol=1e-6, atol=1e-6)


def test_beam_explanation_matches_host_and_reference(inplace: Runtime, host: Runtime, resident: Runtime) -> None:
    req = PreferenceRequest(RATED, target(2), SamplingOptions(max_new_tokens=6, num_beams=3))
    before = resident.stats()["kv_copy_bytes_leave"]
    assert explain(resident, req)[0] == explain(host, req)[0] == explain(inplace, req)[0]
    assert resident.stats()["kv_copy_bytes_leave"] > before  # a fork of resident beams wrote them back first


def test_prefix_hit_decodes_like_a_miss(host: Runtime, resident: Runtime) -> None:
    resident.prefix_cache.clear()
    req = PreferenceRequest(RATED, target(3), SamplingOptions(max_new_tokens=8), tenant="hit")
    miss_text, miss = explain(resident, req)
    hit_text, hit = explain(resident, req)
    assert not miss.timings.prefix_cache_hit and hit.timings.prefix_cache_hit
    assert hit_text == miss_text == explain(host, req)[0]
    np.testing.assert_allclose(hit.rating_distribution, miss.rating_distribution, rtol=1e-5, atol=1e-7)


def test_concurrent_streams_match_one_at_a_time(inplace: Runtime, resident: Runtime) -> None:
    """8 streams of different lengths stepped together: sequences join and leave mid-run, so the batch's
    composition changes; each changes costs one counted write-back and the texts stay the same."""
    reqs = [PreferenceRequest(RATED[: 1 + k % 3], target(k), SamplingOptions(max_new_tokens=4 + 3 * k))
            for k in range(8)]
    alone = [explain(resident, r)[0] for r in reqs]
    assert alone == [explain(inplace, r)[0] for r in reqs]
    before = resident.stats()
    results = explain_concurrently(resident, reqs)
    after = resident.stats()
    assert results == alone
    assert after["decode_rows"] - before["decode_rows"] > after["decode_steps"] - before["decode_steps"]
    assert after["kv_copy_bytes_leave"] > before["kv_copy_bytes_leave"]
    assert after["active_sequences"] == 0 and after["kv_bytes"] == 0


def _prompt(rt: Runtime, k: int) -> PrefillInput:
    t = rt.manifest.tokens
    prompt = encode(preference_prompt(rt.resolve(RATED[: 1 + k]), rt.resolve((target(k),), "target")[0]),
                    rt.tokenizer, t.endofchunk, t.image)
    return PrefillInput(np.asarray(prompt.ids), rt.media.memory_for(prompt.prompt.images)[0])


def test_stable_batch_copies_nothing_and_binds_two_buffers_in_turn(host: Runtime, resident: Runtime,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Two sequences of different lengths stepped together: per-step logits equal the host path's, the
    copy counters stay put after the first step, ONNX Runtime's IOBinding gets past = the last present and
    present = the other buffer set, and a step of one of them writes the batch back once (counted), leaving
    states equal to the host path's."""
    hcore, rcore = host.decoder, resident.decoder
    assert isinstance(hcore, ConcatCore) and isinstance(rcore, ConcatCore)
    names = resident.manifest.names
    past_k, present_k = names.past_key.format(layer=0), names.present_key.format(layer=0)
    seen: list[tuple[int | None, int]] = []
    session: Any = rcore.session
    bind = session._bind

    def spy(io: Any, bound: dict, outputs: list[str], device: str) -> None:
        seen.append((bound[past_k].address if past_k in bound else None, bound[present_k].address))
        bind(io, bound, outputs, device)

    monkeypatch.setattr(session, "_bind", spy)
    prompts = [_prompt(resident, 0), _prompt(resident, 2)]
    assert len(prompts[0].ids) != len(prompts[1].ids)
    hs, rs = [hcore.open(), hcore.open()], [rcore.open(), rcore.open()]
    try:
        for h, r, p in zip(hs, rs, prompts):
            _close(rcore.prefill(r, p).logits, hcore.prefill(h, p).logits)
        rng = np.random.default_rng(0)
        vocab = resident.manifest.decoder.vocab_size
        a = [pair[0].bind_flat((1,)).address for pair in rcore.buffers[0]]
        b = [pair[0].bind_flat((1,)).address for pair in rcore.buffers[1]]
        counts = []
        for _ in range(5):
            tokens = [rng.integers(10, vocab, size=1) for _ in hs]
            for x, y in zip(rcore.step(rs, tokens), hcore.step(hs, tokens)):
                _close(x, y)
            counts.append(rcore.copy_bytes())
        assert counts[0]["step"] > 0  # the first step of the batch ran from the host states
        assert all(c == counts[0] for c in counts[1:])  # then nothing was copied
        assert seen[-5][0] is None and seen[-5][1] == a[0]  # the join: host past, present into set A
        assert [s for s in seen[-4:]] == [(a[0], b[0]), (b[0], a[0]), (a[0], b[0]), (b[0], a[0])]
        assert rcore.length(rs[0]) == hcore.length(hs[0]) and rcore.length(rs[1]) == hcore.length(hs[1])
        assert rcore.kv_bytes() > 0
        tokens = [rng.integers(10, vocab, size=1)]
        _close(rcore.step(rs[1:], tokens)[0], hcore.step(hs[1:], tokens)[0])  # another composition
        leave = rcore.copy_bytes()["leave"] - counts[-1]["leave"]
        d = resident.manifest.decoder
        padded = max(hs[0].state.length, hs[1].state.length - 1)  # type: ignore[union-attr]
        assert leave == 2 * d.num_layers * 2 * d.num_heads * padded * d.head_dim * 4  # both rows, K and V, once

        def same_state(r: Any, h: Any) -> None:
            assert r.state is not None and h.state is not None
            assert r.state.length == h.state.length and np.array_equal(r.state.next_pos, h.state.next_pos)
            np.testing.assert_array_equal(r.state.mask, h.state.mask)
            for x, y in zip((*r.state.keys, *r.state.values), (*h.state.keys, *h.state.values)):
                _close(x, y)

        same_state(rs[0], hs[0])  # written back; rs[1] is resident again (a batch of its own)
        tokens = [rng.integers(10, vocab, size=1)]
        _close(rcore.step(rs[:1], tokens)[0], hcore.step(hs[:1], tokens)[0])
        alone = rcore.copy_bytes()["leave"] - counts[-1]["leave"] - leave
        assert alone == 2 * d.num_layers * d.num_heads * hs[1].state.length * d.head_dim * 4  # type: ignore[union-attr]
        same_state(rs[1], hs[1])
        leave += alone
    finally:
        for core, seqs in ((hcore, hs), (rcore, rs)):
            for s in seqs:
                core.release(s)
    assert rcore.kv_bytes() == 0 and rcore.copy_bytes()["leave"] - counts[-1]["leave"] == leave


@pytest.mark.parametrize("provider", ["cpu", "cuda"])
def test_the_runtime_keeps_the_kv_resident_only_off_the_cpu(tiny_concat_artifacts: Path, provider: str,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """``_open_core`` turns the resident buffers on for a GPU provider (rows = the batcher's width) and
    leaves the CPU default as it was; the cuda session is a CPU one here, the choice reads the config."""
    import runtime.engine as engine
    from runtime.backends import BackendConfig
    from runtime.manifest import load_manifest

    manifest = load_manifest(tiny_concat_artifacts, verify=False)
    opened: list[BackendConfig] = []

    def cpu_session(path: Path, config: BackendConfig, *args: Any, **kw: Any) -> Any:
        opened.append(config)
        return real(path, BackendConfig(intra_op_threads=1), *args, **kw)

    real = engine.open_session
    media_kv = real(tiny_concat_artifacts / manifest.graphs["media_kv"].file, BackendConfig())
    monkeypatch.setattr(engine, "open_session", cpu_session)
    config = engine.RuntimeConfig(backend=BackendConfig(provider=provider), max_context=32)  # type: ignore[arg-type]
    core = engine._open_core(tiny_concat_artifacts, manifest, config, media_kv, rows=5)
    assert isinstance(core, ConcatCore) and opened[0].provider == provider
    d = manifest.decoder
    if provider == "cpu":
        assert not core.resident and core.buffers == []
    else:
        assert core.resident and core.rows == 5 and len(core.buffers) == 2
        assert all(len(s) == d.num_layers for s in core.buffers)
        assert {b.shape for s in core.buffers for pair in s for b in pair} == {(5, d.num_heads, 32, d.head_dim)}


def test_a_release_leaves_the_batch_resident_until_the_others_move(host: Runtime, resident: Runtime) -> None:
    """Releasing one sequence of a resident batch reads nothing; the survivors' next step in another batch
    writes the batch back once (counted under ``leave``) and continues like the host path."""
    hcore, rcore = host.decoder, resident.decoder
    assert isinstance(hcore, ConcatCore) and isinstance(rcore, ConcatCore)
    prompts = [_prompt(resident, 1), _prompt(resident, 0)]
    hs, rs = [hcore.open(), hcore.open()], [rcore.open(), rcore.open()]
    rng = np.random.default_rng(1)
    vocab = resident.manifest.decoder.vocab_size
    try:
        for h, r, p in zip(hs, rs, prompts):
            hcore.prefill(h, p)
            rcore.prefill(r, p)
        for _ in range(3):
            tokens = [rng.integers(10, vocab, size=1) for _ in hs]
            for x, y in zip(rcore.step(rs, tokens), hcore.step(hs, tokens)):
                _close(x, y)
        before = rcore.copy_bytes()["leave"]
        hcore.release(hs[0])
        rcore.release(rs[0])
        assert rcore.copy_bytes()["leave"] == before  # nothing read back for a sequence that is gone
        for _ in range(2):
            tokens = [rng.integers(10, vocab, size=1)]
            _close(rcore.step(rs[1:], tokens)[0], hcore.step(hs[1:], tokens)[0])
        d = resident.manifest.decoder
        padded = max(len(p.ids) for p in prompts) + 3
        assert rcore.copy_bytes()["leave"] - before == 2 * d.num_layers * 2 * d.num_heads * padded * d.head_dim * 4
        assert rcore.length(rs[1]) == hcore.length(hs[1])
    finally:
        for core, seqs in ((hcore, hs), (rcore, rs)):
            for s in seqs:
                core.release(s)
    assert rcore.kv_bytes() == 0
