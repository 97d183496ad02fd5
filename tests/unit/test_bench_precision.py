"""`unimp bench --sections precision --variants ...` on tiny variants (quick, one repeat): every variant
measured side by side, with its bytes, floor and recorded guard."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from benchmarks import cli
from benchmarks.precision import HUGEPAGES_TUNABLE, child_env, combine_rounds, guard_numbers, parse_variants
from export.quantize import QuantizeConfig, quantize_artifacts, record_guard


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cli.add_bench_arguments(parser)
    return parser.parse_args(list(argv))


@pytest.fixture(scope="module")
def variants(tiny_concat_artifacts: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bench_variants")
    int4 = root / "int4"
    quantize_artifacts(tiny_concat_artifacts, int4, QuantizeConfig(precision="int4", format="qdq"), progress=False)
    summary = {"passed": False, "failed_tasks": ["recommend"], "differences": {"recommend.hr@10": -0.02},
               "tasks": {"recommend": {"passed": False, "checks": []}, "rating": {"passed": True, "checks": []}},
               "split": "test", "users": 2}
    record_guard(int4, summary)
    return {"fp32": tiny_concat_artifacts, "int4": int4}


def test_precision_section_measures_every_variant(variants: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "bench"
    rc = cli.run_bench(_args("--preset", "tiny", "--quick", "--repeats", "1", "--sections", "precision",
                             "--rounds", "2", "--artifacts", str(variants["fp32"]), "--out", str(out),
                             "--variants", f"fp32={variants['fp32']}", f"int4={variants['int4']}"))
    assert rc == 0
    results = json.loads((out / "results.json").read_text())
    assert f"--rounds 2 --variants fp32={variants['fp32']} int4={variants['int4']}" in results["command"]
    section = results["sections"]["precision"]
    assert list(section["variants"]) == ["fp32", "int4"]
    # two interleaved rounds: each variant measured twice, each ratio taken within one round
    assert section["rounds"] == 2
    fp32_rounds, int4_rounds = (section["variants"][k]["decode_rounds_s"] for k in ("fp32", "int4"))
    assert len(fp32_rounds) == len(int4_rounds) == 2
    ratios = [a / b for a, b in zip(int4_rounds, fp32_rounds, strict=True)]
    assert section["variants"]["int4"]["decode_vs_first_rounds"] == pytest.approx(ratios, rel=1e-12)
    assert section["variants"]["int4"]["decode_vs_first"] == pytest.approx(sum(ratios) / 2, rel=1e-12)
    assert section["variants"]["fp32"]["decode_vs_first_rounds"] == [1.0, 1.0]
    assert section["bandwidth"]["gb_s"] > 0
    fp32, int4 = section["variants"]["fp32"], section["variants"]["int4"]
    for v in (fp32, int4):
        for key in ("decode_s_per_token", "prefill_tokens_per_s", "vision_s_per_image", "peak_rss_bytes",
                    "total_file_bytes", "floor_s", "floor_ratio"):
            assert v[key] > 0, key
        assert v["peak_rss_bytes"] >= v["rss_bytes"] > v["rss_start_bytes"] > 0
        assert v["floor_s"] == pytest.approx(v["bytes_per_token"] / (section["bandwidth"]["gb_s"] * 1e9), rel=1e-9)
    assert fp32["decode_vs_first"] == pytest.approx(1.0)
    assert int4["precisions"] == {"decoder": "int4", "media_kv": "int4", "vision": "int4"}
    # int4 weights are packed two per byte: the floor's weight bytes fall well below fp32's
    assert int4["weight_bytes_per_token"] < 0.4 * fp32["weight_bytes_per_token"]
    assert int4["total_file_bytes"] < fp32["total_file_bytes"]
    assert fp32["guard"] is None
    assert int4["guard"]["run"] is True and int4["guard"]["passed"] is False
    assert int4["guard"]["failed_tasks"] == ["recommend"] and int4["guard"]["tasks"]["rating"] is True
    # one target per int8/int4 variant against fp32; a failing guard misses it whatever the speed, and a
    # missed speed ratio carries both decoders' op profiles
    (target,) = section["targets"]
    assert target["name"].startswith("`int4` (int4) decode <= 0.3x `fp32`") and target["target"] == 0.30
    assert target["value"] == pytest.approx(int4["decode_vs_first"]) and target["met"] is False
    assert "guard: FAILED (recommend)" in target["note"]
    assert target["note"].startswith("median of 2 interleaved rounds, range ")
    if int4["decode_vs_first"] > 0.30:
        for v in (fp32, int4):
            assert v["profile"]["steps"] == 8 and v["profile"]["top_ops"], v["profile"]
            assert abs(sum(o["share"] for o in v["profile"]["top_ops"]) - 1.0) < 0.5
        assert "profiled kernel time by op: int4 " in target["note"] and "; fp32 " in target["note"]
    assert any(t["section"] == "precision" for t in results["targets"])
    md = (out / "results.md").read_text()
    assert "## Precision variants" in md and "| `int4` | int4 |" in md and "FAILED (recommend)" in md


def test_guard_numbers_of_a_variant_not_guarded(variants: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "int8"
    quantize_artifacts(variants["fp32"], out, QuantizeConfig(precision="int8", graphs=("media_kv",)), progress=False)
    assert guard_numbers(out) == {"precision": "int8", "format": "cpu", "run": False}
    assert guard_numbers(variants["fp32"]) is None


def test_bad_variants_are_refused(variants: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for values, message in (([f"a={variants['fp32']}", f"a={variants['int4']}"], "given twice"),
                            ([f"x={tmp_path}"], "holds no manifest.json"), (["=x"], "is not LABEL=DIR")):
        with pytest.raises(ValueError, match=message):
            parse_variants(values)
    assert parse_variants([str(variants["int4"])]) == {"int4": variants["int4"]}
    rc = cli.run_bench(_args("--sections", "precision", "--artifacts", str(variants["fp32"]), "--out",
                             str(tmp_path / "b"), "--variants", f"x={tmp_path}"))
    assert rc == 2 and capsys.readouterr().err.startswith("error: --variants: x=")


def test_rounds_combine_to_medians_and_the_last_rounds_memory() -> None:
    def record(decode: float, peak: int, prefill: float) -> dict[str, object]:
        return {"decoder_precision": "int8", "kv_layout": "inplace", "load_s": 1.0, "vision_s_per_image": decode,
                "prefill_s": prefill, "decode_s_per_token": decode, "decode_min_s_per_token": decode / 2,
                "rss_start_bytes": peak // 4, "rss_bytes": peak // 2, "peak_rss_bytes": peak}

    combined = combine_rounds([record(0.030, 100, 0.5), record(0.010, 300, 0.4), record(0.020, 200, 1.0)], 64)
    assert combined["decode_rounds_s"] == [0.030, 0.010, 0.020]
    assert combined["decode_s_per_token"] == 0.020 and combined["decode_min_s_per_token"] == 0.005
    assert combined["prefill_s"] == 0.5 and combined["prefill_tokens_per_s"] == pytest.approx(128.0)
    # the memory numbers come from one process, the last (its optimised graphs read from the cache)
    assert (combined["rss_start_bytes"], combined["rss_bytes"], combined["peak_rss_bytes"]) == (50, 100, 200)


def test_rounds_below_one_are_refused(variants: dict[str, Path], tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    rc = cli.run_bench(_args("--sections", "precision", "--rounds", "0", "--artifacts", str(variants["fp32"]),
                             "--out", str(tmp_path / "b")))
    assert rc == 2 and "--rounds must be >= 1" in capsys.readouterr().err


def test_hugepages_measures_each_variant_both_ways(variants: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "bench"
    rc = cli.run_bench(_args("--preset", "tiny", "--quick", "--repeats", "1", "--sections", "precision",
                             "--hugepages", "--artifacts", str(variants["fp32"]), "--out", str(out),
                             "--variants", f"fp32={variants['fp32']}", f"int4={variants['int4']}"))
    assert rc == 0
    results = json.loads((out / "results.json").read_text())
    assert "--hugepages" in results["command"]
    section = results["sections"]["precision"]
    assert list(section["variants"]) == ["fp32", "fp32+hp", "int4", "int4+hp"]
    assert section["hugepages"]["tunable"] == f"GLIBC_TUNABLES={HUGEPAGES_TUNABLE}"
    v = section["variants"]
    assert [v[k]["reference"] for k in v] == ["fp32", "fp32+hp", "fp32", "fp32+hp"]
    assert [v[k]["hugepages"] for k in v] == [False, True, False, True]
    assert v["int4+hp"]["decode_vs_first"] == pytest.approx(
        v["int4+hp"]["decode_s_per_token"] / v["fp32+hp"]["decode_s_per_token"], rel=1e-12)  # one round
    assert v["int4+hp"]["decode_vs_plain"] == pytest.approx(
        v["int4+hp"]["decode_s_per_token"] / v["int4"]["decode_s_per_token"], rel=1e-12)
    for k in v:
        assert v[k]["anon_huge_bytes"] >= 0
    # one target per int4 run, each against its own fp32 reference
    assert [t["name"].split(" decode")[0] for t in section["targets"]] == ["`int4` (int4)", "`int4+hp` (int4)"]
    assert section["targets"][1]["name"].endswith("<= 0.3x `fp32+hp`, guard passed")
    md = (out / "results.md").read_text()
    assert "| `int4+hp` | int4 |" in md and "x without" in md


def test_child_env_sets_or_removes_only_the_hugepage_tunable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.hugetlb=0:glibc.cpu.x86_rep_movsb_threshold=4096")
    assert child_env(True)["GLIBC_TUNABLES"] == f"glibc.cpu.x86_rep_movsb_threshold=4096:{HUGEPAGES_TUNABLE}"
    assert child_env(False)["GLIBC_TUNABLES"] == "glibc.cpu.x86_rep_movsb_threshold=4096"
    assert child_env(None)["GLIBC_TUNABLES"].startswith("glibc.malloc.hugetlb=0")
    monkeypatch.setenv("GLIBC_TUNABLES", HUGEPAGES_TUNABLE)
    assert "GLIBC_TUNABLES" not in child_env(False)
