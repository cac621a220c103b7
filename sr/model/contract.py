"""How a user's model takes and returns images (`Contract`: layout, colour, value range, pre-upsampling, scale,
input sizes), what the user says about it (`Overrides`), and its detection from the graph and a probe run."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
import onnx

from ..choices import Choice
from .checks import UserModelError, _dims
from .probe import _accepted_sizes, _probe_image

# runs the user's graph once on an input in its own layout and returns its output, or raises UserModelError
# (`ProbeTimedOut` past the probe's time): the run layer makes one (`sr.run.register.probe_runner`)
Runner = Callable[[np.ndarray], np.ndarray]

TIE_DB = 0.5  # range readings closer than this to a bicubic upscale are a tie, settled for [0, 1]
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


def _channel_layout(dims: list) -> tuple[Layout, int]:
    if dims[1] in (1, 3):
        return Layout.NCHW, dims[1]
    if dims[3] in (1, 3):
        return Layout.NHWC, dims[3]
    raise UserModelError(f"cannot tell the channel axis of an input shaped {dims}: say which layout it takes (nchw or nhwc)")


def detect_contract(model: onnx.ModelProto, run_graph: Runner, overrides: Overrides = Overrides()) -> Contract:
    """The contract of a checked model, from its graph and probe runs (`run_graph`), with the user's overrides
    applied.

    Range (and, for a same-size output, nothing else) is read from the probe: each candidate reading's output is
    compared with a bicubic upscale of the probe, and the closest wins; `confidence_db` is its margin.

    Raises:
        UserModelError: the output is not an integer multiple of the input, or the model fails on the probe.
    """
    initializers = {init.name for init in model.graph.initializer}
    dims = _dims(next(i for i in model.graph.input if i.name not in initializers))
    layout, channels = (Layout.parse(overrides.layout), None) if overrides.layout else _channel_layout(dims)
    channels = channels or (dims[1] if layout is Layout.NCHW else dims[3])
    spatial = dims[2:4] if layout is Layout.NCHW else dims[1:3]
    fixed = tuple(spatial) if all(isinstance(d, int) and d > 0 for d in spatial) else None
    color = Color.parse(overrides.color) if overrides.color else (Color.Y if channels == 1 else Color.RGB)

    def run(height: int, width: int, value_range: int = overrides.value_range or 1) -> np.ndarray:
        probe = _probe_image(height, width)
        x = probe if color is Color.RGB else (probe @ YCBCR[0] + YCBCR_OFFSET[0])[..., None]
        x = (x * value_range).astype(np.float32)
        x = x.transpose(2, 0, 1)[None] if layout is Layout.NCHW else x[None]
        y = run_graph(np.ascontiguousarray(x))
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


def _bicubic(image: np.ndarray, width: int, height: int) -> np.ndarray:
    from PIL import Image

    rgb = Image.fromarray(np.clip(np.rint(image * 255), 0, 255).astype(np.uint8))
    return np.asarray(rgb.resize((width, height), Image.Resampling.BICUBIC), np.float32) / 255.0
