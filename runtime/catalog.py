"""The item catalog the model's item tokens refer to: metadata, availability and images.

The base catalog is the artifacts' ``items.jsonl`` (read-only). With semantic-ID items (manifest
``items.kind = "semantic"``) the model spells item k as the 4 codes of row k of the ``id2semantic`` table
(``SemanticTable``); a base item's token is then its row in that table, whatever ``items.jsonl`` says. Edits (upserts, deletes, new images) are
kept in memory, or, with a ``state_dir``, in ``state_dir/catalog.sqlite`` so that they survive a restart:
on open the base catalog and the persisted edits are merged. Each edit replaces an item's whole state.
"""

from __future__ import annotations

import base64
import bisect
import hashlib
import json
import logging
import sqlite3
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from runtime.api import CatalogItem, CatalogPage
from runtime.manifest import Manifest, ManifestError, TokenIds, sha256_file
from runtime.statefiles import connect_private, private_dir
from runtime.types import InvalidRequest, ItemMeta, NotFound
from runtime.vision import decode_image

log = logging.getLogger(__name__)

STATE_FILE = "catalog.sqlite"
MAX_PAGE_SIZE = 1000
MAX_ID_LENGTH = 256

_SCHEMA = """
CREATE TABLE IF NOT EXISTS edits (
    item_id      TEXT PRIMARY KEY,
    deleted      INTEGER NOT NULL DEFAULT 0,
    token        INTEGER NOT NULL DEFAULT -1,
    category     TEXT NOT NULL DEFAULT '',
    price        TEXT NOT NULL DEFAULT '',
    brand        TEXT NOT NULL DEFAULT '',
    title        TEXT NOT NULL DEFAULT '',
    available    INTEGER NOT NULL DEFAULT 1,
    image_source TEXT NOT NULL DEFAULT 'none',  -- 'base' (the artifacts' file), 'blob' (below), 'none'
    image        BLOB,
    image_sha256 TEXT NOT NULL DEFAULT '',
    seq          INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


@dataclass(frozen=True)
class _Entry:
    """One live item: its public record and where its image bytes are."""

    item: CatalogItem
    image_path: Path | None = None
    """The base catalog's image file (read on demand)."""
    image_blob: bytes | None = None
    """Image bytes set by an edit."""
    digest: str = ""
    """sha256 of the image bytes ("" until first computed for a base file without a manifest digest)."""

    @property
    def image_source(self) -> str:
        if self.image_blob is not None:
            return "blob"
        return "base" if self.image_path is not None else "none"


SEMANTIC_LENGTH = 4
SEMANTIC_CODE_COUNTS = (512, 512, 512, 32)
"""Codes per position of a semantic id: ``item_0..511`` three times, then ``item_last_0..31``."""


@dataclass(frozen=True)
class SemanticTable:
    """The ``id2semantic`` table: row k spells the item ``item_ids[k]`` as ``codes[k]``.

    The file is JSON ``{item_id: [a, b, c, d]}`` (or the reference's ``"a,b,c,d"`` strings); rows keep the
    file's order. Every id is unique and in range (a, b, c < 512, d < 32)."""

    item_ids: tuple[str, ...]
    codes: np.ndarray
    """int64 [N, 4], read-only."""

    @classmethod
    def load(cls, path: Path) -> SemanticTable:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise ManifestError(f"semantic-id table {path} is unreadable: {exc}") from exc
        if not isinstance(data, dict) or not data:
            raise ManifestError(f"{path}: must be a non-empty JSON object {{item_id: [a, b, c, d]}}")
        rows: list[list[int]] = []
        owner: dict[tuple[int, ...], str] = {}
        for item_id, value in data.items():
            try:
                parts = value.split(",") if isinstance(value, str) else list(value)
                code = [int(v) for v in parts]
            except (TypeError, ValueError) as exc:
                raise ManifestError(f"{path}: item {item_id!r} has a malformed semantic id {value!r}") from exc
            if len(code) != SEMANTIC_LENGTH or not all(0 <= c < n for c, n in zip(code, SEMANTIC_CODE_COUNTS)):
                raise ManifestError(f"{path}: item {item_id!r} has semantic id {code}; expected 4 codes, the first "
                                    "three in 0..511 and the last in 0..31")
            other = owner.setdefault(tuple(code), str(item_id))
            if other != item_id:
                raise ManifestError(f"{path}: items {other!r} and {item_id!r} have the same semantic id {code}")
            rows.append(code)
        codes = np.asarray(rows, dtype=np.int64)
        codes.setflags(write=False)
        return cls(tuple(str(k) for k in data), codes)

    def __len__(self) -> int:
        return len(self.item_ids)

    def spellings(self, tokens: TokenIds) -> np.ndarray:
        """int64 [N, 4] token ids: ``item_a, item_b, item_c`` from the ``item_k`` range, ``item_last_d``."""
        if tokens.item_last_start < 0 or tokens.item_count < SEMANTIC_CODE_COUNTS[0]:
            raise ManifestError("semantic-id items need the item_0..511 and item_last_0..31 token ranges")
        out = self.codes + tokens.item_start
        out[:, -1] = self.codes[:, -1] + tokens.item_last_start
        return out


def _encode_page_token(last_id: str) -> str:
    return base64.urlsafe_b64encode(json.dumps({"after": last_id}).encode()).decode().rstrip("=")


def _decode_page_token(token: str) -> str:
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        after = json.loads(raw)["after"]
    except (ValueError, KeyError, TypeError) as exc:
        raise InvalidRequest("page_token is not a token returned by a previous page", field="page_token") from exc
    if not isinstance(after, str):
        raise InvalidRequest("page_token is not a token returned by a previous page", field="page_token")
    return after


def _meta_from_record(record: dict[str, object]) -> ItemMeta:
    return ItemMeta(
        category=str(record.get("category", "") or ""),
        price=str(record.get("price", "") or ""),
        brand=str(record.get("brand", "") or ""),
        title=str(record.get("title", "") or ""),
    )


class Catalog:
    """The catalog store (``runtime.api.CatalogStore``) plus the token-indexed views the decoders need.

    Thread-safe: every read and edit holds one lock; image-change callbacks run after it is released.
    """

    def __init__(self, artifacts: Path, manifest: Manifest, state_dir: Path | None = None) -> None:
        self.artifacts = Path(artifacts)
        self.semantic: SemanticTable | None = None
        """Semantic-ID items: the id table (token k = row k); None for atomic items."""
        if manifest.items.kind == "semantic":
            self.semantic = SemanticTable.load(self.artifacts / manifest.items.semantic_table)
        self.item_count = len(self.semantic) if self.semantic is not None else manifest.tokens.item_count
        """Size of the model's item-token range (atomic: item_k tokens; semantic: table rows): valid
        tokens are -1 (none) and 0..item_count-1."""
        self._lock = threading.RLock()
        self._listeners: list[Callable[[str], None]] = []
        self._entries: dict[str, _Entry] = {}
        self._order: list[str] = []  # sorted item ids: the page order
        self._token_item: list[str | None] = [None] * self.item_count  # token k -> item id
        self._available = np.zeros(self.item_count, dtype=bool)  # (item_count,)
        self._category_code = np.full(self.item_count, -1, dtype=np.int32)  # (item_count,) -1: no item
        self._codes: dict[str, int] = {}  # casefolded category -> code
        self._version = 0
        self._base: dict[str, _Entry] = {}
        self._last_token: dict[str, int] = {}
        """item id -> the model token it last had: a deleted item upserted again without a token gets it back."""
        self._load_base(manifest)
        self._db: sqlite3.Connection | None = None
        if state_dir is not None:
            self._open_state(Path(state_dir))
        log.info("catalog: %d items (%d with a model token)", len(self._entries), self._tokens_in_use())

    # -- loading -----------------------------------------------------------------------------------
    def _load_base(self, manifest: Manifest) -> None:
        path = self.artifacts / manifest.catalog
        if not path.is_file():
            raise ManifestError(f"catalog {path} not found")
        root = path.parent
        rows = {item_id: k for k, item_id in enumerate(self.semantic.item_ids)} if self.semantic else None
        with open(path, encoding="utf-8") as handle:
            for lineno, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                    item_id = str(record["item_id"])
                    token = int(record.get("token", -1))
                except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
                    raise ManifestError(f"{path}:{lineno}: malformed catalog line ({exc})") from exc
                if not item_id or item_id in self._base:
                    raise ManifestError(f"{path}:{lineno}: empty or duplicate item_id {item_id!r}")
                if rows is not None:
                    token = rows.get(item_id, -1)
                if not -1 <= token < self.item_count:
                    raise ManifestError(f"{path}:{lineno}: token {token} outside [-1, {self.item_count})")
                image_path, digest = None, ""
                if record.get("image"):
                    candidate = root / str(record["image"])
                    if candidate.is_file():
                        image_path = candidate
                        if candidate.is_relative_to(self.artifacts):  # the manifest lists its sha256
                            digest = manifest.files.get(candidate.relative_to(self.artifacts).as_posix(), "")
                    else:
                        log.warning("%s:%d: image %s is missing; item %s has no image", path, lineno, candidate, item_id)
                item = CatalogItem(
                    item_id=item_id,
                    meta=_meta_from_record(record),
                    available=bool(record.get("available", True)),
                    token=token,
                    has_image=image_path is not None,
                )
                entry = _Entry(item, image_path=image_path, digest=digest)
                if token >= 0 and self._token_item[token] is not None:
                    raise ManifestError(f"{path}:{lineno}: token {token} is used by {self._token_item[token]!r} too")
                self._base[item_id] = entry
                self._set(entry)

    def _open_state(self, state_dir: Path) -> None:
        db = connect_private(private_dir(state_dir) / STATE_FILE, check_same_thread=False, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.executescript(_SCHEMA)
        self._db = db
        rows = db.execute(
            "SELECT item_id, deleted, token, category, price, brand, title, available, image_source, image,"
            " image_sha256 FROM edits ORDER BY seq"
        ).fetchall()
        for item_id, deleted, token, category, price, brand, title, available, source, blob, digest in rows:
            if deleted:
                self._remove(item_id)
                if 0 <= int(token) < self.item_count:
                    self._last_token[item_id] = int(token)
                continue
            base = self._base.get(item_id)
            if source == "blob" and blob is not None:
                image_path, image_blob, digest = None, bytes(blob), digest or hashlib.sha256(blob).hexdigest()
            elif source == "base" and base is not None and base.image_path is not None:
                image_path, image_blob, digest = base.image_path, None, base.digest
            else:
                image_path, image_blob, digest = None, None, ""
            self._remove(item_id)
            token = int(token)
            if not -1 <= token < self.item_count or (token >= 0 and self._token_item[token] is not None):
                log.warning("persisted edit of %s: token %d is out of range or taken; the item keeps no token",
                            item_id, token)
                token = -1
            item = CatalogItem(
                item_id=item_id,
                meta=ItemMeta(category=category, price=price, brand=brand, title=title),
                available=bool(available),
                token=token,
                has_image=image_path is not None or image_blob is not None,
            )
            self._set(_Entry(item, image_path=image_path, image_blob=image_blob, digest=digest))
        stored = db.execute("SELECT value FROM meta WHERE key = 'version'").fetchone()
        self._version = int(stored[0]) if stored else 0
        if rows:
            log.info("catalog: merged %d persisted edits from %s", len(rows), state_dir / STATE_FILE)

    # -- index maintenance (the lock is held) ------------------------------------------------------
    def _set(self, entry: _Entry) -> None:
        item = entry.item
        if item.item_id not in self._entries:
            bisect.insort(self._order, item.item_id)
        self._entries[item.item_id] = entry
        if item.token >= 0:
            k = item.token
            self._last_token[item.item_id] = k
            self._token_item[k] = item.item_id
            self._available[k] = item.available
            key = item.meta.category.strip().casefold()
            self._category_code[k] = self._codes.setdefault(key, len(self._codes))

    def _remove(self, item_id: str) -> _Entry | None:
        entry = self._entries.pop(item_id, None)
        if entry is None:
            return None
        del self._order[bisect.bisect_left(self._order, item_id)]
        k = entry.item.token
        if k >= 0 and self._token_item[k] == item_id:
            self._token_item[k] = None
            self._available[k] = False
            self._category_code[k] = -1
        return entry

    def _tokens_in_use(self) -> int:
        return sum(1 for item_id in self._token_item if item_id is not None)

    def _persist(self, entry: _Entry | None, item_id: str) -> None:
        """Record the item's new state (None: deleted) and the version (the lock is held)."""
        db = self._db
        if db is None:
            return
        db.execute("BEGIN IMMEDIATE")
        try:
            seq = self._version
            if entry is None:  # the tombstone keeps the item's last token (see _last_token)
                db.execute(
                    "INSERT INTO edits (item_id, deleted, token, seq) VALUES (?, 1, ?, ?) ON CONFLICT(item_id) DO UPDATE"
                    " SET deleted = 1, token = excluded.token, image = NULL, image_source = 'none', image_sha256 = '',"
                    " seq = excluded.seq",
                    (item_id, self._last_token.get(item_id, -1), seq),
                )
            else:
                item, meta = entry.item, entry.item.meta
                db.execute(
                    "INSERT OR REPLACE INTO edits (item_id, deleted, token, category, price, brand, title, available,"
                    " image_source, image, image_sha256, seq) VALUES (?, 0, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        item_id, item.token, meta.category, meta.price, meta.brand, meta.title, int(item.available),
                        entry.image_source, entry.image_blob, entry.digest if entry.image_blob is not None else "",
                        seq,
                    ),
                )
            db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('version', ?)", (str(self._version),))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    # -- CatalogStore ------------------------------------------------------------------------------
    def get(self, item_id: str) -> CatalogItem:
        with self._lock:
            entry = self._entries.get(item_id)
        if entry is None:
            raise NotFound(f"catalog has no item {item_id!r}", field="item_id")
        return entry.item

    def upsert(self, item: CatalogItem, image: bytes | None = None) -> CatalogItem:
        """Create or replace ``item`` (metadata, availability, token); ``image`` (encoded bytes) replaces its
        image, None or b"" keeps the current one. ``item.has_image`` is ignored: the result says.

        An item's model token belongs to its id: an item deleted and then upserted with token -1 gets its
        last token back (unless another item was explicitly given it meanwhile), also across a reopen."""
        item_id = item.item_id
        if not isinstance(item_id, str) or not item_id.strip():
            raise InvalidRequest("item_id must be a non-empty string", field="item_id")
        if len(item_id) > MAX_ID_LENGTH:
            raise InvalidRequest(f"item_id is longer than {MAX_ID_LENGTH} characters", field="item_id")
        if not isinstance(item.meta, ItemMeta):
            raise InvalidRequest("meta must be an ItemMeta", field="meta")
        for name in ("category", "price", "brand", "title"):
            if not isinstance(getattr(item.meta, name), str):
                raise InvalidRequest(f"meta.{name} must be a string", field=f"meta.{name}")
        token = item.token
        if isinstance(token, bool) or not isinstance(token, int | np.integer) or not -1 <= token < self.item_count:
            raise InvalidRequest(
                f"token must be -1 (none) or in [0, {self.item_count}), got {token!r}", field="token"
            )
        if image:
            decode_image(bytes(image))  # InvalidRequest(field="image") for bytes that are not an image
        with self._lock:
            old = self._entries.get(item_id)
            if token == -1 and old is None:  # re-created after a delete: the item's token is still its own
                last = self._last_token.get(item_id, -1)
                if last >= 0 and self._token_item[last] is None:
                    token = last
            if token >= 0 and self._token_item[token] not in (None, item_id):
                raise InvalidRequest(
                    f"token {token} is already used by item {self._token_item[token]!r}", field="token"
                )
            if image:
                blob = bytes(image)
                entry = _Entry(replace(item, token=int(token), has_image=True), image_blob=blob,
                               digest=hashlib.sha256(blob).hexdigest())
            elif old is not None:
                entry = replace(old, item=replace(item, token=int(token), has_image=old.item.has_image))
            else:
                entry = _Entry(replace(item, token=int(token), has_image=False))
            self._version += 1
            self._remove(item_id)
            self._set(entry)
            try:
                self._persist(entry, item_id)
            except sqlite3.Error:
                self._version -= 1
                self._remove(item_id)
                if old is not None:
                    self._set(old)
                raise
        if image:
            self._notify(item_id)
        return entry.item

    def delete(self, item_id: str) -> None:
        with self._lock:
            old = self._remove(item_id)
            if old is None:
                raise NotFound(f"catalog has no item {item_id!r}", field="item_id")
            self._version += 1
            try:
                self._persist(None, item_id)
            except sqlite3.Error:
                self._version -= 1
                self._set(old)
                raise
        self._notify(item_id)

    def page(self, page_size: int, page_token: str = "") -> CatalogPage:
        """Items in item-id order, ``page_size`` (1..1000) at a time; the token resumes after the last id
        returned, so pages stay consistent while items are added or deleted."""
        if isinstance(page_size, bool) or not isinstance(page_size, int) or not 1 <= page_size <= MAX_PAGE_SIZE:
            raise InvalidRequest(f"page_size must be in [1, {MAX_PAGE_SIZE}], got {page_size!r}", field="page_size")
        after = _decode_page_token(page_token) if page_token else None
        with self._lock:
            start = 0 if after is None else bisect.bisect_right(self._order, after)
            ids = self._order[start : start + page_size]
            items = tuple(self._entries[i].item for i in ids)
            more = start + page_size < len(self._order)
        return CatalogPage(items, _encode_page_token(ids[-1]) if more and ids else "")

    def image(self, item_id: str) -> bytes:
        """The item's encoded image; NotFound(field="item_id") for an unknown item, (field="image") for none."""
        with self._lock:
            entry = self._entries.get(item_id)
        if entry is None:
            raise NotFound(f"catalog has no item {item_id!r}", field="item_id")
        if entry.image_blob is not None:
            return entry.image_blob
        if entry.image_path is None:
            raise NotFound(f"catalog item {item_id!r} has no image", field="image")
        try:
            return entry.image_path.read_bytes()
        except OSError as exc:
            raise NotFound(f"image of catalog item {item_id!r} is unreadable: {exc}", field="image") from exc

    # -- the views the runtime needs ---------------------------------------------------------------
    def image_digest(self, item_id: str) -> str:
        """sha256 of the item's current image bytes (NotFound as for ``image``)."""
        with self._lock:
            entry = self._entries.get(item_id)
        if entry is None:
            raise NotFound(f"catalog has no item {item_id!r}", field="item_id")
        if entry.digest:
            return entry.digest
        if entry.image_path is None:
            raise NotFound(f"catalog item {item_id!r} has no image", field="image")
        digest = sha256_file(entry.image_path)
        with self._lock:  # memoise unless the item changed meanwhile
            if self._entries.get(item_id) is entry:
                self._entries[item_id] = replace(entry, digest=digest)
                if self._base.get(item_id) is entry:
                    self._base[item_id] = self._entries[item_id]
        return digest

    def on_image_change(self, callback: Callable[[str], None]) -> None:
        """Call ``callback(item_id)`` after an item's image is replaced or the item is deleted."""
        with self._lock:
            self._listeners.append(callback)

    def _notify(self, item_id: str) -> None:
        with self._lock:
            listeners = list(self._listeners)
        for callback in listeners:
            try:
                callback(item_id)
            except Exception:
                log.exception("image-change callback %r failed for %s", callback, item_id)

    def semantic_codes(self, k: int) -> tuple[int, ...]:
        """The semantic id ``(a, b, c, d)`` of token (table row) ``k``; () for atomic items or k < 0."""
        if self.semantic is None or not 0 <= k < self.item_count:
            return ()
        return tuple(int(c) for c in self.semantic.codes[k])

    def token_of(self, item_id: str) -> int:
        """The item's token index k (of ``item_k``), -1 if it has none; NotFound for an unknown item."""
        return self.get(item_id).token

    def tokens_of(self, item_ids: Iterable[str]) -> np.ndarray:
        """(len,) int64 token indices (-1 where an item has no token); NotFound(field="item_id") for unknown ids."""
        with self._lock:
            out = []
            for item_id in item_ids:
                entry = self._entries.get(item_id)
                if entry is None:
                    raise NotFound(f"catalog has no item {item_id!r}", field="item_id")
                out.append(entry.item.token)
        return np.asarray(out, dtype=np.int64)

    def by_token(self, k: int) -> CatalogItem | None:
        """The item behind token ``item_k``, or None (no such item, or k out of range)."""
        if not 0 <= k < self.item_count:
            return None
        with self._lock:
            item_id = self._token_item[k]
            return self._entries[item_id].item if item_id is not None else None

    def available_mask(self) -> np.ndarray:
        """(item_count,) bool: True where token k's item exists and is available (a fresh copy)."""
        with self._lock:
            return self._available.copy()

    def category_mask(self, categories: Sequence[str]) -> np.ndarray:
        """(item_count,) bool: True where token k's item exists and its category is one of ``categories``
        (compared case-insensitively, surrounding spaces ignored). No categories means no restriction:
        True wherever token k's item exists (as ``ItemFilter.categories`` reads)."""
        with self._lock:
            if not categories:
                return self._category_code >= 0
            wanted = [self._codes[c] for c in (c.strip().casefold() for c in categories) if c in self._codes]
            return np.isin(self._category_code, np.asarray(wanted, dtype=np.int32))

    @property
    def version(self) -> int:
        """Incremented by every edit (persisted with the edits when there is a state dir)."""
        with self._lock:
            return self._version

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def __contains__(self, item_id: object) -> bool:
        with self._lock:
            return item_id in self._entries

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None
