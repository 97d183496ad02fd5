"""The artifact contract shared by export (writer) and runtime (reader).

An artifacts directory holds ``manifest.json``, the ONNX graphs, ``tokenizer.json`` and the catalog.
The manifest names every tensor the runtime feeds or reads, so no tensor name is hard-coded below it;
per-layer names are templates with a ``{layer}`` (or ``{block}``) placeholder.

Schema history:
  1  first version: vision, media_kv and decoder graphs; optional diffusion graphs. Later optional
     fields (defaults keep older manifests readable): ``items`` (atomic or semantic-ID items) and
     ``tokens.item_last_start/item_last_count``; ``engines`` (TensorRT engines built on the target by
     ``unimp build-engines``: graph -> file, sha256 and the key it was built for).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"

DType = Literal["float32", "float16", "int64", "int32", "bool", "uint8"]
Precision = Literal["fp32", "fp16", "int8", "int4"]


class ManifestError(Exception):
    """The artifacts directory is unusable: missing file, wrong checksum, unsupported schema."""


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output."""

    name: str
    """Tensor name in the graph (templates such as ``past_key.{layer}`` are expanded before export)."""
    dtype: DType
    shape: list[int | str]
    """Static sizes as ints, dynamic ones as symbolic names (``batch``, ``past``, ...)."""


@dataclass(frozen=True)
class GraphEntry:
    """One exported graph file and its I/O signature."""

    file: str
    """Path relative to the artifacts directory."""
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    precision: Precision = "fp32"
    sha256: str = ""
    opset: int = 17
    profiles: dict[str, dict[str, list[int]]] = field(default_factory=dict)
    """TensorRT optimisation profiles: input name -> {"min": shape, "opt": shape, "max": shape}."""
    tolerance: dict[str, float] = field(default_factory=dict)
    """Validation tolerance against PyTorch: {"atol": ..., "rtol": ...}."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Component-specific settings (diffusion scheduler config, image size bounds, ...)."""

    def input(self, name: str) -> TensorSpec:
        for spec in self.inputs:
            if spec.name == name:
                return spec
        raise ManifestError(f"graph {self.file} has no input named {name!r}")


@dataclass(frozen=True)
class VisionDims:
    image_size: int
    """Square input size; preprocessing stretch-resizes to it (no crop)."""
    patch_size: int
    width: int
    """Vision token width = media latent width (Perceiver works at this width)."""
    num_latents: int
    """Latents per image after the Perceiver resampler (64 in OpenFlamingo)."""
    mean: list[float]
    std: list[float]


@dataclass(frozen=True)
class DecoderDims:
    num_layers: int
    hidden_size: int
    num_heads: int
    head_dim: int
    vocab_size: int
    max_positions: int
    xattn_layers: list[int]
    """Decoder layer indices preceded by a gated cross-attention block."""
    xattn_heads: int
    xattn_head_dim: int
    kv_layout: str = "concat"
    """How the decoder graph holds the self-attention KV cache: "inplace" (per layer one (B, H, L, hd) buffer
    that is input and output at once, written at each row's position; attention op ``attention``) or
    "concat" (present = Concat(past, new), returned and fed back; what TensorRT 10.3 / JetPack 6 builds)."""
    attention: str = "mha"
    """Self-attention op of the decoder graph: "gqa" (com.microsoft.GroupQueryAttention, in place), "onnx"
    (inplace layout in standard ops: opset-24 TensorScatter cache update + MatMul/Softmax; the same I/O as
    "gqa") or "mha" (standard ops, concat layout)."""


@dataclass(frozen=True)
class DecoderNames:
    """Tensor names of the decoder and media_kv graphs (templates take ``layer`` / ``block``)."""

    input_ids: str = "input_ids"
    position_ids: str = "position_ids"
    attention_mask: str = "attention_mask"
    """[batch, past + seq], 1 for real tokens, 0 for padding (left padding within a batch)."""
    text_time: str = "text_time"
    """[batch, seq] int64: 1-based index of the image each token attends to in the cross-attention memory, 0 for none."""
    past_key: str = "past_key.{layer}"
    past_value: str = "past_value.{layer}"
    present_key: str = "present_key.{layer}"
    present_value: str = "present_value.{layer}"
    xattn_key: str = "xattn_key.{block}"
    xattn_value: str = "xattn_value.{block}"
    logits: str = "logits"
    """[batch, vocab]: logits of the last position of every row (inplace layout: of ``logits_index``)."""
    seqlens_k: str = "seqlens_k"
    """inplace layout: [batch] int32, each row's valid KV length after the call, minus 1."""
    total_sequence_length: str = "total_sequence_length"
    """inplace layout: [] int32, the largest valid KV length after the call."""
    logits_index: str = "logits_index"
    """inplace layout: [batch] int64, the position in [0, seq) whose logits a row returns."""
    media_latents: str = "media_latents"
    pixel_values: str = "pixel_values"


@dataclass(frozen=True)
class TokenIds:
    bos: int
    eos: int
    pad: int
    image: int
    endofchunk: int
    answer: int
    rates: list[int]
    """ids of rate_1..rate_5, in order."""
    selections: list[int]
    """ids of s_0..s_4, in order."""
    item_start: int
    """First id of the contiguous item_0..item_{N-1} range."""
    item_count: int
    image_codes_start: int = -1
    """First id of img_0,..img_1023, (-1 if absent)."""
    item_last_start: int = -1
    """Semantic-ID items: first id of the contiguous item_last_0..item_last_31 range (-1 if absent)."""
    item_last_count: int = 0


ItemKind = Literal["atomic", "semantic"]


@dataclass(frozen=True)
class ItemsSpec:
    """How the model spells catalog items.

    ``atomic``: one token per item, ``item_k`` for the catalog item with token k. ``semantic``: every item
    is 4 tokens, ``item_a item_b item_c item_last_d`` (a, b, c in 0..511 from the ``item_k`` range, d in
    0..31 from the ``item_last_k`` range), read from ``semantic_table`` (``{item_id: [a, b, c, d]}``); a
    catalog item's ``token`` is then its row in that table (the table's order).
    """

    kind: ItemKind = "atomic"
    semantic_table: str = ""
    """Path of the id -> semantic id table, relative to the artifacts directory ("" when atomic)."""
    semantic_sha256: str = ""
    code_counts: list[int] = field(default_factory=list)
    """Semantic ids: the number of codes of each position ([512, 512, 512, 32])."""


@dataclass(frozen=True)
class EngineKey:
    """What a TensorRT engine is only valid for: a plan runs on the TensorRT version and GPU model it was
    built with, and is stale once its source graph, precision or profiles change."""

    tensorrt_version: str
    gpu_name: str
    compute_capability: str
    """"major.minor", e.g. "8.7" (Jetson Orin)."""
    precision: Precision
    profile_hash: str
    """sha256 of the optimisation profiles the engine was built with (runtime.backends.engines)."""
    graph_sha256: str
    """sha256 of the ONNX graph it was built from."""


@dataclass(frozen=True)
class EngineEntry:
    """One TensorRT engine built from a graph of this manifest."""

    file: str
    """Path relative to the artifacts directory."""
    sha256: str
    key: EngineKey
    profiles: list[str] = field(default_factory=list)
    """Names of the engine's optimisation profiles, in index order (e.g. ["prefill", "decode"])."""


@dataclass(frozen=True)
class Manifest:
    schema_version: int
    model_name: str
    vision: VisionDims
    decoder: DecoderDims
    tokens: TokenIds
    graphs: dict[str, GraphEntry]
    """Keys: "vision", "media_kv", "decoder"; optionally "text_encoder", "unet", "vae_decoder" (diffusion)
    and "vqgan_encoder", "vqgan_decoder" (VQGAN image codes; settings in their ``extra``)."""
    files: dict[str, str]
    """Other files (tokenizer, catalog) -> sha256."""
    names: DecoderNames = field(default_factory=DecoderNames)
    exporter: dict[str, str] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)
    kv_dtype: DType = "float32"
    tokenizer: str = "tokenizer.json"
    catalog: str = "catalog/items.jsonl"
    diffusion: dict[str, Any] = field(default_factory=dict)
    items: ItemsSpec = field(default_factory=ItemsSpec)
    engines: dict[str, EngineEntry] = field(default_factory=dict)
    """TensorRT engines by graph key (empty until ``unimp build-engines`` ran; not checked by
    ``verify_files``: runtime.backends.engines.check_engines checks them against this machine)."""

    # -- serialisation -----------------------------------------------------------------------
    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=False)

    def save(self, directory: Path) -> Path:
        path = Path(directory) / MANIFEST_NAME
        path.write_text(self.to_json() + "\n", encoding="utf-8")
        return path

    @staticmethod
    def from_dict(data: dict[str, Any]) -> Manifest:
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ManifestError(
                f"manifest schema_version {version!r} is not supported (this runtime reads {SCHEMA_VERSION}); "
                "re-export the artifacts with a matching unimp-edge"
            )
        try:
            graphs = {
                key: GraphEntry(
                    file=g["file"],
                    inputs=[TensorSpec(**t) for t in g["inputs"]],
                    outputs=[TensorSpec(**t) for t in g["outputs"]],
                    precision=g.get("precision", "fp32"),
                    sha256=g.get("sha256", ""),
                    opset=g.get("opset", 17),
                    profiles=g.get("profiles", {}),
                    tolerance=g.get("tolerance", {}),
                    extra=g.get("extra", {}),
                )
                for key, g in data["graphs"].items()
            }
            return Manifest(
                schema_version=version,
                model_name=data["model_name"],
                vision=VisionDims(**data["vision"]),
                decoder=DecoderDims(**data["decoder"]),
                tokens=TokenIds(**data["tokens"]),
                graphs=graphs,
                files=dict(data.get("files", {})),
                names=DecoderNames(**data.get("names", {})),
                exporter=dict(data.get("exporter", {})),
                source=dict(data.get("source", {})),
                kv_dtype=data.get("kv_dtype", "float32"),
                tokenizer=data.get("tokenizer", "tokenizer.json"),
                catalog=data.get("catalog", "catalog/items.jsonl"),
                diffusion=dict(data.get("diffusion", {})),
                items=ItemsSpec(**data.get("items", {})),
                engines={
                    key: EngineEntry(file=e["file"], sha256=e.get("sha256", ""), key=EngineKey(**e["key"]),
                                     profiles=list(e.get("profiles", [])))
                    for key, e in data.get("engines", {}).items()
                },
            )
        except KeyError as exc:
            raise ManifestError(f"manifest is missing the field {exc.args[0]!r}") from exc
        except TypeError as exc:
            raise ManifestError(f"manifest has a malformed section: {exc}") from exc


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def load_manifest(directory: str | Path, verify: bool = True) -> Manifest:
    """Read ``manifest.json`` from ``directory``; with ``verify`` check every file's sha256.

    Raises ManifestError naming the offending file on any mismatch.
    """
    root = Path(directory)
    path = root / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(f"{path} not found: is {root} an artifacts directory written by `unimp export`?")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ManifestError(f"{path} is not valid JSON: {exc}") from exc
    manifest = Manifest.from_dict(data)
    if verify:
        verify_files(root, manifest)
    return manifest


def verify_files(root: Path, manifest: Manifest) -> None:
    expected = {g.file: g.sha256 for g in manifest.graphs.values()}
    expected.update(manifest.files)
    if manifest.items.semantic_table:
        expected.setdefault(manifest.items.semantic_table, manifest.items.semantic_sha256)
    for rel, digest in expected.items():
        file = root / rel
        if not file.is_file():
            raise ManifestError(f"{file} is listed in the manifest but missing")
        if digest and sha256_file(file) != digest:
            raise ManifestError(f"{file} does not match its sha256 in the manifest (modified or truncated)")
