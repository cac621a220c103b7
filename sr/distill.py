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
    teacher: str = "teacher"  # a shipped model name or a weight file
    alpha: float = 0.5  # weight of the ground-truth term; 1 - alpha goes to the teacher's output

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")


def distill(config: DistillConfig, on_progress: Callable[[dict], None] | None = None,
            should_stop: Callable[[], bool] | None = None) -> TrainResult:
    """Train `config.arch` with the frozen `config.teacher`; writes the student to `config.out`."""
    teacher = load_model(config.teacher)
    teacher.source = str(config.teacher)
    return fit(config, teacher=teacher, alpha=config.alpha, on_progress=on_progress, should_stop=should_stop)
