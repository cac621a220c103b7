"""The one index of an ONNX graph that every graph surgery reads: which node makes each tensor and which nodes read
it. Built once per graph (in graph order), it replaces the producer and consumer maps each writer, rewrite and
check used to build by hand."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

import numpy as np
import onnx


class GraphIndex:
    """Who makes and who reads each tensor of a graph's nodes (a model, a graph or a list of nodes)."""

    def __init__(self, source: onnx.ModelProto | onnx.GraphProto | Iterable[onnx.NodeProto]):
        graph = source.graph if isinstance(source, onnx.ModelProto) else source
        self.nodes: list[onnx.NodeProto] = list(graph.node if isinstance(graph, onnx.GraphProto) else graph)
        self.producers: dict[str, onnx.NodeProto] = {name: node for node in self.nodes for name in node.output
                                                      if name}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in self.nodes:
            for name in node.input:
                if name:
                    self.consumers.setdefault(name, []).append(node)

    def producer(self, tensor: str) -> onnx.NodeProto | None:
        """The node that makes `tensor` (None for a graph input or an initializer)."""
        return self.producers.get(tensor)

    def readers(self, tensor: str) -> list[onnx.NodeProto]:
        """The nodes that read `tensor`, in graph order."""
        return self.consumers.get(tensor, [])


@dataclass(frozen=True)
class GeluUnit:
    """An exact (erf) GELU as exporters write it, x * 0.5 * (1 + erf(x / sqrt(2))): one op to LiteRT (GELU) and
    QNN (Gelu), which quantize its input and output only."""

    input: str
    output: str
    nodes: tuple[str, ...]  # its node names, in graph order: Div (or Mul), Erf, Add, Mul, Mul


def gelu_units(index: GraphIndex, arrays: dict[str, np.ndarray]) -> list[GeluUnit]:
    """The erf GELUs among `index`'s nodes: x / sqrt(2) (or x * (1 / sqrt(2))), Erf, + 1, * x, * 0.5 (the two
    products in either order of their operands), each inner tensor read by the next node only; `arrays`: the
    graph's constants by name."""
    def constant(node: onnx.NodeProto, value: float) -> str | None:
        """The operand of `node` other than a constant equal to `value`, or None."""
        for k, name in enumerate(node.input):
            other = node.input[1 - k] if len(node.input) == 2 else None
            if name in arrays and arrays[name].size == 1 and math.isclose(float(arrays[name].reshape(())), value,
                                                                          rel_tol=1e-5):
                return other
        return None

    def only_reader(tensor: str, op_type: str) -> onnx.NodeProto | None:
        readers = index.readers(tensor)
        return readers[0] if len(readers) == 1 and readers[0].op_type == op_type else None

    units = []
    for erf in (n for n in index.nodes if n.op_type == "Erf"):
        scaled = index.producer(erf.input[0])
        x = scaled is not None and len(index.readers(erf.input[0])) == 1 and (
            constant(scaled, math.sqrt(2)) if scaled.op_type == "Div" and scaled.input[1] in arrays else
            constant(scaled, 1 / math.sqrt(2)) if scaled.op_type == "Mul" else None)
        plus = x and only_reader(erf.output[0], "Add")
        times = plus and constant(plus, 1.0) == erf.output[0] and only_reader(plus.output[0], "Mul")
        half = times and x in times.input and only_reader(times.output[0], "Mul")
        if half and constant(half, 0.5) == times.output[0]:
            units.append(GeluUnit(x, half.output[0], tuple(n.name for n in (scaled, erf, plus, times, half))))
    return units


def op_units(index: GraphIndex, arrays: dict[str, np.ndarray]) -> list[GeluUnit | L2NormUnit]:
    """Every group of nodes that LiteRT and QNN run as one INT8 op (`gelu_units`, `l2norm_units`)."""
    return [*gelu_units(index, arrays), *l2norm_units(index, arrays)]


@dataclass(frozen=True)
class L2NormUnit:
    """An L2 normalization as exporters write `F.normalize`, x / max(||x||_2, eps) along one axis: one op to
    LiteRT (L2_NORMALIZATION, on its fixed output grid) and QNN (L2Norm), which quantize its input and output
    only."""

    input: str
    output: str
    nodes: tuple[str, ...]  # its node names, in graph order: ReduceL2, Clip (or Max), [Expand,] Div
    axis: int


def l2norm_units(index: GraphIndex, arrays: dict[str, np.ndarray]) -> list[L2NormUnit]:
    """The L2 normalizations among `index`'s nodes: ReduceL2 of x along one axis (kept), a Clip (or Max) from below
    at a small constant, optionally an Expand, and a Div of x by it; each inner tensor read by the next node only;
    `arrays`: the graph's constants by name."""
    def only(tensor: str) -> bool:
        return len(index.readers(tensor)) == 1

    units = []
    for div in (n for n in index.nodes if n.op_type == "Div" and len(n.input) == 2):
        x, chain, tensor = div.input[0], [div], div.input[1]
        node = index.producer(tensor)
        if node is not None and node.op_type == "Expand" and only(tensor):
            chain, tensor = [node, *chain], node.input[0]
            node = index.producer(tensor)
        floor = node is not None and only(tensor) and node.op_type in ("Clip", "Max") and len(node.input) == 2 or (
            node is not None and node.op_type == "Clip" and len(node.input) == 3 and not node.input[2])
        floor = floor and only(tensor) and node.input[1] in arrays and float(
            np.asarray(arrays[node.input[1]]).reshape(-1)[0]) <= 1e-4
        reduce = floor and index.producer(node.input[0])
        if not reduce or reduce.op_type != "ReduceL2" or reduce.input[0] != x or not only(node.input[0]):
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in reduce.attribute}
        axes = list(attrs.get("axes", arrays.get(reduce.input[1], []) if len(reduce.input) > 1 else []))
        if attrs.get("keepdims", 1) != 1 or len(axes) != 1:
            continue
        units.append(L2NormUnit(x, div.output[0], tuple(n.name for n in (reduce, node, *chain)), int(axes[0])))
    return units


__all__ = ["GraphIndex", "GeluUnit", "gelu_units", "L2NormUnit", "l2norm_units", "op_units"]
