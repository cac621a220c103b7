"""The comparison behind the app: one input, FP32 and INT8 outputs of two models, metrics, range tables.

No UI code here (the app is a thin Gradio shell over this module). Images are uint8 HxWx3 RGB.
"""
from __future__ import annotations

import contextlib
import hashlib
import math
import time
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

import numpy as np
from PIL import Image

from ..quant.calibrate import CalibrationConfig
from ..choices import Choice
from ..data import bicubic_resize, degrade, frame_count, load_image
from ..metrics import brightness_ratio, delta_e, psnr_y, rgb_to_y, ssim_y
from ..model.models import model_info
from ..model.weights import shipped_models
from ..run.quantize import calibrate_model
from ..quant.calibrated import CalibratedModel, QuantWarning, WarningKind
from ..quant.quantspec import Scheme
from ..quant.recipe import Fixes
from ..run.runtime import EngineKind, Purpose, engine_for
from ..store import RUNS_DIR, Memo, file_identity

MAX_SIDE = 1024  # LR pixels on the long side on CPU; larger inputs are downscaled (with a notice)
MIN_SIDE = 8
DELTA_E_PIXELS = 1 << 16  # CIEDE2000 is averaged over a regular grid of at most this many pixels


class InputMode(Choice, noun="input mode"):
    """What the user's image is."""

    UPSCALE = "upscale"  # an input to upscale: there is no ground truth, INT8 is compared with FP32
    GROUND_TRUTH = "ground-truth"  # a high-resolution truth: degraded to make the input, outputs scored against it


class Display(Choice, noun="display resampling"):
    """How the input is enlarged to the output size for display."""

    BICUBIC = "bicubic"
    NEAREST = "nearest"


def available_models() -> list[str]:
    """Shipped models, then models trained in the app (runs/*.safetensors, as paths relative to the project).

    Returns:
        model names or relative paths, each accepted by `sr.model.weights.load_model`.
    """
    trained = sorted(str(p.relative_to(RUNS_DIR.parent)) for p in RUNS_DIR.glob("*.safetensors")) \
        if RUNS_DIR.is_dir() else []
    return shipped_models() + trained


@dataclass
class Prepared:
    """The network's input (and the truth in ground-truth mode), with notices about what was changed."""

    lr: np.ndarray
    truth: np.ndarray | None
    notices: list[str] = field(default_factory=list)


def prepare_input(image: np.ndarray | str | Path, mode: InputMode | str, scale: int,
                  max_side: int = MAX_SIDE) -> Prepared:
    """Decode (if a path) and size the user's image. In ground-truth mode it is the HR truth and is degraded.

    Args:
        image: a path, or an array (HxW, HxWx3 or HxWx4; uint8 or 16-bit).
        mode: upscale or ground truth.
        scale: the model's scale.
        max_side: the largest LR side; larger inputs are downscaled, with a notice.

    Returns:
        the Prepared input (uint8 HxWx3).

    Raises:
        ValueError / ImageLoadError: unreadable or too small images, unknown mode.
    """
    mode = InputMode.parse(mode)
    array = load_image(image) if isinstance(image, (str, Path)) else np.asarray(image)
    frames = frame_count(image) if isinstance(image, (str, Path)) else 1
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] not in (3, 4):
        raise ValueError(f"expected an RGB image, got an array of shape {array.shape}")
    if array.dtype != np.uint8:
        peak = 65535.0 if array.max(initial=0) > 255 else 255.0
        array = np.clip(np.rint(array.astype(np.float64) / peak * 255.0), 0, 255).astype(np.uint8)
    if array.shape[2] == 4:
        alpha = array[..., 3:4].astype(np.float64) / 255.0
        array = np.rint(array[..., :3] * alpha + 255.0 * (1.0 - alpha)).astype(np.uint8)
    notices = [f"The image is an animation of {frames} frames; the first frame is used."] if frames > 1 else []
    limit = max_side * (scale if mode is InputMode.GROUND_TRUTH else 1)
    height, width = array.shape[:2]
    if max(height, width) > limit:
        factor = limit / max(height, width)
        new_w, new_h = max(1, round(width * factor)), max(1, round(height * factor))
        array = bicubic_resize(array, new_w, new_h)
        notices.append(f"The image ({width}x{height}) was downscaled to {new_w}x{new_h}: the CPU limit is "
                       f"{limit} px on the long side.")
    if mode is InputMode.GROUND_TRUTH:
        if min(array.shape[:2]) < MIN_SIDE * scale:
            raise ValueError(f"the image is too small: ground-truth mode needs at least {MIN_SIDE * scale} px per side")
        truth, lr = degrade(array, scale)
        return Prepared(lr, truth, notices)
    if min(array.shape[:2]) < MIN_SIDE:
        raise ValueError(f"the image is too small: at least {MIN_SIDE} px per side, got {array.shape[1]}x{array.shape[0]}")
    return Prepared(np.ascontiguousarray(array), None, notices)


ENGINES = Memo(12)  # engines are expensive to create and read-only afterwards: shared between sessions


def fp32_engine(model: str):
    """The shared FP32 engine of a model (re-made when its file changes): the reference (ONNX Runtime on the CPU,
    on the model's FP32 export), the one FP32 every "vs FP32" figure of the lab is measured against."""
    info = model_info(model)
    return ENGINES.get(("ort-fp32", file_identity(info.path)),
                       lambda: engine_for(model, purpose=Purpose.MEASURE))


def int8_engine(int8: CalibratedModel, target: EngineKind | str | None = None):
    """The shared INT8 engine of a calibrated model for the panels and their figures: the reference (ONNX Runtime
    on the CPU, `sr.run.runtime.engine_for`), so that what the app shows is the INT8 model the bundle ships, as
    `eval --engine ort-int8` scores it; or, asked for, a target's own numerics on the same model (`qnn-htp`:
    Qualcomm's Hexagon NPU; `litert` / `litert-ref`: the bundle's .tflite), checked against the reference when
    made. Faster engines are checked against it in `sr.run.runtime` and `sr bench`."""
    target = _target(target)
    if target is None:
        return ENGINES.get(("ort-reference", int8.key), lambda: engine_for(int8.model, int8))
    return ENGINES.get((target.value, int8.key), lambda: engine_for(int8.model, int8, kind=target))


def _target(target: EngineKind | str | None) -> EngineKind | None:
    """The engine kind a target names, None for the reference (`ort-int8` is the reference)."""
    kind = None if target is None else EngineKind.parse(target)
    return None if kind is EngineKind.ORT_INT8 else kind


def _timed(engine, lr):
    start = time.perf_counter()
    out = engine.run(lr)
    return out, (time.perf_counter() - start) * 1e3


_FP32_OUTPUTS = Memo(8)  # (weights, input digest) -> (output, ms): reused on Recalibrate


def fp32_output(model: str, lr: np.ndarray) -> tuple[np.ndarray, float, bool]:
    """The FP32 output of a model for an input, and the time it took when it was made (remembered, LRU).

    Args:
        model: a shipped name or a weight file.
        lr: uint8 HxWx3.

    Returns:
        (uint8 (sH)x(sW)x3, milliseconds, whether it was remembered: its time is then its first run's).
    """
    path = model_info(model).path
    key = (file_identity(path), lr.shape, hashlib.sha256(np.ascontiguousarray(lr).tobytes()).hexdigest())
    reused = _FP32_OUTPUTS.peek(key) is not None
    return (*_FP32_OUTPUTS.get(key, lambda: _timed(fp32_engine(model), lr)), reused)


class OutputKind(str, Enum):
    """Which output a metrics row describes."""

    FP32 = "fp32"
    INT8 = "int8"
    BICUBIC = "bicubic"


@dataclass
class OutputMetrics:
    """One output's figures. PSNR/SSIM on Y with the scale shaved; `vs FP32` is against the same model's FP32
    (the first model's for bicubic); ΔE2000 is the mean over a regular grid of at most DELTA_E_PIXELS pixels."""

    kind: OutputKind
    model: str | None  # None for bicubic
    engine: str
    psnr_vs_fp32_db: float
    ssim_vs_fp32: float
    brightness_vs_fp32: float
    delta_e_vs_fp32: float
    latency_ms: float
    psnr_vs_truth_db: float | None = None
    ssim_vs_truth: float | None = None


@dataclass
class Comparison:
    """One input, FP32 and INT8 outputs of two models, and their figures."""

    original: np.ndarray  # the input shown at the output size
    fp32_a: np.ndarray
    int8_a: np.ndarray
    fp32_b: np.ndarray
    int8_b: np.ndarray
    metrics: list[OutputMetrics]
    calibrations: tuple[CalibratedModel, CalibratedModel]
    notices: list[str]
    truth: np.ndarray | None
    lr: np.ndarray
    seconds: dict[str, float] = field(default_factory=dict)  # wall time per stage: where the time goes
    # when a target ran the INT8 panels: the same INT8 models on the reference (A, B), to see where they differ
    reference_int8: tuple[np.ndarray, np.ndarray] | None = None


class _Stopwatch:
    """Adds the wall time of each `with watch("stage"):` block to `watch.seconds[stage]`."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, stage: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start


def _metrics(kind: OutputKind, model: str | None, engine: str, output: np.ndarray, fp32: np.ndarray,
             truth: np.ndarray | None, scale: int, ms: float) -> OutputMetrics:
    if output is fp32:  # FP32 against itself: nothing to compute
        row = OutputMetrics(kind, model, engine, math.inf, 1.0, 1.0, 0.0, ms)
    else:
        step = max(1, int(np.ceil(np.sqrt(output.shape[0] * output.shape[1] / DELTA_E_PIXELS))))
        row = OutputMetrics(kind, model, engine, psnr_y(output, fp32, scale), ssim_y(output, fp32, scale),
                            brightness_ratio(output, fp32), delta_e(output[::step, ::step], fp32[::step, ::step]), ms)
    if truth is not None:
        row.psnr_vs_truth_db, row.ssim_vs_truth = psnr_y(output, truth, scale), ssim_y(output, truth, scale)
    return row


def compare(image, model_a: str = "xlsr-relu", model_b: str = "xlsr-clip",
            config: CalibrationConfig | None = None, scheme: Scheme | str = Scheme.TENSORRT,
            mode: InputMode | str = InputMode.UPSCALE, display: Display | str = Display.BICUBIC,
            calibration_images: list[np.ndarray] | None = None, fixes: tuple[Fixes, Fixes] | None = None,
            progress=None, target: EngineKind | str | None = None) -> Comparison:
    """FP32 and INT8 outputs of two models of one scale, with metrics.

    Args:
        image: a path or an array (see `prepare_input`).
        model_a, model_b: shipped names or weight files (the lab's story: a ReLU model and a Clipped-ReLU one).
        config: the calibration of both INT8 models (default CalibrationConfig()).
        scheme: the INT8 scheme.
        mode: upscale (no truth) or ground truth.
        display: how the input is enlarged for the "original" panel.
        calibration_images: images to calibrate on instead of `config.data`.
        fixes: per-model calibration overrides.
        progress: called with (fraction done, message).
        target: what runs the INT8 models (`int8_engine`; None: the reference).

    Returns:
        the Comparison.

    Raises:
        ValueError: models of different scales, bad image or settings, a target that cannot run the scheme;
            EngineRefused: the target disagrees with the reference.
    """
    config = config or CalibrationConfig()
    display = Display.parse(display)
    scales = {model_info(m).scale for m in (model_a, model_b)}
    if len(scales) != 1:
        raise ValueError(f"{model_a} and {model_b} have different scales ({sorted(scales)}); pick two models of one scale")
    scale, watch = scales.pop(), _Stopwatch()
    with watch("prepare"):
        prepared = prepare_input(image, mode, scale)
        lr, truth = prepared.lr, prepared.truth
        size = (lr.shape[1] * scale, lr.shape[0] * scale)
        resample = Image.Resampling.NEAREST if display is Display.NEAREST else Image.Resampling.BICUBIC
        original = np.asarray(Image.fromarray(lr).resize(size, resample))
    int8 = _calibrated((model_a, model_b), config, scheme, calibration_images, fixes, progress, watch)
    rows, outputs, references = [], [], []
    for model, calibrated in zip((model_a, model_b), int8):
        with watch("FP32 (reused on recalibration)"):
            fp32, fp32_ms, reused = fp32_output(model, lr)
        with watch("INT8"):
            engine, out, int8_ms = _int8_output(calibrated, lr, target, references)
        outputs.append((fp32, out))
        with watch("metrics"):
            rows.append(_metrics(OutputKind.FP32, model, fp32_engine(model).name + (
                " (output reused: the time of its first run)" if reused else ""), fp32, fp32, truth, scale, fp32_ms))
            rows.append(_metrics(OutputKind.INT8, model, f"{engine.name} ({calibrated.scheme.value} scheme)", out,
                                 fp32, truth, scale, int8_ms))
    if truth is not None:
        with watch("metrics"):
            rows.append(_metrics(OutputKind.BICUBIC, None, "PIL", bicubic_resize(lr, *size), outputs[0][0], truth,
                                 scale, 0.0))
    notices = prepared.notices + _calibration_notices((model_a, model_b), int8, rows, outputs)
    return Comparison(original, outputs[0][0], outputs[0][1], outputs[1][0], outputs[1][1], rows,
                      (int8[0], int8[1]), notices, truth, lr, watch.seconds, tuple(references) or None)


def _int8_output(calibrated: CalibratedModel, lr: np.ndarray, target, references: list) -> tuple:
    """(engine, INT8 output, milliseconds) on the target (or the reference); a target's run also appends the
    reference's output to `references`, for the difference view."""
    engine = int8_engine(calibrated, target)
    out, ms = _timed(engine, lr)
    if _target(target) is not None:
        references.append(int8_engine(calibrated).run(lr))
    return engine, out, ms


def _calibrated(models, config, scheme, calibration_images, fixes, progress, watch) -> list[CalibratedModel]:
    """Both models' INT8 (from the cache where it can), progress shared half and half."""
    int8 = []
    for index, (model, fix) in enumerate(zip(models, fixes or (Fixes(), Fixes()))):
        step = (lambda fraction, message, i=index: progress((i + fraction) / 2, f"{model}: {message}")) if progress else None
        with watch("calibrate (cache)"):
            int8.append(calibrate_model(model, config, scheme, images=calibration_images, fixes=fix, progress=step))
    return int8


def _calibration_notices(models, int8: list[CalibratedModel], rows: list, outputs: list) -> list[str]:
    """What the automatic method chose, and each calibration's warnings (brightness as measured on this image,
    with how far the highlights fell: a capped range turns white into flat grey, which reads as washed out)."""
    notices = []
    for model, calibrated, row, (fp32, out) in zip(models, int8, [r for r in rows if r.kind is OutputKind.INT8],
                                                   outputs):
        if calibrated.choice:
            notices.append(f"{model}: the automatic method chose {calibrated.choice.method} (best of "
                           f"{', '.join(calibrated.choice.candidates)} on {calibrated.choice.held_back_images} "
                           "held-back calibration images).")
        warnings = calibrated.warnings(row.brightness_vs_fp32, "this image")
        top_fp32, top_int8 = (highlight_level(image) for image in (fp32, out))
        if top_fp32 - top_int8 >= HIGHLIGHT_DROP_LEVELS:
            warnings.append(QuantWarning(
                WarningKind.HIGHLIGHTS, {"int8_level": top_int8, "fp32_level": top_fp32},
                f"its highlights are capped: the brightest 1% of the image reaches level {top_int8:.0f} of 255 in "
                f"INT8 against {top_fp32:.0f} in FP32, so white comes out as flat grey while the shadows keep their "
                "level (a dull, washed-out look rather than an evenly darker one)"))
        notices += [f"{model}: {note}." for note in warnings]
    return notices


HIGHLIGHT_DROP_LEVELS = 16  # highlights this many 8-bit levels below FP32's are reported


def highlight_level(image: np.ndarray) -> float:
    """The 99th percentile of an 8-bit RGB image's luma (`sr.metrics.rgb_to_y`'s BT.601 Y, on the full 0..255
    scale): where its highlights sit, robust to a few specular pixels."""
    return float((np.percentile(rgb_to_y(image), 99) - 16.0) * 255.0 / 219.0)


def roi_strip(images: list[np.ndarray], center_x: float, center_y: float, size: int = 64, zoom: int = 4) -> np.ndarray:
    """The same square crop of every image, enlarged with nearest neighbour and laid side by side.

    Args:
        images: uint8 HxWx3 images of one size.
        center_x, center_y: the crop's centre in fractions 0..1.
        size: the crop side in pixels.
        zoom: the enlargement.

    Returns:
        uint8 (size*zoom)x(n*size*zoom + gaps)x3, with a 6 px white gap between crops.
    """
    height, width = images[0].shape[:2]
    size = max(4, min(size, height, width))
    x0 = int(np.clip(center_x * width - size / 2, 0, width - size))
    y0 = int(np.clip(center_y * height - size / 2, 0, height - size))
    crops = [np.kron(img[y0 : y0 + size, x0 : x0 + size], np.ones((zoom, zoom, 1), np.uint8)) for img in images]
    gap = np.full((size * zoom, 6, 3), 255, np.uint8)
    parts = []
    for crop in crops:
        parts += [crop, gap]
    return np.concatenate(parts[:-1], axis=1)
