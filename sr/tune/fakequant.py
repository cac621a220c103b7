"""The fake-quantized network that QAT trains and the PTQ refinements tune, and how a tuned one is written back.

The fake-quantized network is not a second description of what gets quantized: it is the FP32 graph run in
PyTorch (`sr.model.onnxtorch`) with a fake quantizer wherever the spec (`sr.quant.quantspec.QuantSpec`, the one the QDQ
writer obeys) puts a Q/DQ pair:

- activations: a fake quantizer with the pair's own numerics (symmetric INT8 with zero point 0 for `tensorrt`,
  UINT8 with its zero point for `cpu`; saturating at the integer type's limits, rounding half to even as
  QuantizeLinear does) and a learned step size, LSQ-style (Esser et al., ICLR 2020: the rounding passes the
  gradient straight through, so the step size gets d/ds = round(x/s) - x/s inside the range and the limit
  outside; we learn log(s), with Adam). Tensors of one tie group of the spec share one step size here;
- weights: per-output-channel (or, where the spec says, per-tensor) symmetric INT8, the step recomputed from the current weights (max |w| / 127, as
  the writer does at export), rounding straight through.

Conv biases stay float in training. In `tensorrt` they are float in the QDQ model too; in `cpu` the writer
stores them in INT32 with step s_in * s_w (about 1e-5 here), an error far below anything measurable.

Also here: `fake_quantized` (a model calibrated and made trainable), `export_trained` (the tuned weights and the
learned ranges written as a model file and its QDQ model) and `original_model` (the model a tuned one came from).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import onnx
import torch
from onnx import numpy_helper
from torch import nn

from ..graph import GraphIndex
from ..quant.calibrate import CalibrationConfig
from ..quant.searches import RangeSource, TensorRange
from ..model.models import TuningRecord, save_tuned
from ..model.onnxtorch import OnnxModule
from ..quant.quantspec import QuantSpec, activation_qparams
from ..run.quantize import calibrate_model, qat_record
from ..quant.calibrated import CalibratedModel
from ..quant.quantspec import Scheme
from ..quant.recipe import Fixes
from ..quant.qdq import spec_of, write_qdq_model
from ..store import write_atomic

log = logging.getLogger(__name__)


@dataclass
class Quantizer:
    """One activation step size shared by the Q/DQ pairs listed in `tensors`."""

    tensors: list[str]
    zero_point: int
    low: int  # integer limits the runtime saturates to
    high: int
    export_low: int  # the lowest integer the writer maps a range onto (symmetric INT8: -127; UINT8: 0)


class FakeQuantModel(nn.Module):
    """A QDQ ONNX model as a trainable torch module (see the module docstring)."""

    def __init__(self, fp32: onnx.ModelProto, spec: QuantSpec, ranges: dict[str, TensorRange],
                 frozen_tensors: Sequence[str] = ()):
        """Read the FP32 graph and put a fake quantizer wherever the spec quantizes.

        Args:
            fp32: the FP32 model (it gives the trainable weights).
            spec: what is quantized (`sr.quant.quantspec.quant_spec`): the tie groups share one step size.
            ranges: the calibrated ranges, which give the starting step sizes.
            frozen_tensors: tensors whose step size is kept (ranges fixed in advance).

        Raises:
            ValueError: an op the interpreter does not cover.
        """
        super().__init__()
        self.fp32 = fp32
        self.spec = spec
        graph, initial_scales, self.quantizers = _fake_quant_graph(fp32, spec, ranges)
        self.groups = list(self.quantizers)
        self.log_scales = nn.Parameter(torch.tensor([math.log(initial_scales[g]) for g in self.groups]))
        self.group_index = {g: i for i, g in enumerate(self.groups)}
        self.network = OnnxModule(graph, extra_ops={"FakeQuant": self._activation, "FakeQuantWeight": self._weight})
        self.enabled = True
        self.active: set[str] | None = None  # activation groups quantized (None: all), for the PTQ searches
        self.weight_override: dict[str, Callable[[], torch.Tensor]] = {}  # weight name -> its quantized value
        self.frozen_groups = {g for g in self.groups if any(t in frozen_tensors for t in self.quantizers[g].tensors)}
        keep = torch.tensor([g in self.frozen_groups for g in self.groups])
        if keep.any():
            self.log_scales.register_hook(lambda grad: grad.masked_fill(keep, 0.0))

    def _activation(self, module, node, inputs):
        group = onnx.helper.get_attribute_value(node.attribute[0]).decode()
        x = inputs[0]
        if not self.enabled or (self.active is not None and group not in self.active):
            return [x]
        quantizer = self.quantizers[group]
        scale = self.log_scales[self.group_index[group]].exp()
        scaled = x / scale
        rounded = scaled + (torch.round(scaled) - scaled).detach()  # straight through
        q = torch.clamp(rounded + quantizer.zero_point, quantizer.low, quantizer.high)
        return [(q - quantizer.zero_point) * scale]

    def _weight(self, module, node, inputs):
        weight = inputs[0]
        if node.input[0] in self.weight_override:
            return [self.weight_override[node.input[0]]()]
        if not self.enabled:
            return [weight]
        axis = onnx.helper.get_attribute_value(node.attribute[0])
        dims = [d for d in range(weight.dim()) if d != axis]  # axis -1: one scale for the whole tensor
        scale = (weight.detach().abs().amax(dim=dims, keepdim=True) / 127.0).clamp_min(1e-12)
        scaled = weight / scale
        rounded = scaled + (torch.round(scaled) - scaled).detach()
        return [torch.clamp(rounded, -127, 127) * scale]

    def forward(self, x: torch.Tensor, keep: set[str] | None = None):
        """The fake-quantized output (and the tensors named in `keep`, as `OnnxModule.forward`)."""
        return self.network(x, keep)

    def scale(self, group: str) -> float:
        """The current step size of an activation group."""
        return float(self.log_scales[self.group_index[group]].detach().exp())

    def set_scale(self, group: str, scale: float) -> None:
        """Set an activation group's step size."""
        with torch.no_grad():
            self.log_scales[self.group_index[group]] = math.log(scale)

    def weights(self) -> dict[str, torch.Tensor]:
        """{FP32 initializer name: trained tensor}."""
        return {name: p.detach().cpu() for name, p in self.network.named_onnx_parameters().items()}

    def ranges(self) -> dict[str, tuple[float, float]]:
        """{tensor: (low, high)} that make the QDQ writer reproduce the learned step sizes and zero points."""
        result = {}
        for group, quantizer in self.quantizers.items():
            scale = float(self.log_scales[self.group_index[group]].detach().exp())
            low = (quantizer.export_low - quantizer.zero_point) * scale
            high = (quantizer.high - quantizer.zero_point) * scale
            result.update({tensor: (low, high) for tensor in quantizer.tensors})
        return result


def _fake_quant_graph(fp32: onnx.ModelProto, spec: QuantSpec, ranges: dict[str, TensorRange]):
    """The FP32 graph with a FakeQuant node after each activation of the spec and a FakeQuantWeight node in front
    of each of its weights (the same places the QDQ writer puts its Q/DQ pairs).

    Returns:
        (graph, {group: initial step size}, {group: Quantizer}).
    """
    nodes, scales, quantizers, rename = [], {}, {}, {}
    outputs = {o.name for o in fp32.graph.output}
    producer = GraphIndex(fp32).producers
    pending: dict[str, list] = {}  # producer output -> FakeQuant nodes to put right after its producer
    for tensor, activation in spec.activations.items():
        group = activation.group
        r = ranges[group]
        scale, zero = activation_qparams(activation, r.low, r.high)
        runtime = (-128, 127) if activation.signed else (0, 255)
        quantizer = quantizers.setdefault(group, Quantizer([], zero, runtime[0], runtime[1], activation.qmin))
        quantizer.tensors.append(tensor)
        scales.setdefault(group, scale)
        source, target = tensor, f"{tensor}_fake_quantized"
        if tensor in outputs:
            source, target = f"{tensor}_float", tensor
        else:
            rename[tensor] = target
        pending.setdefault(tensor, []).append(onnx.helper.make_node("FakeQuant", [source], [target], group=group))
    for name, weight in spec.weights.items():
        nodes.append(onnx.helper.make_node("FakeQuantWeight", [name], [f"{name}_fake_quantized"],
                                           axis=-1 if weight.axis is None else weight.axis))
        rename[name] = f"{name}_fake_quantized"
    graph_input = fp32.graph.input[0].name
    nodes.extend(pending.pop(graph_input, []))
    for original in fp32.graph.node:
        node = onnx.NodeProto()
        node.CopyFrom(original)
        for position, name in enumerate(node.input):
            node.input[position] = rename.get(name, name)
        for position, name in enumerate(node.output):
            if name in outputs and name in pending:
                node.output[position] = f"{name}_float"
        nodes.append(node)
        for name in original.output:
            nodes.extend(pending.pop(name, []))
    for tensor, extra in pending.items():  # other graph inputs
        nodes[0:0] = extra
    del producer
    graph = onnx.helper.make_graph(nodes, "fake-quant", list(fp32.graph.input), list(fp32.graph.output),
                                   list(fp32.graph.initializer))
    return onnx.helper.make_model(graph, opset_imports=list(fp32.opset_import)), scales, quantizers


def trainable_initializers(model: onnx.ModelProto) -> set[str]:
    """The initializers QAT may change: Conv/ConvTranspose weights and biases, PRelu slopes (not the constants of
    a wrapper, such as a x255 scale or a Resize's scales)."""
    names = set()
    for node in model.graph.node:
        if node.op_type in ("Conv", "ConvTranspose"):
            names.update(node.input[1:])
        elif node.op_type == "PRelu":
            names.add(node.input[1])
    return names - {""}


def fake_quantized(structure: str, calibration: CalibrationConfig, scheme: str,
                   fixes: Fixes) -> tuple[FakeQuantModel, CalibratedModel]:
    """Calibrate `structure` (cached) and build its fake-quantized model, trainable weights marked, fixed ranges'
    step sizes frozen.

    Returns:
        (the FakeQuantModel, the calibration it starts from).
    """
    calibrated = calibrate_model(structure, calibration, scheme, fixes=fixes)
    fp32 = onnx.load(str(calibrated.fp32_onnx))
    spec = spec_of(fp32, scheme, calibrated.fixes.keep_float)
    # every range fixed in advance stays (the caller's and those calibrate_model adds, a user's input range)
    student = FakeQuantModel(fp32, spec, calibrated.ranges, frozen_tensors=list(calibrated.fixes.fixed_range))
    trainable = trainable_initializers(fp32)
    for name, parameter in student.network.named_onnx_parameters().items():
        parameter.requires_grad_(name in trainable)
    return student, calibrated


def original_model(model: str) -> str:
    """The model a QAT/PTQ result was made from (its `base`), or `model` itself."""
    record = qat_record(model)
    return str(record.base) if record and record.base else str(model)


def qdq_path_for(out: Path, scheme: str) -> Path:
    """Where the QDQ model of a QAT result goes: `<out stem>.<scheme>.qdq.onnx` beside it."""
    return out.with_name(f"{out.name.rsplit('.', 1)[0]}.{scheme}.qdq.onnx")


def export_trained(base: str, fp32_path: Path, weights: dict[str, torch.Tensor], record: TuningRecord, out: Path,
                   qdq_out: Path, calibrated: dict[str, TensorRange]) -> None:
    """Write the trained model (`out`) and the QDQ model of its learned ranges (`qdq_out`), both atomically.

    Args:
        base: the model QAT started from (a PyTorch weight file gets a safetensors `out`, an ONNX model an ONNX one).
        fp32_path: its FP32 ONNX model.
        weights: {initializer name: trained tensor}.
        record: what goes into the metadata under `qat` (its JSON form).
        out, qdq_out: the files to write.
        calibrated: the starting calibration (its observed min/max are kept in the QDQ ranges' records).
    """
    fp32 = onnx.load(str(fp32_path))
    for initializer in fp32.graph.initializer:
        if initializer.name in weights:
            initializer.CopyFrom(numpy_helper.from_array(weights[initializer.name].numpy(), initializer.name))
    save_tuned(base, fp32, weights, out, record.to_json())  # the weight file, or a standard graph with its contract
    ranges = {}
    for tensor, (low, high) in record.ranges.items():
        seen = calibrated.get(tensor)
        ranges[tensor] = TensorRange(tensor, low, high, seen.observed_min if seen else low,
                                     seen.observed_max if seen else high, float("nan"), RangeSource.QAT)
    trained_fp32 = Path(f"{qdq_out}.fp32.onnx")
    try:
        write_atomic(fp32.SerializeToString(), trained_fp32)
        write_qdq_model(trained_fp32, ranges, Scheme.parse(record.scheme), qdq_out)
    finally:
        trained_fp32.unlink(missing_ok=True)
