"""The export contract: manifest contents, checksum verification, `unimp validate`, CLI spellings."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from runtime.manifest import SCHEMA_VERSION, ManifestError, load_manifest


def test_manifest_names_every_graph_and_token(tiny_artifacts: Path) -> None:
    m = load_manifest(tiny_artifacts)
    assert m.schema_version == SCHEMA_VERSION
    assert {"vision", "media_kv", "decoder"} <= set(m.graphs)
    dec = m.graphs["decoder"]
    names = {t.name for t in dec.inputs}
    for layer in range(m.decoder.num_layers):
        assert m.names.past_key.format(layer=layer) in names
    for block in range(len(m.decoder.xattn_layers)):
        assert m.names.xattn_key.format(block=block) in names
    assert m.decoder.xattn_layers == [1, 3]  # before every 2nd decoder layer
    # the inplace KV layout: symbolic batch / seq / buffer capacity, past and present the same shape,
    # TensorRT profiles for every dynamic input (the scalar total_sequence_length is static: none)
    assert m.decoder.kv_layout == "inplace" and m.decoder.attention == "gqa"
    past = dec.input(m.names.past_key.format(layer=0)).shape
    assert past == ["batch", m.decoder.num_heads, "capacity", m.decoder.head_dim]
    assert {o.name: o.shape for o in dec.outputs}[m.names.present_key.format(layer=0)] == past
    assert {m.names.seqlens_k, m.names.total_sequence_length, m.names.logits_index} <= names
    assert m.names.attention_mask not in names and m.names.position_ids not in names
    assert set(dec.profiles) == names - {m.names.total_sequence_length}
    t = m.tokens
    assert t.bos == t.eos == 0
    assert len(t.rates) == 5 and len(t.selections) == 5 and t.item_count == 200
    assert all(len(g.sha256) == 64 for g in m.graphs.values())
    assert "tokenizer.json" in m.files and "catalog/items.jsonl" in m.files


def test_item_tokens_are_contiguous_and_atomic(tiny_artifacts: Path) -> None:
    from tokenizers import Tokenizer

    m = load_manifest(tiny_artifacts)
    tok = Tokenizer.from_file(str(tiny_artifacts / "tokenizer.json"))
    for k in (0, 57, 199):
        assert tok.token_to_id(f"item_{k}") == m.tokens.item_start + k
    ids = tok.encode("<image> Title x item_42 <|endofchunk|>", add_special_tokens=False).ids
    assert m.tokens.item_start + 42 in ids and m.tokens.image in ids and m.tokens.endofchunk in ids


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("checkpoint", ".cache", ".ort-cache"))
    return dst


def test_modified_graph_is_refused_naming_the_file(tiny_artifacts: Path, tmp_path: Path) -> None:
    root = _copy(tiny_artifacts, tmp_path / "a")
    with open(root / "media_kv.onnx", "ab") as handle:
        handle.write(b"\0")
    with pytest.raises(ManifestError, match=r"media_kv\.onnx"):
        load_manifest(root)


def test_missing_file_and_schema_version_are_refused(tiny_artifacts: Path, tmp_path: Path) -> None:
    root = _copy(tiny_artifacts, tmp_path / "b")
    (root / "tokenizer.json").unlink()
    with pytest.raises(ManifestError, match=r"tokenizer\.json"):
        load_manifest(root)
    data = json.loads((root / "manifest.json").read_text())
    data["schema_version"] = 99
    (root / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ManifestError, match="schema_version"):
        load_manifest(root, verify=False)


def test_validate_reports_per_graph_errors_within_tolerance(tiny_artifacts: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from unimp.cli import main

    assert main(["validate", str(tiny_artifacts)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is True
    m = load_manifest(tiny_artifacts)
    for name in ("vision", "media_kv", "decoder"):
        errors = report["graphs"][name]
        assert errors["cases"] >= 3
        assert 0 <= errors["max_abs_error"] <= m.graphs[name].tolerance["atol"] * 10


def test_validate_fails_on_a_graph_that_does_not_match(tiny_artifacts: Path, tmp_path: Path) -> None:
    """A decoder exported from different weights must fail validation against the checkpoint."""
    import torch

    from export.checkpoints import load_checkpoint
    from export.graphs import export_graph
    from export.pipeline import validate_artifacts
    from export.specs import inplace_decoder_spec
    from runtime.manifest import DecoderNames

    root = _copy(tiny_artifacts, tmp_path / "c")
    loaded = load_checkpoint(tiny_artifacts / "checkpoint")
    with torch.no_grad():
        loaded.model.lm.embed_out.weight.mul_(1.5)
    export_graph(inplace_decoder_spec(loaded.model, DecoderNames()), root / "decoder.onnx")
    data = json.loads((root / "manifest.json").read_text())
    from runtime.manifest import sha256_file

    data["graphs"]["decoder"]["sha256"] = sha256_file(root / "decoder.onnx")
    (root / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="decoder"):
        validate_artifacts(root, checkpoint=tiny_artifacts / "checkpoint")


def test_cli_spellings(capsys: pytest.CaptureFixture[str]) -> None:
    from unimp.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["export", "--demo", "tiny", "--out", "x"])
    assert args.demo == "tiny" and args.out == Path("x")
    args = parser.parse_args(["export", "--checkpoint", "c", "--out", "x"])
    assert args.checkpoint == Path("c")
    args = parser.parse_args(["serve", "--artifacts", "a", "--host", "127.0.0.1", "--port", "5", "--config", "f.toml"])
    assert args.command == "serve"
    with pytest.raises(SystemExit):
        parser.parse_args(["export", "--out", "x"])  # a source is required
