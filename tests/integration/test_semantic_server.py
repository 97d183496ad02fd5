"""Semantic-ID artifacts behind the gRPC server: Recommend and Search return valid, admissible items."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from runtime.client import RpcError, UnimpClient
from runtime.engine import Runtime, RuntimeConfig
from runtime.server.app import ServerThread
from runtime.server.config import ServerConfig
from runtime.types import BeamOptions, DecodeMode, ItemFilter

HISTORY = ["P00003", "P00017", "P00042"]


@pytest.fixture(scope="module")
def server(tiny_semantic_artifacts: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    engine = Runtime.open(tiny_semantic_artifacts, RuntimeConfig(progress=False))
    config = ServerConfig(port=0, state_dir=tmp_path_factory.mktemp("semantic_state"))
    config.metrics.port = 0
    config.log.level = "WARNING"
    with ServerThread(config, engine) as srv:
        yield srv
    engine.close()


def _check(client: UnimpClient, items: tuple, allowed: set[str] | None = None, categories: set[str] | None = None,  # type: ignore[type-arg]
           exclude: set[str] = frozenset(HISTORY)) -> None:  # type: ignore[assignment]
    ids = [i.item_id for i in items]
    assert len(ids) == len(set(ids)) and not set(ids) & exclude
    page = {i.item_id: i for i in client.iter_items(page_size=1000)}
    for item_id in ids:
        entry = page[item_id]
        assert entry.available and entry.token >= 0
        assert allowed is None or item_id in allowed
        assert categories is None or entry.meta.category in categories


@pytest.mark.parametrize("mode", [DecodeMode.FAST, DecodeMode.BEAM_CONSTRAINED])
def test_recommend_and_search_over_grpc_respect_every_mask(server: ServerThread, mode: DecodeMode) -> None:
    with UnimpClient(server.target) as client:
        rec = client.recommend(HISTORY, top_k=6, mode=mode)
        assert len(rec.items) == 6
        _check(client, rec.items)
        cats = {"Toys", "Beauty"}
        by_cat = client.recommend(HISTORY, top_k=6, mode=mode, filter=ItemFilter(categories=tuple(cats)))
        assert len(by_cat.items) == 6
        _check(client, by_cat.items, categories=cats)
        allow = ("P00010", "P00011", "P00017", "P00150")
        allowed = client.recommend(HISTORY, top_k=6, mode=mode, filter=ItemFilter(allow=allow))
        assert {i.item_id for i in allowed.items} == set(allow) - set(HISTORY)
        found = client.search("blue mug", HISTORY, top_k=3, mode=mode, beam=BeamOptions(num_beams=5))
        assert len(found.items) == 3
        _check(client, found.items)
        kept = client.recommend(HISTORY, top_k=16, mode=mode, beam=BeamOptions(num_beams=16),
                                filter=ItemFilter(exclude_history=False))
        _check(client, kept.items, exclude=set())


def test_unavailable_item_is_masked_over_grpc(server: ServerThread) -> None:
    with UnimpClient(server.target) as client:
        top = client.recommend(HISTORY, top_k=1).items[0]
        item = client.get_item(top.item_id).item
        client.upsert_item(item.item_id, item.meta, available=False)
        try:
            again = client.recommend(HISTORY, top_k=5)
            assert top.item_id not in {i.item_id for i in again.items}
            _check(client, again.items)
        finally:
            client.upsert_item(item.item_id, item.meta, available=True)
        assert client.get_item(top.item_id).item.token == item.token


def test_fast_top_k_above_the_beam_limit_names_the_field(server: ServerThread) -> None:
    with UnimpClient(server.target) as client, pytest.raises(RpcError) as info:
        client.recommend(HISTORY, top_k=17)
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.field == "options.top_k" and info.value.details.startswith("options.top_k: is 17")
