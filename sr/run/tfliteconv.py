"""The convolutions of a .tflite, written for the op-by-op writer (`sr.run.tflite`): CONV_2D (strided where
unpadded; grouped as one CONV_2D) or DEPTHWISE_CONV_2D, and TRANSPOSE_CONV (SAME, or VALID and a STRIDED_SLICE
crop), weights INT8 per output channel (or per tensor) and biases INT32 at s_input x s_weight; and the output-channel
order that folds a PixelShuffle's CRD DepthToSpace into the Conv before it (LiteRT's DEPTH_TO_SPACE is DCR).

`writer` below is the op-by-op writer: its `flat` (a `sr.run.tflitefile.Flatbuffer`), constant `arrays`, the spec's
`weights`, the channel `orders` and its tensors' `qparams`, `activation`, `output`, `int32` and `spatial_size`.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from ..graph import GraphIndex
from ..quant.quantspec import bias_int32, weight_int8
from .tflitefile import TfliteUnsupported, attribute


def channel_orders(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """{Conv name: the output-channel order that makes a following CRD DepthToSpace a DCR one (LiteRT's
    DEPTH_TO_SPACE)}: the Conv must feed the DepthToSpace alone, directly or through one ReLU/Clip."""
    index = GraphIndex(model)
    producers, consumers = index.producers, index.consumers
    orders = {}
    for node in model.graph.node:
        if node.op_type != "DepthToSpace" or attribute(node, "mode", b"DCR") in (b"DCR", "DCR"):
            continue
        tensor, conv = node.input[0], producers.get(node.input[0])
        if conv is not None and conv.op_type in ("Relu", "Clip") and len(consumers.get(tensor, [])) == 1:
            tensor, conv = conv.input[0], producers.get(conv.input[0])
        if conv is None or conv.op_type != "Conv" or len(consumers.get(tensor, [])) != 1:
            raise TfliteUnsupported(f"DepthToSpace {node.name!r} in CRD order (PixelShuffle) after "
                                    f"{'the graph input' if conv is None else conv.op_type}: LiteRT's DEPTH_TO_SPACE "
                                    "is DCR, and the order can be folded only into a Conv that feeds it alone")
        block = int(attribute(node, "blocksize"))
        channels = int(numpy_helper.to_array(next(i for i in model.graph.initializer
                                                  if i.name == conv.input[1])).shape[0]) // (block * block)
        # DCR channel (by * b + bx) * C + c takes the CRD channel c * b * b + by * b + bx
        by, bx, c = np.meshgrid(np.arange(block), np.arange(block), np.arange(channels), indexing="ij")
        orders[conv.name] = (c * block * block + by * block + bx).reshape(-1)
    return orders


def _explicit(node) -> bool:
    """True when a convolution's padding is its `pads` (no `auto_pad` SAME_UPPER / SAME_LOWER, which leaves
    `pads` out and would otherwise be written as none)."""
    mode = attribute(node, "auto_pad", b"NOTSET")
    return (mode.decode() if isinstance(mode, bytes) else mode) in ("NOTSET", "VALID")


def write_conv(writer, node) -> None:
    """CONV_2D (SAME, or VALID where unpadded) or DEPTHWISE_CONV_2D of an ONNX Conv, its output channels in DCR order
    where a CRD PixelShuffle follows."""
    schema, arrays, weights = writer.flat.schema, writer.arrays, writer.weights
    if node.input[1] not in weights:
        raise TfliteUnsupported(f"Conv {node.name!r}: its weight is not quantized by the spec")
    weight = np.asarray(arrays[node.input[1]], np.float32)
    bias = np.asarray(arrays[node.input[2]], np.float32) if len(node.input) > 2 and node.input[2] else \
        np.zeros(weight.shape[0], np.float32)
    if node.name in writer.orders:  # a CRD PixelShuffle after it: its output channels in DCR order
        weight, bias = weight[writer.orders[node.name]], bias[writer.orders[node.name]]
    kernel, strides = weight.shape[2:], list(attribute(node, "strides", [1, 1]))
    pads = list(attribute(node, "pads", [0, 0, 0, 0]))
    if weight.ndim != 4 or any(d != 1 for d in attribute(node, "dilations", [1, 1])) or not _explicit(node):
        raise TfliteUnsupported(f"Conv {node.name!r}: only 2-D, undilated convolutions with explicit pads are written")
    same = pads == [kernel[0] // 2, kernel[1] // 2] * 2 and all(k % 2 == 1 for k in kernel) and strides == [1, 1]
    if not same and any(pads):
        raise TfliteUnsupported(f"Conv {node.name!r}: pads {pads} with strides {strides} are neither SAME nor VALID")
    groups, in_channels = int(attribute(node, "group", 1)), writer.channels[node.input[0]]
    axis = weights[node.input[1]].axis
    quantized, steps = weight_int8(weight, None if axis is None else 0)
    bias_int, bias_steps = bias_int32(bias, writer.qparams(node.input[0])[0], steps)
    if groups > 1 and groups == in_channels and weight.shape[1] == 1:
        options, kind, op = schema.DepthwiseConv2DOptionsT(), "DepthwiseConv2DOptions", "DEPTHWISE_CONV_2D"
        options.depthMultiplier = weight.shape[0] // in_channels
        filter_data, filter_axis = quantized.transpose(1, 2, 3, 0), 3
    else:
        options, kind, op = schema.Conv2DOptionsT(), "Conv2DOptions", "CONV_2D"
        filter_data, filter_axis = quantized.transpose(0, 2, 3, 1), 0
    options.padding = schema.Padding.SAME if same else schema.Padding.VALID
    (options.strideH, options.strideW), options.dilationWFactor = strides, 1
    options.dilationHFactor, options.fusedActivationFunction = 1, schema.ActivationFunctionType.NONE
    zeros = np.zeros(np.atleast_1d(steps).shape, np.int64)
    filter_index = writer.flat.tensor(f"{node.input[1]}_int8", None, (steps, zeros), filter_data,
                                      schema.TensorType.INT8, filter_axis if axis is not None else 0)
    bias_index = writer.flat.tensor(f"{node.name}_bias_int32", None, (np.atleast_1d(bias_steps), zeros), bias_int,
                                    schema.TensorType.INT32, 0)
    made = writer.output(node.output[0], weight.shape[0])
    writer.flat.operator(op, [writer.activation(node.input[0]), filter_index, bias_index], [made], options, kind)


def write_transpose_conv(writer, node) -> None:
    """TRANSPOSE_CONV with SAME padding: the output `stride` times the input, read at run time (SHAPE), where the
    ONNX pads are the ones SAME gives (TFLite pads a transposed convolution as the forward one it inverts)."""
    schema, flat = writer.flat.schema, writer.flat
    if node.input[1] not in writer.weights:
        raise TfliteUnsupported(f"ConvTranspose {node.name!r}: its weight is not quantized by the spec")
    weight = np.asarray(writer.arrays[node.input[1]], np.float32)  # (in, out / groups, kh, kw)
    kernel, strides = list(weight.shape[2:]), list(attribute(node, "strides", [1, 1]))
    pads, extra = list(attribute(node, "pads", [0, 0, 0, 0])), list(attribute(node, "output_padding", [0, 0]))
    same = [(k - s) // 2 for k, s in zip(kernel, strides)]
    crop_end = [p - e for p, e in zip(pads[2:], extra)]  # what ONNX takes off the far end of the full output
    if int(attribute(node, "group", 1)) != 1 or any(d != 1 for d in attribute(node, "dilations", [1, 1])) or \
            any(k < s for k, s in zip(kernel, strides)) or min(crop_end) < 0 or not _explicit(node) or \
            attribute(node, "output_shape", None) is not None:
        raise TfliteUnsupported(f"ConvTranspose {node.name!r} (kernel {kernel}, strides {strides}, pads {pads}): "
                                "LiteRT's TRANSPOSE_CONV is written ungrouped, undilated, with its kernel at least "
                                "its stride")
    is_same = pads[:2] == same and [p + e for p, e in zip(crop_end, [0, 0])] == \
        [k - s - b for k, s, b in zip(kernel, strides, same)]
    outputs = weight.shape[1]
    axis = writer.weights[node.input[1]].axis
    quantized, steps = weight_int8(weight, None if axis is None else 1)
    bias = np.asarray(writer.arrays[node.input[2]], np.float32) if len(node.input) > 2 and node.input[2] else \
        np.zeros(outputs, np.float32)
    bias_int, bias_steps = bias_int32(bias, writer.qparams(node.input[0])[0], steps)
    zeros = np.zeros(np.atleast_1d(steps).shape, np.int64)
    filter_index = flat.tensor(f"{node.input[1]}_int8", None, (steps, zeros), quantized.transpose(1, 2, 3, 0),
                               schema.TensorType.INT8, 0)
    bias_index = flat.tensor(f"{node.name}_bias_int32", None, (np.atleast_1d(bias_steps), zeros), bias_int,
                             schema.TensorType.INT32, 0)
    size = writer.spatial_size(node.input[0], node.name)
    scaled = flat.plain(f"{node.name}_scaled", [2], schema.TensorType.INT32)
    flat.operator("MUL", [size, writer.int32(f"{node.name}_by", strides)], [scaled], schema.MulOptionsT(),
                  "MulOptions")
    if not is_same:  # VALID: the full output, (input - 1) x stride + kernel, cropped below as ONNX's pads say
        full = flat.plain(f"{node.name}_full", [2], schema.TensorType.INT32)
        flat.operator("ADD", [scaled, writer.int32(f"{node.name}_more", [k - s for k, s in zip(kernel, strides)])],
                      [full], schema.AddOptionsT(), "AddOptions")
        scaled = full
    shape = flat.plain(f"{node.name}_output_shape", [4], schema.TensorType.INT32)
    concat = schema.ConcatenationOptionsT()
    flat.operator("CONCATENATION", [writer.int32(f"{node.name}_n", [1]), scaled,
                                    writer.int32(f"{node.name}_c", [outputs])], [shape], concat, "ConcatenationOptions")
    options = schema.TransposeConvOptionsT()
    options.padding = schema.Padding.SAME if is_same else schema.Padding.VALID
    options.strideH, options.strideW = strides
    made = writer.output(node.output[0], outputs) if is_same else \
        flat.tensor(f"{node.name}_uncropped", outputs, writer.qparams(node.output[0]))
    flat.operator("TRANSPOSE_CONV", [shape, filter_index, writer.activation(node.input[0]), bias_index], [made],
                  options, "TransposeConvOptions")
    if not is_same:
        _crop(writer, node, made, pads[:2], crop_end, outputs)


def _crop(writer, node, full: int, begin: list[int], end: list[int], channels: int) -> None:
    """STRIDED_SLICE of a full transposed-convolution output down to ONNX's: `begin` rows and columns off the
    start, `end` off the far end (to the end where 0)."""
    crop = writer.flat.schema.StridedSliceOptionsT()
    crop.beginMask = 0b1001
    crop.endMask = 0b1001 | (0b0010 if end[0] == 0 else 0) | (0b0100 if end[1] == 0 else 0)
    writer.flat.operator("STRIDED_SLICE", [full, writer.int32(f"{node.name}_crop_b", [0, begin[0], begin[1], 0]),
                                           writer.int32(f"{node.name}_crop_e", [0, -end[0], -end[1], 0]),
                                           writer.int32(f"{node.name}_crop_s", [1, 1, 1, 1])],
                         [writer.output(node.output[0], channels)], crop, "StridedSliceOptions")


__all__ = ["channel_orders", "write_conv", "write_transpose_conv"]
