"""``unimp quantize`` on the untrained tiny demo: int8 / int4 variants load, serve every task, hold the
quantized ops, record their settings, and carry the accuracy guard's verdict."""

from __future__ import annotations

import json
import logging
import os
from argparse import Namespace
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest

from export.quantize import QuantizeConfig, QuantizeError, guard_warning, op_counts, quantize_artifacts
from runtime.backends import BackendConfig
from runtime.engine import Runtime, RuntimeConfig
from runtime.manifest import MANIFEST_NAME, load_manifest, sha256_file
from runtime.types import (
    HistoryItem,
    PreferenceRequest,
    PreferenceResult,
    RecommendRequest,
    SamplingOptions,
    SearchRequest,
    SelectRequest,
    TextPiece,
)
from tests.integration.eval_fixtures import copy_artifacts, write_splits
from unimp.cli import _serve_warning, main

GRAPHS = ("decoder", "media_kv", "vision")
RATED = tuple(HistoryItem(item_id=f"P{k:05d}", rating=r, explanation=e)
              for k, r, e in ((5, 4, "Great fit."), (9, 2, "Too small."), (12, 5, "Love the colour.")))
# measured max |rating probability difference| vs fp32 on three targets: int8 0.0014, int4 0.017
RATING_ATOL = {"int8": 0.01, "int4": 0.05}


@pytest.fixture(scope="module")
def src(tiny_artifacts: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private copy of the tiny demo (the guard writes catalog caches into the source directory)."""
    return copy_artifacts(tiny_artifacts, tmp_path_factory.mktemp("quant_src") / "fp32")


@pytest.fixture(scope="module")
def variants(src: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("quant_out")
    out = {}
    for precision in ("int8", "int4"):
        out[precision] = root / precision
        quantize_artifacts(src, out[precision], QuantizeConfig(precision=precision), progress=False)
    return out


@pytest.fixture(scope="module")
def splits(src: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_splits(src, tmp_path_factory.mktemp("quant_splits"), users=(20, 2, 2))


def _open(artifacts: Path, cache: Path) -> Runtime:
    return Runtime.open(artifacts, RuntimeConfig(backend=BackendConfig(intra_op_threads=1), progress=False,
                                                 latent_cache_dir=cache))


@pytest.fixture(scope="module")
def fp32_runtime(src: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runtime]:
    rt = _open(src, tmp_path_factory.mktemp("lat_fp32"))
    yield rt
    rt.close()


def _const_matmuls(path: Path) -> list[str]:
    """MatMul nodes whose second input is a weight initializer (what quantization should have replaced)."""
    model = onnx.load(str(path))
    weights = {init.name for init in model.graph.initializer}
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in weights]


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_graphs_hold_the_quantized_ops(variants: dict[str, Path], src: Path, precision: str) -> None:
    out = variants[precision]
    manifest = load_manifest(out)
    for name in GRAPHS:
        path = out / manifest.graphs[name].file
        ops = op_counts(path)
        assert _const_matmuls(src / manifest.graphs[name].file), f"{name}: the source has weight MatMuls"
        if precision == "int8":
            assert ops.get("MatMulInteger", 0) > 0 and ops.get("DynamicQuantizeLinear", 0) > 0, (name, ops)
            assert "MatMulNBits" not in ops
        else:
            assert ops.get("MatMulNBits", 0) > 0, (name, ops)
            assert "MatMulInteger" not in ops
        assert _const_matmuls(path) == [], f"{name}: weight MatMuls left in fp32"
        assert path.stat().st_size < (src / manifest.graphs[name].file).stat().st_size


def test_keep_lm_head_leaves_only_the_lm_head_in_fp32(src: Path, tmp_path: Path) -> None:
    out = tmp_path / "int8-head"
    quantize_artifacts(src, out, QuantizeConfig(precision="int8", graphs=("decoder",), keep_lm_head=True),
                       progress=False)
    manifest = load_manifest(out)
    left = _const_matmuls(out / manifest.graphs["decoder"].file)
    assert left == manifest.graphs["decoder"].extra["quantization"]["excluded_nodes"] and len(left) == 1
    model = onnx.load(str(out / manifest.graphs["decoder"].file))
    shapes = {i.name: list(i.dims) for i in model.graph.initializer}
    node = next(n for n in model.graph.node if n.name == left[0])
    assert shapes[node.input[1]][-1] == manifest.decoder.vocab_size
    assert manifest.graphs["vision"].precision == "fp32"  # not listed in graphs: linked unchanged
    assert os.stat(out / "vision.onnx").st_ino == os.stat(src / "vision.onnx").st_ino


def test_int8_lm_head_quantizes_the_head_to_int8_and_the_rest_to_int4(src: Path, fp32_runtime: Runtime,
                                                                       tmp_path: Path) -> None:
    out = tmp_path / "int4-head8"
    quantize_artifacts(src, out, QuantizeConfig(precision="int4", graphs=("decoder",), int8_lm_head=True),
                       progress=False)
    manifest = load_manifest(out)
    path = out / manifest.graphs["decoder"].file
    ops = op_counts(path)
    assert ops.get("MatMulNBits", 0) > 0 and ops.get("MatMulInteger") == 1, ops
    assert _const_matmuls(path) == []
    model = onnx.load(str(path))
    shapes = {i.name: list(i.dims) for i in model.graph.initializer}
    (integer,) = [n for n in model.graph.node if n.op_type == "MatMulInteger"]
    weight = next(i for i in integer.input if i in shapes and len(shapes[i]) == 2)
    assert shapes[weight][-1] == manifest.decoder.vocab_size  # the LM head, and only it, is int8
    settings = manifest.graphs["decoder"].extra["quantization"]
    assert settings["int8_nodes"] == settings["excluded_nodes"] and len(settings["int8_nodes"]) == 1
    assert settings["quantized_ops"]["MatMulInteger"] == 1 and settings["quantized_ops"]["MatMulNBits"] > 0
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # the int4 scratch graph is gone
    rt = _open(out, tmp_path / "lat")
    try:
        assert_serves_every_task(rt, fp32_runtime, RATING_ATOL["int4"])
    finally:
        rt.close()


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_manifest_records_precision_settings_and_source(variants: dict[str, Path], src: Path,
                                                        precision: str) -> None:
    out = variants[precision]
    manifest = load_manifest(out, verify=True)  # every sha256 checks out
    section = manifest.source["quantization"]
    assert section["precision"] == precision and section["format"] == "cpu"
    assert section["source_manifest_sha256"] == sha256_file(src / MANIFEST_NAME)
    assert Path(section["source_artifacts"]) == src.resolve()
    assert section["guard"] is None  # not run yet
    fp32 = load_manifest(src)
    for name in GRAPHS:
        entry = manifest.graphs[name]
        assert entry.precision == precision
        assert entry.sha256 == sha256_file(out / entry.file) != fp32.graphs[name].sha256
        settings = entry.extra["quantization"]
        if precision == "int4":
            assert settings["bits"] == 4 and settings["block_size"] == 32 and settings["accuracy_level"] == 4
        else:
            assert settings["weight_type"] == "int8" and settings["per_channel"] is False
        assert settings["bytes_after"] == (out / entry.file).stat().st_size
    for rel in fp32.files:
        assert os.path.samefile(out / rel, src / rel) or sha256_file(out / rel) == sha256_file(src / rel)
    assert not (out / ".cache").exists()


def _explained(rt: Runtime, req: PreferenceRequest) -> PreferenceResult:
    events = list(rt.explain(req))
    assert all(isinstance(e, TextPiece) for e in events[:-1])
    final = events[-1]
    assert isinstance(final, PreferenceResult)
    assert "".join(e.text for e in events[:-1] if isinstance(e, TextPiece)) == final.explanation
    return final


def assert_serves_every_task(rt: Runtime, fp32_runtime: Runtime, rating_atol: float) -> None:
    """Recommend, search, rating + explanation, selection on a variant: well-formed results, ratings within
    ``rating_atol`` of fp32 (shared by the qdq / fp16 tests)."""
    rec = rt.recommend(RecommendRequest(RATED, top_k=10))
    found = rt.search(SearchRequest(RATED, query="red running shoe", top_k=5))
    for result, k in ((rec, 10), (found, 5)):
        ids = [i.item_id for i in result.items]
        assert len(ids) == k == len(set(ids)) and all(np.isfinite(i.score) for i in result.items)
        assert all(rt.catalog.get(i).item_id == i for i in ids)  # catalog items (get raises otherwise)
    for target in ("P00021", "P00044"):
        req = PreferenceRequest(RATED, HistoryItem(item_id=target), SamplingOptions(max_new_tokens=8))
        pref = rt.predict_preference(req)
        ref = fp32_runtime.predict_preference(req)
        assert abs(sum(pref.rating_distribution) - 1) < 1e-6
        np.testing.assert_allclose(pref.rating_distribution, ref.rating_distribution, atol=rating_atol)
        final = _explained(rt, req)
        assert final.timings.tokens >= 1
        # not bit-equal as in fp32: int8 activations are quantized per tensor, per call, so a prefix-cache
        # hit (only the suffix prefilled) quantizes with another scale than the full prefill
        np.testing.assert_allclose(final.rating_distribution, pref.rating_distribution, atol=rating_atol)
    cands = tuple(HistoryItem(item_id=f"P{k:05d}") for k in (60, 61, 62))
    sel = rt.select_items(SelectRequest(RATED, cands, max_selected=2))
    assert len(sel.selected) == 2 and len(sel.scores) == 3 and abs(sum(sel.scores) - 1) < 1e-6


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_runtime_serves_every_task(variants: dict[str, Path], fp32_runtime: Runtime, tmp_path: Path,
                                   precision: str) -> None:
    rt = _open(variants[precision], tmp_path / "lat")
    try:
        assert rt.manifest.graphs["decoder"].precision == precision
        assert_serves_every_task(rt, fp32_runtime, RATING_ATOL[precision])
    finally:
        rt.close()


def test_bad_settings_and_outputs_name_the_flag(src: Path, variants: dict[str, Path], tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    cases = [
        (src, QuantizeConfig(precision="int8"), "--out: "),
        (src / "q", QuantizeConfig(precision="int8"), "--out: "),
        (variants["int8"], QuantizeConfig(precision="int8"), "--out: "),  # non-empty, no --force
        (tmp_path / "a", QuantizeConfig(precision="int4", block_size=24), "--block-size: "),
        (tmp_path / "b", QuantizeConfig(precision="int4", accuracy_level=7), "--accuracy-level: "),
        (tmp_path / "c", QuantizeConfig(precision="int8", graphs=("unet",)), "--graphs: "),
        (tmp_path / "e", QuantizeConfig(precision="int8", int8_lm_head=True), "--int8-lm-head: "),
        (tmp_path / "f", QuantizeConfig(precision="int4", int8_lm_head=True, keep_lm_head=True),
         "--int8-lm-head and --keep-lm-head: "),
    ]
    for out, config, prefix in cases:
        with pytest.raises(QuantizeError) as info:
            quantize_artifacts(src, out, config, progress=False)
        assert str(info.value).startswith(prefix), str(info.value)
    with pytest.raises(QuantizeError, match=r"^ART: .*already a quantized variant"):
        quantize_artifacts(variants["int8"], tmp_path / "d", QuantizeConfig(precision="int4"), progress=False)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("keep me")
    assert main(["quantize", str(src), "--precision", "int8", "--out", str(tmp_path / "junk"), "--force",
                 "--quiet"]) == 2
    assert capsys.readouterr().err.startswith("error: --out: ")
    assert (tmp_path / "junk" / "notes.txt").read_text() == "keep me"
    assert not any(p.name.startswith(".junk.partial") for p in tmp_path.iterdir())


def _guard(out: Path) -> dict:  # type: ignore[type-arg]
    return json.loads((out / MANIFEST_NAME).read_text())["source"]["quantization"]["guard"]


def test_guard_passes_and_is_recorded_per_task(src: Path, splits: Path, tmp_path: Path) -> None:
    out = tmp_path / "int8"
    code = main(["quantize", str(src), "--precision", "int8", "--out", str(out), "--quiet", "--threads", "1",
                 "--guard-data", str(splits), "--guard-explain-tokens", "8"])
    assert code == 0
    guard = _guard(out)
    assert guard["passed"] is True and guard["failed_tasks"] == [] and guard["users"] == 2
    assert set(guard["tasks"]) == {"recommend", "search", "rating", "explanation", "selection"}
    assert all(v["passed"] and v["checks"] for v in guard["tasks"].values())
    assert guard["thresholds"]["max_hr_diff"] == 0.01 and guard["thresholds"]["max_rouge_l_diff"] == 0.01
    assert guard_warning(out) is None and guard_warning(src) is None
    load_manifest(out, verify=True)


def test_failing_guard_exits_nonzero_and_is_recorded(src: Path, splits: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str],
                                                     caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "int8"
    # an overlap above 1 is impossible: recommend must fail; rating's limits are loose: it must pass
    code = main(["quantize", str(src), "--precision", "int8", "--out", str(out), "--quiet", "--threads", "1",
                 "--guard-data", str(splits), "--guard-tasks", "recommend,rating", "--min-overlap", "1.01",
                 "--min-rating-agreement", "0", "--max-rmse-diff", "10"])
    assert code == 1
    err = capsys.readouterr().err
    assert "accuracy guard FAILED for recommend" in err and "rating" not in err.split("FAILED for")[1].split(":")[0]
    guard = _guard(out)
    assert guard["passed"] is False and guard["failed_tasks"] == ["recommend"]
    assert guard["tasks"]["rating"]["passed"] is True
    load_manifest(out, verify=True)  # the failing variant stays loadable, marked failed
    warning = guard_warning(out)
    assert warning is not None and "FAILED" in warning and "recommend" in warning
    with caplog.at_level(logging.WARNING):
        _serve_warning(Namespace(artifacts=out, config=None))
    assert any("FAILED its accuracy guard on recommend" in r.getMessage() for r in caplog.records)


def test_skipped_guard_is_recorded_as_not_run(src: Path, tmp_path: Path) -> None:
    out = tmp_path / "int8"
    assert main(["quantize", str(src), "--precision", "int8", "--out", str(out), "--quiet", "--skip-guard",
                 "--graphs", "media_kv"]) == 0
    assert _guard(out) is None
    warning = guard_warning(out)
    assert warning is not None and "not run" in warning


def test_serve_runs_the_guard_warning_first(tmp_path: Path) -> None:
    from unimp.cli import build_parser

    args = build_parser().parse_args(["serve", "--artifacts", str(tmp_path)])
    assert args.pre is _serve_warning


def test_external_weights_of_a_rewritten_graph_are_never_linked(src: Path, tmp_path: Path) -> None:
    """A source decoder with external data: the variant must not share (and so never write) that file."""
    ext = copy_artifacts(src, tmp_path / "ext")
    model = onnx.load(str(ext / "decoder.onnx"))
    onnx.save_model(model, str(ext / "decoder.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="decoder.onnx.data", size_threshold=1024)
    data = json.loads((ext / MANIFEST_NAME).read_text())
    data["graphs"]["decoder"]["sha256"] = sha256_file(ext / "decoder.onnx")
    data["files"]["decoder.onnx.data"] = sha256_file(ext / "decoder.onnx.data")
    (ext / MANIFEST_NAME).write_text(json.dumps(data))
    before = sha256_file(ext / "decoder.onnx.data")
    out = tmp_path / "ext-int8"
    quantize_artifacts(ext, out, QuantizeConfig(precision="int8", graphs=("decoder",)), progress=False)
    assert sha256_file(ext / "decoder.onnx.data") == before
    assert not (out / "decoder.onnx.data").exists() or not os.path.samefile(out / "decoder.onnx.data",
                                                                            ext / "decoder.onnx.data")
    manifest = load_manifest(out, verify=True)
    assert "decoder.onnx.data" not in manifest.files or (out / "decoder.onnx.data").is_file()
    assert op_counts(out / "decoder.onnx").get("MatMulInteger", 0) > 0
    _open(out, tmp_path / "lat").close()
