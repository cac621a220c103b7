"""The one index of an ONNX graph that every graph surgery reads: which node makes each tensor and which nodes read
it. Built once per graph (in graph order), it replaces the producer and consumer maps each writer, rewrite and
check used to build by hand."""
from __future__ import annotations

from typing import Iterable

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


__all__ = ["GraphIndex"]
