"""What running a graph costs, known from the graph alone, before anything runs; fail-closed: a graph whose cost
cannot be counted is refused, not guessed.

Counted: every op that multiplies (Conv, ConvTranspose, MatMul, Gemm, Einsum, pooling windows), each by its
multiply-accumulates at a probe input size; every tensor's size (the largest, per input pixel: what memory a run
needs grows with it); the output's scale against the input. Refused (`Uncountable`, in words): control flow
(Loop, Scan, If: their cost depends on values), an op this module has no cost for (anything outside the standard
domain's list below), and any tensor whose shape shape inference cannot know at the probe size (a size read from
the input's values at run time, say).

Example:
    >>> cost = graph_cost(onnx.load("model.onnx"))
    >>> cost.macs_per_pixel / 1e6, cost.output_scale
    (0.36, 3.0)
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import onnx

PROBE_SIDE = 32  # the input's unknown spatial sides are set to this (a multiple of the usual window sizes)
MULTIPLYING = ("Conv", "ConvTranspose", "MatMul", "Gemm", "Einsum", "AveragePool", "MaxPool", "LpPool")
CONTROL_FLOW = ("Loop", "Scan", "If", "SequenceMap")
# ops whose work is a small constant per output element (elementwise, data movement, normalization, shape
# arithmetic): their cost is the tensors they make, bounded through `largest_tensor_per_pixel`
CHEAP = frozenset("""
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh BatchNormalization BitShift Cast CastLike Ceil Celu Clip
Concat Constant ConstantOfShape Cos Cosh CumSum DepthToSpace DequantizeLinear Div Dropout Elu Equal Erf Exp Expand
EyeLike Flatten Floor Gather GatherElements GatherND Gelu GlobalAveragePool GlobalLpPool GlobalMaxPool Greater
GreaterOrEqual GroupNormalization HardSigmoid HardSwish Hardmax Identity InstanceNormalization IsInf IsNaN
LayerNormalization LeakyRelu Less LessOrEqual Log LogSoftmax LpNormalization Max Mean MeanVarianceNormalization Min
Mish Mod Mul Neg Not Or PRelu Pad Pow QuantizeLinear Range Reciprocal ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp
ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu Reshape Resize Round Selu Shape Shrink
Sigmoid Sign Sin Sinh Size Slice Softmax Softplus Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh
ThresholdedRelu Tile Transpose Trilu Unsqueeze Upsample Where Xor
""".split())
STANDARD = ("", "ai.onnx")


class Uncountable(ValueError):
    """The graph's cost cannot be known before it runs (the message says why, in words)."""


@dataclass(frozen=True)
class GraphCost:
    """A graph's cost at its probe size.

    Attributes:
        macs_per_pixel: multiply-accumulates per input pixel.
        largest_tensor_per_pixel: elements of its largest tensor per input pixel.
        output_scale: the output's side over the input's (the root of their pixel counts' ratio).
        largest_tensor: that tensor's name.
    """

    macs_per_pixel: float
    largest_tensor_per_pixel: float
    output_scale: float
    largest_tensor: str


def graph_cost(model: onnx.ModelProto, side: int = PROBE_SIDE) -> GraphCost:
    """Count a one-image NCHW or NHWC model's cost at an input of `side` x `side` pixels (its own size when fixed).

    Raises:
        Uncountable: control flow, an op without a known cost, or a tensor whose shape is not known before
            running; the message names it.
    """
    _refuse_unknown_ops(model)
    probe, pixels = _probe(model, side)
    probe, shapes = _folded(probe)
    macs, largest, name = 0, 0, ""
    for node in probe.graph.node:
        for output in filter(None, node.output):
            shape = shapes.get(output)
            if shape is None:
                raise Uncountable(f"the size of `{output}` ({node.op_type}) is known only at run time")
            if int(np.prod(shape)) > largest:
                largest, name = int(np.prod(shape)), output
        macs += _macs(node, shapes)
    source, result = shapes.get(probe.graph.input[0].name), shapes.get(probe.graph.output[0].name)
    scale = float(np.sqrt(np.prod(result) / np.prod(source))) if source and result and np.prod(source) else 0.0
    return GraphCost(macs / pixels, largest / pixels, scale, name)


def _inferred(probe: onnx.ModelProto, strict: bool) -> dict[str, list[int] | None]:
    """Every tensor's shape as shape inference knows it (None where a dimension is unknown)."""
    try:
        graph = onnx.shape_inference.infer_shapes(probe, strict_mode=strict, data_prop=True).graph
    except Exception as error:  # noqa: BLE001 (onnx raises its own InferenceError and others)
        raise Uncountable(f"its shapes cannot be worked out before running ({type(error).__name__})") from None
    shapes = {v.name: _known(v) for v in [*graph.value_info, *graph.input, *graph.output]}
    shapes.update({init.name: list(init.dims) for init in probe.graph.initializer})
    return shapes


def _folded(probe: onnx.ModelProto, rounds: int = 8) -> tuple[onnx.ModelProto, dict]:
    """The probe with its shape arithmetic done (sizes computed from the input's shape and constants, as exporters
    write them for padding and reshapes: Shape, Gather, Concat, Tile, ...), and every tensor's shape. Only small
    integer-and-constant work is done, never anything on the image's values."""
    for _ in range(rounds):
        shapes = _inferred(probe, strict=False)
        values = _small_constants(probe)
        for node in probe.graph.node:
            value = _fold(node, values, shapes)
            if value is not None:
                values[node.output[0]] = value
        folded = {node.output[0] for node in probe.graph.node
                  if len(node.output) == 1 and node.output[0] in values and node.op_type != "Constant"}
        if not folded:
            return probe, _inferred(probe, strict=True)
        kept = [node for node in probe.graph.node if not (len(node.output) == 1 and node.output[0] in folded)]
        del probe.graph.node[:]
        probe.graph.node.extend(kept)
        probe.graph.initializer.extend(onnx.numpy_helper.from_array(values[name], name) for name in sorted(folded))
    return probe, _inferred(probe, strict=True)


SMALL = 4096  # the most elements a folded shape-arithmetic value may have
FOLDABLE = frozenset("""
Abs Add Cast Ceil Concat ConstantOfShape Div Equal Expand Floor Gather Greater Identity Less Max Min Mod Mul Neg
Range ReduceProd Reshape Shape Size Slice Squeeze Sub Tile Transpose Unsqueeze Where
""".split())


def _small_constants(probe: onnx.ModelProto) -> dict[str, np.ndarray]:
    values = {init.name: onnx.numpy_helper.to_array(init) for init in probe.graph.initializer
              if int(np.prod(init.dims)) <= SMALL}
    for node in probe.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            value = onnx.numpy_helper.to_array(node.attribute[0].t)
            if value.size <= SMALL:
                values[node.output[0]] = value
    return values


def _fold(node: onnx.NodeProto, values: dict, shapes: dict) -> np.ndarray | None:
    """The value of one shape-arithmetic node whose inputs are all known and small, or None."""
    if node.op_type not in FOLDABLE or len(node.output) != 1 or node.output[0] in values:
        return None
    if node.op_type in ("Shape", "Size"):
        shape = shapes.get(node.input[0])
        if shape is None:
            return None
        if node.op_type == "Size":
            return np.array(int(np.prod(shape)), np.int64)
        start = next((a.i for a in node.attribute if a.name == "start"), 0)
        end = next((a.i for a in node.attribute if a.name == "end"), len(shape))
        return np.array(shape[start:end], np.int64)
    inputs = [values.get(name) for name in node.input]
    if any(value is None for name, value in zip(node.input, inputs) if name):
        return None
    if _would_be(node, inputs) > SMALL:
        return None
    from onnx.reference import ReferenceEvaluator

    try:
        value = ReferenceEvaluator(node).run(None, {n: v for n, v in zip(node.input, inputs) if n})[0]
    except Exception:  # noqa: BLE001 (left unfolded: shape inference decides)
        return None
    value = np.asarray(value)
    return value if value.size <= SMALL else None


def _would_be(node: onnx.NodeProto, inputs: list) -> float:
    """How many elements a node that makes a tensor from a size would make, before making it."""
    if node.op_type == "ConstantOfShape":
        return float(np.prod(inputs[0].astype(np.float64)))
    if node.op_type == "Expand":
        return float(np.prod(np.maximum(inputs[1].astype(np.float64), 1))) * max(1, inputs[0].size)
    if node.op_type == "Tile":
        return float(inputs[0].size * np.prod(inputs[1].astype(np.float64)))
    if node.op_type == "Range":
        start, limit, delta = (float(v) for v in inputs)
        return abs((limit - start) / delta) if delta else float("inf")
    return 0.0


def _refuse_unknown_ops(model: onnx.ModelProto) -> None:
    for node in model.graph.node:
        if node.op_type in CONTROL_FLOW or any(a.HasField("g") or len(a.graphs) for a in node.attribute):
            raise Uncountable(f"it uses {node.op_type} (control flow): its cost depends on values known only at "
                              "run time")
        if node.domain not in STANDARD or node.op_type not in (*MULTIPLYING, *CHEAP):
            domain = f" from {node.domain}" if node.domain not in STANDARD else ""
            raise Uncountable(f"it uses {node.op_type}{domain}, an op whose cost this server cannot count")


def _probe(model: onnx.ModelProto, side: int) -> tuple[onnx.ModelProto, int]:
    """A copy of `model` with its input's batch set to 1 and its unknown sides to `side`; its input pixels."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    initializers = {init.name for init in probe.graph.initializer}
    source = next(i for i in probe.graph.input if i.name not in initializers)
    if source is not probe.graph.input[0]:
        probe.graph.input.remove(source)
        probe.graph.input.insert(0, source)
    dims = probe.graph.input[0].type.tensor_type.shape.dim
    if len(dims) != 4:
        raise Uncountable(f"its input has rank {len(dims)}, not 4 (one image)")
    values = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in dims]
    channels_last = values[1] not in (1, 3) and values[3] in (1, 3)
    spatial = (1, 2) if channels_last else (2, 3)
    for axis, dim in enumerate(dims):
        dim.ClearField("dim_param")
        dim.dim_value = 1 if axis == 0 else (values[axis] or (side if axis in spatial else 3))
    return probe, dims[spatial[0]].dim_value * dims[spatial[1]].dim_value


def _known(value: onnx.ValueInfoProto) -> list[int] | None:
    """A tensor's shape when every dimension is a number, else None."""
    if not value.type.tensor_type.HasField("shape"):
        return None
    dims = value.type.tensor_type.shape.dim
    return [d.dim_value for d in dims] if all(d.HasField("dim_value") for d in dims) else None


def _macs(node: onnx.NodeProto, shapes: dict) -> int:
    """The multiply-accumulates of one node (0 for the cheap ops)."""
    ins = [shapes.get(name) for name in node.input]
    out = shapes.get(node.output[0]) if node.output else None
    if node.op_type == "Conv":
        return int(np.prod(out[1:])) * int(np.prod(ins[1][1:]))
    if node.op_type == "ConvTranspose":
        return int(np.prod(ins[0][1:])) * int(np.prod(ins[1][1:]))
    if node.op_type in ("MatMul", "Gemm"):
        transposed = node.op_type == "Gemm" and any(a.name == "transA" and a.i for a in node.attribute)
        inner = ins[0][-2] if transposed else ins[0][-1]
        return int(np.prod(out)) * int(inner)
    if node.op_type == "Einsum":
        return _einsum_macs(node, ins)
    if node.op_type in ("AveragePool", "MaxPool", "LpPool"):
        kernel = next((list(a.ints) for a in node.attribute if a.name == "kernel_shape"), [1])
        return int(np.prod(out)) * int(np.prod(kernel))
    return 0


def _einsum_macs(node: onnx.NodeProto, ins: list) -> int:
    """An Einsum's work: the product of the sizes of every index it names (each combination is one multiply)."""
    equation = next(a.s.decode() for a in node.attribute if a.name == "equation").replace(" ", "")
    terms = equation.split("->")[0].split(",")
    if "..." in equation or len(terms) != len(ins):
        raise Uncountable("it uses an Einsum with an ellipsis or an odd equation, whose cost this server cannot count")
    sizes = {}
    for term, shape in zip(terms, ins):
        sizes.update(zip(re.findall(r"[a-zA-Z]", term), shape))
    return int(np.prod(list(sizes.values())))


@dataclass(frozen=True)
class CostLimits:
    """The most a graph may cost to be run (a server's policy; the CLI sets none).

    Attributes:
        macs_per_pixel: multiply-accumulates per input pixel.
        tensor_per_pixel: elements of any one tensor per input pixel.
        scale: the output's side over the input's.
    """

    macs_per_pixel: float
    tensor_per_pixel: float
    scale: float


class TooCostly(ValueError):
    """A graph costs more than the limits allow (the message says what and by how much)."""


def check_cost(model: onnx.ModelProto, limits: CostLimits) -> GraphCost:
    """The graph's cost, when it is countable and within `limits`.

    Raises:
        Uncountable: see `graph_cost`.
        TooCostly: over a limit.
    """
    cost = graph_cost(model)
    if cost.macs_per_pixel > limits.macs_per_pixel:
        raise TooCostly(f"it needs {cost.macs_per_pixel / 1e6:.1f} million multiply-accumulates per input pixel, "
                        f"more than the {limits.macs_per_pixel / 1e6:.1f} million allowed")
    if cost.largest_tensor_per_pixel > limits.tensor_per_pixel:
        raise TooCostly(f"its tensor `{cost.largest_tensor}` holds {cost.largest_tensor_per_pixel:.0f} values per "
                        f"input pixel, more than the {limits.tensor_per_pixel:.0f} allowed")
    if cost.output_scale > limits.scale + 1e-6:
        raise TooCostly(f"it enlarges its input {cost.output_scale:.1f} times a side, more than the x"
                        f"{limits.scale:.0f} allowed")
    return cost
