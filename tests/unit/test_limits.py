"""``runtime.limits.Limits`` is the one source of the request bounds: the README's limits table, the
proto comments, ``unimp serve --help`` and the server's config section all quote its defaults."""

from __future__ import annotations

import argparse
import dataclasses
import re
from pathlib import Path

import pytest

from runtime.limits import Limits
from runtime.server import cli_commands
from runtime.server.config import ConfigError, LimitsConfig, ServerConfig, load_config

ROOT = Path(__file__).resolve().parents[2]
DEFAULTS = {f.name: getattr(Limits(), f.name) for f in dataclasses.fields(Limits)}


def test_readme_limits_table_matches_the_defaults() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    rows = dict(re.findall(r"^\s*\| `(max_\w+)` \| (\d+) \|", readme, flags=re.MULTILINE))
    assert rows == {name: str(value) for name, value in DEFAULTS.items()}


def test_proto_comments_quote_the_defaults() -> None:
    text = "\n".join(p.read_text(encoding="utf-8") for p in sorted((ROOT / "protos").rglob("*.proto")))
    quoted = re.findall(r"limits\.([a-z_]+) \((\d+) by default\)", text)
    assert {"max_top_k", "max_beams", "max_new_tokens", "max_text_chars", "max_image_steps", "max_image_side",
            "max_candidates", "max_history_items", "max_page_size", "max_id_chars"} <= {n for n, _ in quoted}
    for name, value in quoted:
        assert name in DEFAULTS, name
        assert int(value) == DEFAULTS[name], (name, value)
    named = set(re.findall(r"\blimits\.([a-z_]+)", text))
    assert named <= set(DEFAULTS), named - set(DEFAULTS)
    # No bare numbers left where a limit applies.
    assert "server limit" not in text and "0..16" not in text


def test_serve_help_shows_every_limit_with_its_default() -> None:
    parser = argparse.ArgumentParser(prog="unimp serve")
    cli_commands.add_serve_arguments(parser)
    text = " ".join(parser.format_help().split())
    for name, value in DEFAULTS.items():
        assert f"--limits-{name.replace('_', '-')}" in text
        assert f"(default: {value}); config key limits.{name}" in text


def test_the_server_section_is_the_runtime_limits() -> None:
    assert LimitsConfig is Limits
    assert isinstance(ServerConfig().limits, Limits)
    config = load_config(overrides={"limits.max_beams": "8", "limits.max_top_k": "50"})
    assert (config.limits.max_beams, config.limits.max_top_k) == (8, 50)
    with pytest.raises(ConfigError, match=r"^limits\.max_beams: must be >= 1"):
        load_config(overrides={"limits.max_beams": "0"})


def test_beam_defaults_follow_max_beams() -> None:
    limits = Limits()
    assert limits.beam_top_k_limit() == 16
    assert [limits.default_num_beams(k) for k in (1, 10, 16)] == [10, 10, 16]
    small = Limits(max_beams=4)
    assert small.beam_top_k_limit() == 4 and small.default_num_beams(2) == 4
