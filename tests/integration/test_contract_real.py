"""The API contract end to end on the REAL engine (tiny demo) behind the gRPC server.

tests/integration/test_server.py checks the plumbing on a fake engine; this file checks what a client
sees from the real one: every bad request of every RPC is rejected with the exact request path of the
offending field (message prefix and ``unimp-field`` trailing metadata), the limits hold end to end,
over-long prompts drop their oldest history, and authentication takes exactly one header.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.message import Message

from runtime.engine import Runtime, RuntimeConfig
from runtime.limits import Limits
from runtime.prompts import encode, search_prompt
from runtime.server.app import ServerThread
from runtime.server.config import ServerConfig
from runtime.server.errors import FIELD_METADATA_KEY
from runtime.server.protos import catalog_pb2 as cpb
from runtime.server.protos import personalization_pb2 as ppb
from runtime.types import HistoryItem
from tests.integration.fake_engine import tiny_png

CLIENT_TOKEN = "tok-store-1"
ADMIN_TOKEN = "tok-admin"
HISTORY = ("P00003", "P00017", "P00042", "P00008")
RATED = (("P00005", 4), ("P00009", 2), ("P00012", 5))
LIMITS = Limits()


def _overlong_item() -> ppb.HistoryItem:
    """An inline item whose chunk alone exceeds the tiny model's 1,024 positions: four fields of 20 words
    (prompts keep 20 words per field) of 28 seeded random letters, each field within max_text_chars."""
    import random

    rng = random.Random(0)

    def field() -> str:
        return " ".join("".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(28)) for _ in range(20))

    return ppb.HistoryItem(inline_item=ppb.InlineItem(attributes=cpb.ItemAttributes(
        category=field(), price=field(), brand=field(), title=field())))


@dataclass
class Served:
    server: ServerThread
    engine: Runtime
    channel: grpc.Channel


@pytest.fixture(scope="module")
def served(tiny_artifacts: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    state = tmp_path_factory.mktemp("contract_state")
    config = ServerConfig(port=0, state_dir=state / "server")
    config.metrics.port = 0
    config.log.level = "WARNING"
    config.auth.tokens = {"store-1": CLIENT_TOKEN}
    config.auth.admin_token = ADMIN_TOKEN
    engine = Runtime.open(tiny_artifacts, RuntimeConfig(progress=False, state_dir=state / "engine",
                                                        latent_cache_dir=state / "latents", limits=config.limits))
    with ServerThread(config, engine) as server, grpc.insecure_channel(server.target) as channel:
        yield Served(server, engine, channel)
    engine.close()


_SERVICES = {"Recommend": "Personalization", "Search": "Personalization", "PredictPreference": "Personalization",
             "Explain": "Personalization", "SelectItems": "Personalization", "GenerateImage": "Personalization",
             "RecordInteraction": "Personalization", "UpsertItem": "Catalog", "GetItem": "Catalog",
             "ListItems": "Catalog", "DeleteItem": "Catalog"}
_STREAMING = {"Explain", "GenerateImage"}
_RESPONSES = {"Recommend": ppb.RecommendResponse, "Search": ppb.SearchResponse,
              "PredictPreference": ppb.PredictPreferenceResponse, "Explain": ppb.ExplainResponse,
              "SelectItems": ppb.SelectItemsResponse, "GenerateImage": ppb.GenerateImageResponse,
              "RecordInteraction": ppb.RecordInteractionResponse, "UpsertItem": cpb.UpsertItemResponse,
              "GetItem": cpb.GetItemResponse, "ListItems": cpb.ListItemsResponse, "DeleteItem": cpb.DeleteItemResponse}


def call(channel: grpc.Channel, rpc: str, request: Message, token: str | None = CLIENT_TOKEN,
         metadata: tuple[tuple[str, str], ...] | None = None) -> Any:
    """One RPC with raw protobuf messages (no client-side checks); streams are drained into a list."""
    method = f"/unimp.v1.{_SERVICES[rpc]}/{rpc}"
    if metadata is None:
        metadata = (("authorization", f"Bearer {token}"),) if token else ()
    kwargs = {"request_serializer": type(request).SerializeToString,
              "response_deserializer": _RESPONSES[rpc].FromString}
    if rpc in _STREAMING:
        return list(channel.unary_stream(method, **kwargs)(request, timeout=60, metadata=metadata))
    return channel.unary_unary(method, **kwargs)(request, timeout=60, metadata=metadata)


def ids(*names: str) -> list[ppb.HistoryItem]:
    return [ppb.HistoryItem(item_id=n) for n in names]


def rated() -> list[ppb.HistoryItem]:
    return [ppb.HistoryItem(item_id=i, rating=r) for i, r in RATED]


def opts(**kwargs: Any) -> ppb.DecodeOptions:
    beam = kwargs.pop("beam", None)
    allow = kwargs.pop("allow", None)
    msg = ppb.DecodeOptions(**kwargs)
    if beam is not None:
        msg.beam.CopyFrom(ppb.BeamOptions(**beam))
    if allow is not None:
        msg.filter.allow_item_ids.extend(allow)
    return msg


BEAM = ppb.DECODE_MODE_BEAM
INVALID, NOT_FOUND = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND
TOO_LONG_QUERY = ("blue mug " * 300)[:LIMITS.max_text_chars]  # about a token per character: no prompt fits it

# (rpc, request, status code, exact request path of the offending field)
BAD_REQUESTS: list[tuple[str, Message, grpc.StatusCode, str]] = [
    ("Recommend", ppb.RecommendRequest(), INVALID, "history"),
    ("Recommend", ppb.RecommendRequest(user_id="ghost"), NOT_FOUND, "user_id"),
    ("Recommend", ppb.RecommendRequest(user_id="a b", history=ids("P00003")), INVALID, "user_id"),
    ("Recommend", ppb.RecommendRequest(history=ids("P00003", "nope")), NOT_FOUND, "history[1].item_id"),
    ("Recommend", ppb.RecommendRequest(history=[ppb.HistoryItem(inline_item=ppb.InlineItem())]), INVALID,
     "history[0].inline_item"),
    ("Recommend", ppb.RecommendRequest(history=[ppb.HistoryItem(item_id="P00003", rating=9)]), INVALID,
     "history[0].rating"),
    ("Recommend", ppb.RecommendRequest(history=[ppb.HistoryItem(inline_item=ppb.InlineItem(image=b"not a png"))]),
     INVALID, "history[0].inline_item.image"),
    ("Recommend", ppb.RecommendRequest(history=ids(*HISTORY), options=opts(top_k=LIMITS.max_top_k + 1)), INVALID,
     "options.top_k"),
    ("Recommend", ppb.RecommendRequest(history=ids(*HISTORY), options=opts(top_k=LIMITS.max_beams + 1, mode=BEAM)),
     INVALID, "options.top_k"),
    ("Recommend", ppb.RecommendRequest(history=ids(*HISTORY), options=opts(mode=BEAM, beam={"num_beams": 17})),
     INVALID, "options.beam.num_beams"),
    ("Recommend", ppb.RecommendRequest(history=ids(*HISTORY), options=opts(top_k=8, mode=BEAM,
                                                                          beam={"num_beams": 4})),
     INVALID, "options.beam.num_beams"),
    ("Recommend", ppb.RecommendRequest(history=ids(*HISTORY), options=opts(
        mode=BEAM, beam={"max_new_tokens": LIMITS.max_new_tokens + 1})), INVALID, "options.beam.max_new_tokens"),
    ("Recommend", ppb.RecommendRequest(history=ids(*HISTORY), options=opts(mode=99)), INVALID, "options.mode"),
    ("Recommend", ppb.RecommendRequest(history=ids(*HISTORY), options=opts(allow=["P00001", "nope"])), NOT_FOUND,
     "options.filter.allow_item_ids[1]"),
    ("Recommend", ppb.RecommendRequest(history=ids(*HISTORY), options=opts(allow=["P00001", ""])), INVALID,
     "options.filter.allow_item_ids[1]"),
    ("Search", ppb.SearchRequest(history=ids(*HISTORY)), INVALID, "query"),
    ("Search", ppb.SearchRequest(history=ids(*HISTORY), query="x" * (LIMITS.max_text_chars + 1)), INVALID, "query"),
    ("Search", ppb.SearchRequest(history=ids(*HISTORY), query="mug <image>"), INVALID, "query"),
    ("Search", ppb.SearchRequest(history=ids(*HISTORY), query=TOO_LONG_QUERY), INVALID, "query"),
    ("Search", ppb.SearchRequest(history=ids(*HISTORY), query="mug", options=opts(top_k=-1)), INVALID,
     "options.top_k"),
    ("Search", ppb.SearchRequest(history=ids("P00003", "nope"), query="mug"), NOT_FOUND, "history[1].item_id"),
    ("PredictPreference", ppb.PredictPreferenceRequest(history=rated()), INVALID, "target"),
    ("PredictPreference", ppb.PredictPreferenceRequest(history=rated(), target=ppb.HistoryItem(item_id="nope")),
     NOT_FOUND, "target.item_id"),
    ("PredictPreference", ppb.PredictPreferenceRequest(
        history=rated(), target=ppb.HistoryItem(item_id="P00021"),
        sampling=ppb.SamplingOptions(num_beams=LIMITS.max_beams + 1)), INVALID, "sampling.num_beams"),
    ("PredictPreference", ppb.PredictPreferenceRequest(
        history=rated(), target=ppb.HistoryItem(item_id="P00021"), sampling=ppb.SamplingOptions(temperature=6)),
     INVALID, "sampling.temperature"),
    ("PredictPreference", ppb.PredictPreferenceRequest(history=[*rated(), _overlong_item()],
                                                       target=ppb.HistoryItem(item_id="P00021")),
     INVALID, "history[3]"),
    ("Recommend", ppb.RecommendRequest(history=[*ids(*HISTORY), _overlong_item()]), INVALID, "history[4]"),
    ("Explain", ppb.ExplainRequest(history=rated(), target=ppb.HistoryItem(item_id="P00021"),
                                   sampling=ppb.SamplingOptions(max_new_tokens=LIMITS.max_new_tokens + 1)),
     INVALID, "sampling.max_new_tokens"),
    ("Explain", ppb.ExplainRequest(history=rated(), target=ppb.HistoryItem(inline_item=ppb.InlineItem())),
     INVALID, "target.inline_item"),
    ("Explain", ppb.ExplainRequest(history=ids("nope"), target=ppb.HistoryItem(item_id="P00021")), NOT_FOUND,
     "history[0].item_id"),
    ("SelectItems", ppb.SelectItemsRequest(history=ids(*HISTORY)), INVALID, "candidates"),
    ("SelectItems", ppb.SelectItemsRequest(history=ids(*HISTORY), candidates=ids("P00060", "nope")), NOT_FOUND,
     "candidates[1].item_id"),
    ("SelectItems", ppb.SelectItemsRequest(history=ids(*HISTORY), candidates=ids("P00060", "P00061"),
                                           max_selected=3), INVALID, "max_selected"),
    ("SelectItems", ppb.SelectItemsRequest(history=ids(*HISTORY), candidates=ids(*[f"P000{k}" for k in range(60, 66)])),
     INVALID, "candidates"),
    ("GenerateImage", ppb.GenerateImageRequest(history=ids("P00003")), INVALID, "query"),
    ("GenerateImage", ppb.GenerateImageRequest(history=ids("P00003"), query="red", width=60), INVALID, "width"),
    ("GenerateImage", ppb.GenerateImageRequest(history=ids("P00003"), query="red",
                                               steps=LIMITS.max_image_steps + 1), INVALID, "steps"),
    ("GenerateImage", ppb.GenerateImageRequest(history=ids("nope"), query="red"), NOT_FOUND, "history[0].item_id"),
    ("RecordInteraction", ppb.RecordInteractionRequest(item=ppb.HistoryItem(item_id="P00003")), INVALID, "user_id"),
    ("RecordInteraction", ppb.RecordInteractionRequest(user_id="alice"), INVALID, "item"),
    ("RecordInteraction", ppb.RecordInteractionRequest(user_id="alice", item=ppb.HistoryItem(item_id="nope")),
     NOT_FOUND, "item.item_id"),
    ("RecordInteraction", ppb.RecordInteractionRequest(user_id="alice", item=ppb.HistoryItem(item_id="P00003"),
                                                       occurred_at_unix_ms=-1), INVALID, "occurred_at_unix_ms"),
    ("UpsertItem", cpb.UpsertItemRequest(), INVALID, "item_id"),
    ("UpsertItem", cpb.UpsertItemRequest(item_id="NEW1", image=b"not an image"), INVALID, "image"),
    ("UpsertItem", cpb.UpsertItemRequest(item_id="NEW1", attributes=cpb.ItemAttributes(title="a <image> b")), INVALID,
     "attributes.title"),
    ("GetItem", cpb.GetItemRequest(item_id="nope"), NOT_FOUND, "item_id"),
    ("GetItem", cpb.GetItemRequest(item_id="x" * (LIMITS.max_id_chars + 1)), INVALID, "item_id"),
    ("ListItems", cpb.ListItemsRequest(page_size=LIMITS.max_page_size + 1), INVALID, "page_size"),
    ("ListItems", cpb.ListItemsRequest(page_token="garbage"), INVALID, "page_token"),
    ("DeleteItem", cpb.DeleteItemRequest(item_id="nope"), NOT_FOUND, "item_id"),
]


def test_the_table_covers_every_rpc() -> None:
    assert {rpc for rpc, *_ in BAD_REQUESTS} == set(_SERVICES)


@pytest.mark.parametrize("rpc, request_msg, code, path", BAD_REQUESTS,
                         ids=[f"{rpc}-{path}-{i}" for i, (rpc, _, _, path) in enumerate(BAD_REQUESTS)])
def test_bad_requests_name_the_exact_request_path(served: Served, rpc: str, request_msg: Message,
                                                  code: grpc.StatusCode, path: str) -> None:
    token = ADMIN_TOKEN if _SERVICES[rpc] == "Catalog" else CLIENT_TOKEN
    with pytest.raises(grpc.RpcError) as info:
        call(served.channel, rpc, request_msg, token)
    err = info.value
    assert err.code() == code, (err.code(), err.details())
    assert err.details().startswith(f"{path}: "), err.details()
    assert dict(err.trailing_metadata() or ()).get(FIELD_METADATA_KEY) == path


def test_fast_mode_returns_max_top_k_items(served: Served) -> None:
    response = call(served.channel, "Recommend",
                    ppb.RecommendRequest(history=ids(*HISTORY), options=opts(top_k=LIMITS.max_top_k)))
    got = [i.item_id for i in response.items]
    assert len(got) == LIMITS.max_top_k == len(set(got)) and not set(got) & set(HISTORY)


def test_beam_mode_takes_top_k_up_to_max_beams_with_default_beams(served: Served) -> None:
    # num_beams unset: max(top_k, 10) = max_beams beams, within the engine's limit
    request = ppb.RecommendRequest(history=ids(*HISTORY), options=opts(
        top_k=LIMITS.max_beams, mode=BEAM, beam={"max_new_tokens": 4}))
    response = call(served.channel, "Recommend", request)
    got = [i.item_id for i in response.items]  # the random tiny model may finish no beam on an item token
    assert len(got) <= LIMITS.max_beams and len(set(got)) == len(got)
    assert 1 <= response.timings.generated_tokens <= 4
    scores = [i.score for i in response.items]
    assert scores == sorted(scores, reverse=True)


def test_beam_top_k_above_max_beams_is_rejected_naming_top_k_and_the_limit(served: Served) -> None:
    # the documented default num_beams = max(top_k, 10) used to exceed the engine's 16 beams here
    request = ppb.RecommendRequest(history=ids(*HISTORY), options=opts(top_k=20, mode=BEAM))
    with pytest.raises(grpc.RpcError) as info:
        call(served.channel, "Recommend", request)
    details = info.value.details()
    assert info.value.code() == INVALID
    assert details.startswith("options.top_k: is 20, above the limit of 16") and "DECODE_MODE_FAST" in details
    # the same top_k in fast mode is fine
    fast = call(served.channel, "Recommend", ppb.RecommendRequest(history=ids(*HISTORY), options=opts(top_k=20)))
    assert len(fast.items) == 20


def _max_length_query(engine: Runtime) -> tuple[str, int]:
    """A query of the proto's maximum length whose prompt does not fit with all of HISTORY but fits with
    its newest items; returns it with how many of them fit."""
    resolved = engine.resolve(tuple(HistoryItem(item_id=i) for i in HISTORY))
    t = engine.manifest.tokens
    limit = engine.manifest.decoder.max_positions - 1

    def tokens(query: str, n: int) -> int:
        return len(encode(search_prompt(resolved, query, n), engine.tokenizer, t.endofchunk, t.image).ids)

    chars = LIMITS.max_text_chars
    for words in range(chars // 6, 0, -1):
        query = ("Shoes " * words + "blue mug " * chars)[:chars]
        if tokens(query, len(HISTORY)) > limit and tokens(query, 1) <= limit:
            return query, max(n for n in range(1, len(HISTORY) + 1) if tokens(query, n) <= limit)
    raise AssertionError("no max-length query fits only part of the history")


def test_a_max_length_query_works_by_dropping_the_oldest_history(served: Served) -> None:
    query, fits = _max_length_query(served.engine)
    assert len(query) == LIMITS.max_text_chars and fits < len(HISTORY)
    full = call(served.channel, "Search", ppb.SearchRequest(history=ids(*HISTORY), query=query,
                                                            options=opts(top_k=5)))
    newest = call(served.channel, "Search", ppb.SearchRequest(history=ids(*HISTORY[-fits:]), query=query,
                                                              options=opts(top_k=5)))
    assert len(full.items) == 5
    assert [i.item_id for i in full.items] == [i.item_id for i in newest.items]


def test_a_query_that_fits_with_no_history_item_names_query_with_token_counts(served: Served) -> None:
    with pytest.raises(grpc.RpcError) as info:
        call(served.channel, "Search", ppb.SearchRequest(history=ids(*HISTORY), query=TOO_LONG_QUERY))
    limit = served.engine.manifest.decoder.max_positions - 1
    assert info.value.code() == INVALID
    assert info.value.details().startswith("query: the prompt is ")
    assert f"at most {limit} prompt tokens" in info.value.details()


def test_unknown_allow_id_is_not_found_and_known_ones_filter(served: Served) -> None:
    allow = ["P00001", "P00002", "P00050"]
    response = call(served.channel, "Recommend",
                    ppb.RecommendRequest(history=ids(*HISTORY), options=opts(top_k=10, allow=allow)))
    assert response.items and {i.item_id for i in response.items} <= set(allow)


def test_two_authorization_headers_are_unauthenticated(served: Served) -> None:
    request = ppb.RecommendRequest(history=ids(*HISTORY))
    for metadata in ((("authorization", f"Bearer {CLIENT_TOKEN}"), ("authorization", "Bearer wrong")),
                     (("authorization", "Bearer wrong"), ("authorization", f"Bearer {CLIENT_TOKEN}")),
                     (("authorization", f"Bearer {CLIENT_TOKEN}"), ("authorization", f"Bearer {ADMIN_TOKEN}"))):
        with pytest.raises(grpc.RpcError) as info:
            call(served.channel, "Recommend", request, metadata=metadata)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "2 authorization metadata entries" in info.value.details()
    assert len(call(served.channel, "Recommend", request).items) == 10  # one header is fine


def test_catalog_edits_then_lookups_use_request_paths(served: Served) -> None:
    created = call(served.channel, "UpsertItem", cpb.UpsertItemRequest(
        item_id="NEW-CONTRACT", attributes=cpb.ItemAttributes(title="Contract Mug", category="Kitchen"),
        image=tiny_png()), ADMIN_TOKEN)
    assert created.created
    call(served.channel, "DeleteItem", cpb.DeleteItemRequest(item_id="NEW-CONTRACT"), ADMIN_TOKEN)
    with pytest.raises(grpc.RpcError) as info:
        call(served.channel, "GetItem", cpb.GetItemRequest(item_id="NEW-CONTRACT"))
    assert info.value.code() == NOT_FOUND and info.value.details().startswith("item_id: ")


def test_engine_history_indices_become_request_paths_after_stored_interactions(served: Served) -> None:
    def record(user: str, item: ppb.HistoryItem) -> None:
        call(served.channel, "RecordInteraction", ppb.RecordInteractionRequest(user_id=user, item=item))

    target = ppb.HistoryItem(item_id="P00021")
    # two stored interactions, then an inline item and an over-long one: the engine's history[3] (the newest,
    # which alone does not fit the model) is the request's history[1]
    record("carol", ppb.HistoryItem(item_id="P00005", rating=4))
    record("carol", ppb.HistoryItem(item_id="P00009", rating=2))
    request = ppb.RecommendRequest(user_id="carol", history=[ppb.HistoryItem(item_id="P00012"), _overlong_item()])
    with pytest.raises(grpc.RpcError) as info:
        call(served.channel, "Recommend", request)
    assert info.value.code() == INVALID
    assert info.value.details().startswith("history[1]: ")
    assert dict(info.value.trailing_metadata() or ()).get(FIELD_METADATA_KEY) == "history[1]"
    # an over-long stored interaction is not a request field: the error names user_id
    record("dave", _overlong_item())
    with pytest.raises(grpc.RpcError) as info:
        call(served.channel, "Recommend", ppb.RecommendRequest(user_id="dave"))
    assert info.value.code() == INVALID
    assert info.value.details().startswith("user_id: a stored interaction (history[0]): ")
    assert dict(info.value.trailing_metadata() or ()).get(FIELD_METADATA_KEY) == "user_id"
    # with ordinary items the same user is served
    ok = call(served.channel, "PredictPreference", ppb.PredictPreferenceRequest(
        user_id="carol", target=target, history=rated(), sampling=ppb.SamplingOptions(max_new_tokens=2)))
    assert abs(sum(ok.prediction.rating_distribution) - 1) < 1e-5


def test_constrained_beam_limits_follow_the_beam_rules(served: Served) -> None:
    """DECODE_MODE_BEAM_CONSTRAINED takes top_k up to max_beams with num_beams defaulting to max(top_k, 10)."""
    top_k = LIMITS.max_beams
    got = call(served.channel, "Recommend", ppb.RecommendRequest(
        history=ids(*HISTORY), options=opts(top_k=top_k, mode=ppb.DECODE_MODE_BEAM_CONSTRAINED)))
    assert len(got.items) == top_k and len({i.item_id for i in got.items}) == top_k
    with pytest.raises(grpc.RpcError) as info:
        call(served.channel, "Recommend", ppb.RecommendRequest(
            history=ids(*HISTORY), options=opts(top_k=top_k + 1, mode=ppb.DECODE_MODE_BEAM_CONSTRAINED)))
    assert info.value.code() == INVALID and info.value.details().startswith("options.top_k: ")
