"""The board table, and the deployment docs and files that name its boards and commands."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from runtime.boards import BOARDS, get_board
from unimp.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]


def test_board_table_is_consistent() -> None:
    for board in BOARDS.values():
        assert 0 < board.reserved_bytes < board.total_memory and board.budget_bytes > 0
        assert board.stacks and all(s.tensorrt and s.cuda and s.python for s in board.stacks)
        if board.unified_memory:  # Jetson Orin: one memory pool, Ampere iGPU sm_87
            assert board.host_memory == 0 and board.compute_capability == (8, 7)
        else:
            assert board.host_memory > 0
    assert BOARDS["orin-nano-8gb"].dla_cores == 0 and BOARDS["orin-nx-16gb"].dla_cores == 2
    jp6 = BOARDS["orin-nx-16gb"].stacks[0]
    assert (jp6.tensorrt, jp6.cuda, jp6.python) == ("10.3", "12.6", "3.10")
    try:
        get_board("orin-mini")
    except ValueError as exc:
        assert str(exc).startswith("--board: unknown board 'orin-mini' (known: orin-nano-8gb")
    else:
        raise AssertionError("an unknown board must be refused")


def test_docs_name_every_board(capsys: pytest.CaptureFixture[str]) -> None:
    readme = (ROOT / "README.md").read_text()
    jetson = (ROOT / "docs" / "jetson.md").read_text()
    for name in BOARDS:
        assert name in readme and name in jetson, name
    with pytest.raises(SystemExit):
        build_parser().parse_args(["plan", "--help"])
    help_text = capsys.readouterr().out
    for name in BOARDS:
        assert name in help_text


def test_systemd_unit_runs_commands_that_exist() -> None:
    unit = (ROOT / "deploy" / "systemd" / "unimp.service").read_text()
    commands = [line.split("=", 1)[1] for line in unit.splitlines()
                if line.startswith(("ExecStart=", "ExecStartPre=")) and "/bin/unimp " in line]
    assert len(commands) == 2
    for command in commands:
        argv = shlex.split(command)[1:]
        args = build_parser().parse_args(argv)  # exits (SystemExit) on an unknown flag
        assert args.command in ("serve", "doctor")


def test_dockerfiles_say_they_were_never_built() -> None:
    for name in ("Dockerfile.cuda", "Dockerfile.l4t"):
        head = (ROOT / "docker" / name).read_text().split("FROM", 1)[0]
        assert "NEVER BUILT" in head, name
        assert "pip uninstall -y onnxruntime" in (ROOT / "docker" / name).read_text(), name
