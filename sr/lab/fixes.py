"""One-click fixes after a diagnosis: a per-tensor `Fix` (a range method or keep-float) applied by recalibrating,
measured on the real INT8 model before and after (`apply_fix`), and the fix measured to help most, or why none
does (`advise_fix`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..quant.calibrate import Method
from ..choices import Choice
from .compare import InputMode, prepare_input
from .diagnose import DiagnosisReport
from ..run.runtime import engine_for
from ..metrics import brightness_ratio, psnr_y
from ..run.quantize import calibrate_model
from ..quant.calibrated import CalibratedModel
from ..quant.recipe import Fixes
from .scorer import centre_crop


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
