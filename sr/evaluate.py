"""`python -m sr eval`: PSNR/SSIM of bicubic and of a model (FP32 or INT8) over a folder of HR images.

Example:
    >>> report = evaluate(EvalConfig(model="xlsr-clip", data="../shared/data/Set5", engine="ort-int8"))
    >>> report["mean"]["psnr_y"], report["int8_mean"]["psnr_y"]
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import numpy as np
from tqdm import tqdm

from .calibrate import CalibrationConfig, parse_choice
from .data import bicubic_resize, degrade, list_images, load_image
from .engines import OrtEngine, TensorRTEngine, TorchEngine
from .metrics import brightness_ratio, psnr_y, ssim_y
from .models import load_model, read_metadata, resolve_weights
from .quantize import CalibratedModel, Fixes, Scheme, calibrate_model, fp32_onnx_path


class EngineKind(str, Enum):
    TORCH = "torch"
    ORT = "ort"
    ORT_INT8 = "ort-int8"
    TENSORRT = "tensorrt"

    @classmethod
    def parse(cls, value) -> "EngineKind":
        return parse_choice(cls, value, "engine")

    @property
    def is_int8(self) -> bool:
        return self in (EngineKind.ORT_INT8, EngineKind.TENSORRT)


@dataclass
class EvalConfig:
    model: str
    data: str
    scale: int | None = None  # None: the model's own scale
    engine: EngineKind = EngineKind.TORCH
    method: str = "entropy"
    samples: int = 100
    scheme: str = "tensorrt"
    recommended: bool = False  # the calibration + fixes the README recommends (sr.diagnose.RECOMMENDED)
    threads: int = 0

    def __post_init__(self):
        self.engine = EngineKind.parse(self.engine)
        resolve_weights(self.model)
        model_scale = int(read_metadata(self.model)["config"]["scale"])
        if self.scale is None:
            self.scale = model_scale
        if self.scale != model_scale:
            raise ValueError(f"{self.model} is a x{model_scale} model; --scale {self.scale} does not match")
        list_images(self.data)
        if self.recommended and not self.engine.is_int8:
            raise ValueError("--recommended is an INT8 calibration: use it with --engine ort-int8 or tensorrt")
        CalibrationConfig(method=self.method, samples=self.samples)  # validates both
        Scheme.parse(self.scheme)


def int8_model(model: str, method: str, samples: int, scheme: str, recommended: bool = False,
               progress=None) -> CalibratedModel:
    """The calibrated INT8 model an evaluation or the app uses (cached)."""
    if recommended:
        from .diagnose import recommended_calibration

        config, scheme, fixes = recommended_calibration(model)
    else:
        config, fixes = CalibrationConfig(method=method, samples=samples), Fixes()
    return calibrate_model(model, config, scheme, fixes=fixes, progress=progress)


def create_engine(kind: EngineKind | str, model: str, int8: CalibratedModel | None = None, threads: int = 0):
    """An engine of `kind` for `model`; INT8 kinds need the calibrated model."""
    kind = EngineKind.parse(kind)
    scale = int(read_metadata(model)["config"]["scale"])
    if kind is EngineKind.TORCH:
        return TorchEngine(load_model(model))
    if kind is EngineKind.ORT:
        return OrtEngine(fp32_onnx_path(model), scale, threads, name="ort-fp32")
    if int8 is None:
        raise ValueError(f"the {kind.value} engine needs a calibrated INT8 model")
    if kind is EngineKind.ORT_INT8:
        return OrtEngine(int8.qdq_onnx, scale, threads, name=f"ort-int8-{int8.scheme.value}")
    if int8.scheme is not Scheme.TENSORRT:
        raise ValueError("the tensorrt engine runs the tensorrt scheme only (symmetric INT8)")
    return TensorRTEngine(int8.qdq_onnx, scale)


def _scores(output: np.ndarray, truth: np.ndarray, scale: int) -> dict:
    return {"psnr_y": psnr_y(output, truth, shave=scale), "ssim_y": ssim_y(output, truth, shave=scale)}


def _mean(rows: list[dict], key: str) -> dict:
    return {metric: float(np.mean([row[key][metric] for row in rows])) for metric in ("psnr_y", "ssim_y")}


def evaluate(config: EvalConfig, progress: bool = False) -> dict:
    """Per-image and mean Y-PSNR/SSIM (border of `scale` px shaved) of bicubic and the model.

    For INT8 engines, "mean" is the INT8 result, and "fp32_mean", "int8_mean" and "brightness_ratio" (mean
    brightness of INT8 over FP32 outputs) are added.
    """
    scale = config.scale
    int8 = None
    if config.engine.is_int8:
        int8 = int8_model(config.model, config.method, config.samples, config.scheme, config.recommended)
    engine = create_engine(config.engine, config.model, int8, config.threads)
    reference = TorchEngine(load_model(config.model)) if config.engine.is_int8 else None
    rows, bicubic_rows, fp32_rows, ratios = [], [], [], []
    for path in tqdm(list_images(config.data), desc="eval", disable=not progress):
        truth, lr = degrade(load_image(path), scale)
        output = engine.run(lr)
        row = {"name": path.name, **_scores(output, truth, scale)}
        bicubic_rows.append({"s": _scores(bicubic_resize(lr, truth.shape[1], truth.shape[0]), truth, scale)})
        if reference is not None:
            fp32 = reference.run(lr)
            fp32_rows.append({"s": _scores(fp32, truth, scale)})
            ratios.append(brightness_ratio(output, fp32))
            row["fp32_psnr_y"] = fp32_rows[-1]["s"]["psnr_y"]
        rows.append(row)
    report = {"model": config.model, "data": config.data, "scale": scale, "engine": config.engine.value,
              "bicubic": _mean(bicubic_rows, "s"),
              "mean": {m: float(np.mean([r[m] for r in rows])) for m in ("psnr_y", "ssim_y")},
              "images": rows}
    if int8 is not None:
        report.update(method=int8.config.method.value, samples=int8.config.samples, scheme=int8.scheme.value,
                      recommended=config.recommended, fixes=int8.fixes.key() if not int8.fixes.is_empty() else None,
                      fp32_mean=_mean(fp32_rows, "s"), int8_mean=report["mean"],
                      brightness_ratio=float(np.mean(ratios)))
    return report


def format_report(report: dict) -> str:
    lines = [f"{report['model']} on {report['data']} (x{report['scale']}, engine {report['engine']})",
             f"{'image':<24}{'PSNR-Y':>10}{'SSIM-Y':>10}"]
    lines += [f"{row['name']:<24}{row['psnr_y']:>10.3f}{row['ssim_y']:>10.4f}" for row in report["images"]]
    lines.append(f"{'mean':<24}{report['mean']['psnr_y']:>10.3f}{report['mean']['ssim_y']:>10.4f}")
    lines.append(f"{'bicubic':<24}{report['bicubic']['psnr_y']:>10.3f}{report['bicubic']['ssim_y']:>10.4f}")
    if "fp32_mean" in report:
        lines.append(f"{'fp32 (same model)':<24}{report['fp32_mean']['psnr_y']:>10.3f}"
                     f"{report['fp32_mean']['ssim_y']:>10.4f}")
        lines.append(f"INT8 {report['method']}/{report['samples']} samples/{report['scheme']}: "
                     f"{report['int8_mean']['psnr_y'] - report['fp32_mean']['psnr_y']:+.3f} dB vs FP32, "
                     f"brightness ratio {report['brightness_ratio']:.4f}")
    return "\n".join(lines)
