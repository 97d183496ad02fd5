"""The interaction store and the catalog edit journal shared by all replicas: one writer.

A SQLite file cannot be shared by replicas on several machines, so the cluster has exactly one
``StoreService`` (a Serve deployment with one replica, ``num_cpus=0``) that owns the state directory
(``runtime.server.store.StateStore``, the same file ``unimp serve`` uses). Every model replica reaches
it through ``RemoteStore``, which has StateStore's interface, so the servicer is unchanged:

- RecordInteraction, DeleteInteraction and ForgetUser are acknowledged only after the store has
  committed them (``synchronous=FULL``); the serving replica keeps no state of its own, so killing it
  loses nothing acknowledged. A killed store replica is restarted by Serve on the same file (pin it to
  one node, or give it a persistent volume, in a multi-machine cluster; see the README).
- Catalog edits are applied by the replica that served them and journaled here; every replica asks
  the store for the journal rows and user forgets it has not seen yet (``changes``, which also returns
  the stored history the request will read, so a request costs one store round trip) before each
  request, so a catalog edit or a ForgetUser served by one replica is seen by the next request on any
  replica (read-your-writes across replicas), and prefix-cache entries of a forgotten user are dropped
  everywhere.
"""

from __future__ import annotations

import contextvars
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runtime.api import CatalogItem, CatalogStore
from runtime.server.store import CatalogEdit, StateStore, apply_catalog_edits
from runtime.types import HistoryItem, RuntimeError_, Unavailable

STORE_TIMEOUT_S = 30.0
"""How long a replica's worker thread waits for the store deployment."""


@dataclass(frozen=True)
class Changes:
    """What a replica has not applied yet: journal rows and user forgets after its cursors."""

    epoch: str
    """Changes when the store restarts: the forget log (kept in memory) starts again."""
    edits: list[CatalogEdit]
    forgets: list[tuple[int, str, str]]
    """(sequence number, tenant, user id)."""
    history: tuple[HistoryItem, ...] | None = None
    """The stored history asked for with the changes (one round trip for both), if any."""


Reader = tuple[str, str, int]
"""(tenant, user id, limit) of a stored history to read along with the changes."""

_PREFETCHED: contextvars.ContextVar[dict[Reader, tuple[HistoryItem, ...]] | None] = contextvars.ContextVar(
    "unimp_prefetched_history", default=None)
"""Histories read with the current call's changes; ``RemoteStore.history`` uses each one once."""


def prefetch(reader: Reader, history: tuple[HistoryItem, ...]) -> None:
    """Offer ``history`` to the current call's first ``RemoteStore.history(*reader)`` (worker threads
    inherit the context)."""
    _PREFETCHED.set({reader: history})


class StoreService:
    """The single writer: a StateStore plus the in-memory log of forgotten users."""

    def __init__(self, state_dir: str) -> None:
        self.store = StateStore(Path(state_dir))
        self.epoch = uuid.uuid4().hex
        self._lock = threading.Lock()
        self._forgets: list[tuple[int, str, str]] = []

    def _forgot(self, tenant: str, user_id: str) -> None:
        with self._lock:
            self._forgets.append((len(self._forgets) + 1, tenant, user_id))

    def history(self, tenant: str, user_id: str, limit: int) -> tuple[HistoryItem, ...]:
        return self.store.history(tenant, user_id, limit)

    def record_interaction(self, tenant: str, user_id: str, item: HistoryItem, occurred_at_ms: int) -> tuple[int, int]:
        return self.store.record_interaction(tenant, user_id, item, occurred_at_ms)

    def delete_interaction(self, tenant: str, user_id: str, interaction_id: int) -> bool:
        deleted = self.store.delete_interaction(tenant, user_id, interaction_id)
        if deleted:
            self._forgot(tenant, user_id)
        return deleted

    def count(self, tenant: str, user_id: str) -> int:
        return self.store.count(tenant, user_id)

    def forget_user(self, tenant: str, user_id: str) -> int:
        removed = self.store.forget_user(tenant, user_id)
        self._forgot(tenant, user_id)
        return removed

    def record_upsert(self, item: CatalogItem, image: bytes | None) -> int:
        with self._lock:
            self.store.record_upsert(item, image)
            return self.store.last_edit_seq()

    def record_delete(self, item_id: str) -> int:
        with self._lock:
            self.store.record_delete(item_id)
            return self.store.last_edit_seq()

    def changes(self, epoch: str, after_edit: int, after_forget: int, reader: Reader | None = None) -> Changes:
        with self._lock:
            forgets = [f for f in self._forgets if f[0] > after_forget] if epoch == self.epoch else []
        history = self.store.history(*reader) if reader is not None else None
        return Changes(epoch=self.epoch, edits=self.store.catalog_edits(after_edit), forgets=forgets,
                       history=history)

    def check_health(self) -> None:
        self.store.count("", "")

    def __del__(self) -> None:
        try:
            self.store.close()
        except Exception:
            pass


class RemoteStore:
    """StateStore's interface over the store deployment's handle; used from the servicer's worker threads.

    Also keeps the replica's cursors into the store's change log (``pull``).
    """

    def __init__(self, handle: Any) -> None:
        self._handle = handle
        self._lock = threading.Lock()
        self.epoch = ""
        self.edit_cursor = 0
        self.forget_cursor = 0
        self._own_edits: set[int] = set()

    def _call(self, method: str, *args: Any) -> Any:
        try:
            return getattr(self._handle, method).remote(*args).result(timeout_s=STORE_TIMEOUT_S)
        except RuntimeError_:
            raise
        except Exception as exc:  # the store replica is restarting, unreachable or timed out
            raise Unavailable(f"the interaction store is unavailable ({type(exc).__name__}); retry shortly") from exc

    def history(self, tenant: str, user_id: str, limit: int) -> tuple[HistoryItem, ...]:
        prefetched = _PREFETCHED.get()
        if prefetched is not None and (tenant, user_id, limit) in prefetched:
            return prefetched.pop((tenant, user_id, limit))
        return tuple(self._call("history", tenant, user_id, limit))

    def record_interaction(self, tenant: str, user_id: str, item: HistoryItem, occurred_at_ms: int) -> tuple[int, int]:
        interaction_id, count = self._call("record_interaction", tenant, user_id, item, occurred_at_ms)
        return int(interaction_id), int(count)

    def delete_interaction(self, tenant: str, user_id: str, interaction_id: int) -> bool:
        return bool(self._call("delete_interaction", tenant, user_id, interaction_id))

    def count(self, tenant: str, user_id: str) -> int:
        return int(self._call("count", tenant, user_id))

    def forget_user(self, tenant: str, user_id: str) -> int:
        return int(self._call("forget_user", tenant, user_id))

    def record_upsert(self, item: CatalogItem, image: bytes | None) -> None:
        seq = int(self._call("record_upsert", item, image))
        with self._lock:
            self._own_edits.add(seq)

    def record_delete(self, item_id: str) -> None:
        seq = int(self._call("record_delete", item_id))
        with self._lock:
            self._own_edits.add(seq)

    def replay_catalog(self, catalog: CatalogStore) -> int:
        """Apply the whole journal (a replica's start); the replica's cursor starts after it."""
        changes: Changes = self._call("changes", "", 0, 0)
        self.epoch = changes.epoch
        self.edit_cursor = max((e.seq for e in changes.edits), default=0)
        return apply_catalog_edits(catalog, changes.edits)

    async def changes(self, reader: Reader | None = None) -> Changes:
        """The store's changes after this replica's cursors (called on the replica's event loop), with the
        history of ``reader`` when given."""
        try:
            result: Changes = await self._handle.changes.remote(self.epoch, self.edit_cursor, self.forget_cursor,
                                                                reader)
        except Exception as exc:
            raise Unavailable(f"the interaction store is unavailable ({type(exc).__name__}); retry shortly") from exc
        return result

    def apply(self, changes: Changes, catalog: CatalogStore, forget: Any) -> tuple[int, int]:
        """Apply fetched changes (worker thread; the caller holds the catalog lock). Returns (edits, forgets)."""
        with self._lock:
            if changes.epoch != self.epoch:
                self.epoch, self.forget_cursor = changes.epoch, 0
            fresh = [e for e in changes.edits if e.seq > self.edit_cursor and e.seq not in self._own_edits]
            if changes.edits:
                self.edit_cursor = max(self.edit_cursor, max(e.seq for e in changes.edits))
                self._own_edits = {s for s in self._own_edits if s > self.edit_cursor}
            forgets = [f for f in changes.forgets if f[0] > self.forget_cursor]
            if changes.forgets:
                self.forget_cursor = max(self.forget_cursor, max(f[0] for f in changes.forgets))
        applied = apply_catalog_edits(catalog, fresh) if fresh else 0
        for _, tenant, user_id in forgets:
            forget(tenant, user_id)
        return applied, len(forgets)

    def close(self) -> None:
        pass
