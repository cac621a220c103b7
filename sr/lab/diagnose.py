"""Which tensor makes the INT8 output dull? Per-tensor sensitivity, SQNR, range coverage, and one-click fixes.

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
import onnx
import onnxruntime as ort

from ..quant.calibrate import CalibrationConfig, Method
from ..quant.searches import TensorRange
from ..quant.statistics import TensorStats, observing_session
from ..choices import Choice
from .compare import InputMode, prepare_input
from ..data import bicubic_resize, degrade, list_images, load_image
from ..run.engines import Seamless, fixed_size
from ..run.runtime import engine_for
from ..metrics import brightness_ratio, psnr_y
from ..model.models import model_info
from ..run.quantize import calibrate_model
from ..quant.calibrated import CalibratedModel
from ..quant.quantspec import Scheme
from ..quant.recipe import Fixes
from ..quant.qdq import spec_of, tie_fused_ranges, without_quantization
from ..quant.quantspec import ActivationSpec, activation_qparams, graph_quantization
from ..quant.rewrite import rewrite_for_fast_int8
from ..store import logged_progress


class Fix(Choice, noun="fix"):
    """A per-tensor fix, applied by recalibrating with an override."""

    RANGE_MINMAX = "range-minmax"  # this tensor's range from its observed min/max
    RANGE_MSE = "range-mse"
    RANGE_PERCENTILE = "range-percentile"
    KEEP_FLOAT = "keep-float"  # no QDQ pair: the tensor's producer and consumers run in float

    def overrides(self, tensor: str) -> Fixes:
        """The calibration overrides that apply this fix to `tensor`."""
        if self is Fix.KEEP_FLOAT:
            return Fixes(keep_float=[tensor])
        method = {Fix.RANGE_MINMAX: Method.MINMAX, Fix.RANGE_MSE: Method.MSE, Fix.RANGE_PERCENTILE: Method.PERCENTILE}
        return Fixes(range_method={tensor: method[self]})


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

    def __post_init__(self):
        self.scheme = Scheme.parse(self.scheme)
        if self.top is not None and self.top < 1:
            raise ValueError(f"top must be at least 1, got {self.top}")
        if self.max_side is not None and self.max_side < 16:
            raise ValueError(f"max_side must be at least 16 pixels, got {self.max_side}")


class DiagnosisCancelled(RuntimeError):
    """The caller asked the diagnosis to stop."""


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

    def to_json(self) -> dict:
        """The report as a JSON-ready dict."""
        return {"model": self.model, "method": self.method, "scheme": self.scheme, "samples": self.samples,
                "has_truth": self.has_truth, "fp32_psnr_y": self.fp32_psnr_y, "int8_psnr_y": self.int8_psnr_y,
                "int8_psnr_vs_fp32_db": _finite(self.int8_psnr_vs_fp32_db), "int8_brightness": self.int8_brightness,
                "ranking": [r.to_json() for r in self.ranking]}


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


def eval_pairs(data: str | None, images: Sequence | None, mode: InputMode, scale: int,
                max_side: int | None) -> list[tuple]:
    """[(lr, truth or None)] to measure on, centre-cropped to `max_side` LR pixels a side."""
    if images:
        prepared = [prepare_input(image, mode, scale) for image in images]
        pairs = [(p.lr, p.truth) for p in prepared]
    elif data is None:
        raise ValueError("no images to measure on: give a folder of ground-truth images, or the images")
    else:
        pairs = [tuple(reversed(degrade(load_image(path), scale))) for path in list_images(data)]
    return [centre_crop(lr, truth, scale, max_side) for lr, truth in pairs] if max_side else pairs


def centre_crop(lr: np.ndarray, truth: np.ndarray | None, scale: int, max_side: int) -> tuple:
    """The centre of an LR image (at most `max_side` pixels a side) and the matching part of its truth.

    Args:
        lr: uint8 HxWx3.
        truth: uint8 (sH)x(sW)x3 or None.
        scale: the model's scale.
        max_side: the largest side kept.

    Returns:
        (lr crop, truth crop or None).
    """
    height, width = lr.shape[:2]
    top, left = max(0, (height - max_side) // 2), max(0, (width - max_side) // 2)
    lr = lr[top : top + max_side, left : left + max_side]
    if truth is not None:
        truth = truth[top * scale : (top + lr.shape[0]) * scale, left * scale : (left + lr.shape[1]) * scale]
    return np.ascontiguousarray(lr), truth


class _SessionEngine(Seamless):
    """One of the scorer's variants as an engine: seamless tiles, the radius measured once for all variants."""

    def __init__(self, session, scale: int, radius):
        self.session, self.scale, self._radius = session, scale, radius
        self.input_name = session.get_inputs()[0].name
        self.fixed = fixed_size(session.get_inputs()[0].shape)  # a fixed-size model runs in tiles of its size

    def _run_array(self, array: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: array})[0]


class Scorer:
    """Scores the written QDQ model, and copies of it with some quantization taken out, on the evaluation pairs
    with the reference engine (ONNX Runtime on the CPU): "all INT8" is the model the bundle ships."""

    def __init__(self, calibrated: CalibratedModel, pairs: list[tuple]):
        self.fp32 = onnx.load(str(calibrated.fp32_onnx))
        self.qdq = onnx.load(str(calibrated.qdq_onnx))
        self.spec = spec_of(self.fp32, calibrated.scheme, calibrated.fixes.keep_float)
        self.ranges = {**calibrated.ranges, **tie_fused_ranges(self.spec, calibrated.ranges)}
        self.scale = calibrated.scale
        fp32_engine = engine_for(calibrated.model)
        self.lrs = [lr for lr, _ in pairs]
        self.radius: int | None | bool = False  # the model's receptive radius once a large image needed tiles
        self.references = [fp32_engine.run(lr) for lr in self.lrs]
        self.truths = [truth for _, truth in pairs]
        self.has_truth = all(truth is not None for truth in self.truths)
        # the points: what the written model really quantizes (the cpu writer folds ReLU/Clip into the Conv)
        # one point per tie group (a Conv output quantized on its activation's grid is part of that activation's
        # point: what it clips, the activation clips anyway)
        # the cpu writer changed some weights' shapes (sr.quant.rewrite): their FP32 values come from the rewritten graph
        self.weights_from = rewrite_for_fast_int8(self.fp32, calibrated.ranges)[0] \
            if calibrated.scheme is Scheme.CPU else None
        written = graph_quantization(self.qdq, self.fp32).activations
        self.written = [t for t in self.spec.activations if t in written]
        self.points = [t for t in self.written if self.spec.activations[t].group == t]

    def _members(self, points: Sequence[str]) -> list[str]:
        groups = set(points)
        return [t for t in self.written if self.spec.activations[t].group in groups]

    def outputs(self, dropped: Sequence[str] = (), alone: str | None = None) -> list[np.ndarray]:
        """The INT8 outputs of the written model without the pairs of the groups in `dropped`, or with `alone`'s
        group as its only quantized activations (weights in FP32)."""
        if alone is not None:
            kept = set(self._members([alone]))
            model = without_quantization(self.qdq, self.fp32, [t for t in self.written if t not in kept], True,
                                         self.weights_from)
        elif dropped:
            model = without_quantization(self.qdq, self.fp32, self._members(dropped))
        else:
            model = self.qdq
        engine = _SessionEngine(ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]),
                                self.scale, self.radius)
        outputs = [engine.run(lr) for lr in self.lrs]
        self.radius = engine._radius
        return outputs

    def score(self, dropped: Sequence[str] = (), alone: str | None = None) -> tuple[float, float, float]:
        """(PSNR vs truth or None, PSNR vs FP32, brightness vs FP32), means over the images."""
        outputs = self.outputs(dropped, alone)
        vs_fp32 = float(np.mean([psnr_y(o, r, self.scale) for o, r in zip(outputs, self.references)]))
        vs_truth = float(np.mean([psnr_y(o, t, self.scale) for o, t in zip(outputs, self.truths)])) \
            if self.has_truth else None
        bright = float(np.mean([brightness_ratio(o, r) for o, r in zip(outputs, self.references)]))
        return vs_truth, vs_fp32, bright

    def fp32_psnr(self) -> float | None:
        """FP32 PSNR against the truth (None without truth)."""
        if not self.has_truth:
            return None
        return float(np.mean([psnr_y(r, t, self.scale) for r, t in zip(self.references, self.truths)]))


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
        DiagnosisCancelled: `should_stop()` returned True.
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
    consumers: dict[str, list[str]] = {}
    for node in simulator.fp32.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node.op_type)
    stats = {s.name: s for s in calibrated.stats}
    reports = []
    progress = progress or logged_progress(f"diagnosing {config.model}")
    for index, tensor in enumerate(points):
        if should_stop is not None and should_stop():
            raise DiagnosisCancelled(f"diagnosis stopped after {index} of {len(points)} tensors")
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
    return DiagnosisReport(config.model, calibrated.config.method.value, calibrated.scheme.value,
                           calibrated.config.samples, simulator.has_truth, fp32_psnr,
                           all_truth if simulator.has_truth else all_fp32, all_fp32, all_bright,
                           reports[: config.top] if config.top else reports, calibrated, stats, config.max_side)


@dataclass
class FixOutcome:
    """The real INT8 model before and after a fix, on one image."""

    before: np.ndarray
    after: np.ndarray
    has_truth: bool  # PSNRs are against the truth, else against FP32
    psnr_before_db: float
    psnr_after_db: float
    brightness_before: float
    brightness_after: float
    calibrated: CalibratedModel


def apply_fix(report: DiagnosisReport, tensor: str, fix: Fix | str, image, mode: InputMode | str,
              progress: Callable[[float, str], None] | None = None) -> FixOutcome:
    """Recalibrate `report.model` with `fix` on `tensor` and measure the real INT8 model before and after.

    Args:
        report: a diagnosis.
        tensor: the tensor to fix.
        fix: the fix.
        image: the image to measure on (array or path), read as `mode` says.
        mode: ground truth or upscale.
        progress: called with (fraction done, message).

    Returns:
        the FixOutcome.

    Raises:
        ValueError: unknown fix or tensor.
    """
    fix = Fix.parse(fix)
    if tensor not in report.calibrated.ranges:
        raise ValueError(f"no tensor {tensor!r} in {report.model}")
    return _Before(report, image, mode).after(tensor, fix, progress)


class _Before:
    """The image as the diagnosis measured it (its centre crop) and the INT8 model before any fix, once."""

    def __init__(self, report: DiagnosisReport, image, mode: InputMode | str):
        self.report, scale = report, report.calibrated.scale
        prepared = prepare_input(image, InputMode.parse(mode), scale)
        self.lr, self.truth = prepared.lr, prepared.truth
        if report.max_side is not None:  # the pixels the diagnosis measured: one "before" figure, not two
            self.lr, self.truth = centre_crop(self.lr, self.truth, scale, report.max_side)
        self.fp32 = engine_for(report.model).run(self.lr)
        self.target = self.truth if self.truth is not None else self.fp32
        self.before = engine_for(report.model, report.calibrated).run(self.lr)  # the reference INT8
        self.psnr = psnr_y(self.before, self.target, scale)

    def after(self, tensor: str, fix: Fix, progress=None) -> FixOutcome:
        report, scale = self.report, self.report.calibrated.scale
        fixed = calibrate_model(report.model, report.calibrated.config, report.calibrated.scheme,
                                fixes=fix.overrides(tensor), progress=progress)
        after = engine_for(report.model, fixed).run(self.lr)
        return FixOutcome(self.before, after, self.truth is not None, self.psnr, psnr_y(after, self.target, scale),
                          brightness_ratio(self.before, self.fp32), brightness_ratio(after, self.fp32), fixed)


class NoFixReason(Choice, noun="reason"):
    """Why no single-tensor fix helps (the words are the caller's)."""

    DARKER_CALIBRATION = "darker-calibration"  # the calibration images were darkened (gain < 1)
    BRIGHTER_CALIBRATION = "brighter-calibration"
    SPREAD = "spread"  # the damage is spread over many tensors, or the ranges are already the best of the four


@dataclass
class FixAdvice:
    """The fix measured to help most on the image (every fix tried on the worst tensors), or why there is none."""

    tensor: str | None  # None: no fix raised PSNR
    fix: Fix | None
    psnr_before_db: float
    psnr_after_db: float
    tried: list[tuple[str, Fix, float]]  # (tensor, fix, PSNR after) for every candidate
    reason: NoFixReason | None = None

    @property
    def gain_db(self) -> float:
        return self.psnr_after_db - self.psnr_before_db


def advise_fix(report: DiagnosisReport, image, mode: InputMode | str, top: int = 2, min_gain_db: float = 0.01,
               progress: Callable[[float, str], None] | None = None) -> FixAdvice:
    """Try every fix on the `top` worst tensors, each on the real INT8 model on the image the diagnosis measured,
    and return the one that raises PSNR most, or none (with the reason) when none raises it by `min_gain_db`:
    a fix is offered only when it is measured to help, never a no-op or a loss.

    Args:
        report: a diagnosis.
        image: the image it measured on, read as `mode` says.
        mode: ground truth or upscale.
        top: how many of the worst tensors to try fixes on.
        min_gain_db: the least PSNR gain that counts.
        progress: called with (fraction done, message).

    Returns:
        the FixAdvice.
    """
    base, tried = _Before(report, image, mode), []
    candidates = [(r.tensor, fix) for r in report.ranking[:top] for fix in Fix]
    for index, (tensor, fix) in enumerate(candidates):
        if progress is not None:
            progress(index / max(1, len(candidates)), f"trying {fix.value} on {tensor} ({index + 1} of {len(candidates)})")
        tried.append((tensor, fix, base.after(tensor, fix).psnr_after_db))
    best = max(tried, key=lambda t: t[2], default=None)
    if best is not None and best[2] - base.psnr >= min_gain_db:
        return FixAdvice(best[0], best[1], base.psnr, best[2], tried)
    gain = report.calibrated.config.gain
    reason = NoFixReason.DARKER_CALIBRATION if gain < 1 else NoFixReason.BRIGHTER_CALIBRATION if gain > 1 else \
        NoFixReason.SPREAD
    return FixAdvice(None, None, base.psnr, best[2] if best else base.psnr, tried, reason)


@dataclass
class TensorCoverage:
    """How much of one tensor, for one image, falls outside its calibrated range."""

    tensor: str
    outside_fraction: float  # share of the values clipped by the range
    low: float
    high: float
    image_min: float
    image_max: float


def range_coverage(calibrated: CalibratedModel, lr: np.ndarray, tile: int = 128,
                   max_side: int | None = None) -> list[TensorCoverage]:
    """Per quantized tensor, the share of this image's values that the calibrated range clips.

    The image runs through the FP32 model in non-overlapping tiles (bounded memory; values near tile borders see
    zero padding instead of their neighbours, a small bias in the share); a fixed-size model in tiles of its size,
    the last ones mirrored up to it (the mirrored values counted too: a small bias of the same kind).

    Args:
        calibrated: the INT8 model whose ranges are checked.
        lr: the network's input, uint8 HxWx3.
        tile: tile side in pixels.
        max_side: check a bicubic-downscaled copy of at most this many pixels a side (a faster estimate: the
            value ranges of a downscaled photo are nearly those of the photo); None checks the image itself.

    Returns:
        one TensorCoverage per quantization point, the worst first.
    """
    if max_side is not None and max(lr.shape[:2]) > max_side:
        factor = max_side / max(lr.shape[:2])
        lr = bicubic_resize(lr, max(1, round(lr.shape[1] * factor)), max(1, round(lr.shape[0] * factor)))
    model = onnx.load(str(calibrated.fp32_onnx))
    spec = spec_of(model, calibrated.scheme, calibrated.fixes.keep_float)
    ranges = tie_fused_ranges(spec, calibrated.ranges)
    points = [t for t, activation in spec.activations.items() if activation.group == t]  # a tied Conv output's
    # clipped negatives are its ReLU's doing
    session = observing_session(calibrated.fp32_onnx, points)
    input_name = session.get_inputs()[0].name
    names = [o.name for o in session.get_outputs()]
    fixed = fixed_size(session.get_inputs()[0].shape)
    outside = dict.fromkeys(points, 0)
    total = dict.fromkeys(points, 0)
    low = dict.fromkeys(points, math.inf)
    high = dict.fromkeys(points, -math.inf)
    image = np.ascontiguousarray(lr.transpose(2, 0, 1)[None], dtype=np.float32) / 255.0
    tile_y, tile_x = fixed or (tile, tile)
    for y in range(0, lr.shape[0], tile_y):
        for x in range(0, lr.shape[1], tile_x):
            block = image[:, :, y : y + tile_y, x : x + tile_x]
            if fixed and block.shape[2:] != fixed:  # a fixed-size model: the block mirrored up to its size
                block = np.pad(block, ((0, 0), (0, 0), (0, tile_y - block.shape[2]), (0, tile_x - block.shape[3])),
                               mode="symmetric")
            values = dict(zip(names, session.run(None, {input_name: block})))
            values[input_name] = block
            for tensor in points:
                value, r = values[tensor], ranges[tensor]
                outside[tensor] += int(np.count_nonzero((value < r.low) | (value > r.high)))
                total[tensor] += value.size
                low[tensor], high[tensor] = min(low[tensor], float(value.min())), max(high[tensor], float(value.max()))
    report = [TensorCoverage(t, outside[t] / max(1, total[t]), ranges[t].low, ranges[t].high, low[t], high[t])
              for t in points]
    return sorted(report, key=lambda c: c.outside_fraction, reverse=True)
