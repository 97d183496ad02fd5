"""Stored history on the real engine (tiny demo) through the gRPC server: every item shape RecordInteraction
accepts is usable by every task afterwards; ForgetUser purges cached prefixes; model tokens survive
delete + upsert, also across a restart."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from runtime.client import RpcError, UnimpClient
from runtime.engine import Runtime, RuntimeConfig
from runtime.server.app import ServerThread
from runtime.server.config import ServerConfig
from runtime.types import HistoryItem, ItemFilter, ItemMeta, PreferenceResult, SamplingOptions
from tests.integration.fake_engine import tiny_png

TEXT_ONLY_ID = "TXT-1"


def _config(state: Path) -> ServerConfig:
    config = ServerConfig(port=0, state_dir=state)
    config.metrics.port = 0
    config.log.level = "WARNING"
    return config


@pytest.fixture(scope="module")
def real(tiny_artifacts: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerThread, Runtime]]:
    engine = Runtime.open(tiny_artifacts, RuntimeConfig(progress=False))
    with ServerThread(_config(tmp_path_factory.mktemp("history_state")), engine) as srv:
        yield srv, engine
    engine.close()


def _shapes() -> list[tuple[str, HistoryItem]]:
    meta = ItemMeta(category="Books", price="12", brand="Inkwell", title="Pocket Atlas")
    return [
        ("catalog-with-image", HistoryItem(item_id="P00003")),
        ("catalog-without-image", HistoryItem(item_id=TEXT_ONLY_ID)),
        ("inline-attributes", HistoryItem(meta=meta)),
        ("inline-image", HistoryItem(image=tiny_png(8, (10, 120, 200)))),
        ("inline-attributes-image", HistoryItem(meta=meta, image=tiny_png(8, (200, 20, 20)))),
    ]


def _every_task(client: UnimpClient, user: str) -> None:
    rec = client.recommend(user_id=user, top_k=3)
    assert len(rec.items) == 3
    assert len(client.search("blue mug", user_id=user, top_k=2).items) == 2
    short = SamplingOptions(max_new_tokens=4)
    pred = client.predict_preference("P00021", user_id=user, sampling=short)
    assert 1 <= pred.rating <= 5 and abs(sum(pred.rating_distribution) - 1) < 1e-5
    final = list(client.explain(TEXT_ONLY_ID, user_id=user, sampling=short))[-1]
    assert isinstance(final, PreferenceResult) and 1 <= final.rating <= 5
    sel = client.select_items(["P00060", TEXT_ONLY_ID], user_id=user, max_selected=1)
    assert len(sel.selected) == 1 and abs(sum(sel.scores) - 1) < 1e-5
    with pytest.raises(RpcError) as info:  # no diffusion graphs in these artifacts
        list(client.generate_image("red sneaker", user_id=user, steps=2))
    assert info.value.code == grpc.StatusCode.UNAVAILABLE


def test_every_recorded_shape_serves_every_task(real) -> None:  # type: ignore[no-untyped-def]
    server, _ = real
    with UnimpClient(server.target, timeout=60) as client:
        created = client.upsert_item(TEXT_ONLY_ID, ItemMeta(category="Toys", title="Wooden train"))
        assert not created.item.has_image
        shapes = _shapes()
        for k, (name, item) in enumerate(shapes):
            for rating in range(6):
                explanation = "Sturdy and light." if (k + rating) % 2 else ""
                stored = HistoryItem(item.item_id, item.meta, item.image, rating, explanation)
                user = f"{name}-r{rating}"
                assert client.record_interaction(user, stored).history_length == 1
                if rating in (0, 5) or (k + rating) % 3 == 0:  # every shape, every rating, both explanations
                    _every_task(client, user)
        # one user with every shape, text-only items first (text before any image attends to nothing)
        for k, (_, item) in enumerate([shapes[1], shapes[2], shapes[0], shapes[3], shapes[4]]):
            client.record_interaction("mixed", HistoryItem(item.item_id, item.meta, item.image, k % 6,
                                                           "Nice." if k % 2 else ""))
        _every_task(client, "mixed")


def test_text_only_history_hits_the_prefix_cache_with_the_same_scores(real) -> None:  # type: ignore[no-untyped-def]
    server, _ = real
    with UnimpClient(server.target, timeout=60) as client:
        client.upsert_item(TEXT_ONLY_ID, ItemMeta(category="Toys", title="Wooden train"))
        for item in (HistoryItem(item_id=TEXT_ONLY_ID, rating=3), HistoryItem(meta=ItemMeta(title="Desk lamp")),
                     HistoryItem(item_id="P00007", rating=0, explanation="Fine.")):
            client.record_interaction("cache-user", item)
        first = client.recommend(user_id="cache-user", top_k=5)
        second = client.recommend(user_id="cache-user", top_k=5)
        assert second.timings.prefix_cache_hit
        assert [i.item_id for i in second.items] == [i.item_id for i in first.items]
        a = np.array([i.score for i in first.items])
        np.testing.assert_allclose([i.score for i in second.items], a, rtol=1e-5, atol=1e-5 * max(1.0, np.abs(a).max()))
        # the same history given inline (no user) is a different request: the cached entry is shared
        inline = [HistoryItem(item_id=TEXT_ONLY_ID, rating=3), HistoryItem(meta=ItemMeta(title="Desk lamp")),
                  HistoryItem(item_id="P00007", rating=0, explanation="Fine.")]
        assert client.recommend(inline, top_k=5).timings.prefix_cache_hit


def test_forget_user_purges_the_users_cached_prefixes(real) -> None:  # type: ignore[no-untyped-def]
    server, engine = real
    with UnimpClient(server.target, timeout=60) as client:
        for sku in ("P00011", "P00012"):
            client.record_interaction("forget-me", sku)
        client.record_interaction("keep-me", "P00013")
        client.recommend(user_id="forget-me", top_k=2)
        client.select_items(["P00060"], user_id="forget-me")
        client.recommend(user_id="keep-me", top_k=2)
        before = len(engine.prefix_cache)
        forgotten = client.forget_user("forget-me")
        assert forgotten.interactions_removed == 2 and forgotten.prefixes_removed == 2
        assert len(engine.prefix_cache) == before - 2
        assert client.recommend(user_id="keep-me", top_k=2).timings.prefix_cache_hit
        with pytest.raises(RpcError) as info:
            client.recommend(user_id="forget-me")
        assert info.value.code == grpc.StatusCode.NOT_FOUND


def test_model_token_survives_delete_upsert_and_restart(tiny_artifacts: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"

    def serve() -> tuple[ServerThread, Runtime]:
        engine = Runtime.open(tiny_artifacts, RuntimeConfig(progress=False))
        return ServerThread(_config(state), engine), engine

    server, engine = serve()
    with server, UnimpClient(server.target, timeout=30) as client:
        token = client.get_item("P00050").item.token
        other = client.get_item("P00051").item.token
        assert token >= 0 and other >= 0
        client.delete_item("P00050")
        assert client.upsert_item("P00050", ItemMeta(title="Back again")).item.token == token
        client.delete_item("P00051")  # upserted again only after the restart
    engine.close()

    server, engine = serve()
    with server, UnimpClient(server.target, timeout=30) as client:
        assert client.get_item("P00050").item.token == token
        assert client.upsert_item("P00051", ItemMeta(title="Back later")).item.token == other
        allowed = client.recommend(["P00050"], top_k=1, filter=ItemFilter(allow=("P00051",)))
        assert [i.item_id for i in allowed.items] == ["P00051"]  # the model can recommend it again
    engine.close()


def test_long_stored_reviews_drop_the_oldest_items_instead_of_failing(real) -> None:  # type: ignore[no-untyped-def]
    from runtime.prompts import ResolvedItem, encode, preference_prompt

    server, engine = real
    review = " ".join(f"review{k} sturdy" for k in range(150))[:450]  # each item fits the tiny model, four do not
    with UnimpClient(server.target, timeout=60) as client:
        for sku in ("P00031", "P00032", "P00033", "P00034"):
            client.record_interaction("reviewer", HistoryItem(item_id=sku, rating=4, explanation=review))
        t = engine.manifest.tokens
        whole = preference_prompt(tuple(ResolvedItem(ItemMeta(), "P1", 1, rating=4, explanation=review)
                                        for _ in range(4)), ResolvedItem(ItemMeta(), "P2", 2))
        assert len(encode(whole, engine.tokenizer, t.endofchunk, t.image).ids) >= engine.manifest.decoder.max_positions
        final = list(client.explain("P00021", user_id="reviewer", sampling=SamplingOptions(max_new_tokens=2)))[-1]
        assert isinstance(final, PreferenceResult) and 1 <= final.rating <= 5
        assert len(client.recommend(user_id="reviewer", top_k=2).items) == 2
