"""ModelOpt's rules for what TensorRT fuses, which the `tensorrt` spec (`sr.quant.quantspec`) follows: a Conv too
small for TensorRT's INT8 kernels stays in float (`conv_too_small`), and the branch of a residual Add that TensorRT
fuses into the Conv producing it gets no Q/DQ (`non_residual_input`, with ModelOpt's backward walk along the
fusible paths). Pure graph reading: nodes, their producers and the constant tensors in, names out.
"""
from __future__ import annotations

import numpy as np
import onnx


def conv_too_small(node: onnx.NodeProto, weight: np.ndarray | None, graph_inputs: set[str]) -> bool:
    """ModelOpt's `find_nodes_from_convs_to_exclude` for INT8: a Conv with fewer than 16 channels on both sides is
    left in float unless TensorRT has a kernel for it."""
    if weight is None or weight.ndim not in (3, 4, 5):
        return True  # a non-constant weight: ModelOpt skips the Conv
    out_channels, in_channels = weight.shape[0], weight.shape[1]
    if out_channels >= 16 and in_channels >= 16:
        return False
    group = next((a.i for a in node.attribute if a.name == "group"), 1)
    kernel = next((list(a.ints) for a in node.attribute if a.name == "kernel_shape"), list(weight.shape[2:]))
    if group == 1 and (out_channels % 8 == 0 or in_channels % 8 == 0) and len(set(kernel)) == 1 and (
            node.input[0] in graph_inputs or out_channels >= 16 or in_channels >= 16):
        return False
    return not (group > 1 and out_channels % 8 == 0 and all(k >= 3 for k in kernel))


# ModelOpt's `get_fusible_backbone`: the backward paths from an Add's input to a Conv that TensorRT fuses
# (BiasAdd / ConstMul: an Add / Mul with a constant input, optional), copy ops allowed anywhere along them
_FUSIBLE_PATHS = [[*head, conv] for conv in ("Conv", "ConvTranspose") for head in (
    ["BiasAdd", "ConstMul"], ["Relu", "BiasAdd", "ConstMul"], ["BatchNormalization", "BiasAdd"],
    ["Relu", "BatchNormalization", "BiasAdd"], ["MaxPool", "Relu", "BatchNormalization", "BiasAdd"],
    ["Mul", "Sigmoid", "BatchNormalization"])]
_OPTIONAL = ("BiasAdd", "ConstMul")
_COPY_OPS = ("Flatten", "Transpose", "Concat", "Split", "Squeeze", "Expand", "ReverseSequence", "Reshape", "Tile",
             "Gather", "Slice", "GatherElements", "GatherND", "ScatterElements", "ScatterND", "OneHot")


def _kind(node: onnx.NodeProto, constants: set[str]) -> str:
    if node.op_type in ("Add", "Mul") and any(t in constants for t in node.input):
        return "BiasAdd" if node.op_type == "Add" else "ConstMul"
    return node.op_type


def _on_path(node, path: list[str], producers: dict, constants: set[str]) -> bool:
    """True when a backward path of `path`'s op types starts at `node` (ModelOpt's `has_path_type`)."""
    if not path:
        return True
    kind = _kind(node, constants)
    parents = [producers[t] for t in node.input if t in producers and t not in constants]
    if kind == path[0] or node.op_type == path[0]:
        return len(path) == 1 or any(_on_path(parent, path[1:], producers, constants) for parent in parents)
    if kind in _COPY_OPS:
        return any(_on_path(parent, path, producers, constants) for parent in parents)
    return path[0] in _OPTIONAL and _on_path(node, path[1:], producers, constants)


def _first_conv(node, producers: dict, constants: set[str], seen: set | None = None):
    """The first Conv/ConvTranspose found going back from `node`, depth first (ModelOpt's `_get_backbone`)."""
    seen = set() if seen is None else seen
    if id(node) in seen:
        return None
    seen.add(id(node))
    if node.op_type in ("Conv", "ConvTranspose"):
        return node
    for name in node.input:
        if name in producers and name not in constants:
            found = _first_conv(producers[name], producers, constants, seen)
            if found is not None:
                return found
    return None


def _backbone(tensor: str, producers: dict, constants: set[str]) -> onnx.NodeProto | None:
    """The Conv TensorRT fuses the producer of `tensor` into, or None (ModelOpt's `get_fusible_backbone`)."""
    node = producers.get(tensor)
    if node is None or not any(_on_path(node, list(path), producers, constants) for path in _FUSIBLE_PATHS):
        return None
    return _first_conv(node, producers, constants)


def _ancestors(node: onnx.NodeProto, producers: dict[str, onnx.NodeProto]) -> dict[int, tuple[int, str]]:
    """{id(ancestor): (distance, name)} of a node, itself at distance 0 (breadth first over its inputs)."""
    found, frontier, distance = {id(node): (0, node.name)}, [node], 0
    while frontier:
        distance += 1
        upper = []
        for current in frontier:
            for name in current.input:
                parent = producers.get(name)
                if parent is not None and id(parent) not in found:
                    found[id(parent)] = (distance, parent.name)
                    upper.append(parent)
        frontier = upper
    return found


def non_residual_input(node: onnx.NodeProto, producers: dict[str, onnx.NodeProto],
                        constants: set[str]) -> str | None:
    """The input of a residual Add that TensorRT fuses into the Conv producing it (ModelOpt's
    `build_non_residual_input_map`: the branch with a Conv backbone, the longer path to the lowest common ancestor
    when both have one), or None when neither is (an input of the graph, a constant, no Conv)."""
    if len(node.input) != 2 or any(name not in producers for name in node.input):
        return None
    first, second = (producers[name] for name in node.input)
    backbones = [_backbone(name, producers, constants) for name in node.input]
    up_first, up_second = _ancestors(first, producers), _ancestors(second, producers)
    common = [(up_first[key][0] + up_second[key][0], up_first[key][0], up_second[key][0], up_first[key][1])
              for key in up_first.keys() & up_second.keys()]
    _, d1, d2, lca = min(common) if common else (0, 0, 0, None)
    if backbones[0] is not None and backbones[1] is not None:
        if backbones[0] is backbones[1]:
            return None
        return node.input[0] if d1 > d2 else node.input[1]
    for index, backbone in enumerate(backbones):
        if backbone is not None:
            return None if lca == backbone.name else node.input[index]
    return None


__all__ = ["conv_too_small", "non_residual_input"]
