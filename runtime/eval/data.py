"""Evaluation splits: ``{train,validation,test}.jsonl``, one JSON object per user.

Each line is one held-out user (history oldest first, ratings 1..5)::

    {"user_id": "U00012",
     "history": [{"item_id": "P00003", "rating": 4, "explanation": "..."}, ...],
     "next_item": "P00042",                       # recommendation target
     "query": "Shoes Running Shoe", "search_item": "P00042",   # personalized search
     "rating_item": "P00017", "rating": 4, "explanation": "...",   # preference + explanation
     "candidates": ["P00100", "P00007", "P00033"], "selected": [1]}   # item selection (indices)

The directory is ``ARTIFACTS/shop`` for the demo exports, or any directory given with ``--data``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SPLITS = ("train", "validation", "test")


class DataError(ValueError):
    """A split file is missing or malformed; the message starts with ``FILE:LINE: field``."""


@dataclass(frozen=True)
class HistoryEntry:
    item_id: str
    rating: int = 0
    explanation: str = ""


@dataclass(frozen=True)
class EvalUser:
    user_id: str
    history: tuple[HistoryEntry, ...]
    next_item: str
    query: str
    search_item: str
    rating_item: str
    rating: int
    explanation: str
    candidates: tuple[str, ...]
    selected: tuple[int, ...]

    @property
    def history_ids(self) -> tuple[str, ...]:
        return tuple(h.item_id for h in self.history)


def data_dir(artifacts: Path, data: Path | None = None) -> Path:
    """``data`` if given, else ``artifacts/shop``."""
    return data if data is not None else artifacts / "shop"


def split_path(directory: Path, split: str) -> Path:
    if split not in SPLITS:
        raise DataError(f"split: must be one of {', '.join(SPLITS)}, got {split!r}")
    return directory / f"{split}.jsonl"


def load_split(directory: Path, split: str, limit: int | None = None) -> list[EvalUser]:
    """The users of ``directory/split.jsonl`` in file order (the first ``limit`` when given)."""
    path = split_path(directory, split)
    if not path.is_file():
        raise DataError(f"{path}: no such split file (expected {split}.jsonl under ARTIFACTS/shop or --data DIR)")
    users: list[EvalUser] = []
    for lineno, record in _records(path):
        if limit is not None and len(users) >= limit:
            break
        users.append(_user(record, f"{path}:{lineno}"))
    return users


def _records(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    with path.open(encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: not JSON: {exc}") from exc
            if not isinstance(record, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
            yield lineno, record


def _dict(value: object, name: str, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise DataError(f"{where}: {name}: expected an object, got {type(value).__name__}")
    return value


def _list(record: dict[str, Any], key: str, where: str) -> list[Any]:
    value = record.get(key, [])
    if not isinstance(value, list):
        raise DataError(f"{where}: {key}: expected a list, got {type(value).__name__}")
    return value


def _str(record: dict[str, Any], key: str, where: str, prefix: str = "") -> str:
    value = record.get(key)
    if not isinstance(value, str) or not value:
        raise DataError(f"{where}: {prefix}{key}: expected a non-empty string, got {value!r}")
    return value


def _rating(value: object, name: str, where: str, allow_unknown: bool) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not (1 <= value <= 5 or (allow_unknown and value == 0)):
        raise DataError(f"{where}: {name}: expected an integer rating in 1..5, got {value!r}")
    return value


def _user(record: dict[str, Any], where: str) -> EvalUser:
    history = []
    for i, raw in enumerate(_list(record, "history", where)):
        h = _dict(raw, f"history[{i}]", where)
        history.append(HistoryEntry(
            _str(h, "item_id", where, f"history[{i}]."),
            _rating(h.get("rating", 0), f"history[{i}].rating", where, allow_unknown=True),
            str(h.get("explanation", "") or ""),
        ))
    candidates = tuple(str(c) for c in _list(record, "candidates", where))
    selected = []
    for i, raw in enumerate(_list(record, "selected", where)):
        if isinstance(raw, bool) or not isinstance(raw, int) or not 0 <= raw < len(candidates):
            raise DataError(f"{where}: selected[{i}]: expected a candidate index in 0..{len(candidates) - 1}, got {raw!r}")
        selected.append(raw)
    return EvalUser(
        user_id=_str(record, "user_id", where),
        history=tuple(history),
        next_item=_str(record, "next_item", where),
        query=_str(record, "query", where),
        search_item=_str(record, "search_item", where),
        rating_item=_str(record, "rating_item", where),
        rating=_rating(record.get("rating"), "rating", where, allow_unknown=False),
        explanation=str(record.get("explanation", "") or ""),
        candidates=candidates,
        selected=tuple(selected),
    )
