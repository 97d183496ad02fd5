"""Ray-free parts of the Serve scale-out: affinity keys, ranking, the ingress registration, the
shared store's change feed, the CLI's checks and the Serve config file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import pytest

from runtime.api import CatalogItem
from runtime.deploy import ingress
from runtime.deploy.app import ClusterOptions, check_exposure, parse_autoscale
from runtime.deploy.routing import affinity_key, load_bound, rank, tenant_of
from runtime.deploy.store import RemoteStore, StoreService
from runtime.server.config import AuthConfig, ConfigError, ServerConfig, TlsConfig
from runtime.server.protos import personalization_pb2 as ppb
from runtime.types import HistoryItem, ItemMeta

REPO = Path(__file__).resolve().parents[2]
SHOP = (("authorization", "Bearer tok-shop"),)
KIOSK = (("authorization", "Bearer tok-kiosk"),)


def _raw(message: Any) -> bytes:
    return bytes(message.SerializeToString())


def test_affinity_key_is_tenant_and_user() -> None:
    a = affinity_key("Recommend", _raw(ppb.RecommendRequest(user_id="u1")), SHOP)
    assert a == affinity_key("Explain", _raw(ppb.ExplainRequest(user_id="u1")), SHOP)
    assert a != affinity_key("Recommend", _raw(ppb.RecommendRequest(user_id="u1")), KIOSK)
    assert a != affinity_key("Recommend", _raw(ppb.RecommendRequest(user_id="u2")), SHOP)
    assert tenant_of(SHOP) != tenant_of(KIOSK) and tenant_of(()) == ""


def test_affinity_key_without_user_is_the_history_content() -> None:
    hist = [ppb.HistoryItem(item_id="P1", rating=4), ppb.HistoryItem(item_id="P2")]
    k1 = affinity_key("Recommend", _raw(ppb.RecommendRequest(history=hist)), SHOP)
    k2 = affinity_key("Search", _raw(ppb.SearchRequest(history=hist, query="x")), SHOP)
    k3 = affinity_key("Recommend", _raw(ppb.RecommendRequest(history=hist[:1])), SHOP)
    assert k1 is not None and k1.startswith("history:") and k1 == k2 and k1 != k3


def test_no_key_for_catalog_empty_and_malformed_requests() -> None:
    assert affinity_key("GetItem", b"\n\x02P1", SHOP) is None
    assert affinity_key("Recommend", b"", SHOP) is None
    assert affinity_key("Recommend", b"\xff\xff\xff", SHOP) is None


def test_rank_is_deterministic_and_moves_only_the_dead_replicas_keys() -> None:
    replicas = ["a", "b", "c"]
    names = {r: f"replica-{r}" for r in replicas}
    loads: dict[str, int | None] = dict.fromkeys(replicas, 0)
    keys = [f"user::u{i}" for i in range(300)]
    first = {k: rank(k, replicas, names, loads)[0] for k in keys}
    assert first == {k: rank(k, list(reversed(replicas)), names, loads)[0] for k in keys}
    counts = {r: sum(1 for v in first.values() if v == r) for r in replicas}
    assert min(counts.values()) > 60  # spread over the replicas
    survivors = ["a", "c"]
    after = {k: rank(k, survivors, names, loads)[0] for k in keys}
    for k in keys:
        if first[k] != "b":
            assert after[k] == first[k]  # keys of live replicas stay put
        else:
            assert after[k] in survivors


def test_overloaded_replica_spills_to_the_next_one() -> None:
    replicas = ["a", "b"]
    names = {"a": "A", "b": "B"}
    key = next(k for k in (f"user::u{i}" for i in range(100)) if rank(k, replicas, names, {})[0] == "a")
    assert rank(key, replicas, names, {"a": 3, "b": 0}) == ["a", "b"]  # within the bound (min_bound=2, mean 2)
    assert rank(key, replicas, names, {"a": 9, "b": 1}) == ["b", "a"]
    assert rank(key, replicas, names, {"a": None, "b": None}) == ["a", "b"]
    assert load_bound([9, 1]) == 7 and load_bound([]) == 2


def test_ingress_registers_raw_byte_handlers() -> None:
    class Server:
        def __init__(self) -> None:
            self.handlers: list[Any] = []

        def add_generic_rpc_handlers(self, handlers: Any) -> None:
            self.handlers.extend(handlers)

    server = Server()
    ingress.add_unimp_services(None, server)
    methods: dict[str, grpc.RpcMethodHandler] = {}
    for handler in server.handlers:
        methods.update(handler._method_handlers)
    assert methods["/unimp.v1.Personalization/Explain"].response_streaming
    assert not methods["/unimp.v1.Personalization/Recommend"].response_streaming
    assert "/unimp.v1.Catalog/UpsertItem" in methods and "/grpc.health.v1.Health/Check" in methods
    assert all(h.request_deserializer is None for h in methods.values())  # the replica gets raw bytes


class _Handle:
    """A deployment handle that calls a StoreService in-process (``.remote(...).result()`` / await)."""

    def __init__(self, service: StoreService) -> None:
        self._service = service

    def __getattr__(self, name: str) -> Any:
        service = self._service

        class Method:
            def remote(self, *args: Any) -> Any:
                value = getattr(service, name)(*args)

                class Response:
                    def result(self, timeout_s: float | None = None) -> Any:
                        return value

                    def __await__(self) -> Any:
                        yield from ()
                        return value

                return Response()

        return Method()


class _Catalog:
    def __init__(self) -> None:
        self.items: dict[str, CatalogItem] = {}

    def get(self, item_id: str) -> CatalogItem:
        from runtime.types import NotFound

        if item_id not in self.items:
            raise NotFound(item_id)
        return self.items[item_id]

    def upsert(self, item: CatalogItem, image: bytes | None) -> CatalogItem:
        self.items[item.item_id] = item
        return item

    def delete(self, item_id: str) -> None:
        self.items.pop(item_id)


def test_store_changes_reach_the_other_replicas(tmp_path: Path) -> None:
    import asyncio

    service = StoreService(str(tmp_path / "state"))
    a, b = RemoteStore(_Handle(service)), RemoteStore(_Handle(service))
    cat_a, cat_b = _Catalog(), _Catalog()
    assert a.replay_catalog(cat_a) == 0 and b.replay_catalog(cat_b) == 0
    iid, count = a.record_interaction("t", "u", HistoryItem(item_id="P1", rating=4), 1)
    assert (iid, count) == (1, 1) and b.history("t", "u", 10)[0].item_id == "P1"
    a.record_upsert(CatalogItem(item_id="N1", meta=ItemMeta(title="x"), available=True, token=-1, has_image=False),
                    None)
    assert b.forget_user("t", "u") == 1
    forgotten: list[tuple[str, str]] = []
    applied = b.apply(asyncio.run(b.changes()), cat_b, lambda t, u: forgotten.append((t, u)))
    assert applied == (1, 1) and cat_b.get("N1").meta.title == "x"  # b's own forget is replayed (idempotent)
    applied = a.apply(asyncio.run(a.changes()), cat_a, lambda t, u: forgotten.append((t, u)))
    assert applied == (0, 1) and forgotten == [("t", "u"), ("t", "u")]  # a's own edit is not re-applied; b's forget is
    assert a.apply(asyncio.run(a.changes()), cat_a, lambda t, u: None) == (0, 0)
    fresh = RemoteStore(_Handle(service))  # a replica started later replays the whole journal
    cat_c = _Catalog()
    assert fresh.replay_catalog(cat_c) == 1 and "N1" in cat_c.items
    service.store.close()


def test_cluster_options_and_exposure_checks() -> None:
    assert parse_autoscale("1:4") == (1, 4)
    with pytest.raises(ConfigError, match=r"^autoscale: "):
        parse_autoscale("4")
    with pytest.raises(ConfigError, match=r"^autoscale: "):
        ClusterOptions(autoscale=(3, 1)).validate()
    with pytest.raises(ConfigError, match=r"^replicas: "):
        ClusterOptions(replicas=0).validate()
    with pytest.raises(ConfigError, match=r"^insecure: .*all interfaces"):
        check_exposure(ServerConfig(auth=AuthConfig(tokens={"t": "x"})))
    with pytest.raises(ConfigError, match=r"^tls: "):
        check_exposure(ServerConfig(insecure=True, tls=TlsConfig(cert=Path("c"), key=Path("k"))))
    check_exposure(ServerConfig(insecure=True))


def test_cli_refuses_replicas_without_ray_engine(tmp_path: Path) -> None:
    from unimp.cli import main

    assert main(["serve", "--artifacts", str(tmp_path), "--replicas", "2"]) == 2
    assert main(["serve", "--artifacts", str(tmp_path), "--engine", "ray", "--autoscale", "x"]) == 2


def test_serve_config_file_names_real_entry_points() -> None:
    yaml = pytest.importorskip("yaml")
    config = yaml.safe_load((REPO / "deploy" / "serve.yaml").read_text())
    assert config["grpc_options"]["grpc_servicer_functions"] == [ingress.SERVICER_FUNCTION]
    module, _, name = config["applications"][0]["import_path"].partition(":")
    import importlib

    assert callable(getattr(importlib.import_module(module), name))
    fn_module, _, fn = ingress.SERVICER_FUNCTION.rpartition(".")
    assert getattr(importlib.import_module(fn_module), fn) is ingress.add_unimp_services


def test_ingress_settings_follow_the_options() -> None:
    from runtime.deploy.app import ROUTER, ingress_settings

    config = ServerConfig(max_inflight=3, max_inflight_cheap=5)
    fixed = ingress_settings(config, ClusterOptions(replicas=3, replica_cpus=0.5))
    assert fixed["num_replicas"] == 3 and "autoscaling_config" not in fixed
    assert fixed["ray_actor_options"] == {"num_cpus": 0.5} and fixed["max_ongoing_requests"] == 8
    assert fixed["request_router_config"]["request_router_class"] == ROUTER
    scaled = ingress_settings(config, ClusterOptions(autoscale=(1, 4), affinity=False))
    assert "num_replicas" not in scaled and "request_router_config" not in scaled
    assert scaled["autoscaling_config"]["min_replicas"] == 1 and scaled["autoscaling_config"]["max_replicas"] == 4
    module, _, name = ROUTER.partition(":")
    import importlib
    import importlib.util

    if importlib.util.find_spec("ray") is None:
        return  # the router class itself needs Ray (the integration test covers it where Ray is installed)
    assert importlib.import_module(module).__dict__[name].__name__ == name


def test_router_reads_the_key_from_serve_pending_requests() -> None:
    import importlib.util
    import os
    import pickle

    if importlib.util.find_spec("ray") is None:
        if os.environ.get("CI"):
            pytest.fail("Ray Serve is required in CI")
        pytest.skip("Ray Serve is not installed")
    from ray.serve._private.common import gRPCRequest

    from runtime.deploy.router import request_key

    class Context:
        def invocation_metadata(self) -> Any:
            return SHOP

    class Metadata:
        call_method = "Recommend"
        grpc_context = Context()

    class Pending:
        def __init__(self, args: list[Any]) -> None:
            self.args = args
            self.metadata = Metadata()

    request = pickle.dumps(gRPCRequest(user_request_proto=_raw(ppb.RecommendRequest(user_id="u1"))))
    want = affinity_key("Recommend", _raw(ppb.RecommendRequest(user_id="u1")), SHOP)
    assert want is not None and request_key(Pending([request])) == want  # type: ignore[arg-type]
    assert request_key(Pending([])) is None  # type: ignore[arg-type]


def test_unreachable_store_is_unavailable() -> None:
    import asyncio

    from runtime.types import Unavailable

    class Broken:
        def __getattr__(self, name: str) -> Any:
            class Method:
                def remote(self, *args: Any) -> Any:
                    class Response:
                        def result(self, timeout_s: float | None = None) -> Any:
                            raise TimeoutError("store replica restarting")

                        def __await__(self) -> Any:
                            raise TimeoutError("store replica restarting")
                            yield

                    return Response()

            return Method()

    store = RemoteStore(Broken())
    with pytest.raises(Unavailable, match="interaction store is unavailable"):
        store.history("t", "u", 5)
    with pytest.raises(Unavailable, match="interaction store is unavailable"):
        asyncio.run(store.changes())


def test_history_prefetched_with_the_changes_saves_a_store_call(tmp_path: Path) -> None:
    import asyncio

    from runtime.deploy.store import prefetch

    service = StoreService(str(tmp_path / "state"))
    calls: list[str] = []

    class Counting(_Handle):
        def __getattr__(self, name: str) -> Any:
            calls.append(name)
            return super().__getattr__(name)

    store = RemoteStore(Counting(service))
    store.record_interaction("t", "u", HistoryItem(item_id="P1", rating=4), 1)
    changes = asyncio.run(store.changes(("t", "u", 10)))
    assert changes.history is not None and [h.item_id for h in changes.history] == ["P1"]
    calls.clear()
    prefetch(("t", "u", 10), changes.history)
    assert [h.item_id for h in store.history("t", "u", 10)] == ["P1"] and calls == []  # served from the prefetch
    assert [h.item_id for h in store.history("t", "u", 10)] == ["P1"] and calls == ["history"]  # used once
    assert asyncio.run(store.changes()).history is None
    service.store.close()
