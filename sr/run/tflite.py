"""LiteRT (TFLite) full-integer INT8 models, written by the lab from its spec and ranges: no converter in the path,
so every scale and zero point in the file is exactly the lab's (`sr.quant.quantspec`, LiteRT's 8-bit specification:
the `npu` and `npu-per-tensor` schemes).

What is written: NHWC, the image input and output INT8 (with the lab's [0, 1] image range, an 8-bit pixel p is
the integer p - 128 on the way in and out), dynamic height and width (`shape_signature` [1, -1, -1, C]); CONV_2D
(a grouped convolution stays one CONV_2D, its filter [O, kh, kw, I / groups]) or DEPTHWISE_CONV_2D, weights INT8
per output channel (or per tensor), biases INT32 at s_input x s_weight; RELU, RELU_0_TO_1 / RELU6 /
RELU_N1_TO_1 for the matching Clip; CONCATENATION; ADD; DEPTH_TO_SPACE, where a PixelShuffle's CRD channel order
is folded into the producing convolution's output channels (no GATHER). A graph with anything else, or with a
tensor the spec leaves in float, is refused in words naming the op or the tensor.

Built with the flatbuffer object API that ships with LiteRT (`ai_edge_litert.schema_py_generated`).

Example:
    >>> write_tflite(int8.fp32_onnx, spec_of(int8.fp32_onnx, "npu"), tie_fused_ranges(spec, int8.ranges), "m.tflite")
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from ..quant.searches import TensorRange
from ..quant.quantspec import QuantSpec, activation_qparams, weight_int8
from ..store import write_atomic
from ..model.wrapper import unwrap

SUPPORTED_OPS = ("Conv", "Relu", "Clip", "Concat", "DepthToSpace", "Add")
_CLIPS = {(0.0, 1.0): "RELU_0_TO_1", (0.0, 6.0): "RELU6", (-1.0, 1.0): "RELU_N1_TO_1"}
_NHWC_AXIS = {0: 0, 1: 3, 2: 1, 3: 2, -3: 3, -2: 1, -1: 2, -4: 0}


class TfliteUnsupported(ValueError):
    """A graph the .tflite writer cannot express (the message names the op or the tensor)."""


def _user(name: str) -> str:
    return name[len("user/"):] if name.startswith("user/") else name


def _attribute(node: onnx.NodeProto, name: str, default=None):
    found = next((a for a in node.attribute if a.name == name), None)
    return default if found is None else onnx.helper.get_attribute_value(found)


class _Flatbuffer:
    """The tensors, buffers, operator codes and operators of one subgraph, as LiteRT's object API builds them."""

    def __init__(self):
        from ai_edge_litert import schema_py_generated as schema

        self.schema = schema
        self.tensors, self.buffers, self.operators = [], [schema.BufferT()], []
        self.codes: dict[int, int] = {}
        self.index: dict[str, int] = {}

    def tensor(self, name: str, channels: int | None, qparams, data: np.ndarray | None = None,
               dtype: int | None = None, axis: int = 0) -> int:
        schema = self.schema
        tensor = schema.TensorT()
        tensor.name = name
        if data is None:
            tensor.shape, tensor.shapeSignature = [1, 1, 1, channels], [1, -1, -1, channels]
            tensor.type = schema.TensorType.INT8
            tensor.buffer = 0
        else:
            tensor.shape = list(data.shape)
            tensor.type = dtype
            buffer = schema.BufferT()
            buffer.data = np.frombuffer(np.ascontiguousarray(data).tobytes(), np.uint8)
            self.buffers.append(buffer)
            tensor.buffer = len(self.buffers) - 1
        quantization = schema.QuantizationParametersT()
        scales, zeros = qparams
        quantization.scale = [float(s) for s in np.atleast_1d(scales)]
        quantization.zeroPoint = [int(z) for z in np.atleast_1d(zeros)]
        quantization.quantizedDimension = axis
        tensor.quantization = quantization
        self.tensors.append(tensor)
        if data is None:
            self.index[name] = len(self.tensors) - 1
        return len(self.tensors) - 1

    def operator(self, op: str, inputs: list[int], outputs: list[int], options=None, kind: str | None = None):
        schema = self.schema
        code = getattr(schema.BuiltinOperator, op)
        self.codes.setdefault(code, len(self.codes))
        operator = schema.OperatorT()
        operator.opcodeIndex, operator.inputs, operator.outputs = self.codes[code], inputs, outputs
        if options is not None:
            operator.builtinOptionsType = getattr(schema.BuiltinOptions, kind)
            operator.builtinOptions = options
        self.operators.append(operator)

    def model(self, inputs: list[int], outputs: list[int]) -> bytes:
        import flatbuffers

        schema = self.schema
        subgraph = schema.SubGraphT()
        subgraph.tensors, subgraph.inputs, subgraph.outputs = self.tensors, inputs, outputs
        subgraph.operators, subgraph.name = self.operators, "main"
        model = schema.ModelT()
        model.version, model.description = 3, "SR INT8 Lab: full-integer INT8 from the lab's spec and ranges"
        codes = []
        for code, _ in sorted(self.codes.items(), key=lambda item: item[1]):
            made = schema.OperatorCodeT()
            made.builtinCode, made.deprecatedBuiltinCode, made.version = code, min(code, 127), 1
            codes.append(made)
        model.operatorCodes, model.subgraphs, model.buffers = codes, [subgraph], self.buffers
        builder = flatbuffers.Builder(1 << 16)
        builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
        return bytes(builder.Output())


def _constants(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    arrays = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            arrays[node.output[0]] = numpy_helper.to_array(_attribute(node, "value"))
    return arrays


def _channel_orders(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """{Conv name: the output-channel order that makes a following CRD DepthToSpace a DCR one (LiteRT's
    DEPTH_TO_SPACE)}: the Conv must feed the DepthToSpace alone, directly or through one ReLU/Clip."""
    producers = {o: n for n in model.graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    orders = {}
    for node in model.graph.node:
        if node.op_type != "DepthToSpace" or _attribute(node, "mode", b"DCR") in (b"DCR", "DCR"):
            continue
        tensor, conv = node.input[0], producers.get(node.input[0])
        if conv is not None and conv.op_type in ("Relu", "Clip") and len(consumers.get(tensor, [])) == 1:
            tensor, conv = conv.input[0], producers.get(conv.input[0])
        if conv is None or conv.op_type != "Conv" or len(consumers.get(tensor, [])) != 1:
            raise TfliteUnsupported(f"DepthToSpace {node.name!r} in CRD order (PixelShuffle) after "
                                    f"{'the graph input' if conv is None else conv.op_type}: LiteRT's DEPTH_TO_SPACE "
                                    "is DCR, and the order can be folded only into a Conv that feeds it alone")
        block = int(_attribute(node, "blocksize"))
        channels = int(numpy_helper.to_array(next(i for i in model.graph.initializer
                                                  if i.name == conv.input[1])).shape[0]) // (block * block)
        # DCR channel (by * b + bx) * C + c takes the CRD channel c * b * b + by * b + bx
        by, bx, c = np.meshgrid(np.arange(block), np.arange(block), np.arange(channels), indexing="ij")
        orders[conv.name] = (c * block * block + by * block + bx).reshape(-1)
    return orders


def tflite_bytes(fp32: onnx.ModelProto, spec: QuantSpec, ranges: dict[str, TensorRange]) -> bytes:
    """The full-integer .tflite of an FP32 graph under a LiteRT spec (see the module docstring).

    Args:
        fp32: the FP32 graph the spec was derived from (the lab's wrapper is left out: the user's graph is written).
        spec: an `npu` or `npu-per-tensor` spec of it.
        ranges: every quantized tensor's range (`sr.quant.qdq.tie_fused_ranges`).

    Returns:
        the flatbuffer.

    Raises:
        TfliteUnsupported: a scheme other than LiteRT's, an op outside SUPPORTED_OPS, a tensor left in float, or a
            convolution LiteRT cannot express (named).
    """
    if not spec.scheme.litert:
        raise TfliteUnsupported(f"a .tflite follows LiteRT's specification: the npu or npu-per-tensor scheme, "
                                f"not {spec.scheme.value}")
    model = unwrap(fp32)
    activations = {_user(t): a for t, a in spec.activations.items()}
    bounds = {_user(t): r for t, r in ranges.items()}
    arrays, orders = _constants(model), _channel_orders(model)
    weights = {_user(w): s for w, s in spec.weights.items()}
    flat = _Flatbuffer()
    channels: dict[str, int] = {}

    def qparams(name: str) -> tuple[float, int]:
        if name not in activations:
            raise TfliteUnsupported(f"tensor {name!r} is left in float (a full-integer .tflite has no float "
                                    "tensors): write it without keep-in-float fixes")
        r = bounds[name]
        return activation_qparams(activations[name], r.low, r.high)

    def activation(name: str) -> int:
        if name not in flat.index:
            raise TfliteUnsupported(f"tensor {name!r} is read before it is made (a graph input other than the image?)")
        return flat.index[name]

    def output(name: str, count: int) -> int:
        channels[name] = count
        return flat.tensor(name, count, qparams(name))

    graph_input = model.graph.input[0]
    if graph_input.name not in activations:
        raise TfliteUnsupported(f"the image input {graph_input.name!r} is not quantized by the spec (centred I/O or a "
                                "keep-in-float fix leaves it in float): a full-integer .tflite takes an INT8 image")
    count = graph_input.type.tensor_type.shape.dim[1].dim_value
    if count <= 0:
        raise TfliteUnsupported(f"the input {graph_input.name!r} has no fixed channel count (NCHW expected)")
    output(graph_input.name, count)
    for node in model.graph.node:
        if node.op_type == "Constant":
            continue
        if node.op_type not in SUPPORTED_OPS:
            raise TfliteUnsupported(f"the .tflite writer cannot express {node.op_type} ({node.name!r}); it writes "
                                    f"{', '.join(SUPPORTED_OPS)}")
        _write_node(flat, node, arrays, weights, orders, channels, qparams, activation, output)
    result = model.graph.output[0].name
    return flat.model([flat.index[graph_input.name]], [activation(result)])


def _write_node(flat: _Flatbuffer, node, arrays, weights, orders, channels, qparams, activation, output) -> None:
    schema = flat.schema
    if node.op_type == "Conv":
        _write_conv(flat, node, arrays, weights, orders, channels, qparams, activation, output)
    elif node.op_type == "Relu":
        flat.operator("RELU", [activation(node.input[0])], [output(node.output[0], channels[node.input[0]])])
    elif node.op_type == "Clip":
        low = float(arrays[node.input[1]]) if len(node.input) > 1 and node.input[1] else float(_attribute(node, "min", -np.inf))
        high = float(arrays[node.input[2]]) if len(node.input) > 2 and node.input[2] else float(_attribute(node, "max", np.inf))
        if (low, high) not in _CLIPS:
            raise TfliteUnsupported(f"Clip({low}, {high}) ({node.name!r}): LiteRT has RELU_0_TO_1, RELU6 and "
                                    "RELU_N1_TO_1 only")
        flat.operator(_CLIPS[(low, high)], [activation(node.input[0])], [output(node.output[0], channels[node.input[0]])])
    elif node.op_type == "Concat":
        options = schema.ConcatenationOptionsT()
        options.axis = _NHWC_AXIS[int(_attribute(node, "axis"))]
        inputs = [activation(t) for t in node.input]
        flat.operator("CONCATENATION", inputs, [output(node.output[0], sum(channels[t] for t in node.input))],
                      options, "ConcatenationOptions")
    elif node.op_type == "DepthToSpace":
        options = schema.DepthToSpaceOptionsT()
        options.blockSize = int(_attribute(node, "blocksize"))
        made = output(node.output[0], channels[node.input[0]] // options.blockSize ** 2)
        flat.operator("DEPTH_TO_SPACE", [activation(node.input[0])], [made], options, "DepthToSpaceOptions")
    else:  # Add of two activations
        if any(t in arrays for t in node.input):
            raise TfliteUnsupported(f"Add with a constant ({node.name!r}): only an Add of two tensors is written")
        options = schema.AddOptionsT()
        flat.operator("ADD", [activation(t) for t in node.input], [output(node.output[0], channels[node.input[0]])],
                      options, "AddOptions")


def _write_conv(flat: _Flatbuffer, node, arrays, weights, orders, channels, qparams, activation, output) -> None:
    schema = flat.schema
    if node.input[1] not in weights:
        raise TfliteUnsupported(f"Conv {node.name!r}: its weight is not quantized by the spec")
    weight = np.asarray(arrays[node.input[1]], np.float32)
    bias = np.asarray(arrays[node.input[2]], np.float32) if len(node.input) > 2 and node.input[2] else \
        np.zeros(weight.shape[0], np.float32)
    if node.name in orders:  # a CRD PixelShuffle after it: its output channels in DCR order
        weight, bias = weight[orders[node.name]], bias[orders[node.name]]
    kernel = weight.shape[2:]
    pads = list(_attribute(node, "pads", [0, 0, 0, 0]))
    if weight.ndim != 4 or any(s != 1 for s in _attribute(node, "strides", [1, 1])) or \
            any(d != 1 for d in _attribute(node, "dilations", [1, 1])):
        raise TfliteUnsupported(f"Conv {node.name!r}: only 2-D, stride-1, undilated convolutions are written")
    same = pads == [kernel[0] // 2, kernel[1] // 2] * 2 and all(k % 2 == 1 for k in kernel)
    if not same and any(pads):
        raise TfliteUnsupported(f"Conv {node.name!r}: pads {pads} are neither SAME nor VALID")
    groups = int(_attribute(node, "group", 1))
    in_channels = channels[node.input[0]]
    axis = weights[node.input[1]].axis
    quantized, steps = weight_int8(weight, None if axis is None else 0)
    input_step = qparams(node.input[0])[0]
    bias_steps = (np.float32(input_step) * np.broadcast_to(steps, (weight.shape[0],))).astype(np.float32)
    limit = np.iinfo(np.int32)
    bias_int = np.clip(np.rint(bias.astype(np.float64) / bias_steps), limit.min, limit.max).astype(np.int32)
    depthwise = groups > 1 and groups == in_channels and weight.shape[1] == 1
    if depthwise:
        options, kind, op = schema.DepthwiseConv2DOptionsT(), "DepthwiseConv2DOptions", "DEPTHWISE_CONV_2D"
        options.depthMultiplier = weight.shape[0] // in_channels
        filter_data, filter_axis = quantized.transpose(1, 2, 3, 0), 3
    else:
        options, kind, op = schema.Conv2DOptionsT(), "Conv2DOptions", "CONV_2D"
        filter_data, filter_axis = quantized.transpose(0, 2, 3, 1), 0
    options.padding = schema.Padding.SAME if same else schema.Padding.VALID
    options.strideW = options.strideH = options.dilationWFactor = options.dilationHFactor = 1
    options.fusedActivationFunction = schema.ActivationFunctionType.NONE
    zeros = np.zeros(np.atleast_1d(steps).shape, np.int64)
    filter_index = flat.tensor(f"{node.input[1]}_int8", None, (steps, zeros), filter_data, schema.TensorType.INT8,
                               filter_axis if axis is not None else 0)
    bias_index = flat.tensor(f"{node.name}_bias_int32", None, (bias_steps if axis is not None else bias_steps[:1],
                                                               zeros if axis is not None else zeros[:1]),
                             bias_int, schema.TensorType.INT32, 0)
    made = output(node.output[0], weight.shape[0])
    flat.operator(op, [activation(node.input[0]), filter_index, bias_index], [made], options, kind)


def write_tflite(fp32_onnx: str | os.PathLike, spec: QuantSpec, ranges: dict[str, TensorRange],
                 out: str | os.PathLike) -> Path:
    """`tflite_bytes` of an FP32 model file, written atomically to `out`."""
    write_atomic(tflite_bytes(onnx.load(str(fp32_onnx)), spec, ranges), Path(out))
    return Path(out)


def image_qparams(tflite: bytes) -> tuple[tuple[float, int], tuple[float, int]]:
    """((scale, zero point) of the input, of the output) of a .tflite the lab wrote."""
    from ai_edge_litert import schema_py_generated as schema

    model = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(tflite, 0))
    graph = model.subgraphs[0]
    found = []
    for index in (graph.inputs[0], graph.outputs[0]):
        q = graph.tensors[index].quantization
        found.append((float(q.scale[0]), int(q.zeroPoint[0])))
    return found[0], found[1]


__all__ = ["tflite_bytes", "write_tflite", "TfliteUnsupported", "SUPPORTED_OPS", "image_qparams"]
