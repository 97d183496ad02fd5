"""The Ray Serve acceptance scenario, run as a subprocess inside a private network namespace.

    python -m tests.integration.ray_scenario --artifacts DIR --workdir DIR   (prints one JSON object)

One cluster (2 replicas on the tiny demo) serves every check: the same RPC sequence goes to a local
``unimp serve`` and to the Serve ingress and the results are compared; one user's repeated requests are
tracked by the replica that answered (``unimp-replica`` trailing metadata); that replica is killed and the
user's next requests must be answered elsewhere with nothing acknowledged lost; then Serve and Ray stop
and the scenario reports the Ray processes still alive and the files written outside ``--workdir``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.json_format import MessageToDict

from runtime.deploy.sandbox import free_port, wait_serving
from runtime.server.protos import catalog_pb2 as cpb
from runtime.server.protos import personalization_pb2 as ppb

TOKENS = {"shop": "tok-shop", "kiosk": "tok-kiosk"}
ADMIN = "tok-admin"
P, C = "/unimp.v1.Personalization/", "/unimp.v1.Catalog/"
REPLIES: dict[str, Any] = {
    "Recommend": ppb.RecommendResponse, "Search": ppb.SearchResponse,
    "PredictPreference": ppb.PredictPreferenceResponse, "Explain": ppb.ExplainResponse,
    "SelectItems": ppb.SelectItemsResponse, "GenerateImage": ppb.GenerateImageResponse,
    "RecordInteraction": ppb.RecordInteractionResponse, "DeleteInteraction": ppb.DeleteInteractionResponse,
    "ForgetUser": ppb.ForgetUserResponse, "UpsertItem": cpb.UpsertItemResponse, "GetItem": cpb.GetItemResponse,
    "ListItems": cpb.ListItemsResponse, "DeleteItem": cpb.DeleteItemResponse,
}
STREAMS = {"Explain", "GenerateImage"}


def call(channel: grpc.Channel, rpc: str, request: Any, token: str | None, timeout: float = 30.0) -> dict[str, Any]:
    """One RPC by raw bytes: {"code", "details", "field", "replica", "messages"}."""
    path = (C if rpc in ("UpsertItem", "GetItem", "ListItems", "DeleteItem") else P) + rpc
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    reply = REPLIES[rpc]
    out: dict[str, Any] = {"code": "OK", "details": "", "field": None, "replica": None, "messages": []}
    try:
        if rpc in STREAMS:
            stream = channel.unary_stream(path)(request.SerializeToString(), metadata=metadata, timeout=timeout)
            out["messages"] = [reply.FromString(m) for m in stream]
            trailing = stream.trailing_metadata() or ()
        else:
            raw, state = channel.unary_unary(path).with_call(request.SerializeToString(), metadata=metadata,
                                                              timeout=timeout)
            out["messages"] = [reply.FromString(raw)]
            trailing = state.trailing_metadata() or ()
    except grpc.RpcError as exc:
        out["code"], out["details"] = exc.code().name, exc.details()
        trailing = exc.trailing_metadata() or ()
    for key, value in trailing:
        if key == "unimp-field":
            out["field"] = value
        elif key == "unimp-replica":
            out["replica"] = value
    out["messages"] = [_clean(MessageToDict(m, preserving_proto_field_name=True)) for m in out["messages"]]
    return out


def _clean(value: Any) -> Any:
    """Drop timings (wall-clock) from a message dict."""
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items() if k != "timings"}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def same(a: Any, b: Any, rtol: float = 1e-4, atol: float = 1e-6) -> bool:
    """Equal structures; floats within a relative tolerance (the replicas' prefix caches differ)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k], rtol, atol) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y, rtol, atol) for x, y in zip(a, b))
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, (int, float)) and isinstance(b, (int, float)) and math.isclose(a, b, rel_tol=rtol,
                                                                                          abs_tol=atol)
    return bool(a == b)


def sequence() -> list[tuple[str, Any, str | None]]:
    """Every RPC, successes and failures, as (rpc, request, token)."""
    shop, admin = TOKENS["shop"], ADMIN
    hist = [ppb.HistoryItem(item_id="P00001", rating=4), ppb.HistoryItem(item_id="P00003", rating=2)]
    out: list[tuple[str, Any, str | None]] = [
        ("RecordInteraction", ppb.RecordInteractionRequest(user_id="alice", item=ppb.HistoryItem(
            item_id="P00001", rating=5)), shop),
        ("RecordInteraction", ppb.RecordInteractionRequest(user_id="alice", item=ppb.HistoryItem(
            item_id="P00004", rating=3)), shop),
        ("Recommend", ppb.RecommendRequest(user_id="alice", options=ppb.DecodeOptions(top_k=3)), shop),
        ("Recommend", ppb.RecommendRequest(history=hist, options=ppb.DecodeOptions(top_k=4)), shop),
        ("Search", ppb.SearchRequest(user_id="alice", query="blue shoes", options=ppb.DecodeOptions(top_k=3)), shop),
        ("PredictPreference", ppb.PredictPreferenceRequest(user_id="alice", target=ppb.HistoryItem(
            item_id="P00005")), shop),
        ("Explain", ppb.ExplainRequest(history=hist, target=ppb.HistoryItem(item_id="P00005"),
                                       sampling=ppb.SamplingOptions(max_new_tokens=6)), shop),
        ("SelectItems", ppb.SelectItemsRequest(history=hist, candidates=[
            ppb.HistoryItem(item_id=i) for i in ("P00005", "P00006", "P00007")]), shop),
        ("GenerateImage", ppb.GenerateImageRequest(history=hist, query="a red bag"), shop),
        ("Recommend", ppb.RecommendRequest(history=hist, options=ppb.DecodeOptions(top_k=100000)), shop),  # INVALID_ARGUMENT top_k
        ("Recommend", ppb.RecommendRequest(user_id="nobody", options=ppb.DecodeOptions(top_k=3)), shop),  # NOT_FOUND user_id
        ("Explain", ppb.ExplainRequest(history=hist), shop),  # INVALID_ARGUMENT target (stream)
        ("Recommend", ppb.RecommendRequest(history=hist), None),  # UNAUTHENTICATED
        ("UpsertItem", cpb.UpsertItemRequest(item_id="NEW-1"), shop),  # PERMISSION_DENIED
        ("UpsertItem", cpb.UpsertItemRequest(item_id="NEW-1", attributes=cpb.ItemAttributes(
            category="Shoes", title="Trail Runner"), available=True), admin),
        ("GetItem", cpb.GetItemRequest(item_id="NEW-1"), shop),
        ("ListItems", cpb.ListItemsRequest(page_size=3), shop),
        ("RecordInteraction", ppb.RecordInteractionRequest(user_id="bob", item=ppb.HistoryItem(
            item_id="NEW-1", rating=4)), shop),
        ("Recommend", ppb.RecommendRequest(user_id="bob", options=ppb.DecodeOptions(top_k=3)), shop),
        ("DeleteInteraction", ppb.DeleteInteractionRequest(user_id="alice", interaction_id=2), shop),
        ("DeleteItem", cpb.DeleteItemRequest(item_id="NEW-1"), admin),
        ("GetItem", cpb.GetItemRequest(item_id="NEW-1"), shop),  # NOT_FOUND after the delete
        ("ForgetUser", ppb.ForgetUserRequest(user_id="bob"), shop),
        ("Recommend", ppb.RecommendRequest(user_id="bob", options=ppb.DecodeOptions(top_k=3)), shop),  # NOT_FOUND: forgotten
    ]
    return out


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--artifacts", type=Path, required=True)
    parser.add_argument("--workdir", type=Path, required=True)
    args = parser.parse_args()
    started = time.time()
    report: dict[str, Any] = {}
    real_home = Path(os.environ.get("UNIMP_REAL_HOME", "/root"))

    from runtime.deploy import app as deploy
    from runtime.deploy.sandbox import processes_mentioning, ray_temp_dir
    from runtime.server.app import ServerThread
    from runtime.server.config import AuthConfig, MetricsConfig, ServerConfig

    def config(state: str, port: int, insecure: bool) -> ServerConfig:
        return ServerConfig(artifacts=args.artifacts, host="127.0.0.1", port=port, insecure=insecure,
                            state_dir=args.workdir / state, auth=AuthConfig(tokens=dict(TOKENS), admin_token=ADMIN),
                            metrics=MetricsConfig(enabled=False))

    temp = ray_temp_dir(args.workdir)
    port = free_port()
    local = ServerThread(config("local-state", 0, insecure=False))
    t0 = time.perf_counter()
    deploy.start_cluster(config("ray-state", port, insecure=True), deploy.ClusterOptions(replicas=2),
                         temp_dir=temp, http_port=free_port(), num_cpus=2)
    report["cluster_start_s"] = round(time.perf_counter() - t0, 2)
    try:
        ray_ch = grpc.insecure_channel(f"127.0.0.1:{port}")
        local_ch = grpc.insecure_channel(local.target)
        report["health"] = wait_serving(ray_ch, 60)
        report["ready_s"] = round(time.perf_counter() - t0, 2)

        mismatches, codes = [], []
        for rpc, request, token in sequence():
            want, got = call(local_ch, rpc, request, token), call(ray_ch, rpc, request, token)
            codes.append([rpc, want["code"], got["code"], want["field"], got["field"]])
            keep = {k: want[k] for k in ("code", "details", "messages")}
            if rpc not in STREAMS or want["code"] == "OK":
                keep["field"] = want["field"]
            if not same(keep, {k: got[k] for k in keep}):
                mismatches.append({"rpc": rpc, "unimp_serve": want, "ray": got})
        # A deadline that passes ends the call with DEADLINE_EXCEEDED on both; the replica keeps serving.
        slow = ppb.ExplainRequest(history=[ppb.HistoryItem(item_id="P00001", rating=4)],
                                  target=ppb.HistoryItem(item_id="P00005"),
                                  sampling=ppb.SamplingOptions(max_new_tokens=64))
        codes.append(["Explain(deadline)", call(local_ch, "Explain", slow, TOKENS["shop"], timeout=0.005)["code"],
                      call(ray_ch, "Explain", slow, TOKENS["shop"], timeout=0.005)["code"], None, None])
        report["codes"] = codes
        report["mismatches"] = mismatches

        # Affinity: one user's repeated requests land on one replica; other users spread.
        shop = TOKENS["shop"]
        acked = 0
        for item in ("P00001", "P00002", "P00003"):
            r = call(ray_ch, "RecordInteraction", ppb.RecordInteractionRequest(
                user_id="carol", item=ppb.HistoryItem(item_id=item, rating=4)), shop)
            assert r["code"] == "OK", r
            acked = int(r["messages"][0]["history_length"])
        seen = [call(ray_ch, "Recommend", ppb.RecommendRequest(user_id="carol", options=ppb.DecodeOptions(top_k=3)), shop)["replica"]
                for _ in range(5)]
        report["carol_replicas"] = seen
        others = {call(ray_ch, "Recommend", ppb.RecommendRequest(history=[ppb.HistoryItem(
            item_id=f"P{i:05d}", rating=3)], user_id="", options=ppb.DecodeOptions(top_k=2)), shop)["replica"]
            for i in range(1, 21)}  # 20 history keys: all on one replica has probability 2e-6
        report["replicas_seen"] = sorted(r for r in others | set(seen) if r)

        # Kill carol's replica; she must be answered elsewhere with her acknowledged history intact.
        import ray

        victim = seen[0]
        actors = [a for a in ray.util.list_named_actors(all_namespaces=True) if victim in a["name"]]
        ray.kill(ray.get_actor(actors[0]["name"], namespace=actors[0]["namespace"]), no_restart=True)
        deadline, after = time.monotonic() + 60, None
        while time.monotonic() < deadline:
            r = call(ray_ch, "RecordInteraction", ppb.RecordInteractionRequest(
                user_id="carol", item=ppb.HistoryItem(item_id="P00006", rating=2)), shop, timeout=10)
            if r["code"] == "OK":
                after = r
                break
            time.sleep(0.2)
        report["after_kill_history_length"] = int(after["messages"][0]["history_length"]) if after else None
        report["acked_before_kill"] = acked
        rerouted = call(ray_ch, "Recommend", ppb.RecommendRequest(user_id="carol", options=ppb.DecodeOptions(top_k=3)), shop)
        report["rerouted"] = {"code": rerouted["code"], "replica": rerouted["replica"], "victim": victim}
    finally:
        t1 = time.perf_counter()
        deploy.stop_cluster()
        local.stop()
        report["stop_s"] = round(time.perf_counter() - t1, 2)
    leftover: list[int] = []
    for _ in range(50):
        leftover = processes_mentioning(f"{temp}/")
        if not leftover:
            break
        time.sleep(0.2)
    report["leftover_pids"] = leftover
    outside = []
    for root in (real_home / ".ray", Path("/tmp/ray")):
        if root.exists():
            outside += [str(p) for p in root.rglob("*") if p.exists() and p.lstat().st_mtime >= started]
    report["files_outside"] = outside[:20]
    report["wall_s"] = round(time.time() - started, 2)
    sys.stdout.write("UNIMP-REPORT " + json.dumps(report) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
