"""The real engine behind the gRPC server: every text RPC and GenerateImage over a socket."""

from __future__ import annotations

import io

import grpc
import numpy as np
import pytest
from PIL import Image

from runtime.api import ImageProgress, ImageResult
from runtime.client import RpcError, UnimpClient
from runtime.engine import Runtime, RuntimeConfig
from runtime.server.app import ServerThread
from runtime.server.config import ServerConfig
from runtime.types import DecodeMode, HistoryItem, PreferenceResult, SamplingOptions, TextPiece


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    from export.pipeline import export_demo

    root = tmp_path_factory.mktemp("demo_with_diffusion")
    export_demo("tiny", root, progress=False, with_diffusion=True)
    engine = Runtime.open(root, RuntimeConfig(progress=False))
    config = ServerConfig(port=0, state_dir=root / "state")
    config.metrics.port = 0
    config.log.level = "WARNING"
    with ServerThread(config, engine) as srv:
        yield srv
    engine.close()


def test_text_rpcs_on_the_real_engine(server) -> None:  # type: ignore[no-untyped-def]
    history = ["P00003", "P00017", "P00042"]
    with UnimpClient(server.target) as client:
        assert client.health() == "SERVING"
        rec = client.recommend(history, top_k=4)
        assert len(rec.items) == 4 and not {i.item_id for i in rec.items} & set(history)
        assert len(client.search("blue mug", history, top_k=2).items) == 2
        rated = [HistoryItem(item_id="P00005", rating=4), HistoryItem(item_id="P00009", rating=1)]
        events = list(client.explain("P00021", rated, sampling=SamplingOptions(max_new_tokens=8)))
        final = events[-1]
        assert isinstance(final, PreferenceResult) and abs(sum(final.rating_distribution) - 1) < 1e-5
        assert "".join(e.text for e in events if isinstance(e, TextPiece)) == final.explanation
        prediction = client.predict_preference("P00021", rated, sampling=SamplingOptions(max_new_tokens=8))
        assert prediction.explanation == "" and prediction.timings.tokens == 0
        assert prediction.rating_distribution == pytest.approx(final.rating_distribution, rel=1e-5, abs=1e-7)
        beam = client.recommend(history, top_k=4, mode=DecodeMode.BEAM_CONSTRAINED)
        assert len({i.item_id for i in beam.items}) == 4 and not {i.item_id for i in beam.items} & set(history)
        sel = client.select_items(["P00060", "P00061"], history, max_selected=1)
        assert len(sel.selected) == 1


def test_generate_image_streams_progress_then_png(server) -> None:  # type: ignore[no-untyped-def]
    with UnimpClient(server.target) as client:
        events = list(client.generate_image("red sneaker", ["P00003", "P00011"], steps=4, width=64, height=48))
    progress = [e for e in events if isinstance(e, ImageProgress)]
    assert [p.step for p in progress] == [1, 2, 3, 4]
    result = events[-1]
    assert isinstance(result, ImageResult) and result.prompt.startswith("red sneaker")
    image = Image.open(io.BytesIO(result.png))
    assert image.format == "PNG" and image.size == (64, 48)


def test_generate_image_with_pndm_on_the_real_engine(server) -> None:  # type: ignore[no-untyped-def]
    with UnimpClient(server.target) as client:
        events = list(client.generate_image("red sneaker", ["P00003"], steps=4, width=64, height=64, seed=3,
                                            scheduler="pndm"))
    progress = [e for e in events if isinstance(e, ImageProgress)]
    # PLMS: one UNet call per step plus the warm-up call at the first timestep (DDIM would make 4)
    assert [p.step for p in progress] == [1, 2, 3, 4, 5] and {p.total for p in progress} == {5}
    result = events[-1]
    assert isinstance(result, ImageResult) and (result.width, result.height) == (64, 64)
    image = Image.open(io.BytesIO(result.png))
    assert image.format == "PNG" and image.size == (64, 64)
    assert np.asarray(image).std() > 1  # the sampler produced an image, not a constant fill


@pytest.mark.parametrize("kwargs, field", [({"width": 60}, "width"), ({"steps": 100000}, "steps"),
                                            ({"guidance_scale": -3.0}, "guidance_scale")])
def test_generate_image_bad_arguments(server, kwargs, field) -> None:  # type: ignore[no-untyped-def]
    with UnimpClient(server.target) as client, pytest.raises(RpcError) as err:
        list(client.generate_image("red sneaker", ["P00003"], **kwargs))
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert field in err.value.details


def test_cancelling_generate_image_stops_the_loop(server) -> None:  # type: ignore[no-untyped-def]
    with UnimpClient(server.target) as client:
        stream = client.generate_image("red sneaker", ["P00003"], steps=150, width=64, height=64)
        first = next(stream)
        assert isinstance(first, ImageProgress)
        stream.close()  # cancels the RPC
        # the server keeps serving
        assert client.health() == "SERVING"


def test_stage_timings_are_metrics(server) -> None:  # type: ignore[no-untyped-def]
    metrics = server.server.metrics
    with UnimpClient(server.target) as client:
        client.recommend(["P00003"], top_k=2)
        list(client.generate_image("blue lamp", ["P00003"], steps=2, width=64, height=64))
    for rpc, stage in (("Recommend", "prefill"), ("GenerateImage", "unet_per_step"), ("GenerateImage", "vae_decoder")):
        assert metrics.value("unimp_stage_seconds_count", {"rpc": rpc, "stage": stage}) >= 1


def test_generate_image_from_a_history_without_images(server) -> None:  # type: ignore[no-untyped-def]
    from runtime.types import ItemMeta

    with UnimpClient(server.target) as client:
        client.upsert_item("TXT-IMG", ItemMeta(category="Toys", title="Wooden train"))
        client.record_interaction("no-pictures", "TXT-IMG")
        client.record_interaction("no-pictures", HistoryItem(meta=ItemMeta(title="Desk lamp"), rating=0))
        events = list(client.generate_image("red sneaker", user_id="no-pictures", steps=1, width=64, height=64))
    result = events[-1]
    assert isinstance(result, ImageResult) and result.prompt.startswith("red sneaker")
