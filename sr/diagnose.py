"""Which tensor makes the INT8 output dull? Per-tensor sensitivity, SQNR, histograms, and one-click fixes.

Sensitivity is measured by simulation on the FP32 ONNX graph with ONNX Runtime: a QuantizeLinear/DequantizeLinear
pair with the calibrated range is placed on the chosen activation tensors (weights stay FP32, so the numbers
isolate the activation ranges, which is what calibration chooses). For each tensor t:

- `psnr_drop_db`: FP32 PSNR minus the PSNR with only t quantized;
- `recovery_db`: PSNR with every tensor but t quantized, minus the PSNR with all quantized;
- `brightness`: mean brightness of the only-t output over FP32's;
- `sqnr_db`: signal-to-quantization-noise ratio of t over its calibration histogram.

Example:
    >>> report = diagnose("xlsr-relu", "entropy", 100, "tensorrt", data="../shared/data/Set5")
    >>> report.ranking[0].tensor
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from .calibrate import CalibrationConfig, Method, TensorRange, TensorStats
from .compare import prepare_input
from .data import degrade, list_images, load_image
from .engines import OrtEngine, tiled
from .metrics import brightness_ratio, psnr_y
from .models import read_metadata
from .quantize import CalibratedModel, Fixes, Scheme, calibrate_model, tie_fused_ranges

# The calibration the README recommends (see "Findings"): mse ranges, tensorrt scheme, 100 samples; with it every
# convolution and every activation stays INT8.
RECOMMENDED = {"method": "mse", "samples": 100, "scheme": "tensorrt"}

FIXES = {
    "range from minmax": lambda t: Fixes(range_method={t: "minmax"}),
    "range from mse": lambda t: Fixes(range_method={t: "mse"}),
    "range from percentile 99.99": lambda t: Fixes(range_method={t: "percentile"}),
    "keep in float (no QDQ)": lambda t: Fixes(keep_float=[t]),
}


def recommended_calibration(model: str) -> tuple[CalibrationConfig, Scheme, Fixes]:
    return (CalibrationConfig(method=RECOMMENDED["method"], samples=RECOMMENDED["samples"]),
            Scheme(RECOMMENDED["scheme"]), Fixes())


@dataclass
class LayerReport:
    tensor: str
    op: str
    consumers: list[str]
    psnr_drop_db: float
    recovery_db: float
    brightness: float
    sqnr_db: float
    clipped_fraction: float
    clipped_energy: float
    low: float
    high: float
    observed_min: float
    observed_max: float

    def to_json(self) -> dict:
        return {"tensor": self.tensor, "op": self.op, "psnr_drop_db": self.psnr_drop_db,
                "recovery_db": self.recovery_db, "sqnr_db": self.sqnr_db, "clipped_fraction": self.clipped_fraction}


@dataclass
class DiagnosisReport:
    model: str
    method: str
    scheme: str
    samples: int
    fp32_psnr_y: float
    int8_psnr_y: float  # all activations quantized (simulation)
    int8_brightness: float
    ranking: list[LayerReport]
    calibrated: CalibratedModel = field(repr=False)
    stats: dict[str, TensorStats] = field(repr=False)

    def to_json(self) -> dict:
        return {"model": self.model, "method": self.method, "scheme": self.scheme, "fp32_psnr_y": self.fp32_psnr_y,
                "int8_psnr_y": self.int8_psnr_y, "ranking": [r.to_json() for r in self.ranking]}

    def ranking_rows(self) -> list[dict]:
        return [{"tensor": r.tensor, "op": r.op, "PSNR drop alone (dB)": r.psnr_drop_db,
                 "recovery if kept float (dB)": r.recovery_db, "brightness alone": r.brightness,
                 "SQNR (dB)": r.sqnr_db, "clipped %": 100 * r.clipped_fraction,
                 "clipped energy %": 100 * r.clipped_energy} for r in self.ranking]

    def summary(self) -> str:
        if not self.ranking:
            return "Nothing to rank."
        top = self.ranking[0]
        return (f"**{self.model}**, {self.method} / {self.samples} samples / {self.scheme}: FP32 "
                f"{self.fp32_psnr_y:.2f} dB, all activations INT8 {self.int8_psnr_y:.2f} dB "
                f"(brightness {self.int8_brightness:.3f}). The worst tensor is `{top.tensor}` ({top.op} -> "
                f"{', '.join(top.consumers) or 'output'}): quantized alone it costs {top.psnr_drop_db:.2f} dB; "
                f"keeping only it in float recovers {top.recovery_db:.2f} dB. Its range [{top.low:.3g}, "
                f"{top.high:.3g}] clips {100 * top.clipped_fraction:.3f}% of its values and "
                f"{100 * top.clipped_energy:.1f}% of its signal energy (observed [{top.observed_min:.3g}, "
                f"{top.observed_max:.3g}]).")

    def histogram_figure(self, tensor: str | None):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        figure, axis = plt.subplots(figsize=(8, 3))
        if tensor and tensor in self.stats:
            stats = self.stats[tensor]
            edges = np.arange(len(stats.histogram) + 1) * stats.bin_width
            axis.stairs(np.maximum(stats.histogram, 0.5), edges, fill=True, color="#6b8fb5")
            chosen = self.calibrated.ranges[tensor]
            limit = max(abs(chosen.low), abs(chosen.high)) if stats.observed_min < 0 else chosen.high
            axis.axvline(limit, color="#d62728", label=f"chosen |range| {limit:.3g}")
            axis.axvline(stats.amax, color="black", linestyle="--", label=f"observed max |x| {stats.amax:.3g}")
            axis.set_yscale("log")
            axis.set_xlabel("|x|")
            axis.set_title(tensor, fontsize=9)
            axis.legend(fontsize=8)
        figure.tight_layout()
        return figure


def _quant_params(r: TensorRange, symmetric: bool) -> tuple[float, int, int]:
    """(scale, zero point, ONNX dtype) of a range, as ONNX Runtime's quantizer computes them."""
    if symmetric:
        amax = max(abs(r.low), abs(r.high), 1e-8)
        return amax / 127.0, 0, TensorProto.INT8
    low, high = min(r.low, 0.0), max(r.high, 0.0)
    scale = max(high - low, 1e-8) / 255.0
    return scale, int(round(-low / scale)), TensorProto.UINT8


def simulation_model(fp32: onnx.ModelProto, ranges: dict[str, TensorRange], quantized: Sequence[str],
                     symmetric: bool) -> bytes:
    """The FP32 graph with a Q/DQ pair after each tensor in `quantized` (activation-only simulation)."""
    model = onnx.ModelProto()
    model.CopyFrom(fp32)
    graph = model.graph
    nodes = list(graph.node)
    rename = {}
    inserted_after: dict[int, list] = {}
    producer_index = {out: i for i, node in enumerate(nodes) for out in node.output}
    for tensor in quantized:
        scale, zero, dtype = _quant_params(ranges[tensor], symmetric)
        tag = tensor.replace("/", "_")
        graph.initializer.extend([numpy_helper.from_array(np.array(scale, np.float32), f"{tag}_s"),
                                  helper.make_tensor(f"{tag}_z", dtype, [], [zero])])
        pair = [helper.make_node("QuantizeLinear", [tensor, f"{tag}_s", f"{tag}_z"], [f"{tag}_q"]),
                helper.make_node("DequantizeLinear", [f"{tag}_q", f"{tag}_s", f"{tag}_z"], [f"{tag}_dq"])]
        rename[tensor] = f"{tag}_dq"
        inserted_after.setdefault(producer_index.get(tensor, -1), []).extend(pair)
    rebuilt = list(inserted_after.get(-1, []))
    for index, node in enumerate(nodes):
        for position, name in enumerate(node.input):
            if name in rename:
                node.input[position] = rename[name]
        rebuilt.append(node)
        rebuilt.extend(inserted_after.get(index, []))
    for output in graph.output:
        if output.name in rename:  # keep the graph's output name: route it through an Identity
            source = rename[output.name]
            rebuilt.append(helper.make_node("Identity", [source], [output.name + "_final"]))
            output.name = output.name + "_final"
    del graph.node[:]
    graph.node.extend(rebuilt)
    return model.SerializeToString()


def _sqnr(stats: TensorStats, r: TensorRange, symmetric: bool) -> tuple[float, float]:
    """(SQNR dB, clipped share of signal energy) from the |x| histogram, values at bin centres."""
    if stats.histogram.sum() == 0 or stats.bin_width == 0:
        return math.inf, 0.0
    centres = (np.arange(len(stats.histogram)) + 0.5) * stats.bin_width
    scale, _, _ = _quant_params(r, symmetric)
    limit = max(abs(r.low), abs(r.high)) if (symmetric or stats.observed_min < 0) else r.high
    levels = 127 if symmetric else 255
    quantized = np.minimum(np.round(centres / scale), levels) * scale
    quantized = np.minimum(quantized, limit)
    energy = np.sum(stats.histogram * centres**2)
    noise = np.sum(stats.histogram * (centres - quantized) ** 2)
    clipped = np.sum(stats.histogram[centres > limit] * centres[centres > limit] ** 2)
    return (10 * math.log10(energy / noise) if noise > 0 else math.inf), float(clipped / energy)


def _eval_images(data: str | None, images: Sequence | None, mode: str, scale: int) -> list[tuple]:
    """[(lr, truth or None)] to measure on."""
    if images:
        prepared = [prepare_input(image, mode, scale) for image in images]
        return [(p.lr, p.truth) for p in prepared]
    if data is None:
        raise ValueError("give an evaluation folder (--data) or images")
    return [tuple(reversed(degrade(load_image(path), scale))) for path in list_images(data)]


def diagnose(model: str, method: str = "entropy", samples: int = 100, scheme: str = "tensorrt",
             data: str | None = None, images_for_eval: Sequence | None = None, mode: str = "Check against ground truth",
             top: int | None = None, progress: Callable[[float, str], None] | None = None) -> DiagnosisReport:
    """Rank the activation tensors of `model` by the damage their INT8 range does.

    PSNR is measured against the ground truth when there is one (folders, ground-truth mode), else against the
    model's own FP32 output.
    """
    scheme = Scheme.parse(scheme)
    config = CalibrationConfig(method=method, samples=samples)
    scale = int(read_metadata(model)["config"]["scale"])
    calibrated = calibrate_model(model, config, scheme)
    fp32 = onnx.load(str(calibrated.fp32_onnx))
    ranges = tie_fused_ranges(fp32, calibrated.ranges)
    # Quantization points: tensors a real deployment quantizes once (tied Conv outputs share their activation's
    # QDQ, so the activation stands for both).
    points = [name for name in calibrated.ranges if not _is_fused_into_activation(fp32, name)]
    pairs = _eval_images(data, images_for_eval, mode, scale)
    fp32_engine = OrtEngine(calibrated.fp32_onnx, scale)
    references = [fp32_engine.run(lr) for lr, _ in pairs]
    targets = [truth if truth is not None else ref for (lr, truth), ref in zip(pairs, references)]

    def score(quantized: Sequence[str]) -> tuple[float, float]:
        session = ort.InferenceSession(simulation_model(fp32, ranges, quantized, scheme.symmetric),
                                       providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        outputs = [tiled(lambda a: session.run(None, {name: a})[0], lr, scale) for lr, _ in pairs]
        psnr = float(np.mean([psnr_y(o, t, scale) for o, t in zip(outputs, targets)]))
        bright = float(np.mean([brightness_ratio(o, r) for o, r in zip(outputs, references)]))
        return psnr, bright

    fp32_psnr = float(np.mean([psnr_y(r, t, scale) for r, t in zip(references, targets)])) \
        if any(t is not r for t, r in zip(targets, references)) else math.inf
    all_psnr, all_bright = score(points)
    consumers: dict[str, list[str]] = {}
    for node in fp32.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node.op_type)
    stats = {s.name: s for s in calibrated.stats}
    reports = []
    for index, tensor in enumerate(points):
        if progress:
            progress(index / len(points), f"tensor {index + 1} of {len(points)}")
        alone_psnr, alone_bright = score([tensor])
        rest_psnr, _ = score([p for p in points if p != tensor])
        r = ranges[tensor]
        sqnr, energy = _sqnr(stats[tensor], r, scheme.symmetric)
        reports.append(LayerReport(tensor, calibrated.producers.get(tensor, "?"), consumers.get(tensor, []),
                                   (fp32_psnr if math.isfinite(fp32_psnr) else 100.0) - alone_psnr
                                   if math.isfinite(alone_psnr) else 0.0,
                                   rest_psnr - all_psnr, alone_bright, sqnr, r.clipped_fraction, energy,
                                   r.low, r.high, r.observed_min, r.observed_max))
    reports.sort(key=lambda r: (r.psnr_drop_db + r.recovery_db), reverse=True)
    return DiagnosisReport(model, config.method.value, scheme.value, samples, fp32_psnr, all_psnr, all_bright,
                           reports[:top] if top else reports, calibrated, stats)


def _is_fused_into_activation(model: onnx.ModelProto, tensor: str) -> bool:
    """True for a tensor that only feeds a ReLU/Clip (or a DepthToSpace that does): TensorRT quantizes it
    together with that activation."""
    consumers = [node for node in model.graph.node if tensor in node.input]
    if len(consumers) != 1:
        return False
    node = consumers[0]
    if node.op_type in ("Relu", "Clip"):
        return True
    return node.op_type == "DepthToSpace" and _is_fused_into_activation(model, node.output[0])


@dataclass
class FixOutcome:
    before: np.ndarray
    after: np.ndarray
    rows: list[dict]
    calibrated: CalibratedModel


def apply_fix(report: DiagnosisReport, tensor: str, fix: str, image, mode: str,
              progress: Callable[[float, str], None] | None = None) -> FixOutcome:
    """Recalibrate `report.model` with `fix` on `tensor` and measure the real INT8 model before and after."""
    if fix not in FIXES:
        raise ValueError(f"unknown fix {fix!r}; choose one of: {', '.join(FIXES)}")
    if tensor not in report.calibrated.ranges:
        raise ValueError(f"no tensor {tensor!r} in {report.model}")
    scale = int(read_metadata(report.model)["config"]["scale"])
    prepared = prepare_input(image, mode, scale)
    fixed = calibrate_model(report.model, report.calibrated.config, report.calibrated.scheme,
                            fixes=FIXES[fix](tensor), progress=progress)
    reference = OrtEngine(report.calibrated.fp32_onnx, scale).run(prepared.lr)
    target = prepared.truth if prepared.truth is not None else reference
    before = OrtEngine(report.calibrated.qdq_onnx, scale).run(prepared.lr)
    after = OrtEngine(fixed.qdq_onnx, scale).run(prepared.lr)
    against = "truth" if prepared.truth is not None else "FP32"
    rows = [{"INT8 model": label, f"PSNR vs {against} (dB)": psnr_y(out, target, scale),
             "brightness vs FP32": brightness_ratio(out, reference)}
            for label, out in (("before", before), (f"after: {fix} on {tensor}", after))]
    return FixOutcome(before, after, rows, fixed)


def range_chart(*calibrations: CalibratedModel):
    """Per tensor: observed range (light) vs chosen range (dark), clipped share; the 3 worst in red."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(calibrations), figsize=(7 * len(calibrations), 6), squeeze=False)
    for axis, calibrated in zip(axes[0], calibrations):
        ranges = list(calibrated.ranges.values())
        worst = {r.name for r in sorted(ranges, key=lambda r: r.clipped_fraction, reverse=True)[:3]
                 if r.clipped_fraction > 0}
        for row, r in enumerate(ranges):
            axis.barh(row, r.observed_max - r.observed_min, left=r.observed_min, color="#d9d9d9", height=0.8)
            axis.barh(row, r.high - r.low, left=r.low, color="#d62728" if r.name in worst else "#1f77b4",
                      height=0.4)
            axis.text(max(r.observed_max, r.high), row, f" {100 * r.clipped_fraction:.2f}%", va="center", fontsize=7)
        axis.set_yticks(range(len(ranges)), [r.name.strip("/").replace("_output_0", "")[-28:] for r in ranges],
                        fontsize=7)
        axis.invert_yaxis()
        axis.set_title(f"{calibrated.model}: {calibrated.config.method.value}, {calibrated.config.samples} samples, "
                       f"{calibrated.scheme.value}", fontsize=9)
        axis.set_xlabel("value (grey: observed, blue: chosen range, red: the 3 most clipped)")
    figure.tight_layout()
    return figure
