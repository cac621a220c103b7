"""The diagnosis's measuring stick: the written QDQ model, and copies of it with some quantization taken out (or
only one tensor's left in), scored on evaluation pairs (centre-cropped) with the reference engine (ONNX Runtime
on the CPU) against the truth and the FP32 output."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import onnx

from .compare import InputMode, prepare_input
from ..data import degrade, list_images, load_image
from ..run.engines import reference
from ..run.runtime import engine_for
from ..metrics import brightness_ratio, psnr_y
from ..quant.calibrated import CalibratedModel
from ..quant.quantspec import Scheme
from ..quant.qdq import spec_of, tie_fused_ranges, with_float_weights, without_quantization
from ..quant.readback import graph_quantization
from ..quant.rewrite import rewrite_for_fast_int8


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
            model = with_float_weights(without_quantization(self.qdq, self.fp32,
                                                            [t for t in self.written if t not in kept]),
                                       self.fp32, self.weights_from)
        elif dropped:
            model = without_quantization(self.qdq, self.fp32, self._members(dropped))
        else:
            model = self.qdq
        engine = reference(model, self.scale)  # seamless tiles (of a fixed-size model's size), one radius for all
        engine._radius = self.radius
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
