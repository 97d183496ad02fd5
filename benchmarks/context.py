"""Shared inputs of every benchmark section: artifacts, the source checkpoint, sample requests, settings.

Each section module exposes ``run(ctx: BenchContext) -> dict[str, Any]`` returning JSON-serialisable
results (seconds as floats, ratios as floats, and a ``targets`` list of
``{"name", "value", "target", "met", "note"}`` where the section owns a target).
"""

from __future__ import annotations

import json
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runtime.types import HistoryItem


@dataclass(frozen=True)
class BenchContext:
    artifacts: Path
    """Exported artifacts (the `small` demo by default)."""
    checkpoint: Path
    """Source checkpoint directory of the artifacts (for the PyTorch baselines)."""
    out: Path
    """Where results.json, results.md and plots/ go."""
    repeats: int = 5
    """Timed repetitions per measurement (after one warm-up); medians are reported."""
    quick: bool = False
    """Fewer repeats and smaller sweeps (for smoke tests on the tiny demo)."""
    threads: int = 2
    """Threads for ONNX Runtime and torch, equal on both sides of every comparison."""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def manifest(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads((self.artifacts / "manifest.json").read_text())
        return data

    def histories(self, n_users: int = 4, length: int = 4) -> list[tuple[HistoryItem, ...]]:
        """Deterministic user histories over the catalog (distinct per user)."""
        count = int(self.manifest["tokens"]["item_count"])
        return [
            tuple(HistoryItem(item_id=f"P{(u * 37 + k * 11) % count:05d}") for k in range(length))
            for u in range(n_users)
        ]

    def rated_history(self, length: int = 4) -> tuple[HistoryItem, ...]:
        count = int(self.manifest["tokens"]["item_count"])
        return tuple(
            HistoryItem(item_id=f"P{(k * 13 + 5) % count:05d}", rating=1 + k % 5, explanation="Nice quality.")
            for k in range(length)
        )


def machine_info() -> dict[str, Any]:
    import os

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
    }
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    info["cpu_model"] = line.split(":", 1)[1].strip()
                    break
        with open("/proc/meminfo") as handle:
            info["mem_total_kb"] = int(handle.readline().split()[1])
    except OSError:
        pass
    return info
