"""Function-preserving changes made to a model before it is quantized (PTQ refinements and QAT start from them):

- centred I/O (`sr.models.with_io_offset`): an 8-bit image's levels become exactly the INT8 values at step 1/255,
  so the input and output are quantized losslessly; those two ranges are fixed in advance;
- channel equalization: per-channel scales moved between a Conv and the Conv that reads it (through a ReLU, LeakyReLU, PReLU or a
  Concat), so a per-tensor INT8 range serves every channel (activation equalization, in the spirit of the
  cross-layer equalization of Nagel et al., ICCV 2019, which balances weights instead).

Both give a new model file (a weight file, or a standard ONNX graph for a user's model) computing the same
function to float rounding.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
import torch

from .calibrate import calibration_patches, load_calibration_images, prepare_calibration_images
from .models import (IO_OFFSET, RECORD_KEY, load_model, model_info, read_metadata, save_tuned, save_weights,
                     with_io_offset, with_values)
from .onnxtorch import OnnxModule
from .qdq import spec_of
from .quantize import Fixes, Scheme, fp32_onnx_path, moves_values
from .usermodel import known_input

log = logging.getLogger(__name__)

# activations f with f(e x) = e f(x) for e > 0, per channel: a per-channel scale passes through them unchanged
POSITIVE_HOMOGENEOUS = ("Relu", "LeakyRelu", "PRelu")


def prepare(model: str, io_offset: bool, equalize: float, patches: torch.Tensor | None,
            work: Path, scheme: Scheme | str = Scheme.TENSORRT) -> tuple[str, Fixes]:
    """The model to quantize and the ranges fixed in advance.

    Args:
        model: a shipped name, a weight file or a registered ONNX model.
        io_offset: centred I/O (the lab's architectures only; an ONNX model keeps its own I/O).
        equalize: channel-equalization strength (0: none).
        patches: calibration patches (needed when `equalize` > 0).
        work: where the changed model files go (`<work>.centred.safetensors`, `<work>.equalized.*`).
        scheme: the INT8 scheme the ranges are for.

    Returns:
        (the model name or file to quantize, the ranges fixed in advance: the centred input and output on the
        8-bit grid, step 1/255: +-127/255 for symmetric INT8 (-128/255 is then the level -128), -128/255..127/255
        for UINT8, whose zero point is then exactly 128).
    """
    structure, info = str(model), model_info(model)
    centred: list[str] = []
    if io_offset and info.uploaded:
        structure, centred = _centred_user_graph(model, work)
    elif io_offset:
        base = load_model(model)
        if not base.config.io_offset:
            structure = str(Path(f"{work}.centred.safetensors"))
            save_weights(with_io_offset(base, IO_OFFSET), structure, extra=_metadata(model))
    if equalize > 0:
        structure = _equalized(structure, equalize, patches, work)
    low = -127 / 255 if Scheme.parse(scheme).symmetric else -128 / 255
    if centred:  # a user's graph: every centred tensor its scheme quantizes, on the 8-bit grid of its range
        top = info.input_range[1]
        quantized = spec_of(onnx.load(str(fp32_onnx_path(structure))), scheme).activations
        return structure, Fixes(fixed_range={t: (low * top, 127 / 255 * top) for t in centred if t in quantized})
    if not load_io_offset(structure):
        return structure, Fixes()
    graph = onnx.load(str(fp32_onnx_path(structure)))
    return structure, Fixes(fixed_range={tensor: (low, 127 / 255) for tensor in io_tensors(graph)})


def _centred_user_graph(model: str, work: Path) -> tuple[str, list[str]]:
    """A user's graph with centred I/O built in (`centre_user_io`), saved and registered, and its centred tensors;
    or the graph as it is (with the reason logged) where centring would change its function."""
    graph = onnx.load(str(fp32_onnx_path(model)))
    try:
        centred_graph, centred = centre_user_io(graph, user_io(graph), model_info(model).input_range[1])
    except CentringImpossible as error:
        log.info("centred I/O left out for %s: %s", model, error)
        return str(model), []
    return save_tuned(model, centred_graph, {}, Path(f"{work}.centred.onnx")), centred


def remove_starting_points(work: Path) -> None:
    """Delete the files `prepare(..., work)` wrote (once the model made from them is saved)."""
    for kind in ("centred", "equalized"):
        for leftover in work.parent.glob(f"{work.name}.{kind}.*"):
            leftover.unlink(missing_ok=True)


def load_io_offset(model: str) -> float:
    """The centred-I/O offset of a model (0 for none, and for ONNX models)."""
    return model_info(model).io_offset()


def _metadata(model: str) -> dict:
    return {k: v for k, v in read_metadata(model).items() if k not in ("arch", "config", RECORD_KEY)}


def _equalized(structure: str, strength: float, patches: torch.Tensor, work: Path) -> str:
    """`structure` with its channels equalized, as a new file (registered, for an ONNX model)."""
    graph = onnx.load(str(fp32_onnx_path(structure)))
    changed = equalize_channels(graph, patches, strength)
    return save_tuned(structure, graph, changed, Path(f"{work}.equalized{model_info(structure).tuned_suffix}"))


def calibration_batch(calibration, scale: int, count: int = 32, size: int = 48, seed: int = 0) -> torch.Tensor:
    """`count` calibration patches of `size` px (network inputs: downscaled as the calibration says) as one batch.

    Raises:
        ValueError: no calibration image is that large once downscaled.
    """
    images = prepare_calibration_images(load_calibration_images(calibration.data), calibration, scale)
    patches = [p for p in calibration_patches(images, count * 2, size, seed) if p.shape[2:] == (size, size)][:count]
    if not patches:
        raise ValueError(f"no calibration image is {size} px on a side once downscaled")
    return torch.from_numpy(np.concatenate(patches))


def io_tensors(model: onnx.ModelProto) -> tuple[str, str]:
    """(the quantized image the network reads, the quantized image it writes) of a centred-I/O graph: the input
    after the offset and the padding, and the output before the offset is added back."""
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    tensor = model.graph.input[0].name
    while all(n.op_type in ("Sub", "Pad") for n in consumers.get(tensor, [])) and len(consumers[tensor]) == 1:
        tensor = consumers[tensor][0].output[0]
    producer = {name: node for node in model.graph.node for name in node.output}
    output = model.graph.output[0].name
    while producer[output].op_type == "Add":
        output = producer[output].input[0]
    return tensor, output


def equalizable_pairs(model: onnx.ModelProto) -> list[tuple[str, list[tuple[str, int]]]]:
    """Where per-channel scales can move between layers without changing the function: a Conv B whose input is
    made, through an optional ReLU, LeakyReLU or PReLU and/or a Concat, only by Convs (each feeding nothing else).
    Scaling channel c of a producer (its weights and bias) by e > 0 and B's weights for input channel c by 1 / e is
    exact (those activations commute with positive scaling, a PReLU's slopes staying per channel; Concat only
    stacks).

    Returns:
        [(B's output, [(a producer Conv's output, its first channel in B's input), ...])], in graph order.
    """
    producer = {o: n for n in model.graph.node for o in n.output}
    consumers: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1
    shapes = {i.name: tuple(i.dims) for i in model.graph.initializer}

    def conv_behind(tensor: str) -> str | None:
        node = producer.get(tensor)
        if node is not None and node.op_type in POSITIVE_HOMOGENEOUS and consumers.get(tensor) == 1:
            tensor, node = node.input[0], producer.get(node.input[0])
        ok = node is not None and node.op_type == "Conv" and consumers.get(tensor) == 1 and len(node.input) > 2
        return node.output[0] if ok else None

    pairs = []
    for node in model.graph.node:
        if node.op_type != "Conv" or node.input[1] not in shapes:
            continue
        source = producer.get(node.input[0])
        parts = list(source.input) if source is not None and source.op_type == "Concat" and \
            consumers.get(node.input[0]) == 1 else [node.input[0]]
        found, offset = [], 0
        for part in parts:
            conv = conv_behind(part)
            if conv is None:
                found = []
                break
            found.append((conv, offset))
            weight = producer[conv].input[1]
            offset += shapes[weight][0]
        if found:
            pairs.append((node.output[0], found))
    return pairs


@torch.no_grad()
def equalize_channels(model: onnx.ModelProto, x: torch.Tensor, strength: float = 0.5,
                      limit: float = 16.0) -> dict[str, np.ndarray]:
    """Activation equalization over `equalizable_pairs`: channel c of B's input, of peak |value| r_c on the patches
    `x` where the tensor's peak is R, is scaled by e_c = (R / r_c) ** strength (at most `limit`), so a per-tensor
    INT8 range serves the small channels better; B's weights take 1 / e_c. Pairs are done in graph order, each on
    the ranges left by the ones before.

    Args:
        model: the FP32 model (not changed).
        x: calibration patches.
        strength: 0 changes nothing, 1 gives every channel the tensor's peak.
        limit: the largest scale.

    Returns:
        {initializer name: new value} for the weights and biases that changed.
    """
    nodes = {n.output[0]: n for n in model.graph.node}
    values = {i.name: onnx.numpy_helper.to_array(i).astype(np.float32).copy() for i in model.graph.initializer}
    changed: dict[str, np.ndarray] = {}
    for consumer, producers in equalizable_pairs(model):
        b = nodes[consumer]
        trial = with_values(model, {**values, **changed})
        _, seen = OnnxModule(trial)(x, keep={b.input[0]})
        peaks = seen[b.input[0]].abs().amax(dim=(0, 2, 3)).numpy()
        if not peaks.max() > 0:
            continue
        scales = np.where(peaks > peaks.max() * 1e-6, (peaks.max() / np.maximum(peaks, 1e-30)) ** strength, 1.0)
        scales = np.clip(scales, 1.0, limit).astype(np.float32)
        for conv, first in producers:
            weight, bias = nodes[conv].input[1], nodes[conv].input[2]
            count = values[weight].shape[0]
            part = scales[first:first + count]
            changed[weight] = changed.get(weight, values[weight]) * part[:, None, None, None]
            changed[bias] = changed.get(bias, values[bias]) * part
        weight = b.input[1]
        group = next((a.i for a in b.attribute if a.name == "group"), 1)
        w = changed.get(weight, values[weight]).copy()
        per_group_in, per_group_out = w.shape[1], w.shape[0] // group
        for channel, e in enumerate(scales):
            g = channel // per_group_in
            w[g * per_group_out:(g + 1) * per_group_out, channel % per_group_in] /= e
        changed[weight] = w
    return changed


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
            if moves_values(node) and node.input[0] == current:
                frontier.append(node.output[0])
            elif node.op_type == "Conv":
                _centre_conv(c, node, current)
            elif node.op_type == "Shape":  # it reads only the shape, which the offset leaves alone
                continue
            else:
                raise CentringImpossible(f"the input reaches {_a(node.op_type)} ({node.name.removeprefix('user/')}) "
                                         "before any convolution, and an offset does not pass through it")


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


def centring_reason(model: str) -> str | None:
    """None when centred I/O can be built into `model` (the lab's architectures; a user's graph whose input
    reaches only convolutions and whose output comes from one), else why not, in words."""
    info = model_info(model)
    if not info.uploaded:
        return None
    graph = onnx.load(str(fp32_onnx_path(model)))
    try:
        centre_user_io(graph, user_io(graph), info.input_range[1])
    except CentringImpossible as error:
        return str(error)
    return None
