"""`python -m sr eval`: PSNR/SSIM/edge-PSNR of bicubic and of a model (FP32 or INT8) over a folder of HR images,
with the clean bicubic LR or a seeded degradation (blur, noise, JPEG).

Example:
    >>> report = evaluate(EvalConfig(model="xlsr-clip", data="path/to/Set5", engine="ort-int8"))
    >>> report["mean"]["psnr_y"], report["int8_mean"]["psnr_y"]
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

import numpy as np
from tqdm import tqdm

from .calibrate import CalibrationConfig
from .choices import Choice
from .data import Degradation, bicubic_resize, degrade, list_images, load_image
from .engines import OpenVinoEngine, OrtEngine, TensorRTEngine, TorchEngine, tensorrt_available
from .metrics import brightness_ratio, edge_psnr_y, psnr_y, ssim_y
from .models import load_model, model_info
from .quantize import CalibratedModel, Scheme, calibrate_model, fp32_onnx_path, qat_record

# The calibration the README's findings recommend (re-derived by scripts/findings.py): the smallest Set5 + Set14
# INT8 loss of the tensorrt scheme over every method and sample count, averaged over the five shipped models.
RECOMMENDED_CALIBRATION = CalibrationConfig(method="mse", samples=1000)
RECOMMENDED_SCHEME = Scheme.TENSORRT


class EngineKind(Choice, noun="engine"):
    """The runtimes a model can be evaluated with."""

    TORCH = "torch"
    ORT = "ort"
    ORT_INT8 = "ort-int8"
    OPENVINO = "openvino"  # FP32 (INFERENCE_PRECISION_HINT f32)
    OPENVINO_BF16 = "openvino-bf16"
    OPENVINO_INT8 = "openvino-int8"  # the QDQ model, its Q/DQ pairs fused into INT8 kernels
    TENSORRT = "tensorrt"

    @property
    def is_int8(self) -> bool:
        """True for the engines that run a calibrated INT8 model."""
        return self in (EngineKind.ORT_INT8, EngineKind.OPENVINO_INT8, EngineKind.TENSORRT)


@dataclass
class EvalConfig:
    """One evaluation: a model, a folder of HR images, an engine and (for INT8) its calibration."""

    model: str
    data: str
    scale: int | None = None  # None: the model's own scale
    engine: EngineKind = EngineKind.TORCH
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    scheme: Scheme = Scheme.TENSORRT
    recommended: bool = False  # RECOMMENDED_CALIBRATION and RECOMMENDED_SCHEME instead of the two above
    threads: int = 0
    degradation: Degradation | str = "clean"  # a preset (clean, strong) or "blur=..,noise=..,jpeg=.."; seeded per image

    def __post_init__(self):
        self.degradation = Degradation.parse(self.degradation)
        if self.threads < 0:
            raise ValueError(f"threads must be 0 (the runtime's default) or more, got {self.threads}")
        self.engine = EngineKind.parse(self.engine)
        self.scheme = Scheme.parse(self.scheme)
        if self.engine is EngineKind.TENSORRT and not tensorrt_available():
            raise ValueError("the tensorrt engine needs an NVIDIA GPU with TensorRT (requirements-gpu.txt); on a CPU "
                             "use --engine ort-int8 or openvino-int8")
        model_scale = model_info(self.model).scale
        if self.scale is None:
            self.scale = model_scale
        if self.scale != model_scale:
            raise ValueError(f"{self.model} is a x{model_scale} model; --scale {self.scale} does not match")
        list_images(self.data)
        if self.recommended and not self.engine.is_int8:
            raise ValueError("--recommended is an INT8 calibration: use it with --engine ort-int8 or tensorrt")
        if self.recommended:
            self.calibration, self.scheme = RECOMMENDED_CALIBRATION, RECOMMENDED_SCHEME



def create_engine(kind: EngineKind | str, model: str, int8: CalibratedModel | None = None, threads: int = 0):
    """An engine of `kind` for `model`.

    Args:
        kind: the runtime.
        model: a shipped model name or a weight file.
        int8: the calibrated model, for INT8 kinds.
        threads: ONNX Runtime threads (0: its default).

    Returns:
        an object with `run(lr uint8 HxWx3) -> uint8 (sH)x(sW)x3`.

    Raises:
        ValueError: an INT8 kind without a calibrated model, or TensorRT with the cpu scheme.
    """
    kind = EngineKind.parse(kind)
    scale = model_info(model).scale
    if kind is EngineKind.TORCH:
        return TorchEngine(load_model(model), name="torch-fp32")
    if kind is EngineKind.ORT:
        return OrtEngine(fp32_onnx_path(model), scale, threads, name="ort-fp32")
    if kind in (EngineKind.OPENVINO, EngineKind.OPENVINO_BF16):
        precision = "bf16" if kind is EngineKind.OPENVINO_BF16 else "f32"
        return OpenVinoEngine(fp32_onnx_path(model), scale, threads, precision, name=f"openvino-{precision}")
    if int8 is None:
        raise ValueError(f"the {kind.value} engine needs a calibrated INT8 model")
    if kind is EngineKind.ORT_INT8:
        return OrtEngine(int8.qdq_onnx, scale, threads, name=f"ort-int8-{int8.scheme.value}")
    if kind is EngineKind.OPENVINO_INT8:
        return OpenVinoEngine(int8.qdq_onnx, scale, threads, name=f"openvino-int8-{int8.scheme.value}")
    if int8.scheme is not Scheme.TENSORRT:
        raise ValueError("the tensorrt engine runs the tensorrt scheme only (symmetric INT8)")
    return TensorRTEngine(int8.qdq_onnx, scale)


def _scores(output: np.ndarray, truth: np.ndarray, scale: int) -> dict:
    return {"psnr_y": psnr_y(output, truth, shave=scale), "ssim_y": ssim_y(output, truth, shave=scale),
            "edge_psnr_y": edge_psnr_y(output, truth, shave=scale)}


def _mean(rows: list[dict]) -> dict:
    """Means over the images; an image without edges (edge PSNR nan) is left out of the edge mean."""
    means = {metric: float(np.mean([row[metric] for row in rows])) for metric in ("psnr_y", "ssim_y")}
    edges = [row["edge_psnr_y"] for row in rows if not np.isnan(row["edge_psnr_y"])]
    return {**means, "edge_psnr_y": float(np.mean(edges)) if edges else float("nan")}


def evaluate(config: EvalConfig, progress: bool = False) -> dict:
    """Per-image and mean Y-PSNR/SSIM and edge-region Y-PSNR (`sr.metrics.edge_psnr_y`: Sobel magnitude of the
    ground truth above its 90th percentile, dilated 2 px), border of `scale` px shaved, of bicubic and the model,
    on LR images made by `degrade` with `config.degradation` (seeded by each file's name: the same in every run).

    Args:
        config: the evaluation.
        progress: show a progress bar.

    Returns:
        {"model", "data", "scale", "engine", "degradation", "bicubic", "mean", "images"}; for INT8 engines "mean" is the INT8
        result, and "fp32_mean", "int8_mean", "brightness_ratio" (mean brightness of INT8 over FP32 outputs,
        < 1 is darker), "worst_brightness_ratio" and the calibration are added.
    """
    scale = config.scale
    int8 = calibrate_model(config.model, config.calibration, config.scheme) if config.engine.is_int8 else None
    engine = create_engine(config.engine, config.model, int8, config.threads)
    reference = create_engine(EngineKind.ORT if model_info(config.model).arch == "onnx" else EngineKind.TORCH,
                              config.model) if int8 is not None else None
    rows, bicubic_rows, fp32_rows, ratios = [], [], [], []
    for path in tqdm(list_images(config.data), desc="eval", disable=not progress):
        truth, lr = degrade(load_image(path), scale, config.degradation, path.name)
        output = engine.run(lr)
        row = {"name": path.name, **_scores(output, truth, scale)}
        bicubic_rows.append(_scores(bicubic_resize(lr, truth.shape[1], truth.shape[0]), truth, scale))
        if reference is not None:
            fp32 = reference.run(lr)
            fp32_rows.append(_scores(fp32, truth, scale))
            ratios.append(brightness_ratio(output, fp32))
            row["fp32_psnr_y"] = fp32_rows[-1]["psnr_y"]
            row["brightness_ratio"] = ratios[-1]
        rows.append(row)
    report = {"model": config.model, "data": config.data, "scale": scale, "engine": config.engine.value,
              "degradation": config.degradation.to_dict(), "bicubic": _mean(bicubic_rows), "mean": _mean(rows), "images": rows}
    if int8 is not None:
        calibration = {k: (v.value if isinstance(v, Enum) else v) for k, v in vars(int8.config).items()}
        report.update(method=int8.config.method.value, samples=int8.config.samples, scheme=int8.scheme.value,
                      calibration=calibration, recommended=config.recommended,
                      fixes=None if int8.fixes.is_empty() else int8.fixes.key(),
                      fp32_mean=_mean(fp32_rows), int8_mean=report["mean"],
                      brightness_ratio=float(np.mean(ratios)), worst_brightness_ratio=float(np.min(ratios)))
        _compare_with_original(report, config)
    return report


def _compare_with_original(report: dict, config: EvalConfig) -> None:
    """For a QAT model (`sr.qat`), add the FP32 model it was fine-tuned from ("fp32_reference") and the INT8 loss
    against it ("int8_vs_reference_db"): "fp32_mean" is the fine-tuned model's own FP32, which QAT may have made
    worse, so the honest loss is measured against the original."""
    record = qat_record(config.model)
    if record is None:
        return
    original = evaluate(EvalConfig(model=record["base"], data=config.data, scale=config.scale,
                                   engine=EngineKind.ORT if model_info(record["base"]).arch == "onnx" else EngineKind.TORCH,
                                   degradation=config.degradation, threads=config.threads))
    report["fp32_reference"] = {"model": record["base"], "what": "the FP32 model QAT started from", **original["mean"]}
    report["int8_vs_reference_db"] = original["mean"]["psnr_y"] - report["int8_mean"]["psnr_y"]
