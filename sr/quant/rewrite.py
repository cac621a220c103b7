"""Graph rewrites that let ONNX Runtime's fast INT8 convolution take every Conv of the `cpu`-scheme model.

ORT's x86 QLinearConv fast path (VNNI/AMX, requantization fused) wants group = 1 and input and output channels
that are multiples of 4; XLSR's grouped 3x3 convolutions (4 groups of 8), its 27-channel tail (3 * 3^2) and
its 3-channel head and skip miss it and fall back to im2col + a generic GEMM + a separate requantize pass
(measured: a grouped conv runs slower in INT8 than in FP32). The rewrites, on the FP32 graph before
quantization, change no result:

- a grouped Conv becomes a dense one with block-diagonal weights (the extra weights are exact zeros: the
  per-output-channel weight scales, the INT32 accumulations and so the outputs are unchanged);
- a Conv whose output channels are not a multiple of 4 gets zero filters (and zero biases) up to the next
  multiple, and a Slice after it restores the original tensor (the padded tensor gets the original's range);
- Convs reading the graph input with 3 channels read a zero-padded 4-channel copy (a Pad node), with a zero
  weight column for the extra channel.

The TensorRT-scheme model is not rewritten: TensorRT has its own kernels.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .searches import TensorRange
from .quantspec import is_wrapper

CHANNEL_MULTIPLE = 4
REWRITE_OPS = ["Slice", "Pad"]  # the data-movement ops the rewrites add; quantized like the rest


def _round_up(value: int) -> int:
    return -(-value // CHANNEL_MULTIPLE) * CHANNEL_MULTIPLE


class _Graph:
    """Initializers by name, and helpers to replace them."""

    def __init__(self, model: onnx.ModelProto):
        self.model, self.graph = model, model.graph
        self.initializers = {init.name: init for init in self.graph.initializer}

    def array(self, name: str) -> np.ndarray:
        return numpy_helper.to_array(self.initializers[name])

    def replace(self, name: str, array: np.ndarray) -> None:
        self.initializers[name].CopyFrom(numpy_helper.from_array(array.astype(np.float32), name))

    def add(self, name: str, array: np.ndarray) -> None:
        tensor = numpy_helper.from_array(array, name)
        self.graph.initializer.append(tensor)
        self.initializers[name] = self.graph.initializer[-1]


def _group(node: onnx.NodeProto) -> int:
    return next((attr.i for attr in node.attribute if attr.name == "group"), 1)


def _set_group_one(node: onnx.NodeProto) -> None:
    for attr in node.attribute:
        if attr.name == "group":
            attr.i = 1


def _densify(graph: _Graph, node: onnx.NodeProto) -> None:
    """A grouped Conv -> a dense one with block-diagonal weights."""
    groups, weights = _group(node), graph.array(node.input[1])
    out_channels, in_per_group = weights.shape[:2]
    out_per_group = out_channels // groups
    dense = np.zeros((out_channels, in_per_group * groups, *weights.shape[2:]), np.float32)
    for g in range(groups):
        rows = slice(g * out_per_group, (g + 1) * out_per_group)
        dense[rows, g * in_per_group : (g + 1) * in_per_group] = weights[rows]
    graph.replace(node.input[1], dense)
    _set_group_one(node)


def _pad_outputs(graph: _Graph, node: onnx.NodeProto, ranges: dict[str, TensorRange]) -> list[onnx.NodeProto]:
    """Zero filters up to a multiple of 4 output channels, and a Slice back to the original tensor."""
    weights = graph.array(node.input[1])
    out_channels = weights.shape[0]
    padded = _round_up(out_channels)
    graph.replace(node.input[1], np.concatenate([weights, np.zeros((padded - out_channels, *weights.shape[1:]))]))
    if len(node.input) > 2 and node.input[2]:
        bias = graph.array(node.input[2])
        graph.replace(node.input[2], np.concatenate([bias, np.zeros(padded - out_channels)]))
    original = node.output[0]
    node.output[0] = f"{original}_padded"
    if original in ranges:
        ranges[node.output[0]] = ranges[original]
    prefix = f"{original}_slice"
    graph.add(f"{prefix}_starts", np.array([0], np.int64))
    graph.add(f"{prefix}_ends", np.array([out_channels], np.int64))
    graph.add(f"{prefix}_axes", np.array([1], np.int64))
    return [helper.make_node("Slice", [node.output[0], f"{prefix}_starts", f"{prefix}_ends", f"{prefix}_axes"],
                             [original], name=f"{node.name}_slice")]


def _pad_input(graph: _Graph, consumers: list[onnx.NodeProto], ranges: dict[str, TensorRange]) -> onnx.NodeProto:
    """One zero channel appended to the 3-channel graph input, and a zero weight column in its Convs."""
    source = graph.graph.input[0].name
    padded = f"{source}_padded"
    graph.add("input_channel_pads", np.array([0, 0, 0, 0, 0, 1, 0, 0], np.int64))
    for node in consumers:
        weights = graph.array(node.input[1])
        graph.replace(node.input[1], np.concatenate([weights, np.zeros((weights.shape[0], 1, *weights.shape[2:]))],
                                                    axis=1))
        node.input[0] = padded
    if source in ranges:
        ranges[padded] = ranges[source]
    return helper.make_node("Pad", [source, "input_channel_pads"], [padded], name="input_channel_pad",
                            mode="constant")


def rewrite_for_fast_int8(model: onnx.ModelProto, ranges: dict[str, TensorRange]) -> tuple[onnx.ModelProto,
                                                                                          dict[str, TensorRange]]:
    """The rewrites of the module docstring, on a copy of an FP32 model whose weights are initializers.

    Args:
        model: the FP32 ONNX model.
        ranges: its calibrated ranges (tensor -> range).

    Returns:
        (the rewritten model, the ranges with entries for the new tensors).
    """
    rewritten, ranges = onnx.ModelProto(), dict(ranges)
    rewritten.CopyFrom(model)
    graph = _Graph(rewritten)
    source = rewritten.graph.input[0].name
    input_convs, added = [], []
    for node in rewritten.graph.node:
        if node.op_type != "Conv" or node.input[1] not in graph.initializers or is_wrapper(node.name):
            continue  # the lab's wrapper around a user's model stays as it is (and in float)
        if _group(node) > 1:
            _densify(graph, node)
        if graph.array(node.input[1]).shape[0] % CHANNEL_MULTIPLE:
            added.append((node, _pad_outputs(graph, node, ranges)))
        if node.input[0] == source and graph.array(node.input[1]).shape[1] % CHANNEL_MULTIPLE == 3:
            input_convs.append(node)
    nodes = []
    if input_convs:
        nodes.append(_pad_input(graph, input_convs, ranges))
    after = {node.name: extra for node, extra in added}  # exported node names are unique
    for node in rewritten.graph.node:
        nodes.append(node)
        nodes.extend(after.get(node.name, []))
    del rewritten.graph.node[:]
    rewritten.graph.node.extend(nodes)
    onnx.checker.check_model(rewritten)
    return rewritten, ranges
