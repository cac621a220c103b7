"""A super-resolution model the user brings as an ONNX file: checked, its contract detected, and turned into the
lab's standard graph, so every stage (calibrate, quantize, engines, diagnose, eval) takes it like a shipped one.

The lab's standard graph takes `input` float32 1x3xHxW RGB in [0, 1] (the LR image) and returns `output`
1x3x(sH)x(sW) RGB. A user's model may differ in its contract, which is detected from the graph and a probe run
(and can be overridden):

- layout NCHW or NHWC; 1 channel (Y of BT.601 YCbCr) or 3 (RGB); values in [0, 1] or [0, 255];
- LR in, HR out, or pre-upsampled (VDSR-style: bicubic-upscaled input, output of the same size);
- a dynamic or a fixed input size (the engines tile to the fixed size);
- the scale (the output/input size ratio on the probe; for a pre-upsampled model it cannot be seen: given or 3).

The standard graph wraps the user's graph with what bridges the two: a cubic Resize for a pre-upsampled model,
RGB -> Y before and Y + bicubic Cb/Cr -> RGB after for a Y-only model (what the SR literature does), a x255 /
/255 pair for [0, 255] models, Transposes for NHWC. Registered models get the name `onnx:<digest>`, which
`sr.model.models.model_info` and `sr.run.quantize.fp32_onnx_path` resolve.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..choices import Choice
from ..cost import CostLimits, Uncountable, check_cost, graph_cost
from ..store import (Memo, cache_cap_bytes, cache_root, code_digest, disk_bytes, evict, file_sha256, locked,
                    short_hash, touch, write_atomic)

MAX_BYTES = int(float(os.environ.get("SR_MAX_ONNX_MB", "200")) * 1024 * 1024)
PROBE_SECONDS = 30.0
TIE_DB = 0.5  # range readings closer than this to a bicubic upscale are a tie, settled for [0, 1]
PREFIX = "onnx:"
STANDARD_DOMAINS = {"", "ai.onnx"}
# BT.601 YCbCr from RGB, both in [0, 1] units (MATLAB rgb2ycbcr divided by 255)
YCBCR = np.array([[65.481, 128.553, 24.966], [-37.797, -74.203, 112.0], [112.0, -93.786, -18.214]]) / 255.0
YCBCR_OFFSET = np.array([16.0, 128.0, 128.0]) / 255.0


class Layout(Choice, noun="layout"):
    """Where the channel axis is."""

    NCHW = "nchw"
    NHWC = "nhwc"


class Color(Choice, noun="colour"):
    """What the channels hold."""

    RGB = "rgb"
    Y = "y"  # the luma of BT.601 YCbCr; the lab upscales Cb and Cr bicubically


class UserModelError(ValueError):
    """The file is not an ONNX super-resolution model the lab can run."""


class ProbeTimedOut(UserModelError):
    """The model ran past the probe's time limit."""


@dataclass(frozen=True)
class Contract:
    """How a user's model takes and returns images."""

    layout: Layout = Layout.NCHW
    color: Color = Color.RGB
    value_range: int = 1  # 1: [0, 1]; 255: [0, 255]
    pre_upsampled: bool = False
    scale: int = 3
    fixed_size: tuple[int, int] | None = None  # (height, width) of a fixed-size input
    confidence_db: float | None = None  # how much better the chosen range reading fits a bicubic upscale
    # a model that runs only on sides that are a multiple of this (a U-Net's pooling, a transformer's windows), or
    # of at least this many pixels (a reflection pad wider than a small image): the wrapper pads its input (edge
    # pixels repeated) and crops its output, so every path of the lab can feed it any size
    multiple_of: int = 1
    min_size: int = 1

    @property
    def padded(self) -> bool:
        """Whether the wrapper pads the input to a size the model accepts."""
        return self.multiple_of > 1 or self.min_size > 1

    def sizes_in_words(self) -> str:
        """What the input must be, in words ("" for any size)."""
        if self.fixed_size:
            return f"fixed input {self.fixed_size[1]}x{self.fixed_size[0]}"
        parts = ([f"sides a multiple of {self.multiple_of}"] if self.multiple_of > 1 else []) + \
            ([f"at least {self.min_size} px a side"] if self.min_size > 1 else [])
        return f"input {' and '.join(parts)} (the lab pads the image and crops the output)" if parts else ""

    def to_dict(self) -> dict:
        """JSON-ready fields."""
        fields = asdict(self)
        fields.update(layout=self.layout.value, color=self.color.value)
        return fields

    @classmethod
    def from_dict(cls, fields: dict) -> "Contract":
        """The contract `to_dict` wrote."""
        return cls(Layout(fields["layout"]), Color(fields["color"]), fields["value_range"], fields["pre_upsampled"],
                   fields["scale"], tuple(fields["fixed_size"]) if fields["fixed_size"] else None,
                   fields["confidence_db"], fields.get("multiple_of", 1), fields.get("min_size", 1))


@dataclass(frozen=True)
class Overrides:
    """What the user says about the contract (None: detect)."""

    layout: str | None = None
    color: str | None = None
    value_range: int | None = None
    pre_upsampled: bool | None = None
    scale: int | None = None

    def __post_init__(self):
        if self.layout is not None:
            Layout.parse(self.layout)
        if self.color is not None:
            Color.parse(self.color)
        if self.value_range not in (None, 1, 255):
            raise ValueError(f"range must be 1 or 255, got {self.value_range}")
        if self.scale not in (None, 2, 3, 4):
            raise ValueError(f"scale must be 2, 3 or 4, got {self.scale}")


@dataclass(frozen=True)
class UserModel:
    """A registered model: its name in the lab, the user's file, the contract, and the standard graph."""

    name: str
    source: Path
    contract: Contract
    standard_onnx: Path
    float_ops: tuple[str, ...]  # op types no INT8 scheme quantizes (they run in float in every INT8 model)
    parameters: int
    macs_per_pixel: float = 0.0  # multiply-accumulates per LR pixel (`macs_per_pixel`): the cost of running it
    input_range: tuple[str, float] | None = None  # (the user's input tensor, the top of its range): `known_input`


# ----------------------------------------------------------------------------------------------------------------
# Checking an untrusted file.


def check_file(path: str | os.PathLike) -> onnx.ModelProto:
    """Load and check a user's ONNX file without trusting it.

    Raises:
        FileNotFoundError: no such file.
        UserModelError: too large, not ONNX, external data, custom ops, or not an image-to-image model.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such ONNX file: {path.name}")
    size = path.stat().st_size
    if size == 0:
        raise UserModelError(f"{path.name} is empty (0 bytes)")
    if size > MAX_BYTES:
        raise UserModelError(f"{path.name} is {size / 2**20:.0f} MB, more than the limit of {MAX_BYTES / 2**20:.0f} MB "
                             "(SR_MAX_ONNX_MB)")
    try:
        model = onnx.load_model_from_string(path.read_bytes())
    except Exception as error:  # protobuf raises its own DecodeError
        raise UserModelError(f"{path.name} is not an ONNX model ({type(error).__name__}: {clean_message(error)})") from None
    if any(_is_external(tensor) for tensor in _tensors(model.graph)):
        raise UserModelError(f"{path.name} keeps tensors in external files; the lab only accepts self-contained "
                             "ONNX files (save with all tensors inside)")
    custom = sorted({node.domain for node in _nodes(model.graph)} - STANDARD_DOMAINS)
    if custom:
        raise UserModelError(f"{path.name} uses custom-op domains ({', '.join(custom)}); only standard ONNX ops run here")
    try:
        onnx.checker.check_model(model)
        model = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception as error:
        raise UserModelError(f"{path.name} fails the ONNX checker: {clean_message(error)}") from None
    _check_image_to_image(model, path.name)
    _check_finite(model, path.name)
    return model


def _check_finite(model: onnx.ModelProto, name: str) -> None:
    """Refuse NaN or infinite weights (no range, histogram or INT8 scale can be made from them)."""
    for init in model.graph.initializer:
        if init.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16):
            values = numpy_helper.to_array(init)
            if not np.isfinite(values.astype(np.float32)).all():
                bad = int(np.size(values) - np.isfinite(values.astype(np.float32)).sum())
                raise UserModelError(f"{name}: its weight {init.name!r} holds {bad} NaN or infinite value(s); "
                                     "fix the model (a diverged training run?) and upload it again")


def _nodes(graph: onnx.GraphProto):
    """Every node of a graph and of its subgraphs (If / Loop / Scan bodies), depth first."""
    for node in graph.node:
        yield node
        for attribute in node.attribute:
            for sub in ([attribute.g] if attribute.HasField("g") else []) + list(attribute.graphs):
                yield from _nodes(sub)


def _tensors(graph: onnx.GraphProto):
    """Every tensor stored in a graph: initializers, sparse initializers, and the tensors of node attributes
    (Constant's value, ConstantOfShape's, ...), in its subgraphs too."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield from (sparse.values, sparse.indices)
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t
            yield from attribute.tensors
            for sparse in ([attribute.sparse_tensor] if attribute.HasField("sparse_tensor") else []) + \
                    list(attribute.sparse_tensors):
                yield from (sparse.values, sparse.indices)
            for sub in ([attribute.g] if attribute.HasField("g") else []) + list(attribute.graphs):
                yield from _tensors(sub)


def _is_external(tensor: onnx.TensorProto) -> bool:
    """True for a tensor whose data would be read from another file."""
    return tensor.data_location == TensorProto.EXTERNAL or len(tensor.external_data) > 0


def clean_message(message: str) -> str:
    """A runtime's error message fit to show a visitor: one line, no file paths, no tensor contents (a shape list
    printed by an error could carry bytes a hostile model read), at most 300 characters."""
    import re

    message = " ".join(str(message).split())
    message = re.sub(r"(?<![\w.])/(?:[\w.+-]+/)*[\w.+-]+", "<path>", message)
    message = re.sub(r"\{[-\d,\s]{12,}\}|\[[-\d,\s]{24,}\]", "{...}", message)
    return message[:300]


def _dims(value_info) -> list:
    return [d.dim_value if d.HasField("dim_value") else None for d in value_info.type.tensor_type.shape.dim]


def _check_image_to_image(model: onnx.ModelProto, name: str) -> None:
    initializers = {init.name for init in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    if len(inputs) != 1:
        raise UserModelError(f"{name} has {len(inputs)} inputs; an SR model takes one image")
    for kind, value in (("input", inputs[0]), ("output", model.graph.output[0])):
        rank = len(value.type.tensor_type.shape.dim)
        if rank != 4:
            raise UserModelError(f"{name}: its {kind} {value.name!r} has rank {rank}, not 4 (an image batch); "
                                 "is it a classifier?")
        if value.type.tensor_type.elem_type != TensorProto.FLOAT:
            raise UserModelError(f"{name}: its {kind} is {TensorProto.DataType.Name(value.type.tensor_type.elem_type)}, "
                                 "not float32")


# ----------------------------------------------------------------------------------------------------------------
# Detecting the contract.


def _channel_layout(dims: list) -> tuple[Layout, int]:
    if dims[1] in (1, 3):
        return Layout.NCHW, dims[1]
    if dims[3] in (1, 3):
        return Layout.NHWC, dims[3]
    raise UserModelError(f"cannot tell the channel axis of an input shaped {dims}: say which layout it takes (nchw or nhwc)")


def _probe_image(height: int, width: int) -> np.ndarray:
    """A natural photo crop (scikit-image's, no download), float32 HxWx3 in [0, 1]."""
    from PIL import Image
    from skimage import data as skdata

    photo = Image.fromarray(np.asarray(skdata.astronaut())[100:420, 100:420])
    return np.asarray(photo.resize((width, height), Image.Resampling.BICUBIC), np.float32) / 255.0


def _run_with_timeout(session, feed: dict, seconds: float) -> np.ndarray:
    import onnxruntime as ort

    options = ort.RunOptions()
    timer = threading.Timer(seconds, lambda: setattr(options, "terminate", True))
    timer.start()
    try:
        return session.run(None, feed, options)[0]
    except Exception as error:
        if options.terminate:
            raise ProbeTimedOut(f"the model took longer than {seconds:.0f} s on a small probe image; stopped") from None
        raise UserModelError("the model failed on a probe image (is the layout or the colour set right?): "
                             f"{clean_message(error)}") from None
    finally:
        timer.cancel()


def detect_contract(model: onnx.ModelProto, overrides: Overrides = Overrides(),
                    probe_seconds: float = PROBE_SECONDS) -> Contract:
    """The contract of a checked model, from its graph and a probe run, with the user's overrides applied.

    Range (and, for a same-size output, nothing else) is read from the probe: each candidate reading's output is
    compared with a bicubic upscale of the probe, and the closest wins; `confidence_db` is its margin.

    Raises:
        UserModelError: the output is not an integer multiple of the input, or the model fails on the probe.
    """
    import onnxruntime as ort

    initializers = {init.name for init in model.graph.initializer}
    dims = _dims(next(i for i in model.graph.input if i.name not in initializers))
    layout, channels = (Layout.parse(overrides.layout), None) if overrides.layout else _channel_layout(dims)
    channels = channels or (dims[1] if layout is Layout.NCHW else dims[3])
    spatial = dims[2:4] if layout is Layout.NCHW else dims[1:3]
    fixed = tuple(spatial) if all(isinstance(d, int) and d > 0 for d in spatial) else None
    with tempfile.TemporaryDirectory(prefix="sr-probe-") as empty:  # any file reference resolves to an empty folder
        (Path(empty) / "model.onnx").write_bytes(model.SerializeToString())
        quiet = ort.SessionOptions()
        quiet.log_severity_level = 4  # the size probes fail on purpose: no error lines in the server's log
        session = ort.InferenceSession(str(Path(empty) / "model.onnx"), quiet, providers=["CPUExecutionProvider"])
    color = Color.parse(overrides.color) if overrides.color else (Color.Y if channels == 1 else Color.RGB)
    deadline = time.monotonic() + probe_seconds

    def run(height: int, width: int, value_range: int = overrides.value_range or 1) -> np.ndarray:
        probe = _probe_image(height, width)
        x = probe if color is Color.RGB else (probe @ YCBCR[0] + YCBCR_OFFSET[0])[..., None]
        x = (x * value_range).astype(np.float32)
        x = x.transpose(2, 0, 1)[None] if layout is Layout.NCHW else x[None]
        y = _run_with_timeout(session, {session.get_inputs()[0].name: np.ascontiguousarray(x)},
                              max(1.0, deadline - time.monotonic()))
        y = y[0] if layout is Layout.NHWC else y[0].transpose(1, 2, 0)
        return y / value_range

    (height, width), multiple_of, min_size = (fixed, 1, 1) if fixed else _accepted_sizes(run)
    probe = _probe_image(height, width)
    readings = {value_range: run(height, width, value_range)
                for value_range in ((overrides.value_range,) if overrides.value_range else (1, 255))}
    out_h, out_w = next(iter(readings.values())).shape[:2]
    if out_h % height or out_w % width or out_h // height != out_w // width:
        raise UserModelError(f"the output ({out_w}x{out_h}) is not an integer multiple of the input "
                             f"({width}x{height}); not a super-resolution model?")
    ratio = out_h // height
    if overrides.scale and ratio > 1 and overrides.scale != ratio:
        raise UserModelError(f"the model upscales x{ratio} on a probe image; the scale given (x{overrides.scale}) contradicts it")
    pre_upsampled = overrides.pre_upsampled if overrides.pre_upsampled is not None else ratio == 1
    scale = overrides.scale or (ratio if ratio > 1 else 3)
    reference = _bicubic(probe, out_w, out_h)
    if color is Color.Y:
        reference = (reference @ YCBCR[0] + YCBCR_OFFSET[0])[..., None]
    fits = {r: -float(np.mean((np.clip(y, 0, 1) - reference) ** 2)) for r, y in readings.items()}
    ranked = sorted(fits, key=fits.get, reverse=True)
    confidence = None if len(ranked) < 2 else 10 * math.log10(max(-fits[ranked[1]], 1e-12) / max(-fits[ranked[0]], 1e-12))
    if confidence is not None and confidence < TIE_DB:  # a scale-invariant model fits both: take the convention
        ranked = [1, 255]
    return Contract(layout, color, ranked[0], bool(pre_upsampled), int(scale), fixed, confidence, multiple_of, min_size)


PROBE_SIZE = (48, 40)  # the probe's (height, width) for a model that takes it
SQUARES = (64, 128, 256)  # the sides tried first (multiples of every multiple below)
MULTIPLES = (2, 4, 8, 16, 32, 64)  # the multiples tried when odd sides fail
SMALLEST = 8  # the smallest side the lab feeds a model (a tile's, a tiny image's): a model failing below it has a minimum


def _accepted_sizes(run) -> tuple[tuple[int, int], int, int]:
    """((height, width) to probe the contract on, the multiple the sides must be, the smallest side) of a model
    with a free input size, by probing: a square that runs; one pixel more (then each multiple, when that fails);
    then the smallest side, by bisection over the multiples.

    Raises:
        UserModelError: the model runs at no size tried (in the words of its failure on the probe size).
    """
    side = next((s for s in SQUARES if _runs(run, s, s)), None)
    if side is None:
        run(*PROBE_SIZE)  # its own words, whatever they are
        raise UserModelError(f"the model runs on a {PROBE_SIZE[1]}x{PROBE_SIZE[0]} probe image but on none of "
                             f"{', '.join(f'{s}x{s}' for s in SQUARES)}: which input sizes does it take?")
    multiple = 1 if _runs(run, side + 1, side + 1) else next(
        (m for m in MULTIPLES if _runs(run, side + m, side + m)), None)
    if multiple is None:
        raise UserModelError(f"the model runs on a {side}x{side} image but not on one pixel more, nor on sides a "
                             f"multiple of any of {', '.join(map(str, MULTIPLES))} above it: which input sizes does "
                             "it take?")
    low, high = -(-SMALLEST // multiple), side // multiple  # in multiples: `high` runs
    if _runs(run, low * multiple, low * multiple):
        min_size = 1
    else:
        while high - low > 1:
            middle = (low + high) // 2
            low, high = (low, middle) if _runs(run, middle * multiple, middle * multiple) else (middle, high)
        min_size = high * multiple
    fits = all(s % multiple == 0 and s >= min_size for s in PROBE_SIZE)
    return (PROBE_SIZE if fits else (side, side)), multiple, min_size


def _runs(run, height: int, width: int) -> bool:
    try:
        run(height, width)
        return True
    except ProbeTimedOut:
        raise
    except UserModelError:
        return False


def _bicubic(image: np.ndarray, width: int, height: int) -> np.ndarray:
    from PIL import Image

    rgb = Image.fromarray(np.clip(np.rint(image * 255), 0, 255).astype(np.uint8))
    return np.asarray(rgb.resize((width, height), Image.Resampling.BICUBIC), np.float32) / 255.0


# ----------------------------------------------------------------------------------------------------------------
# The standard graph.


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


def macs_per_pixel(model: onnx.ModelProto) -> float:
    """Multiply-accumulates per input pixel of a standard graph (or any NCHW image model), counted by
    `sr.cost.graph_cost` before anything runs; 0.0 for a graph whose cost cannot be counted (a model registered
    without cost limits, from the CLI)."""
    try:
        return graph_cost(model).macs_per_pixel
    except Uncountable:
        return 0.0


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


# ----------------------------------------------------------------------------------------------------------------
# The registry.

# the models this process has registered or read back: bounded and thread-safe (a process-wide LRU); a model
# evicted here is read back from its cache folder, the same UserModel as registered (its registration.json)
_REGISTRY = Memo(256)


def register_onnx(path: str | os.PathLike, overrides: Overrides = Overrides(),
                  cache_dir: str | os.PathLike | None = None, limits: CostLimits | None = None) -> UserModel:
    """Check a user's ONNX file, detect its contract, write its standard graph (cached by file hash and
    overrides) and register it.

    Example:
        >>> model = register_onnx("fsrcnn.onnx", Overrides(scale=3))
        >>> evaluate(EvalConfig(model=model.name, data="path/to/Set5"))

    Returns:
        the UserModel; `model.name` works wherever a shipped model name does.

    Args:
        limits: refuse a graph over these costs, or whose cost cannot be counted, before it runs (a server's
            policy; none by default).

    Raises:
        FileNotFoundError, UserModelError: see `check_file` and `detect_contract`.
        sr.cost.Uncountable, sr.cost.TooCostly: `limits` given, and the graph is uncountable or over them.
    """
    path = Path(path)
    model = check_file(path)
    if limits is not None:
        check_cost(model, limits)
    key = short_hash(json.dumps({"file": file_sha256(path), "overrides": asdict(overrides),
                                 "code": code_digest(sys.modules[__name__])}, sort_keys=True), 12)
    folder = cache_root(cache_dir) / "user" / key
    with locked(folder):
        saved = folder / "contract.json"
        if saved.is_file() and (folder / "standard.onnx").is_file():
            contract = Contract.from_dict(json.loads(saved.read_text()))
        else:
            contract = standard_contract(model)  # a standard graph the lab wrote (QAT): taken as it is
            standard = model if contract is not None else None
            if standard is None:
                contract = detect_contract(model, overrides)
                standard = standard_graph(model, contract)
            write_atomic(standard.SerializeToString(), folder / "standard.onnx")
            write_atomic(json.dumps(contract.to_dict()).encode(), saved)
        touch(folder)  # used now: the cache's LRU eviction counts uploaded models too
    _make_room(folder, path.name)
    from ..quant.quantspec import ALL_INT8_OPS, TENSORRT_INPUT_OPS

    covered = {*ALL_INT8_OPS, *TENSORRT_INPUT_OPS, "Constant", "Identity"}
    ops = sorted({node.op_type for node in model.graph.node} - covered)
    parameters = sum(int(np.prod(init.dims)) for init in model.graph.initializer)
    record = folder / "registration.json"  # what lookup needs to give the same model in every process
    if not record.is_file():
        write_atomic(json.dumps({"float_ops": ops, "parameters": parameters}).encode(), record)
    standard = onnx.load(str(folder / "standard.onnx"))
    registered = UserModel(f"{PREFIX}{key}", path, contract, folder / "standard.onnx", tuple(ops), parameters,
                           macs_per_pixel(standard), known_input(standard))
    _REGISTRY.put(registered.name, registered)
    return registered


HOLD_SECONDS = 3600.0  # an uploaded model is held this long after its last use against other uploads
UPLOAD_SHARE = 0.5  # uploaded models may fill at most this share of the cache's cap


def _make_room(folder: Path, name: str) -> None:
    """Keep the uploaded models within their share of the cache after registering `folder`: the least recently
    used models unused for HOLD_SECONDS go first (the lab's own entries are never touched by an upload, nor is a
    model a visitor used within the hour); when that is not enough, this upload is the one refused, in words."""
    share = cache_cap_bytes() * UPLOAD_SHARE
    evict(folder.parent, share, keep=folder, kinds=[folder.parent.name], hold_seconds=HOLD_SECONDS)
    if disk_bytes(folder.parent) > share:
        with locked(folder):
            shutil.rmtree(folder, ignore_errors=True)
        raise UserModelError(f"{name}: the server's room for uploaded models is full of models other visitors are "
                             "using (each is held for an hour after its last use); try again later, or run the lab "
                             "locally")


def lookup(name: str, cache_dir: str | os.PathLike | None = None) -> UserModel | None:
    """The registered model called `name` (also one registered by another process, from the cache), or None."""
    if not str(name).startswith(PREFIX):
        return None
    known = _REGISTRY.peek(name)
    if known is not None and known.standard_onnx.is_file():  # the cache's total cap may have evicted it since
        touch(known.standard_onnx.parent)  # used now: held for another HOLD_SECONDS
        return known
    folder = cache_root(cache_dir) / "user" / str(name)[len(PREFIX):]
    if not (folder / "contract.json").is_file():
        return None
    contract = Contract.from_dict(json.loads((folder / "contract.json").read_text()))
    standard = onnx.load(str(folder / "standard.onnx"))
    try:  # as registered: the user's own graph's parameters and the ops no scheme covers
        record = json.loads((folder / "registration.json").read_text())
        ops, parameters = tuple(record["float_ops"]), int(record["parameters"])
    except (OSError, ValueError, KeyError):  # an entry older than the record: counted on the standard graph
        ops, parameters = (), sum(int(np.prod(init.dims)) for init in standard.graph.initializer)
    found = UserModel(str(name), folder / "standard.onnx", contract, folder / "standard.onnx", ops, parameters,
                      macs_per_pixel(standard), known_input(standard))
    _REGISTRY.put(found.name, found)  # model_info asks on every call: read the file once per process
    return found
