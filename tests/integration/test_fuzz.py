"""Randomized and malformed requests against a live server: no crash, no INTERNAL, still healthy.

Structured requests are generated from the request descriptors themselves (every field of every
request message, with hostile values mixed in: NaN, huge ints, unknown enum values, prompt markers,
image bombs, unknown ids), so new fields are fuzzed without touching this file. Raw byte strings hit
every method as well, including the streaming ones.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runtime.server.app import ServerThread
from runtime.server.config import ServerConfig
from runtime.server.protos import catalog_pb2, personalization_pb2
from runtime.types import HistoryItem
from tests.integration.fake_engine import FakeEngine, tiny_png

pytestmark = pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")

METHODS: list[MethodDescriptor] = [
    *personalization_pb2.DESCRIPTOR.services_by_name["Personalization"].methods,
    *catalog_pb2.DESCRIPTOR.services_by_name["Catalog"].methods,
]
FORBIDDEN = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.UNIMPLEMENTED}
STRUCTURED_EXAMPLES = 350
RAW_EXAMPLES = 200
BURST_EXAMPLES = 150
"""Structured requests the health test sends itself, so that it holds when run alone."""


def _bomb() -> bytes:
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", 50_000, 50_000, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 32)) + chunk(b"IEND", b"")


TEXT = st.one_of(
    st.sampled_from(["", "sku-0039", "sku-0038", "fuzz-user", "nope", "<image>", "a <|endofchunk|>",
                     "<answer>", " ", "x" * 300, "has space", "caf\u00e9", "\u202e", "line\nbreak", "o:5", "o:9999"]),
    st.text(alphabet=st.characters(codec="utf-8"), max_size=24),
)
BYTES = st.one_of(
    st.sampled_from([b"", tiny_png(), tiny_png(64), _bomb(), b"GIF89a", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff"]),
    st.binary(max_size=48),
)
INT_RANGES = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1), FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1), FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1), FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1), FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1), FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}


PLAUSIBLE_TEXT = st.sampled_from(["sku-0001", "sku-0002", "sku-0003", "sku-0010", "sku-0011", "fuzz-user", "Beauty"])
PLAUSIBLE_BYTES = st.sampled_from([b"", tiny_png()])
PLAUSIBLE_BY_NAME: dict[str, st.SearchStrategy[Any]] = {
    "user_id": st.sampled_from(["", "fuzz-user"]),  # fuzz-user has recorded interactions
    "rating": st.integers(0, 5),
}


def _scalar(field: FieldDescriptor, plausible: bool) -> st.SearchStrategy[Any]:
    t = field.type
    if t == FieldDescriptor.TYPE_STRING:
        return PLAUSIBLE_TEXT if plausible else TEXT
    if t == FieldDescriptor.TYPE_BYTES:
        return PLAUSIBLE_BYTES if plausible else BYTES
    if t == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if t == FieldDescriptor.TYPE_ENUM:
        return st.integers(0, 2) if plausible else st.integers(-3, 12)
    if t in (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE):
        if plausible:
            return st.floats(0.0, 1.0)
        return st.floats(width=32) | st.sampled_from([0.0, 0.5, 1.0, -1.0]) if t == FieldDescriptor.TYPE_FLOAT \
            else st.floats()
    low, high = INT_RANGES[t]
    if plausible:
        return st.sampled_from([0, 0, 1, 2, 3, 8])
    return st.integers(low, high) | st.integers(max(low, -2), 12)


def message_strategy(descriptor: Descriptor, plausible: bool) -> st.SearchStrategy[Message]:
    """Messages of ``descriptor`` with random subsets of fields set: hostile values, or plausible ones
    (known ids, small numbers) that often pass validation and reach the engine."""
    cls = GetMessageClass(descriptor)
    optional: dict[str, st.SearchStrategy[Any]] = {}
    oneof: dict[str, st.SearchStrategy[Any]] = {}
    for field in descriptor.fields:
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            single = message_strategy(field.message_type, plausible)
        elif plausible and field.name in PLAUSIBLE_BY_NAME:
            single = PLAUSIBLE_BY_NAME[field.name]
        else:
            single = _scalar(field, plausible)
        is_repeated = getattr(field, "is_repeated", None)
        repeated = is_repeated if isinstance(is_repeated, bool) else field.label == FieldDescriptor.LABEL_REPEATED
        if repeated:
            strategy = st.lists(single, min_size=int(plausible and field.name == "history"),
                                max_size=4 if plausible else 7)
        else:
            strategy = single
        real_oneof = field.containing_oneof is not None and not field.name.startswith("_") and \
            len(field.containing_oneof.fields) > 1
        (oneof if plausible and real_oneof else optional)[field.name] = strategy

    def build(values: dict[str, Any]) -> Message:
        msg = cls()
        for name, value in values.items():
            field = descriptor.fields_by_name[name]
            if isinstance(value, list):
                if field.type == FieldDescriptor.TYPE_MESSAGE:
                    for v in value:
                        getattr(msg, name).add().CopyFrom(v)
                else:
                    getattr(msg, name).extend(value)
            elif field.type == FieldDescriptor.TYPE_MESSAGE:
                getattr(msg, name).CopyFrom(value)
            else:
                setattr(msg, name, value)
        return msg

    values = st.fixed_dictionaries({}, optional=optional)
    if oneof:  # plausible messages set exactly one member of their oneof
        choice = st.one_of([st.tuples(st.just(name), strategy) for name, strategy in oneof.items()])
        values = st.tuples(values, choice).map(lambda pair: {**pair[0], pair[1][0]: pair[1][1]})
    return values.map(build)


def _request(method: MethodDescriptor) -> st.SearchStrategy[tuple[MethodDescriptor, bytes]]:
    messages = message_strategy(method.input_type, plausible=False)
    if method.name != "DeleteItem":
        plausible = message_strategy(method.input_type, plausible=True)
        messages = st.one_of(messages, plausible, plausible)
    return st.tuples(st.just(method), messages.map(lambda msg: msg.SerializeToString()))


REQUESTS = st.sampled_from(METHODS).flatmap(_request)
"""(method, serialized request); DeleteItem only gets hostile ids so the fuzzed catalog keeps its items."""


@dataclass
class Fuzzed:
    server: ServerThread
    engine: FakeEngine
    sent: int = 0


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fuzzed]:
    config = ServerConfig(port=0, state_dir=Path(tmp_path_factory.mktemp("fuzz-state")))
    config.metrics.enabled = False
    config.log.level = "WARNING"
    engine = FakeEngine()
    with ServerThread(config, engine) as server:
        server.server.store.record_interaction("", "fuzz-user", HistoryItem(item_id="sku-0009"), 1)
        yield Fuzzed(server, engine)


@pytest.fixture(scope="module")
def channel(fuzzed: Fuzzed) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(fuzzed.server.target) as ch:
        yield ch


def _call(channel: grpc.Channel, method: MethodDescriptor, raw: bytes) -> grpc.StatusCode:
    path = f"/{method.containing_service.full_name}/{method.name}"
    try:
        if method.server_streaming:
            stream = channel.unary_stream(path, request_serializer=None, response_deserializer=None)
            for _ in stream(raw, timeout=10):
                pass
        else:
            channel.unary_unary(path, request_serializer=None, response_deserializer=None)(raw, timeout=10)
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def fuzz_settings(examples: int) -> settings:
    return settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))


@fuzz_settings(STRUCTURED_EXAMPLES)
@given(request=REQUESTS)
def test_structured_random_requests(channel: grpc.Channel, fuzzed: Fuzzed, request: tuple[MethodDescriptor, bytes]) -> None:
    method, raw = request
    fuzzed.sent += 1
    code = _call(channel, method, raw)
    assert code not in FORBIDDEN, (method.full_name, raw, code)


@fuzz_settings(RAW_EXAMPLES)
@given(method=st.sampled_from(METHODS), raw=st.binary(max_size=160))
def test_malformed_bytes(channel: grpc.Channel, fuzzed: Fuzzed, method: MethodDescriptor, raw: bytes) -> None:
    fuzzed.sent += 1
    code = _call(channel, method, raw)
    assert code not in FORBIDDEN, (method.full_name, raw, code)


def test_server_healthy_after_fuzzing(channel: grpc.Channel, fuzzed: Fuzzed) -> None:
    # This test fuzzes the server itself (derandomized, so the same burst every run) instead of relying
    # on the tests above having run first in the same process.
    sent = 0
    engine_calls = sum(fuzzed.engine.calls.values())

    @settings(fuzz_settings(BURST_EXAMPLES), derandomize=True)
    @given(request=REQUESTS)
    def burst(request: tuple[MethodDescriptor, bytes]) -> None:
        nonlocal sent
        sent += 1
        code = _call(channel, *request)
        assert code not in FORBIDDEN, (request[0].full_name, request[1], code)

    burst()
    assert sent == BURST_EXAMPLES
    # Plausible requests pass validation often enough that the engine path is fuzzed too.
    assert sum(fuzzed.engine.calls.values()) - engine_calls >= 5, fuzzed.engine.calls
    health = health_pb2_grpc.HealthStub(channel)
    assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == health_pb2.HealthCheckResponse.SERVING
    request = personalization_pb2.RecommendRequest(history=[personalization_pb2.HistoryItem(item_id="sku-0001")])
    response = personalization_pb2.RecommendResponse.FromString(
        channel.unary_unary("/unimp.v1.Personalization/Recommend")(request.SerializeToString(), timeout=5)
    )
    assert len(response.items) == 10
    server = fuzzed.server.server
    assert server.servicer.inflight == 0
    internal = sum(server.metrics.value("unimp_requests_total", {"rpc": m.name, "code": "INTERNAL"}) for m in METHODS)
    assert internal == 0
