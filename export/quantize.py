"""``unimp quantize``: the precision ladder (int8 / int4 / fp16 weights) over an artifacts directory.

Writes a complete new artifacts directory: the quantized graphs, every other file hard-linked (copied where
the file system cannot link) from the source, and its own ``manifest.json`` whose graph entries carry the
new precision, sha256 and quantization settings (``extra["quantization"]``). ``source["quantization"]``
records the source directory, the sha256 of its manifest, the settings and, once it ran, the accuracy
guard's per-task verdict (``guard``), which ``unimp serve`` reads to warn about a failing variant.

``cpu`` format (what onnxruntime's CPU provider runs fastest), from onnxruntime's own tooling:

- int8: ``quantize_dynamic`` on MatMul nodes with a constant weight (per-tensor, signed int8 weights;
  activations are quantized at run time: DynamicQuantizeLinear + MatMulInteger);
- int4: ``MatMulNBitsQuantizer`` (symmetric, block-wise, ``MatMulNBits`` with an ``accuracy_level``).

``qdq`` format (explicit quantization in standard ONNX ops: what TensorRT builds, and onnxruntime runs):

- int8: ``quantize_static`` with ``QuantFormat.QDQ`` on the MatMul / Conv / Gemm nodes with a constant
  weight: int8 weights per output channel and int8 activations per tensor, both symmetric (zero point 0),
  MinMax calibration on feeds recorded from the runtime (``export.calibration``);
- int4: ``MatMulNBitsQuantizer`` with ``quant_format=QDQ``: blocked int4 ``DequantizeLinear`` weights
  (opset 21), weight-only. A source graph with ``com.microsoft`` ops (the ``inplace`` decoder's
  GroupQueryAttention) is refused with the fix.

``fp16``: onnxruntime's float16 converter with ``keep_io_types`` (fp32 graph I/O), for the text and the
diffusion graphs; a GPU precision that onnxruntime CPU also runs (slowly), for the guard.

Embeddings are Gather nodes and stay fp32 (int8 / int4); ``keep_lm_head`` keeps the decoder's LM head (the
MatMul whose weight has the vocabulary as its last dimension) fp32 too. Needs the ``onnx`` package (export
extra), never torch.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from runtime.manifest import MANIFEST_NAME, ManifestError, load_manifest, sha256_file

log = logging.getLogger(__name__)

PRECISIONS = ("int8", "int4", "fp16")
FORMATS = ("cpu", "qdq")
QUANTIZABLE = ("decoder", "media_kv", "vision")
"""Graphs ``--graphs`` may name for int8 / int4; other graphs (diffusion, VQGAN) are linked unchanged, fp32."""
DIFFUSION = ("text_encoder", "unet", "vae_decoder")
FP16_GRAPHS = QUANTIZABLE + DIFFUSION
"""fp16 also converts the diffusion graphs (those present when ``--graphs`` is not given)."""
DEFAULT_CALIBRATION = 16
QDQ_OPS = ("MatMul", "Conv", "Gemm")
"""int8 qdq: the nodes with a constant weight of these types get Q/DQ pairs (weights per channel)."""
STANDARD_DOMAINS = ("", "ai.onnx")
"""The default ONNX op domain (what ``qdq`` graphs may use)."""
SKIPPED = (".cache", ".ort-cache")
"""Top-level entries never carried over: caches derived from the source graphs."""
QUANTIZED_OPS = {("int8", "cpu"): ("DynamicQuantizeLinear", "MatMulInteger"), ("int4", "cpu"): ("MatMulNBits",),
                 ("int8", "qdq"): ("QuantizeLinear", "DequantizeLinear"), ("int4", "qdq"): ("DequantizeLinear",),
                 ("fp16", "cpu"): ("Cast",)}
"""(precision, format) -> the op types whose count the manifest records per converted graph."""
FP16_BLOCKED = ("GroupQueryAttention",)
"""fp16: ops kept in fp32 besides the converter's default block list (the in-place KV cache stays fp32)."""


class QuantizeError(Exception):
    """Bad settings or an unusable source / output directory; the message starts with the offending flag."""


@dataclass(frozen=True)
class QuantizeConfig:
    precision: str
    """``int8``, ``int4`` or ``fp16``."""
    format: str = "cpu"
    """``cpu`` (what onnxruntime's CPU provider runs fastest) or ``qdq`` (explicit QuantizeLinear /
    DequantizeLinear in standard ONNX ops: what TensorRT consumes, and onnxruntime runs)."""
    graphs: tuple[str, ...] | None = None
    """Graphs to convert; None: decoder, media_kv and vision (fp16: and the diffusion graphs present)."""
    block_size: int = 32
    """int4: weights per quantization block along K (a power of two >= 16)."""
    accuracy_level: int = 4
    """int4 cpu: MatMulNBits compute type of the activations (0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8)."""
    keep_lm_head: bool = False
    """Keep the decoder's LM head MatMul in fp32."""
    int8_lm_head: bool = False
    """int4 cpu: the decoder's LM head in dynamic int8 (MatMulInteger, per-tensor) instead of int4 blocks."""
    exclude: tuple[str, ...] = field(default_factory=tuple)
    """Further node names left in fp32."""
    calibration: int = DEFAULT_CALIBRATION
    """int8 qdq: calibration feeds per graph (from as many demo requests on the source artifacts)."""

    def validate(self) -> None:
        if self.precision not in PRECISIONS:
            raise QuantizeError(f"--precision: must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.format not in FORMATS:
            raise QuantizeError(f"--format: must be one of {', '.join(FORMATS)}, got {self.format!r}")
        if self.precision == "fp16" and self.format != "cpu":
            raise QuantizeError("--format: qdq applies to int8 and int4; fp16 graphs hold no Q/DQ (leave --format "
                                "at its default)")
        allowed = FP16_GRAPHS if self.precision == "fp16" else QUANTIZABLE
        unknown = [g for g in self.graphs or () if g not in allowed]
        if unknown or self.graphs == ():
            raise QuantizeError(f"--graphs: unknown graph(s) {', '.join(unknown) or '(none given)'} for "
                                f"{self.precision}; choose from {','.join(allowed)}")
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise QuantizeError(f"--block-size: must be a power of two >= 16, got {self.block_size}")
        if not 0 <= self.accuracy_level <= 4:
            raise QuantizeError(f"--accuracy-level: must be in 0..4, got {self.accuracy_level}")
        if self.calibration < 1:
            raise QuantizeError(f"--calibration: must be >= 1, got {self.calibration}")
        if self.int8_lm_head and (self.precision, self.format) != ("int4", "cpu"):
            raise QuantizeError("--int8-lm-head: applies to --precision int4 --format cpu (an int8 variant's LM "
                                "head is int8 already; --keep-lm-head keeps it fp32)")
        if self.int8_lm_head and self.keep_lm_head:
            raise QuantizeError("--int8-lm-head and --keep-lm-head: choose one precision for the LM head")

    def resolve_graphs(self, present: Sequence[str]) -> tuple[str, ...]:
        """The graphs to convert: the given ones, or the precision's default among those ``present``."""
        if self.graphs is not None:
            return self.graphs
        if self.precision == "fp16":
            return tuple(g for g in FP16_GRAPHS if g in present)
        return QUANTIZABLE

    def settings(self) -> dict[str, Any]:
        """What the manifest records for one converted graph."""
        if self.precision == "fp16":
            return {"method": "onnxruntime.transformers.float16.convert_float_to_float16", "format": self.format,
                    "weight_type": "float16", "keep_io_types": True, "op_block_list": list(FP16_BLOCKED)}
        if self.precision == "int8" and self.format == "qdq":
            return {"method": "onnxruntime.quantization.quantize_static", "format": self.format,
                    "quant_format": "QDQ", "weight_type": "int8, symmetric (zero point 0)", "per_channel": True,
                    "activations": "int8, symmetric per tensor (zero point 0), static",
                    "calibrate_method": "MinMax", "op_types": list(QDQ_OPS), "const_weights_only": True}
        if self.precision == "int8":
            return {"method": "onnxruntime.quantization.quantize_dynamic", "format": self.format,
                    "weight_type": "int8", "activations": "uint8, dynamic per tensor", "per_channel": False,
                    "op_types": ["MatMul"], "const_weights_only": True}
        if self.format == "qdq":
            return {"method": "onnxruntime.quantization.matmul_nbits_quantizer.MatMulNBitsQuantizer",
                    "format": self.format, "quant_format": "QDQ", "bits": 4, "block_size": self.block_size,
                    "symmetric": True, "weight_only": True, "op_types": ["MatMul"]}
        return {"method": "onnxruntime.quantization.matmul_nbits_quantizer.MatMulNBitsQuantizer",
                "format": self.format, "bits": 4, "block_size": self.block_size, "symmetric": True,
                "accuracy_level": self.accuracy_level}


def _onnx() -> Any:
    try:
        import onnx
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise QuantizeError(f"unimp quantize needs the onnx package (pip install 'unimp-edge[export]'): {exc}") from exc
    return onnx


def lm_head_nodes(model: Any, vocab_size: int) -> list[str]:
    """Names of MatMul nodes whose constant weight ends in the vocabulary dimension (the LM head)."""
    shapes = {init.name: list(init.dims) for init in model.graph.initializer}
    return [n.name for n in model.graph.node
            if n.op_type == "MatMul" and len(n.input) > 1 and shapes.get(n.input[1], [0])[-1:] == [vocab_size]]


def external_data_files(path: Path) -> list[str]:
    """Paths (relative to the artifacts directory) of the external data files an ONNX file refers to."""
    model = _onnx().load(str(path), load_external_data=False)
    out: set[str] = set()
    for init in model.graph.initializer:
        if init.data_location == 1:  # TensorProto.EXTERNAL
            location = next((e.value for e in init.external_data if e.key == "location"), None)
            if location:
                out.add((Path(path).parent / location).as_posix())
    return sorted(out)


def _opset(path: Path) -> int:
    model = _onnx().load(str(path), load_external_data=False)
    return int(next((o.version for o in model.opset_import if o.domain in STANDARD_DOMAINS), 0))


def op_counts(path: Path) -> dict[str, int]:
    """Node count per op type of an ONNX file (top-level graph)."""
    model = _onnx().load(str(path), load_external_data=False)
    return dict(Counter(n.op_type for n in model.graph.node))


@contextlib.contextmanager
def _quiet_tooling() -> Iterator[None]:
    """onnxruntime's quantizers log every node at INFO (``quantize_dynamic`` on the root logger, with a
    pre-processing hint at WARNING meant for static calibration); keep that for ``unimp -v`` only."""
    loggers = [logging.getLogger("onnxruntime.quantization"), logging.getLogger()]
    levels = [logger.level for logger in loggers]
    if not log.isEnabledFor(logging.DEBUG):
        for logger in loggers:
            logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def nonstandard_ops(path: Path) -> list[str]:
    """``domain.op`` of every op type of an ONNX file outside the default ONNX domain (sorted, unique)."""
    model = _onnx().load(str(path), load_external_data=False)
    return sorted({f"{n.domain}.{n.op_type}" for n in model.graph.node if n.domain not in STANDARD_DOMAINS})


def const_weight_nodes(model: Any, op_types: Sequence[str]) -> list[str]:
    """Names of the nodes of ``op_types`` whose second input is an initializer (a weight)."""
    weights = {init.name for init in model.graph.initializer}
    return [n.name for n in model.graph.node
            if n.op_type in op_types and len(n.input) > 1 and n.input[1] in weights]


def _external_data(src: Path) -> bool:
    """Whether a graph written from ``src`` keeps its weights in an external file (protobuf's 2 GB limit)."""
    return src.stat().st_size > 1_800_000_000


def _quantize_graph(src: Path, dst: Path, config: QuantizeConfig, exclude: list[str],
                    feeds: Sequence[dict[str, Any]] | None = None, progress: bool = False) -> None:
    with _quiet_tooling():
        _quantize_graph_now(src, dst, config, exclude, feeds, progress)


def _quantize_graph_now(src: Path, dst: Path, config: QuantizeConfig, exclude: list[str],
                        feeds: Sequence[dict[str, Any]] | None, progress: bool) -> None:
    onnx = _onnx()
    big = _external_data(src)
    if config.precision == "fp16":
        from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

        model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True,
                                         op_block_list=[*DEFAULT_OP_BLOCK_LIST, *FP16_BLOCKED],
                                         node_block_list=exclude or None)
        onnx.save_model(model, str(dst), save_as_external_data=big, all_tensors_to_one_file=True,
                        location=f"{dst.name}.data")
        return
    if config.precision == "int8" and config.format == "qdq":
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

        from export.calibration import FeedReader

        nodes = [n for n in const_weight_nodes(onnx.load(str(src), load_external_data=False), QDQ_OPS)
                 if n not in exclude]
        if not nodes or not feeds:
            shutil.copy2(src, dst)
            return
        quantize_static(src, dst, FeedReader(feeds, f"calibrate {src.stem}", progress), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                        nodes_to_quantize=nodes, calibrate_method=CalibrationMethod.MinMax,
                        use_external_data_format=big,
                        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True})
        return
    if config.precision == "int8":
        _dynamic_int8(src, dst, big, exclude=exclude)
        return
    from onnxruntime.quantization import QuantFormat
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    qdq = config.format == "qdq"
    quantizer = MatMulNBitsQuantizer(onnx.load(str(src)), bits=4, block_size=config.block_size, is_symmetric=True,
                                     accuracy_level=None if qdq else config.accuracy_level or None,
                                     nodes_to_exclude=exclude,
                                     quant_format=QuantFormat.QDQ if qdq else QuantFormat.QOperator)
    quantizer.process()
    quantizer.model.save_model_to_file(str(dst), use_external_data_format=big)


def _dynamic_int8(src: Path, dst: Path, big: bool, exclude: Sequence[str] = (),
                  only: Sequence[str] | None = None) -> None:
    """onnxruntime ``quantize_dynamic`` of the MatMuls with a constant weight (``only``: just these nodes)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(src, dst, op_types_to_quantize=["MatMul"], per_channel=False, weight_type=QuantType.QInt8,
                     nodes_to_quantize=list(only) if only is not None else None, nodes_to_exclude=list(exclude),
                     use_external_data_format=big, extra_options={"MatMulConstBOnly": True})


def _int4_with_int8_head(src: Path, dst: Path, config: QuantizeConfig, exclude: list[str], head: list[str],
                         scratch: Path) -> None:
    """int4 blocks for every weight MatMul but ``head`` (already in ``exclude``), then dynamic int8 for the
    head alone; the int4 graph is written in ``scratch`` first, so dst's external data is named after dst."""
    body = scratch / dst.name
    _quantize_graph(src, body, config, exclude)
    with _quiet_tooling():
        _dynamic_int8(body, dst, _external_data(src), only=head)


def _check_qdq_source(src: Path, manifest: Any, graphs: Sequence[str], config: QuantizeConfig) -> None:
    """Refuse a qdq variant of a graph that cannot become standard ONNX ops (or cannot be calibrated)."""
    for name in graphs:
        entry = manifest.graphs[name]
        custom = nonstandard_ops(src / entry.file)
        if custom:
            others = ",".join(g for g in graphs if g != name)
            alt = f", or quantize only --graphs {others}" if others else ""
            fix = ("re-export the artifacts with `unimp export ... --kv-layout concat` (the standard-op decoder "
                   f"TensorRT 10.3 builds){alt}" if name == "decoder" else f"leave {name} out of --graphs{alt}")
            layout = f", {manifest.decoder.kv_layout} KV layout" if name == "decoder" else ""
            raise QuantizeError(f"--format: qdq is the TensorRT form and needs standard ONNX ops, but {name} "
                                f"({entry.file}{layout}) uses {', '.join(custom)}: {fix}")
        if name == "decoder" and config.precision == "int8" and manifest.decoder.kv_layout != "concat":
            raise QuantizeError(f"--format: int8 qdq calibrates the decoder from the runtime's plain graph calls, "
                                f"which the {manifest.decoder.kv_layout} KV layout does not make; re-export with "
                                "`--kv-layout concat`, or use --precision int4 (weight-only, no calibration)")


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _carried_files(src: Path, replaced: set[str]) -> Iterator[tuple[Path, str]]:
    for root, dirs, files in os.walk(src):
        rel_root = Path(root).relative_to(src)
        if rel_root == Path("."):
            dirs[:] = [d for d in dirs if d not in SKIPPED]
        for name in files:
            rel = (rel_root / name).as_posix()
            if rel == MANIFEST_NAME or rel in replaced:
                continue
            yield Path(root) / name, rel


def check_output(src: Path, out: Path, force: bool) -> None:
    """Refuse an output directory that is the source, lies inside it, or holds something (without force)."""
    s, o = src.resolve(), out.resolve()
    if o == s:
        raise QuantizeError(f"--out: {out} is the source artifacts directory; write the variant elsewhere")
    if s in o.parents:
        raise QuantizeError(f"--out: {out} lies inside the source artifacts directory {src}")
    if o in s.parents:
        raise QuantizeError(f"--out: {out} contains the source artifacts directory {src}")
    if o.exists() and not o.is_dir():
        raise QuantizeError(f"--out: {out} exists and is not a directory")
    if o.is_dir() and any(o.iterdir()):
        if not force:
            raise QuantizeError(f"--out: {out} exists and is not empty (pass --force to replace it)")
        if not (o / MANIFEST_NAME).is_file():
            raise QuantizeError(f"--out: {out} is not empty and not an artifacts directory; refusing to replace "
                                "it even with --force")


def quantize_artifacts(src: Path, out: Path, config: QuantizeConfig, *, force: bool = False,
                       progress: bool = True) -> dict[str, Any]:
    """Write the quantized variant of ``src`` to ``out``; returns its ``source["quantization"]`` section.

    The guard is recorded as not run (``guard: None``) until ``record_guard`` writes its result.
    """
    from tqdm import tqdm

    config.validate()
    src, out = Path(src), Path(out)
    try:
        manifest = load_manifest(src, verify=True)
    except ManifestError as exc:
        raise QuantizeError(f"ART: {exc}") from exc
    check_output(src, out, force)
    config = replace(config, graphs=config.resolve_graphs(list(manifest.graphs)))
    assert config.graphs is not None
    missing = [g for g in config.graphs if g not in manifest.graphs]
    if missing:
        raise QuantizeError(f"--graphs: {', '.join(missing)} not in {src}'s manifest "
                            f"(it has {', '.join(manifest.graphs)})")
    if manifest.source.get("quantization"):
        raise QuantizeError(f"ART: {src} is already a quantized variant "
                            f"({manifest.source['quantization'].get('precision')}); quantize the fp32 source")
    feeds: dict[str, list[dict[str, Any]]] = {}
    if config.format == "qdq":
        _check_qdq_source(src, manifest, config.graphs, config)
        if config.precision == "int8":
            from export.calibration import record_feeds

            calibrated = [g for g in config.graphs if g in QUANTIZABLE]
            try:
                feeds = record_feeds(src, config.calibration, calibrated, progress=progress)
            except ValueError as exc:
                raise QuantizeError(f"--calibration: {exc}") from exc
    data = json.loads((src / MANIFEST_NAME).read_text(encoding="utf-8"))
    replaced = {manifest.graphs[g].file for g in config.graphs}
    old_data = {Path(f).relative_to(src).as_posix() for g in config.graphs
                for f in external_data_files(src / manifest.graphs[g].file)}
    # never link a rewritten graph's weights: the quantizer would write through the link into the source
    replaced |= old_data
    carried = list(_carried_files(src, replaced))
    for rel in old_data:
        data.get("files", {}).pop(rel, None)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        bar = tqdm(total=len(carried) + len(config.graphs) + 1, desc=f"quantize {config.precision}", unit="step",
                   disable=not progress)
        with contextlib.closing(bar):
            for path, rel in carried:
                _link(path, tmp / rel)
                bar.update(1)
            graphs: dict[str, Any] = {}
            for name in config.graphs:
                entry = manifest.graphs[name]
                bar.set_postfix_str(name)
                exclude = list(config.exclude)
                head: list[str] = []
                if name == "decoder" and (config.keep_lm_head or config.int8_lm_head):
                    onnx_model = _onnx().load(str(src / entry.file), load_external_data=False)
                    head = lm_head_nodes(onnx_model, manifest.decoder.vocab_size)
                    exclude += head
                dst = tmp / entry.file
                dst.parent.mkdir(parents=True, exist_ok=True)
                if config.int8_lm_head and head:
                    with tempfile.TemporaryDirectory(prefix=".int4-body-", dir=tmp) as scratch:
                        _int4_with_int8_head(src / entry.file, dst, config, exclude, head, Path(scratch))
                else:
                    _quantize_graph(src / entry.file, dst, config, exclude, feeds.get(name), progress)
                if config.format == "qdq" and nonstandard_ops(dst):
                    raise QuantizeError(f"--format: the qdq {name} graph came out with non-standard ops "
                                        f"{', '.join(nonstandard_ops(dst))}")
                ops = op_counts(dst)
                kinds = QUANTIZED_OPS[(config.precision, config.format)]
                if config.int8_lm_head and head:
                    kinds += QUANTIZED_OPS[("int8", "cpu")]
                quantized = {op: ops.get(op, 0) for op in kinds}
                settings = {**config.settings(), "excluded_nodes": exclude, "quantized_ops": quantized,
                            **({"int8_nodes": head} if config.int8_lm_head else {}),
                            "bytes_before": (src / entry.file).stat().st_size, "bytes_after": dst.stat().st_size}
                if name in feeds:
                    from export.calibration import describe

                    settings["calibration"] = describe(feeds, name)
                g = data["graphs"][name]
                g["opset"] = _opset(dst)
                g["precision"] = config.precision
                g["sha256"] = sha256_file(dst)
                for f in external_data_files(dst):
                    data.setdefault("files", {})[Path(f).relative_to(tmp).as_posix()] = sha256_file(Path(f))
                g.setdefault("extra", {})["quantization"] = settings
                graphs[name] = settings
                bar.update(1)
            section = {"precision": config.precision, "format": config.format, "graphs": sorted(graphs),
                       "source_artifacts": str(src.resolve()),
                       "source_manifest_sha256": sha256_file(src / MANIFEST_NAME),
                       "settings": asdict(config), "guard": None}
            data.setdefault("source", {})["quantization"] = section
            data["model_name"] = f"{manifest.model_name}-{config.precision}"
            (tmp / MANIFEST_NAME).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
            bar.set_postfix_str("verify")
            load_manifest(tmp, verify=True)
            bar.update(1)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return section


def guard_summary(report: dict[str, Any]) -> dict[str, Any]:
    """The manifest's ``guard`` entry from an ``unimp eval --against`` report: per-task checks and verdicts."""
    guard = report["guard"]
    tasks: dict[str, dict[str, Any]] = {}
    for task in report.get("tasks", []):
        checks = [c for c in guard["checks"] if c["name"].split(" ")[0].split(".")[0] == task]
        tasks[task] = {"passed": all(c["passed"] for c in checks), "checks": checks}
    failed = [t for t, v in tasks.items() if not v["passed"]]
    return {"passed": bool(guard["passed"]) and not failed, "failed_tasks": failed, "tasks": tasks,
            "thresholds": guard["thresholds"], "differences": guard["differences"], "split": report.get("split"),
            "users": report.get("users"), "data": report.get("data")}


def record_guard(out: Path, summary: dict[str, Any]) -> None:
    """Write the guard's summary into ``out``'s manifest (``source.quantization.guard``)."""
    path = Path(out) / MANIFEST_NAME
    data = json.loads(path.read_text(encoding="utf-8"))
    data["source"]["quantization"]["guard"] = summary
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def guard_warning(artifacts: Path) -> str | None:
    """A warning for ``unimp serve`` when ``artifacts`` is a quantized variant whose guard failed or did not
    run; None for a passing variant or an unquantized directory. Reads only the manifest (no onnx import)."""
    artifacts = Path(artifacts)
    try:
        data = json.loads((artifacts / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    section = (data.get("source") or {}).get("quantization")
    if not section:
        return None
    guard = section.get("guard")
    name = f"{artifacts} ({section.get('precision')} of {section.get('source_artifacts')})"
    if guard is None:
        return f"quantized variant {name}: its accuracy guard was not run"
    if not guard.get("passed"):
        return (f"quantized variant {name} FAILED its accuracy guard on "
                f"{', '.join(guard.get('failed_tasks') or ['(see manifest)'])}")
    return None


def guard_tasks(tasks: Sequence[str]) -> tuple[str, ...]:
    """The ``--guard-tasks`` list, checked against ``unimp eval``'s tasks."""
    from runtime.eval.runner import TASKS

    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise QuantizeError(f"--guard-tasks: unknown task(s) {', '.join(unknown) or '(none given)'}; choose from "
                            f"{','.join(TASKS)}")
    return tuple(tasks)
