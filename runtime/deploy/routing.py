"""The routing policy, kept free of Ray so it can be tested on its own.

**Affinity key.** A request's key is its tenant and ``user_id`` (the tenant is a digest of the bearer
token: the router runs in Serve's proxy, outside the server's token table, and one token is one tenant)
or, for a request without a user, a digest of its inline ``history`` (the prefix-cache content key: the
same history has the same prefix KV). Requests with neither (catalog reads and writes) have no key.

**Ranking.** Rendezvous (highest-random-weight) hashing orders the replicas for a key: each replica's
weight is a hash of (key, replica id), so every proxy computes the same order without shared state, and
when a replica leaves or joins only the keys whose first choice it was move. **Load bound**: a replica
whose known queue length exceeds ``ceil(load_factor x mean)`` (and at least ``min_bound``) is demoted to the
end of the order, so a hot user cannot pile onto one replica while others idle (consistent hashing with
bounded load); Serve itself skips a replica that is at ``max_ongoing_requests`` and tries the next rank.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Hashable, Mapping, Sequence
from typing import Any, TypeVar

from google.protobuf.message import DecodeError

from runtime.server.protos import personalization_pb2 as ppb

LOAD_FACTOR = 1.25
"""A replica may hold up to this multiple of the mean queue length before its keys spill to the next one."""
MIN_BOUND = 2
"""Queue length below which no replica is considered overloaded (small clusters, light load)."""

K = TypeVar("K", bound=Hashable)

_USER_RPCS = {
    method.name: getattr(ppb, method.input_type.name)
    for method in ppb.DESCRIPTOR.services_by_name["Personalization"].methods
}


def tenant_of(metadata: Sequence[tuple[str, Any]] | None) -> str:
    """A short digest of the call's bearer token ('' without one): stands for the tenant."""
    for key, value in metadata or ():
        if key == "authorization":
            raw = value.encode("latin-1") if isinstance(value, str) else bytes(value)
            return hashlib.blake2b(raw, digest_size=8).hexdigest()
    return ""


def affinity_key(method: str, raw: bytes, metadata: Sequence[tuple[str, Any]] | None) -> str | None:
    """The request's affinity key (see the module docstring); None when it has none."""
    message_class = _USER_RPCS.get(method)
    if message_class is None:
        return None
    try:
        message = message_class.FromString(raw)
    except DecodeError:
        return None
    user_id = getattr(message, "user_id", "")
    if user_id:
        return f"user:{tenant_of(metadata)}:{user_id}"
    history = getattr(message, "history", None)
    if history:
        digest = hashlib.blake2b(digest_size=12)
        for item in history:
            digest.update(item.SerializeToString(deterministic=True))
        return f"history:{tenant_of(metadata)}:{digest.hexdigest()}"
    return None


def _weight(key: str, replica: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{key}\x00{replica}".encode(), digest_size=8).digest(), "big")


def load_bound(loads: Sequence[int], load_factor: float = LOAD_FACTOR, min_bound: int = MIN_BOUND) -> int:
    """The queue length above which a replica counts as overloaded."""
    if not loads:
        return min_bound
    return max(min_bound, math.ceil(load_factor * (sum(loads) + 1) / len(loads)))


def rank(key: str, replicas: Sequence[K], names: Mapping[K, str], loads: Mapping[K, int | None],
         load_factor: float = LOAD_FACTOR, min_bound: int = MIN_BOUND) -> list[K]:
    """``replicas`` in preference order for ``key``: rendezvous order, overloaded ones last.

    ``names`` gives each replica's stable id string; ``loads`` its last known queue length (None: unknown,
    treated as not overloaded).
    """
    ordered = sorted(replicas, key=lambda r: _weight(key, names[r]), reverse=True)
    known = [v for v in (loads.get(r) for r in replicas) if v is not None]
    bound = load_bound(known, load_factor, min_bound)
    fits = [r for r in ordered if (loads.get(r) or 0) <= bound]
    over = [r for r in ordered if (loads.get(r) or 0) > bound]
    return fits + over
