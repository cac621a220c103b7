"""Knowledge distillation: a small student learns from the ground truth and from a frozen teacher.

loss = alpha * L(student, HR) + (1 - alpha) * L(student, teacher(LR)), with L the Charbonnier loss and the
teacher run on the fly on every batch (Hinton et al. 2015, applied to SR as output distillation; the
XLSR paper's story pairs a large "original" model with the small quantization-robust one).

Example:
    >>> from sr.distill import DistillConfig, distill
    >>> distill(DistillConfig(arch="xlsr", final_activation="clipped_relu", teacher="teacher",
    ...                       out="runs/xlsr-clip-kd.safetensors"))
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .models import load_model
from .train import TrainConfig, TrainResult, fit


@dataclass
class DistillConfig(TrainConfig):
    """A TrainConfig plus the teacher and the loss weighting.

    Raises:
        ValueError: (on construction) `alpha` outside [0, 1], or any TrainConfig error.
    """

    teacher: str = "teacher"  # a shipped model name or a weight file
    alpha: float = 0.5  # weight of the ground-truth term; 1 - alpha goes to the teacher's output

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")


def distill(config: DistillConfig, on_progress: Callable[[dict], None] | None = None,
            should_stop: Callable[[], bool] | None = None) -> TrainResult:
    """Train `config.arch` with the frozen `config.teacher`; writes the student to `config.out`.

    Args:
        config: the run; `config.teacher` is recorded as `distilled_from` in the student's metadata.
        on_progress: as in `sr.train.train`.
        should_stop: as in `sr.train.train`.

    Returns:
        the TrainResult.

    Raises:
        FileNotFoundError: no such teacher, or a missing data folder.
        ValueError: the teacher is not a weight file, or its scale differs from `config.scale`.
        FloatingPointError: the loss became NaN or infinite.
    """
    teacher = load_model(config.teacher)
    teacher.source = str(config.teacher)
    return fit(config, teacher=teacher, alpha=config.alpha, on_progress=on_progress, should_stop=should_stop)
