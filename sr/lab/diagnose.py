"""Which tensor makes the INT8 output dull? Per-tensor sensitivity and SQNR.

Sensitivity is measured on the real INT8 model: the QDQ file the bundle ships, run by the reference engine (ONNX
Runtime on the CPU), as written or with some of its Q/DQ pairs taken out again (`sr.run.quantize.without_quantization`).
The tensors ranked are those the written model quantizes. For each tensor t:

- `alone_psnr_vs_fp32_db`: PSNR of the output with only t's activation pair left (weights in FP32, so the
  figure isolates t's range, which is what calibration chooses), against the FP32 output (the ranking key:
  the tensor that alone moves the output furthest from FP32 comes first; defined with or without ground truth);
- `psnr_drop_db`: FP32 PSNR minus the PSNR with only t quantized, both against the ground truth (None when
  there is none: upscale mode);
- `recovery_db`: PSNR of the written model without t's pair, minus the written model's ("all INT8": the same
  figure `eval --engine ort-int8` gives for the same images and settings);
- `brightness`: mean brightness of the only-t output over FP32's;
- `sqnr_db`: signal-to-quantization-noise ratio of t over its calibration histogram.

The fixes a diagnosis leads to are `sr.lab.fixes`; how much of an image a calibration's ranges clip is
`sr.lab.coverage`; the scorer the sensitivity is measured with is `sr.lab.scorer`.

Example:
    >>> report = diagnose(DiagnoseConfig("xlsr-relu", data="path/to/Set5"))
    >>> report.ranking[0].tensor
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from ..graph import GraphIndex
from ..quant.calibrate import CalibrationConfig
from ..quant.searches import TensorRange
from ..quant.statistics import TensorStats
from .compare import InputMode
from ..progress import Cancelled, logged_progress
from ..data import list_images
from ..model.models import model_info
from ..run.quantize import calibrate_model
from ..quant.calibrated import CalibratedModel
from ..quant.quantspec import Scheme
from ..quant.quantspec import ActivationSpec, activation_qparams
from .scorer import Scorer, TargetScore, eval_pairs, int8_target


@dataclass
class DiagnoseConfig:
    """One diagnosis: the model, its calibration, and the images to measure on (a folder or given images)."""

    model: str
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    scheme: Scheme = Scheme.TENSORRT
    data: str | None = None  # folder of ground-truth images; or pass images to `diagnose`
    top: int | None = None  # keep the N worst tensors
    # Each tensor costs two simulated passes: on a public server, measure on a centre crop of at most this many
    # LR pixels a side (None: whole images).
    max_side: int | None = None
    # an INT8 target (qnn-htp, litert, litert-ref, openvino-int8, tensorrt) that also scores the whole INT8 model as
    # it runs it; the ranking stays on the reference (a tensor kept in float is a float island such a target may
    # not run at all)
    engine: str | None = None

    def __post_init__(self):
        self.scheme = Scheme.parse(self.scheme)
        if self.engine is not None:
            int8_target(self.engine, self.scheme)
        if self.top is not None and self.top < 1:
            raise ValueError(f"top must be at least 1, got {self.top}")
        if self.max_side is not None and self.max_side < 16:
            raise ValueError(f"max_side must be at least 16 pixels, got {self.max_side}")


@dataclass
class LayerReport:
    """The damage one tensor's INT8 range does."""

    tensor: str
    op: str
    consumers: list[str]
    alone_psnr_vs_fp32_db: float
    psnr_drop_db: float | None
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
        """The main figures as a JSON-ready dict."""
        return {"tensor": self.tensor, "op": self.op, "alone_psnr_vs_fp32_db": _finite(self.alone_psnr_vs_fp32_db),
                "psnr_drop_db": self.psnr_drop_db, "recovery_db": self.recovery_db, "sqnr_db": _finite(self.sqnr_db),
                "clipped_fraction": self.clipped_fraction}


def _finite(value: float) -> float | None:
    return value if value is not None and math.isfinite(value) else None


@dataclass
class DiagnosisReport:
    """The ranking and the whole-model figures. PSNRs are against the ground truth when there is one
    (`has_truth`), else `fp32_psnr_y` is None and `int8_psnr_y` is against the FP32 output."""

    model: str
    method: str
    scheme: str
    samples: int
    has_truth: bool
    fp32_psnr_y: float | None
    int8_psnr_y: float  # all activations quantized (simulation)
    int8_psnr_vs_fp32_db: float
    int8_brightness: float
    ranking: list[LayerReport]
    calibrated: CalibratedModel = field(repr=False)
    stats: dict[str, TensorStats] = field(repr=False)
    max_side: int | None = None  # measured on the centre crop of at most this many LR pixels a side
    target: TargetScore | None = None  # the whole INT8 model as the target asked for runs it

    def paragraph(self, shown_as: str | None = None, markdown: bool = False) -> str:
        """The diagnosis in one paragraph, the one the CLI prints and the page shows (`markdown`: the model's
        name in bold, the tensor as code): the whole model, then the worst tensor, what it costs alone, what
        keeping it in float recovers, and its range."""
        if not self.ranking:
            return "Nothing to rank."
        top, name = self.ranking[0], shown_as or self.model
        name, tensor = (f"**{name}**", f"`{top.tensor}`") if markdown else (name, top.tensor)
        whole = (f"FP32 {self.fp32_psnr_y:.2f} dB and all activations INT8 {self.int8_psnr_y:.2f} dB against the "
                 "ground truth" if self.has_truth else
                 f"all activations INT8 are {self.int8_psnr_vs_fp32_db:.2f} dB from the FP32 output (no ground truth)")
        alone = top.alone_psnr_vs_fp32_db
        alone = ("leaves the output as FP32's" if alone is None or math.isinf(alone) else
                 f"puts the output {alone:.2f} dB from FP32")
        return (f"{name}, {self.method} / {self.samples} samples / {self.scheme}: {whole}, brightness "
                f"{self.int8_brightness:.3f}.{self._on_target()} The worst tensor is {tensor} ({top.op} -> "
                f"{', '.join(top.consumers) or 'output'}): quantized alone it {alone}; "
                f"keeping only it in float recovers {top.recovery_db:.2f} dB. Its range [{top.low:.3g}, {top.high:.3g}] "
                f"clips {100 * top.clipped_fraction:.3f}% of its calibration values and {100 * top.clipped_energy:.1f}% "
                f"of their energy (observed [{top.observed_min:.3g}, {top.observed_max:.3g}]).")

    def _on_target(self) -> str:
        target = self.target
        if target is None:
            return ""
        if target.refused:
            return f" {target.engine} did not run it: {target.refused}."
        whole = (f"{target.psnr_y:.2f} dB against the ground truth, " if target.psnr_y is not None else "") + \
            f"{target.psnr_vs_fp32_db:.2f} dB from the FP32 output"
        return (f" As {target.engine} runs it: {whole}, brightness {target.brightness:.3f} (the ranking below is "
                "measured on the reference).")

    def to_json(self) -> dict:
        """The report as a JSON-ready dict."""
        return {"model": self.model, "method": self.method, "scheme": self.scheme, "samples": self.samples,
                "has_truth": self.has_truth, "fp32_psnr_y": self.fp32_psnr_y, "int8_psnr_y": self.int8_psnr_y,
                "int8_psnr_vs_fp32_db": _finite(self.int8_psnr_vs_fp32_db), "int8_brightness": self.int8_brightness,
                "ranking": [r.to_json() for r in self.ranking],
                **({} if self.target is None else {"target": self.target.to_json()})}  # asked for: `engine`


def _sqnr(stats: TensorStats, r: TensorRange, activation: ActivationSpec) -> tuple[float, float]:
    """(SQNR dB, clipped share of signal energy) from the |x| histogram, values at bin centres, on the grid the
    written model uses for this tensor."""
    if stats.histogram.sum() == 0 or stats.bin_width == 0:
        return math.inf, 0.0
    centres = (np.arange(len(stats.histogram)) + 0.5) * stats.bin_width
    scale, _ = activation_qparams(activation, r.low, r.high)
    symmetric = activation.symmetric
    limit = max(abs(r.low), abs(r.high)) if (symmetric or stats.observed_min < 0) else r.high
    levels = activation.qmax if symmetric else activation.qmax - activation.qmin
    quantized = np.minimum(np.round(centres / scale), levels) * scale
    quantized = np.minimum(quantized, limit)
    energy = np.sum(stats.histogram * centres**2)
    noise = np.sum(stats.histogram * (centres - quantized) ** 2)
    clipped = np.sum(stats.histogram[centres > limit] * centres[centres > limit] ** 2)
    return (10 * math.log10(energy / noise) if noise > 0 else math.inf), float(clipped / energy)


def diagnose(config: DiagnoseConfig, images: Sequence | None = None, mode: InputMode | str = InputMode.GROUND_TRUTH,
             progress: Callable[[float, str], None] | None = None,
             should_stop: Callable[[], bool] | None = None) -> DiagnosisReport:
    """Rank the activation tensors of a model by the damage their INT8 range does.

    Args:
        config: model, calibration, scheme, and the folder to measure on (unless `images` are given).
        images: images to measure on instead (uint8 HxWx3 arrays or paths), read as `mode` says.
        mode: whether `images` are ground truth (degraded first) or inputs to upscale.
        progress: called with (fraction done, message).
        should_stop: polled before every simulated pass; True stops the diagnosis.

    Returns:
        the DiagnosisReport; PSNR against the ground truth where there is one, else against FP32.

    Raises:
        ValueError / FileNotFoundError: bad configuration, no images.
        sr.progress.Cancelled: `should_stop()` returned True (between two tensors).
    """
    mode = InputMode.parse(mode)
    model_info(config.model)  # an unknown model or folder is said before any work (the constructor reads nothing)
    if config.data is not None:
        list_images(config.data)
    calibrated = calibrate_model(config.model, config.calibration, config.scheme)
    simulator = Scorer(calibrated, eval_pairs(config.data, images, mode, calibrated.scale, config.max_side))
    points = simulator.points
    started = time.perf_counter()
    all_truth, all_fp32, all_bright = simulator.score()
    seconds_per_pass = time.perf_counter() - started  # the estimate: two such passes per tensor remain
    fp32_psnr = simulator.fp32_psnr()
    consumers = {name: [n.op_type for n in readers] for name, readers in GraphIndex(simulator.fp32).consumers.items()}
    stats = {s.name: s for s in calibrated.stats}
    reports = []
    progress = progress or logged_progress(f"diagnosing {config.model}")
    for index, tensor in enumerate(points):
        if should_stop is not None and should_stop():
            raise Cancelled(f"diagnosis stopped after {index} of {len(points)} tensors")
        left = 2 * (len(points) - index) * seconds_per_pass
        progress(index / len(points), f"tensor {index + 1} of {len(points)}, about {left:.0f} s left")
        alone_truth, alone_fp32, alone_bright = simulator.score(alone=tensor)
        rest_truth, rest_fp32, _ = simulator.score(dropped=[tensor])
        recovery = rest_truth - all_truth if simulator.has_truth else rest_fp32 - all_fp32
        r = simulator.ranges[tensor]
        sqnr, energy = _sqnr(stats[tensor], r, simulator.spec.activations[tensor])
        drop = fp32_psnr - alone_truth if simulator.has_truth else None
        reports.append(LayerReport(tensor, calibrated.producers.get(tensor, "?"), consumers.get(tensor, []),
                                   alone_fp32, drop, recovery, alone_bright, sqnr, r.clipped_fraction, energy,
                                   r.low, r.high, r.observed_min, r.observed_max))
    reports.sort(key=lambda r: r.alone_psnr_vs_fp32_db)
    target = simulator.on_target(int8_target(config.engine), calibrated) if config.engine else None
    return DiagnosisReport(config.model, calibrated.config.method.value, calibrated.scheme.value,
                           calibrated.config.samples, simulator.has_truth, fp32_psnr,
                           all_truth if simulator.has_truth else all_fp32, all_fp32, all_bright,
                           reports[: config.top] if config.top else reports, calibrated, stats, config.max_side,
                           target)
