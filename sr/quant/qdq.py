"""QDQ INT8 models from calibration ranges, written as the one description of what is quantized (`sr.quant.quantspec`)
says, and read back to check it.

The lab's schemes (`tensorrt`, `npu`, `npu-per-tensor`, `npu-symmetric`) are written here, Q/DQ pair by Q/DQ
pair, exactly as the spec says (INT32 biases where it says so); the `cpu` scheme (asymmetric UINT8, INT32 biases, ORT's fast x86 kernels) is written by
`onnxruntime.quantization.quantize_static`, fed our ranges through its calibration cache. Every written model is
read back (`sr.quant.readback.graph_quantization`) and must quantize what its spec says, or the writer raises. Also
here: the surgery that takes quantization off chosen tensors (the diagnosis) and the ranges tied by fused ops.
Nothing here calibrates or caches (that is `sr.run.quantize`).
"""
from __future__ import annotations

import contextlib

import logging
import os
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx
from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.calibrate import TensorData, TensorsData, save_tensors_data

from .searches import TensorRange
from .quantspec import (ALL_INT8_OPS, QuantSpec, Scheme, activation_qparams, bias_int32, constant_arrays, fused_ties, is_wrapper,
                        quant_spec, used_names, weight_int8)
from .readback import fp32_initializer_of, graph_quantization
from ..graph import GraphIndex
from .rewrite import REWRITE_OPS, rewrite_for_fast_int8
from ..store import (write_atomic)


log = logging.getLogger(__name__)

QUANTIZED_OPS = list(ALL_INT8_OPS)  # the op types the all-INT8 placements cover (others stay float)


class _QuietQuantizer(logging.Filter):
    """onnxruntime.quantization logs advice and notes on the *root* logger ("Please consider pre-processing",
    "Created a copy of bias input ...") for every model; below ERROR they are noise here. Dropped by their
    source file, only while the lab's own call runs (`_quiet`): no logger level is ever changed."""

    def filter(self, record: logging.LogRecord) -> bool:
        source = record.pathname.replace(os.sep, "/")
        return record.levelno >= logging.ERROR or "onnxruntime/quantization" not in source


@contextlib.contextmanager
def _quiet():
    """The root logger without onnxruntime.quantization's notes, for the duration of one call."""
    quiet = _QuietQuantizer()
    logging.getLogger().addFilter(quiet)
    try:
        yield
    finally:
        logging.getLogger().removeFilter(quiet)


def tie_fused_ranges(spec: QuantSpec, ranges: dict[str, TensorRange]) -> dict[str, TensorRange]:
    """The range each quantized tensor is written with: its tie group's (`QuantSpec.activations[t].group`).

    Args:
        spec: what is quantized.
        ranges: the calibrated ranges (one per calibrated tensor).

    Returns:
        {quantized tensor: its range}, in the spec's order.
    """
    return {tensor: _tied(tensor, ranges[a.group], ranges.get(tensor, ranges[a.group]))
            for tensor, a in spec.activations.items()}


def _tied(tensor: str, source: TensorRange, own: TensorRange) -> TensorRange:
    """`tensor`'s range taken from `source` (its tie group), its own observations kept."""
    return TensorRange(tensor, source.low, source.high, own.observed_min, own.observed_max, own.clipped_fraction,
                       source.method)


def spec_of(fp32: Path | onnx.ModelProto, scheme: Scheme | str, keep_float: Sequence[str] = (),
            per_tensor_weights: bool = False) -> QuantSpec:
    """`sr.quant.quantspec.quant_spec` of an FP32 model file or graph."""
    model = fp32 if isinstance(fp32, onnx.ModelProto) else onnx.load(str(fp32), load_external_data=False)
    return quant_spec(model, scheme, keep_float, per_tensor_weights)


def write_qdq_model(fp32_onnx: Path, ranges: dict[str, TensorRange], scheme: Scheme, out: Path,
                    keep_float: Sequence[str] = ()) -> Path:
    """Write the QDQ model of `fp32_onnx` that its spec describes, with our ranges (the cpu scheme's graph first
    rewritten by `sr.quant.rewrite`: every Conv on ORT's fast INT8 kernel, the same outputs).

    Args:
        fp32_onnx: the FP32 model.
        ranges: one range per calibrated activation tensor (the spec's tie groups need theirs).
        scheme: the INT8 scheme.
        out: where to write the QDQ model (atomically).
        keep_float: tensors that get no QDQ pair.

    Returns:
        `out`.

    Raises:
        RuntimeError: the written model does not quantize what the spec says (a writer bug: nothing is written).
    """
    return _write_qdq_model(fp32_onnx, ranges, scheme, out, keep_float, rewrite=True)


def write_unrewritten_cpu_model(fp32_onnx: Path, ranges: dict[str, TensorRange], out: Path) -> Path:
    """The cpu scheme's QDQ model of the graph as it is, without `sr.quant.rewrite`: what the rewrite is measured
    against (its speed in `bench`, its outputs in the tests)."""
    return _write_qdq_model(fp32_onnx, ranges, Scheme.CPU, out, (), rewrite=False)


def _write_qdq_model(fp32_onnx: Path, ranges: dict[str, TensorRange], scheme: Scheme, out: Path,
                     keep_float: Sequence[str], rewrite: bool) -> Path:
    scheme = Scheme.parse(scheme)
    model = onnx.load(str(fp32_onnx))
    spec = quant_spec(model, scheme, keep_float)  # (npu-per-tensor is a scheme of its own)
    missing = [g for g in spec.groups() if g not in ranges]
    if missing:
        raise ValueError(f"no calibrated range for {', '.join(missing)}")
    if not scheme.by_onnxruntime:
        written = insert_qdq(model, spec, ranges)
    else:
        written = _ort_qdq(model, spec, ranges, keep_float, rewrite)
    check_against_spec(written, model, spec)
    write_atomic(written.SerializeToString(), out)
    return out


def check_against_spec(qdq: onnx.ModelProto, fp32: onnx.ModelProto, spec: QuantSpec) -> None:
    """Raise unless a QDQ model quantizes exactly the spec's activations and weights, the weights' per-channel axes
    included, for every scheme (for the cpu scheme, whose writer folds ReLU/Clip into the Conv before it, a spec
    activation the written graph no longer has is allowed).

    Raises:
        RuntimeError: naming the tensors that differ.
    """
    found = graph_quantization(qdq, fp32)
    present = {name for node in qdq.graph.node for name in node.output} | {i.name for i in qdq.graph.input}
    fp32_tensors = {name for node in fp32.graph.node for name in node.output} | {i.name for i in fp32.graph.input}
    written = {t for t in found.activations if t in fp32_tensors}
    ours = not spec.scheme.by_onnxruntime
    wanted = set(spec.activations) if ours else {t for t in spec.activations if t in present}
    extra, lacking = sorted(written - wanted), sorted(wanted - written)
    weights_differ = sorted(set(found.weights) ^ set(spec.weights)) + [  # every scheme: which, and on which axis
        w for w, axis in found.weights.items() if w in spec.weights and axis != spec.weights[w].axis]
    zero_points = [t for t, (_, zero) in found.activations.items() if t in spec.activations
                   and spec.activations[t].symmetric and zero != 0] if ours else []
    if extra or lacking or weights_differ or zero_points:
        raise RuntimeError(f"the QDQ model does not match its spec: quantized but not in the spec {extra}, "
                           f"in the spec but not quantized {lacking}, weights differing {weights_differ}, "
                           f"symmetric with a zero point {zero_points}")


def insert_qdq(model: onnx.ModelProto, spec: QuantSpec, ranges: dict[str, TensorRange]) -> onnx.ModelProto:
    """A copy of `model` with a QuantizeLinear/DequantizeLinear pair on each activation of the spec, INT8 weights
    (an INT8 initializer and a DequantizeLinear), biases float or, where the spec says (`QuantSpec.float_bias`
    False), INT32 at step s_input x s_weight (`_bias_dequantizer`).

    Args:
        model: the FP32 model.
        spec: a spec of it of one of the lab's own schemes (not cpu).
        ranges: the calibrated ranges (each tie group's range is used for all its members).

    Returns:
        the QDQ model (opset >= 13: per-channel DequantizeLinear).
    """
    result = onnx.ModelProto()
    result.CopyFrom(model)
    graph = result.graph
    _constants_as_initializers(graph, set(spec.weights))
    outputs, arrays = {o.name for o in graph.output}, {i.name: i for i in graph.initializer}
    added_inits, weight_nodes, after = [], [], {}
    producer_index = {name: index for index, node in enumerate(graph.node) for name in node.output}
    rename: dict[str, str] = {}  # tensor -> what its consumers read now
    for tensor, activation in spec.activations.items():
        source, target = tensor, f"{tensor}_dequantized"
        if tensor in outputs:  # the graph output keeps its name: the producer's result is renamed instead
            source, target = f"{tensor}_float", tensor
            producer = graph.node[producer_index[tensor]]
            producer.output[list(producer.output).index(tensor)] = source
        else:
            rename[tensor] = target
        inits, pair = _activation_pair(tensor, activation, ranges[activation.group].low,
                                       ranges[activation.group].high, source, target)
        added_inits += inits
        after.setdefault(producer_index.get(tensor, -1), []).extend(pair)
    readers = {node.name: node for node in graph.node}
    for name, weight in spec.weights.items():
        inits, node = _weight_dequantizer(name, values := onnx.numpy_helper.to_array(arrays[name]), weight.axis)
        added_inits += inits
        weight_nodes.append(node)
        rename[name] = node.output[0]
        bias = _int32_bias(spec, readers.get(weight.node), arrays, ranges, values, weight.axis, rename)
        if bias is not None:
            added_inits += bias[0]
            weight_nodes.append(bias[1])
            rename[bias[1].input[0].removesuffix("_quantized")] = bias[1].output[0]
    rebuilt = weight_nodes + after.get(-1, [])
    for index, node in enumerate(graph.node):
        for position, name in enumerate(node.input):
            node.input[position] = rename.get(name, name)
        rebuilt.append(node)
        rebuilt.extend(after.get(index, []))
    used = used_names(rebuilt)
    kept = [i for i in graph.initializer if i.name in used]
    del graph.node[:]
    graph.node.extend(rebuilt)
    del graph.initializer[:]
    graph.initializer.extend(kept + added_inits)
    for opset in result.opset_import:
        if opset.domain in ("", "ai.onnx") and opset.version < 13:
            opset.version = 13
    return result


def _constants_as_initializers(graph: onnx.GraphProto, names: set[str]) -> None:
    """Constant nodes (and Identities of an initializer) whose output is a weight of the spec (an operand LiteRT
    quantizes) made initializers, so that the weight is written like any other."""
    kept, values = [], constant_arrays(graph)  # (an Identity of a Constant, or of another Identity, included)
    for node in graph.node:
        value = values.get(node.output[0]) if node.op_type in ("Constant", "Identity") and node.output[0] in names \
            else None
        if value is None:
            kept.append(node)
        else:
            graph.initializer.append(onnx.numpy_helper.from_array(value, node.output[0]))
    if len(kept) < len(graph.node):
        del graph.node[:]
        graph.node.extend(kept)


def _activation_pair(tensor: str, activation, low: float, high: float, source: str, target: str):
    """(initializers, [QuantizeLinear, DequantizeLinear]) of one activation: `source` in, `target` out."""
    from onnx import TensorProto, helper, numpy_helper

    scale, zero = activation_qparams(activation, low, high)
    dtype = TensorProto.INT8 if activation.signed else TensorProto.UINT8
    inits = [numpy_helper.from_array(np.array(scale, np.float32), f"{tensor}_scale"),
             helper.make_tensor(f"{tensor}_zero_point", dtype, [], [zero])]
    pair = [helper.make_node("QuantizeLinear", [source, f"{tensor}_scale", f"{tensor}_zero_point"],
                             [f"{tensor}_quantized"], name=f"{tensor}_QuantizeLinear"),
            helper.make_node("DequantizeLinear", [f"{tensor}_quantized", f"{tensor}_scale", f"{tensor}_zero_point"],
                             [target], name=f"{tensor}_DequantizeLinear")]
    return inits, pair


def _weight_dequantizer(name: str, values: np.ndarray, axis: int | None):
    """(initializers, DequantizeLinear) of one weight in symmetric INT8 (`sr.quant.quantspec.weight_int8`)."""
    from onnx import helper, numpy_helper

    quantized, scale = weight_int8(values, axis)
    inits = [numpy_helper.from_array(quantized, f"{name}_quantized"), numpy_helper.from_array(scale, f"{name}_scale"),
             numpy_helper.from_array(np.zeros(scale.shape, np.int8), f"{name}_zero_point")]
    node = helper.make_node("DequantizeLinear", [f"{name}_quantized", f"{name}_scale", f"{name}_zero_point"],
                            [f"{name}_dequantized"], name=f"{name}_DequantizeLinear",
                            **({} if axis is None else {"axis": axis}))
    return inits, node


def _int32_bias(spec: QuantSpec, conv, arrays: dict, ranges: dict, weight: np.ndarray, axis: int | None,
                done: dict):
    """The INT32 bias of `conv` where the spec says so and its input is quantized (else None)."""
    if spec.float_bias or conv is None or conv.op_type not in ("Conv", "ConvTranspose") or len(conv.input) < 3 or \
            conv.input[2] not in arrays or conv.input[2] in done:  # (a LayerNormalization's bias is a weight)
        return None
    source = spec.activations.get(conv.input[0])
    if source is None:
        return None
    r = ranges[source.group]
    return _bias_dequantizer(conv.input[2], onnx.numpy_helper.to_array(arrays[conv.input[2]]),
                             activation_qparams(source, r.low, r.high)[0], weight_int8(weight, axis)[1])


def _bias_dequantizer(name: str, values: np.ndarray, input_step: float, weight_steps: np.ndarray):
    """(initializers, DequantizeLinear) of a Conv bias in INT32 at step s_input x s_weight (per output channel
    where the weight is), zero point 0: LiteRT's specification for CONV_2D / DEPTHWISE_CONV_2D biases, and what
    an NPU adds into its INT32 accumulator."""
    from onnx import helper, numpy_helper

    quantized, steps = bias_int32(values, input_step, weight_steps)
    inits = [numpy_helper.from_array(quantized, f"{name}_quantized"), numpy_helper.from_array(steps, f"{name}_scale"),
             numpy_helper.from_array(np.zeros(steps.shape, np.int32), f"{name}_zero_point")]
    node = helper.make_node("DequantizeLinear", [f"{name}_quantized", f"{name}_scale", f"{name}_zero_point"],
                            [f"{name}_dequantized"], name=f"{name}_DequantizeLinear",
                            **({"axis": 0} if steps.ndim else {}))
    return inits, node


def without_quantization(qdq: onnx.ModelProto, fp32: onnx.ModelProto, activations: Sequence[str]) -> onnx.ModelProto:
    """A written QDQ model with the Q/DQ pairs of some activations taken out again (their consumers read the float
    tensor): the diagnosis measures a tensor's damage this way, on the real INT8 model rather than a re-derived
    simulation.

    Args:
        qdq: the written model.
        fp32: the FP32 model it was written from.
        activations: FP32 tensor names whose pairs are removed.

    Returns:
        a new model.
    """
    model = onnx.ModelProto()
    model.CopyFrom(qdq)
    index = GraphIndex(model.graph)  # the nodes whose ids mark what is removed
    removed, rename, restore = _activation_pairs(model.graph, index, set(activations))
    _rewire(index.nodes, model.graph, removed, rename, restore)
    return model


def with_float_weights(qdq: onnx.ModelProto, fp32: onnx.ModelProto,
                       weights_from: onnx.ModelProto | None = None) -> onnx.ModelProto:
    """A written QDQ model with every INT8 weight (and INT32 bias) read in FP32 again (the diagnosis scores one
    tensor's quantization alone this way).

    Args:
        qdq: the written model.
        fp32: the FP32 model it was written from (for the weights).
        weights_from: the FP32 graph whose weights those are, when the writer changed their shapes (the cpu
            scheme's fast-kernel rewrite); default `fp32`.

    Returns:
        a new model.
    """
    model = onnx.ModelProto()
    model.CopyFrom(qdq)
    graph = model.graph
    index = GraphIndex(graph)  # the nodes whose ids mark what is removed
    consumers = index.consumers
    fp32 = weights_from if weights_from is not None else fp32
    initializers = {i.name: i for i in graph.initializer}
    fp32_initializers = {i.name: i for i in fp32.graph.initializer}
    removed, rename = set(), {}
    for node in index.nodes:
        if node.op_type == "DequantizeLinear" and node.input[0] in initializers \
                and initializers[node.input[0]].data_type in (onnx.TensorProto.INT8, onnx.TensorProto.INT32):
            name = fp32_initializer_of(node, consumers, fp32, set(fp32_initializers))
            if name is not None:
                removed.add(id(node))
                rename[node.output[0]] = name
                if name not in initializers:
                    graph.initializer.append(fp32_initializers[name])
                    initializers[name] = fp32_initializers[name]
    _rewire(index.nodes, graph, removed, rename, {})
    return model


def _rewire(nodes: list, graph: onnx.GraphProto, removed: set[int], rename: dict[str, str],
            restore: dict[str, str]) -> None:
    """Drop the `removed` nodes (by the ids of `nodes`, the graph's nodes as indexed), point their readers at what
    they stood for, and drop unused initializers."""
    kept = [node for node in nodes if id(node) not in removed]
    for node in kept:
        for position, name in enumerate(node.input):
            node.input[position] = restore.get(rename.get(name, name), rename.get(name, name))
        for position, name in enumerate(node.output):
            node.output[position] = restore.get(name, name)
    del graph.node[:]
    graph.node.extend(kept)
    used = used_names(kept)
    for init in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(init)


def _activation_pairs(graph: onnx.GraphProto, index: GraphIndex, drop: set[str]) -> tuple[set, dict, dict]:
    """The Q/DQ pairs of the activations in `drop`: (ids of their nodes among `index.nodes`, {DQ output: float
    tensor} for their consumers, {renamed producer output: the graph output's name} for a quantized graph
    output)."""
    initializers = {i.name for i in graph.initializer}
    outputs = {o.name for o in graph.output}
    removed, rename, restore = set(), {}, {}
    for node in index.nodes:
        if node.op_type != "QuantizeLinear" or node.input[0] in initializers:
            continue
        pairs = [dq for dq in index.readers(node.output[0]) if dq.op_type == "DequantizeLinear"]
        tensor = next((dq.output[0] for dq in pairs if dq.output[0] in outputs), node.input[0])
        if tensor not in drop:
            continue
        removed.add(id(node))
        removed.update(id(dq) for dq in pairs)
        for dq in pairs:
            if dq.output[0] in outputs:
                restore[node.input[0]] = dq.output[0]  # the producer gets the output's name back
            else:
                rename[dq.output[0]] = node.input[0]
    return removed, rename, restore


def _ort_qdq(model: onnx.ModelProto, spec: QuantSpec, ranges: dict[str, TensorRange], keep_float: Sequence[str],
             rewrite: bool) -> onnx.ModelProto:
    """The cpu scheme through `onnxruntime.quantization.quantize_static` (UINT8 activations, INT32 biases)."""
    op_types, own_movers = QUANTIZED_OPS, []
    if rewrite:  # every Conv on ORT's fast INT8 kernel; the outputs stay bit-identical
        # the model's own Pad/Slice (a centred model's input padding) stay float: only the rewrite's are quantized
        own_movers = [node.name for node in model.graph.node if node.op_type in REWRITE_OPS]
        model, ranges = rewrite_for_fast_int8(model, ranges)
        op_types = QUANTIZED_OPS + REWRITE_OPS
    tied = dict(ranges)  # ties found on the graph ORT sees (the rewrite renames and adds tensors)
    for tensor, source in fused_ties(model, set(ranges) - set(keep_float)).items():  # a float tensor ties nothing
        tied[tensor] = _tied(tensor, ranges[source], ranges[tensor])
    tensor_data = {name: TensorData(lowest=np.float32(r.low), highest=np.float32(r.high)) for name, r in tied.items()}
    wrapper = [node.name for node in model.graph.node if is_wrapper(node.name)]
    with tempfile.TemporaryDirectory(prefix="sr-qdq-") as work:
        cache = Path(work) / "ranges.json"
        save_tensors_data(TensorsData(CalibrationMethod.MinMax, tensor_data), cache)
        temp, source = Path(work) / "model.qdq.onnx", Path(work) / "model.fp32.onnx"
        onnx.save(model, str(source))
        with _quiet():
            quantize_static(
                str(source), str(temp), calibration_data_reader=None, calibration_cache_path=str(cache),
                quant_format=QuantFormat.QDQ, op_types_to_quantize=op_types, per_channel=True,
                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax,
                nodes_to_exclude=_nodes_touching(model, keep_float) + own_movers + wrapper,
                extra_options={"ActivationSymmetric": False, "WeightSymmetric": True,
                               "QDQKeepRemovableActivations": False, "QuantizeBias": True},
            )
        return onnx.load(str(temp))


def _nodes_touching(model: onnx.ModelProto, tensors: Sequence[str]) -> list[str]:
    """Nodes that produce or consume one of `tensors`: excluding them all keeps those tensors in float (a
    quantized consumer would otherwise put a QDQ pair on its input). The price: those ops run in float."""
    wanted = set(tensors)
    return [node.name for node in model.graph.node if wanted & (set(node.output) | set(node.input))]


def fixed_input_size(fp32: Path | onnx.ModelProto) -> tuple[int, int] | None:
    """(height, width) of a model (a file or a loaded graph) that takes only one input size, else None."""
    model = fp32 if isinstance(fp32, onnx.ModelProto) else onnx.load(str(fp32), load_external_data=False)
    dims = model.graph.input[0].type.tensor_type.shape.dim
    height, width = (d.dim_value if d.HasField("dim_value") else 0 for d in dims[2:4])
    return (height, width) if height and width else None
