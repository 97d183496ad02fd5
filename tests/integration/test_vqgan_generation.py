"""The VQGAN image-code path on the real tiny engine: codes cache, constrained decoding, gRPC."""

from __future__ import annotations

import io
from dataclasses import replace
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image

from runtime.api import ImageProgress, ImageRequest, ImageResult
from runtime.client import RpcError, UnimpClient
from runtime.engine import Runtime, RuntimeConfig
from runtime.prompts import encode, image_generation_prompt
from runtime.server.app import ServerThread
from runtime.server.config import ServerConfig
from runtime.tasks.image import code_slice_mask
from runtime.types import HistoryItem, ImageModel, InvalidRequest, Unavailable
from runtime.vqgan import default_codes_dir

HISTORY = ("P00003", "P00011", "P00017")


@pytest.fixture(scope="module")
def engine(tiny_artifacts_with_vqgan: Path, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    cache = tmp_path_factory.mktemp("vq_cache") / "latents"
    rt = Runtime.open(tiny_artifacts_with_vqgan, RuntimeConfig(progress=False, latent_cache_dir=cache))
    assert rt.catalog_encoder.wait_idle(600)  # every catalog image's codes, encoded in the background
    yield rt
    rt.close()


def _run(rt: Runtime, **kw) -> tuple[list[ImageProgress], ImageResult]:  # type: ignore[no-untyped-def]
    events = list(rt.generate_image(ImageRequest(**kw)))
    result = events[-1]
    assert isinstance(result, ImageResult)
    progress = [e for e in events[:-1] if isinstance(e, ImageProgress)]
    assert len(progress) == len(events) - 1
    return progress, result


def test_every_catalog_image_has_cached_codes_equal_to_the_encoder(engine: Runtime) -> None:
    assert engine.codes is not None and engine._vqgan is not None
    with_images = [i.item_id for i in engine.catalog.page(1000).items if i.has_image]
    assert len(engine.codes) == len(with_images) > 0
    assert any(default_codes_dir(engine.latents.cache_dir).glob("codes-*.npy"))  # persisted beside the latents
    ids = with_images[:2]
    cached = engine.codes.get(ids)
    fresh = engine._vqgan.encode_images([engine.catalog.image(i) for i in ids])
    assert cached.dtype == np.int64 and cached.shape == (2, 256)
    np.testing.assert_array_equal(cached, fresh)


def test_greedy_writes_exactly_256_codes_in_the_slice_and_a_256px_png(engine: Runtime) -> None:
    history = tuple(HistoryItem(i) for i in HISTORY)
    progress, result = _run(engine, history=history, query="red sneaker", model=ImageModel.VQGAN)
    assert [(p.step, p.total) for p in progress] == [(k, 16) for k in range(1, 17)]
    assert len(result.codes) == 256 and all(0 <= c < 1024 for c in result.codes)
    image = Image.open(io.BytesIO(result.png))
    assert image.format == "PNG" and image.size == (256, 256) == (result.width, result.height)
    assert set(result.timings) >= {"prompt", "prefill", "codes", "vqgan_decoder"}
    # the prompt is the paper's, over the newest two history items' cached codes
    codes = engine.codes.get(list(HISTORY[-2:]))  # type: ignore[union-attr]
    items = engine.resolve(history)[-2:]
    assert result.prompt == image_generation_prompt(items, [list(c) for c in codes], "red sneaker").text
    # the PNG is the decoder's image of those codes
    pixels = engine._vqgan.decode(np.array([result.codes]))[0]  # type: ignore[union-attr]
    expected = np.round(255 * np.clip(pixels / 2 + 0.5, 0, 1)).astype(np.uint8).transpose(1, 2, 0)
    np.testing.assert_array_equal(np.asarray(image), expected)
    again = _run(engine, history=history, query="red sneaker", model=ImageModel.VQGAN)[1]
    assert again.codes == result.codes  # greedy is deterministic


def test_the_mask_keeps_codes_in_the_slice_whatever_the_model_prefers(
    engine: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a model that always prefers EOS (its logits shifted by +1000 there), the constrained path still
    writes 256 in-slice codes: the mask, not the weights, keeps the codes valid."""
    t = engine.manifest.tokens
    masked = code_slice_mask(t.image_codes_start, 1024)(np.zeros((1, 0), np.int64), np.ones((1, engine.manifest.decoder.vocab_size), np.float32))
    assert np.isfinite(masked[0, t.image_codes_start : t.image_codes_start + 1024]).all()
    assert np.isneginf(masked[0, : t.image_codes_start]).all() and np.isneginf(masked[0, t.image_codes_start + 1024 :]).all()

    def prefer_eos(logits: np.ndarray) -> np.ndarray:
        out = np.array(logits, copy=True)
        out[..., t.eos] += 1000.0
        return out

    core = engine.decoder
    prefill, prefill_private, step = core.prefill, core.prefill_private, core.step

    def patched_prefill(*args, **kwargs):  # type: ignore[no-untyped-def]
        out = prefill(*args, **kwargs)
        return replace(out, logits=prefer_eos(out.logits))

    def patched_prefill_private(*args, **kwargs):  # type: ignore[no-untyped-def]
        out = prefill_private(*args, **kwargs)
        return replace(out, logits=prefer_eos(out.logits))

    def patched_step(*args, **kwargs):  # type: ignore[no-untyped-def]
        return [prefer_eos(x) for x in step(*args, **kwargs)]

    monkeypatch.setattr(core, "prefill", patched_prefill)
    monkeypatch.setattr(core, "prefill_private", patched_prefill_private)
    monkeypatch.setattr(core, "step", patched_step)
    items = engine.resolve(tuple(HistoryItem(i) for i in HISTORY))[-2:]
    codes = engine.codes.get([i.item_id for i in items])  # type: ignore[union-attr]
    pre = engine.prefill(image_generation_prompt(items, [list(c) for c in codes], "red sneaker"), tenant="",
                          cancel=None)
    assert int(np.argmax(pre.logits)) == t.eos  # unconstrained, this model would stop at once
    _, result = _run(engine, history=tuple(HistoryItem(i) for i in HISTORY), query="red sneaker",
                     model=ImageModel.VQGAN)
    assert len(result.codes) == 256 and all(0 <= c < 1024 for c in result.codes)


def test_sampled_codes_are_256_in_the_slice_and_seeded(engine: Runtime) -> None:
    history = tuple(HistoryItem(i) for i in HISTORY)
    kw = {"history": history, "query": "blue mug", "model": ImageModel.VQGAN, "temperature": 1.0, "top_p": 0.95}
    _, a = _run(engine, seed=1, **kw)
    _, b = _run(engine, seed=1, **kw)
    _, c = _run(engine, seed=2, **kw)
    for r in (a, b, c):
        assert len(r.codes) == 256 and all(0 <= x < 1024 for x in r.codes)
    assert a.codes == b.codes and a.codes != c.codes


def test_inline_image_history_is_encoded_at_request_time(engine: Runtime) -> None:
    image = engine.catalog.image("P00011")
    inline = HistoryItem(image=image, meta=engine.catalog.get("P00011").meta)
    _, by_bytes = _run(engine, history=(HistoryItem("P00003"), inline), query="hat", model=ImageModel.VQGAN)
    _, by_id = _run(engine, history=(HistoryItem("P00003"), HistoryItem("P00011")), query="hat",
                    model=ImageModel.VQGAN)
    assert by_bytes.prompt == by_id.prompt and by_bytes.codes == by_id.codes


def test_bad_sampling_and_missing_diffusion_name_their_fields(engine: Runtime) -> None:
    with pytest.raises(InvalidRequest) as info:
        _run(engine, history=(HistoryItem("P00003"),), query="hat", model=ImageModel.VQGAN, temperature=9.0)
    assert info.value.field == "temperature" and str(info.value).startswith("temperature: ")
    with pytest.raises(Unavailable) as un:
        _run(engine, history=(HistoryItem("P00003"),), query="hat", model=ImageModel.DIFFUSION)
    assert un.value.field == "image_model" and str(un.value).startswith("image_model: ")


@pytest.fixture(scope="module")
def server(engine: Runtime, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    config = ServerConfig(port=0, state_dir=tmp_path_factory.mktemp("vq_state"))
    config.metrics.port = 0
    config.log.level = "WARNING"
    with ServerThread(config, engine) as srv:
        yield srv


def test_grpc_streams_16_code_rows_then_a_256px_png(server) -> None:  # type: ignore[no-untyped-def]
    with UnimpClient(server.target, timeout=120) as client:
        events = list(client.generate_image("red sneaker", list(HISTORY)))  # unspecified: VQGAN is preferred
    progress = [e for e in events if isinstance(e, ImageProgress)]
    assert [(p.step, p.total) for p in progress] == [(k, 16) for k in range(1, 17)]
    result = events[-1]
    assert isinstance(result, ImageResult) and len(events) == 17
    assert len(result.codes) == 256 and all(0 <= c < 1024 for c in result.codes)
    assert Image.open(io.BytesIO(result.png)).size == (256, 256)
    assert {"codes", "vqgan_decoder", "prefill"} <= set(result.timings)
    with UnimpClient(server.target, timeout=120) as client:
        sampled = list(client.generate_image("red sneaker", list(HISTORY), image_model="vqgan", temperature=0.8,
                                             top_p=0.9, seed=4))[-1]
    assert isinstance(sampled, ImageResult) and len(sampled.codes) == 256


def test_grpc_diffusion_without_its_graphs_is_unavailable_naming_the_field(server) -> None:  # type: ignore[no-untyped-def]
    with UnimpClient(server.target) as client, pytest.raises(RpcError) as info:
        list(client.generate_image("red sneaker", list(HISTORY), image_model="diffusion"))
    assert info.value.code == grpc.StatusCode.UNAVAILABLE and info.value.field == "image_model"
    assert info.value.details.startswith("image_model: ")


def test_vqgan_without_its_graphs_is_unavailable(tiny_artifacts: Path, tmp_path: Path) -> None:
    rt = Runtime.open(tiny_artifacts, RuntimeConfig(progress=False, latent_cache_dir=tmp_path / "latents"))
    try:
        assert rt.codes is None
        for model in (ImageModel.VQGAN, ImageModel.UNSPECIFIED):
            with pytest.raises(Unavailable) as info:
                _run(rt, history=(HistoryItem("P00003"),), query="hat", model=model)
            assert info.value.field == "image_model" and str(info.value).startswith("image_model: ")
    finally:
        rt.close()


def test_codes_follow_a_catalog_image_edit(engine: Runtime) -> None:
    from runtime.api import CatalogItem
    from runtime.types import ItemMeta

    assert engine.codes is not None and engine._vqgan is not None
    first, second = engine.catalog.image("P00003"), engine.catalog.image("P00042")
    item = CatalogItem("VQ-EDIT", ItemMeta(title="Edited lamp"), has_image=True)
    engine.catalog.upsert(item, first)
    np.testing.assert_array_equal(engine.codes.get(["VQ-EDIT"]), engine.codes.get(["P00003"]))
    engine.catalog.upsert(item, second)  # a new image invalidates the cached codes
    np.testing.assert_array_equal(engine.codes.get(["VQ-EDIT"]), engine._vqgan.encode_images([second]))
    assert not np.array_equal(engine.codes.get(["VQ-EDIT"]), engine.codes.get(["P00003"]))


def test_long_queries_drop_old_history_then_name_the_query(engine: Runtime) -> None:
    """The oldest history chunks make room for a long query; a query too long on its own names `query`."""
    import random

    rng = random.Random(0)

    def words(n: int) -> str:  # seeded random letters: the tiny BPE spends about a token per letter
        return " ".join("".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(9)) for _ in range(n))

    t = engine.manifest.tokens
    history = tuple(HistoryItem(i) for i in HISTORY)
    items = engine.resolve(history)[-2:]
    codes = [list(c) for c in engine.codes.get([i.item_id for i in items])]  # type: ignore[union-attr]
    room = engine.manifest.decoder.max_positions - 256
    query = words(30)

    def length(chunks: int) -> int:
        prompt = image_generation_prompt(items[len(items) - chunks:], codes[len(codes) - chunks:], query)
        return len(encode(prompt, engine.tokenizer, t.endofchunk, t.image).ids)

    assert length(2) > room >= length(1)  # both chunks do not fit with this query, the newest one does
    _, result = _run(engine, history=history, query=query, model=ImageModel.VQGAN)
    assert len(result.codes) == 256
    assert result.prompt == image_generation_prompt(items[-1:], codes[-1:], query).text
    with pytest.raises(InvalidRequest) as info:
        _run(engine, history=history, query=words(200), model=ImageModel.VQGAN)
    assert info.value.field == "query" and str(info.value).startswith("query: ")
