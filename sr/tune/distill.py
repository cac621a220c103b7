"""Knowledge distillation: a small student learns from the ground truth and from a frozen teacher, in one of
three modes (`KDMode`).

All modes share the ground-truth term alpha * L(student(x), HR), with L the Charbonnier loss and x the
student's LR patch; the teacher is frozen and run on the fly. When training degrades the LR images
(`TrainConfig.degradation`), the teacher, which was trained on clean bicubic inputs, is shown the *clean* LR
of the same patch (x_clean) and the student the degraded one: the teacher's labels stay what it is good at.

- `output` (Hinton et al. 2015, applied to SR as output distillation; the pairing of a large "original" model
  with the small quantization-robust one is XLSR's story, Ayazoglu, CVPRW 2021):
      alpha * L(S(x), HR) + (1 - alpha) * L(S(x), T(x_clean)).

- `upcycled`: Data Upcycling Knowledge Distillation (DUKD; Zhang et al., "Data Upcycling Knowledge
  Distillation for Image Super-Resolution", ECCV 2024). The teacher's knowledge is read off more inputs than
  the training pairs provide, inputs made from the training data itself, where no ground truth exists but the
  teacher's output is a label. Implemented here, per step, on the first half of the batch (to bound the extra
  teacher passes):
    * zoom-in: a random P x P crop of the HR patch, taken as an LR input (the HR pixels are a "closer look"
      at the scene); the student matches T(crop) at sP x sP;
    * zoom-out: the clean LR patch downscaled once more by 2 (antialiased bicubic), matched to T(that);
    * label consistency: a random non-identity flip/rotation g of the batch (one g a step);
      g^-1(S(g(x))) is matched to T(x_clean), which holds the student to the teacher under the invertible
      transforms (DUKD's label-consistency regulariser, with the teacher's output as the anchor).
  Loss: alpha * L(S(x), HR) + (1 - alpha) * mean(L_output, L_zoom_in, L_zoom_out, L_consistency), i.e. the same
  total teacher weight as `output`, spread over the upcycled inputs. Not implemented: DUKD's mixing of
  upcycled and original samples into one batch and its random choice among more augmentations (colour
  jitter, mixup-style ones are not invertible and are left out on purpose). With a degradation, the zoomed
  inputs are made from clean data and shown to both networks, so the student also trains on clean inputs;
  degrading them as the training LR is left undone (the card measures what that costs on degraded inputs).

- `feature`: feature distillation on matched intermediate tensors, FitNets' hint loss (Romero et al., ICLR
  2015) as SR work uses it (FAKD, He et al., ICIP 2020; LSFD, Yin et al., 2023, use features of the body).
  The tensors are the inputs of each network's `tail` (the last 3x3 convolution before depth-to-space): for
  XLSR the fused 32-channel features after its GBlocks, skip branch and 1x1 fusion; for the teacher the
  64-channel body output plus its long skip. A 1x1 convolution (the adapter, 32 -> 64, trained with the
  student, initialised by ridge regression on the first batch so the hint starts from the best linear match and
  does not first pull the student towards a random projection; never saved in the student's file) maps the
  student's features to the teacher's width. Hint = mean((A(f_S) - f_T)^2) / mean(f_T^2) (relative, so its
  weight does not depend on the teacher's feature scale). Loss: the `output` loss + feature_weight * hint.
  FAKD's spatial-affinity matrices are not implemented (the direct hint with an adapter is).

Example:
    >>> from sr.tune.distill import DistillConfig, distill
    >>> distill(DistillConfig(arch="xlsr", final_activation="clipped_relu", teacher="teacher", kd_mode="feature",
    ...                       out="runs/xlsr-clip-kd.safetensors"))
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..choices import Choice
from ..model.models import model_info
from .train import Distiller, TrainConfig, TrainResult, charbonnier, fit


class KDMode(Choice, noun="distillation mode"):
    """The distillation modes (see the module docstring for the papers)."""

    OUTPUT = "output"
    UPCYCLED = "upcycled"
    FEATURE = "feature"


@dataclass
class DistillConfig(TrainConfig):
    """A TrainConfig plus the teacher, the mode and the loss weighting.

    Raises:
        ValueError: (on construction) `alpha` outside [0, 1], an unknown `kd_mode`, a negative
            `feature_weight`, or any TrainConfig error.
    """

    teacher: str = "teacher"  # a shipped model name or a weight file
    alpha: float = 0.5  # weight of the ground-truth term; 1 - alpha goes to the teacher's output(s)
    kd_mode: KDMode = KDMode.OUTPUT  # output, upcycled or feature
    feature_weight: float = 0.1  # `feature` mode: weight of the relative feature hint (not tuned)

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
        self.kd_mode = KDMode.parse(self.kd_mode)  # a str enum: asdict() goes into the metadata as its value
        if self.feature_weight < 0:
            raise ValueError(f"feature_weight must be >= 0, got {self.feature_weight}")


class OutputKD(Distiller):
    """`output` mode: alpha * L(S(x), HR) + (1 - alpha) * L(S(x), T(x_clean))."""

    mode = KDMode.OUTPUT.value

    def __init__(self, teacher: nn.Module, alpha: float):
        """Keep the frozen teacher and the ground-truth weight."""
        super().__init__()
        self.teacher, self.alpha = teacher, alpha

    def _label(self, lr: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.teacher(lr).float()

    def loss(self, student, lr, hr, clean_lr, prediction, step):
        """See `Distiller.loss`."""
        return self._output_loss(prediction, hr, self._label(clean_lr))

    def _output_loss(self, prediction, hr, target) -> torch.Tensor:
        prediction = prediction.float()
        return self.alpha * charbonnier(prediction, hr) + (1.0 - self.alpha) * charbonnier(prediction, target)


def _dihedral(batch: torch.Tensor, transform: int, inverse: bool = False) -> torch.Tensor:
    """One of the 8 symmetries of the square on NCHW (0-3 quarter turns, +4 with a horizontal flip), or its
    inverse."""
    turns, flip = transform % 4, transform >= 4
    if inverse:
        batch = batch.flip(-1) if flip else batch
        return torch.rot90(batch, -turns, dims=(-2, -1))
    batch = torch.rot90(batch, turns, dims=(-2, -1))
    return batch.flip(-1) if flip else batch


class UpcycledKD(OutputKD):
    """`upcycled` mode (DUKD): zoom-in, zoom-out and label-consistency terms beside the output term."""

    mode = KDMode.UPCYCLED.value

    def __init__(self, teacher: nn.Module, alpha: float, seed: int):
        """Keep the frozen teacher, the ground-truth weight and the seed of the crops and transforms."""
        super().__init__(teacher, alpha)
        self.seed = seed

    def loss(self, student, lr, hr, clean_lr, prediction, step):
        """See `Distiller.loss`; random choices are seeded by (seed, step), so a resumed run repeats them."""
        rng = np.random.default_rng([self.seed, step, 15])
        terms = upcycled_terms(student, self._label, lr, hr, clean_lr, prediction, self._label(clean_lr), rng,
                               lambda a, b: charbonnier(a.float(), b))
        return self.alpha * charbonnier(prediction.float(), hr) + (1.0 - self.alpha) * torch.stack(terms).mean()


def upcycled_terms(student, label, lr: torch.Tensor, hr: torch.Tensor, clean_lr: torch.Tensor,
                   prediction: torch.Tensor, target: torch.Tensor, rng: np.random.Generator, distance) -> list:
    """The one definition of upcycled distillation (DUKD), used by distillation and by QAT's teacher term: the
    student against the teacher on the training patch, on a crop of the HR patch taken as an LR input (zoom-in),
    on the LR patch downscaled by 2 (zoom-out), and on a flipped or rotated LR patch turned back (label
    consistency); each extra term on half the batch.

    Args:
        student: the network being trained (called on the extra inputs).
        label: the frozen teacher's output for an input (no gradient).
        lr, hr, clean_lr: the training pair (`clean_lr`: before any degradation; the zoom-out is made from it).
        prediction, target: the student's and the teacher's outputs on `lr`.
        rng: the run's generator for this step (the crop and the transform).
        distance: the loop's own loss between an output and its label (Charbonnier, or L1 in QAT).

    Returns:
        the four terms, for the caller to weigh.
    """
    half, size = max(1, lr.shape[0] // 2), lr.shape[-1]
    y, x = (int(v) for v in rng.integers(0, hr.shape[-1] - size + 1, size=2))
    zoom_in = hr[:half, :, y : y + size, x : x + size].contiguous()
    zoom_out = F.interpolate(clean_lr[:half], size=(max(4, size // 2),) * 2, mode="bicubic",
                             antialias=True, align_corners=False).clamp(0.0, 1.0)
    transform = int(rng.integers(1, 8))
    consistent = _dihedral(student(_dihedral(lr[:half], transform)), transform, inverse=True)
    return [distance(prediction, target), distance(student(zoom_in), label(zoom_in)),
            distance(student(zoom_out), label(zoom_out)), distance(consistent, target[:half])]


class FeatureKD(OutputKD):
    """`feature` mode: the output loss plus a relative hint loss between the tails' inputs, through a 1x1 adapter."""

    mode = KDMode.FEATURE.value

    def __init__(self, teacher: nn.Module, alpha: float, weight: float):
        """Hook the teacher's tail input; the adapter is built by `attach`, when the student's width is known."""
        super().__init__(teacher, alpha)
        if not isinstance(getattr(teacher, "tail", None), nn.Conv2d):
            raise ValueError("feature distillation reads the teacher's features where its tail convolution starts, "
                             "inside the lab's architectures; with this teacher use the output or upcycled mode")
        self.weight = weight
        self.adapter: nn.Conv2d | None = None
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))  # least-squares init done
        self._features: dict[str, torch.Tensor] = {}
        teacher.tail.register_forward_pre_hook(self._keeper("teacher"))

    def _keeper(self, key: str):
        def keep(module, inputs):
            self._features[key] = inputs[0]
        return keep

    def attach(self, student: nn.Module) -> None:
        """Build the adapter (student tail input channels -> the teacher's) and hook the student's tail input
        (called once by `fit`, before the optimizer is made)."""
        device = next(student.parameters()).device
        self.adapter = nn.Conv2d(student.tail.in_channels, self.teacher.tail.in_channels, 1).to(device)
        student.tail.register_forward_pre_hook(self._keeper("student"))

    @torch.no_grad()
    def _fit_adapter(self, student_features: torch.Tensor, teacher_features: torch.Tensor) -> None:
        """Ridge regression (least squares with a small damping, 1e-3 of the mean feature energy: dead ReLU
        channels make the plain problem rank-deficient) from student to teacher features over the batch's
        pixels, with a bias; solved in float64 on the CPU through the normal equations."""
        inputs = student_features.detach().double().cpu().permute(0, 2, 3, 1).reshape(-1, student_features.shape[1])
        inputs = torch.cat([inputs, torch.ones_like(inputs[:, :1])], dim=1)
        targets = teacher_features.detach().double().cpu().permute(0, 2, 3, 1).reshape(-1, teacher_features.shape[1])
        gram = inputs.T @ inputs
        damping = 1e-3 * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=gram.dtype)
        solution = torch.linalg.solve(gram + damping, inputs.T @ targets).float().to(self.adapter.weight.device)
        self.adapter.weight.copy_(solution[:-1].T.reshape_as(self.adapter.weight))
        self.adapter.bias.copy_(solution[-1])
        self.fitted.fill_(True)

    def loss(self, student, lr, hr, clean_lr, prediction, step):
        """See `Distiller.loss`; `prediction` was computed with the student's hook in place."""
        student_features = self._features.pop("student")
        target = self._label(clean_lr)
        teacher_features = self._features.pop("teacher").float()
        if not bool(self.fitted):
            self._fit_adapter(student_features, teacher_features)
        hint = ((self.adapter(student_features.float()) - teacher_features) ** 2).mean()
        hint = hint / teacher_features.pow(2).mean().clamp_min(1e-8)
        return self._output_loss(prediction, hr, target) + self.weight * hint


def make_distiller(config: DistillConfig, teacher: nn.Module) -> Distiller:
    """The Distiller of `config.kd_mode` around a loaded teacher.

    Args:
        config: the run (alpha, mode, feature weight, seed).
        teacher: the frozen teacher.

    Returns:
        an OutputKD, UpcycledKD or FeatureKD.
    """
    mode = KDMode.parse(config.kd_mode)
    if mode is KDMode.UPCYCLED:
        return UpcycledKD(teacher, config.alpha, config.seed)
    if mode is KDMode.FEATURE:
        return FeatureKD(teacher, config.alpha, config.feature_weight)
    return OutputKD(teacher, config.alpha)


def distill(config: DistillConfig, on_record: Callable[[dict], None] | None = None,
            should_stop: Callable[[], bool] | None = None) -> TrainResult:
    """Train `config.arch` with the frozen `config.teacher` in `config.kd_mode`; writes the student to `config.out`.

    Args:
        config: the run; `config.teacher` is recorded as `distilled_from` and the mode as `kd_mode` in the
            student's metadata (the adapter of the feature mode is not saved).
        on_record: as in `sr.tune.train.train`.
        should_stop: as in `sr.tune.train.train`.

    Returns:
        the TrainResult.

    Raises:
        FileNotFoundError: no such teacher, or a missing data folder.
        ValueError: the teacher's scale differs from `config.scale`, or the feature mode with a teacher that is
            not one of the lab's architectures (an ONNX model teaches through its outputs).
        FloatingPointError: the loss became NaN or infinite.
    """
    teacher = model_info(config.teacher)
    distiller = make_distiller(config, teacher.frozen_module())
    distiller.source, distiller.scale = str(config.teacher), teacher.scale
    return fit(config, distiller=distiller, on_record=on_record, should_stop=should_stop)
