"""The one description of what is quantized: a pure `QuantSpec` derived once from the FP32 graph, the scheme and
the fixes, read by the QDQ writer, the diagnosis, QAT's fake quantizers, PTQ, the TensorRT cache and the coverage
check. Nothing here runs a model; `sr.quant.readback` reads what a written QDQ model really quantizes, so that
the spec and the file can be compared.

Three targets, each named for what it deploys to:

- `tensorrt`: Q/DQ where NVIDIA ModelOpt's ONNX PTQ (`modelopt.onnx.quantization`, int8) puts them for the same
  graph: the activation inputs of Conv / ConvTranspose / MatMul / Gemm, Add and pooling, nothing on activations'
  outputs, DepthToSpace or the network output (TensorRT fuses the rest and keeps the output in float). As in
  ModelOpt, a Conv with too few channels (both sides < 16, unless one is a multiple of 8 and it is the first
  layer or one side >= 16) stays in float, an Add with a constant input gets no Q/DQ, and the branch of a residual
  Add that comes straight out of a Conv is not quantized there (TensorRT fuses the Add into that Conv): those two
  rules are ModelOpt's, in `sr.quant.trtfusion`.
  Symmetric INT8 (-127..127), weights per output channel, float biases. Checked against ModelOpt itself, on every
  shipped model and stand-in, in tests/test_quantspec.py; ModelOpt's other patterns (attention, LayerNorm, GEMV)
  are not reproduced, and a graph with them may differ.
- `npu`: the LiteRT (TFLite) 8-bit quantization specification, which Qualcomm's HTP and the other phone NPUs
  run: every tensor in INT8, the network output included (the input and output of each Conv / ReLU / Clip /
  Concat / DepthToSpace); activations per tensor, **asymmetric with a zero point** (-128..127, so a [0, 1] image
  uses all 256 levels and white stays white); weights symmetric per output channel (-127..127, zero point 0);
  **INT32 biases** at step s_input x s_weight; and the spec's op constraints: a Concat's inputs share its output's
  scale and zero point, a DepthToSpace keeps its input's, and a Conv feeding only an activation shares the
  activation's (the fused unit quantizes once, after the activation); an Add of two tensors is INT8 too. `npu-per-tensor`: the same with one scale
  per weight tensor (accelerators without per-channel weights).
- `npu-symmetric`: the `npu` placement with symmetric activations (zero point 0, -127..127) and float biases, for
  accelerators that are symmetric-only (what `npu` meant before it followed LiteRT's specification).
- `cpu`: the `npu-symmetric` placement with asymmetric UINT8 activations and INT32 biases: ONNX Runtime's fast
  x86 path (written by ONNX Runtime's own quantizer).

The lab's own wrapper around a user's model (nodes named `standard/...`: colour conversion, the Cb/Cr bicubic,
layout transposes, [0, 255] scaling) is never quantized: it is not part of what the user deploys.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import onnx

from ..graph import GeluUnit, GraphIndex, L2NormUnit, op_units
from ..choices import Choice
from .trtfusion import conv_too_small, non_residual_input

WRAPPER_PREFIX = "standard/"  # node and tensor names of the lab's wrapper around a user's graph (sr.model.wrapper)


class Scheme(Choice, noun="INT8 scheme"):
    """The INT8 target: where Q/DQ go and how activations are quantized."""

    TENSORRT = "tensorrt"
    NPU = "npu"  # LiteRT's 8-bit specification (asymmetric INT8 activations, INT32 biases, tied Concat)
    NPU_PER_TENSOR = "npu-per-tensor"  # npu with one scale per weight tensor (accelerators without per-channel)
    NPU_SYMMETRIC = "npu-symmetric"  # every tensor INT8, symmetric activations, float biases
    CPU = "cpu"

    @property
    def symmetric(self) -> bool:
        """True for symmetric INT8 activations with zero point 0 (tensorrt, npu-symmetric)."""
        return self in (Scheme.TENSORRT, Scheme.NPU_SYMMETRIC)

    @property
    def by_onnxruntime(self) -> bool:
        """True for the scheme whose QDQ model ONNX Runtime's quantizer writes (cpu); the lab writes the others."""
        return self is Scheme.CPU

    @property
    def litert(self) -> bool:
        """True for the schemes that follow LiteRT's 8-bit quantization specification (npu, npu-per-tensor)."""
        return self in (Scheme.NPU, Scheme.NPU_PER_TENSOR)

    @property
    def int32_bias(self) -> bool:
        """True where Conv biases are INT32 at step s_input x s_weight (npu, npu-per-tensor, cpu)."""
        return self.litert or self is Scheme.CPU

    @property
    def all_int8(self) -> bool:
        """True for the placements that quantize every tensor of the covered ops (npu, npu-per-tensor, cpu)."""
        return self is not Scheme.TENSORRT


# ModelOpt's int8 placement quantizes the inputs of these (its CASK partition heads and KGEN ops)
TENSORRT_INPUT_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm", "Add", "MaxPool", "AveragePool",
                      "GlobalAveragePool")
ALL_INT8_OPS = ("Conv", "Relu", "Clip", "Concat", "DepthToSpace")  # npu / cpu: inputs and outputs of these
# LiteRT's INT8 ops beyond those: every tensor of a network made of them is INT8 (its 8-bit specification lists
# each with its constraints), so an NPU runs the graph whole without a float island; LayerNormalization is QNN's
# one INT8 op (LiteRT has no such builtin: its converter writes INT8 MEAN, SQUARED_DIFFERENCE, RSQRT ops), and an
# erf GELU is one op to both (`sr.graph.gelu_units`)
LITERT_MORE_OPS = ("Add", "Sub", "Mul", "LeakyRelu", "PRelu", "Sigmoid", "Tanh", "Softmax", "MaxPool",
                   "AveragePool", "Resize", "Pad", "ConvTranspose", "MatMul", "Reshape", "Transpose", "Squeeze",
                   "Unsqueeze", "Flatten", "Slice", "Split", "Gather", "LayerNormalization")
LITERT_OPS = (*ALL_INT8_OPS, *LITERT_MORE_OPS)
LITERT_TWO_INPUTS = ("Concat", "Add", "Sub", "Mul", "MatMul")  # every activation input quantized, not the first only
# "input and outputs must all have same scale/zero_point": data movement, pooling, resizing and padding
LITERT_SAME_SCALE = ("DepthToSpace", "MaxPool", "AveragePool", "Resize", "Pad", "Reshape", "Transpose", "Squeeze",
                     "Unsqueeze", "Flatten", "Slice", "Split", "Gather")
# the fixed output grids: LOGISTIC and SOFTMAX step 1/256 zero point -128 ([0, 255/256]), TANH and
# L2_NORMALIZATION (an exported F.normalize, `sr.graph.l2norm_units`) step 1/128 zero point 0 ([-1, 127/128])
LITERT_FIXED_OUTPUT = {"Sigmoid": (0.0, 255 / 256), "Softmax": (0.0, 255 / 256), "Tanh": (-1.0, 127 / 128)}
L2_NORM_OUTPUT = (-1.0, 127 / 128)


def litert_fixed_outputs(model: onnx.ModelProto) -> dict[str, tuple[float, float]]:
    """{tensor: its fixed LiteRT range} for the network's Sigmoid, Softmax, Tanh and L2 normalization outputs (not
    the lab's wrapper's)."""
    nodes = [n for n in model.graph.node if not is_wrapper(n.name)]
    fixed = {n.output[0]: LITERT_FIXED_OUTPUT[n.op_type] for n in nodes if n.op_type in LITERT_FIXED_OUTPUT}
    units = op_units(GraphIndex(nodes), constant_arrays(model))
    return fixed | {u.output: L2_NORM_OUTPUT for u in units if isinstance(u, L2NormUnit)}
WEIGHT_AXIS = {"Conv": 0, "ConvTranspose": 1, "MatMul": 1, "Gemm": 1}  # the output-channel axis of each weight


@dataclass(frozen=True)
class ActivationSpec:
    """One quantized activation tensor."""

    tensor: str
    group: str  # the tensor whose range it takes (itself when it has its own): a tie group
    signed: bool  # INT8 (tensorrt, npu, npu-symmetric), or UINT8 (cpu)
    qmin: int  # the integer grid a range is mapped onto: -127..127 (symmetric), -128..127 or 0..255
    qmax: int
    symmetric: bool = True  # zero point 0 and a range symmetric about it, or a zero point that fits the range


@dataclass(frozen=True)
class WeightSpec:
    """One quantized weight (an initializer), always symmetric INT8 -127..127."""

    tensor: str
    node: str  # the node that reads it
    axis: int | None  # the per-channel axis, None for one scale per tensor


@dataclass(frozen=True)
class QuantSpec:
    """What a scheme quantizes in one FP32 graph, and how (see the module docstring)."""

    scheme: Scheme
    activations: dict[str, ActivationSpec]  # in graph order
    weights: dict[str, WeightSpec]
    float_bias: bool  # biases stay float (tensorrt, npu-symmetric) or are INT32 (npu, npu-per-tensor, cpu)
    float_tensors: tuple[str, ...]  # activations a quantizing op reads in float: fixes, small convs, the wrapper
    excluded_nodes: tuple[str, ...] = field(default=())  # nodes whose inputs are not quantized

    def groups(self) -> list[str]:
        """The tie groups (each needs one range), in graph order."""
        return list(dict.fromkeys(a.group for a in self.activations.values()))

    def members(self, group: str) -> list[str]:
        """The tensors of a tie group."""
        return [a.tensor for a in self.activations.values() if a.group == group]



def activation_qparams(spec: ActivationSpec, low: float, high: float) -> tuple[float, int]:
    """(scale, zero point) of a range on a spec's grid (ONNX Runtime's quantizer and LiteRT's do the same
    arithmetic: the range widened to include 0, the zero point the integer that 0.0 maps to). An empty range (a
    tensor that is always zero, such as a ReLU no input ever opens) takes step 1, as ONNX Runtime's quantizer
    gives it: a step near zero would make the next op's requantization factor huge (XNNPACK refuses such a
    graph)."""
    if spec.symmetric:
        amax = max(abs(low), abs(high))
        return (float(np.float32(amax / spec.qmax)) if amax > 0 else 1.0), 0
    low, high = min(low, 0.0), max(high, 0.0)
    scale = float(np.float32((high - low) / (spec.qmax - spec.qmin))) if high > low else 1.0
    return scale, int(np.clip(round(spec.qmin - low / scale), spec.qmin, spec.qmax))


def bias_int32(values: np.ndarray, input_step: float, weight_steps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """INT32 bias at step s_input x s_weight, zero point 0 (LiteRT's CONV_2D / DEPTHWISE_CONV_2D / TRANSPOSE_CONV
    bias, what an NPU adds into its INT32 accumulator), rounded half to even and clipped to the INT32 range.

    Returns:
        (INT32 values, float32 steps: one per value where the weight has one per channel, else a scalar).
    """
    steps = (np.float32(input_step) * np.asarray(weight_steps, np.float32)).astype(np.float32)
    if steps.ndim:
        steps = np.broadcast_to(steps, np.shape(values)).astype(np.float32)
    limit = np.iinfo(np.int32)
    return np.clip(np.rint(np.asarray(values, np.float64) / steps), limit.min, limit.max).astype(np.int32), steps


def weight_int8(values: np.ndarray, axis: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric INT8 of a weight: step max|w| / 127 per channel along `axis` (or one for the tensor), values
    rounded half to even and clipped to -127..127; an all-zero channel gets step 1.

    Returns:
        (INT8 values, float32 steps: a scalar, or one per channel).
    """
    values = np.asarray(values, np.float32)
    if axis is None:
        scale = np.array(max(float(np.abs(values).max(initial=0.0)), 1e-12) / 127.0, np.float32)
        shaped = scale
    else:
        reduce = tuple(d for d in range(values.ndim) if d != axis)
        scale = (np.abs(values).max(axis=reduce) / 127.0).astype(np.float32)
        scale[scale == 0] = 1.0
        shaped = scale.reshape([-1 if d == axis else 1 for d in range(values.ndim)])
    return np.clip(np.rint(values / shaped), -127, 127).astype(np.int8), scale


def exact_int8(value: float) -> tuple[int, np.float32]:
    """A float scalar as an INT8 level and step whose product is the value itself: +-64 at step |value| / 64 (a
    power of two apart), as a converter folds a scalar it knows (an HTP PReLU slope, a size-derived scale)."""
    return (64 if value >= 0 else -64), np.float32(abs(value) / 64)


def _constants(model: onnx.ModelProto) -> tuple[dict[str, np.ndarray], set[str]]:
    """(`constant_arrays`, `constant_names`)."""
    return constant_arrays(model), constant_names(model)


def constant_names(model: onnx.ModelProto) -> set[str]:
    """The names of every constant tensor of a graph: its initializers, every Constant's output (whatever its
    form) and the Identities of them (an exporter's shared parameter), read without loading a value."""
    constants = {init.name for init in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" or (node.op_type == "Identity" and node.input and node.input[0] in constants):
            constants.update(node.output)
    return constants


def constant_arrays(model: onnx.ModelProto | onnx.GraphProto) -> dict[str, np.ndarray]:
    """{name: value} of a graph's initializers, of its Constant nodes' outputs (the forms `constant_value` reads)
    and of the Identities of those (an exporter's shared parameter)."""
    graph = model.graph if isinstance(model, onnx.ModelProto) else model
    arrays = {init.name: onnx.numpy_helper.to_array(init) for init in graph.initializer}
    for node in graph.node:
        value = constant_value(node) if node.op_type == "Constant" else \
            arrays.get(node.input[0]) if node.op_type == "Identity" and node.input else None
        if value is not None:
            arrays[node.output[0]] = value
    return arrays


def constant_value(node: onnx.NodeProto) -> np.ndarray | None:
    """The value of a Constant node given as a tensor or as floats (None for the other forms)."""
    for attribute in node.attribute:
        if attribute.name == "value":
            return onnx.numpy_helper.to_array(attribute.t)
        if attribute.name == "value_float":
            return np.array(attribute.f, np.float32)
        if attribute.name == "value_floats":
            return np.array(attribute.floats, np.float32)
    return None


def is_wrapper(name: str) -> bool:
    """True for a node or tensor of the lab's wrapper (see the module docstring)."""
    return name.startswith(WRAPPER_PREFIX)


def float_activations(model: onnx.ModelProto) -> set[str]:
    """Tensors known to be float (not integer shape arithmetic or masks): those shape inference types FLOAT, and,
    where it says nothing, the outputs of nodes with a float non-constant input, in graph order (Shape and the
    index-valued ops make integers, Cast says what it makes)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False).graph
        typed = {v.name: v.type.tensor_type.elem_type for v in [*inferred.value_info, *inferred.input,
                                                                *inferred.output]}
    except Exception:  # inference is a help, not a requirement
        typed = {}
    floating = {i.name for i in model.graph.input if i.type.tensor_type.elem_type == onnx.TensorProto.FLOAT}
    for node in model.graph.node:
        floating.update(name for name in node.output if name and _makes_float(node, name, typed, floating))
    return floating


def _makes_float(node: onnx.NodeProto, name: str, typed: dict[str, int], floating: set[str]) -> bool:
    """Whether `node`'s output `name` is float: as shape inference types it, else as a Cast says, else when a
    value-computing node reads a float tensor."""
    if typed.get(name):
        return typed[name] == onnx.TensorProto.FLOAT
    if node.op_type == "Cast":
        return next((a.i for a in node.attribute if a.name == "to"), None) == onnx.TensorProto.FLOAT
    return node.op_type not in ("Shape", "Size", "NonZero", "ArgMax", "ArgMin") and \
        any(t in floating for t in node.input)


def quant_spec(model: onnx.ModelProto, scheme: Scheme | str, keep_float: Sequence[str] = (),
               per_tensor_weights: bool = False) -> QuantSpec:
    """What `scheme` quantizes in `model`.

    Args:
        model: the FP32 ONNX model (a shipped export, or a user's graph inside the lab's wrapper).
        scheme: the INT8 target.
        keep_float: activation tensors left unquantized (a fix).
        per_tensor_weights: one scale per weight tensor instead of one per output channel (npu only: some NPUs
            have no per-channel weights).

    Returns:
        the QuantSpec.

    Raises:
        ValueError: per-tensor weights asked for a scheme other than npu.
    """
    scheme = Scheme.parse(scheme)
    if per_tensor_weights and scheme not in (Scheme.NPU, Scheme.NPU_SYMMETRIC):
        raise ValueError("per-tensor weights are an option of the npu schemes only")
    per_tensor_weights = per_tensor_weights or scheme is Scheme.NPU_PER_TENSOR
    graph = _GraphFacts.of(model)
    quantized: list[str] = []
    weights: dict[str, WeightSpec] = {}
    excluded, floated = [], []
    # the cpu writer (ONNX Runtime's quantizer) keeps a tensor in float by excluding every node that touches it,
    # so those nodes quantize nothing else either (a Conv reading a float tensor leaves its output in float)
    touching = set(keep_float) if scheme.by_onnxruntime else set()
    for node in graph.user_nodes:
        placed = _tensorrt_inputs(graph, node) if scheme is Scheme.TENSORRT else \
            _all_int8_tensors(graph, node, scheme, excluded)
        if placed is not None and touching & (set(node.input) | set(node.output)):
            excluded.append(node.name)
            continue
        if placed is None:  # a Conv TensorRT has no INT8 kernel for: left in float
            excluded.append(node.name)
            floated.extend(t for t in node.input[:1] if graph.activation(t))
            continue
        quantized.extend(placed)
        if scheme.litert:
            for name, axis in ([] if node.name in graph.units else _litert_constants(graph, node)):
                weights[name] = WeightSpec(name, node.name, None if per_tensor_weights else axis)
            continue
        weight = graph.arrays.get(node.input[1]) if len(node.input) > 1 else None
        weighted = node.op_type in WEIGHT_AXIS if scheme is Scheme.TENSORRT else node.op_type == "Conv"
        if weighted and weight is not None and weight.dtype == np.float32:
            axis = 0 if node.op_type == "Gemm" and any(a.name == "transB" and a.i for a in node.attribute) \
                else WEIGHT_AXIS[node.op_type]
            weights[node.input[1]] = WeightSpec(node.input[1], node.name, None if per_tensor_weights else axis)
    ordered = list(dict.fromkeys(quantized))
    floated += [t for t in ordered if t in set(keep_float)]
    ordered = [t for t in ordered if t not in set(keep_float)]
    ties = {} if scheme is Scheme.TENSORRT else fused_ties(model, set(ordered), litert=scheme.litert)
    qmin, qmax = (-127, 127) if scheme.symmetric else (0, 255) if scheme.by_onnxruntime else (-128, 127)
    signed = not scheme.by_onnxruntime
    activations = {t: ActivationSpec(t, ties.get(t, t), signed, qmin, qmax, scheme.symmetric) for t in ordered}
    return QuantSpec(scheme, activations, weights, not scheme.int32_bias, tuple(dict.fromkeys(floated)),
                     tuple(excluded))


@dataclass(frozen=True)
class _GraphFacts:
    """What the placement rules look up in a graph."""

    arrays: dict[str, np.ndarray]  # initializers
    constants: set[str]
    floating: set[str]  # float activations (not shape arithmetic)
    user_nodes: list  # every node but the lab's wrapper
    producers: dict  # tensor -> its producer among the user's nodes
    inputs: set[str]  # what the user's own graph takes (the graph inputs, or what the wrapper feeds it)
    units: dict[str, GeluUnit | L2NormUnit]  # node name -> the erf GELU or L2 norm it is in (one op to LiteRT, QNN)

    @classmethod
    def of(cls, model: onnx.ModelProto) -> "_GraphFacts":
        arrays, constants = _constants(model)
        user_nodes = [n for n in model.graph.node if not is_wrapper(n.name)]
        wrapper_outputs = {o for n in model.graph.node if is_wrapper(n.name) for o in n.output}
        inputs = {i.name for i in model.graph.input} | {t for n in user_nodes for t in n.input if t in wrapper_outputs}
        index = GraphIndex(user_nodes)
        units = {name: unit for unit in op_units(index, arrays) for name in unit.nodes}
        return cls(arrays, constants, float_activations(model), user_nodes, index.producers, inputs, units)

    def activation(self, name: str) -> bool:
        """True for a float activation of the user's graph (not a constant, not the wrapper's)."""
        return bool(name) and name not in self.constants and name in self.floating and not is_wrapper(name)


def _tensorrt_inputs(graph: _GraphFacts, node: onnx.NodeProto) -> list[str] | None:
    """The tensors ModelOpt's placement quantizes at `node` (its activation inputs), or None for a Conv left in
    float."""
    if node.op_type not in TENSORRT_INPUT_OPS:
        return []
    weight = graph.arrays.get(node.input[1]) if len(node.input) > 1 else None
    if node.op_type == "Conv" and conv_too_small(node, weight, graph.inputs):
        return None
    if node.op_type == "Add" and any(t in graph.constants for t in node.input):
        return []  # a bias or an offset: TensorRT folds it, ModelOpt puts no Q/DQ there
    inputs = list(node.input) if node.op_type in ("Add", "MatMul") else list(node.input[:1])
    if node.op_type == "Add":
        fused = non_residual_input(node, graph.producers, graph.constants)
        inputs = [t for t in inputs if t != fused]
    return [t for t in inputs if graph.activation(t)]


def _all_int8_tensors(graph: _GraphFacts, node: onnx.NodeProto, scheme: Scheme,
                      excluded: Sequence[str] = ()) -> list[str]:
    """The tensors the npu / cpu placement quantizes at `node`: its inputs and outputs for the covered ops
    (`excluded`: the nodes left out so far, whose outputs the cpu writer does not quantize)."""
    if node.name in graph.units and not scheme.litert:  # (an L2 norm's Clip is no activation's: none of it)
        return []
    if node.name in graph.units:  # one op: its input and output, after its last node
        unit = graph.units[node.name]
        return [t for t in (unit.input, unit.output) if graph.activation(t)] if node.name == unit.nodes[-1] else []
    if node.op_type not in (LITERT_OPS if scheme.litert else ALL_INT8_OPS):
        return []
    producer = graph.producers.get(node.input[0])
    if scheme is Scheme.CPU and node.op_type in ("Relu", "Clip") and (
            getattr(producer, "op_type", None) not in ALL_INT8_OPS or producer.name in excluded):
        return []  # ONNX Runtime's writer quantizes an activation only as part of a quantized op before it
    inputs = list(node.input) if node.op_type in LITERT_TWO_INPUTS else list(node.input[:1])
    return [t for t in [*inputs, *node.output] if graph.activation(t)]


def _litert_constants(graph: "_GraphFacts", node: onnx.NodeProto) -> list[tuple[str, int | None]]:
    """The float constants LiteRT's specification quantizes at `node` as weights, with their per-channel axis:
    a Conv / ConvTranspose / MatMul weight per output channel, an element-wise operand (a Mul's factor, an Add's
    or Sub's offset, a PRelu slope) and a LayerNormalization's scale and bias per tensor."""
    def constant(position: int) -> bool:
        name = node.input[position] if position < len(node.input) else ""
        return name in graph.arrays and graph.arrays[name].dtype == np.float32

    if node.op_type in ("Conv", "ConvTranspose", "MatMul"):
        return [(node.input[1], WEIGHT_AXIS[node.op_type])] if constant(1) else []
    if node.op_type in ("Add", "Sub", "Mul", "PRelu", "LayerNormalization"):
        return [(node.input[k], None) for k in range(len(node.input)) if constant(k)]
    return []



def fused_ties(model: onnx.ModelProto, quantized: set[str], litert: bool = False) -> dict[str, str]:
    """A Conv output that feeds only a ReLU/Clip (possibly through a DepthToSpace or a channel Slice, pure data
    movement) takes the activation's output range: the fused unit quantizes once, after the activation; a
    DepthToSpace output keeps its input's grid (data movement cannot change a scale). With `litert` (LiteRT's
    specification), so does the output of every op the specification holds to its input's scale and zero point
    (`LITERT_SAME_SCALE`: pooling, resizing, padding, reshapes), and every quantized input of a Concat takes the
    Concat output's range ("CONCATENATION ... restriction: input and outputs must all have same scale/zero
    point"), and so does whatever was tied to that input.

    Returns:
        {tensor: the tensor whose range it takes}, each chain followed to its end.
    """
    index = GraphIndex(model)
    consumers, producer = index.consumers, index.producers
    ties = {}
    # LiteRT's fixed output grids (Sigmoid, Softmax, Tanh, L2 normalization) are never moved onto another tensor's
    pinned = set(litert_fixed_outputs(model)) if litert else set()
    # ops whose output keeps a grid of its own (fixed, or its input's): a ReLU after one requantizes
    own_grid = (*LITERT_FIXED_OUTPUT, *(set(LITERT_SAME_SCALE) - {"DepthToSpace", "Slice"})) if litert else ()
    for node in model.graph.node:
        if node.op_type in ("Relu", "Clip") and node.output[0] in quantized:
            ties.update(_fused_unit(node, quantized, consumers, producer, own_grid))
    same_scale = LITERT_SAME_SCALE if litert else ("DepthToSpace",)
    for node in model.graph.node:  # data movement not followed by an activation: its output on its input's grid
        if node.op_type in same_scale and node.input[0] in quantized:
            root = _tie_root(ties, node.input[0])
            for output in node.output:
                if output in quantized and output not in ties and root != output and output not in pinned:
                    ties[output] = root
    concats = [n for n in model.graph.node if n.op_type == "Concat" and n.output[0] in quantized] if litert else []
    for node in concats:
        roots = [_tie_root(ties, t) for t in [node.output[0], *node.input] if t in quantized]
        target = next((r for r in roots if r in pinned), roots[0])  # a fixed grid, if any, is the Concat's
        ties.update({root: target for root in roots if root != target and root not in pinned})
    return {tensor: _tie_root(ties, tensor) for tensor in ties}


def _fused_unit(activation: onnx.NodeProto, quantized: set[str], consumers: dict, producer: dict,
                own_grid: tuple[str, ...]) -> dict[str, str]:
    """{tensor: the activation's output} for the Conv output a ReLU/Clip fuses with, walking up through a
    DepthToSpace or a channel Slice; an op that keeps its own grid stops the walk (the ReLU requantizes after
    it)."""
    ties, tensor = {}, activation.input[0]
    while tensor in quantized and len(consumers.get(tensor, [])) == 1 and tensor in producer:
        if producer[tensor].op_type in own_grid:
            break
        ties[tensor] = activation.output[0]
        if producer[tensor].op_type not in ("DepthToSpace", "Slice"):
            break
        tensor = producer[tensor].input[0]
    return ties


def _tie_root(ties: dict[str, str], tensor: str) -> str:
    """The end of `tensor`'s chain of ties (itself when it is tied to nothing)."""
    seen = {tensor}
    while tensor in ties and ties[tensor] not in seen:
        tensor = ties[tensor]
        seen.add(tensor)
    return tensor


def used_names(nodes) -> set[str]:
    """Every tensor name the nodes read, their subgraphs' reads included (an If / Loop body may read an outer
    initializer by name)."""
    found = set()
    for node in nodes:
        found.update(node.input)
        for attribute in node.attribute:
            for sub in ([attribute.g] if attribute.HasField("g") else []) + list(attribute.graphs):
                found |= used_names(sub.node)
    return found


__all__ = ["exact_int8", "litert_fixed_outputs", "L2_NORM_OUTPUT", "used_names", "weight_int8", "bias_int32", "constant_arrays", "constant_names", "LITERT_FIXED_OUTPUT", "constant_value", "Scheme", "QuantSpec", "ActivationSpec", "WeightSpec", "quant_spec", "activation_qparams",
           "is_wrapper", "WRAPPER_PREFIX"]
