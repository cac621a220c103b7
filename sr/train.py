"""Training (and, with a teacher, distillation): Charbonnier loss, Adam, one-cycle schedule, validation,
checkpoint/resume, and DistributedDataParallel when started under `torchrun`.

Example:
    >>> from sr.train import TrainConfig, train
    >>> result = train(TrainConfig(arch="xlsr", final_activation="clipped_relu", steps=200,
    ...                            train_dirs=["../shared/data/T91"], out="runs/tiny.safetensors"))
"""
from __future__ import annotations

import logging
import math
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from .data import PatchSampler, degrade, list_images, load_image, to_tensor, to_uint8
from .metrics import psnr_y
from .models import MODELS, SCALES, FinalActivation, build_model, load_model, save_weights
from .store import atomic_path

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    arch: str = "xlsr"
    final_activation: str = "relu"
    scale: int = 3
    train_dirs: list[str] = field(default_factory=lambda: ["../shared/data/T91", "../shared/data/BSD200"])
    val_dir: str | None = "../shared/data/Set5"
    out: str = "runs/model.safetensors"
    steps: int = 20_000
    batch_size: int = 16  # per process; under torchrun the global batch is batch_size * world size
    lr_patch: int = 32  # LR patch side; the HR patch is lr_patch * scale
    max_lr: float = 2e-3  # one-cycle peak; tiny XLSR-class nets train well at 1e-3..3e-3, the teacher at ~5e-4
    seed: int = 0
    val_every: int = 1000
    checkpoint_every: int = 1000
    resume: bool = False  # continue from `<out>.ckpt.pt` when it exists
    device: str = "auto"  # auto = cuda when available, else cpu
    init: str | None = None  # start from these weights (fine-tuning; e.g. a ReLU model -> Clipped ReLU)
    amp: bool = False  # bf16 autocast on CUDA (about 2x faster for the teacher; no effect on CPU)
    max_seconds: float | None = None  # stop early (weights saved) once the loop has run this long
    model_config: dict = field(default_factory=dict)  # extra architecture fields, e.g. {"num_blocks": 8}

    def __post_init__(self):
        if self.arch not in MODELS:
            raise ValueError(f"unknown architecture {self.arch!r}; choose one of: {', '.join(MODELS)}")
        # checked here, not when the model is built after the data is loaded; kept as the plain string value
        self.final_activation = FinalActivation.parse(self.final_activation).value
        if self.scale not in SCALES:
            raise ValueError(f"scale must be one of {SCALES}, got {self.scale}")
        for name in ("steps", "batch_size", "lr_patch", "val_every", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if not self.max_lr > 0:
            raise ValueError(f"max_lr must be positive, got {self.max_lr}")
        if isinstance(self.train_dirs, (str, os.PathLike)):
            self.train_dirs = [str(self.train_dirs)]

    @property
    def checkpoint_path(self) -> Path:
        return Path(self.out).with_suffix(".ckpt.pt")


@dataclass
class TrainResult:
    weights: Path
    steps: int
    wall_seconds: float
    best_val_psnr: float | None
    history: list[dict]  # [{"step", "loss", "val_psnr"?}]


def charbonnier(prediction: torch.Tensor, target: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """Charbonnier loss sqrt((x - y)^2 + eps^2), a differentiable L1 (Lai et al., LapSRN, CVPR 2017)."""
    return torch.sqrt((prediction - target) ** 2 + eps * eps).mean()


class Validator:
    """Mean Y-PSNR (border shaved by `scale`) of a model over an image folder; images are degraded once."""

    def __init__(self, folder: str | os.PathLike, scale: int):
        self.scale = scale
        self.pairs = [degrade(load_image(p), scale) for p in list_images(folder)]

    @torch.no_grad()
    def __call__(self, model: nn.Module, device: torch.device) -> float:
        was_training = model.training
        model.eval()
        scores = []
        for hr, lr in self.pairs:
            sr = to_uint8(model(to_tensor(lr).to(device)))
            scores.append(psnr_y(sr, hr, shave=self.scale))
        model.train(was_training)
        return float(np.mean(scores))


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _distributed() -> tuple[int, int]:
    """(rank, world size), initialising the process group when started by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return (dist.get_rank(), world) if world > 1 else (0, 1)


def _save_checkpoint(path: Path, state: dict) -> None:
    with atomic_path(path) as temp:
        torch.save(state, temp)


def train(config: TrainConfig, on_progress: Callable[[dict], None] | None = None,
          should_stop: Callable[[], bool] | None = None) -> TrainResult:
    """Train `config.arch` from scratch (or resume) and write its weights to `config.out`."""
    return fit(config, teacher=None, alpha=1.0, on_progress=on_progress, should_stop=should_stop)


def fit(config: TrainConfig, teacher: nn.Module | None, alpha: float,
        on_progress: Callable[[dict], None] | None = None,
        should_stop: Callable[[], bool] | None = None) -> TrainResult:
    """The training loop shared by `train` and `sr.distill.distill`.

    loss = alpha * L(student, HR) + (1 - alpha) * L(student, teacher(LR)), L = Charbonnier; the teacher (if
    any) is frozen and run on the fly. `on_progress` receives {"step", "steps", "loss", "val_psnr"?} dicts;
    `should_stop()` returning True ends training early (the weights reached so far are saved).
    """
    rank, world = _distributed()
    device = _resolve_device(config.device)
    if device.type == "cuda":
        torch.cuda.set_device(rank % torch.cuda.device_count())
        device = torch.device("cuda", rank % torch.cuda.device_count())
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(config.seed)
    model = build_model(config.arch, scale=config.scale, final_activation=config.final_activation,
                        **config.model_config).to(device)
    if config.init:
        model.load_state_dict(load_model(config.init).state_dict())
    if teacher is not None:
        teacher = teacher.to(device).eval().requires_grad_(False)
        if teacher.config.scale != config.scale:
            raise ValueError(f"teacher is x{teacher.config.scale} but the student is x{config.scale}")
    optimizer = torch.optim.Adam(model.parameters(), lr=config.max_lr)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.max_lr, total_steps=config.steps,
                                                    pct_start=0.1)
    start_step, history, elapsed_before = 0, [], 0.0
    if config.resume and config.checkpoint_path.is_file():
        state = torch.load(config.checkpoint_path, map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_step, history, elapsed_before = state["step"], state["history"], state["wall_seconds"]
        log.info("resumed from %s at step %d", config.checkpoint_path, start_step)
    trainable = nn.parallel.DistributedDataParallel(model) if world > 1 else model

    sampler = PatchSampler(config.train_dirs, config.scale, config.lr_patch, seed=config.seed)
    sampler.reseed(config.seed, rank, start_step)  # each rank, and each resume, draws its own stream
    validator = Validator(config.val_dir, config.scale) if config.val_dir and rank == 0 else None

    def snapshot(step: int, wall: float) -> dict:
        return {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "step": step, "history": history, "wall_seconds": wall}

    started = time.perf_counter()
    step, running_loss = start_step, None
    bar = tqdm(total=config.steps, initial=start_step, desc=Path(config.out).stem, disable=rank != 0,
               dynamic_ncols=True, mininterval=1.0)
    model.train()
    while step < config.steps:
        if should_stop is not None and should_stop():
            log.info("stopped at step %d on request", step)
            break
        if config.max_seconds is not None and time.perf_counter() - started > config.max_seconds:
            log.info("stopped at step %d: time budget of %.0f s reached", step, config.max_seconds)
            break
        lr, hr = sampler.batch(config.batch_size)
        lr, hr = lr.to(device, non_blocking=True), hr.to(device, non_blocking=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=config.amp and device.type == "cuda"):
            prediction = trainable(lr)
            if teacher is not None:
                with torch.no_grad():
                    target = teacher(lr)
        loss = charbonnier(prediction.float(), hr)
        if teacher is not None:
            loss = alpha * loss + (1.0 - alpha) * charbonnier(prediction.float(), target.float())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        step += 1
        if running_loss is None or step % 50 == 0 or step % config.val_every == 0 or step == config.steps:
            value = float(loss.detach())
            if not math.isfinite(value):
                raise FloatingPointError(f"loss became {value} at step {step}; lower max_lr (now {config.max_lr})")
            running_loss = value if running_loss is None else 0.9 * running_loss + 0.1 * value
            bar.set_postfix(loss=f"{running_loss:.4f}", refresh=False)
        bar.update(1)
        if rank != 0:
            continue
        event = None
        if step % config.val_every == 0 or step == config.steps:
            event = {"step": step, "loss": running_loss}
            if validator is not None:
                event["val_psnr"] = validator(model, device)
                bar.write(f"step {step}: loss {running_loss:.4f}, validation PSNR {event['val_psnr']:.3f} dB")
            history.append(event)
        elif step % 50 == 0:
            event = {"step": step, "loss": running_loss}
        if event is not None and on_progress is not None:
            on_progress({**event, "steps": config.steps})
        if step % config.checkpoint_every == 0 and step < config.steps:
            _save_checkpoint(config.checkpoint_path, snapshot(step, elapsed_before + time.perf_counter() - started))
    bar.close()
    wall = elapsed_before + time.perf_counter() - started
    result = TrainResult(weights=Path(config.out), steps=step, wall_seconds=wall, history=history,
                         best_val_psnr=max((h["val_psnr"] for h in history if "val_psnr" in h), default=None))
    if rank == 0:
        if validator is not None and (not history or history[-1]["step"] != step):
            history.append({"step": step, "loss": running_loss, "val_psnr": validator(model, device)})
        _save_checkpoint(config.checkpoint_path, snapshot(step, wall))
        save_weights(model, config.out, extra={
            "train": asdict(config), "steps": step, "wall_seconds": round(wall, 1),
            "machine": _machine(device), "history": history,
            "distilled_from": getattr(teacher, "source", None) if teacher is not None else None,
        })
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return result


def _machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
