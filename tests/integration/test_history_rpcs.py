"""DeleteInteraction, ForgetUser and the state files, over real sockets against the fake engine."""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

import grpc
import pytest

from runtime.client import RpcError, UnimpClient
from runtime.server import cli_commands
from runtime.server.app import ServerThread
from runtime.server.config import ServerConfig
from runtime.types import HistoryItem, ItemMeta
from tests.integration.fake_engine import FakeEngine


def make_config(tmp_path: Path, **auth: object) -> ServerConfig:
    config = ServerConfig(port=0, state_dir=tmp_path / "state")
    config.metrics.port = 0
    config.log.level = "WARNING"
    for key, value in auth.items():
        setattr(config.auth, key, value)
    return config


def test_delete_one_interaction(tmp_path: Path) -> None:
    engine = FakeEngine()
    with ServerThread(make_config(tmp_path), engine) as server, UnimpClient(server.target, timeout=10) as client:
        first = client.record_interaction("u1", "sku-0001", occurred_at_ms=10)
        second = client.record_interaction("u1", HistoryItem(meta=ItemMeta(title="Gift card")), occurred_at_ms=20)
        other = client.record_interaction("u2", "sku-0003")
        assert first.history_length == 1 and second.history_length == 2
        assert len({first.interaction_id, second.interaction_id, other.interaction_id}) == 3
        assert min(first.interaction_id, second.interaction_id) > 0

        assert client.delete_interaction("u1", first.interaction_id) == 1
        client.recommend(user_id="u1", top_k=2)
        sent = engine.last_request.history  # type: ignore[attr-defined]
        assert [h.meta.title if h.meta else h.item_id for h in sent] == ["Gift card"]
        assert engine.last_request.user_id == "u1"  # type: ignore[attr-defined]
        assert engine.forgotten == [("", "u1")]  # its cached prefixes went with it

        for user, interaction_id in (("u1", first.interaction_id), ("u1", other.interaction_id), ("u3", 1)):
            with pytest.raises(RpcError) as info:
                client.delete_interaction(user, interaction_id)
            assert info.value.code == grpc.StatusCode.NOT_FOUND and info.value.field == "interaction_id"
            assert info.value.details.startswith("interaction_id: ")
        with pytest.raises(RpcError) as info:
            client.delete_interaction("u1", 0)
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT and info.value.field == "interaction_id"
        with pytest.raises(RpcError) as info:
            client.delete_interaction("", 1)
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT and info.value.field == "user_id"
        assert client.recommend(user_id="u2", top_k=1).items  # u2 untouched


def test_forget_user_is_tenant_scoped_and_audited(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    engine = FakeEngine()
    config = make_config(tmp_path, tokens={"store-1": "tok-1", "store-2": "tok-2"})
    with ServerThread(config, engine) as server, \
            UnimpClient(server.target, token="tok-1", timeout=10) as one, \
            UnimpClient(server.target, token="tok-2", timeout=10) as two:
        for sku in ("sku-0001", "sku-0002", "sku-0003"):
            one.record_interaction("shared", sku)
        two.record_interaction("shared", "sku-0004")
        one.recommend(user_id="shared", top_k=2)
        one.search("mug", user_id="shared", top_k=2)
        two.recommend(user_id="shared", top_k=2)
        with caplog.at_level(logging.INFO, logger="runtime.server.servicer"):
            forgotten = one.forget_user("shared")
        assert (forgotten.interactions_removed, forgotten.prefixes_removed) == (3, 2)
        audit = [r for r in caplog.records if getattr(r, "audit", "") == "forget_user"]
        assert len(audit) == 1 and audit[0].levelno >= logging.INFO
        record = audit[0]
        assert (record.tenant, record.user_id) == ("store-1", "shared")  # type: ignore[attr-defined]
        assert (record.interactions_removed, record.prefixes_removed) == (3, 2)  # type: ignore[attr-defined]
        assert record.request_id  # type: ignore[attr-defined]

        with pytest.raises(RpcError) as info:
            one.recommend(user_id="shared")
        assert info.value.code == grpc.StatusCode.NOT_FOUND and info.value.field == "user_id"
        assert engine.prefixes == {("store-2", "shared"): 1}  # the other tenant's user is untouched
        assert two.recommend(user_id="shared", top_k=1).items
        assert one.forget_user("shared").interactions_removed == 0


def test_state_files_are_private(tmp_path: Path) -> None:
    with ServerThread(make_config(tmp_path), FakeEngine()) as server, UnimpClient(server.target, timeout=10) as c:
        c.record_interaction("u1", "sku-0001")
        state = tmp_path / "state"
        assert stat.S_IMODE(os.stat(state).st_mode) == 0o700
        for name in ("unimp.sqlite3", "unimp.sqlite3-wal", "unimp.sqlite3-shm"):
            assert stat.S_IMODE(os.stat(state / name).st_mode) == 0o600, name


def test_cli_delete_interaction_and_forget_user(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import argparse
    import json

    parser = argparse.ArgumentParser()
    cli_commands.add_client_arguments(parser)

    def run(*argv: str) -> dict[str, int]:
        assert cli_commands.run_client(parser.parse_args([argv[0], "--target", server.target, *argv[1:]])) == 0
        return json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    with ServerThread(make_config(tmp_path), FakeEngine()) as server:
        recorded = run("record-interaction", "--user", "u1", "--item", "sku-0001")
        run("record-interaction", "--user", "u1", "--item", "sku-0002")
        assert recorded["history_length"] == 1 and recorded["interaction_id"] > 0
        assert run("delete-interaction", "--user", "u1", "--interaction-id", str(recorded["interaction_id"])) == {
            "history_length": 1}
        assert run("forget-user", "--user", "u1") == {"interactions_removed": 1, "prefixes_removed": 0}
