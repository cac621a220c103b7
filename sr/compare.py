"""The comparison behind the app: one input, FP32 and INT8 outputs of two models, metrics, range tables.

No UI code here (the app is a thin Gradio shell over this module). Images are uint8 HxWx3 RGB.
"""
from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from .calibrate import CalibrationConfig
from .data import bicubic_resize, degrade, load_image
from .engines import OrtEngine, TorchEngine, tensorrt_available
from .metrics import brightness_ratio, delta_e, psnr_y, ssim_y
from .models import load_model, read_metadata, resolve_weights, shipped_models
from .quantize import CalibratedModel, Fixes, Scheme, calibrate_model

RUNS_DIR = Path(__file__).resolve().parent.parent / "runs"
MAX_SIDE = 1024  # LR pixels on the long side on CPU; larger inputs are downscaled (with a notice)
MIN_SIDE = 8
PRESETS = {"the story": ("teacher", "xlsr-clip-kd"), "same architecture": ("xlsr-relu", "xlsr-clip")}
MODES = ("Upscale my image", "Check against ground truth")


def available_models() -> list[str]:
    """Shipped models, then models trained in the app (runs/*.safetensors)."""
    trained = sorted(str(p.relative_to(RUNS_DIR.parent)) for p in RUNS_DIR.glob("*.safetensors")) if RUNS_DIR.is_dir() else []
    return shipped_models() + trained


@dataclass
class Prepared:
    lr: np.ndarray
    truth: np.ndarray | None
    notices: list[str] = field(default_factory=list)


def prepare_input(image: np.ndarray | str | Path, mode: str, scale: int, max_side: int = MAX_SIDE) -> Prepared:
    """Decode (if a path) and size the user's image. In ground-truth mode it is the HR truth and is degraded.

    Raises:
        ValueError / ImageLoadError: unreadable or too small images, unknown mode.
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of: {', '.join(MODES)}")
    array = load_image(image) if isinstance(image, (str, Path)) else np.asarray(image)
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
    notices = []
    limit = max_side * (scale if mode == MODES[1] else 1)
    height, width = array.shape[:2]
    if max(height, width) > limit:
        factor = limit / max(height, width)
        new_w, new_h = max(1, round(width * factor)), max(1, round(height * factor))
        array = bicubic_resize(array, new_w, new_h)
        notices.append(f"The image ({width}x{height}) was downscaled to {new_w}x{new_h}: the CPU limit is "
                       f"{limit} px on the long side.")
    if mode == MODES[1]:
        if min(array.shape[:2]) < MIN_SIDE * scale:
            raise ValueError(f"the image is too small: ground-truth mode needs at least {MIN_SIDE * scale} px per side")
        truth, lr = degrade(array, scale)
        return Prepared(lr, truth, notices)
    if min(array.shape[:2]) < MIN_SIDE:
        raise ValueError(f"the image is too small: at least {MIN_SIDE} px per side, got {array.shape[1]}x{array.shape[0]}")
    return Prepared(np.ascontiguousarray(array), None, notices)


class EngineCache:
    """Engines are expensive to create and read-only afterwards: share them between sessions (LRU)."""

    def __init__(self, size: int = 12):
        self.size, self.items, self.lock = size, OrderedDict(), threading.Lock()

    def get(self, key, make):
        with self.lock:
            if key in self.items:
                self.items.move_to_end(key)
                return self.items[key]
        value = make()
        with self.lock:
            self.items[key] = value
            while len(self.items) > self.size:
                self.items.popitem(last=False)
        return value


ENGINES = EngineCache()


def fp32_engine(model: str) -> TorchEngine:
    path = resolve_weights(model)
    return ENGINES.get(("torch", str(path), path.stat().st_mtime), lambda: TorchEngine(load_model(path)))


def int8_engine(int8: CalibratedModel):
    scale = int(read_metadata(int8.model)["config"]["scale"])
    if int8.scheme is Scheme.TENSORRT and tensorrt_available():
        from .engines import TensorRTEngine

        return ENGINES.get(("trt", int8.key), lambda: TensorRTEngine(int8.qdq_onnx, scale))
    return ENGINES.get(("ort", int8.key), lambda: OrtEngine(int8.qdq_onnx, scale, name="ort-int8"))


def _timed(engine, lr):
    start = time.perf_counter()
    out = engine.run(lr)
    return out, (time.perf_counter() - start) * 1e3


@dataclass
class Comparison:
    original: np.ndarray  # the input shown at the output size
    fp32: np.ndarray  # FP32 of the first model
    int8_a: np.ndarray
    int8_b: np.ndarray
    metrics: list[dict]
    calibrations: tuple[CalibratedModel, CalibratedModel]
    notices: list[str]
    truth: np.ndarray | None


def _row(label: str, output: np.ndarray, fp32: np.ndarray, truth: np.ndarray | None, scale: int, ms: float) -> dict:
    row = {"output": label, "PSNR vs FP32 (dB)": psnr_y(output, fp32, scale), "SSIM vs FP32": ssim_y(output, fp32, scale),
           "brightness vs FP32": brightness_ratio(output, fp32), "ΔE2000 vs FP32": delta_e(output, fp32),
           "latency (ms)": ms}
    if truth is not None:
        row["PSNR vs truth (dB)"] = psnr_y(output, truth, scale)
        row["SSIM vs truth"] = ssim_y(output, truth, scale)
    return row


def compare(image, model_a: str = "teacher", model_b: str = "xlsr-clip-kd", method: str = "entropy",
            samples: int = 100, scheme: str = "tensorrt", mode: str = MODES[0], display: str = "bicubic",
            calibration_images: list[np.ndarray] | None = None, fixes: tuple[Fixes, Fixes] | None = None,
            progress=None) -> Comparison:
    """FP32 of `model_a`, INT8 of `model_a` and of `model_b`, with metrics. `model_a` is the ReLU model of the
    story, `model_b` the Clipped-ReLU one; any two models of the same scale work."""
    scales = {int(read_metadata(m)["config"]["scale"]) for m in (model_a, model_b)}
    if len(scales) != 1:
        raise ValueError(f"{model_a} and {model_b} have different scales ({sorted(scales)}); pick two models of one scale")
    scale = scales.pop()
    config = CalibrationConfig(method=method, samples=int(samples))
    prepared = prepare_input(image, mode, scale)
    lr, truth = prepared.lr, prepared.truth
    size = (lr.shape[1] * scale, lr.shape[0] * scale)
    resample = Image.Resampling.NEAREST if display == "nearest" else Image.Resampling.BICUBIC
    original = np.asarray(Image.fromarray(lr).resize(size, resample))
    fixes = fixes or (Fixes(), Fixes())
    int8 = []
    for index, (model, fix) in enumerate(zip((model_a, model_b), fixes)):
        step = (lambda fraction, message, i=index: progress((i + fraction) / 2, f"{model}: {message}")) if progress else None
        int8.append(calibrate_model(model, config, scheme, images=calibration_images, fixes=fix, progress=step))
    rows, outputs = [], {}
    for model, calibrated, label in ((model_a, int8[0], "A"), (model_b, int8[1], "B")):
        fp32, fp32_ms = _timed(fp32_engine(model), lr)
        out, int8_ms = _timed(int8_engine(calibrated), lr)
        outputs[label] = (fp32, out)
        rows.append(_row(f"PyTorch FP32 ({model})", fp32, fp32, truth, scale, fp32_ms))
        rows.append(_row(f"INT8 {calibrated.scheme.value} ({model})", out, fp32, truth, scale, int8_ms))
    if truth is not None:
        rows.append(_row("bicubic", bicubic_resize(lr, *size), outputs["A"][0], truth, scale, 0.0))
    return Comparison(original, outputs["A"][0], outputs["A"][1], outputs["B"][1], rows, (int8[0], int8[1]),
                      prepared.notices, truth)


def roi_strip(images: list[np.ndarray], center_x: float, center_y: float, size: int = 64, zoom: int = 4) -> np.ndarray:
    """The same square crop of every image (centre in fractions 0..1), enlarged with nearest neighbour and laid
    side by side with a white gap."""
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
