"""``UserAffinityRouter``: Serve's request router for the ingress deployment (``ray.serve.request_router``).

Serve's proxy calls ``choose_replicas`` for every request with the replicas that are running; the
router returns them as ranks (one replica per rank) in ``runtime.deploy.routing.rank`` order for the
request's affinity key, and Serve sends the request to the first rank whose replica accepts it (below
its ``max_ongoing_requests``), so a full replica spills to the key's next replica. A dead replica is
no longer a candidate: its keys move to their next replica and stay there. Requests without a key
(catalog RPCs) go to the least-loaded replicas first.
"""

from __future__ import annotations

import pickle
from typing import Any

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

from .routing import affinity_key, rank


def _request_bytes(pending: PendingRequest) -> bytes | None:
    """The raw request message of a gRPC call routed by Serve's proxy (None for anything else)."""
    if not pending.args:
        return None
    arg: Any = pending.args[0]
    if isinstance(arg, (bytes, bytearray)):
        try:
            arg = pickle.loads(arg)  # the proxy's gRPCRequest, pickled by Serve itself
        except Exception:
            return None
    raw = getattr(arg, "user_request_proto", None)
    return bytes(raw) if isinstance(raw, (bytes, bytearray)) else None


def request_key(pending: PendingRequest | None) -> str | None:
    if pending is None:
        return None
    raw = _request_bytes(pending)
    if raw is None:
        return None
    context = pending.metadata.grpc_context
    metadata = context.invocation_metadata() if context is not None else ()
    return affinity_key(pending.metadata.call_method, raw, metadata)


class UserAffinityRouter(RequestRouter):
    """Rank replicas by user / tenant (or history content) affinity with a load bound."""

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        cache = self.replica_queue_len_cache
        loads = {r.replica_id: cache.get(r.replica_id) for r in candidate_replicas}
        by_id = {r.replica_id: r for r in candidate_replicas}
        key = request_key(pending_request)
        if key is None:
            ordered = sorted(candidate_replicas, key=lambda r: loads.get(r.replica_id) or 0)
            return [ordered]
        names = {r.replica_id: r.replica_id.unique_id for r in candidate_replicas}
        order = rank(key, list(by_id), names, loads)
        return [[by_id[replica_id]] for replica_id in order]
