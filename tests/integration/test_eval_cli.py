"""``unimp eval`` on the tiny demo with generated split files, and the accuracy guard (``--against``)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from runtime.eval.metrics import KS
from tests.integration.eval_fixtures import copy_artifacts, perturb_decoder, write_splits
from unimp.cli import main

FAST = ["--quiet", "--threads", "1", "--limit", "4", "--explain-tokens", "8"]


@pytest.fixture(scope="module")
def shop(tiny_artifacts: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_splits(tiny_artifacts, tmp_path_factory.mktemp("eval_data") / "shop")


def _random_hr10(art: Path, users: int = 4) -> float:
    """The random baseline's HR@10 over the first ``users`` test users of ART/shop, from the catalog."""
    items = [json.loads(line) for line in (art / "catalog" / "items.jsonl").read_text().splitlines() if line]
    available = {i["item_id"] for i in items if i.get("available", True) and i.get("token", -1) >= 0}
    lines = (art / "shop" / "test.jsonl").read_text().splitlines()[:users]
    chances = []
    for line in lines:
        user = json.loads(line)
        admissible = len(available - {h["item_id"] for h in user["history"]})
        chances.append(min(1.0, 10 / admissible))
    return float(np.mean(chances))


def test_eval_writes_the_documented_json(tiny_artifacts: Path, shop: Path, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    art = copy_artifacts(tiny_artifacts, tmp_path / "art")
    assert (art / "shop" / "test.jsonl").is_file()  # the default data directory: the demo's own ART/shop
    out = tmp_path / "report.json"
    assert main(["eval", str(art), "--json", str(out), *FAST]) == 0
    report = json.loads(out.read_text())
    for key in ("recommend", "search", "rating", "explanation", "selection", "artifacts", "backend", "precision"):
        assert key in report
    assert report["artifacts"] == str(art) and report["backend"] == "cpu" and report["precision"] == "fp32"
    assert report["users"] == 4 and report["split"] == "test"
    for task in ("recommend", "search"):
        section = report[task]
        for k in KS:
            for name in ("hr", "ndcg", "mrr"):
                assert 0.0 <= section[f"{name}@{k}"] <= 1.0
                assert f"{name}@{k}" in section["baseline"]["popularity"]
                assert f"{name}@{k}" in section["baseline"]["random"]
        assert section["count"] == 4
        # a uniform ranking of the admissible items (available, not in the user's history) puts the target
        # in the top 10 with probability 10 / admissible
        np.testing.assert_allclose(section["baseline"]["random"]["hr@10"], _random_hr10(art), rtol=1e-9)
    assert {"mae", "rmse", "mae_expected", "rmse_expected"} <= set(report["rating"])
    assert {"mae", "rmse"} <= set(report["rating"]["baseline"]["user_mean"])
    assert {"rouge_1", "rouge_2", "rouge_l", "bleu_1"} <= set(report["explanation"])
    assert {"precision", "recall", "f1"} <= set(report["selection"])
    assert {"random", "popularity"} <= set(report["selection"]["baseline"])
    stdout = capsys.readouterr().out
    assert "| hr@10 |" in stdout and f"{report['recommend']['hr@10']:.4f}" in stdout


def test_eval_tasks_limit_and_beam(tiny_artifacts: Path, shop: Path, tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    argv = ["eval", str(tiny_artifacts), "--data", str(shop), "--tasks", "recommend", "--beam", "--json", str(out),
            *FAST[:-2], "--limit", "2"]
    assert main(argv) == 0
    report = json.loads(out.read_text())
    assert "search" not in report and "rating" not in report
    assert {"beam", "beam_constrained"} <= set(report["recommend"])
    assert "hr@10" in report["recommend"]["beam_constrained"]


def test_eval_rejects_bad_usage(tiny_artifacts: Path, shop: Path, tmp_path: Path,
                                capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", str(tiny_artifacts), "--data", str(shop), "--tasks", "recommend,nope"]) == 2
    assert "--tasks" in capsys.readouterr().err
    assert main(["eval", str(tiny_artifacts), "--data", str(tmp_path), "--quiet"]) == 2
    assert "test.jsonl" in capsys.readouterr().err


def test_guard_passes_on_an_identical_copy(tiny_artifacts: Path, shop: Path, tmp_path: Path) -> None:
    copy = copy_artifacts(tiny_artifacts, tmp_path / "copy")
    out = tmp_path / "guard.json"
    assert main(["eval", str(copy), "--against", str(tiny_artifacts), "--data", str(shop), "--json", str(out),
                 *FAST]) == 0
    guard = json.loads(out.read_text())["guard"]
    assert guard["passed"]
    assert guard["agreement"]["recommend"]["fast"]["top10_overlap"] == 1.0
    assert guard["agreement"]["rating"]["agreement"] == 1.0
    assert guard["agreement"]["explanation"]["exact_match"] == 1.0


def test_guard_fails_on_a_perturbed_decoder(tiny_artifacts: Path, shop: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    bad = copy_artifacts(tiny_artifacts, tmp_path / "bad")
    perturb_decoder(bad)
    out = tmp_path / "guard.json"
    assert main(["eval", str(bad), "--against", str(tiny_artifacts), "--data", str(shop), "--json", str(out),
                 *FAST]) == 1
    guard = json.loads(out.read_text())["guard"]
    assert not guard["passed"]
    failed = {c["name"] for c in guard["checks"] if not c["passed"]}
    assert "recommend.fast top-10 overlap" in failed
    assert "accuracy guard FAILED" in capsys.readouterr().err
    # the thresholds are flags: with every limit opened up, the same comparison passes
    loose = ["--max-hr-diff", "1", "--min-overlap", "0", "--min-rating-agreement", "0", "--max-rmse-diff", "5",
             "--min-selection-agreement", "0"]
    assert main(["eval", str(bad), "--against", str(tiny_artifacts), "--data", str(shop), *FAST, *loose]) == 0


def test_eval_never_imports_torch(tiny_artifacts: Path, shop: Path, tmp_path: Path) -> None:
    code = f"""
import sys
from unimp.cli import main
rc = main(["eval", {str(tiny_artifacts)!r}, "--data", {str(shop)!r}, "--quiet", "--threads", "1", "--limit", "1",
           "--explain-tokens", "4"])
bad = [m for m in ("torch", "transformers", "diffusers") if m in sys.modules]
print("LOADED", bad)
sys.exit(rc or (1 if bad else 0))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "LOADED []" in out.stdout


def test_unknown_items_name_the_user_and_field(tiny_artifacts: Path, shop: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text((shop / "train.jsonl").read_text())
    user = json.loads((shop / "test.jsonl").read_text().splitlines()[0])
    user["history"][1]["item_id"] = "NOPE"
    (data / "test.jsonl").write_text(json.dumps(user) + "\n")
    assert main(["eval", str(tiny_artifacts), "--data", str(data), "--tasks", "recommend", *FAST]) == 2
    err = capsys.readouterr().err
    assert f"user {user['user_id']}: history[1].item_id: 'NOPE' is not in the catalog" in err
