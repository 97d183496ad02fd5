"""``unimp preflight``: is every graph of an artifacts directory ready for TensorRT? Checked without TensorRT.

Per graph of the manifest (a quantized variant is an artifacts directory of its own: run it on that one):

* ``opset``: the default-domain opset against the target's maximum (export.trt_ops.TARGETS);
* ``ops``: every op in the target's operator matrix; custom-domain ops (com.microsoft GroupQueryAttention,
  MatMulNBits, ...) rejected with the export / quantize option that avoids them;
* ``constants``: inputs the parser needs as initializers (Slice / Pad / Squeeze / Unsqueeze / Reduce axes),
  Q/DQ zero points all 0;
* ``shapes``: no data-dependent-shape ops (NonZero, ...);
* ``dtypes``: tensor types TensorRT takes (no float64), each op's data type in its matrix row;
* ``profile``: each input's min/opt/max against the graph input (rank, ``0 <= min <= opt <= max``, static
  dims fixed), every symbolic dim given one range on all inputs, derived dims (``past+seq``) equal to the sum
  of their parts, and the decoder's positions not exceeded;
* ``run min`` / ``run max`` (unless ``run=False``): onnxruntime CPU at the profile's min and max shapes with
  inputs synthesised from the manifest (ids within the vocabulary, consistent lengths), timed.

What this cannot tell: whether TensorRT's parser and builder really accept the graph. That needs a machine
with TensorRT (``trtexec --onnx``, ``unimp build-engines``).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx

from export.trt_ops import (
    DATA_DEPENDENT_SHAPE,
    FIXES,
    INT64,
    ONNX_TYPE_NAMES,
    TARGETS,
    UNSUPPORTED,
    TrtTarget,
)
from runtime.manifest import DecoderNames, GraphEntry, Manifest, load_manifest

Status = Literal["PASS", "FAIL", "NOTE"]
Dims = dict[str, tuple[int, int, int]]


class PreflightError(Exception):
    """The preflight could not start (unknown target, unreadable artifacts)."""


@dataclass(frozen=True)
class Check:
    graph: str
    check: str
    status: Status
    detail: str


@dataclass(frozen=True)
class Run:
    graph: str
    shapes: str
    """"min" or "max"."""
    ok: bool
    seconds: float
    detail: str


@dataclass
class Report:
    artifacts: str
    target: str
    label: str
    checks: list[Check] = field(default_factory=list)
    runs: list[Run] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.status != "FAIL" for c in self.checks) and all(r.ok for r in self.runs)

    def failures(self) -> list[Check]:
        return [c for c in self.checks if c.status == "FAIL"]

    def to_json(self) -> str:
        return json.dumps({"ok": self.ok, **asdict(self)}, indent=2)

    def render(self) -> str:
        lines = [f"preflight {self.artifacts} for {self.label}"]
        for c in self.checks:
            lines.append(f"  {c.graph:<14} {c.check:<10} {c.status}  {c.detail}")
        for r in self.runs:
            status = "PASS" if r.ok else "FAIL"
            lines.append(f"  {r.graph:<14} {'run ' + r.shapes:<10} {status}  {r.detail}")
        failed = len(self.failures()) + sum(not r.ok for r in self.runs)
        lines.append(f"{'PASS' if self.ok else 'FAIL'}: {failed} failed check(s)"
                     + ("" if self.ok else f"; the graphs are not ready for {self.label}"))
        lines.append("not checked here: whether TensorRT's parser and builder accept the graphs (needs a GPU machine "
                     "with TensorRT: trtexec --onnx or unimp build-engines)")
        return "\n".join(lines)


def target(name: str) -> TrtTarget:
    try:
        return TARGETS[name]
    except KeyError:
        raise PreflightError(f"--tensorrt: must be one of {', '.join(TARGETS)}, got {name!r}") from None


# -- static graph checks -----------------------------------------------------------------------------------------

def _nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _nodes(attr.g)
            for sub in attr.graphs:
                yield from _nodes(sub)


def _constants(graph: onnx.GraphProto) -> dict[str, np.ndarray | None]:
    """Tensors known at build time: initializers and Constant outputs (value, or None when not a plain tensor)."""
    values: dict[str, np.ndarray | None] = {t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer}
    for node in _nodes(graph):
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            tensor = next((a.t for a in node.attribute if a.name == "value"), None)
            values[node.output[0]] = onnx.numpy_helper.to_array(tensor) if tensor is not None else None
    return values


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def check_model(graph_name: str, model: onnx.ModelProto, t: TrtTarget) -> list[Check]:
    """Opset, ops, build-time constants, data-dependent shapes and types of one graph for target ``t``."""
    out: list[Check] = []
    default = [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")]
    opset = max(default) if default else 0
    if opset > t.max_opset:
        out.append(Check(graph_name, "opset", "FAIL",
                         f"opset {opset} > {t.max_opset}, the maximum of {t.label} ({t.opset_source}); "
                         f"export at opset <= {t.max_opset}"))
    else:
        out.append(Check(graph_name, "opset", "PASS", f"opset {opset} <= {t.max_opset}"))

    nodes = list(_nodes(model.graph))
    unsupported: dict[str, int] = {}
    dds: dict[str, int] = {}
    notes: set[str] = set()
    for node in nodes:
        custom = node.domain not in ("", "ai.onnx")
        key = f"{node.domain}::{node.op_type}" if custom else node.op_type
        if custom:
            if node.op_type not in t.custom_ops:
                unsupported[key] = unsupported.get(key, 0) + 1
            continue
        support = t.support(node.op_type)
        if support is None:
            unsupported[key] = unsupported.get(key, 0) + 1
        elif support.note and node.op_type not in _RULES:
            notes.add(f"{node.op_type}: {support.note}")
        if node.op_type in DATA_DEPENDENT_SHAPE:
            dds[node.op_type] = dds.get(node.op_type, 0) + 1
    op_types = {(n.domain, n.op_type) for n in nodes}
    if not unsupported:
        out.append(Check(graph_name, "ops", "PASS", f"{_plural(len(op_types), 'op type')}, all in the {t.label} matrix"))
    for key, count in sorted(unsupported.items()):
        op = key.split("::")[-1]
        if "::" in key:
            why = "custom-domain op: TensorRT has no importer (needs a plugin)"
        elif op in UNSUPPORTED:
            why = "not supported by the TensorRT ONNX parser"
        else:
            why = f"not in the {t.label} operator matrix"
        fix = FIXES.get(op)
        out.append(Check(graph_name, "ops", "FAIL", f"{key} x{count}: {why}" + (f"; fix: {fix}" if fix else "")))
    for note in sorted(notes):
        out.append(Check(graph_name, "ops", "NOTE", f"restriction not checked here: {note}"))

    out.extend(_check_constants(graph_name, model.graph, nodes, t))
    if dds:
        listed = ", ".join(f"{op} x{n}" for op, n in sorted(dds.items()))
        out.append(Check(graph_name, "shapes", "FAIL",
                         f"data-dependent output shapes: {listed} (TensorRT needs an output allocator and no CUDA "
                         "graph can capture them); compute the shape from inputs instead"))
    else:
        out.append(Check(graph_name, "shapes", "PASS", "no data-dependent-shape ops"))
    out.extend(_check_types(graph_name, model, nodes, t))
    return out


def _attr(node: onnx.NodeProto, name: str, default: int) -> int:
    return next((int(a.i) for a in node.attribute if a.name == name), default)


def _outputs_used(node: onnx.NodeProto) -> int:
    return sum(1 for o in node.output if o)


def _topk(node: onnx.NodeProto, consts: dict[str, np.ndarray | None]) -> str | None:
    if _attr(node, "sorted", 1) != 1:
        return "sorted must be 1"
    k = consts.get(node.input[1]) if len(node.input) > 1 else None
    if k is None:
        return f"K ({node.input[1]!r}) must be a build-time constant" if len(node.input) > 1 else None
    return f"K = {int(k.max())} must be below 3840" if int(k.max()) >= 3840 else None


def _sattr(node: onnx.NodeProto, name: str, default: str) -> str:
    return next((a.s.decode() for a in node.attribute if a.name == name), default)


_RESIZE_MODES = {"nearest", "linear"}
_RESIZE_COORDS = {"half_pixel", "pytorch_half_pixel", "tf_half_pixel_for_nn", "asymmetric", "align_corners"}
_RESIZE_NEAREST = {"floor", "ceil", "round_prefer_floor", "round_prefer_ceil"}


def _resize(node: onnx.NodeProto, consts: dict[str, np.ndarray | None]) -> str | None:
    why = []
    if _attr(node, "antialias", 0):
        why.append("antialias is not supported")
    if (policy := _sattr(node, "keep_aspect_ratio_policy", "stretch")) != "stretch":
        why.append(f"keep_aspect_ratio_policy {policy!r} (only 'stretch')")
    if (mode := _sattr(node, "mode", "nearest")) not in _RESIZE_MODES:
        why.append(f"mode {mode!r} (only nearest, linear)")
    if (coords := _sattr(node, "coordinate_transformation_mode", "half_pixel")) not in _RESIZE_COORDS:
        why.append(f"coordinate_transformation_mode {coords!r}")
    if mode == "nearest" and (nearest := _sattr(node, "nearest_mode", "round_prefer_floor")) not in _RESIZE_NEAREST:
        why.append(f"nearest_mode {nearest!r}")
    return "; ".join(why) or None


_RULES: dict[str, Callable[[onnx.NodeProto, dict[str, np.ndarray | None]], str | None]] = {
    "LayerNormalization": lambda n, c: "only the first output (Y) is supported" if _outputs_used(n) > 1 else None,
    "MaxPool": lambda n, c: "the Indices output is not supported" if _outputs_used(n) > 1 else None,
    "ScatterND": lambda n, c: ("the reduction attribute is not supported"
                               if any(a.name == "reduction" and a.s not in (b"", b"none") for a in n.attribute)
                               else None),
    "TopK": _topk,
    "Resize": _resize,
}
"""Matrix restrictions checked on the node itself (the others are reported as notes)."""


def _check_constants(graph_name: str, graph: onnx.GraphProto, nodes: list[onnx.NodeProto],
                     t: TrtTarget) -> list[Check]:
    consts = _constants(graph)
    problems: list[str] = []
    for node in nodes:
        if node.domain not in ("", "ai.onnx"):
            continue
        label = f"{node.op_type} {node.name or node.output[0]!r}"
        rule = _RULES.get(node.op_type)
        if rule is not None and t.support(node.op_type) is not None and (why := rule(node, consts)):
            problems.append(f"{label}: {why}")
        support = t.support(node.op_type)
        for pos in support.constant_inputs if support else ():
            if pos < len(node.input) and node.input[pos] and node.input[pos] not in consts:
                problems.append(f"{label}: input {pos} ({node.input[pos]!r}) must be an initializer or Constant")
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") and len(node.input) > 2 and node.input[2]:
            zp = consts.get(node.input[2], None)
            if node.input[2] not in consts or zp is None:
                problems.append(f"{label}: zero point {node.input[2]!r} must be a constant 0")
            elif np.any(zp != 0):
                problems.append(f"{label}: zero point {node.input[2]!r} is not 0 (max |zp| {int(np.abs(zp).max())}); "
                                "TensorRT takes symmetric quantization only: quantize with --format qdq")
    if not problems:
        return [Check(graph_name, "constants", "PASS", "axes inputs constant; Q/DQ zero points 0; op restrictions met")]
    shown = problems[:8] + ([f"... and {len(problems) - 8} more"] if len(problems) > 8 else [])
    return [Check(graph_name, "constants", "FAIL", p) for p in shown]


def _check_types(graph_name: str, model: onnx.ModelProto, nodes: list[onnx.NodeProto], t: TrtTarget) -> list[Check]:
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # a graph onnx cannot infer: check the declared types only
        inferred = model
    g = inferred.graph
    types: dict[str, int] = {}
    for vi in [*g.input, *g.output, *g.value_info]:
        if vi.type.HasField("tensor_type"):
            types[vi.name] = vi.type.tensor_type.elem_type
    for init in g.initializer:
        types[init.name] = init.data_type
    io = {vi.name for vi in [*g.input, *g.output]}
    out: list[Check] = []
    bad: list[str] = []
    internal: dict[str, list[str]] = {}  # io-only type -> tensors inside the graph
    for name, code in types.items():
        tname = ONNX_TYPE_NAMES.get(code)
        if tname is None or tname not in t.dtypes:
            spelled = onnx.TensorProto.DataType.Name(code) if code else "UNDEFINED"
            hint = " (TensorRT would clamp it to float32: export float32)" if spelled == "DOUBLE" else ""
            bad.append(f"{name!r} is {spelled}{hint}")
        elif tname in t.io_only and name not in io:
            internal.setdefault(tname, []).append(name)
    for node in nodes:
        if node.domain not in ("", "ai.onnx"):
            continue
        support = t.support(node.op_type)
        if support is None:
            continue
        if node.op_type in ("Constant", "ConstantOfShape", "RandomNormal", "RandomUniform"):
            tensor = node.output[0]
        elif node.op_type == "Where":
            tensor = node.input[1] if len(node.input) > 1 else ""
        else:
            tensor = node.input[0] if node.input else ""
        tname = ONNX_TYPE_NAMES.get(types.get(tensor, 0), "")
        if tname and tname not in support.types:
            bad.append(f"{node.op_type} {node.name or node.output[0]!r} on {tname} ({tensor!r}); TensorRT takes "
                       f"{', '.join(sorted(support.types))}")
    for tname, names in sorted(internal.items()):
        examples = ", ".join(repr(x) for x in names[:2]) + (", ..." if len(names) > 2 else "")
        bad.append(f"{_plural(len(names), 'tensor')} inside the graph {'is' if len(names) == 1 else 'are'} {tname} "
                   f"({examples}): TensorRT takes {tname} only as a network input or output")
    shown = bad[:8] + ([f"... and {len(bad) - 8} more"] if len(bad) > 8 else [])
    out.extend(Check(graph_name, "dtypes", "FAIL", b) for b in shown)
    if not bad:
        out.append(Check(graph_name, "dtypes", "PASS", "every tensor type and op data type taken by TensorRT"))
    int64_inputs = [vi.name for vi in model.graph.input if vi.type.tensor_type.elem_type == onnx.TensorProto.INT64]
    if int64_inputs and INT64 in t.dtypes:
        out.append(Check(graph_name, "dtypes", "NOTE",
                         f"int64 inputs {', '.join(int64_inputs)}: TensorRT 10+ keeps int64 tensors (no cast to int32); "
                         "their ops are checked above"))
    return out


# -- profiles ---------------------------------------------------------------------------------------------------

_TERM = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*|\d+)\s*$")


def _graph_dims(model: onnx.ModelProto) -> dict[str, list[int | str | None]]:
    """Graph input -> dims: int (static), str (symbol) or None (unnamed dynamic)."""
    inits = {t.name for t in model.graph.initializer}
    dims: dict[str, list[int | str | None]] = {}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        shape: list[int | str | None] = []
        for d in vi.type.tensor_type.shape.dim:
            shape.append(d.dim_value if d.HasField("dim_value") else (d.dim_param or None))
        dims[vi.name] = shape
    return dims


def _derived(symbol: str) -> tuple[str, list[str]] | None:
    """"past+seq" -> ("+", ["past", "seq"]); "images*4" -> ("*", ["images", "4"]); plain symbols -> None."""
    for op in ("+", "*"):
        if op in symbol:
            parts = symbol.split(op)
            if all(_TERM.match(p) for p in parts):
                return op, [p.strip() for p in parts]
    return None


def _eval(op: str, parts: list[str], ranges: Dims, k: int) -> int | None:
    values = []
    for p in parts:
        if p.isdigit():
            values.append(int(p))
        elif p in ranges:
            values.append(ranges[p][k])
        else:
            return None
    return sum(values) if op == "+" else int(np.prod(values))


def symbol_ranges(entry: GraphEntry, dims: dict[str, list[int | str | None]]) -> Dims:
    """Symbol -> (min, opt, max) from the first input that gives the plain symbol a profile range."""
    ranges: Dims = {}
    for name, shape in dims.items():
        prof = entry.profiles.get(name)
        if not prof:
            continue
        for i, d in enumerate(shape):
            if isinstance(d, str) and _derived(d) is None and d not in ranges:
                try:
                    ranges[d] = (prof["min"][i], prof["opt"][i], prof["max"][i])
                except (KeyError, IndexError):
                    continue
    return ranges


def check_profiles(graph_name: str, model: onnx.ModelProto, entry: GraphEntry,
                   limits: dict[str, int] | None = None) -> list[Check]:
    """TensorRT's profile rules for every input of ``model`` against ``entry.profiles``, plus ``limits``
    (a symbol or derived dim -> largest value the model can take, e.g. ``{"past+seq": positions}``)."""
    dims = _graph_dims(model)
    problems: list[str] = []
    seen: dict[str, dict[tuple[int, int, int], list[str]]] = {}
    for name in entry.profiles:
        if name not in dims:
            problems.append(f"{name}: profile for a tensor that is not a graph input")
    for name, shape in dims.items():
        dynamic = [i for i, d in enumerate(shape) if not isinstance(d, int)]
        prof = entry.profiles.get(name)
        if prof is None:
            if dynamic:
                problems.append(f"{name}: dynamic input {_shape_text(shape)} has no profile (TensorRT needs "
                                "min/opt/max for every dynamic input)")
            continue
        missing = [k for k in ("min", "opt", "max") if k not in prof]
        if missing:
            problems.append(f"{name}: profile lacks {', '.join(missing)}")
            continue
        lo, opt, hi = prof["min"], prof["opt"], prof["max"]
        if not len(lo) == len(opt) == len(hi) == len(shape):
            problems.append(f"{name}: profile ranks min {len(lo)} / opt {len(opt)} / max {len(hi)} do not match the "
                            f"graph input's rank {len(shape)} {_shape_text(shape)}")
            continue
        for i, d in enumerate(shape):
            a, b, c = lo[i], opt[i], hi[i]
            if not 0 <= a <= b <= c:
                problems.append(f"{name}: dim {i} ({d}) needs 0 <= min <= opt <= max, got {a}, {b}, {c}")
            if isinstance(d, int) and not a == b == c == d:
                problems.append(f"{name}: dim {i} is static {d}, profile gives {a}, {b}, {c}")
            if isinstance(d, str):
                seen.setdefault(d, {}).setdefault((a, b, c), []).append(name)
    for symbol, by_range in seen.items():
        if len(by_range) > 1:
            listed = "; ".join(f"{r} on {', '.join(names[:3])}{' ...' if len(names) > 3 else ''}"
                               for r, names in by_range.items())
            problems.append(f"{symbol}: inputs sharing it have different ranges: {listed}")
    ranges = symbol_ranges(entry, dims)
    for symbol, by_range in seen.items():
        parsed = _derived(symbol)
        if parsed is None:
            continue
        op, parts = parsed
        for r, names in by_range.items():
            want = tuple(_eval(op, parts, ranges, k) for k in range(3))
            if None in want:
                lacking = [p for p in parts if not p.isdigit() and p not in ranges]
                problems.append(f"{names[0]}: derived dim {symbol}: {', '.join(lacking)} has no range on any input")
            elif tuple(r) != want:
                problems.append(f"{names[0]}: derived dim {symbol} is {r}, its parts give {want} (min, opt, max)")
    for expr, bound in (limits or {}).items():
        parsed = _derived(expr)
        value = _eval(parsed[0], parsed[1], ranges, 2) if parsed else (ranges[expr][2] if expr in ranges else None)
        if value is not None and value > bound:
            problems.append(f"max {expr} = {value} exceeds the model's limit {bound}")
    if not problems:
        listed = ", ".join(f"{s} {r[0]}..{r[2]} (opt {r[1]})" for s, r in sorted(ranges.items()))
        return [Check(graph_name, "profile", "PASS", listed or "static inputs only")]
    return [Check(graph_name, "profile", "FAIL", p) for p in problems]


def _shape_text(shape: Iterable[int | str | None]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


# -- runs at the profile corners ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class SynthContext:
    """What input synthesis needs to know about the model (from the manifest)."""

    names: DecoderNames = field(default_factory=DecoderNames)
    vocab_size: int = 0
    num_latents: int = 1


_NP_TYPES: dict[int, Any] = {
    onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.FLOAT16: np.float16, onnx.TensorProto.DOUBLE: np.float64,
    onnx.TensorProto.INT64: np.int64, onnx.TensorProto.INT32: np.int32, onnx.TensorProto.INT8: np.int8,
    onnx.TensorProto.UINT8: np.uint8, onnx.TensorProto.BOOL: np.bool_,
}


def synthesize(model: onnx.ModelProto, entry: GraphEntry, corner: str, ctx: SynthContext,
               seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs at the profile's ``corner`` ("min", "opt" or "max"): shapes from the profiles (static dims from the
    graph), values consistent with each other (ids in the vocabulary, positions after the past, masks of ones,
    image indices within the images passed, per-row lengths within the buffers)."""
    rng = np.random.default_rng(seed)
    dims = _graph_dims(model)
    ranges = symbol_ranges(entry, dims)
    k = {"min": 0, "opt": 1, "max": 2}[corner]
    types = {vi.name: vi.type.tensor_type.elem_type for vi in model.graph.input}
    shapes: dict[str, list[int]] = {}
    for name, shape in dims.items():
        prof = entry.profiles.get(name)
        if prof and corner in prof:
            shapes[name] = list(prof[corner])
            continue
        concrete: list[int] = []
        for d in shape:
            if isinstance(d, int):
                concrete.append(d)
            elif isinstance(d, str) and (parsed := _derived(d)) and (v := _eval(*parsed, ranges, k)) is not None:
                concrete.append(v)
            elif isinstance(d, str) and d in ranges:
                concrete.append(ranges[d][k])
            else:
                concrete.append(1)
        shapes[name] = concrete
    n = ctx.names
    seq = next((shapes[x][1] for x in (n.input_ids, n.text_time) if x in shapes and len(shapes[x]) == 2), 1)
    mask_len = shapes[n.attention_mask][1] if n.attention_mask in shapes else seq
    past = max(0, mask_len - seq)
    xkey = n.xattn_key.format(block=0)
    images = shapes[xkey][2] // max(1, ctx.num_latents) if xkey in shapes and len(shapes[xkey]) == 4 else 0
    feeds: dict[str, np.ndarray] = {}
    for name, size in shapes.items():
        dtype = _NP_TYPES.get(types.get(name, onnx.TensorProto.FLOAT), np.float32)
        if name == n.input_ids and ctx.vocab_size:
            value: np.ndarray = rng.integers(0, ctx.vocab_size, size=size)
        elif name == n.position_ids:
            value = np.broadcast_to(np.arange(past, past + size[1]), size)
        elif name == n.text_time:
            value = rng.integers(0, images + 1, size=size)
        elif name == n.seqlens_k:
            value = np.full(size, seq - 1)
        elif name == n.total_sequence_length:
            value = np.array(seq)
        elif name == n.logits_index:
            value = np.full(size, seq - 1)
        elif np.issubdtype(dtype, np.floating):
            value = rng.standard_normal(size).astype(np.float32) * 0.5
        elif dtype is np.bool_:
            value = np.ones(size, dtype=bool)
        elif name == n.attention_mask:
            value = np.ones(size)
        else:
            value = np.zeros(size)
        feeds[name] = np.require(value, dtype, "C")  # 0-d stays 0-d (ascontiguousarray gives (1,))
    return feeds


def run_corners(graph_name: str, path: Path, model: onnx.ModelProto, entry: GraphEntry, ctx: SynthContext,
                corners: tuple[str, ...] = ("min", "max"), threads: int = 0) -> list[Run]:
    """Run ``path`` on onnxruntime CPU at each profile corner; a failure is reported, not raised."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        return [Run(graph_name, c, False, 0.0, f"onnxruntime cannot load the graph: {_first_line(exc)}") for c in corners]
    runs: list[Run] = []
    for corner in corners:
        feeds = synthesize(model, entry, corner, ctx)
        shapes = ", ".join(f"{k} {list(v.shape)}" for k, v in list(feeds.items())[:3])
        more = f" (+{len(feeds) - 3} inputs)" if len(feeds) > 3 else ""
        start = time.perf_counter()
        try:
            session.run(None, feeds)
        except Exception as exc:
            runs.append(Run(graph_name, corner, False, time.perf_counter() - start,
                            f"onnxruntime failed at the {corner} shapes ({shapes}{more}): {_first_line(exc)}; "
                            "the profile's range is not really dynamic in the graph, or too large for it"))
            continue
        seconds = time.perf_counter() - start
        runs.append(Run(graph_name, corner, True, seconds, f"{seconds * 1000:.0f} ms at {shapes}{more}"))
    return runs


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]


# -- artifacts --------------------------------------------------------------------------------------------------

def graph_limits(key: str, manifest: Manifest) -> dict[str, int]:
    """Model limits a graph's profile must respect: the decoder's positions."""
    if key != "decoder":
        return {}
    positions = manifest.decoder.max_positions
    if manifest.decoder.kv_layout == "concat":
        return {"past+seq": positions}
    return {"capacity": positions + 1, "seq": positions}


def preflight(artifacts: str | Path, tensorrt: str = "10.3", run: bool = True, threads: int = 0,
              progress: Callable[[str], None] | None = None) -> Report:
    """Check every graph of ``artifacts`` for TensorRT target ``tensorrt`` (export.trt_ops.TARGETS)."""
    from runtime.manifest import ManifestError

    t = target(tensorrt)
    root = Path(artifacts)
    try:
        manifest = load_manifest(root, verify=False)
    except ManifestError as exc:
        raise PreflightError(str(exc)) from exc
    report = Report(str(root), t.name, t.label)
    ctx = SynthContext(manifest.names, manifest.decoder.vocab_size, manifest.vision.num_latents)
    for key, entry in manifest.graphs.items():
        path = root / entry.file
        if progress:
            progress(f"{key}: {entry.file}")
        if not path.is_file():
            report.checks.append(Check(key, "file", "FAIL", f"{path} is listed in the manifest but missing"))
            continue
        try:
            model = onnx.load(str(path), load_external_data=False)
        except Exception as exc:
            report.checks.append(Check(key, "file", "FAIL", f"{path} is not a readable ONNX graph: {_first_line(exc)}"))
            continue
        report.checks.extend(check_model(key, model, t))
        report.checks.extend(check_profiles(key, model, entry, graph_limits(key, manifest)))
        if run:  # token ids only for the decoder: another graph's ids (a diffusion text encoder) get zeros
            graph_ctx = ctx if key == "decoder" else replace(ctx, vocab_size=0)
            report.runs.extend(run_corners(key, path, model, entry, graph_ctx, threads=threads))
    return report


def run_cli(artifacts: Path, tensorrt: str, run: bool, as_json: bool, threads: int = 0, quiet: bool = False) -> int:
    """``unimp preflight``: print the report (text or JSON); 0 when every check passes, 1 on a failure, 2 when
    the preflight cannot start."""
    import sys

    def progress(step: str) -> None:
        print(f"preflight: {step}", file=sys.stderr, flush=True)

    if threads < 0:
        print(f"error: --threads: must be >= 0, got {threads}", file=sys.stderr)
        return 2
    try:
        report = preflight(artifacts, tensorrt, run=run, threads=threads, progress=None if quiet else progress)
    except PreflightError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(report.to_json() if as_json else report.render())
    return 0 if report.ok else 1
