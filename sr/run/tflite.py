"""LiteRT (TFLite) full-integer INT8 models, written by the lab from its spec and ranges: no converter in the path,
so every scale and zero point in the file is exactly the lab's (`sr.quant.quantspec`, LiteRT's 8-bit specification:
the `npu` and `npu-per-tensor` schemes).

What is written: NHWC, the image input and output INT8 (with the lab's [0, 1] image range, an 8-bit pixel p is
the integer p - 128 on the way in and out), dynamic height and width (`shape_signature` [1, -1, -1, C]); CONV_2D
(strided where unpadded; a grouped convolution stays one CONV_2D, its filter [O, kh, kw, I / groups]) or
DEPTHWISE_CONV_2D, weights INT8 per output channel (or per tensor), biases INT32 at s_input x s_weight;
TRANSPOSE_CONV (SAME where the output is stride times the input, else VALID and a STRIDED_SLICE crop); RELU,
RELU_0_TO_1 / RELU6 / RELU_N1_TO_1 for the matching Clip (a requantization for a Clip whose output grid lies
within it), LEAKY_RELU, PRELU, LOGISTIC and TANH (on the specification's fixed output grids); CONCATENATION; ADD,
SUB and MUL of two tensors or of a tensor and an INT8 constant; MAX_POOL_2D; PADV2 (edge padding as repeated
rows and columns); RESIZE_NEAREST_NEIGHBOR / RESIZE_BILINEAR, their size read at run time (SHAPE,
STRIDED_SLICE); DEPTH_TO_SPACE, where a PixelShuffle's CRD channel order is folded into the producing
convolution's output channels (no GATHER); Transpose as no op (the stored tensor in another layout). Shape
arithmetic that an exporter computes a constant with (pads from Shape x 0) is read as that constant. An attention
block's ops (Reshape, Slice, MatMul, Softmax, an erf GELU, LayerNormalization, a float computed from the image's
size) are written by `sr.run.tfliteseq`: RESHAPE, STRIDED_SLICE, FULLY_CONNECTED / BATCH_MATMUL, SOFTMAX, GELU, and
a LayerNorm as MEAN, SUB, L2_NORMALIZATION, MUL, ADD, an exported F.normalize as L2_NORMALIZATION; a graph
with such a float is written per size. A graph with
anything else, or with a tensor the spec leaves in float, is refused in words naming the op or the tensor.

Written op by op here, onto the file built with the flatbuffer object API that ships with LiteRT (`sr.run.tflitefile`);
the convolutions (CONV_2D, DEPTHWISE_CONV_2D, TRANSPOSE_CONV, a PixelShuffle's channel order) in `sr.run.tfliteconv`.

Example:
    >>> write_tflite(int8.fp32_onnx, spec_of(int8.fp32_onnx, "npu"), tie_fused_ranges(spec, int8.ranges), "m.tflite")
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx

from ..graph import GeluUnit, GraphIndex, op_units
from ..quant.searches import TensorRange
from ..quant.quantspec import QuantSpec, activation_qparams, constant_arrays, weight_int8
from ..store import write_atomic
from ..model.wrapper import unwrap
from .tfliteconv import channel_orders, write_conv, write_transpose_conv
from . import tfliteseq
from .tfliteseq import NHWC, SizeDependent
from .sessions import ort_session
from .tflitefile import Flatbuffer, TfliteUnsupported, attribute

SUPPORTED_OPS = ("Conv", "ConvTranspose", "Relu", "Clip", "LeakyRelu", "PRelu", "Sigmoid", "Tanh", "Concat", "DepthToSpace",
                 "Add", "Sub", "Mul", "Div", "MaxPool", "Pad", "Resize", "Transpose", "Reshape", "Slice", "MatMul",
                 "Softmax", "LayerNormalization", "GELU (erf)", "L2 normalization (ReduceL2, Clip, Expand, Div)")
DECOMPOSED = ("LayerNormalization",)  # ops with no LiteRT builtin, written as several INT8 ops (`sr.run.tfliteseq`)
_CLIPS = {(0.0, 1.0): "RELU_0_TO_1", (0.0, 6.0): "RELU6", (-1.0, 1.0): "RELU_N1_TO_1"}
_TOKEN_OPS = {"Transpose": tfliteseq.write_transpose, "Reshape": tfliteseq.write_reshape,
              "Slice": tfliteseq.write_slice, "MatMul": tfliteseq.write_matmul, "Softmax": tfliteseq.write_softmax,
              "LayerNormalization": tfliteseq.write_layernorm}  # written by `sr.run.tfliteseq`
_NHWC_AXIS = {0: 0, 1: 3, 2: 1, 3: 2, -3: 3, -2: 1, -1: 2, -4: 0}


def _user(name: str) -> str:
    return name[len("user/"):] if name.startswith("user/") else name


def tflite_bytes(fp32: onnx.ModelProto, spec: QuantSpec, ranges: dict[str, TensorRange],
                 size: tuple[int, int] | None = None) -> bytes:
    """The full-integer .tflite of an FP32 graph under a LiteRT spec (see the module docstring).

    Args:
        fp32: the FP32 graph the spec was derived from (the lab's wrapper is left out: the user's graph is written).
        spec: an `npu` or `npu-per-tensor` spec of it.
        ranges: every quantized tensor's range (`sr.quant.qdq.tie_fused_ranges`).
        size: the (height, width) of the user's input it is written for, where the graph computes a float from the
            image's size (`sr.run.tfliteseq.SizeDependent` without one); None: any size.

    Returns:
        the flatbuffer.

    Raises:
        TfliteUnsupported: a scheme other than LiteRT's, an op outside SUPPORTED_OPS, a tensor left in float, or an
            op LiteRT cannot express as the graph has it (named).
    """
    if not spec.scheme.litert:
        raise TfliteUnsupported(f"a .tflite follows LiteRT's specification: the npu or npu-per-tensor scheme, "
                                f"not {spec.scheme.value}")
    return _Writer(unwrap(fp32), spec, ranges, size).write()


class _Writer:
    """One user's graph written op by op into a `Flatbuffer`."""

    def __init__(self, model: onnx.ModelProto, spec: QuantSpec, ranges: dict[str, TensorRange],
                 size: tuple[int, int] | None = None):
        self.model, self.flat, self.size = model, Flatbuffer(), size
        self.layouts: dict[str, list[int]] = {}  # the stored order of a tensor's ONNX dims, where not NHWC's
        self.shapes: dict[str, tuple[list[int], list[int]]] | None = None
        self.nhwc = False
        self.activations = {_user(t): a for t, a in spec.activations.items()}
        self.bounds = {_user(t): r for t, r in ranges.items()}
        self.arrays, self.orders = constant_arrays(model), channel_orders(model)
        self.weights = {_user(w): s for w, s in spec.weights.items()}
        self.channels: dict[str, int] = {}
        self.producers = GraphIndex(model).producers

    def write(self) -> bytes:
        graph_input = self.model.graph.input[0]
        if graph_input.name not in self.activations:
            raise TfliteUnsupported(f"the image input {graph_input.name!r} is not quantized by the spec (centred I/O "
                                    "or a keep-in-float fix leaves it in float): a full-integer .tflite takes an INT8 "
                                    "image")
        dims = graph_input.type.tensor_type.shape.dim
        layout_in = self.layout_transpose(graph_input.name)
        count = (dims[3] if layout_in else dims[1]).dim_value or self.conv_channels(
            layout_in.output[0] if layout_in else graph_input.name)
        if count <= 0:
            raise TfliteUnsupported(f"the input {graph_input.name!r} has no fixed channel count (NCHW expected)")
        self.nhwc = layout_in is not None
        self.output(graph_input.name, count)
        if self.nhwc:
            self.layouts[graph_input.name] = [0, 1, 2, 3]
        units = {unit.nodes[0]: unit for unit in op_units(GraphIndex(self.model), self.arrays)}
        inside = {name for unit in units.values() for name in unit.nodes}
        for node in self.model.graph.node:
            if node.name in units:
                unit = units[node.name]
                (tfliteseq.write_gelu if isinstance(unit, GeluUnit) else tfliteseq.write_l2_norm)(self, unit)
                continue
            if node.name in inside or node.op_type in ("Shape", "Constant") or \
                    not any(t in self.activations for t in [*node.input, *node.output]):
                continue  # shape arithmetic and constants: read where an op needs them (a Resize's size)
            if node.op_type not in SUPPORTED_OPS:
                raise TfliteUnsupported(f"the .tflite writer cannot express {node.op_type} ({node.name!r}); it "
                                        f"writes {', '.join(SUPPORTED_OPS)}")
            if node.op_type in _TOKEN_OPS:
                _TOKEN_OPS[node.op_type](self, node)
            else:
                getattr(self, f"_{node.op_type.lower()}")(node)
        result, image = self.model.graph.output[0].name, [0, 1, 2, 3] if self.nhwc else NHWC
        if self.layouts.get(result, image) != image:
            raise TfliteUnsupported(f"the output {result!r} is not an image in the .tflite's NHWC layout")
        return self.flat.model([self.flat.index[graph_input.name]], [self.flat.index[result]])

    def shape_pair(self, name: str) -> tuple[list[int], list[int]]:
        """`name`'s ONNX shape at two input sizes (probed once for every quantized tensor)."""
        if self.shapes is None:
            names = [t for t in dict.fromkeys([*self.activations, self.model.graph.output[0].name])
                     if t != self.model.graph.input[0].name]
            found = self.probed(names)
            self.shapes = {t: (list(a.shape), list(b.shape)) for t, a, b in zip(names, *found)} if found else {}
            image = self.model.graph.input[0].name
            sides = [(1, h, w, self.channels[image]) for h, w in self.probe_sizes()]
            self.shapes[image] = tuple(list(s) if self.nhwc else [s[0], s[3], s[1], s[2]] for s in sides)
        if name not in self.shapes:
            raise TfliteUnsupported(f"the shape of {name!r} could not be read by running the graph")
        return self.shapes[name]

    def at_size(self, tensors: list[str], size: tuple[int, int]) -> list[np.ndarray]:
        """`tensors` as the FP32 graph computes them for an input of `size`."""
        found = self.probed(tensors, [size])
        if not found:
            raise TfliteUnsupported(f"{tensors} could not be computed at {size[0]} x {size[1]}")
        return found[0]

    def layout_transpose(self, image: str):
        """The Transpose NHWC -> NCHW that an NHWC graph opens with on `image` (None for an NCHW graph): in the
        .tflite, which is NHWC throughout, it is no op at all."""
        readers = [n for n in self.model.graph.node if image in n.input]
        if len(readers) == 1 and readers[0].op_type == "Transpose" and \
                list(attribute(readers[0], "perm", [])) == [0, 3, 1, 2]:
            return readers[0]
        return None

    def _convtranspose(self, node) -> None:
        write_transpose_conv(self, node)

    def value_of(self, tensor: str) -> np.ndarray:
        """A constant, or an integer tensor computed from shapes that comes out the same for two input sizes (an
        exporter's shape arithmetic that adds zero); empty when it depends on the size."""
        if tensor in self.arrays:
            return np.asarray(self.arrays[tensor])
        found = self.probed([tensor])
        return found[0][0] if found and np.array_equal(found[0][0], found[1][0]) else np.array([])

    def probe_sizes(self) -> list[tuple[int, int]]:
        """Two input sizes to run the graph at: the graph's own twice where it fixes its height and width."""
        dims = self.model.graph.input[0].type.tensor_type.shape.dim
        h, w = (dims[1], dims[2]) if self.nhwc else (dims[2], dims[3])
        return [(h.dim_value, w.dim_value)] * 2 if h.dim_value > 0 and w.dim_value > 0 else [(33, 41), (47, 38)]

    def probed(self, tensors: list[str], sizes=None) -> list[list[np.ndarray]]:
        """`tensors` as the FP32 graph computes them for two input sizes (`probe_sizes`; empty when it cannot run
        them)."""
        probe = onnx.ModelProto()
        probe.CopyFrom(self.model)
        del probe.graph.output[:]
        probe.graph.output.extend(onnx.helper.make_empty_tensor_value_info(t) for t in tensors)
        try:
            session = ort_session(probe)
            channels = self.channels[self.model.graph.input[0].name]
            return [session.run(None, {session.get_inputs()[0].name: np.zeros(
                (1, h, w, channels) if self.nhwc else (1, channels, h, w), np.float32)})
                for h, w in sizes or self.probe_sizes()]
        except Exception:  # shapes the probe cannot take, or a layout other than NCHW: left unknown
            return []

    def conv_channels(self, tensor: str) -> int:
        """The channels a Conv reading `tensor` takes (0 when none reads it): a free channel dimension fixed."""
        for node in self.model.graph.node:
            if node.op_type == "Conv" and node.input[0] == tensor and node.input[1] in self.arrays:
                return int(self.arrays[node.input[1]].shape[1]) * int(attribute(node, "group", 1))
        return 0

    def qparams(self, name: str) -> tuple[float, int]:
        if name not in self.activations:
            raise TfliteUnsupported(f"tensor {name!r} is left in float (a full-integer .tflite has no float "
                                    "tensors): write it without keep-in-float fixes")
        r = self.bounds[name]
        return activation_qparams(self.activations[name], r.low, r.high)

    def activation(self, name: str) -> int:
        """The stored tensor of an activation an image op reads (stored NHWC; moved there if it is not)."""
        if self.layouts.get(name, NHWC) != NHWC:
            if len(self.layouts[name]) != 4:
                raise TfliteUnsupported(f"tensor {name!r} (rank {len(self.layouts[name])}) is read by an op that "
                                        "takes an NHWC image")
            tfliteseq.moved(self, name, NHWC)  # an image the graph had stored otherwise: a TRANSPOSE to NHWC
        if name not in self.flat.index:
            raise TfliteUnsupported(f"tensor {name!r} is read before it is made (a graph input other than the image?)")
        return self.flat.index[name]

    def output(self, name: str, count: int) -> int:
        self.channels[name] = count
        return self.flat.tensor(name, count, self.qparams(name))

    def same_grid(self, node, inputs: list[str]) -> None:
        """LiteRT's "input and outputs must all have same scale/zero_point" (pooling, resizing, padding,
        concatenation), checked: a spec that broke it would give a file LiteRT refuses or computes wrong."""
        wanted = self.qparams(node.output[0])
        for name in inputs:
            if self.qparams(name) != wanted:
                raise TfliteUnsupported(f"{node.op_type} {node.name!r}: its input {name!r} is on another grid than "
                                        "its output; LiteRT needs one (a fixed output grid, such as a Sigmoid's, "
                                        "feeds it)")

    def unary(self, node, op: str, options=None, kind: str | None = None) -> None:
        made = self.output(node.output[0], self.channels[node.input[0]])
        self.flat.operator(op, [self.activation(node.input[0])], [made], options, kind)

    def operand(self, node, name: str) -> int:
        """An input of an element-wise op: an activation, or a constant as an INT8 tensor (its spec's scale),
        laid out to broadcast over NHWC."""
        if name not in self.arrays:
            return self.activation(name)
        if name not in self.weights:
            raise TfliteUnsupported(f"{node.op_type} {node.name!r}: its constant {name!r} is not quantized by the spec")
        values = np.asarray(self.arrays[name], np.float32)
        if values.size != 1:
            if values.ndim not in (3, 4) or values.size != values.shape[-3]:
                raise TfliteUnsupported(f"{node.op_type} {node.name!r}: a constant of shape {list(values.shape)} "
                                        "(one value, or one per channel, is written)")
            values = values.reshape(1, 1, 1, -1)
        return self.int8(f"{name}_int8", values)

    def int8(self, name: str, values) -> int:
        """A float constant as an INT8 tensor of its shape, symmetric per tensor (`weight_int8`)."""
        values = np.asarray(values, np.float32)
        quantized, step = weight_int8(values, None)
        return self.flat.tensor(name, None, (np.atleast_1d(step), np.zeros(1, np.int64)),
                                quantized.reshape(values.shape), self.flat.schema.TensorType.INT8)

    def int32(self, name: str, values) -> int:
        return self.flat.tensor(name, None, ([], []), np.asarray(values, np.int32), self.flat.schema.TensorType.INT32)

    def spatial_size(self, tensor: str, name: str) -> int:
        """An INT32 [height, width] tensor of `tensor`'s size at run time (SHAPE, then STRIDED_SLICE 1..3)."""
        shape = self.flat.plain(f"{name}_shape", [4], self.flat.schema.TensorType.INT32)
        options = self.flat.schema.ShapeOptionsT()
        options.outType = self.flat.schema.TensorType.INT32
        self.flat.operator("SHAPE", [self.activation(tensor)], [shape], options, "ShapeOptions")
        size = self.flat.plain(f"{name}_size", [2], self.flat.schema.TensorType.INT32)
        self.flat.operator("STRIDED_SLICE", [shape, self.int32(f"{name}_b", [1]), self.int32(f"{name}_e", [3]),
                                             self.int32(f"{name}_s", [1])], [size],
                           self.flat.schema.StridedSliceOptionsT(), "StridedSliceOptions")
        return size

    def shape_sources(self, tensor: str) -> set[str]:
        """The tensors whose Shape an integer subgraph reads."""
        found, frontier, seen = set(), [tensor], set()
        while frontier:
            name = frontier.pop()
            node = self.producers.get(name)
            if node is None or name in seen:
                continue
            seen.add(name)
            if node.op_type == "Shape":
                found.add(node.input[0])
            else:
                frontier.extend(i for i in node.input if i)
        return found

    def _conv(self, node) -> None:
        write_conv(self, node)

    def _relu(self, node) -> None:
        self.unary(node, "RELU")

    def _clip(self, node) -> None:
        arrays = self.arrays
        low = float(arrays[node.input[1]]) if len(node.input) > 1 and node.input[1] else float(attribute(node, "min", -np.inf))
        high = float(arrays[node.input[2]]) if len(node.input) > 2 and node.input[2] else float(attribute(node, "max", np.inf))
        if (low, high) in _CLIPS:
            return self.unary(node, _CLIPS[(low, high)])
        scale, zero = self.qparams(node.output[0])
        activation = self.activations[node.output[0]]
        if (activation.qmin - zero) * scale < low - scale / 2 or (activation.qmax - zero) * scale > high + scale / 2:
            raise TfliteUnsupported(f"Clip({low}, {high}) ({node.name!r}): LiteRT has RELU_0_TO_1, RELU6 and "
                                    "RELU_N1_TO_1, or a requantization when the output's grid lies within the clip")
        self.unary(node, "QUANTIZE")  # the output grid is the clip: requantizing saturates exactly there

    def _leakyrelu(self, node) -> None:
        options = self.flat.schema.LeakyReluOptionsT()
        options.alpha = float(attribute(node, "alpha", 0.01))
        self.unary(node, "LEAKY_RELU", options, "LeakyReluOptions")

    def _prelu(self, node) -> None:
        made = self.output(node.output[0], self.channels[node.input[0]])
        self.flat.operator("PRELU", [self.activation(node.input[0]), self.operand(node, node.input[1])], [made])

    def _sigmoid(self, node) -> None:
        self.unary(node, "LOGISTIC")

    def _tanh(self, node) -> None:
        self.unary(node, "TANH")

    def _concat(self, node) -> None:
        options = self.flat.schema.ConcatenationOptionsT()
        options.axis = _NHWC_AXIS[int(attribute(node, "axis"))]
        self.same_grid(node, list(node.input))
        count = sum(self.channels[t] for t in node.input) if options.axis == 3 else self.channels[node.input[0]]
        made = self.output(node.output[0], count)
        self.flat.operator("CONCATENATION", [self.activation(t) for t in node.input], [made], options,
                           "ConcatenationOptions")

    def _depthtospace(self, node) -> None:
        options = self.flat.schema.DepthToSpaceOptionsT()
        options.blockSize = int(attribute(node, "blocksize"))
        made = self.output(node.output[0], self.channels[node.input[0]] // options.blockSize ** 2)
        self.flat.operator("DEPTH_TO_SPACE", [self.activation(node.input[0])], [made], options, "DepthToSpaceOptions")

    def _binary(self, node, op: str, options, kind: str) -> None:
        if all(t in self.arrays for t in node.input):
            raise TfliteUnsupported(f"{node.op_type} {node.name!r} of two constants")
        if node.op_type == "Div" or any(self.layouts.get(t, NHWC) != NHWC or t not in self.arrays and
                                        t not in self.activations for t in node.input):
            return tfliteseq.sequence_binary(self, node, op, options, kind)
        image = next(t for t in node.input if t not in self.arrays)
        inputs = [self.operand(node, t) for t in node.input]
        self.flat.operator(op, inputs, [self.output(node.output[0], self.channels[image])], options, kind)

    def _add(self, node) -> None:
        self._binary(node, "ADD", self.flat.schema.AddOptionsT(), "AddOptions")

    def _sub(self, node) -> None:
        self._binary(node, "SUB", self.flat.schema.SubOptionsT(), "SubOptions")

    def _mul(self, node) -> None:
        self._binary(node, "MUL", self.flat.schema.MulOptionsT(), "MulOptions")

    def _div(self, node) -> None:  # MUL by the reciprocal of a constant, or of a float from the image's size
        if node.input[0] not in self.flat.index or node.input[1] in self.flat.index:
            raise TfliteUnsupported(f"Div {node.name!r}: LiteRT's INT8 ops divide an activation by a constant only")
        self._binary(node, "MUL", self.flat.schema.MulOptionsT(), "MulOptions")

    def _maxpool(self, node) -> None:
        kernel = list(attribute(node, "kernel_shape"))
        strides = list(attribute(node, "strides", [1, 1]))
        if any(attribute(node, "pads", [0, 0, 0, 0])) or attribute(node, "ceil_mode", 0) or \
                any(d != 1 for d in attribute(node, "dilations", [1, 1])) or len(kernel) != 2 or \
                attribute(node, "auto_pad", b"NOTSET") not in (b"NOTSET", b"VALID", "NOTSET", "VALID"):
            raise TfliteUnsupported(f"MaxPool {node.name!r}: only 2-D, unpadded, floor-mode pooling is written")
        self.same_grid(node, [node.input[0]])
        options = self.flat.schema.Pool2DOptionsT()
        options.padding = self.flat.schema.Padding.VALID
        options.filterHeight, options.filterWidth = kernel
        options.strideH, options.strideW = strides
        self.unary(node, "MAX_POOL_2D", options, "Pool2DOptions")

    def _pad(self, node) -> None:
        mode = attribute(node, "mode", b"constant")
        mode = mode.decode() if isinstance(mode, bytes) else mode
        pads = [int(p) for p in self.value_of(node.input[1])] if len(node.input) > 1 else []
        if mode not in ("constant", "edge") or len(pads) != 8 or pads[0] or pads[1] or pads[4] or pads[5] or \
                min(pads) < 0 or (len(node.input) > 3 and node.input[3]):
            raise TfliteUnsupported(f"Pad {node.name!r} ({mode}, pads {pads or 'computed'}): LiteRT pads height and "
                                    "width with a constant (PADV2), or the edge (rows and columns repeated)")
        self.same_grid(node, [node.input[0]])
        if mode == "edge":
            return self._edge_pad(node, pads)
        value = float(self.arrays[node.input[2]]) if len(node.input) > 2 and node.input[2] else 0.0
        scale, zero = self.qparams(node.input[0])
        level = np.array(np.clip(np.rint(value / scale) + zero, -128, 127), np.int8)
        constant = self.flat.tensor(f"{node.name}_value", None, ([scale], [zero]), level, self.flat.schema.TensorType.INT8)
        paddings = self.int32(f"{node.name}_paddings", [[0, 0], [pads[2], pads[6]], [pads[3], pads[7]], [0, 0]])
        made = self.output(node.output[0], self.channels[node.input[0]])
        self.flat.operator("PADV2", [self.activation(node.input[0]), paddings, constant], [made],
                           self.flat.schema.PadV2OptionsT(), "PadV2Options")

    def _edge_pad(self, node, pads: list[int]) -> None:
        """Edge padding (LiteRT has none): the first and last row repeated by CONCATENATION along the height, then
        the first and last column along the width; every piece on the input's grid, as the op needs."""
        schema, tensor = self.flat.schema, self.activation(node.input[0])
        channels, grid = self.channels[node.input[0]], self.qparams(node.input[0])
        for axis, (before, after) in ((1, (pads[2], pads[6])), (2, (pads[3], pads[7]))):
            if not before and not after:
                continue
            pieces = []
            for name, count, begin, end in (("first", before, 0, 1), ("last", after, -1, 0)):
                if not count:
                    continue
                edge = self.flat.tensor(f"{node.name}_{axis}_{name}", channels, grid)
                options = schema.StridedSliceOptionsT()
                # every other axis whole; along `axis` the first row (0:1) or the last (-1:end)
                options.beginMask = 0b1111 ^ (1 << axis)
                options.endMask = options.beginMask | (1 << axis if end == 0 else 0)
                starts = [0, 0, 0, 0]
                starts[axis] = begin
                ends = [0, 0, 0, 0]
                ends[axis] = end
                self.flat.operator("STRIDED_SLICE", [tensor, self.int32(f"{node.name}_{axis}_{name}_b", starts),
                                                     self.int32(f"{node.name}_{axis}_{name}_e", ends),
                                                     self.int32(f"{node.name}_{axis}_{name}_s", [1, 1, 1, 1])],
                                   [edge], options, "StridedSliceOptions")
                pieces.append((name, [edge] * count))
            first = next((p for n, p in pieces if n == "first"), [])
            last = next((p for n, p in pieces if n == "last"), [])
            joined = self.flat.tensor(f"{node.name}_{axis}", channels, grid)
            concat = schema.ConcatenationOptionsT()
            concat.axis = axis
            self.flat.operator("CONCATENATION", [*first, tensor, *last], [joined], concat, "ConcatenationOptions")
            tensor = joined
        self.flat.index[node.output[0]] = tensor
        self.channels[node.output[0]] = channels

    def _resize(self, node) -> None:
        mode = attribute(node, "mode", b"nearest")
        mode = mode.decode() if isinstance(mode, bytes) else mode
        transform = attribute(node, "coordinate_transformation_mode", b"half_pixel")
        transform = transform.decode() if isinstance(transform, bytes) else transform
        nearest = attribute(node, "nearest_mode", b"round_prefer_floor")
        nearest = nearest.decode() if isinstance(nearest, bytes) else nearest
        if attribute(node, "antialias", 0) or attribute(node, "axes", None) is not None or \
                attribute(node, "exclude_outside", 0):
            raise TfliteUnsupported(f"Resize {node.name!r}: antialias, axes and exclude_outside are not written")
        self.same_grid(node, [node.input[0]])
        if mode == "nearest" and transform == "asymmetric" and nearest == "floor":
            op, options, kind = "RESIZE_NEAREST_NEIGHBOR", self.flat.schema.ResizeNearestNeighborOptionsT(), \
                "ResizeNearestNeighborOptions"
        elif mode == "linear" and transform in ("pytorch_half_pixel", "half_pixel", "align_corners"):
            op, options, kind = "RESIZE_BILINEAR", self.flat.schema.ResizeBilinearOptionsT(), "ResizeBilinearOptions"
            options.alignCorners, options.halfPixelCenters = transform == "align_corners", transform != "align_corners"
        else:
            raise TfliteUnsupported(f"Resize {node.name!r} ({mode}, {transform}): LiteRT resizes nearest as "
                                    "PyTorch's (asymmetric, floor) or bilinear")
        size = self._resize_size(node)
        made = self.output(node.output[0], self.channels[node.input[0]])
        self.flat.operator(op, [self.activation(node.input[0]), size], [made], options, kind)

    def _resize_size(self, node) -> int:
        """The output size of a Resize as an INT32 tensor: its integer scales times its input's size, or the size
        of the tensor whose shape its `sizes` are read from."""
        scales = np.asarray(self.arrays.get(node.input[2], [])) if len(node.input) > 2 and node.input[2] else []
        if len(scales) == 4 and all(s == int(s) and s >= 1 for s in scales[2:]) and list(scales[:2]) == [1, 1]:
            size = self.spatial_size(node.input[0], node.name)
            scaled = self.flat.plain(f"{node.name}_scaled", [2], self.flat.schema.TensorType.INT32)
            self.flat.operator("MUL", [size, self.int32(f"{node.name}_by", [int(s) for s in scales[2:]])], [scaled],
                               self.flat.schema.MulOptionsT(), "MulOptions")
            return scaled
        sources = self.shape_sources(node.input[3]) - {node.input[0]} if len(node.input) > 3 else set()
        source = sources.pop() if len(sources) == 1 else None
        found = self.probed([node.input[3], source]) if source else []
        if not found or any(list(sizes[2:]) != list(shape.shape[2:]) for sizes, shape in found):
            raise TfliteUnsupported(f"Resize {node.name!r}: its size is neither an integer scale nor another "
                                    "tensor's size")
        return self.spatial_size(source, node.name)


def write_tflite(fp32_onnx: str | os.PathLike, spec: QuantSpec, ranges: dict[str, TensorRange],
                 out: str | os.PathLike, size: tuple[int, int] | None = None) -> Path:
    """`tflite_bytes` of an FP32 model file, written atomically to `out`."""
    write_atomic(tflite_bytes(onnx.load(str(fp32_onnx)), spec, ranges, size), Path(out))
    return Path(out)


# the modules whose code writes a .tflite (the cached file's key covers them: `sr.run.runtime.tflite_model`)
WRITTEN_BY = (__name__, write_conv.__module__, Flatbuffer.__module__, tfliteseq.__name__)

__all__ = ["tflite_bytes", "write_tflite", "SUPPORTED_OPS", "WRITTEN_BY", "SizeDependent", "DECOMPOSED"]
