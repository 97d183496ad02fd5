"""Split files: parsed in order, and malformed lines named by file, line and field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from runtime.eval.data import DataError, HistoryEntry, data_dir, load_split

GOOD = {"user_id": "U00012", "history": [{"item_id": "P00003", "rating": 4, "explanation": "nice"},
                                         {"item_id": "P00004"}],
        "next_item": "P00042", "query": "Shoes Running Shoe", "search_item": "P00041", "rating_item": "P00017",
        "rating": 4, "explanation": "good grip", "candidates": ["P00100", "P00007", "P00033"], "selected": [1]}


def _write(path: Path, *records: object) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + "\n")
    return path


def test_parses_the_contract(tmp_path: Path) -> None:
    users = load_split(_write(tmp_path, GOOD, {**GOOD, "user_id": "U2"}), "test")
    assert [u.user_id for u in users] == ["U00012", "U2"]
    u = users[0]
    assert u.history == (HistoryEntry("P00003", 4, "nice"), HistoryEntry("P00004", 0, ""))
    assert (u.next_item, u.search_item, u.rating_item, u.rating) == ("P00042", "P00041", "P00017", 4)
    assert u.candidates == ("P00100", "P00007", "P00033") and u.selected == (1,)
    assert len(load_split(tmp_path, "test", limit=1)) == 1
    assert data_dir(Path("art")) == Path("art/shop") and data_dir(Path("art"), Path("d")) == Path("d")


@pytest.mark.parametrize(("change", "message"), [
    ({"rating": 6}, ":2: rating: expected an integer rating in 1..5, got 6"),
    ({"selected": [3]}, ":2: selected[0]: expected a candidate index in 0..2, got 3"),
    ({"history": [{"rating": 2}]}, ":2: history[0].item_id: expected a non-empty string, got None"),
    ({"next_item": ""}, ":2: next_item: expected a non-empty string"),
])
def test_malformed_lines_name_the_line_and_field(tmp_path: Path, change: dict[str, object], message: str) -> None:
    _write(tmp_path, GOOD, {**GOOD, **change})
    with pytest.raises(DataError) as err:
        load_split(tmp_path, "test")
    assert str(err.value).startswith(str(tmp_path / "test.jsonl") + message)


def test_missing_split_and_unknown_split(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"validation\.jsonl: no such split file"):
        load_split(tmp_path, "validation")
    with pytest.raises(DataError, match=r"^split: must be one of"):
        load_split(tmp_path, "dev")
