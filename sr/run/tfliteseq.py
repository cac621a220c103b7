"""The token ops of a .tflite, for the op-by-op writer (`sr.run.tflite`): what an attention block (SwinIR-,
Restormer-like) is made of, in LiteRT's INT8 builtins.

An ONNX tensor is stored in the .tflite in a *layout*: the order of its ONNX dimensions in the stored tensor
(NCHW images are stored NHWC, [0, 2, 3, 1]; a [B, C, H x W] reshape of one is stored [B, H x W, C], [0, 2, 1]).
A Transpose is then no op at all (the same stored tensor, another layout), and a TRANSPOSE is written only where
an op needs its dimension stored last (a Softmax, a norm) or an image op needs NHWC (`moved`); a Reshape is
RESHAPE where the
dimensions it merges or splits lie together in the stored order (its shape read at run time from a tensor that
has the size, SHAPE and STRIDED_SLICE, where more than one dimension follows the image's size); MatMul is
FULLY_CONNECTED (a constant weight, INT8 per output channel, `keep_num_dims`) or BATCH_MATMUL (two activations,
each read transposed where its layout has it so: `adj_x`, `adj_y`); Slice is STRIDED_SLICE (its bounds on a
dimension the image decides kept relative: -1, or to the end); Div of an activation by a constant is MUL by
its reciprocal (of two activations, refused: LiteRT's DIV has no INT8); Softmax is SOFTMAX on
its fixed grid; an exact GELU (`sr.graph.gelu_units`) is GELU; an exported F.normalize (`sr.graph.l2norm_units`) is
L2_NORMALIZATION on its fixed grid; a LayerNormalization, which LiteRT has no builtin
for, is MEAN, SUB, L2_NORMALIZATION (its fixed grid, 1 / 128) and MUL by sqrt(C) x its scale, ADD of its bias:
(x - mean) / sqrt(var) = sqrt(C) (x - mean) / ||x - mean||, every tensor INT8 (x - mean on a grid twice x's step;
the LayerNorm's epsilon, 1e-5 against token variances, is left out). A float scalar computed from the image's size
(an attention's 1 / sqrt(H x W)) is an exact INT8 constant (64 at step |c| / 64), as a converter folds it, so such a
graph is written for one size at a time (`SizeDependent` when no size is given; a fixed-size graph at its own).

`writer` below is the op-by-op writer: its `flat`, constant `arrays`, the spec's `weights`, `layouts`, the ONNX
shapes it probed (`shapes`), its tensors' `qparams`, `int8` and `int32` constants, and `size` (the image size it writes for, or None).
"""
from __future__ import annotations

import math

import numpy as np

from ..quant.quantspec import exact_int8, weight_int8
from .tflitefile import TfliteUnsupported, attribute

NHWC = [0, 2, 3, 1]  # an NCHW image's layout in the .tflite


class SizeDependent(TfliteUnsupported):
    """A graph whose arithmetic depends on the image's size (a float computed from it): written per size."""


def layout_of(writer, name: str) -> list[int]:
    """The stored order of `name`'s ONNX dimensions (an image's, NHWC, unless an op set another)."""
    if name in writer.layouts:
        return writer.layouts[name]
    rank = len(writer.shape_pair(name)[0])
    if rank != 4:
        raise TfliteUnsupported(f"tensor {name!r} (rank {rank}) has no stored layout")
    return NHWC


def stored(writer, name: str, layout: list[int]) -> tuple[list[int], list[int]]:
    """`name`'s stored dimensions at the writer's two probe sizes."""
    return tuple([shape[d] for d in layout] for shape in writer.shape_pair(name))


def _signature(first: list[int], second: list[int]) -> list[int]:
    """A stored shape as the .tflite states it: -1 where the two probe sizes differ (the image's size decides)."""
    return [a if a == b else -1 for a, b in zip(first, second)]


def made(writer, name: str, layout: list[int]) -> int:
    """The .tflite tensor of activation `name` stored in `layout` (-1 where the image's size decides)."""
    signature = _signature(*stored(writer, name, layout))
    writer.layouts[name] = layout
    writer.channels[name] = signature[-1]
    return writer.flat.tensor(name, None, writer.qparams(name), signature=signature)


def _source(writer, name: str) -> int:
    """The stored tensor of activation `name` (any layout)."""
    if name not in writer.flat.index:
        raise TfliteUnsupported(f"tensor {name!r} is read before it is made")
    return writer.flat.index[name]


def moved(writer, name: str, wanted: list[int]) -> None:
    """`name` stored in layout `wanted`: a TRANSPOSE where it is stored otherwise, and `name` stands for its
    output from then on."""
    layout = layout_of(writer, name)
    if layout == wanted:
        return
    signature = _signature(*stored(writer, name, wanted))
    tensor = writer.flat.tensor(f"{name}_{''.join(map(str, wanted))}", None, writer.qparams(name),
                                signature=signature)
    writer.flat.operator("TRANSPOSE", [_source(writer, name), writer.int32(f"{name}_perm{len(writer.flat.tensors)}",
                                                                            [layout.index(d) for d in wanted])],
                         [tensor], writer.flat.schema.TransposeOptionsT(), "TransposeOptions")
    writer.flat.index[name], writer.layouts[name], writer.channels[name] = tensor, wanted, signature[-1]


def _last_is(writer, name: str, axis: int) -> list[int]:
    """`name`'s layout with ONNX dimension `axis` stored last (what a row-wise op works along): where the graph
    has it elsewhere, moved there (the ONNX order with `axis` last)."""
    layout = layout_of(writer, name)
    axis %= len(layout)
    if layout[-1] != axis:
        moved(writer, name, [d for d in range(len(layout)) if d != axis] + [axis])
    return layout_of(writer, name)


def write_transpose(writer, node) -> None:
    """No op: the output is the input's stored tensor in the permuted layout (a Transpose's grid is its input's)."""
    perm = [int(p) for p in attribute(node, "perm", [])]
    layout = layout_of(writer, node.input[0])
    if sorted(perm) != list(range(len(layout))):
        raise TfliteUnsupported(f"Transpose {node.name!r}: perm {perm}")
    inverse = [perm.index(d) for d in range(len(perm))]
    writer.flat.index[node.output[0]] = _source(writer, node.input[0])
    writer.layouts[node.output[0]] = [inverse[d] for d in layout]
    writer.channels[node.output[0]] = writer.channels.get(node.input[0], 0)


def _groups(before: list[int], after: list[int]) -> list[tuple[list[int], list[int]]]:
    """The dimensions a reshape merges or splits: (input dims, output dims) whose sizes multiply alike."""
    groups, i, j = [], 0, 0
    while i < len(before) and j < len(after):
        ins, outs = [i], [j]
        left, right = before[i], after[j]
        while left != right:
            if left < right and i + 1 < len(before):
                i += 1
                ins.append(i)
                left *= before[i]
            elif right < left and j + 1 < len(after):
                j += 1
                outs.append(j)
                right *= after[j]
            else:
                return []
        groups.append((ins, outs))
        i, j = i + 1, j + 1
    if groups:  # trailing ones join the last group
        groups[-1][0].extend(range(i, len(before)))
        groups[-1][1].extend(range(j, len(after)))
    return groups


def write_reshape(writer, node) -> None:
    """RESHAPE (or no op, where the stored tensor keeps its shape), in the layout where the merged or split
    dimensions stay together."""
    source, target = node.input[0], node.output[0]
    (in1, in2), (out1, out2) = writer.shape_pair(source), writer.shape_pair(target)
    groups = _groups(in1, out1)
    if not groups or any(math.prod(a[d] for d in ins) != math.prod(b[d] for d in outs)
                         for a, b in ((in1, out1), (in2, out2)) for ins, outs in groups):
        raise TfliteUnsupported(f"Reshape {node.name!r} ({in1} -> {out1}) does not merge or split whole dimensions")
    layout = layout_of(writer, source)
    owner = {d: k for k, (ins, _) in enumerate(groups) for d in ins}
    order: list[int] = []
    for position, d in enumerate(layout):
        if not order or order[-1] != owner[d]:
            order.append(owner[d])
        elif layout[position - 1] > d:
            order = []
            break
    if len(order) != len(groups):
        raise TfliteUnsupported(f"Reshape {node.name!r}: the dimensions it merges are not together in the .tflite's "
                                f"NHWC order ({in1} stored as {[in1[d] for d in layout]})")
    result = [d for k in order for d in groups[k][1]]
    was, now = stored(writer, source, layout), (([out1[d] for d in result]), [out2[d] for d in result])
    if was == now:
        writer.flat.index[target] = _source(writer, source)
        writer.layouts[target], writer.channels[target] = result, writer.channels.get(source, 0)
        return
    shape = _shape_tensor(writer, node, now)
    tensor = made(writer, target, result)
    writer.flat.operator("RESHAPE", [_source(writer, source), shape], [tensor], writer.flat.schema.ReshapeOptionsT(),
                         "ReshapeOptions")


def _shape_tensor(writer, node, dims: tuple[list[int], list[int]]) -> int:
    """An INT32 shape of `dims` (at the two probe sizes): constants, one -1, and sizes read at run time (SHAPE,
    STRIDED_SLICE, CONCATENATION) from a written tensor with the same size where more follow the image."""
    first, second = dims
    varying = [k for k, (a, b) in enumerate(zip(first, second)) if a != b]
    if len(varying) <= 1:
        return writer.int32(f"{node.name}_shape", [-1 if k in varying else a for k, a in enumerate(first)])
    schema = writer.flat.schema
    pieces = []
    for k, (a, b) in enumerate(zip(first, second)):
        if a == b:
            pieces.append(writer.int32(f"{node.name}_d{k}", [a]))
            continue
        found = next(((name, position, len(dims[0])) for name in list(writer.flat.index)
                      for dims in [_stored_any(writer, name)] for position, (x, y) in enumerate(zip(*dims))
                      if (x, y) == (a, b)), None)
        if found is None:
            raise TfliteUnsupported(f"Reshape {node.name!r}: no written tensor has its size {a} (at one probe size)")
        shape = writer.flat.plain(f"{node.name}_shape{k}", [found[2]], schema.TensorType.INT32)
        options = schema.ShapeOptionsT()
        options.outType = schema.TensorType.INT32
        writer.flat.operator("SHAPE", [writer.flat.index[found[0]]], [shape], options, "ShapeOptions")
        piece = writer.flat.plain(f"{node.name}_d{k}", [1], schema.TensorType.INT32)
        writer.flat.operator("STRIDED_SLICE", [shape, writer.int32(f"{node.name}_b{k}", [found[1]]),
                                               writer.int32(f"{node.name}_e{k}", [found[1] + 1]),
                                               writer.int32(f"{node.name}_s{k}", [1])], [piece],
                             schema.StridedSliceOptionsT(), "StridedSliceOptions")
        pieces.append(piece)
    joined = writer.flat.plain(f"{node.name}_shape", [len(first)], schema.TensorType.INT32)
    options = schema.ConcatenationOptionsT()
    options.axis = 0
    writer.flat.operator("CONCATENATION", pieces, [joined], options, "ConcatenationOptions")
    return joined


def _stored_any(writer, name: str) -> tuple[list[int], list[int]]:
    """`name`'s stored dimensions at the two probe sizes (empty where it has no known shape or layout)."""
    try:
        return stored(writer, name, layout_of(writer, name))
    except TfliteUnsupported:
        return [], []


def write_slice(writer, node) -> None:
    """STRIDED_SLICE of one or more axes with constant starts, ends and steps (an exporter's chunk)."""
    bounds = [*node.input[1:], "", "", "", ""][:4]  # starts, ends, axes, steps (the last two optional)
    starts, ends, axes, steps = (np.asarray(writer.value_of(t) if t else np.array([])).reshape(-1) for t in bounds)
    layout = layout_of(writer, node.input[0])
    rank = len(layout)
    if not len(starts) or len(ends) != len(starts):
        raise TfliteUnsupported(f"Slice {node.name!r}: its bounds follow the image's size")
    axes = axes if len(axes) else np.arange(len(starts))
    steps = steps if len(steps) else np.ones(len(starts), np.int64)
    first, second = writer.shape_pair(node.input[0])
    begin, end, stride, begin_mask, end_mask = [0] * rank, [0] * rank, [1] * rank, 0, 0
    for k in range(rank):
        begin_mask, end_mask = begin_mask | 1 << k, end_mask | 1 << k
    for start, stop, axis, step in zip(starts, ends, axes, steps):
        axis = int(axis) % rank
        position = layout.index(axis)
        size, fixed = first[axis], first[axis] == second[axis]
        whole = stop >= 2 ** 30  # an exporter's "to the end" (INT64_MAX, INT32_MAX)
        if step != 1 or (not fixed and not (whole or stop < 0) or not fixed and start >= min(first[axis],
                                                                                                  second[axis])):
            raise TfliteUnsupported(f"Slice {node.name!r}: step {step}, or bounds within a size the image decides")
        begin[position] = int(start if not fixed else start + size if start < 0 else min(start, size))
        begin_mask &= ~(1 << position)
        if not whole and (not fixed or stop < size):
            end[position] = int(stop if not fixed or stop >= 0 else stop + size)
            end_mask &= ~(1 << position)
    schema = writer.flat.schema
    options = schema.StridedSliceOptionsT()
    options.beginMask, options.endMask = begin_mask, end_mask
    tensor = made(writer, node.output[0], layout)
    writer.flat.operator("STRIDED_SLICE", [_source(writer, node.input[0]), writer.int32(f"{node.name}_b", begin),
                                           writer.int32(f"{node.name}_e", end), writer.int32(f"{node.name}_s", stride)],
                         [tensor], options, "StridedSliceOptions")


def write_matmul(writer, node) -> None:
    """FULLY_CONNECTED by a constant [K, N] weight (INT8 per output channel, or per tensor, as the spec has it),
    or BATCH_MATMUL of two activations."""
    left, right = node.input[0], node.input[1]
    schema = writer.flat.schema
    if right in writer.arrays:
        if right not in writer.weights or np.asarray(writer.arrays[right]).ndim != 2:
            raise TfliteUnsupported(f"MatMul {node.name!r}: its weight {right!r} is not a quantized [K, N] matrix")
        layout = _last_is(writer, left, -1)
        weight = np.asarray(writer.arrays[right], np.float32)
        axis = writer.weights[right].axis
        quantized, steps = weight_int8(weight, None if axis is None else 1)
        filter_ = writer.flat.tensor(f"{right}_int8", None, (np.atleast_1d(steps), np.zeros(np.size(steps), np.int64)),
                                     np.ascontiguousarray(quantized.T), schema.TensorType.INT8)
        options = schema.FullyConnectedOptionsT()
        options.keepNumDims = True
        tensor = made(writer, node.output[0], layout)
        writer.flat.operator("FULLY_CONNECTED", [_source(writer, left), filter_, -1], [tensor], options,
                             "FullyConnectedOptions")
        return
    rank = len(writer.shape_pair(left)[0])
    adjoint = []
    for name in (left, right):
        layout = layout_of(writer, name)
        if len(layout) != rank or layout[:-2] != list(range(rank - 2)) or sorted(layout[-2:]) != [rank - 2, rank - 1]:
            raise TfliteUnsupported(f"MatMul {node.name!r}: {name!r} is stored with its batch dimensions moved")
        adjoint.append(layout[-1] == rank - 2)
    options = schema.BatchMatMulOptionsT()
    options.adjX, options.adjY = adjoint
    tensor = made(writer, node.output[0], list(range(rank)))
    writer.flat.operator("BATCH_MATMUL", [_source(writer, left), _source(writer, right)], [tensor], options,
                         "BatchMatMulOptions")


def write_softmax(writer, node) -> None:
    """SOFTMAX along the last stored dimension (its output on LiteRT's fixed grid, as the spec has it)."""
    opset = next((o.version for o in writer.model.opset_import if o.domain in ("", "ai.onnx")), 13)
    axis = int(attribute(node, "axis", -1 if opset >= 13 else 1))
    rank = len(writer.shape_pair(node.input[0])[0])
    if opset < 13 and axis % rank != rank - 1:
        raise TfliteUnsupported(f"Softmax {node.name!r}: opset {opset}'s softmax flattens from axis {axis}")
    layout = _last_is(writer, node.input[0], axis)
    options = writer.flat.schema.SoftmaxOptionsT()
    options.beta = 1.0
    tensor = made(writer, node.output[0], layout)
    writer.flat.operator("SOFTMAX", [_source(writer, node.input[0])], [tensor], options, "SoftmaxOptions")


def write_gelu(writer, unit) -> None:
    """GELU (exact: `approximate` off) of an erf GELU unit, its input and output on the spec's grids."""
    layout = layout_of(writer, unit.input)
    options = writer.flat.schema.GeluOptionsT()
    options.approximate = False
    tensor = made(writer, unit.output, layout)
    writer.flat.operator("GELU", [_source(writer, unit.input)], [tensor], options, "GeluOptions")


def write_l2_norm(writer, unit) -> None:
    """L2_NORMALIZATION of an exported F.normalize (`sr.graph.l2norm_units`) along its axis, stored last; its
    output on the fixed 1 / 128 grid (the spec's)."""
    layout = _last_is(writer, unit.input, unit.axis)
    tensor = made(writer, unit.output, layout)
    writer.flat.operator("L2_NORMALIZATION", [_source(writer, unit.input)], [tensor],
                         writer.flat.schema.L2NormOptionsT(), "L2NormOptions")


def write_layernorm(writer, node) -> None:
    """MEAN, SUB, L2_NORMALIZATION, MUL by sqrt(C) x scale, ADD of the bias (see the module docstring)."""
    x, out = node.input[0], node.output[0]
    rank = len(writer.shape_pair(x)[0])
    axis = int(attribute(node, "axis", -1)) % rank
    if axis != rank - 1:
        raise TfliteUnsupported(f"LayerNormalization {node.name!r}: over dimensions {axis}.. (the last only is written)")
    layout = _last_is(writer, x, -1)
    gamma = np.asarray(writer.arrays.get(node.input[1], np.array([])), np.float32).reshape(-1)
    beta = np.asarray(writer.arrays[node.input[2]], np.float32).reshape(-1) if len(node.input) > 2 and node.input[2] \
        else np.zeros_like(gamma)
    first, second = stored(writer, x, layout)
    channels = first[-1]
    if first[-1] != second[-1] or gamma.size not in (1, channels) or beta.size not in (1, channels):
        raise TfliteUnsupported(f"LayerNormalization {node.name!r}: its scale and bias are not one per channel")
    schema, flat = writer.flat.schema, writer.flat
    signature = _signature(first, second)
    x_scale, x_zero = writer.qparams(x)
    low, high = (-128 - x_zero) * x_scale, (127 - x_zero) * x_scale
    mean = flat.tensor(f"{node.name}_mean", None, (x_scale, x_zero), signature=[*signature[:-1], 1])
    options = schema.ReducerOptionsT()
    options.keepDims = True
    flat.operator("MEAN", [_source(writer, x), writer.int32(f"{node.name}_axis", [rank - 1])], [mean], options,
                  "ReducerOptions")
    centred = flat.tensor(f"{node.name}_centred", None, ((high - low) / 127.0, 0), signature=signature)
    flat.operator("SUB", [_source(writer, x), mean], [centred], schema.SubOptionsT(), "SubOptions")
    unit = flat.tensor(f"{node.name}_unit", None, (1.0 / 128.0, 0), signature=signature)
    flat.operator("L2_NORMALIZATION", [centred], [unit], schema.L2NormOptionsT(), "L2NormOptions")
    factor = np.broadcast_to(gamma * np.float32(math.sqrt(channels)), (channels,)).astype(np.float32)
    factor_tensor = writer.int8(f"{node.name}_factor", factor.reshape([1] * (rank - 1) + [channels]))
    top = float(np.abs(factor).max(initial=0.0)) or 1.0
    scaled = flat.tensor(f"{node.name}_scaled", None, (top / 127.0, 0), signature=signature)
    flat.operator("MUL", [unit, factor_tensor], [scaled], schema.MulOptionsT(), "MulOptions")
    shift_tensor = writer.int8(f"{node.name}_shift", np.broadcast_to(beta, (channels,)).reshape(
        [1] * (rank - 1) + [channels]))
    tensor = made(writer, out, layout)
    flat.operator("ADD", [scaled, shift_tensor], [tensor], schema.AddOptionsT(), "AddOptions")


def sized_constant(writer, node, name: str) -> int:
    """A float scalar that `node` reads, computed from the image's size, as an exact INT8 constant for the size
    being written (its reciprocal for a Div's divisor)."""
    sizes = writer.probe_sizes()
    size = writer.size or (sizes[0] if sizes[0] == sizes[1] else None)  # a fixed-size graph: its own size
    if size is None:
        raise SizeDependent(f"{node.op_type} {node.name!r} reads {name!r}, a float computed from the image's size: "
                            "the .tflite is written for one size at a time")
    value = np.asarray(writer.at_size([name], size)[0], np.float64).reshape(-1)
    if value.size != 1 or not np.isfinite(value[0]) or value[0] == 0:
        raise TfliteUnsupported(f"{node.op_type} {node.name!r}: {name!r} is not one finite non-zero number")
    level, step = exact_int8(1.0 / float(value[0]) if node.op_type == "Div" else float(value[0]))
    return writer.flat.tensor(f"{name}_int8_{size[0]}x{size[1]}", None, (np.array([step]), np.zeros(1, np.int64)),
                              np.array([level], np.int8), writer.flat.schema.TensorType.INT8)


def _constant(writer, node, name: str, rank: int) -> int:
    """An element-wise op's constant as an INT8 tensor (per tensor) broadcasting over a stored activation of
    `rank`: one value, or one per ONNX last dimension (stored last); a Div's divisor as its reciprocal."""
    if name not in writer.weights:
        raise TfliteUnsupported(f"{node.op_type} {node.name!r}: its constant {name!r} is not quantized by the spec")
    values = np.asarray(writer.arrays[name], np.float32)
    if node.op_type == "Div":
        values = 1.0 / values
    if values.size != 1:
        if values.size != values.shape[-1] or values.ndim > rank:
            raise TfliteUnsupported(f"{node.op_type} {node.name!r}: a constant of shape {list(values.shape)} (one "
                                    "value, or one per last dimension, is written)")
        values = values.reshape([1] * (rank - 1) + [-1])
    return writer.int8(f"{name}_int8", values)


def sequence_binary(writer, node, op: str, options, kind: str) -> None:
    """ADD, SUB or MUL where an operand is stored in a token layout: activations of one layout, constants of one
    value or one per last dimension, and a size-derived scalar (`sized_constant`)."""
    activations = [t for t in node.input if t in writer.flat.index]
    layouts = {tuple(layout_of(writer, t)) for t in activations}
    if len(layouts) != 1 or (len(activations) == 2 and writer.shape_pair(activations[0]) !=
                             writer.shape_pair(activations[1])):
        raise TfliteUnsupported(f"{node.op_type} {node.name!r}: operands stored in different layouts or shapes")
    layout = list(layouts.pop())
    if any(name in writer.arrays and np.size(writer.arrays[name]) > 1 for name in node.input):
        layout = _last_is(writer, activations[0], -1)  # (before its stored tensor is read below)
    inputs = [_source(writer, name) if name in writer.flat.index else
              _constant(writer, node, name, len(layout)) if name in writer.arrays else
              sized_constant(writer, node, name) for name in node.input]
    tensor = made(writer, node.output[0], layout)
    writer.flat.operator(op, inputs, [tensor], options, kind)


__all__ = ["SizeDependent", "NHWC", "layout_of", "moved", "write_transpose", "write_reshape", "write_slice", "write_matmul",
           "write_softmax", "write_gelu", "write_l2_norm", "write_layernorm", "sequence_binary", "sized_constant"]
