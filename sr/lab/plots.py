"""Matplotlib figures of calibration results (for the app and scripts/findings.py): range charts and histograms.

Figures only: no numbers are computed here that the library does not already return.
"""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from ..quant.calibrate import Method
from ..quant.searches import threshold
from ..quant.statistics import TensorStats
from ..choices import Choice
from ..quant.calibrated import CalibratedModel
MAX_TENSORS = 24  # range-chart rows per model: the most clipped ones when a model has more


def _short(name: str, width: int = 34) -> str:
    name = name.strip("/").replace("_output_0", "")
    return name if len(name) <= width else "…" + name[-(width - 1):]


def range_chart(*calibrations: CalibratedModel, max_tensors: int = MAX_TENSORS):
    """Per tensor: observed range (grey) vs chosen range (blue, the 3 most clipped in red), clipped share.

    Args:
        calibrations: one or more calibrated models, one panel each.
        max_tensors: rows per panel; a larger model shows its most clipped tensors, in graph order.

    Returns:
        a matplotlib Figure.
    """
    rows = min(max_tensors, max(len(c.ranges) for c in calibrations))
    figure, axes = plt.subplots(1, len(calibrations), figsize=(6.5 * len(calibrations), 1.2 + 0.28 * rows),
                                squeeze=False)
    for axis, calibrated in zip(axes[0], calibrations):
        ranges = list(calibrated.ranges.values())
        if len(ranges) > max_tensors:
            keep = {r.name for r in sorted(ranges, key=lambda r: r.clipped_fraction, reverse=True)[:max_tensors]}
            ranges = [r for r in ranges if r.name in keep]
        worst = {r.name for r in sorted(ranges, key=lambda r: r.clipped_fraction, reverse=True)[:3]
                 if r.clipped_fraction > 0}
        for row, r in enumerate(ranges):
            axis.barh(row, r.observed_max - r.observed_min, left=r.observed_min, color="#d9d9d9", height=0.8)
            axis.barh(row, r.high - r.low, left=r.low, color="#d62728" if r.name in worst else "#1f77b4", height=0.4)
            axis.text(max(r.observed_max, r.high), row, f" {100 * r.clipped_fraction:.2f}%", va="center", fontsize=7)
        axis.set_yticks(range(len(ranges)), [_short(r.name) for r in ranges], fontsize=7)
        axis.invert_yaxis()
        shown = "" if len(ranges) == len(calibrated.ranges) else f" ({len(ranges)} most clipped of {len(calibrated.ranges)})"
        axis.set_title(f"{calibrated.model}: {calibrated.config.method.value}, {calibrated.config.samples} samples, "
                       f"{calibrated.scheme.value}{shown}", fontsize=9)
        axis.set_xlabel("value (grey: observed, blue: chosen range, red: the 3 most clipped)", fontsize=8)
    figure.tight_layout()
    return figure


def histogram_figure(stats: TensorStats, chosen_limit: float | None = None,
                     methods: tuple[Method, ...] = (), title: str | None = None):
    """The |x| histogram of one tensor (log counts) with the chosen threshold and those of other methods.

    Args:
        stats: the tensor's calibration statistics.
        chosen_limit: the threshold in use (red line), if any.
        methods: further methods whose thresholds are drawn (dashed), e.g. entropy and entropy-zeros.
        title: the plot title (default: the tensor's name).

    Returns:
        a matplotlib Figure.
    """
    figure, axis = plt.subplots(figsize=(8, 3))
    edges = np.arange(len(stats.histogram) + 1) * stats.bin_width
    axis.stairs(np.maximum(stats.histogram, 0.5), edges, fill=True, color="#6b8fb5")
    if chosen_limit is not None:
        axis.axvline(chosen_limit, color="#d62728", label=f"chosen |range| {chosen_limit:.3g}")
    for index, method in enumerate(methods):
        value = threshold(stats, method)
        axis.axvline(value, color=f"C{index + 1}", linestyle=":", linewidth=2, label=f"{method.value}: {value:.3g}")
    axis.axvline(stats.amax, color="black", linestyle="--", label=f"observed max |x| {stats.amax:.3g}")
    axis.set_yscale("log")
    axis.set_xlabel("|x|")
    axis.set_ylabel("count")
    axis.set_title(title or stats.name, fontsize=9)
    axis.legend(fontsize=8)
    figure.tight_layout()
    return figure


class DifferenceKind(Choice, noun="difference view"):
    """What a difference image shows."""

    LUMA = "luma"  # |Y(a) - Y(b)|, a heat map
    CHANNELS = "channels"  # |R|, |G|, |B| differences as an RGB image
    BRIGHTNESS_SHIFT = "brightness-shift"  # signed Y(a) - Y(b): blue where a is darker, red where brighter


def difference_image(output: np.ndarray, reference: np.ndarray, gain: float = 8.0,
                     kind: DifferenceKind | str = DifferenceKind.LUMA, bar_height: int = 28) -> np.ndarray:
    """An amplified picture of where and how much `output` differs from `reference`, with a scale bar.

    Args:
        output: uint8 HxWx3 (e.g. INT8).
        reference: uint8 HxWx3 of the same shape (e.g. FP32).
        gain: amplification: a difference of 255 / gain levels reaches the top of the colour scale.
        kind: luma heat map, per-channel RGB, or signed brightness shift.
        bar_height: pixels of the scale bar under the image (0 for none).

    Returns:
        uint8 (H + bar_height)xWx3.

    Raises:
        ValueError: different shapes, or a gain not in (0, 1000].
    """
    from matplotlib import colormaps
    from PIL import Image, ImageDraw

    from ..metrics import rgb_to_y

    kind = DifferenceKind.parse(kind)
    if output.shape != reference.shape:
        raise ValueError(f"images differ in shape: {output.shape} vs {reference.shape}")
    if not 0 < gain <= 1000:
        raise ValueError(f"gain must be in (0, 1000], got {gain}")
    full_scale = 255.0 / gain  # levels (Y or channel) that saturate the colour scale
    if kind is DifferenceKind.CHANNELS:
        delta = np.abs(output.astype(np.float32) - reference.astype(np.float32))
        picture = np.clip(delta / full_scale * 255.0, 0, 255).astype(np.uint8)
        ramp, low_text = np.linspace(0, 1, 256)[:, None].repeat(3, 1), "0"
    else:
        delta = (rgb_to_y(output) - rgb_to_y(reference)) * (255.0 / 219.0)  # Y levels as 8-bit steps
        if kind is DifferenceKind.LUMA:
            cmap, values, low_text = colormaps["inferno"], np.abs(delta) / full_scale, "0"
        else:
            cmap, values, low_text = colormaps["RdBu_r"], 0.5 + delta / (2 * full_scale), f"-{full_scale:.3g}"
        picture = (cmap(np.clip(values, 0, 1))[..., :3] * 255).astype(np.uint8)
        ramp = cmap(np.linspace(0, 1, 256))[:, :3]
    if bar_height <= 0:
        return picture
    width = picture.shape[1]
    bar = np.full((bar_height, width, 3), 255, np.uint8)
    strip = (ramp[np.linspace(0, 255, width).astype(int)] * 255).astype(np.uint8)
    bar[: bar_height // 2] = strip[None]
    canvas = Image.fromarray(bar)
    draw = ImageDraw.Draw(canvas)
    unit = "levels" if kind is DifferenceKind.CHANNELS else "Y levels"
    high_text = f"{full_scale:.3g} {unit} (gain {gain:g})"
    if draw.textlength(low_text) + draw.textlength(high_text) + 12 > width:
        high_text = f"{full_scale:.3g}"
    draw.text((2, bar_height // 2), low_text, fill=(0, 0, 0))
    draw.text((max(2, width - 2 - draw.textlength(high_text)), bar_height // 2), high_text, fill=(0, 0, 0))
    return np.concatenate([picture, np.asarray(canvas)], axis=0)
