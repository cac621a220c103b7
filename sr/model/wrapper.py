"""The lab's standard graph around a user's graph (see `sr.model.usermodel`): the wrapper that bridges its contract
(a cubic Resize for a pre-upsampled model, RGB <-> Y for a Y-only one, the [0, 255] scaling, NHWC Transposes,
padding to an accepted size and cropping back), the user's graph taken back out of it (`unwrap`), the contract a
standard graph carries in its metadata, and the input the wrapper feeds the user's graph."""
from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .checks import STANDARD_DOMAINS, _nodes
from .contract import YCBCR, YCBCR_OFFSET, Color, Contract, Layout


def _const(graph: list, name: str, array: np.ndarray) -> str:
    graph.append(numpy_helper.from_array(np.asarray(array), name))
    return name


def _resize(nodes: list, inits: list, source: str, scale: int, name: str) -> str:
    """A cubic upscale like PIL's bicubic (Keys a = -0.5, half-pixel centres)."""
    scales = _const(inits, f"{name}_scales", np.array([1, 1, scale, scale], np.float32))
    nodes.append(helper.make_node("Resize", [source, "", scales], [name], name=name, mode="cubic",
                                  cubic_coeff_a=-0.5, coordinate_transformation_mode="half_pixel"))
    return name


def _prefixed(model: onnx.ModelProto, prefix: str = "user/") -> tuple[onnx.ModelProto, str, str]:
    """A copy of the user's graph with every name prefixed (no clash with the wrapper), and its input and output.
    Names inside If / Loop / Scan bodies are renamed with the same map (a branch that reads an outer tensor keeps
    reading it); nodes without a name get a unique one (`<op>_<n>`), since fixes and diagnoses key nodes by name."""
    inner = onnx.ModelProto()
    inner.CopyFrom(model)
    taken = {node.name for node in _nodes(inner.graph) if node.name}
    counter = iter(range(10**9))

    def node_name(node: onnx.NodeProto) -> str:
        if not node.name:
            node.name = next(n for n in (f"{node.op_type}_{i}" for i in counter) if n not in taken)
            taken.add(node.name)
        return prefix + node.name

    rename: dict[str, str] = {}
    _rename_graph(inner.graph, lambda name: rename.setdefault(name, prefix + name), node_name, top=True)
    _fold_constant_identities(inner.graph)
    initializers = {init.name for init in model.graph.initializer}
    source_input = next(i.name for i in model.graph.input if i.name not in initializers)
    return inner, prefix + source_input, prefix + model.graph.output[0].name


def _rename_graph(graph: onnx.GraphProto, tensor, node, top: bool = False) -> None:
    """Rename, in place, every tensor (`tensor(name)`) and node (`node(node_proto)`) of a graph and of its
    subgraphs; a subgraph's own inputs, outputs and value infos too (the top graph's are the caller's)."""
    for proto in graph.node:
        proto.name = node(proto)
        for items in (proto.input, proto.output):
            for index, value in enumerate(items):
                if value:
                    items[index] = tensor(value)
        for attribute in proto.attribute:
            for sub in ([attribute.g] if attribute.HasField("g") else []) + list(attribute.graphs):
                _rename_graph(sub, tensor, node)
    for init in graph.initializer:
        init.name = tensor(init.name)
    if not top:
        for info in [*graph.input, *graph.output, *graph.value_info]:
            info.name = tensor(info.name)


def _fold_constant_identities(graph: onnx.GraphProto) -> None:
    """Drop Identity nodes that only rename an initializer (exporters make them for shared weights): quantizers
    expect weights and biases to be initializers."""
    constants = {init.name for init in graph.initializer}
    outputs = {out.name for out in graph.output}
    alias = {}
    kept = []
    for node in graph.node:
        if node.op_type == "Identity" and node.input[0] in constants and node.output[0] not in outputs:
            alias[node.output[0]] = node.input[0]
            continue
        kept.append(node)
    for node in kept:
        for index, name in enumerate(node.input):
            node.input[index] = alias.get(name, name)
    del graph.node[:]
    graph.node.extend(kept)


def _wrap_input(nodes: list, inits: list, contract: Contract) -> str:
    """Standard input -> what the user's graph takes; returns the tensor to feed it."""
    rgb = _resize(nodes, inits, "input", contract.scale, "standard/pre_upsample") if contract.pre_upsampled else "input"
    x = rgb
    if contract.color is Color.Y:
        weights = _const(inits, "standard/rgb_to_ycbcr_w", YCBCR.reshape(3, 3, 1, 1).astype(np.float32))
        offset = _const(inits, "standard/rgb_to_ycbcr_b", YCBCR_OFFSET.astype(np.float32))
        nodes.append(helper.make_node("Conv", [rgb, weights, offset], ["standard/ycbcr"], name="standard/to_ycbcr"))
        nodes.append(helper.make_node("Split", ["standard/ycbcr", _const(inits, "standard/split", np.array([1, 2]))],
                                      ["standard/y", "standard/cbcr"], name="standard/split", axis=1))
        x = "standard/y"
    if contract.value_range != 1:
        nodes.append(helper.make_node("Mul", [x, _const(inits, "standard/to_range", np.float32(contract.value_range))],
                                      ["standard/scaled"], name="standard/to_range"))
        x = "standard/scaled"
    if contract.padded:
        x = _pad_to_accepted(nodes, inits, contract, x)
    if contract.layout is Layout.NHWC:
        nodes.append(helper.make_node("Transpose", [x], ["standard/nhwc"], name="standard/to_nhwc", perm=[0, 2, 3, 1]))
        x = "standard/nhwc"
    return x


def _pad_to_accepted(nodes: list, inits: list, contract: Contract, x: str) -> str:
    """Pad the NCHW tensor `x` (what the user's graph takes, before any layout change) at its bottom and right,
    repeating the edge pixels, to the nearest size the model accepts: at least `min_size` a side, then rounded up
    to a multiple of `multiple_of`. Returns the padded tensor."""
    def node(op: str, inputs: list[str], name: str, **attrs) -> str:
        nodes.append(helper.make_node(op, inputs, [f"standard/{name}"], name=f"standard/{name}", **attrs))
        return f"standard/{name}"

    size = node("Shape", [x], "side", start=2, end=4)  # [height, width] as the user's graph would get them
    target = size
    if contract.min_size > 1:
        target = node("Max", [target, _const(inits, "standard/min_size", np.array([contract.min_size] * 2))],
                      "at_least")
    if contract.multiple_of > 1:
        multiple = _const(inits, "standard/multiple_of", np.array([contract.multiple_of] * 2))
        less_one = _const(inits, "standard/multiple_less_one", np.array([contract.multiple_of - 1] * 2))
        target = node("Mul", [node("Div", [node("Add", [target, less_one], "round_up"), multiple], "multiples"),
                              multiple], "rounded")
    missing = node("Sub", [target, size], "missing")
    pads = node("Concat", [_const(inits, "standard/no_pad", np.zeros(6, np.int64)), missing], "pads", axis=0)
    return node("Pad", [x, pads], "padded", mode="edge")


def _crop_to_input(nodes: list, inits: list, contract: Contract, y: str) -> str:
    """Crop the user's output (in its own layout) to the scale times the standard input's size: what the padding
    added is cut away."""
    size = helper.make_node("Shape", ["input"], ["standard/input_side"], name="standard/input_side", start=2, end=4)
    scale = _const(inits, "standard/crop_scale", np.array([contract.scale] * 2, np.int64))
    ends = helper.make_node("Mul", ["standard/input_side", scale], ["standard/output_side"],
                            name="standard/output_side")
    axes = [2, 3] if contract.layout is Layout.NCHW else [1, 2]
    crop = helper.make_node("Slice", [y, _const(inits, "standard/crop_starts", np.zeros(2, np.int64)),
                                      "standard/output_side", _const(inits, "standard/crop_axes", np.array(axes))],
                            ["standard/cropped"], name="standard/crop")
    nodes.extend([size, ends, crop])
    return "standard/cropped"


def _wrap_output(nodes: list, inits: list, contract: Contract, y: str) -> str:
    """What the user's graph returns -> the standard output; returns the final tensor."""
    if contract.padded:
        y = _crop_to_input(nodes, inits, contract, y)
    if contract.layout is Layout.NHWC:
        nodes.append(helper.make_node("Transpose", [y], ["standard/nchw"], name="standard/to_nchw", perm=[0, 3, 1, 2]))
        y = "standard/nchw"
    if contract.value_range != 1:
        nodes.append(helper.make_node("Mul", [y, _const(inits, "standard/from_range",
                                                         np.float32(1.0 / contract.value_range))],
                                      ["standard/unscaled"], name="standard/from_range"))
        y = "standard/unscaled"
    if contract.color is Color.Y:
        cbcr = "standard/cbcr" if contract.pre_upsampled else _resize(nodes, inits, "standard/cbcr", contract.scale,
                                                                       "standard/cbcr_up")
        nodes.append(helper.make_node("Concat", [y, cbcr], ["standard/ycbcr_out"], name="standard/join", axis=1))
        inverse = np.linalg.inv(YCBCR)
        weights = _const(inits, "standard/ycbcr_to_rgb_w", inverse.reshape(3, 3, 1, 1).astype(np.float32))
        bias = _const(inits, "standard/ycbcr_to_rgb_b", (-inverse @ YCBCR_OFFSET).astype(np.float32))
        nodes.append(helper.make_node("Conv", ["standard/ycbcr_out", weights, bias], ["standard/rgb"],
                                      name="standard/to_rgb"))
        y = "standard/rgb"
    return y


@dataclass(frozen=True)
class WrapperParts:
    """The lab's wrapper around a user's graph as two float graphs: what turns the lab's image into the user's
    input (`before`: colour, layout, scaling, upsampling, a pad up to an accepted size) and what turns the user's
    output back into the lab's image (`after`: reading the image too, for the Cb/Cr it carries); None where that
    side only passes the tensor on."""

    before: onnx.ModelProto | None  # image -> user input
    after: onnx.ModelProto | None  # (user output, image) -> image
    user_input: str
    user_output: str


def wrapper_parts(model: onnx.ModelProto) -> WrapperParts | None:
    """The two sides of the wrapper of a standard FP32 graph (None for a graph with no wrapper)."""
    from onnx.utils import Extractor

    wrapper = [n for n in model.graph.node if n.name.startswith("standard/")]
    if not wrapper:
        return None
    inside = {o for n in model.graph.node if not n.name.startswith("standard/") for o in n.output}
    user_input = next(n.output[0] for n in wrapper if n.name == "standard/in")
    user_output = next(t for n in wrapper for t in n.input if t in inside)
    image, result = model.graph.input[0].name, model.graph.output[0].name
    extractor = Extractor(onnx.shape_inference.infer_shapes(model))
    before = extractor.extract_model([image], [user_input])
    after = extractor.extract_model([user_output, image], [result])

    def passes_on(part: onnx.ModelProto) -> bool:
        return all(n.op_type == "Identity" for n in part.graph.node)

    return WrapperParts(None if passes_on(before) else before, None if passes_on(after) else after, user_input,
                        user_output)


def unwrap(model: onnx.ModelProto) -> onnx.ModelProto:
    """The user's own graph out of a standard graph (FP32 or QDQ): the lab's wrapper nodes (`standard/...`)
    removed, the user's input and output as the graph's, every name as the user's file had it. What goes into a
    deployment bundle: the user deploys their model, not the lab's colour conversion or layout transposes.

    Args:
        model: a standard graph, or a QDQ model written from one (its Q/DQ pairs are the user's).

    Returns:
        the user's model (the same model when it has no wrapper).
    """
    wrapper = [n for n in model.graph.node if n.name.startswith("standard/")]
    if not wrapper:
        return model
    inner = [n for n in model.graph.node if not n.name.startswith("standard/")]
    made_inside = {o for n in inner for o in n.output}
    source = next(n.output[0] for n in wrapper if n.name == "standard/in")
    result = next(t for n in wrapper for t in n.input if t in made_inside)
    renames = {}
    for suffix in ("_dequantized", "_DequantizeLinear_Output"):  # a quantized output: the user's name on its DQ
        stem = result[: -len(suffix)] if result.endswith(suffix) else None
        if stem and stem in made_inside:
            renames = {stem: f"{stem}_float", result: stem}
            result = stem

    def plain(name: str) -> str:
        name = renames.get(name, name)
        return name[len("user/"):] if name.startswith("user/") else name

    nodes = []
    for original in inner:
        node = onnx.NodeProto()
        node.CopyFrom(original)
        nodes.append(node)
    graph_of_nodes = helper.make_graph(nodes, "inner", [], [])
    _rename_graph(graph_of_nodes, plain, lambda proto: plain(proto.name), top=True)
    nodes = list(graph_of_nodes.node)
    from ..quant.quantspec import used_names

    used = used_names(nodes)
    initializers = []
    for original in model.graph.initializer:
        if plain(original.name) in used:
            init = onnx.TensorProto()
            init.CopyFrom(original)
            init.name = plain(init.name)
            initializers.append(init)
    final_output = result[len("user/"):] if result.startswith("user/") else result
    graph = helper.make_graph(nodes, model.graph.name or "user",
                              *_value_infos(model, [(source, plain(source))], [(result, final_output)]), initializers)
    unwrapped = helper.make_model(graph, opset_imports=list(model.opset_import), producer_name="sr-int8-lab")
    unwrapped.ir_version = model.ir_version
    return unwrapped


def _value_infos(model: onnx.ModelProto, *groups: list[tuple[str, str]]) -> list[list[onnx.ValueInfoProto]]:
    """Typed, shaped value infos of tensors of `model` under new names (shape inference where it can; shapes are
    a courtesy: a graph the inference cannot follow keeps unnamed dimensions)."""
    try:
        known = {v.name: v for v in onnx.shape_inference.infer_shapes(model).graph.value_info}
    except Exception:
        known = {}
    made = []
    for pairs in groups:
        infos = []
        for name, final in pairs:
            info = onnx.ValueInfoProto()
            info.CopyFrom(known[name] if name in known else helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
            info.name = final
            infos.append(info)
        made.append(infos)
    return made


STANDARD_KEY = "sr.standard"  # metadata_props key of a standard graph the lab wrote: its contract as JSON


def set_metadata(model: onnx.ModelProto, key: str, value: str) -> None:
    """Set one `metadata_props` entry of `model` (replacing an earlier one: the checker refuses duplicate keys)."""
    kept = [p for p in model.metadata_props if p.key != key]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    entry = model.metadata_props.add()
    entry.key, entry.value = key, value


def standard_contract(model: onnx.ModelProto) -> Contract | None:
    """The contract of a standard graph the lab itself wrote (a QAT result carries it under `STANDARD_KEY`), or
    None for any other model."""
    props = {p.key: p.value for p in model.metadata_props}
    return Contract.from_dict(json.loads(props[STANDARD_KEY])) if STANDARD_KEY in props else None


def standard_graph(model: onnx.ModelProto, contract: Contract) -> onnx.ModelProto:
    """The user's graph wrapped to take and return the lab's standard images (see the module docstring).

    Args:
        model: the checked user model.
        contract: its contract.

    Returns:
        a model with input `input` 1x3xHxW RGB [0, 1] and output `output` 1x3x(sH)x(sW) RGB.
    """
    inner, user_in, user_out = _prefixed(model)
    nodes, inits = [], []
    nodes.append(helper.make_node("Identity", [_wrap_input(nodes, inits, contract)], [user_in], name="standard/in"))
    nodes.extend(inner.graph.node)
    nodes.append(helper.make_node("Identity", [_wrap_output(nodes, inits, contract, user_out)], ["output"],
                                  name="standard/output"))
    height, width = (contract.fixed_size if contract.fixed_size and not contract.pre_upsampled else ("height", "width"))
    graph = helper.make_graph(nodes, "standard", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                                                [1, 3, height, width])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT,
                                                             [1, 3, "out_height", "out_width"])],
                              [*inits, *inner.graph.initializer])
    opset = max(17, next((o.version for o in model.opset_import if o.domain in STANDARD_DOMAINS), 17))
    standard = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="sr-int8-lab")
    standard.ir_version = max(8, min(model.ir_version, onnx.IR_VERSION))
    onnx.checker.check_model(standard)
    return standard


def known_input(standard: onnx.ModelProto) -> tuple[str, float] | None:
    """The tensor the lab's wrapper feeds the user's graph, and the top of its range (the range is [0, top]: 1, or
    the wrapper's [0, 255] scaling): what the user's model takes, whatever a calibration search would pick.

    Args:
        standard: a standard graph.

    Returns:
        (tensor, top), or None for a graph without the wrapper.
    """
    tensor = next((node.output[0] for node in standard.graph.node if node.name == "standard/in"), None)
    if tensor is None:
        return None
    scaling = next((init for init in standard.graph.initializer if init.name == "standard/to_range"), None)
    return tensor, float(numpy_helper.to_array(scaling)) if scaling is not None else 1.0
