"""An ONNX graph run as a PyTorch module, so a model the lab only has as ONNX can be fine-tuned (QAT).

`OnnxModule(model)` executes the graph's nodes in order with torch ops; float initializers become trainable
`nn.Parameter`s named as in the graph (for the lab's own exports these are the PyTorch state-dict names), the
rest stay constants. Ops covered: those of `OPS` (what our own models and the user models the ONNX loader
accepts are made of, attention included: MatMul, Softmax, LayerNormalization, ReduceMean, ReduceL2, Erf;
`tests/test_qat.py` checks them against ONNX Runtime), e.g. Resize nearest with every coordinate transformation
and nearest mode, linear and cubic with the usual ones; Slice with positive steps;
plus any op a caller supplies (`extra_ops`: how `sr.tune.qat` runs fake quantization). Anything else is refused when
the module is built, with the list of what is missing.

Example:
    >>> module = OnnxModule(onnx.load("model.onnx"))
    >>> y = module(torch.rand(1, 3, 32, 32))
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import TensorProto, numpy_helper
from torch import nn

Op = Callable[["OnnxModule", onnx.NodeProto, list], list]


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _decode(value):
    return value.decode() if isinstance(value, bytes) else value


def _ints(tensor) -> list[int]:
    return [int(v) for v in tensor.flatten().tolist()]


def _conv(module, node, inputs):
    a = _attrs(node)
    x, weight = inputs[0], inputs[1]
    bias = inputs[2] if len(inputs) > 2 else None
    if _decode(a.get("auto_pad", "NOTSET")) not in ("NOTSET", "VALID"):
        raise ValueError(f"Conv {node.name}: auto_pad={a['auto_pad']} is not supported")
    pads = a.get("pads", [0, 0, 0, 0])
    x = F.pad(x, (pads[1], pads[3], pads[0], pads[2]))
    return [F.conv2d(x, weight, bias, a.get("strides", [1, 1]), 0, a.get("dilations", [1, 1]), a.get("group", 1))]


def _conv_transpose(module, node, inputs):
    a = _attrs(node)
    x, weight = inputs[0], inputs[1]
    bias = inputs[2] if len(inputs) > 2 else None
    if "output_shape" in a:
        raise ValueError(f"ConvTranspose {node.name}: output_shape is not supported")
    y = F.conv_transpose2d(x, weight, bias, a.get("strides", [1, 1]), 0, a.get("output_padding", [0, 0]),
                           a.get("group", 1), a.get("dilations", [1, 1]))
    top, left, bottom, right = a.get("pads", [0, 0, 0, 0])
    return [y[:, :, top:y.shape[2] - bottom, left:y.shape[3] - right]]


def _clip(module, node, inputs):
    a = _attrs(node)
    low = inputs[1] if len(inputs) > 1 and inputs[1] is not None else a.get("min")
    high = inputs[2] if len(inputs) > 2 and inputs[2] is not None else a.get("max")
    x = inputs[0]
    if low is not None:
        x = torch.maximum(x, torch.as_tensor(low, dtype=x.dtype))
    if high is not None:
        x = torch.minimum(x, torch.as_tensor(high, dtype=x.dtype))
    return [x]


def _prelu(module, node, inputs):
    x, slope = inputs
    return [torch.where(x >= 0, x, x * slope)]


def _split(module, node, inputs):
    a = _attrs(node)
    axis = a.get("axis", 0)
    size = inputs[0].shape[axis]
    sizes = _ints(inputs[1]) if len(inputs) > 1 and inputs[1] is not None else a.get("split")
    if sizes is None:  # num_outputs (opset 18): ceil(size / n) each, the last one smaller when uneven
        parts = a.get("num_outputs", len(node.output))
        chunk = -(-size // parts)
        sizes = [min(chunk, size - chunk * index) for index in range(parts)]
    return list(torch.split(inputs[0], list(sizes), dim=axis))


def _slice(module, node, inputs):
    x = inputs[0]
    starts, ends = _ints(inputs[1]), _ints(inputs[2])
    axes = _ints(inputs[3]) if len(inputs) > 3 and inputs[3] is not None else list(range(len(starts)))
    steps = _ints(inputs[4]) if len(inputs) > 4 and inputs[4] is not None else [1] * len(starts)
    index = [slice(None)] * x.dim()
    backwards = []
    for start, end, axis, step in zip(starts, ends, axes, steps):
        size = x.shape[axis]
        if step == 0:
            raise ValueError(f"Slice {node.name}: a step of 0")
        if step > 0:
            index[axis] = slice(max(min(start, size), -size), max(min(end, size), -size - 1), step)
            continue
        # a negative step (ONNX: start clamped to [0, size - 1], end to [-1, size - 1], both after adding size
        # to a negative value): the indices picked, in order
        start = min(max(start + size if start < 0 else start, 0), size - 1)
        end = min(max(end + size if end < 0 else end, -1), size - 1)
        backwards.append((axis, torch.arange(start, end, step, device=x.device)))
    x = x[tuple(index)]
    for axis, picked in backwards:
        x = x.index_select(axis, picked)
    return [x]


def _pad(module, node, inputs):
    a = _attrs(node)
    pads = _ints(inputs[1])
    value = float(inputs[2].item()) if len(inputs) > 2 and inputs[2] is not None and inputs[2].numel() else 0.0
    if len(inputs) > 3 and inputs[3] is not None:  # axes (opset 18): the pads are for these axes only
        rank, given = inputs[0].dim(), len(pads) // 2
        full = [0] * (2 * rank)
        for index, axis in enumerate(_ints(inputs[3])):
            full[axis % rank], full[rank + axis % rank] = pads[index], pads[given + index]
        pads = full
    half = len(pads) // 2
    if any(pads[:2] + pads[half:half + 2]):
        raise ValueError(f"Pad {node.name}: only the spatial axes may be padded")
    mode = {"constant": "constant", "reflect": "reflect", "edge": "replicate"}[_decode(a.get("mode", "constant"))]
    torch_pads = (pads[3], pads[half + 3], pads[2], pads[half + 2])
    return [F.pad(inputs[0], torch_pads, mode=mode, value=value) if mode == "constant"
            else F.pad(inputs[0], torch_pads, mode=mode)]


def _depth_to_space(module, node, inputs):
    a = _attrs(node)
    block, mode = a["blocksize"], _decode(a.get("mode", "DCR"))
    x = inputs[0]
    if mode == "CRD":
        return [F.pixel_shuffle(x, block)]
    n, c, h, w = x.shape
    x = x.reshape(n, block, block, c // block ** 2, h, w).permute(0, 3, 4, 1, 5, 2)
    return [x.reshape(n, c // block ** 2, h * block, w * block)]


def _keys(t: torch.Tensor, a: float) -> torch.Tensor:
    """The cubic convolution kernel of Keys (1981) with parameter `a` at distances `t`."""
    t = t.abs()
    near = ((a + 2) * t - (a + 3)) * t * t + 1
    far = ((a * t - 5 * a) * t + 8 * a) * t - 4 * a
    return torch.where(t <= 1, near, torch.where(t < 2, far, torch.zeros_like(t)))


def _cubic_matrix(size_in: int, size_out: int, a: float, align_corners: bool) -> torch.Tensor:
    """size_out x size_in weights of ONNX's cubic Resize along one axis (edge pixels repeated outside)."""
    out = torch.arange(size_out, dtype=torch.float64)
    if align_corners:
        source = out * ((size_in - 1) / (size_out - 1) if size_out > 1 else 0.0)
    else:
        source = (out + 0.5) * (size_in / size_out) - 0.5
    base = torch.floor(source)
    matrix = torch.zeros(size_out, size_in, dtype=torch.float64)
    for offset in (-1, 0, 1, 2):
        index = base + offset
        weight = _keys(source - index, a)
        matrix.index_put_((out.long(), index.clamp(0, size_in - 1).long()), weight, accumulate=True)
    return matrix.float()


def _source_coordinates(size_in: int, size_out: int, scale: float, transform: str) -> torch.Tensor:
    """Where each output index samples the input along one axis (ONNX Resize's coordinate_transformation_mode;
    `scale` is the given scale, or size_out / size_in when sizes were given)."""
    out = torch.arange(size_out, dtype=torch.float64)
    if transform == "half_pixel":
        return (out + 0.5) / scale - 0.5
    if transform == "pytorch_half_pixel":
        return (out + 0.5) / scale - 0.5 if size_out > 1 else torch.zeros_like(out)
    if transform == "align_corners":
        return out * ((size_in - 1) / (size_out - 1) if size_out > 1 else 0.0)
    if transform == "asymmetric":
        return out / scale
    if transform == "tf_half_pixel_for_nn":
        return (out + 0.5) / scale
    raise ValueError(f"coordinate_transformation_mode={transform} is not supported")


def _nearest_index(source: torch.Tensor, mode: str, size_in: int) -> torch.Tensor:
    rounding = {"round_prefer_floor": lambda v: torch.ceil(v - 0.5), "round_prefer_ceil": lambda v: torch.floor(v + 0.5),
                "floor": torch.floor, "ceil": torch.ceil}
    if mode not in rounding:
        raise ValueError(f"nearest_mode={mode} is not supported")
    return rounding[mode](source).clamp(0, size_in - 1).long()


def _linear_matrix(source: torch.Tensor, size_in: int) -> torch.Tensor:
    """size_out x size_in weights of linear interpolation at `source` (edges clamped, as ONNX Runtime does)."""
    source = source.clamp(0, size_in - 1)
    low = torch.floor(source).clamp(max=size_in - 1)
    high = (low + 1).clamp(max=size_in - 1)
    fraction = source - low
    rows = torch.arange(len(source))
    matrix = torch.zeros(len(source), size_in, dtype=torch.float64)
    matrix.index_put_((rows, low.long()), 1 - fraction, accumulate=True)
    matrix.index_put_((rows, high.long()), fraction, accumulate=True)
    return matrix.float()


def _resize(module, node, inputs):
    a = _attrs(node)
    mode = _decode(a.get("mode", "nearest"))
    x = inputs[0]
    sizes = inputs[3] if len(inputs) > 3 and inputs[3] is not None and inputs[3].numel() else None
    scales = inputs[2] if len(inputs) > 2 and inputs[2] is not None and inputs[2].numel() else None
    if sizes is not None:
        size = _ints(sizes)[2:]
        factors = [o / i for o, i in zip(size, x.shape[2:])]
    else:
        factors = scales.tolist()[2:]
        size = [int(d * f) for d, f in zip(x.shape[2:], factors)]
    transform = _decode(a.get("coordinate_transformation_mode", "half_pixel"))
    try:
        sources = [_source_coordinates(x.shape[2 + k], size[k], factors[k], transform) for k in range(2)]
        if mode == "nearest":
            nearest = _decode(a.get("nearest_mode", "round_prefer_floor"))
            rows, columns = (_nearest_index(sources[k], nearest, x.shape[2 + k]).to(x.device) for k in range(2))
            return [x.index_select(2, rows).index_select(3, columns)]
    except ValueError as error:
        raise ValueError(f"Resize {node.name}: {error}") from None
    if mode == "linear" and transform in ("half_pixel", "pytorch_half_pixel", "align_corners"):
        return [F.interpolate(x, size=size, mode="bilinear", align_corners=transform == "align_corners")]
    if mode == "linear":
        rows, columns = (_linear_matrix(sources[k], x.shape[2 + k]).to(x.device) for k in range(2))
    else:
        if transform not in ("half_pixel", "pytorch_half_pixel", "align_corners"):
            raise ValueError(f"Resize {node.name}: cubic with coordinate_transformation_mode={transform} is not "
                             "supported")
        coefficient, corners = float(a.get("cubic_coeff_a", -0.75)), transform == "align_corners"
        rows = _cubic_matrix(x.shape[2], size[0], coefficient, corners).to(x.device)
        columns = _cubic_matrix(x.shape[3], size[1], coefficient, corners).to(x.device)
    return [torch.einsum("oh,nchw,pw->ncop", rows, x, columns)]


def _divide(a, b):
    """ONNX Div: integer tensors divide to an integer (truncated), as ONNX Runtime does; torch.div would give floats."""
    if not a.is_floating_point() and not b.is_floating_point():
        return torch.div(a, b, rounding_mode="trunc")
    return torch.div(a, b)


def _binary(fn):
    return lambda module, node, inputs: [fn(inputs[0], inputs[1])]


def _unary(fn):
    return lambda module, node, inputs: [fn(inputs[0])]


def _pool(kind: str):
    """MaxPool / AveragePool over 2-D windows (explicit pads; ceil_mode; AveragePool's count_include_pad)."""
    def run(module, node, inputs):
        a = _attrs(node)
        if _decode(a.get("auto_pad", "NOTSET")) not in ("NOTSET", "VALID") or any(d != 1 for d in a.get("dilations", [1])):
            raise ValueError(f"{node.op_type} {node.name}: only explicit pads and no dilation are supported")
        kernel = list(a["kernel_shape"])
        strides = list(a.get("strides", [1] * len(kernel)))
        pads = list(a.get("pads", [0] * 2 * len(kernel)))
        x, ceil = inputs[0], bool(a.get("ceil_mode", 0))
        if pads[:2] != pads[2:]:  # uneven pads: pad explicitly (-inf for max, zeros counted for average)
            fill = -math.inf if kind == "max" else 0.0
            x = F.pad(x, [pads[1], pads[3], pads[0], pads[2]], value=fill)
            pads = [0, 0, 0, 0]
        if kind == "max":
            return [F.max_pool2d(x, kernel, strides, pads[:2], ceil_mode=ceil)]
        return [F.avg_pool2d(x, kernel, strides, pads[:2], ceil_mode=ceil,
                             count_include_pad=bool(a.get("count_include_pad", 0)))]
    return run


def _layer_norm(module, node, inputs):
    a = _attrs(node)
    x, axis = inputs[0], a.get("axis", -1)
    axis = axis % x.dim()
    shape = x.shape[axis:]
    bias = inputs[2] if len(inputs) > 2 else None
    return [F.layer_norm(x, shape, inputs[1].expand(shape) if inputs[1] is not None else None,
                         None if bias is None else bias.expand(shape), a.get("epsilon", 1e-5))]


def _reduce(how):
    """ReduceMean (`how` "mean") or ReduceL2 ("l2"): over `axes` (an attribute, or an input from opset 18)."""
    def reduce(module, node, inputs):
        a = _attrs(node)
        axes = a.get("axes")
        if axes is None and len(inputs) > 1 and inputs[1] is not None:
            axes = _ints(inputs[1])
        keep, x = bool(a.get("keepdims", 1)), inputs[0]
        dims = [int(d) for d in axes] if axes else list(range(x.dim()))
        return [x.mean(dim=dims, keepdim=keep) if how == "mean" else  # (a zero row: gradient 0, not NaN)
                torch.linalg.vector_norm(x, dim=dims, keepdim=keep)]
    return reduce


def _gather(module, node, inputs):
    axis = _attrs(node).get("axis", 0)
    data, index = inputs[0], inputs[1].long()
    axis = axis % data.dim()
    index = torch.where(index < 0, index + data.shape[axis], index)
    picked = data.index_select(axis, index.flatten())
    return [picked.reshape(list(data.shape[:axis]) + list(index.shape) + list(data.shape[axis + 1:]))]


def _unsqueeze(module, node, inputs):
    axes = _attrs(node).get("axes") or _ints(inputs[1])
    x = inputs[0]
    rank = x.dim() + len(axes)
    for axis in sorted(a % rank for a in axes):
        x = x.unsqueeze(axis)
    return [x]


def _squeeze(module, node, inputs):
    axes = _attrs(node).get("axes") or (_ints(inputs[1]) if len(inputs) > 1 and inputs[1] is not None else None)
    x = inputs[0]
    if axes is None:
        return [x.squeeze()]
    for axis in sorted((a % x.dim() for a in axes), reverse=True):
        x = x.squeeze(axis)
    return [x]


_CAST = {TensorProto.FLOAT: torch.float32, TensorProto.INT64: torch.int64, TensorProto.INT32: torch.int32,
         TensorProto.FLOAT16: torch.float16, TensorProto.DOUBLE: torch.float64, TensorProto.BOOL: torch.bool,
         TensorProto.UINT8: torch.uint8, TensorProto.INT8: torch.int8}


def _cast(module, node, inputs):
    to = _attrs(node)["to"]
    if to not in _CAST:
        raise ValueError(f"Cast {node.name}: to type {to} is not supported")
    return [inputs[0].to(_CAST[to])]


def _constant_of_shape(module, node, inputs):
    value = _attrs(node).get("value")
    fill = torch.from_numpy(numpy_helper.to_array(value).copy()) if value is not None else torch.zeros(1)
    return [fill.reshape(()).expand(_ints(inputs[0])).clone().to(inputs[0].device)]


def _gelu(module, node, inputs):
    approximate = _decode(_attrs(node).get("approximate", "none"))
    return [F.gelu(inputs[0], approximate="tanh" if approximate == "tanh" else "none")]


OPS: dict[str, Op] = {
    "MaxPool": _pool("max"), "AveragePool": _pool("average"), "LayerNormalization": _layer_norm,
    "ReduceMean": _reduce("mean"), "ReduceL2": _reduce("l2"), "Gather": _gather, "Unsqueeze": _unsqueeze, "Squeeze": _squeeze, "Cast": _cast,
    "ConstantOfShape": _constant_of_shape, "Gelu": _gelu, "Erf": _unary(torch.erf), "Sqrt": _unary(torch.sqrt), "Neg": _unary(torch.neg),
    "Abs": _unary(torch.abs), "Pow": _binary(torch.pow), "MatMul": _binary(torch.matmul),
    "Softmax": lambda m, n, i: [torch.softmax(i[0], dim=_attrs(n).get("axis", -1))],
    "GlobalAveragePool": lambda m, n, i: [i[0].mean(dim=(2, 3), keepdim=True)],
    "Shape": lambda m, n, i: [torch.tensor(list(i[0].shape)[_attrs(n).get("start", 0):_attrs(n).get("end")],
                                           dtype=torch.int64, device=i[0].device)],
    "Tile": lambda m, n, i: [i[0].repeat(*_ints(i[1]))],
    "Expand": lambda m, n, i: [i[0] * torch.ones(_ints(i[1]), dtype=i[0].dtype, device=i[0].device)],
    "Flatten": lambda m, n, i: [i[0].reshape(int(np.prod(i[0].shape[:_attrs(n).get("axis", 1)])), -1)],

    "Conv": _conv, "ConvTranspose": _conv_transpose, "Clip": _clip, "PRelu": _prelu, "Split": _split,
    "Slice": _slice, "Pad": _pad, "DepthToSpace": _depth_to_space, "Resize": _resize,
    "Relu": _unary(torch.relu), "Sigmoid": _unary(torch.sigmoid), "Tanh": _unary(torch.tanh),
    "Log": _unary(torch.log), "Exp": _unary(torch.exp), "Identity": _unary(lambda x: x),
    "Add": _binary(torch.add), "Sub": _binary(torch.sub), "Mul": _binary(torch.mul), "Div": _binary(_divide),
    "Max": _binary(torch.maximum),
    "LeakyRelu": lambda m, n, i: [F.leaky_relu(i[0], _attrs(n).get("alpha", 0.01))],
    "Concat": lambda m, n, i: [torch.cat(i, dim=_attrs(n)["axis"])],
    "Transpose": lambda m, n, i: [i[0].permute(*_attrs(n).get("perm", range(i[0].dim() - 1, -1, -1)))],
    "Reshape": lambda m, n, i: [_reshape(i[0], _ints(i[1]))],
    "SpaceToDepth": lambda m, n, i: [F.pixel_unshuffle(i[0], _attrs(n)["blocksize"])],
}


def _reshape(x: torch.Tensor, shape: list[int]) -> torch.Tensor:
    """ONNX Reshape (0 copies the input's dimension). An export that baked batch 1 into a constant shape (a
    TensorFlow ESPCN's [1, 1, 48, 48]) still runs a batch of patches, as the lab's refinements and QAT feed it: a
    leading 1 that does not fit the batch is the batch."""
    dims = [d if d else x.shape[k] for k, d in enumerate(shape)]
    if dims and dims[0] == 1 and x.shape[0] > 1 and math.prod(d for d in dims if d > 0) * x.shape[0] == x.numel():
        dims[0] = x.shape[0]
    return x.reshape(dims)


def _constant(node: onnx.NodeProto) -> torch.Tensor:
    """A Constant node's value, whichever attribute holds it."""
    a = _attrs(node)
    if "value" in a:
        return torch.from_numpy(numpy_helper.to_array(a["value"]).copy())
    for name, dtype in (("value_float", torch.float32), ("value_floats", torch.float32), ("value_int", torch.int64),
                        ("value_ints", torch.int64)):
        if name in a:
            return torch.tensor(a[name], dtype=dtype)
    raise ValueError(f"Constant {node.name}: only tensor, float and int values can be fine-tuned here "
                     f"(this one has {', '.join(a) or 'no value'})")


def _check_at_load(node: onnx.NodeProto, module: "OnnxModule") -> None:
    """Refuse, when the module is built, what would only fail once it runs."""
    if node.op_type == "Slice" and len(node.input) > 4 and node.input[4]:
        steps = module.constants.get(node.input[4])
        if steps is not None and any(v == 0 for v in _ints(steps)):
            raise ValueError(f"Slice {node.name}: a step of 0 is not a slice")


class OnnxModule(nn.Module):
    """An ONNX graph (one input, one output) as a torch module; float initializers are trainable parameters."""

    def __init__(self, model: onnx.ModelProto, extra_ops: dict[str, Op] | None = None,
                 frozen: Callable[[str], bool] = lambda name: False):
        """Read the graph; nothing runs yet.

        Args:
            model: the ONNX model.
            extra_ops: op handlers beyond `OPS` (they may shadow one).
            frozen: initializer names that stay constants even when float.

        Raises:
            ValueError: the graph has ops that are not covered, or not exactly one input and one output.
        """
        super().__init__()
        self.ops = {**OPS, **(extra_ops or {})}
        graph = model.graph
        missing = sorted({n.op_type for n in graph.node if n.op_type not in self.ops and n.op_type != "Constant"})
        if missing:
            raise ValueError(f"these ONNX ops cannot be fine-tuned here yet: {', '.join(missing)}; "
                             f"covered: {', '.join(sorted(self.ops))}")
        if len(graph.input) - len({i.name for i in graph.initializer} & {i.name for i in graph.input}) != 1 \
                or len(graph.output) != 1:
            raise ValueError("only graphs with one input and one output can be fine-tuned")
        initializers = {i.name for i in graph.initializer}
        self.input_name = next(i.name for i in graph.input if i.name not in initializers)
        self.output_name = graph.output[0].name
        self.params = nn.ParameterDict()
        self.param_keys: dict[str, str] = {}  # ONNX name -> ParameterDict key ('.' is not allowed in keys)
        self.constants: dict[str, torch.Tensor] = {}
        for init in graph.initializer:
            self._add_initializer(init.name, numpy_helper.to_array(init), frozen(init.name))
        self.nodes = []
        for node in graph.node:
            if node.op_type == "Constant":
                self.constants[node.output[0]] = _constant(node)
            else:
                _check_at_load(node, self)
                self.nodes.append(node)

    def _add_initializer(self, name: str, array: np.ndarray, frozen: bool) -> None:
        tensor = torch.from_numpy(np.array(array, copy=True))
        if tensor.is_floating_point() and not frozen:
            key = f"p{len(self.params)}"
            self.params[key] = nn.Parameter(tensor.float())
            self.param_keys[name] = key
        else:
            self.constants[name] = tensor

    def tensor(self, name: str) -> torch.Tensor:
        """An initializer (parameter or constant) by its ONNX name."""
        return self.params[self.param_keys[name]] if name in self.param_keys else self.constants[name]

    def named_onnx_parameters(self) -> dict[str, nn.Parameter]:
        """{ONNX initializer name: parameter}."""
        return {name: self.params[key] for name, key in self.param_keys.items()}

    def forward(self, x: torch.Tensor, keep: set[str] | None = None):
        """Run the graph.

        Args:
            x: the graph's input.
            keep: intermediate tensor names to return as well.

        Returns:
            the output, or (output, {name: tensor}) when `keep` is given.
        """
        values = {self.input_name: x}
        for node in self.nodes:
            inputs = [(values[n] if n in values else self.tensor(n)) if n else None for n in node.input]
            outputs = self.ops[node.op_type](self, node, inputs)
            values.update(zip(node.output, outputs))
        if keep is None:
            return values[self.output_name]
        return values[self.output_name], {name: values[name] for name in keep if name in values}

    def _apply(self, fn, recurse=True):
        """`.to()`, `.cuda()`, `.double()`...: the constants (plain tensors, not parameters) go along; the module's
        conversions leave integer tensors alone."""
        super()._apply(fn, recurse)
        self.constants = {k: fn(v) for k, v in self.constants.items()}
        return self
