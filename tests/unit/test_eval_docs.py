"""README's Evaluation section agrees with `unimp eval --help` and the guard's defaults."""

from __future__ import annotations

import argparse
import dataclasses
import re
from pathlib import Path

from runtime.eval.guard import GuardThresholds
from unimp.cli import build_parser

README = Path(__file__).resolve().parents[2] / "README.md"


def _section() -> str:
    text = README.read_text()
    start = text.index("## Evaluation")
    return text[start : text.index("\n## ", start + 1)]


def _eval_parser() -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["eval"]


def test_every_guard_flag_is_documented_with_its_default() -> None:
    section = _section()
    for f in dataclasses.fields(GuardThresholds):
        flag = "--" + f.name.replace("_", "-")
        row = next((line for line in section.splitlines() if f"`{flag}`" in line), None)
        assert row is not None, f"{flag} missing from README's guard table"
        numbers = [float(x) for x in re.findall(r"(?<![@\w])\d+(?:\.\d+)?", row.split("|")[-3])]
        assert f.default in numbers, f"{flag}: README row {row!r} does not state the default {f.default}"


def test_help_defaults_match_the_thresholds() -> None:
    parser = _eval_parser()
    for f in dataclasses.fields(GuardThresholds):
        assert parser.get_default(f.name) == f.default
    help_text = parser.format_help()
    for option in ("--split", "--tasks", "--json", "--limit", "--data", "--beam", "--against"):
        assert option in help_text
        assert option in _section()
