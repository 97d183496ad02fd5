"""What TensorRT's ONNX parser accepts, per TensorRT target: max opset, operators and their types, data types.

Facts recorded from onnx-tensorrt's ``docs/operators.md`` (the 10.0/10.1 matrix, branch ``10.1-GA``: the
newest matrix available offline), the onnx-tensorrt / TensorRT release notes for the operators added later
(10.14 ``Attention``; 10.15 ``RotaryEmbedding``, ``RMSNormalization``, ``TensorScatter``; 11.0 ``Swish``
and the ``TRT_*`` custom ops; 11.2 ``DFT``) and NVIDIA's ONNX opset guide (TensorRT 11.x: max opset 25).

Targets (``unimp preflight --tensorrt``):

* ``10.3``: TensorRT 10.3, what JetPack 6 ships. Checked against the 10.1 matrix (nothing in the release
  notes up to 10.3 removes an operator; 10.3 only relaxed ``Slice`` axes, which is still checked here).
* ``10.x``: the newest TensorRT 10 (>= 10.15): the 10.1 matrix plus the 10.14 / 10.15 additions.
* ``11``: TensorRT 11.x: the 10.x set plus the 11.x additions.

What a static table cannot know: whether the parser really imports a given node (attribute values, shapes,
plugins). That needs ``trtexec --onnx`` / ``parser.supports_model_v2`` on a machine with TensorRT.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

# Type names as the onnx-tensorrt matrix spells them (runtime ONNX element types map onto these).
FP32, FP16, BF16, FP8, INT4, INT8, UINT8, INT32, INT64, BOOL, DOUBLE = (
    "FP32", "FP16", "BF16", "FP8", "INT4", "INT8", "UINT8", "INT32", "INT64", "BOOL", "DOUBLE")

ONNX_TYPE_NAMES: dict[int, str] = {
    1: FP32, 2: UINT8, 3: INT8, 6: INT32, 7: INT64, 9: BOOL, 10: FP16, 11: DOUBLE, 16: BF16,
    17: FP8, 18: FP8, 19: FP8, 20: FP8, 22: INT4,
}
"""onnx.TensorProto element type -> matrix type name (4 UINT16, 5 INT16, 8 STRING, 12/13 UINT32/64, 14/15
COMPLEX, 21 UINT4 have no TensorRT type and stay out of this map)."""

_F = frozenset({FP32, FP16, BF16})
_FI = _F | {INT32, INT64}
_FIB = _FI | {BOOL}


@dataclass(frozen=True)
class OpSupport:
    types: frozenset[str]
    """Types of the op's data tensor TensorRT takes (the matrix's "Supported Types")."""
    constant_inputs: tuple[int, ...] = ()
    """Input positions that must be initializers / Constant outputs (the matrix's restrictions)."""
    note: str = ""
    """A restriction the preflight does not check itself (reported when the op is present)."""
    since: str = "10.0"


def _table() -> dict[str, OpSupport]:
    ops: dict[str, OpSupport] = {}
    groups: list[tuple[frozenset[str], str]] = [
        (_F, "Acos Acosh Asin Asinh Atan Atanh BatchNormalization Ceil Celu Clip Conv ConvTranspose Cos Cosh "
             "Einsum Elu Erf Exp Floor Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool GroupNormalization GRU "
             "HardSigmoid HardSwish ImageScaler InstanceNormalization IsInf LeakyRelu Log LogSoftmax LRN "
             "LpNormalization MatMul MeanVarianceNormalization ParametricSoftplus Pow PRelu RandomNormal "
             "RandomNormalLike RandomUniform RandomUniformLike Reciprocal RNN Round ScaledTanh Scan Selu Sigmoid "
             "Sin Sinh Softmax Softplus Softsign Sqrt Tan Tanh ThresholdedRelu Upsample"),
        (_FI, "Abs Add ArgMax ArgMin DepthToSpace Div Equal Greater GreaterOrEqual IsNaN Less LessOrEqual Max "
              "Min Mod Mul Neg Range Relu Scatter ScatterElements Shrink Sign SpaceToDepth Sub Sum"),
        (_FIB, "Concat Constant ConstantOfShape Expand Flatten Gather GatherElements GatherND Identity If Loop "
               "Reshape ReverseSequence Shape Size Split Tile Transpose Trilu Where"),
        (frozenset({BOOL}), "And Not Or Xor"),
        (frozenset({FP32, FP16}), "DeformConv GridSample Mish NonMaxSuppression NonZero RoiAlign"),
    ]
    for types, names in groups:
        for name in names.split():
            ops[name] = OpSupport(types)
    for name in ("Cast", "CastLike"):
        ops[name] = OpSupport(_FI | {UINT8, BOOL})
    for name in ("ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd "
                 "ReduceSum ReduceSumSquare").split():
        ops[name] = OpSupport(_FI, constant_inputs=(1,))  # axes (an input from opset 13 / 18 on)
    ops.update({
        "Slice": OpSupport(_FIB, constant_inputs=(3,)),
        "Squeeze": OpSupport(_FIB, constant_inputs=(1,)),
        "Unsqueeze": OpSupport(_FIB, constant_inputs=(1,)),
        "Pad": OpSupport(_FI, constant_inputs=(3,)),
        "CumSum": OpSupport(_F, constant_inputs=(1,)),
        "OneHot": OpSupport(_FIB, constant_inputs=(1,), note="depth must be a build-time constant"),
        "EyeLike": OpSupport(_FIB, note="input must have static dimensions"),
        "Dropout": OpSupport(_F, constant_inputs=(2,), note="training_mode must evaluate to false"),
        "TopK": OpSupport(_FI, note="sorted must be 1 and K below 3840"),
        "Hardmax": OpSupport(_F, note="the axis dimension must be a build-time constant"),
        "AveragePool": OpSupport(_F, note="2D or 3D pooling; dilations empty or all ones"),
        "MaxPool": OpSupport(_F, note="2D or 3D pooling; no Indices output; dilations empty or all ones"),
        "LpPool": OpSupport(_F, note="dilations empty or all ones"),
        "LayerNormalization": OpSupport(_F, note="only the first output (Y)"),
        "LSTM": OpSupport(_F, note="input_forget and layout must be 0"),
        "Resize": OpSupport(_F, note="no antialiasing; aspect ratio policy stretch"),
        "ScatterND": OpSupport(_FI, note="no reduction attribute"),
        "Mean": OpSupport(_FI | {FP8}),
        "Gelu": OpSupport(_FI | {INT8}),
        # zero points (input 2) must be 0; checked by the preflight's Q/DQ rule
        "QuantizeLinear": OpSupport(_F),
        "DequantizeLinear": OpSupport(frozenset({INT8, FP8, INT4})),
    })
    return ops


OPS_10_1: Mapping[str, OpSupport] = _table()

UNSUPPORTED: frozenset[str] = frozenset((
    "AffineGrid Bernoulli BitShift BitwiseAnd BitwiseNot BitwiseOr BitwiseXor BlackmanWindow Col2Im "
    "CenterCropPad Compress ConcatFromSequence ConvInteger DFT Det DynamicQuantizeLinear HammingWindow "
    "HannWindow ImageDecoder MatMulInteger MaxRoiPool MaxUnpool MelWeightMatrix Multinomial "
    "NegativeLogLikelihoodLoss Optional OptionalGetElement OptionalHasElement QLinearConv QLinearMatMul "
    "RegexFullMatch STFT SequenceAt SequenceConstruct SequenceEmpty SequenceErase SequenceInsert "
    "SequenceLength SequenceMap SoftmaxCrossEntropyLoss SplitToSequence StringConcat StringNormalizer "
    "StringSplit TfIdfVectorizer Unique").split())
"""Default-domain ops the 10.1 matrix lists as not supported."""

ADDED_10_14: Mapping[str, OpSupport] = {"Attention": OpSupport(_F, since="10.14")}
ADDED_10_15: Mapping[str, OpSupport] = {
    "RotaryEmbedding": OpSupport(_F, since="10.15"),
    "RMSNormalization": OpSupport(_F, since="10.15"),
    "TensorScatter": OpSupport(_F, since="10.15", note="in-place aliasing in the engine is not guaranteed"),
}
ADDED_11: Mapping[str, OpSupport] = {
    "Swish": OpSupport(_F, since="11.0"),
    "DFT": OpSupport(_F, since="11.2"),
}
TRT_CUSTOM_11: frozenset[str] = frozenset({"TRT_Attention", "TRT_MoE", "TRT_KVCacheUpdate"})
"""Custom-domain ops the TensorRT 11.0 parser imports (any non-default domain accepted: the domain name
is not stated in the release notes)."""

DATA_DEPENDENT_SHAPE: frozenset[str] = frozenset({"NonZero", "NonMaxSuppression", "Unique", "Compress"})
"""Ops whose output shape depends on input values: TensorRT needs an output allocator for them and a
CUDA graph cannot capture them, so the preflight rejects them even where the parser imports them."""

CPU_QUANT_FIX = "quantize with --format qdq (QuantizeLinear/DequantizeLinear with zero points 0)"
FIXES: Mapping[str, str] = {
    "GroupQueryAttention": "export with --kv-layout concat (TensorRT 10.3) or --attention onnx (TensorRT >= 10.15)",
    "MatMulNBits": CPU_QUANT_FIX,
    "DynamicQuantizeMatMul": CPU_QUANT_FIX,
    "MatMulInteger": CPU_QUANT_FIX,
    "DynamicQuantizeLinear": CPU_QUANT_FIX,
    "QLinearMatMul": CPU_QUANT_FIX,
    "MatMulIntegerToFloat": CPU_QUANT_FIX,
    "Attention": "target --tensorrt 10.x (>= 10.14) or export with --kv-layout concat",
    "TensorScatter": "target --tensorrt 10.x (>= 10.15) or export with --kv-layout concat",
    "RotaryEmbedding": "target --tensorrt 10.x (>= 10.15) or export RoPE as standard ops",
    "RMSNormalization": "target --tensorrt 10.x (>= 10.15) or export RMSNorm as standard ops",
}
"""Op -> how to get a graph without it (custom-domain ops need a TensorRT plugin otherwise)."""


@dataclass(frozen=True)
class TrtTarget:
    name: str
    label: str
    max_opset: int
    opset_source: str
    ops: Mapping[str, OpSupport]
    custom_ops: frozenset[str] = frozenset()
    dtypes: frozenset[str] = field(
        default_factory=lambda: frozenset({FP32, FP16, BF16, FP8, INT4, INT8, UINT8, INT32, INT64, BOOL}))
    """Tensor types TensorRT 10/11 take (DOUBLE only by a clamping cast to float: rejected here)."""
    io_only: frozenset[str] = frozenset({UINT8})
    """Types TensorRT takes only as network inputs / outputs."""

    def support(self, op: str) -> OpSupport | None:
        return self.ops.get(op)


TARGETS: Mapping[str, TrtTarget] = {
    "10.3": TrtTarget(
        "10.3", "TensorRT 10.3 (JetPack 6)",
        # 20: the onnx-tensorrt 10.0/10.1 matrix value ("opset 9 to opset 20"); unverified for 10.3 itself.
        20, "onnx-tensorrt 10.1 matrix (unverified for 10.3)",
        OPS_10_1),
    "10.x": TrtTarget(
        "10.x", "TensorRT 10.x (>= 10.15)",
        # 24: 10.15 imports TensorScatter, an opset-24 operator; NVIDIA's opset guide states only the 11.x value.
        24, "inferred from the 10.15 TensorScatter import (opset 24); not stated in a 10.x support matrix",
        {**OPS_10_1, **ADDED_10_14, **ADDED_10_15}),
    "11": TrtTarget(
        "11", "TensorRT 11.x",
        # 25: NVIDIA's ONNX opset guide for 11.x; the 11.5 release notes say opset 25 came with 11.5.
        25, "NVIDIA ONNX opset guide, TensorRT 11.x (opset 25 support added in 11.5)",
        {**OPS_10_1, **ADDED_10_14, **ADDED_10_15, **ADDED_11}, custom_ops=TRT_CUSTOM_11),
}
"""``unimp preflight --tensorrt`` choices."""
