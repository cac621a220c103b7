"""Centred I/O built into a user's ONNX graph (inside the lab's wrapper), its function unchanged: the input read
as `x - offset`, the output written as `y - offset` with the offset added back, so that the quantized input and
output are an 8-bit image's levels exactly. Pure graph surgery: `sr.model.models.ModelInfo.centred_copy` uses it for a
user's model, as `sr.model.networks.with_io_offset` serves the lab's architectures. Also here: which ops only move values
(`moves_values`), which the known-input-range walk of `sr.run.quantize` shares.
"""
from __future__ import annotations

import numpy as np
import onnx

from .wrapper import known_input

IO_OFFSET = 128 / 255  # with this offset an 8-bit image's 256 levels are exactly the INT8 values at step 1/255


MOVERS = ("Identity", "Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "DepthToSpace", "SpaceToDepth")


def moves_values(node: onnx.NodeProto) -> bool:
    """Whether `node`'s output holds its first input's values, only moved about (transposed, reshaped, edge- or
    reflect-padded): the same range, and an offset added to the input passes through it unchanged."""
    mode = next((a.s for a in node.attribute if a.name == "mode"), b"constant")
    return node.op_type in MOVERS or (node.op_type == "Pad" and mode in (b"edge", b"reflect"))



class CentringImpossible(ValueError):
    """Centred I/O cannot be built into this graph without changing its function (the message says why)."""


def _a(op: str) -> str:
    return f"an {op}" if op[0] in "AEIOU" else f"a {op}"


def _attr(node: onnx.NodeProto, name: str, default=None):
    return next((onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


class _Centring:
    """The rewrite of `centre_user_io`, on a copy of the graph."""

    def __init__(self, model: onnx.ModelProto, offset: float):
        self.model = onnx.ModelProto()
        self.model.CopyFrom(model)
        self.graph, self.offset = self.model.graph, np.float32(offset)
        self.values = {i.name: onnx.numpy_helper.to_array(i) for i in self.graph.initializer}
        for node in self.graph.node:  # Constant nodes' values too (an exporter writes a Clip's limits so)
            value = _attr(node, "value") if node.op_type == "Constant" else None
            if value is not None:
                self.values[node.output[0]] = onnx.numpy_helper.to_array(value)
        self.centred: list[str] = []  # the tensors that now carry image levels minus the offset

    def consumers(self, tensor: str) -> list[onnx.NodeProto]:
        return [n for n in self.graph.node if tensor in n.input]

    def producer(self, tensor: str) -> onnx.NodeProto | None:
        return next((n for n in self.graph.node if tensor in n.output), None)

    def constant(self, name: str, value) -> str:
        self.graph.initializer.append(onnx.numpy_helper.from_array(np.asarray(value, np.float32), name))
        self.values[name] = np.asarray(value, np.float32)
        return name

    def drop_if_unread(self, tensor: str) -> None:
        """Remove the Constant node or initializer that gives `tensor` once nothing reads it."""
        if self.consumers(tensor):
            return
        for node in [n for n in self.graph.node if n.op_type == "Constant" and n.output[0] == tensor]:
            self.graph.node.remove(node)
        for initializer in [i for i in self.graph.initializer if i.name == tensor]:
            self.graph.initializer.remove(initializer)

    def insert_before(self, anchor: onnx.NodeProto, node: onnx.NodeProto) -> None:
        nodes = list(self.graph.node)
        self.graph.node.insert(nodes.index(anchor), node)

    def weights(self, node: onnx.NodeProto) -> np.ndarray:
        if len(node.input) < 2 or node.input[1] not in self.values:
            raise CentringImpossible(f"{node.op_type} {node.name} computes its weights instead of storing them")
        if len(node.input) > 2 and node.input[2] and node.input[2] not in self.values:
            raise CentringImpossible(f"{node.op_type} {node.name} computes its bias instead of storing it")
        return self.values[node.input[1]].astype(np.float32)

    def set_bias(self, node: onnx.NodeProto, bias: np.ndarray) -> None:
        """The node's bias becomes `bias`: in place when the node alone reads its initializer, else a new one."""
        current = node.input[2] if len(node.input) > 2 and node.input[2] else None
        initializer = next((i for i in self.graph.initializer if i.name == current), None)
        if initializer is not None and len(self.consumers(current)) == 1:
            initializer.CopyFrom(onnx.numpy_helper.from_array(bias.astype(np.float32), current))
            self.values[current] = bias
            return
        name = self.constant(f"{node.name}/centred_bias", bias)
        if len(node.input) > 2:
            node.input[2] = name
        else:
            node.input.append(name)

    def bias(self, node: onnx.NodeProto, channels: int) -> np.ndarray:
        has = len(node.input) > 2 and node.input[2]
        return self.values[node.input[2]].astype(np.float32) if has else np.zeros(channels, np.float32)


def _centre_input(c: _Centring, tensor: str) -> None:
    """The network reads `tensor - offset`: each Conv it reaches (through movers and Pads) gets the offset's
    contribution in its bias, and its zero padding becomes an explicit Pad of -offset (so a border pixel of 0
    stays 0)."""
    centred = f"{tensor}/centred"
    readers = c.consumers(tensor)
    if not readers:
        raise CentringImpossible("the input feeds nothing")
    sub = onnx.helper.make_node("Sub", [tensor, c.constant("centred/offset", c.offset)], [centred],
                                name="user/centred/input")
    c.insert_before(readers[0], sub)
    for node in readers:
        node.input[list(node.input).index(tensor)] = centred
    frontier = [centred]
    while frontier:
        current = frontier.pop()
        c.centred.append(current)
        for node in c.consumers(current):
            frontier.extend(_pass_offset(c, node, current))


def _pass_offset(c: _Centring, node, current: str) -> list[str]:
    """Where the centred input goes through `node`: on (a value mover's output), into a Conv's bias (nothing
    further), nowhere (a Shape reads only the shape, which the offset leaves alone); any other op refuses."""
    if moves_values(node) and node.input[0] == current:
        return [node.output[0]]
    if node.op_type == "Conv":
        _centre_conv(c, node, current)
        return []
    if node.op_type == "Shape":
        return []
    raise CentringImpossible(f"the input reaches {_a(node.op_type)} ({node.name.removeprefix('user/')}) before any "
                             "convolution, and an offset does not pass through it")


def _centre_conv(c: _Centring, node: onnx.NodeProto, current: str) -> None:
    if _attr(node, "auto_pad", b"NOTSET") not in (b"NOTSET", b"VALID"):
        raise CentringImpossible(f"Conv {node.name} pads itself by auto_pad; its padding cannot be made explicit")
    weight = c.weights(node)
    c.set_bias(node, c.bias(node, weight.shape[0]) + c.offset * weight.sum(axis=(1, 2, 3)))
    pads = list(_attr(node, "pads", [0] * 2 * (weight.ndim - 2)))
    if any(pads):
        padded = f"{node.name}/centred_padded"
        rank = weight.ndim  # N, C and the spatial axes
        full = [0, 0, *pads[:rank - 2], 0, 0, *pads[rank - 2:]]
        pad = onnx.helper.make_node("Pad", [current, _int_constant(c, f"{node.name}/centred_pads", full),
                                            c.constant(f"{node.name}/centred_pad_value", -c.offset)], [padded],
                                    name=f"{node.name}/centred_pad")
        c.insert_before(node, pad)
        node.input[0] = padded
        for attribute in node.attribute:
            if attribute.name == "pads":
                attribute.ints[:] = [0] * len(pads)
        c.centred.append(padded)


def _int_constant(c: _Centring, name: str, values) -> str:
    c.graph.initializer.append(onnx.numpy_helper.from_array(np.asarray(values, np.int64), name))
    return name


def _centre_output(c: _Centring, tensor: str) -> None:
    """The network writes `tensor - offset` (the last Conv's bias takes -offset, a Clip's limits move with it)
    and an Add puts the offset back, so the quantized output is on the centred grid."""
    chain, node = [], c.producer(tensor)
    while node is not None and (moves_values(node) or node.op_type == "Clip"):
        chain.append(node)
        node = c.producer(node.input[0])
    if node is None or node.op_type not in ("Conv", "ConvTranspose"):
        what = "the input" if node is None else f"{_a(node.op_type)} ({node.name.removeprefix('user/')})"
        raise CentringImpossible(f"the output comes from {what}, not a convolution, and an offset does not pass "
                                 "through it")
    between = [node.output[0], *(n.output[0] for n in reversed(chain))][:-1]
    if any(len(c.consumers(t)) != 1 for t in between):
        raise CentringImpossible("a tensor between the last convolution and the output is read elsewhere too")
    weight = c.weights(node)
    channels = weight.shape[0] if node.op_type == "Conv" else weight.shape[1] * _attr(node, "group", 1)
    c.set_bias(node, c.bias(node, channels) - c.offset)
    for clip in (n for n in chain if n.op_type == "Clip"):
        for index in (1, 2):
            if len(clip.input) > index and clip.input[index]:
                if clip.input[index] not in c.values:
                    raise CentringImpossible(f"Clip {clip.name} computes its limits")
                previous = clip.input[index]
                clip.input[index] = c.constant(f"{clip.name}/centred_limit_{index}", c.values[previous] - c.offset)
                c.drop_if_unread(previous)
    last = chain[0] if chain else node
    last.output[0] = f"{tensor}/centred"
    c.centred += [*between, f"{tensor}/centred"]
    c.graph.node.insert(list(c.graph.node).index(last) + 1, onnx.helper.make_node(
        "Add", [f"{tensor}/centred", "centred/offset"], [tensor], name="user/centred/output"))


def centre_user_io(model: onnx.ModelProto, tensors: tuple[str, str], top: float) -> tuple[onnx.ModelProto, list[str]]:
    """Centred I/O built into a user's graph inside the lab's wrapper: its input is read as `x - offset` and its
    output written as `y - offset` with the offset added back (offset `IO_OFFSET * top`), the function unchanged,
    so that the quantized input and output are an 8-bit image's levels exactly.

    Args:
        model: the standard graph.
        tensors: (the user's input tensor, the user's output tensor).
        top: the top of the input's range (1 or 255).

    Returns:
        (the changed graph, the centred tensors: the ranges fixed in advance go on those a scheme quantizes).

    Raises:
        CentringImpossible: the input reaches something other than convolutions (through ops that only move
            values), or the output does not come from one; the message names the op.
    """
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < 11:
        raise CentringImpossible(f"the graph is opset {opset}; the explicit padding needs opset 11 or later")
    if any(node.name == "user/centred/input" for node in model.graph.node):
        raise CentringImpossible("the graph is centred already")
    c = _Centring(model, IO_OFFSET * top)
    _centre_input(c, tensors[0])
    _centre_output(c, tensors[1])
    return c.model, list(dict.fromkeys(c.centred))


def user_io(model: onnx.ModelProto) -> tuple[str, str]:
    """(the user's input tensor, the user's output tensor) of a standard graph: what the wrapper feeds the user's
    graph, and the user's tensor the wrapper reads."""
    inside = {o for n in model.graph.node if not n.name.startswith("standard/") for o in n.output}
    read = [i for n in model.graph.node if n.name.startswith("standard/") for i in n.input if i in inside]
    outputs = [o.name for o in model.graph.output if o.name in inside]
    return known_input(model)[0], (read or outputs)[-1]
