"""Quantization-aware fine-tuning (QAT): the exported INT8 model, trained.

The network trained is the fake-quantized one of `sr.tune.fakequant`: the FP32 graph with a fake quantizer wherever
the spec puts a Q/DQ pair, so the trained model and the exported QDQ model are one description.

Training starts from a calibration (any method), tunes weights and step sizes against
alpha * L1(HR) + (1 - alpha) * L1(frozen FP32 model's output), and exports with the same writer: the trained
FP32 weights plus the learned ranges give the QDQ model, which ONNX Runtime runs to the same PSNR as the fake
quantization (`tests/test_qat.py`, 0.01 dB). A shipped/trained model becomes a safetensors file whose metadata
holds the learned ranges (`qat`), so `calibrate_model` uses them for that scheme; an ONNX model becomes an ONNX
file with the same record in its `metadata_props`.

Example:
    >>> result = quantization_aware_training(QatConfig(model="xlsr-clip", steps=2000,
    ...                                                out="runs/xlsr-clip-qat.safetensors"))
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import torch
from torch import nn

from ..quant.calibrate import CalibrationConfig, Method
from ..quant.searches import TensorRange
from ..data import PatchSampler
from ..model.models import TuningRecord, model_info
from ..model.onnxtorch import OnnxModule
from ..run.quantize import fp32_onnx_path
from ..quant.quantspec import Scheme
from ..quant.qdq import fixed_input_size
from ..store import file_sha256
from .loop import (LoopState, checkpoint, continue_stream, distributed_rank, end_distributed, final_validation,
                   machine_name, resolve_device, restore, run_loop)
from .distill import KDMode, upcycled_terms
from .train import Validator, default_training_dirs, default_validation_dir, training_folders, warmup_fraction
from .transforms import calibration_batch, prepare, remove_starting_points
from .fakequant import FakeQuantModel, export_trained, fake_quantized, original_model, qdq_path_for

log = logging.getLogger(__name__)


@dataclass
class QatConfig:
    """One QAT run; `asdict(config)` goes into the result's metadata.

    Raises:
        ValueError: (on construction) a bad scheme or method, a count below 1, alpha outside [0, 1] or a
            non-positive learning rate; the message names the value.
    """

    model: str = "xlsr-clip"  # a shipped name, a weight file, or a registered ONNX model (onnx:<hash>)
    out: str = "runs/qat.safetensors"  # .safetensors for PyTorch models, .onnx for ONNX models
    scheme: Scheme | str = Scheme.TENSORRT
    # the calibration the ranges start from (its images: calib_data/ unless `data` says otherwise)
    calibration: CalibrationConfig = field(default_factory=lambda: CalibrationConfig(method=Method.MSE))
    steps: int = 2000
    batch_size: int = 16
    lr_patch: int = 32
    lr: float = 5e-5  # weights (cosine decay after a short warm-up)
    range_lr: float = 2e-3  # log step sizes
    alpha: float = 0.5  # weight of L1 to HR; 1 - alpha - beta goes to L1 to the frozen FP32 output
    # teacher-guided QAT: a frozen, larger FP32 model whose outputs the INT8 student also learns (weight beta)
    teacher: str | None = None
    beta: float = 0.0  # weight of the teacher term (needs a teacher)
    kd_mode: KDMode = KDMode.OUTPUT  # output: L1 to T(x); upcycled: also on zoomed-in and zoomed-out inputs (DUKD)
    seed: int = 0
    train_dirs: list[str] = field(default_factory=default_training_dirs)
    val_dir: str | None = field(default_factory=default_validation_dir)
    val_every: int = 500
    checkpoint_every: int = 500
    resume: bool = False
    device: str = "auto"
    max_seconds: float | None = None
    io_offset: bool = True  # centred I/O (`sr.tune.transforms`) where possible: the lab's architectures
    equalize: float = 0.0  # channel-equalization strength before calibration (`sr.tune.transforms`; 0: none)
    # end with the weights of the best validation (the validation images then choose the model too: measure the
    # result on other images)
    keep_best: bool = False

    def __post_init__(self):
        self.scheme = Scheme.parse(self.scheme)
        if isinstance(self.calibration, dict):  # read back from a record or a checkpoint
            self.calibration = CalibrationConfig(**self.calibration)
        for name in ("steps", "batch_size", "lr_patch", "val_every", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
        if not 0.0 <= self.beta <= 1.0 - self.alpha:
            raise ValueError(f"beta (the teacher's weight) must be in [0, 1 - alpha], got {self.beta}")
        if (self.teacher is None) != (self.beta == 0.0):
            raise ValueError("a teacher needs a weight and a weight needs a teacher: give both a teacher and its weight beta "
                             "(> 0), or neither")
        self.kd_mode = KDMode.parse(self.kd_mode)
        if self.kd_mode is KDMode.FEATURE:
            raise ValueError("QAT's teacher term has the output and upcycled modes, not feature (a FitNets hint "
                             "needs the lab's own architectures on both sides)")
        if not (self.lr > 0 and self.range_lr > 0):
            raise ValueError(f"learning rates must be positive, got lr={self.lr}, range_lr={self.range_lr}")
        if isinstance(self.train_dirs, str):
            self.train_dirs = [self.train_dirs]

    @property
    def checkpoint_path(self) -> Path:
        """Where the resumable checkpoint is kept: `<out>.ckpt.pt`."""
        return Path(f"{self.out}.ckpt.pt")


@dataclass
class QatResult:
    """What a QAT run wrote and measured."""

    weights: Path  # the trained model (.safetensors, or .onnx for an ONNX model), learned ranges in its metadata
    qdq_onnx: Path  # the deployable QDQ model of `scheme`
    steps: int
    wall_seconds: float
    history: list[dict]  # {"step", "loss", "val_psnr"?}: validation PSNR of the fake-quantized model
    fp32_val_psnr: float | None  # the original FP32 model on the validation set, for comparison


@dataclass(kw_only=True)
class _QatRun(LoopState):
    """A QAT run in the shared loop (`sr.tune.loop`): the fake-quantized student against the ground truth, its own FP32
    original and, optionally, a teacher."""

    reference: OnnxModule
    calibrated_ranges: dict[str, TensorRange]
    fp32_path: Path
    scale: int
    structure: str  # the model whose graph is trained: the original, or its centred-I/O version
    fp32_val_psnr: float | None = None
    teacher: nn.Module | None = None
    best: tuple | None = None  # (validation PSNR, step, student state) with keep_best
    loss_digits: int = 5

    @property
    def student(self) -> FakeQuantModel:
        return self.model

    def train_step(self) -> torch.Tensor:
        lr, hr = self.sampler.batch(self.config.batch_size)
        lr, hr = lr.to(self.device), hr.to(self.device)
        prediction = self.trainable(lr)
        config = self.config
        loss = config.alpha * (prediction - hr).abs().mean()
        own = 1.0 - config.alpha - config.beta
        if own > 0:
            with torch.no_grad():
                target = self.reference(lr)
            loss = loss + own * (prediction - target).abs().mean()
        if self.teacher is not None:
            loss = loss + config.beta * _teacher_term(self, lr, hr, prediction)
        self.take_step(loss)
        return loss.detach()

    def learning_rate_hint(self) -> str:
        return f"lower the learning rate lr (now {self.config.lr}) or range_lr (now {self.config.range_lr})"

    def own_state(self) -> dict:
        """The student, and with keep_best the best weights so far (a resumed run keeps them too)."""
        best = None if self.best is None else {"psnr": self.best[0], "step": self.best[1], "state": self.best[2]}
        return {"student": self.model.state_dict(), "best": best}

    def load_own_state(self, state: dict) -> None:
        self.model.load_state_dict(state["student"])
        best = state.get("best")  # (absent in checkpoints written before it was kept)
        self.best = None if best is None else (best["psnr"], best["step"], best["state"])

    def validation_line(self, psnr: float) -> str:
        return (f"step {self.step}: loss {self.running_loss:.5f}, INT8 (fake-quant) validation PSNR {psnr:.3f} dB "
                f"(FP32 {self.fp32_val_psnr:.3f})")

    def after_validation(self, psnr: float) -> None:
        """With `keep_best`, a copy of the student's state at its best validation so far."""
        if self.config.keep_best and (self.best is None or psnr > self.best[0]):
            self.best = (psnr, self.step, {k: v.detach().clone() for k, v in self.model.state_dict().items()})

    def progress_extra(self) -> dict:
        return {"fp32_val_psnr": self.fp32_val_psnr}


def quantization_aware_training(config: QatConfig, on_record: Callable[[dict], None] | None = None,
                                should_stop: Callable[[], bool] | None = None) -> QatResult:
    """Calibrate, fine-tune the fake-quantized model, and write the trained model and its QDQ model.

    Args:
        config: the run.
        on_record: handed on rank 0 each measurement, {"step", "steps", "loss", "val_psnr"?}, every 50 steps and at each
            validation.
        should_stop: polled before every step; True ends early (the result so far is written).

    Returns:
        the QatResult.

    Raises:
        FileNotFoundError: unknown model, or a missing data folder.
        ValueError: a model whose graph has ops the interpreter does not cover; see QatConfig.
        FloatingPointError: the loss became NaN or infinite.
    """
    run = _setup(config)
    try:
        restore(run)
        continue_stream(run)
        run_loop(run, f"QAT {Path(config.out).stem}", on_record, should_stop)
    except BaseException:  # interrupted (Ctrl-C, an error): with no checkpoint to resume, nothing is left behind
        if run.rank == 0 and not config.checkpoint_path.is_file():
            remove_starting_points(Path(config.out))
        raise
    return _finish(run)


def _setup(config: QatConfig) -> _QatRun:
    """Calibrate (cached), build the fake-quantized student and the frozen FP32 reference, Adam, the schedule."""
    rank, world = distributed_rank()
    device = resolve_device(config.device)
    if device.type == "cuda":
        device = torch.device("cuda", rank % torch.cuda.device_count())
    torch.manual_seed(config.seed)
    info = model_info(config.model)
    calibration = config.calibration
    patches = calibration_batch(calibration, info.scale) if config.equalize else None
    structure, fixes = prepare(config.model, config.io_offset, config.equalize, patches, Path(config.out), config.scheme)
    student, calibrated = fake_quantized(structure, calibration, config.scheme.value, fixes)
    fp32 = student.fp32
    # the reference is the original model, whatever its I/O convention (both take and return [0, 1] images); a
    # QAT model fine-tuned again keeps the model it started from as its reference
    reference = OnnxModule(onnx.load(str(fp32_onnx_path(original_model(config.model))))).requires_grad_(False).eval()
    student.to(device), reference.to(device)  # (the interpreter's constants move with its parameters)
    weights = [p for p in student.network.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam([{"params": weights, "lr": config.lr},
                                  {"params": [student.log_scales], "lr": config.range_lr}])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _cosine(config.steps, config.max_seconds))
    fixed = _fixed_size(fp32)
    sampler = PatchSampler(training_folders(config.train_dirs), info.scale, fixed or config.lr_patch, seed=config.seed)
    validator = Validator(config.val_dir, info.scale) if config.val_dir and rank == 0 and not fixed else None
    run = _QatRun(config=config, rank=rank, world=world, device=device, model=student, trainable=student,
                  optimizer=optimizer, scheduler=scheduler, sampler=sampler, validator=validator, reference=reference,
                  calibrated_ranges=calibrated.ranges, fp32_path=calibrated.fp32_onnx, scale=info.scale,
                  structure=structure)
    if config.teacher is not None:
        run.teacher = model_info(config.teacher).frozen_module(device)  # a weight file or a user's ONNX model
        if model_info(config.teacher).scale != info.scale:
            raise ValueError(f"the teacher {config.teacher} is x{model_info(config.teacher).scale}, the model "
                             f"x{info.scale}")
    if validator is not None:
        run.fp32_val_psnr = validator(reference, device)
    return run


def _cosine(steps: int, max_seconds: float | None = None) -> Callable[[int], float]:
    """Warm-up, then cosine decay over the run: over `steps`, or over `max_seconds` when the time budget ends
    the run first (the decay follows whichever is further along), so a run stopped by its budget ends at a low
    learning rate instead of being cut off at a high one."""
    warmup = max(1, int(warmup_fraction(steps) * steps * 0.5))
    started = time.perf_counter()

    def factor(step: int) -> float:
        done = min(step, steps) / steps
        if max_seconds:
            done = max(done, min(1.0, (time.perf_counter() - started) / max_seconds))
        return min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * done))
    return factor


def _fixed_size(model: onnx.ModelProto) -> int | None:
    pair = fixed_input_size(model)
    if pair and pair[0] != pair[1]:
        raise ValueError(f"a fixed-size model must take square inputs for QAT, this one takes {pair[0]}x{pair[1]}")
    return pair[0] if pair else None


def _teacher_term(run: _QatRun, lr: torch.Tensor, hr: torch.Tensor, prediction: torch.Tensor) -> torch.Tensor:
    """L1 of the INT8 student to the frozen teacher on the training patch (`output`); with `upcycled`, the mean of
    the upcycled terms (`sr.tune.distill.upcycled_terms`, the one definition distillation uses too) in L1. The
    teacher runs on the fly: the patch stream is random, so no patch repeats and no output is worth keeping."""
    def label(batch: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return run.teacher(batch)

    target = label(lr)
    if run.config.kd_mode is not KDMode.UPCYCLED:
        return (prediction - target).abs().mean()
    rng = np.random.default_rng([run.config.seed, run.step, 24])
    terms = upcycled_terms(run.trainable, label, lr, hr, lr, prediction, target, rng, lambda a, b: (a - b).abs().mean())
    return torch.stack(terms).mean()


def _plain(value):
    """`value` with its enums as their values (JSON-ready)."""
    return json.loads(json.dumps(value, default=lambda v: v.value if isinstance(v, Enum) else str(v)))


def _finish(run: _QatRun) -> QatResult:
    """Final validation, checkpoint, the trained model and its QDQ model (rank 0), then leave the process group."""
    wall = run.wall_seconds()
    final_validation(run)
    if run.best is not None and run.best[0] > run.history[-1]["val_psnr"]:
        log.info("keeping the weights of step %d (validation %.3f dB, the last %.3f dB)", run.best[1], run.best[0],
                 run.history[-1]["val_psnr"])
        run.student.load_state_dict(run.best[2])
        run.history.append({"step": run.step, "loss": run.running_loss, "val_psnr": run.best[0],
                            "kept_step": run.best[1]})
    checkpoint(run, wall)
    out = Path(run.config.out)
    qdq = qdq_path_for(out, run.config.scheme.value)
    if run.rank == 0:
        base = original_model(run.config.model)
        record = TuningRecord("qat", run.config.scheme.value, run.student.ranges(), base, {
            "base_sha256": file_sha256(model_info(base).path), "fp32_val_psnr": run.fp32_val_psnr,
            "config": _plain(asdict(run.config)), "steps": run.step, "wall_seconds": round(wall, 1),
            "machine": machine_name(run.device), "history": run.history})
        export_trained(run.structure, run.fp32_path, run.student.weights(), record, out, qdq,
                       run.calibrated_ranges)
    if run.world > 1:
        end_distributed(run)
    if run.rank == 0 and run.step >= run.config.steps:  # the starting-point files a resume would need
        remove_starting_points(out)
    return QatResult(out, qdq, run.step, wall, run.history, run.fp32_val_psnr)
