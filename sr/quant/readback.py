"""What a written QDQ model quantizes, read back from its Q/DQ nodes and named as in the FP32 graph it was written
from (`graph_quantization`), so that the file and its spec (`sr.quant.quantspec`) can be compared; and the FP32
weight a DequantizeLinear of a constant stands for (`fp32_initializer_of`).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from ..graph import GraphIndex
from .quantspec import constant_names


@dataclass(frozen=True)
class GraphQuantization:
    """What a written QDQ model quantizes, read from its Q/DQ nodes."""

    activations: dict[str, tuple[float, int]]  # FP32 tensor name -> (scale, zero point)
    weights: dict[str, int | None]  # FP32 weight name -> per-channel axis (None: one scale)


def graph_quantization(qdq: onnx.ModelProto, fp32: onnx.ModelProto) -> GraphQuantization:
    """The activations and weights a QDQ model quantizes, named as in its FP32 graph.

    An activation is quantized where a QuantizeLinear reads it (or reads the renamed producer output of a
    quantized graph output); a weight where a DequantizeLinear reads an INT8 initializer that replaces an FP32
    weight. Tensors a writer added (a rewrite's padding) are reported under their own names.

    Args:
        qdq: the QDQ model.
        fp32: the FP32 model it was written from.

    Returns:
        the GraphQuantization.
    """
    initializers = {i.name: onnx.numpy_helper.to_array(i) for i in qdq.graph.initializer}
    fp32_outputs = {o.name for o in fp32.graph.output}
    consumers = GraphIndex(qdq).consumers
    activations, weights = {}, {}
    fp32_weights = constant_names(fp32)
    for node in qdq.graph.node:
        if node.op_type == "QuantizeLinear" and node.input[0] not in initializers:
            tensor = node.input[0]
            for dq in consumers.get(node.output[0], []):  # a graph output's pair ends in the output's own name
                if dq.op_type == "DequantizeLinear" and dq.output[0] in fp32_outputs:
                    tensor = dq.output[0]
            zero = int(initializers[node.input[2]]) if len(node.input) > 2 else 0
            activations[tensor] = (float(initializers[node.input[1]]), zero)
        elif node.op_type == "DequantizeLinear" and node.input[0] in initializers \
                and initializers[node.input[0]].dtype == np.int8:
            name = fp32_initializer_of(node, consumers, fp32, fp32_weights) or node.input[0]
            scale = initializers[node.input[1]]
            weights[name] = next((a.i for a in node.attribute if a.name == "axis"), 1) if scale.ndim else None
    return GraphQuantization(activations, weights)


def fp32_initializer_of(dq: onnx.NodeProto, consumers: dict, fp32: onnx.ModelProto, names: set[str]) -> str | None:
    """The FP32 initializer that a QDQ model's DequantizeLinear of a constant stands for: the input in the same slot
    of the same node of the FP32 graph (matched by its name, when that name is unique), else the initializer the
    writers named its INT8 copy after (`<name>_quantized`).

    Args:
        dq: the DequantizeLinear.
        consumers: {tensor: nodes of the QDQ model that read it}.
        fp32: the FP32 model.
        names: the FP32 model's initializer names.

    Returns:
        the name, or None when neither way finds one.
    """
    for user in consumers.get(dq.output[0], []):
        matches = [n for n in fp32.graph.node if n.name and n.name == user.name and n.op_type == user.op_type]
        if len(matches) == 1:
            slot = list(user.input).index(dq.output[0])
            if slot < len(matches[0].input) and matches[0].input[slot] in names:
                return matches[0].input[slot]
    stem = dq.input[0].removesuffix("_quantized")
    return stem if stem in names else None


__all__ = ["GraphQuantization", "graph_quantization", "fp32_initializer_of"]
