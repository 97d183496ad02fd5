"""The server's durable state in one SQLite file (``<state_dir>/unimp.sqlite3``).

Two tables:

* ``interactions``: what RecordInteraction appended, per (tenant, user). Requests that name a
  ``user_id`` read the most recent ``history_limit`` of them, oldest first. At most
  ``keep_per_user`` rows are kept per user (older ones are pruned on insert).
* ``catalog_edits``: catalog edits are persisted **alongside** the engine's catalog, not through it.
  The engine's ``CatalogStore`` holds the catalog shipped with the artifacts (in memory, read-only on
  disk); every UpsertItem / DeleteItem is applied to it and then recorded here as the item's final
  state (attributes, availability, latest uploaded image) or a tombstone. When the server starts, the
  edits are replayed into the freshly loaded engine catalog in edit order, so edits survive restarts
  and artifacts can be re-exported without losing them.

The connection is shared by the server's worker threads behind a lock; writes are committed with
``synchronous=FULL`` in WAL mode. The file and its ``-wal`` / ``-shm`` files are 0600, a state directory
the store creates is 0700 (``runtime.statefiles``). Each interaction has an id (returned by
RecordInteraction) by which DeleteInteraction removes it; ForgetUser removes all of a user's.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from runtime.api import CatalogItem, CatalogStore
from runtime.statefiles import connect_private, private_dir
from runtime.types import HistoryItem, ItemMeta, NotFound, RuntimeError_

logger = logging.getLogger(__name__)

DB_NAME = "unimp.sqlite3"
SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS schema_info (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS interactions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    tenant TEXT NOT NULL,
    user_id TEXT NOT NULL,
    item_id TEXT NOT NULL,          -- catalog id, or '' for an inline item
    meta TEXT,                      -- JSON ItemMeta of an inline item, NULL otherwise
    image BLOB,                     -- encoded image of an inline item, NULL if none
    rating INTEGER NOT NULL,
    explanation TEXT NOT NULL,
    occurred_at_ms INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS interactions_by_user ON interactions (tenant, user_id, occurred_at_ms, id);
CREATE TABLE IF NOT EXISTS catalog_edits (
    item_id TEXT PRIMARY KEY,
    seq INTEGER NOT NULL,           -- edit order, for replay
    deleted INTEGER NOT NULL,
    meta TEXT NOT NULL,             -- JSON ItemMeta
    available INTEGER NOT NULL,
    image BLOB                      -- latest image uploaded through UpsertItem, NULL if none
);
"""


class StateStore:
    """SQLite-backed interaction history and catalog edit journal."""

    def __init__(self, state_dir: Path, keep_per_user: int = 1000) -> None:
        state_dir = private_dir(Path(state_dir))
        self.path = state_dir / DB_NAME
        self.keep_per_user = keep_per_user
        self._lock = threading.Lock()
        self._db = connect_private(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
            row = self._db.execute("SELECT value FROM schema_info WHERE key='version'").fetchone()
            if row is None:
                self._db.execute("INSERT INTO schema_info VALUES ('version', ?)", (str(SCHEMA_VERSION),))
            elif int(row[0]) != SCHEMA_VERSION:
                raise RuntimeError(f"{self.path} has store schema {row[0]}; this server reads {SCHEMA_VERSION}")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- interactions ------------------------------------------------------------------------------

    def record_interaction(self, tenant: str, user_id: str, item: HistoryItem, occurred_at_ms: int) -> tuple[int, int]:
        """Append one interaction; returns its id and the number now stored for the user."""
        meta = json.dumps(asdict(item.meta)) if item.meta is not None else None
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                cursor = self._db.execute(
                    "INSERT INTO interactions (tenant, user_id, item_id, meta, image, rating, explanation, "
                    "occurred_at_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (tenant, user_id, item.item_id, meta, item.image or None, item.rating, item.explanation,
                     occurred_at_ms),
                )
                interaction_id = int(cursor.lastrowid or 0)
                self._db.execute(
                    "DELETE FROM interactions WHERE tenant = ? AND user_id = ? AND id NOT IN ("
                    " SELECT id FROM interactions WHERE tenant = ? AND user_id = ?"
                    " ORDER BY occurred_at_ms DESC, id DESC LIMIT ?)",
                    (tenant, user_id, tenant, user_id, self.keep_per_user),
                )
                (count,) = self._db.execute(
                    "SELECT COUNT(*) FROM interactions WHERE tenant = ? AND user_id = ?", (tenant, user_id)
                ).fetchone()
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return interaction_id, int(count)

    def delete_interaction(self, tenant: str, user_id: str, interaction_id: int) -> bool:
        """Remove one interaction of the user; False if the tenant's user has no interaction with that id."""
        with self._lock:
            cursor = self._db.execute(
                "DELETE FROM interactions WHERE tenant = ? AND user_id = ? AND id = ?", (tenant, user_id, interaction_id)
            )
        return cursor.rowcount > 0

    def count(self, tenant: str, user_id: str) -> int:
        """Number of interactions stored for the tenant's user."""
        with self._lock:
            (n,) = self._db.execute(
                "SELECT COUNT(*) FROM interactions WHERE tenant = ? AND user_id = ?", (tenant, user_id)
            ).fetchone()
        return int(n)

    def forget_user(self, tenant: str, user_id: str) -> int:
        """Remove every interaction of the tenant's user; returns how many there were."""
        with self._lock:
            cursor = self._db.execute("DELETE FROM interactions WHERE tenant = ? AND user_id = ?", (tenant, user_id))
        return int(cursor.rowcount)

    def history(self, tenant: str, user_id: str, limit: int) -> tuple[HistoryItem, ...]:
        """The user's ``limit`` most recent interactions, oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT item_id, meta, image, rating, explanation FROM interactions"
                " WHERE tenant = ? AND user_id = ? ORDER BY occurred_at_ms DESC, id DESC LIMIT ?",
                (tenant, user_id, limit),
            ).fetchall()
        return tuple(
            HistoryItem(
                item_id=item_id,
                meta=ItemMeta(**json.loads(meta)) if meta else None,
                image=bytes(image) if image else b"",
                rating=rating,
                explanation=explanation,
            )
            for item_id, meta, image, rating, explanation in reversed(rows)
        )

    # -- catalog edits -----------------------------------------------------------------------------

    def record_upsert(self, item: CatalogItem, image: bytes | None) -> None:
        """Persist an item's state after an UpsertItem; ``image`` None keeps the stored image."""
        with self._lock:
            self._db.execute(
                "INSERT INTO catalog_edits (item_id, seq, deleted, meta, available, image)"
                " VALUES (?, (SELECT COALESCE(MAX(seq), 0) + 1 FROM catalog_edits), 0, ?, ?, ?)"
                " ON CONFLICT (item_id) DO UPDATE SET seq = excluded.seq, deleted = 0, meta = excluded.meta,"
                " available = excluded.available, image = COALESCE(excluded.image, catalog_edits.image)",
                (item.item_id, json.dumps(asdict(item.meta)), int(item.available), image),
            )

    def record_delete(self, item_id: str) -> None:
        """Persist a tombstone for a deleted item."""
        with self._lock:
            self._db.execute(
                "INSERT INTO catalog_edits (item_id, seq, deleted, meta, available, image)"
                " VALUES (?, (SELECT COALESCE(MAX(seq), 0) + 1 FROM catalog_edits), 1, '{}', 0, NULL)"
                " ON CONFLICT (item_id) DO UPDATE SET seq = excluded.seq, deleted = 1, meta = '{}',"
                " available = 0, image = NULL",
                (item_id,),
            )

    def last_edit_seq(self) -> int:
        """Sequence number of the latest catalog edit (0 before any)."""
        with self._lock:
            (seq,) = self._db.execute("SELECT COALESCE(MAX(seq), 0) FROM catalog_edits").fetchone()
        return int(seq)

    def catalog_edits(self, after_seq: int = 0) -> list[CatalogEdit]:
        """The items whose latest edit came after ``after_seq``, in edit order (their final states)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, item_id, deleted, meta, available, image FROM catalog_edits WHERE seq > ? ORDER BY seq",
                (after_seq,),
            ).fetchall()
        return [CatalogEdit(seq=int(seq), item_id=item_id, deleted=bool(deleted), meta=meta,
                            available=bool(available), image=bytes(image) if image is not None else None)
                for seq, item_id, deleted, meta, available, image in rows]

    def replay_catalog(self, catalog: CatalogStore) -> int:
        """Apply the persisted edits to a freshly loaded catalog; returns how many were applied.

        An edit the catalog rejects (e.g. an image over a lowered limit) is logged and skipped.
        """
        return apply_catalog_edits(catalog, self.catalog_edits())


@dataclass(frozen=True)
class CatalogEdit:
    """One row of the catalog edit journal: an item's final state after its latest edit, or a tombstone."""

    seq: int
    item_id: str
    deleted: bool
    meta: str
    """JSON ItemMeta."""
    available: bool
    image: bytes | None


def apply_catalog_edits(catalog: CatalogStore, edits: list[CatalogEdit]) -> int:
    """Apply journal rows (in their order) to a catalog; returns how many were applied (see replay_catalog)."""
    started, applied = time.monotonic(), 0
    for edit in edits:
        item_id = edit.item_id
        try:
            if edit.deleted:
                try:
                    catalog.delete(item_id)
                except NotFound:
                    pass  # already absent from these artifacts
            else:
                try:
                    current = catalog.get(item_id)
                    token = current.token
                    has_image = current.has_image or edit.image is not None
                except NotFound:
                    token, has_image = -1, edit.image is not None
                catalog.upsert(
                    CatalogItem(item_id=item_id, meta=ItemMeta(**json.loads(edit.meta)), available=edit.available,
                                token=token, has_image=has_image),
                    edit.image,
                )
            applied += 1
        except RuntimeError_ as exc:
            logger.warning("skipped a stored catalog edit of %r: %s", item_id, exc)
    if edits:
        logger.info("replayed %d of %d catalog edits in %.3fs", applied, len(edits), time.monotonic() - started)
    return applied
