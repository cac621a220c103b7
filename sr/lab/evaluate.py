"""`python -m sr eval`: PSNR/SSIM/edge-PSNR of bicubic and of a model (FP32 or INT8) over a folder of HR images,
with the clean bicubic LR or a seeded degradation (blur, noise, JPEG).

Example:
    >>> report = evaluate(EvalConfig(model="xlsr-clip", data="path/to/Set5", engine="ort-int8"))
    >>> report["mean"]["psnr_y"], report["int8_mean"]["psnr_y"]
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from enum import Enum

import numpy as np

from ..quant.calibrate import CalibrationConfig
from ..progress import Progress
from ..data import Degradation, bicubic_resize, degrade, list_images, load_image
from ..run.engines import tensorrt_available
from ..run.npu import DEFAULT_HTP_ARCH, HTP_ARCHS
from ..metrics import brightness_ratio, edge_psnr_y, psnr_y, ssim_y
from ..model.models import model_info
from ..run.quantize import calibrate_model, qat_record
from ..quant.quantspec import Scheme
from ..run.runtime import EngineKind, Purpose, engine_for  # noqa: F401 (EngineKind is part of this module's API)

# The calibration the README's findings recommend (re-derived by scripts/findings.py): the smallest Set5 + Set14
# INT8 loss of the tensorrt scheme over every method and sample count, averaged over the five shipped models.
RECOMMENDED_CALIBRATION = CalibrationConfig(method="entropy", samples=1000)
RECOMMENDED_SCHEME = Scheme.TENSORRT


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
    htp_arch: str = DEFAULT_HTP_ARCH  # the Hexagon NPU generation the qnn-htp engine simulates
    degradation: Degradation | str = "clean"  # a preset (clean, strong) or "blur=..,noise=..,jpeg=.."; seeded per image

    def __post_init__(self):
        self.degradation = Degradation.parse(self.degradation)
        if self.threads < 0:
            raise ValueError(f"threads must be 0 (the runtime's default) or more, got {self.threads}")
        self.engine = EngineKind.parse(self.engine)
        self.scheme = Scheme.parse(self.scheme)
        if str(self.htp_arch) not in HTP_ARCHS:
            raise ValueError(f"unknown HTP generation {self.htp_arch!r}; choose one of: {', '.join(HTP_ARCHS)}")
        self.htp_arch = str(self.htp_arch)
        if self.engine is EngineKind.TENSORRT and not tensorrt_available():
            raise ValueError("the tensorrt engine needs an NVIDIA GPU with TensorRT (requirements-gpu.txt); on a CPU "
                             "use --engine ort-int8 or openvino-int8")
        if self.recommended and not self.engine.is_int8:
            raise ValueError("the recommended calibration is for INT8: use it with an INT8 engine (ort-int8 or tensorrt)")
        if self.recommended:
            self.calibration, self.scheme = RECOMMENDED_CALIBRATION, RECOMMENDED_SCHEME

    def checked(self) -> "EvalConfig":
        """This evaluation with its scale filled in, once the model and the folder are found (the constructor
        reads no file; this does).

        Raises:
            FileNotFoundError: no such model or folder, or a folder without images.
            ValueError: a scale that is not the model's.
        """
        model_scale = model_info(self.model).scale
        if self.scale is not None and self.scale != model_scale:
            raise ValueError(f"{self.model} is a x{model_scale} model; the scale asked for (x{self.scale}) does not match")
        list_images(self.data)
        return replace(self, scale=model_scale) if self.scale is None else self



def _scores(output: np.ndarray, truth: np.ndarray, scale: int) -> dict:
    return {"psnr_y": psnr_y(output, truth, shave=scale), "ssim_y": ssim_y(output, truth, shave=scale),
            "edge_psnr_y": edge_psnr_y(output, truth, shave=scale)}


def _mean(rows: list[dict]) -> dict:
    """Means over the images; an image without edges (edge PSNR nan) is left out of the edge mean."""
    means = {metric: float(np.mean([row[metric] for row in rows])) for metric in ("psnr_y", "ssim_y")}
    edges = [row["edge_psnr_y"] for row in rows if not np.isnan(row["edge_psnr_y"])]
    return {**means, "edge_psnr_y": float(np.mean(edges)) if edges else float("nan")}


def evaluate(config: EvalConfig, progress: Progress | None = None) -> dict:
    """Per-image and mean Y-PSNR/SSIM and edge-region Y-PSNR (`sr.metrics.edge_psnr_y`: Sobel magnitude of the
    ground truth above its 90th percentile, dilated 2 px), border of `scale` px shaved, of bicubic and the model,
    on LR images made by `degrade` with `config.degradation` (seeded by each file's name: the same in every run).

    Args:
        config: the evaluation.
        progress: told after each image (`sr.progress.Progress`; the CLI logs it).

    Returns:
        {"model", "data", "scale", "engine", "degradation", "bicubic", "mean", "images"}; for INT8 engines "mean" is the INT8
        result, and "fp32_mean", "int8_mean", "brightness_ratio" (mean brightness of INT8 over FP32 outputs,
        < 1 is darker), "worst_brightness_ratio" and the calibration are added.
    """
    config = config.checked()
    scale = config.scale
    int8 = calibrate_model(config.model, config.calibration, config.scheme) if config.engine.is_int8 else None
    engine = engine_for(config.model, int8, kind=config.engine, threads=config.threads, htp_arch=config.htp_arch)
    reference = engine_for(config.model, purpose=Purpose.MEASURE) if int8 is not None else None  # the one FP32
    rows, bicubic_rows, fp32_rows, ratios = [], [], [], []
    paths = list_images(config.data)
    for index, path in enumerate(paths):
        if progress is not None:
            progress(index / max(1, len(paths)), f"image {index + 1} of {len(paths)}: {path.name}")
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
    verdict = getattr(engine, "conformance", None)
    report = {"model": config.model, "data": config.data, "scale": scale, "engine": config.engine.value,
              "engine_name": engine.name,
              "conformance": None if verdict is None else {"reference": verdict.reference, "passed": verdict.passed,
                                                           "mean_levels": verdict.mean_levels,
                                                           "p999_levels": verdict.p999_levels,
                                                           "max_levels": verdict.max_levels},
              "degradation": config.degradation.to_dict(), "bicubic": _mean(bicubic_rows), "mean": _mean(rows), "images": rows}
    if int8 is not None:
        calibration = {k: (v.value if isinstance(v, Enum) else v) for k, v in vars(int8.config).items()}
        report.update(method=int8.config.method.value, samples=int8.config.samples, scheme=int8.scheme.value,
                      calibration=calibration, recommended=config.recommended,
                      fixes=None if int8.fixes.is_empty() else int8.fixes.key(),
                      fp32_mean=_mean(fp32_rows), int8_mean=report["mean"],
                      brightness_ratio=float(np.mean(ratios)), worst_brightness_ratio=float(np.min(ratios)),
                      auto=int8.choice and int8.choice.to_json(), warnings=[str(w) for w in int8.warnings(
                          float(np.mean(ratios)), "these images",
                          _mean(fp32_rows)["psnr_y"] - report["mean"]["psnr_y"])])
        _compare_with_original(report, config)
    return report


@dataclass(frozen=True)
class WrittenScore:
    """A tuned model's written INT8 file as the reference runs it, against the original FP32 model: the figure
    that counts after QAT (its own validation figures are the fake quantizers')."""

    int8_psnr_y: float
    loss_db: float  # the original FP32 model's PSNR-Y minus the written INT8 model's

    def in_words(self) -> str:
        return (f"the written INT8 model, scored on the reference (ONNX Runtime, CPU): {self.int8_psnr_y:.2f} dB, "
                f"{self.loss_db:.3f} dB below the original FP32")


def score_written(model: str, data: str, scheme: Scheme | str = Scheme.TENSORRT) -> WrittenScore:
    """A tuned model (a QAT or refinement result) scored on the reference: its written INT8 model of `scheme`
    (the ranges it learned) on `data`, and its loss against the model it was tuned from."""
    shown = evaluate(EvalConfig(model=model, data=data, engine="ort-int8", scheme=scheme))
    return WrittenScore(shown["int8_mean"]["psnr_y"], shown.get(
        "int8_vs_reference_db", shown["fp32_mean"]["psnr_y"] - shown["int8_mean"]["psnr_y"]))


def _compare_with_original(report: dict, config: EvalConfig) -> None:
    """For a QAT model (`sr.tune.qat`), add the FP32 model it was fine-tuned from ("fp32_reference") and the INT8 loss
    against it ("int8_vs_reference_db"): "fp32_mean" is the fine-tuned model's own FP32, which QAT may have made
    worse, so the honest loss is measured against the original."""
    record = qat_record(config.model)
    if record is None:
        return
    original = evaluate(EvalConfig(model=record.base, data=config.data, scale=config.scale,
                                   engine=model_info(record.base).fp32_engine,
                                   degradation=config.degradation, threads=config.threads))
    what = "the FP32 model the refinements started from" if record.kind == "ptq" else \
        "the FP32 model QAT started from"
    report["fp32_reference"] = {"model": record.base, "what": what, **original["mean"]}
    report["int8_vs_reference_db"] = original["mean"]["psnr_y"] - report["int8_mean"]["psnr_y"]
