"""The gRPC server over real sockets (port 0) against the deterministic fake engine."""

from __future__ import annotations

import argparse
import datetime
import io
import ipaddress
import json
import math
import struct
import threading
import time
import urllib.request
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from runtime.client import ClientTls, RpcError, UnimpClient
from runtime.server import cli_commands
from runtime.server.app import ServerThread
from runtime.server.config import ConfigError, ServerConfig, iter_fields, load_config
from runtime.server.errors import FIELD_METADATA_KEY
from runtime.server.logs import JsonFormatter, RequestIdFilter
from runtime.server.protos import catalog_pb2 as cpb
from runtime.server.protos import catalog_pb2_grpc as cpb_grpc
from runtime.server.protos import personalization_pb2 as ppb
from runtime.server.protos import personalization_pb2_grpc as ppb_grpc
from runtime.types import HistoryItem, ItemMeta, Overloaded, PreferenceRequest, PreferenceResult, TextPiece
from tests.integration.fake_engine import EXPLANATION, FakeEngine, tiny_png

# Images over the pixel limit are rejected by the server; Pillow's warning about them is expected.
pytestmark = pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")

# -- helpers ---------------------------------------------------------------------------------------


def make_config(tmp_path: Path, **overrides: Any) -> ServerConfig:
    config = ServerConfig(port=0, state_dir=tmp_path / "state")
    config.metrics.port = 0
    config.log.level = "WARNING"
    for key, value in overrides.items():
        target: Any = config
        *sections, name = key.split("__")
        for section in sections:
            target = getattr(target, section)
        setattr(target, name, value)
    return config


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


class Stubs:
    def __init__(self, channel: grpc.Channel) -> None:
        self.p = ppb_grpc.PersonalizationStub(channel)
        self.c = cpb_grpc.CatalogStub(channel)
        self.h = health_pb2_grpc.HealthStub(channel)

    def health(self, service: str = "") -> int:
        return int(self.h.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status)


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
def server(tmp_path: Path, engine: FakeEngine) -> Iterator[ServerThread]:
    thread = ServerThread(make_config(tmp_path), engine)
    yield thread
    thread.stop(grace=0.5)


@pytest.fixture
def channel(server: ServerThread) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.target) as ch:
        yield ch


@pytest.fixture
def stubs(channel: grpc.Channel) -> Stubs:
    return Stubs(channel)


@pytest.fixture
def client(server: ServerThread) -> Iterator[UnimpClient]:
    with UnimpClient(server.target, timeout=10) as c:
        yield c


def ids(*names: str) -> list[ppb.HistoryItem]:
    return [ppb.HistoryItem(item_id=n) for n in names]


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height but whose data is tiny: a decompression bomb header."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def expect_error(fn: Callable[[], Any], code: grpc.StatusCode, field: str | None = None) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        result = fn()
        if hasattr(result, "__iter__") and not hasattr(result, "SerializeToString"):
            list(result)
    err = info.value
    assert err.code() == code, (err.code(), err.details())
    if field is not None:
        assert err.details().startswith(f"{field}: "), err.details()
        assert dict(err.trailing_metadata() or ()).get(FIELD_METADATA_KEY) == field
    return err


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return response.read().decode()


# -- every RPC -------------------------------------------------------------------------------------


def test_health_and_reflection(server: ServerThread, stubs: Stubs, channel: grpc.Channel) -> None:
    for service in ("", "unimp.v1.Personalization", "unimp.v1.Catalog"):
        assert stubs.health(service) == health_pb2.HealthCheckResponse.SERVING
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
    assert {"unimp.v1.Personalization", "unimp.v1.Catalog", "grpc.health.v1.Health"} <= services


def test_recommend_and_search(client: UnimpClient, engine: FakeEngine) -> None:
    result = client.recommend(["sku-0001", "sku-0002"], top_k=5)
    assert len(result.items) == 5
    assert all(i.item_id not in ("sku-0001", "sku-0002") for i in result.items)
    assert [i.score for i in result.items] == sorted((i.score for i in result.items), reverse=True)
    assert result.items[0].meta is not None and result.items[0].meta.title.startswith("Product")
    assert result.timings.tokens == 1
    again = client.recommend(["sku-0001", "sku-0002"], top_k=5)
    assert again.items == result.items  # deterministic

    from runtime.types import ItemFilter

    beauty = client.recommend(["sku-0001"], top_k=3, filter=ItemFilter(categories=("Beauty",)))
    assert all(i.meta is not None and i.meta.category == "Beauty" for i in beauty.items)
    allowed = client.recommend(["sku-0001"], filter=ItemFilter(allow=("sku-0004", "sku-0006")))
    assert {i.item_id for i in allowed.items} == {"sku-0004", "sku-0006"}

    found = client.search("running shoes", ["sku-0001"], top_k=4)
    assert len(found.items) == 4
    assert engine.last_request.query == "running shoes"  # type: ignore[attr-defined]


def test_preference_explain_select(client: UnimpClient, engine: FakeEngine) -> None:
    history = [HistoryItem(item_id="sku-0001", rating=5, explanation="love it"),
               HistoryItem(meta=ItemMeta(title="Inline mug", brand="Acme"), image=tiny_png(), rating=2)]
    prediction = client.predict_preference("sku-0003", history)
    assert math.isclose(sum(prediction.rating_distribution), 1.0, rel_tol=1e-9)
    assert len(prediction.rating_distribution) == 5
    assert 1.0 <= prediction.expected_rating <= 5.0
    assert prediction.rating == 1 + max(range(5), key=lambda i: prediction.rating_distribution[i])
    sent = engine.last_request.history  # type: ignore[attr-defined]
    assert sent[1].meta.title == "Inline mug" and sent[1].image == tiny_png() and sent[1].rating == 2

    events = list(client.explain("sku-0003", history))
    pieces = [e for e in events if isinstance(e, TextPiece)]
    final = events[-1]
    assert isinstance(final, PreferenceResult) and len(pieces) == len(events) - 1 >= 3
    assert "".join(p.text for p in pieces) == final.explanation
    assert final.finish_reason == "eos"
    assert final.rating_distribution == prediction.rating_distribution

    from runtime.types import SamplingOptions

    short = list(client.explain("sku-0003", history, sampling=SamplingOptions(max_new_tokens=2)))
    assert isinstance(short[-1], PreferenceResult) and short[-1].finish_reason == "length" and len(short) == 3

    selection = client.select_items(["sku-0010", "sku-0011", "sku-0012"], ["sku-0001"], max_selected=2)
    assert len(selection.selected) == 2 and len(selection.scores) == 3
    assert math.isclose(sum(selection.scores), 1.0, rel_tol=1e-9)
    assert selection.scores[selection.selected[0]] == max(selection.scores)


def test_generate_image_streams_progress_then_png(client: UnimpClient) -> None:
    from runtime.api import ImageProgress, ImageResult

    events = list(client.generate_image("red shoes", ["sku-0001", "sku-0002"], steps=4, width=32, height=24, seed=7))
    assert [e.step for e in events[:-1] if isinstance(e, ImageProgress)] == [1, 2, 3, 4]
    final = events[-1]
    assert isinstance(final, ImageResult)
    assert final.prompt.startswith("red shoes") and (final.width, final.height) == (32, 24)
    with Image.open(io.BytesIO(final.png)) as img:
        assert img.format == "PNG" and img.size == (32, 24)


@pytest.mark.parametrize(
    ("name", "expected"), [("ddim", "ddim"), ("euler", "euler"), ("pndm", "pndm")]
)
def test_generate_image_carries_the_scheduler_enum(
    client: UnimpClient, engine: FakeEngine, name: str, expected: str
) -> None:
    from runtime.api import ImageScheduler

    list(client.generate_image("red shoes", ["sku-0001"], steps=2, width=32, height=32, scheduler=name))
    sent = engine.last_request.scheduler  # type: ignore[attr-defined]
    assert isinstance(sent, ImageScheduler) and sent is ImageScheduler(expected)


def test_unspecified_scheduler_is_ddim(stubs: Stubs, engine: FakeEngine) -> None:
    from runtime.api import ImageScheduler

    request = ppb.GenerateImageRequest(history=ids("sku-0001"), query="q", steps=1, width=32, height=32)
    list(stubs.p.GenerateImage(request, timeout=10))
    assert engine.last_request.scheduler is ImageScheduler.DDIM  # type: ignore[attr-defined]


def test_fake_engine_rejects_a_scheduler_string(engine: FakeEngine) -> None:
    from runtime.api import ImageRequest
    from runtime.types import InvalidRequest

    with pytest.raises(InvalidRequest) as info:
        list(engine.generate_image(ImageRequest(query="q", scheduler="pndm", steps=1)))  # type: ignore[arg-type]
    assert info.value.field == "scheduler" and str(info.value).startswith("scheduler: ")


def test_record_interaction_feeds_user_history(client: UnimpClient, engine: FakeEngine) -> None:
    assert client.record_interaction("user-1", "sku-0001", occurred_at_ms=1000).history_length == 1
    assert client.record_interaction("user-1", HistoryItem(item_id="sku-0002", rating=4), occurred_at_ms=3000).history_length == 2
    assert client.record_interaction("user-1", HistoryItem(meta=ItemMeta(title="Gift card")),
                                     occurred_at_ms=2000).history_length == 3
    result = client.recommend(user_id="user-1", history=["sku-0007"], top_k=3)
    assert len(result.items) == 3
    sent = engine.last_request.history  # type: ignore[attr-defined]
    assert [h.item_id or h.meta.title for h in sent] == ["sku-0001", "Gift card", "sku-0002", "sku-0007"]
    assert sent[2].rating == 4
    assert not {i.item_id for i in result.items} & {"sku-0001", "sku-0002", "sku-0007"}
    with pytest.raises(RpcError) as info:
        client.recommend(user_id="user-unknown")
    assert info.value.code == grpc.StatusCode.NOT_FOUND and info.value.field == "user_id"


def test_catalog_crud_and_paging(client: UnimpClient, engine: FakeEngine) -> None:
    created = client.upsert_item("new-1", ItemMeta(title="New thing", category="Toys"), tiny_png(), available=True)
    assert created.created and created.item.token == -1 and created.item.has_image
    fetched = client.get_item("new-1", include_image=True)
    assert fetched.item.meta.title == "New thing" and fetched.image == tiny_png()
    updated = client.upsert_item("sku-0003", available=False)
    assert not updated.created and updated.item.token == 3 and not updated.item.available
    assert updated.item.meta.title == "Product 3"  # unset attributes are kept
    assert "sku-0003" not in {i.item_id for i in client.recommend(["sku-0001"], top_k=40).items}

    seen = [item.item_id for item in client.iter_items(page_size=7)]
    assert len(seen) == 41 and len(set(seen)) == 41 and seen == sorted(seen)
    first = client.list_items(page_size=7)
    assert len(first.items) == 7 and first.next_page_token

    client.delete_item("sku-0004")
    with pytest.raises(RpcError) as info:
        client.get_item("sku-0004")
    assert info.value.code == grpc.StatusCode.NOT_FOUND and info.value.field == "item_id"
    with pytest.raises(RpcError) as info:
        client.recommend(["sku-0004"])
    assert info.value.code == grpc.StatusCode.NOT_FOUND and info.value.field == "history[0].item_id"


# -- bad input -------------------------------------------------------------------------------------

EMPTY_REQUESTS = [
    ("p", "Recommend", ppb.RecommendRequest(), grpc.StatusCode.INVALID_ARGUMENT, "history"),
    ("p", "Search", ppb.SearchRequest(), grpc.StatusCode.INVALID_ARGUMENT, "history"),
    ("p", "PredictPreference", ppb.PredictPreferenceRequest(), grpc.StatusCode.INVALID_ARGUMENT, "history"),
    ("p", "Explain", ppb.ExplainRequest(), grpc.StatusCode.INVALID_ARGUMENT, "history"),
    ("p", "SelectItems", ppb.SelectItemsRequest(), grpc.StatusCode.INVALID_ARGUMENT, "history"),
    ("p", "GenerateImage", ppb.GenerateImageRequest(), grpc.StatusCode.INVALID_ARGUMENT, "history"),
    ("p", "RecordInteraction", ppb.RecordInteractionRequest(), grpc.StatusCode.INVALID_ARGUMENT, "user_id"),
    ("c", "UpsertItem", cpb.UpsertItemRequest(), grpc.StatusCode.INVALID_ARGUMENT, "item_id"),
    ("c", "GetItem", cpb.GetItemRequest(), grpc.StatusCode.INVALID_ARGUMENT, "item_id"),
    ("c", "DeleteItem", cpb.DeleteItemRequest(), grpc.StatusCode.INVALID_ARGUMENT, "item_id"),
]


def test_empty_request_to_every_rpc(stubs: Stubs) -> None:
    for service, method, request, code, field in EMPTY_REQUESTS:
        stub = stubs.p if service == "p" else stubs.c
        expect_error(lambda: getattr(stub, method)(request, timeout=5), code, field)  # noqa: B023
    # ListItems documents an empty request as "the first page".
    page = stubs.c.ListItems(cpb.ListItemsRequest(), timeout=5)
    assert len(page.items) == 40 and page.next_page_token == ""
    assert stubs.health() == health_pb2.HealthCheckResponse.SERVING
    assert len(stubs.p.Recommend(ppb.RecommendRequest(history=ids("sku-0001")), timeout=5).items) == 10


def _bad_inputs() -> list[tuple[str, str, Any, grpc.StatusCode, str]]:
    inv, nf = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND
    h = ids("sku-0001")
    rec = ppb.RecommendRequest
    inline = ppb.InlineItem
    attrs = cpb.ItemAttributes
    return [
        ("p", "Recommend", rec(history=[ppb.HistoryItem()]), inv, "history[0]"),
        ("p", "Recommend", rec(history=ids("nope")), nf, "history[0].item_id"),
        ("p", "Recommend", rec(history=ids("sku-0001", "has space")), inv, "history[1].item_id"),
        ("p", "Recommend", rec(history=ids("x" * 500)), inv, "history[0].item_id"),
        ("p", "Recommend", rec(history=[ppb.HistoryItem(item_id="sku-0001", rating=9)]), inv, "history[0].rating"),
        ("p", "Recommend", rec(history=[ppb.HistoryItem(inline_item=inline())]), inv, "history[0].inline_item"),
        ("p", "Recommend", rec(history=[ppb.HistoryItem(inline_item=inline(attributes=attrs(title="a <image> b")))]),
         inv, "history[0].inline_item.attributes.title"),
        ("p", "Recommend", rec(history=[ppb.HistoryItem(inline_item=inline(attributes=attrs(brand="a\x00b")))]),
         inv, "history[0].inline_item.attributes.brand"),
        ("p", "Recommend", rec(history=[ppb.HistoryItem(inline_item=inline(image=b"not an image"))]),
         inv, "history[0].inline_item.image"),
        ("p", "Recommend", rec(history=ids(*["sku-0001"] * 65)), inv, "history"),
        ("p", "Recommend", rec(history=h, options=ppb.DecodeOptions(top_k=-1)), inv, "options.top_k"),
        ("p", "Recommend", rec(history=h, options=ppb.DecodeOptions(top_k=1000)), inv, "options.top_k"),
        ("p", "Recommend", rec(history=h, options=ppb.DecodeOptions(mode=cast(Any, 7))), inv, "options.mode"),
        ("p", "Recommend", rec(history=h, options=ppb.DecodeOptions(
            filter=ppb.ItemFilter(allow_item_ids=["sku-0002", ""]))), inv, "options.filter.allow_item_ids[1]"),
        ("p", "Recommend", rec(history=h, options=ppb.DecodeOptions(
            top_k=5, mode=ppb.DECODE_MODE_BEAM, beam=ppb.BeamOptions(num_beams=3))), inv, "options.beam.num_beams"),
        ("p", "Recommend", rec(user_id="ghost"), nf, "user_id"),
        ("p", "Recommend", rec(user_id="bad user"), inv, "user_id"),
        ("p", "Search", ppb.SearchRequest(history=h), inv, "query"),
        ("p", "Search", ppb.SearchRequest(history=h, query="q" * 5000), inv, "query"),
        ("p", "PredictPreference", ppb.PredictPreferenceRequest(history=h), inv, "target"),
        ("p", "PredictPreference", ppb.PredictPreferenceRequest(history=h, target=ppb.HistoryItem(item_id="zz")),
         nf, "target.item_id"),
        ("p", "Explain", ppb.ExplainRequest(history=h, target=h[0], sampling=ppb.SamplingOptions(
            temperature=float("nan"))), inv, "sampling.temperature"),
        ("p", "Explain", ppb.ExplainRequest(history=h, target=h[0], sampling=ppb.SamplingOptions(top_p=1.5)),
         inv, "sampling.top_p"),
        ("p", "Explain", ppb.ExplainRequest(history=h, target=h[0], sampling=ppb.SamplingOptions(
            max_new_tokens=100000)), inv, "sampling.max_new_tokens"),
        ("p", "SelectItems", ppb.SelectItemsRequest(history=h), inv, "candidates"),
        ("p", "SelectItems", ppb.SelectItemsRequest(history=h, candidates=ids(*["sku-0002"] * 6)), inv, "candidates"),
        ("p", "SelectItems", ppb.SelectItemsRequest(history=h, candidates=ids("sku-0002", "sku-0003"),
                                                    max_selected=4), inv, "max_selected"),
        ("p", "SelectItems", ppb.SelectItemsRequest(history=h, candidates=ids("sku-0002", "nope")), nf,
         "candidates[1].item_id"),
        ("p", "GenerateImage", ppb.GenerateImageRequest(history=h), inv, "query"),
        ("p", "GenerateImage", ppb.GenerateImageRequest(history=h, query="q", width=30), inv, "width"),
        ("p", "GenerateImage", ppb.GenerateImageRequest(history=h, query="q", height=4096), inv, "height"),
        ("p", "GenerateImage", ppb.GenerateImageRequest(history=h, query="q", steps=1000), inv, "steps"),
        ("p", "GenerateImage", ppb.GenerateImageRequest(history=h, query="q", guidance_scale=float("inf")), inv,
         "guidance_scale"),
        ("p", "GenerateImage", ppb.GenerateImageRequest(history=h, query="q", scheduler=cast(Any, 9)), inv, "scheduler"),
        ("p", "RecordInteraction", ppb.RecordInteractionRequest(user_id="u"), inv, "item"),
        ("p", "RecordInteraction", ppb.RecordInteractionRequest(user_id="u", item=h[0], occurred_at_unix_ms=-5), inv,
         "occurred_at_unix_ms"),
        ("p", "RecordInteraction", ppb.RecordInteractionRequest(user_id="u", item=ppb.HistoryItem(item_id="nope")),
         nf, "item.item_id"),
        ("c", "UpsertItem", cpb.UpsertItemRequest(item_id="x" * 200), inv, "item_id"),
        ("c", "UpsertItem", cpb.UpsertItemRequest(item_id="n1", image=b"GIF89a-garbage"), inv, "image"),
        ("c", "UpsertItem", cpb.UpsertItemRequest(item_id="n1", attributes=attrs(price="<answer>")), inv,
         "attributes.price"),
        ("c", "GetItem", cpb.GetItemRequest(item_id="nope"), nf, "item_id"),
        ("c", "ListItems", cpb.ListItemsRequest(page_size=-1), inv, "page_size"),
        ("c", "ListItems", cpb.ListItemsRequest(page_size=100000), inv, "page_size"),
        ("c", "ListItems", cpb.ListItemsRequest(page_token="garbage"), inv, "page_token"),
        ("c", "DeleteItem", cpb.DeleteItemRequest(item_id="nope"), nf, "item_id"),
    ]


def test_documented_bad_inputs(stubs: Stubs, engine: FakeEngine) -> None:
    for service, method, request, code, field in _bad_inputs():
        stub = stubs.p if service == "p" else stubs.c
        expect_error(lambda: getattr(stub, method)(request, timeout=5), code, field)  # noqa: B023
    assert engine.calls == {}  # nothing invalid reached the engine
    assert stubs.health() == health_pb2.HealthCheckResponse.SERVING
    assert len(stubs.p.Recommend(ppb.RecommendRequest(history=ids("sku-0001")), timeout=5).items) == 10


def test_malformed_bytes_are_invalid_argument(channel: grpc.Channel) -> None:
    for method in ("/unimp.v1.Personalization/Recommend", "/unimp.v1.Catalog/GetItem"):
        call = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
        expect_error(lambda: call(b"\xff\xff\xff\xff\x0f", timeout=5), grpc.StatusCode.INVALID_ARGUMENT,  # noqa: B023
                     "request")
    stream = channel.unary_stream("/unimp.v1.Personalization/Explain", request_serializer=None,
                                  response_deserializer=None)
    expect_error(lambda: list(stream(b"\x12\x05\x0a", timeout=5)), grpc.StatusCode.INVALID_ARGUMENT, "request")


def test_image_limits(tmp_path: Path) -> None:
    config = make_config(tmp_path, limits__max_image_bytes=20_000, limits__max_image_pixels=100 * 100)
    with ServerThread(config, FakeEngine()) as server, grpc.insecure_channel(server.target) as channel:
        stubs = Stubs(channel)

        def with_image(data: bytes) -> Callable[[], Any]:
            item = ppb.HistoryItem(inline_item=ppb.InlineItem(image=data))
            return lambda: stubs.p.Recommend(ppb.RecommendRequest(history=[item]), timeout=5)

        field = "history[0].inline_item.image"
        bomb = png_claiming(60_000, 60_000)
        assert len(bomb) < 200  # a tiny file that would decode to 10.8 GB
        err = expect_error(with_image(bomb), grpc.StatusCode.INVALID_ARGUMENT, field)
        assert "pixels" in err.details()
        err = expect_error(with_image(png_claiming(101, 100)), grpc.StatusCode.INVALID_ARGUMENT, field)
        assert "10100" in err.details()
        noise = io.BytesIO()
        Image.frombytes("RGB", (80, 80), bytes(range(256)) * 75).save(noise, format="BMP")
        expect_error(with_image(noise.getvalue()), grpc.StatusCode.INVALID_ARGUMENT, field)  # not an allowed format
        big = io.BytesIO()
        Image.frombytes("L", (99, 99), bytes((i * 7919) % 251 for i in range(99 * 99))).save(big, format="PNG",
                                                                                           compress_level=0)
        assert len(big.getvalue()) > 9_000
        truncated = tiny_png(16)[:-20]
        expect_error(with_image(truncated), grpc.StatusCode.INVALID_ARGUMENT, field)
        oversized = big.getvalue() + b"\0" * 20_000
        err = expect_error(with_image(oversized), grpc.StatusCode.INVALID_ARGUMENT, field)
        assert "bytes" in err.details()
        assert len(with_image(big.getvalue())().items) == 10  # within both limits
        # Header and checksums valid, pixel data short: passes the edge checks (the engine decodes it).
        assert len(with_image(png_claiming(100, 100))().items) == 10
        assert stubs.health() == health_pb2.HealthCheckResponse.SERVING


def test_message_size_limit(tmp_path: Path) -> None:
    config = make_config(tmp_path, limits__max_message_bytes=64 * 1024)
    with ServerThread(config, FakeEngine()) as server, grpc.insecure_channel(server.target) as channel:
        stubs = Stubs(channel)
        huge = ppb.HistoryItem(inline_item=ppb.InlineItem(image=b"\0" * 100_000))
        expect_error(lambda: stubs.p.Recommend(ppb.RecommendRequest(history=[huge]), timeout=5),
                     grpc.StatusCode.RESOURCE_EXHAUSTED)
        assert stubs.health() == health_pb2.HealthCheckResponse.SERVING


# -- cancellation, deadlines, overload -----------------------------------------------------------


def assert_work_stopped(engine: FakeEngine, name: str, total_steps: int, step_delay: float) -> None:
    """The engine's cancel token was set and no step ran after it; the work did not reach its end."""
    request = engine.last_request
    cancel = getattr(request, "cancel", None)
    assert cancel is not None and (cancel.cancelled or (cancel.deadline is not None
                                                         and time.monotonic() > cancel.deadline))
    done = engine.steps_done.get(name, 0)
    time.sleep(4 * step_delay)  # a still-running loop would have done more steps by now
    assert engine.steps_done.get(name, 0) == done
    assert done < total_steps, (done, total_steps)
    assert engine.finished.get(name, 0) == 0


def test_client_cancel_mid_stream_stops_engine(server: ServerThread, client: UnimpClient, engine: FakeEngine) -> None:
    engine.step_delay = 0.05
    events = client.explain("sku-0003", ["sku-0001"])
    first = next(events)
    assert isinstance(first, TextPiece)
    events.close()  # leaves the stream early: the client cancels the RPC
    assert wait_until(lambda: engine.cancelled.get("explain", 0) == 1)
    request = engine.last_request
    assert isinstance(request, PreferenceRequest) and request.cancel.cancelled  # the server set the token
    assert_work_stopped(engine, "explain", len(EXPLANATION), engine.step_delay)
    assert wait_until(lambda: server.server.metrics.value(
        "unimp_cancelled_requests_total", {"rpc": "Explain", "reason": "client"}) == 1)
    assert wait_until(lambda: server.server.servicer.inflight == 0)


def test_deadline_cancels_unary_work(server: ServerThread, stubs: Stubs, engine: FakeEngine) -> None:
    engine.gate = threading.Event()  # never opened: the work can only end through the deadline
    expect_error(lambda: stubs.p.Recommend(ppb.RecommendRequest(history=ids("sku-0001")), timeout=0.25),
                 grpc.StatusCode.DEADLINE_EXCEEDED)
    assert wait_until(lambda: engine.cancelled.get("recommend", 0) == 1, timeout=10)
    assert_work_stopped(engine, "recommend", engine.steps, 0.05)
    assert wait_until(lambda: server.server.metrics.value(
        "unimp_cancelled_requests_total", {"rpc": "Recommend", "reason": "deadline"}) == 1)
    assert wait_until(lambda: server.server.servicer.inflight == 0)


def test_deadline_mid_stream_cancels_generation(server: ServerThread, stubs: Stubs, engine: FakeEngine) -> None:
    engine.step_delay = 0.1  # 150 steps: 15 s of work, ten times the deadline
    request = ppb.GenerateImageRequest(history=ids("sku-0001"), query="lamp", steps=150)
    received: list[Any] = []

    def consume() -> None:
        for message in stubs.p.GenerateImage(request, timeout=1.5):
            received.append(message)

    expect_error(consume, grpc.StatusCode.DEADLINE_EXCEEDED)
    assert 1 <= len(received) < 150
    assert wait_until(lambda: engine.cancelled.get("generate_image", 0) == 1)
    assert_work_stopped(engine, "generate_image", 100, engine.step_delay)
    assert wait_until(lambda: server.server.metrics.value(
        "unimp_cancelled_requests_total", {"rpc": "GenerateImage", "reason": "deadline"}) == 1)
    assert wait_until(lambda: server.server.servicer.inflight == 0)


def test_overload_is_resource_exhausted(tmp_path: Path) -> None:
    engine = FakeEngine()
    engine.gate = threading.Event()
    with ServerThread(make_config(tmp_path, max_inflight=2), engine) as server, \
            grpc.insecure_channel(server.target) as channel:
        stubs = Stubs(channel)
        request = ppb.RecommendRequest(history=ids("sku-0001"))
        futures = [stubs.p.Recommend.future(request, timeout=10) for _ in range(2)]
        assert engine.started.acquire(timeout=5) and engine.started.acquire(timeout=5)
        err = expect_error(lambda: stubs.p.Recommend(request, timeout=5), grpc.StatusCode.RESOURCE_EXHAUSTED)
        assert "retry" in err.details()
        assert stubs.health() == health_pb2.HealthCheckResponse.SERVING  # health is not admission-limited
        assert server.server.metrics.value("unimp_rejected_requests_total",
                                           {"rpc": "Recommend", "reason": "overload"}) == 1
        engine.gate.set()
        assert all(len(f.result(timeout=5).items) == 10 for f in futures)
        assert len(stubs.p.Recommend(request, timeout=5).items) == 10


def test_cheap_rpcs_are_admitted_while_every_model_slot_is_held(tmp_path: Path) -> None:
    engine = FakeEngine()
    engine.gate = threading.Event()
    with ServerThread(make_config(tmp_path, max_inflight=2), engine) as server, \
            grpc.insecure_channel(server.target) as channel:
        stubs = Stubs(channel)
        request = ppb.RecommendRequest(history=ids("sku-0001"))
        futures = [stubs.p.Recommend.future(request, timeout=10) for _ in range(2)]
        assert engine.started.acquire(timeout=5) and engine.started.acquire(timeout=5)
        expect_error(lambda: stubs.p.Recommend(request, timeout=5), grpc.StatusCode.RESOURCE_EXHAUSTED)
        for _ in range(5):  # every cheap RPC, several times, with both model slots taken
            assert stubs.c.GetItem(cpb.GetItemRequest(item_id="sku-0002"), timeout=5).item.item_id == "sku-0002"
            assert len(stubs.c.ListItems(cpb.ListItemsRequest(page_size=3), timeout=5).items) == 3
            stubs.c.UpsertItem(cpb.UpsertItemRequest(item_id="new-1"), timeout=5)
            stubs.c.DeleteItem(cpb.DeleteItemRequest(item_id="new-1"), timeout=5)
            stubs.p.RecordInteraction(ppb.RecordInteractionRequest(
                user_id="alice", item=ppb.HistoryItem(item_id="sku-0003")), timeout=5)
        assert server.server.metrics.value("unimp_rejected_requests_total",
                                           {"rpc": "GetItem", "reason": "overload"}) == 0
        assert server.server.servicer.admission.inflight == 2
        engine.gate.set()
        assert all(len(f.result(timeout=5).items) == 10 for f in futures)


def test_cheap_rpcs_have_their_own_bound(tmp_path: Path) -> None:
    engine = FakeEngine()
    release = threading.Event()
    entered = threading.Semaphore(0)
    page = engine.catalog.page

    def slow_page(size: int, token: str = "") -> Any:
        entered.release()
        release.wait(10)
        return page(size, token)

    engine.catalog.page = slow_page  # type: ignore[method-assign]
    with ServerThread(make_config(tmp_path, max_inflight_cheap=1), engine) as server, \
            grpc.insecure_channel(server.target) as channel:
        stubs = Stubs(channel)
        held = stubs.c.ListItems.future(cpb.ListItemsRequest(page_size=2), timeout=10)
        assert entered.acquire(timeout=5)
        err = expect_error(lambda: stubs.c.GetItem(cpb.GetItemRequest(item_id="sku-0002"), timeout=5),
                           grpc.StatusCode.RESOURCE_EXHAUSTED)
        assert "catalog and interaction requests" in err.details()
        assert server.server.metrics.value("unimp_rejected_requests_total",
                                           {"rpc": "GetItem", "reason": "overload_cheap"}) == 1
        assert len(stubs.p.Recommend(ppb.RecommendRequest(history=ids("sku-0001")), timeout=5).items) == 10
        release.set()
        assert len(held.result(timeout=5).items) == 2
        assert stubs.c.GetItem(cpb.GetItemRequest(item_id="sku-0002"), timeout=5).item.item_id == "sku-0002"


def _explain(beams: int, tokens: int) -> ppb.ExplainRequest:
    return ppb.ExplainRequest(history=[ppb.HistoryItem(item_id="sku-0001", rating=4)],
                              target=ppb.HistoryItem(item_id="sku-0003"),
                              sampling=ppb.SamplingOptions(num_beams=beams, max_new_tokens=tokens))


def test_model_requests_hold_their_decode_cost(tmp_path: Path) -> None:
    engine = FakeEngine()
    engine.gate = threading.Event()
    with ServerThread(make_config(tmp_path, max_inflight_cost=1000), engine) as server, \
            grpc.insecure_channel(server.target) as channel:
        stubs = Stubs(channel)
        metrics = server.server.metrics
        # alone, a request larger than the whole budget still runs (16 beams x 512 tokens = 8192)
        big = stubs.p.Explain(_explain(16, 512), timeout=10)
        assert engine.started.acquire(timeout=5)
        assert metrics.value("unimp_inflight_cost") == 16 * 512
        err = expect_error(lambda: stubs.p.Recommend(ppb.RecommendRequest(history=ids("sku-0001")), timeout=5),
                           grpc.StatusCode.RESOURCE_EXHAUSTED)
        assert "decode row-steps" in err.details()
        engine.gate.set()
        assert list(big)[-1].WhichOneof("event") == "result"
        assert wait_until(lambda: metrics.value("unimp_inflight_cost") == 0)

        engine.gate.clear()
        held = stubs.p.Explain(_explain(2, 400), timeout=10)  # 800 of 1000
        assert engine.started.acquire(timeout=5)
        assert metrics.value("unimp_inflight_cost") == 800
        expect_error(lambda: list(stubs.p.Explain(_explain(1, 300), timeout=5)), grpc.StatusCode.RESOURCE_EXHAUSTED)
        assert metrics.value("unimp_rejected_requests_total", {"rpc": "Explain", "reason": "cost"}) == 1
        # a beam Recommend costs num_beams x max_new_tokens: 10 x 50 = 500 does not fit either
        beam = ppb.RecommendRequest(history=ids("sku-0001"),
                                    options=ppb.DecodeOptions(mode=ppb.DECODE_MODE_BEAM))
        expect_error(lambda: stubs.p.Recommend(beam, timeout=5), grpc.StatusCode.RESOURCE_EXHAUSTED)
        # cheap model requests (cost 1) and non-model requests still run
        small = stubs.p.Recommend.future(ppb.RecommendRequest(history=ids("sku-0001")), timeout=10)
        assert engine.started.acquire(timeout=5)
        assert metrics.value("unimp_inflight_cost") == 801
        assert stubs.c.GetItem(cpb.GetItemRequest(item_id="sku-0002"), timeout=5).item.item_id == "sku-0002"
        engine.gate.set()
        assert len(small.result(timeout=5).items) == 10
        assert list(held)[-1].WhichOneof("event") == "result"
        assert wait_until(lambda: metrics.value("unimp_inflight_cost") == 0)
        assert list(stubs.p.Explain(_explain(1, 300), timeout=5))[-1].WhichOneof("event") == "result"


def test_engine_errors_map_to_status(tmp_path: Path) -> None:
    engine = FakeEngine(diffusion=False)
    with ServerThread(make_config(tmp_path), engine) as server, grpc.insecure_channel(server.target) as channel:
        stubs = Stubs(channel)
        request = ppb.RecommendRequest(history=ids("sku-0001"))
        engine.fail_next = Overloaded("scheduler queue is full")
        err = expect_error(lambda: stubs.p.Recommend(request, timeout=5), grpc.StatusCode.RESOURCE_EXHAUSTED)
        assert "queue is full" in err.details()
        assert len(stubs.p.Recommend(request, timeout=5).items) == 10
        expect_error(lambda: stubs.p.GenerateImage(ppb.GenerateImageRequest(history=ids("sku-0001"), query="q"),
                                                   timeout=5), grpc.StatusCode.UNAVAILABLE)
        engine.fail_next = ZeroDivisionError("bug")  # type: ignore[assignment]
        err = expect_error(lambda: stubs.p.Recommend(request, timeout=5), grpc.StatusCode.INTERNAL)
        assert "bug" not in err.details() and "request id" in err.details()
        assert stubs.health() == health_pb2.HealthCheckResponse.SERVING


# -- auth and TLS --------------------------------------------------------------------------------


def test_tokens(tmp_path: Path) -> None:
    config = make_config(tmp_path, auth__tokens={"store-1": "tok-store-1", "store-2": "tok-store-2"},
                         auth__admin_token="tok-admin")
    with ServerThread(config, FakeEngine()) as server:
        def code_of(token: str | None, call: Callable[[UnimpClient], Any]) -> grpc.StatusCode | None:
            with UnimpClient(server.target, token=token, timeout=5) as c:
                try:
                    call(c)
                    return None
                except RpcError as exc:
                    return exc.code

        def rec(c: UnimpClient) -> Any:
            return c.recommend(["sku-0001"])

        def upsert(c: UnimpClient) -> Any:
            return c.upsert_item("new-9", ItemMeta(title="x"))

        assert code_of(None, rec) == grpc.StatusCode.UNAUTHENTICATED
        assert code_of("wrong", rec) == grpc.StatusCode.UNAUTHENTICATED
        assert code_of("tok-store-1", rec) is None
        assert code_of("tok-store-1", lambda c: c.get_item("sku-0001")) is None
        assert code_of("tok-store-1", upsert) == grpc.StatusCode.PERMISSION_DENIED
        assert code_of("tok-store-1", lambda c: c.delete_item("sku-0001")) == grpc.StatusCode.PERMISSION_DENIED
        assert code_of(None, upsert) == grpc.StatusCode.UNAUTHENTICATED
        assert code_of("tok-admin", upsert) is None
        assert code_of(None, lambda c: list(c.explain("sku-0002", ["sku-0001"]))) == grpc.StatusCode.UNAUTHENTICATED
        assert code_of(None, lambda c: c.health()) is None  # health is open to load balancers

        # Tenants do not see each other's users.
        with UnimpClient(server.target, token="tok-store-1") as one, UnimpClient(server.target, token="tok-store-2") as two:
            one.record_interaction("shared-id", "sku-0001")
            assert one.recommend(user_id="shared-id").items
            with pytest.raises(RpcError) as info:
                two.recommend(user_id="shared-id")
            assert info.value.code == grpc.StatusCode.NOT_FOUND

        with grpc.insecure_channel(server.target) as channel:
            from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
                ProtoReflectionDescriptorDatabase,
            )

            with pytest.raises(grpc.RpcError) as err:
                ProtoReflectionDescriptorDatabase(channel).get_services()
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert server.server.metrics.value("unimp_requests_total",
                                           {"rpc": "UpsertItem", "code": "PERMISSION_DENIED"}) == 1


def test_binding_other_addresses_needs_tls_and_token(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"host: binding 0\.0\.0\.0 needs TLS"):
        ServerThread(make_config(tmp_path, host="0.0.0.0"), FakeEngine())
    with pytest.raises(ConfigError, match="needs TLS"):
        ServerThread(make_config(tmp_path, host="0.0.0.0", auth__tokens={"t": "secret"}), FakeEngine())
    with ServerThread(make_config(tmp_path, host="0.0.0.0", insecure=True), FakeEngine()) as server:
        with UnimpClient(f"127.0.0.1:{server.port}") as c:
            assert c.health() == "SERVING"


def _certificates(directory: Path) -> dict[str, Path]:
    """A CA, a server certificate for localhost / 127.0.0.1 and a client certificate, as PEM files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def issue(subject: str, key: Any, issuer: Any, issuer_key: Any, ca: bool, usage: Any = None,
              sans: list[Any] | None = None) -> x509.Certificate:
        builder = (x509.CertificateBuilder().subject_name(name(subject)).issuer_name(issuer)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if usage is not None:
            builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return builder.sign(issuer_key, hashes.SHA256())

    keys = {n: ec.generate_private_key(ec.SECP256R1()) for n in ("ca", "server", "client")}
    ca = issue("unimp test CA", keys["ca"], name("unimp test CA"), keys["ca"], ca=True)
    server = issue("localhost", keys["server"], ca.subject, keys["ca"], ca=False, usage=ExtendedKeyUsageOID.SERVER_AUTH,
                   sans=[x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    client = issue("pos-terminal-1", keys["client"], ca.subject, keys["ca"], ca=False,
                   usage=ExtendedKeyUsageOID.CLIENT_AUTH)
    out: dict[str, Path] = {}
    for label, cert in (("ca", ca), ("server", server), ("client", client)):
        out[f"{label}.crt"] = directory / f"{label}.crt"
        out[f"{label}.crt"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        out[f"{label}.key"] = directory / f"{label}.key"
        out[f"{label}.key"].write_bytes(keys[label].private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return out


def test_tls_and_mutual_tls(tmp_path: Path) -> None:
    pem = _certificates(tmp_path)
    trusted = ClientTls.from_files(ca=pem["ca.crt"], server_name="localhost")
    with ServerThread(make_config(tmp_path, tls__cert=pem["server.crt"], tls__key=pem["server.key"]),
                      FakeEngine()) as server:
        with UnimpClient(server.target, tls=trusted, timeout=5) as c:
            assert len(c.recommend(["sku-0001"], top_k=3).items) == 3
        with UnimpClient(server.target, timeout=2) as plain, pytest.raises(RpcError) as info:
            plain.recommend(["sku-0001"])
        assert info.value.code == grpc.StatusCode.UNAVAILABLE
        untrusted = ClientTls.from_files(ca=pem["client.crt"], server_name="localhost")
        with UnimpClient(server.target, tls=untrusted, timeout=2) as c, pytest.raises(RpcError) as info:
            c.recommend(["sku-0001"])
        assert info.value.code == grpc.StatusCode.UNAVAILABLE

    mtls = make_config(tmp_path, tls__cert=pem["server.crt"], tls__key=pem["server.key"], tls__client_ca=pem["ca.crt"])
    with ServerThread(mtls, FakeEngine()) as server:
        with UnimpClient(server.target, tls=trusted, timeout=2) as c, pytest.raises(RpcError) as info:
            c.recommend(["sku-0001"])
        assert info.value.code == grpc.StatusCode.UNAVAILABLE
        with_cert = ClientTls.from_files(pem["ca.crt"], pem["client.crt"], pem["client.key"], server_name="localhost")
        with UnimpClient(server.target, tls=with_cert, timeout=5) as c:
            assert len(c.recommend(["sku-0001"], top_k=3).items) == 3
            assert [type(e).__name__ for e in c.explain("sku-0002", ["sku-0001"])][-1] == "PreferenceResult"


# -- lifecycle -----------------------------------------------------------------------------------


def test_interactions_and_catalog_edits_survive_restart(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    with ServerThread(config, FakeEngine()) as server, UnimpClient(server.target) as c:
        c.upsert_item("new-1", ItemMeta(title="Lamp", category="Home"), tiny_png(8))
        c.upsert_item("new-1", available=False)
        c.upsert_item("sku-0003", ItemMeta(title="Renamed"))
        c.delete_item("sku-0005")
        c.record_interaction("u1", "sku-0001", occurred_at_ms=10)
        c.record_interaction("u1", HistoryItem(meta=ItemMeta(title="Cash purchase"), image=tiny_png(), rating=3),
                             occurred_at_ms=20)
        c.record_interaction("u1", "new-1", occurred_at_ms=30)

    engine = FakeEngine()
    with ServerThread(make_config(tmp_path), engine) as server, UnimpClient(server.target) as c:
        lamp = c.get_item("new-1", include_image=True)
        assert lamp.item.meta.title == "Lamp" and not lamp.item.available and lamp.image == tiny_png(8)
        renamed = c.get_item("sku-0003").item
        assert renamed.meta.title == "Renamed" and renamed.token == 3
        with pytest.raises(RpcError) as info:
            c.get_item("sku-0005")
        assert info.value.code == grpc.StatusCode.NOT_FOUND
        assert c.recommend(user_id="u1").items
        sent = engine.last_request.history  # type: ignore[attr-defined]
        assert [h.item_id or h.meta.title for h in sent] == ["sku-0001", "Cash purchase", "new-1"]
        assert sent[1].image == tiny_png() and sent[1].rating == 3


def test_health_not_serving_until_engine_loaded(tmp_path: Path) -> None:
    release = threading.Event()
    engine = FakeEngine()

    def slow_open() -> FakeEngine:
        release.wait(10)
        return engine

    server = ServerThread(make_config(tmp_path), engine_factory=slow_open, wait_loaded=False)
    try:
        with grpc.insecure_channel(server.target) as channel:
            stubs = Stubs(channel)
            assert stubs.health() == health_pb2.HealthCheckResponse.NOT_SERVING
            assert stubs.health("unimp.v1.Personalization") == health_pb2.HealthCheckResponse.NOT_SERVING
            err = expect_error(lambda: stubs.p.Recommend(ppb.RecommendRequest(history=ids("sku-0001")), timeout=5),
                               grpc.StatusCode.UNAVAILABLE)
            assert "loading" in err.details()
            release.set()
            assert wait_until(lambda: stubs.health() == health_pb2.HealthCheckResponse.SERVING)
            assert len(stubs.p.Recommend(ppb.RecommendRequest(history=ids("sku-0001")), timeout=5).items) == 10
    finally:
        release.set()
        server.stop()
    assert engine.closed  # an engine the server opened is closed by it


def test_engine_load_failure_keeps_not_serving(tmp_path: Path) -> None:
    def broken() -> FakeEngine:
        raise FileNotFoundError("manifest.json not found")

    with ServerThread(make_config(tmp_path), engine_factory=broken) as server, \
            grpc.insecure_channel(server.target) as channel:
        stubs = Stubs(channel)
        assert server.server.loaded.result() is False
        assert stubs.health() == health_pb2.HealthCheckResponse.NOT_SERVING
        err = expect_error(lambda: stubs.p.Recommend(ppb.RecommendRequest(history=ids("x")), timeout=5),
                           grpc.StatusCode.UNAVAILABLE)
        assert "manifest.json not found" in err.details()


def test_graceful_shutdown(tmp_path: Path) -> None:
    engine = FakeEngine()
    engine.step_delay = 0.1  # 0.8 s per call
    server = ServerThread(make_config(tmp_path), engine)
    channel = grpc.insecure_channel(server.target)
    stubs = Stubs(channel)
    request = ppb.RecommendRequest(history=ids("sku-0001"))
    in_flight = stubs.p.Recommend.future(request, timeout=10)
    assert engine.started.acquire(timeout=5)
    stopper = threading.Thread(target=server.stop, kwargs={"grace": 5.0})
    stopper.start()
    assert wait_until(lambda: server.server.servicer.state.value == "draining")
    err = expect_error(lambda: stubs.p.Recommend(request, timeout=5), grpc.StatusCode.UNAVAILABLE)
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    assert len(in_flight.result(timeout=5).items) == 10  # the in-flight call finished normally
    stopper.join(timeout=10)
    assert not stopper.is_alive()
    assert engine.finished.get("recommend") == 1
    channel.close()


# -- metrics, logs, config, CLI ------------------------------------------------------------------


def test_metrics_endpoint(server: ServerThread, client: UnimpClient) -> None:
    client.recommend(["sku-0001"])
    list(client.explain("sku-0002", ["sku-0001"]))
    with pytest.raises(RpcError):
        client.recommend([])
    port = server.server.metrics_port
    assert port
    text = scrape(port)
    assert 'unimp_requests_total{code="OK",rpc="Recommend"} 1.0' in text
    assert 'unimp_requests_total{code="INVALID_ARGUMENT",rpc="Recommend"} 1.0' in text
    assert 'unimp_request_latency_seconds_count{rpc="Explain"} 1.0' in text
    assert 'unimp_time_to_first_token_seconds_count{rpc="Explain"} 1.0' in text
    assert 'unimp_tokens_per_second_count{rpc="Explain"} 1.0' in text
    assert "unimp_inflight_requests 0.0" in text
    assert "unimp_kv_cache_bytes 2048.0" in text
    assert "unimp_prefix_cache_bytes 4096.0" in text
    assert "unimp_prefix_cache_hit_ratio 0.5" in text
    assert "unimp_engine_queue_depth 0.0" in text
    assert 'unimp_backend_provider_info{graph="decoder",provider="CUDAExecutionProvider",rank="0"} 1.0' in text
    assert 'unimp_backend_provider_info{graph="decoder",provider="CPUExecutionProvider",rank="1"} 1.0' in text


def test_request_ids_in_metadata_and_json_logs(server: ServerThread, stubs: Stubs) -> None:
    import logging

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JsonFormatter())
    servicer_logger = logging.getLogger("runtime.server.servicer")
    servicer_logger.addHandler(handler)
    old_level = servicer_logger.level
    servicer_logger.setLevel(logging.INFO)
    try:
        _, call = stubs.p.Recommend.with_call(ppb.RecommendRequest(history=ids("sku-0001")), timeout=5,
                                              metadata=(("x-request-id", "req-42"),))
        assert dict(call.initial_metadata())["x-request-id"] == "req-42"
        _, call = stubs.p.Recommend.with_call(ppb.RecommendRequest(history=ids("sku-0001")), timeout=5)
        generated = dict(call.initial_metadata())["x-request-id"]
        assert len(generated) == 16
    finally:
        servicer_logger.removeHandler(handler)
        servicer_logger.setLevel(old_level)
    records = [json.loads(line) for line in stream.getvalue().splitlines()]
    mine = [r for r in records if r.get("request_id") == "req-42"]
    assert mine and mine[0]["rpc"] == "Recommend" and mine[0]["code"] == "OK" and mine[0]["duration_ms"] >= 0
    assert any(r.get("request_id") == generated for r in records)


def test_config_file_overrides_and_errors(tmp_path: Path) -> None:
    (tmp_path / "server.crt").write_text("x")
    (tmp_path / "server.key").write_text("x")
    path = tmp_path / "unimp.toml"
    path.write_text(
        'host = "0.0.0.0"\nport = 6000\nartifacts = "art"\n'
        '[auth]\nadmin_token = "a"\n[auth.tokens]\nstore-1 = "s1"\n'
        '[tls]\ncert = "server.crt"\nkey = "server.key"\n[limits]\nmax_image_bytes = 1234\n'
    )
    config = load_config(path, {"port": "7000", "metrics.port": 0, "log.level": "debug"})
    assert config.host == "0.0.0.0" and config.port == 7000 and config.metrics.port == 0
    assert config.artifacts == tmp_path / "art" and config.tls.cert == tmp_path / "server.crt"
    assert config.auth.tokens == {"store-1": "s1"} and config.limits.max_image_bytes == 1234
    assert config.log.level == "DEBUG"
    for text, message in [
        ("bogus = 1\n", "bogus: unknown setting"),
        ("[limits]\nmax_top_k = 0\n", "limits.max_top_k: must be >= 1"),
        ("[limits]\nnope = 1\n", "limits.nope: unknown setting"),
        ("port = 70000\n", "port: must be 0..65535"),
        ('port = "abc"\n', "port: must be an integer"),
        ('[tls]\ncert = "server.crt"\n', "tls.cert / tls.key"),
        ('[log]\nlevel = "LOUD"\n', "log.level: must be one of"),
        ("port = \n", "not valid TOML"),
    ]:
        path.write_text(text)
        with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("(", r"\(")):
            load_config(path)


def test_serve_help_documents_every_field() -> None:
    parser = argparse.ArgumentParser(prog="unimp serve")
    cli_commands.add_serve_arguments(parser)
    text = " ".join(parser.format_help().split())
    for info in iter_fields():
        flag = "--auth-token" if info.path == "auth.tokens" else "--" + info.path.replace(".", "-").replace("_", "-")
        assert flag in text, flag
        assert f"config key {info.path}" in text
    for flag in ("--artifacts", "--host", "--port", "--config", "--insecure", "--metrics-port"):
        assert flag in text
    args = parser.parse_args(["--artifacts", "/tmp/a", "--port", "0", "--auth-token", "s=t", "--no-metrics-enabled",
                              "--limits-max-top-k", "7"])
    overrides = cli_commands.serve_overrides(args)
    assert overrides == {"artifacts": "/tmp/a", "port": "0", "auth.tokens": {"s": "t"}, "metrics.enabled": False,
                         "limits.max_top_k": "7"}
    config = load_config(None, overrides)
    assert config.limits.max_top_k == 7 and config.port == 0 and not config.metrics.enabled


def test_serve_refuses_missing_artifacts_and_insecure_bind(tmp_path: Path) -> None:
    import logging

    parser = argparse.ArgumentParser()
    cli_commands.add_serve_arguments(parser)
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        assert cli_commands.run_serve(parser.parse_args(["--state-dir", str(tmp_path), "--log-level", "ERROR"])) == 2
        args = parser.parse_args(["--artifacts", str(tmp_path), "--host", "0.0.0.0", "--port", "0",
                                  "--state-dir", str(tmp_path), "--log-level", "ERROR"])
        assert cli_commands.run_serve(args) == 2
        assert cli_commands.run_serve(parser.parse_args(["--port", "99999"])) == 2
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])


def test_client_cli(server: ServerThread, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="unimp client")
    cli_commands.add_client_arguments(parser)

    def run(*argv: str) -> tuple[int, str, str]:
        code = cli_commands.run_client(parser.parse_args(list(argv)))
        out, err = capsys.readouterr()
        return code, out, err

    code, out, _ = run("health", "--target", server.target)
    assert code == 0 and json.loads(out) == {"status": "SERVING"}
    code, out, _ = run("recommend", "--target", server.target, "--item", "sku-0001", "--top-k", "3")
    result = json.loads(out)
    assert code == 0 and len(result["items"]) == 3 and result["items"][0]["item_id"].startswith("sku-")
    code, out, _ = run("explain", "--target", server.target, "--item", "sku-0001", "--target-item", "sku-0002")
    lines = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and "rating_distribution" in lines[-1] and "text" in lines[0]
    code, out, _ = run("predict-preference", "--target", server.target, "--item", "sku-0001", "--rating", "4",
                       "--target-item", "sku-0002")
    assert code == 0 and len(json.loads(out)["rating_distribution"]) == 5
    code, _, err = run("recommend", "--target", server.target)
    assert code == 1 and "INVALID_ARGUMENT" in err and "(field history)" in err
