"""Range coverage: how much of one image's values, per quantized tensor, the calibrated ranges clip (the image run
through the FP32 model in tiles, every quantization point observed)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx

from ..data import bicubic_resize
from ..run.sessions import Observer
from ..quant.calibrated import CalibratedModel
from ..quant.qdq import spec_of, tie_fused_ranges


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
    observer = Observer(calibrated.fp32_onnx, points)
    outside = dict.fromkeys(points, 0)
    total = dict.fromkeys(points, 0)
    low = dict.fromkeys(points, math.inf)
    high = dict.fromkeys(points, -math.inf)
    image = np.ascontiguousarray(lr.transpose(2, 0, 1)[None], dtype=np.float32) / 255.0
    for values in observer.tiles(image, tile):
        for tensor in points:
            value, r = values[tensor], ranges[tensor]
            outside[tensor] += int(np.count_nonzero((value < r.low) | (value > r.high)))
            total[tensor] += value.size
            low[tensor], high[tensor] = min(low[tensor], float(value.min())), max(high[tensor], float(value.max()))
    report = [TensorCoverage(t, outside[t] / max(1, total[t]), ranges[t].low, ranges[t].high, low[t], high[t])
              for t in points]
    return sorted(report, key=lambda c: c.outside_fraction, reverse=True)
