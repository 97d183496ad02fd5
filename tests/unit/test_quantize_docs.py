"""README's Precision section agrees with `unimp quantize --help`; its guard flags are `unimp eval`'s."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from runtime.eval.guard import GuardThresholds
from unimp.cli import build_parser

README = Path(__file__).resolve().parents[2] / "README.md"


def _section() -> str:
    text = README.read_text()
    start = text.index("## Precision")
    return text[start : text.index("\n## ", start + 1)]


def _sub(name: str) -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


def test_every_quantize_flag_is_documented() -> None:
    section = _section()
    guard_flags = {"--" + f.name.replace("_", "-") for f in dataclasses.fields(GuardThresholds)}
    flags = [o for a in _sub("quantize")._actions for o in a.option_strings
             if o.startswith("--") and o not in ("--help", "--quiet") and o not in guard_flags]
    assert "--block-size" in flags and "--skip-guard" in flags and "--calibration" in flags and "--format" in flags
    missing = [f for f in flags if f"`{f}" not in section]
    assert not missing, f"README's Precision section does not mention {missing}"
    parser = _sub("quantize")
    assert f"`--block-size` ({parser.get_default('block_size')})" in section
    assert f"`--accuracy-level` ({parser.get_default('accuracy_level')}" in section
    assert parser.get_default("graphs") is None  # the precision's default graphs, as the section says
    assert "`--graphs` (default `decoder,media_kv,vision`; fp16: also the diffusion graphs present)" in section
    assert f"`--calibration` ({parser.get_default('calibration')})" in section


def test_guard_flags_and_defaults_equal_evals() -> None:
    quantize, evaluate = _sub("quantize"), _sub("eval")
    for f in dataclasses.fields(GuardThresholds):
        assert quantize.get_default(f.name) == evaluate.get_default(f.name) == f.default
    assert GuardThresholds().max_hr_diff == 0.01 and GuardThresholds().max_rmse_diff == 0.05
    assert GuardThresholds().max_rouge_l_diff == 0.01


def test_precisions_and_formats_of_the_table_are_the_clis() -> None:
    section = _section()
    parser = _sub("quantize")
    action = {a.dest: a for a in parser._actions}
    assert list(action["precision"].choices) == ["int8", "int4", "fp16"]
    assert list(action["format"].choices) == ["cpu", "qdq"]
    for row in ("| `int8` / `cpu` |", "| `int4` / `cpu` |", "| `int8` / `qdq` |", "| `int4` / `qdq` |", "| `fp16` |"):
        assert row in section, row
    assert "--kv-layout concat" in section and "--sections precision --variants" in section
