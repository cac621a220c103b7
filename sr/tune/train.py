"""Training (and, with a teacher, distillation): Charbonnier loss, Adam, one-cycle schedule, validation,
checkpoint/resume, and DistributedDataParallel when started under `torchrun`.

Example:
    >>> from sr.tune.train import TrainConfig, train
    >>> result = train(TrainConfig(arch="xlsr", final_activation="clipped_relu", steps=200,
    ...                            train_dirs=["path/to/T91"], out="runs/tiny.safetensors"))
"""
from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from ..data import Degradation, PatchSampler, degrade, list_images, load_image, to_tensor, to_uint8
from ..metrics import psnr_y
from ..model.networks import MODELS, SCALES, FinalActivation, build_model
from ..model.weights import load_model, save_weights
from .loop import (LoopState, checkpoint, continue_stream, distributed_rank, end_distributed, final_validation,
                   machine_name, resolve_device, restore, run_loop)
from ..store import PROJECT_ROOT

log = logging.getLogger(__name__)

# Where the training and validation images are in this project's set-up: the shared data sets beside the checkout
# (found from the project, not the working directory); a clone without them gives its own folders.
SHARED_DATA = PROJECT_ROOT.parent / "shared" / "data"


def default_training_dirs() -> list[str]:
    """The training folders when none are given: $SR_TRAIN_DIRS (os.pathsep-separated), else T91 and BSD200 of
    SHARED_DATA (what the shipped models were trained on)."""
    if os.environ.get("SR_TRAIN_DIRS"):
        return os.environ["SR_TRAIN_DIRS"].split(os.pathsep)
    return [str(SHARED_DATA / name) for name in ("T91", "BSD200")]


def default_validation_dir() -> str | None:
    """Set5 of SHARED_DATA when it is there, else None (validation is optional)."""
    return str(SHARED_DATA / "Set5") if (SHARED_DATA / "Set5").is_dir() else None


def training_folders(folders: Sequence[str]) -> list[str]:
    """`folders`, each checked to exist.

    Raises:
        FileNotFoundError: a folder that is not there, with where training images can come from.
    """
    for folder in folders:
        if not Path(folder).is_dir():
            raise FileNotFoundError(f"no such image folder: {folder} (training needs folders of HR images: the CLI's "
                                    "--train-dirs, or SR_TRAIN_DIRS; the shipped models were trained on T91 and "
                                    "BSD200)")
    return list(folders)


@dataclass
class TrainConfig:
    """How to train one model; `asdict(config)` is stored in the weight file's metadata.

    Raises:
        ValueError: (on construction) unknown architecture or final activation, unsupported scale, a count
            below 1 or a non-positive max_lr; the message names the value.
    """

    arch: str = "xlsr"
    final_activation: str = "relu"
    scale: int = 3
    train_dirs: list[str] = field(default_factory=default_training_dirs)
    val_dir: str | None = field(default_factory=default_validation_dir)
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
    # LR images of training and validation: "clean" (bicubic), "strong", or "blur=..,noise=..,jpeg=.." (sr.data)
    degradation: str = "clean"

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
        self.degradation = Degradation.parse(self.degradation).spec()  # canonical text: JSON-safe metadata

    @property
    def checkpoint_path(self) -> Path:
        """Where the resumable checkpoint is kept.

        Returns:
            `out` with the suffix `.ckpt.pt`, beside the weights.
        """
        return Path(self.out).with_suffix(".ckpt.pt")


@dataclass
class TrainResult:
    """What `train`/`distill` return (on rank 0; other ranks get their own step count and an empty history)."""

    weights: Path
    steps: int
    wall_seconds: float
    best_val_psnr: float | None
    history: list[dict]  # [{"step", "loss", "val_psnr"?}]


def warmup_fraction(steps: int) -> float:
    """The one-cycle warm-up share: 10 %, but at least two steps when there are three or more. torch's OneCycleLR
    divides by the warm-up's length in steps minus one, which is zero at exactly 10 steps with 10 %.

    Args:
        steps: the schedule's length.

    Returns:
        pct_start for OneCycleLR.
    """
    return max(0.1, 2.0 / steps) if steps >= 3 else 0.1


def charbonnier(prediction: torch.Tensor, target: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """Charbonnier loss sqrt((x - y)^2 + eps^2), a differentiable L1 (Lai et al., LapSRN, CVPR 2017).

    Args:
        prediction: any shape.
        target: the same shape.
        eps: the smoothing constant; the loss of identical tensors is `eps`.

    Returns:
        the mean over all elements, a 0-d tensor.
    """
    return torch.sqrt((prediction - target) ** 2 + eps * eps).mean()


class Validator:
    """Mean Y-PSNR (border shaved by `scale`) of a model over an image folder; images are degraded once."""

    def __init__(self, folder: str | os.PathLike, scale: int, degradation: Degradation | None = None):
        """Load and degrade every image of `folder`.

        Args:
            folder: HR images (uint8 RGB on disk).
            scale: the SR factor; also the border shaved before PSNR.
            degradation: of the LR images (None: clean bicubic), seeded by file name as `sr eval` does.

        Raises:
            FileNotFoundError: no such folder, or no image in it.
            ValueError: an image smaller than `scale` pixels on a side.
        """
        self.scale = scale
        self.pairs = [degrade(load_image(p), scale, degradation, p.name) for p in list_images(folder)]

    @torch.no_grad()
    def __call__(self, model: nn.Module, device: torch.device) -> float:
        """The mean Y-PSNR in dB of `model` (float32 NCHW RGB in [0, 1] in and out) over the folder.

        Args:
            model: the network; put in eval mode for the call, then back in its previous mode.
            device: where `model` lives.

        Returns:
            the mean PSNR in dB.
        """
        was_training = model.training
        model.eval()
        scores = []
        for hr, lr in self.pairs:
            sr = to_uint8(model(to_tensor(lr).to(device)))
            scores.append(psnr_y(sr, hr, shave=self.scale))
        model.train(was_training)
        return float(np.mean(scores))


@dataclass(kw_only=True)
class _Run(LoopState):
    """A training run in the shared loop (`sr.tune.loop`): the plain loss, or the distiller's."""

    distiller: "Distiller | None" = None

    def train_step(self) -> torch.Tensor:
        """One batch: forward, loss (the distiller's, teacher included, when distilling), backward, Adam and the
        schedule; returns the loss."""
        config, device, distiller = self.config, self.device, self.distiller
        lr, hr, *clean = self.sampler.batch(config.batch_size, with_clean=distiller is not None)
        lr, hr = lr.to(device, non_blocking=True), hr.to(device, non_blocking=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=config.amp and device.type == "cuda"):
            prediction = self.trainable(lr)
            if distiller is not None:
                loss = distiller.loss(self.trainable, lr, hr, clean[0].to(device, non_blocking=True), prediction,
                                      self.step)
        if distiller is None:
            loss = charbonnier(prediction.float(), hr)
        self.take_step(loss)
        return loss

    def learning_rate_hint(self) -> str:
        return f"lower max_lr (now {self.config.max_lr})"

    def own_state(self) -> dict:
        return {"model": self.model.state_dict(),
                "distiller": self.distiller.trainable_state() if self.distiller is not None else None}

    def load_own_state(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        if self.distiller is not None and state.get("distiller"):
            self.distiller.load_state_dict(state["distiller"], strict=False)


class Distiller(nn.Module):
    """What `fit` needs from a distillation (the modes live in `sr.tune.distill`): a frozen `teacher`, optional
    trainable parts (an adapter; they join the optimizer and the checkpoint, never the student's weight file),
    and the loss of one batch.

    Attributes:
        teacher: the frozen teacher (a torch module: the lab's network, or a user's graph through `sr.model.onnxtorch`).
        mode: the name recorded as `kd_mode` in the student's metadata.
        source: what the teacher was loaded from, recorded as `distilled_from`.
        scale: the teacher's scale (checked against the run's).
    """

    mode: str = "output"
    source: str | None = None
    scale: int | None = None  # the teacher's

    def attach(self, student: nn.Module) -> None:
        """Called once with the (unwrapped) student before training, e.g. to hook its features."""

    def loss(self, student: nn.Module, lr: torch.Tensor, hr: torch.Tensor, clean_lr: torch.Tensor,
             prediction: torch.Tensor, step: int) -> torch.Tensor:
        """The whole loss of one batch (ground truth term included).

        Args:
            student: the module to call for extra student passes (the DDP wrapper under torchrun).
            lr: the student's input, float32 Nx3xPxP in [0, 1] (degraded when the run degrades).
            hr: the ground truth, Nx3x(sP)x(sP).
            clean_lr: the same patches of the clean bicubic LR (the teacher's input).
            prediction: student(lr), already computed.
            step: the step about to be taken (0-based), to seed any random choice reproducibly.

        Returns:
            a 0-d tensor.
        """
        raise NotImplementedError

    def trainable_state(self) -> dict:
        """The state of the trainable parts (no teacher), for the checkpoint."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("teacher.")}


def train(config: TrainConfig, on_record: Callable[[dict], None] | None = None,
          should_stop: Callable[[], bool] | None = None) -> TrainResult:
    """Train `config.arch` from scratch (or resume) and write its weights to `config.out`.

    Args:
        config: the run.
        on_record: handed on rank 0 each measurement, {"step", "steps", "loss", "val_psnr"?}, every 50 steps and at each
            validation.
        should_stop: polled before every step; True ends training early (the weights so far are saved).

    Returns:
        the TrainResult.

    Raises:
        FileNotFoundError: a training or validation folder is missing or holds no image, or `config.init`
            names no model.
        ValueError: no training image is large enough for the patches, or `config.init` is not a weight file
            of the same architecture.
        FloatingPointError: the loss became NaN or infinite (lower max_lr).
    """
    return fit(config, distiller=None, on_record=on_record, should_stop=should_stop)


def fit(config: TrainConfig, distiller: Distiller | None = None,
        on_record: Callable[[dict], None] | None = None,
        should_stop: Callable[[], bool] | None = None) -> TrainResult:
    """Training and distillation (`train`, `sr.tune.distill.distill`) on the loop QAT shares (`sr.tune.loop.run_loop`).

    loss = L(student(LR), HR), L = Charbonnier, or the distiller's loss (its teacher frozen and run on the
    fly). With `config.resume`, a run continues from `<out>.ckpt.pt` and ends with the same weights as the
    same run without the interruption (on the same device and thread count).

    Args:
        config: the run.
        distiller: None for plain training, or a `Distiller` (`sr.tune.distill`) whose teacher has the same scale.
        on_record: handed on rank 0 each measurement, {"step", "steps", "loss", "val_psnr"?}.
        should_stop: polled before every step; True ends training early (the weights so far are saved).

    Returns:
        the TrainResult.

    Raises:
        ValueError: the teacher's scale differs from `config.scale`; see `train` for the others.
        FileNotFoundError: see `train`.
        FloatingPointError: the loss became NaN or infinite.
    """
    run = _setup(config, distiller)
    restore(run)
    _setup_data(run)
    run_loop(run, Path(config.out).stem, on_record, should_stop)
    return _finish(run)


def _setup(config: TrainConfig, distiller: Distiller | None) -> _Run:
    """Process group, device, the model (seeded, or from `config.init`), the distiller, Adam and the schedule."""
    rank, world = distributed_rank()
    device = resolve_device(config.device)
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
    parameters = list(model.parameters())
    if distiller is not None:
        if distiller.scale != config.scale:
            raise ValueError(f"the teacher is x{distiller.scale} but the student is x{config.scale}")
        distiller.teacher.eval().requires_grad_(False)
        distiller.to(device).attach(model)
        parameters += [p for p in distiller.parameters() if p.requires_grad]  # the adapter, if any
    optimizer = torch.optim.Adam(parameters, lr=config.max_lr)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.max_lr, total_steps=config.steps,
                                                    pct_start=warmup_fraction(config.steps))
    return _Run(config=config, rank=rank, world=world, device=device, model=model, trainable=model,
                distiller=distiller, optimizer=optimizer, scheduler=scheduler)


def _setup_data(run: _Run) -> None:
    """The patch sampler (its random stream restored on resume) and, on rank 0, the validator."""
    config = run.config
    degradation = Degradation.parse(config.degradation)
    run.sampler = PatchSampler(training_folders(config.train_dirs), config.scale, config.lr_patch, seed=config.seed,
                               degradation=None if degradation.is_clean else degradation)
    continue_stream(run)
    run.validator = (Validator(config.val_dir, config.scale, None if degradation.is_clean else degradation)
                     if config.val_dir and run.rank == 0 else None)


def _finish(run: _Run) -> TrainResult:
    """Final validation, checkpoint and weight file (rank 0), then leave the process group."""
    step, config = run.step, run.config
    wall = run.wall_seconds()
    final_validation(run)
    result = TrainResult(weights=Path(config.out), steps=step, wall_seconds=wall, history=run.history,
                         best_val_psnr=max((h["val_psnr"] for h in run.history if "val_psnr" in h), default=None))
    checkpoint(run, wall)
    if run.rank == 0:
        distiller = run.distiller
        save_weights(run.model, config.out, extra={
            "train": asdict(config), "steps": step, "wall_seconds": round(wall, 1),
            "machine": machine_name(run.device), "history": run.history,
            "distilled_from": distiller.source if distiller is not None else None,
            "kd_mode": distiller.mode if distiller is not None else None,
        })
    if run.world > 1:
        end_distributed(run)
    return result


