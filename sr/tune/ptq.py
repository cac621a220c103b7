"""Post-training refinements beyond choosing each tensor's range from its histogram, run on the same fake-quantized
graph as QAT (`sr.tune.fakequant.FakeQuantModel`, the written QDQ model in PyTorch), with no training data beyond the
calibration patches:

- `centred-io`: the model's centred-I/O version (`sr.tune.transforms`): input and output exactly on the INT8 grid.
- `equalize`: channel equalization (`sr.tune.transforms.equalize_channels`): per-channel scales moved between
  consecutive Convs so that a per-tensor range serves the small channels of a tensor as well as its large ones.
- `range-search`: each activation step size, in graph order, chosen among 0.5x..2x the calibrated one (and
  that one) to minimise the mean squared error of the network's output against FP32 on the calibration patches,
  with every other tensor quantized: the error where it matters, at the output, rather than each tensor's own.
- `adaround`: AdaRound (Nagel et al., ICML 2020): each Conv's weights, in graph order, learn whether to round
  up or down. W = s * clip(floor(W / s) + h(V)), h a rectified sigmoid, V trained with Adam to minimise the error
  of that Conv's output (its input taken from the quantized network, its target from FP32) plus a regulariser
  sum(1 - |2h - 1|^beta) that pushes h to 0 or 1 as beta falls from 20 to 2. The weight with the channel's
  largest magnitude keeps its nearest rounding, so the writer's per-channel step (max |w| / 127) stays the same.
- `bias-correction`: empirical bias correction (Nagel et al., ICCV 2019, "Data-Free Quantization"): for each
  Conv in graph order, the mean over the calibration patches of (quantized network's output - FP32 output) of
  that Conv, per channel, is subtracted from its bias.

The result is a model file like a QAT result (`sr.tune.fakequant.export_trained`: weights plus the chosen ranges in its
`qat` metadata, `kind: "ptq"`), cached by everything that makes it, so `eval`/`calibrate`/the app can ask for it
by options.

Example:
    >>> path = refine(RefineConfig("xlsr-clip", ["centred-io", "adaround", "bias-correction"]))
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import torch

from ..quant.calibdata import images_digest, load_calibration_images
from ..quant.calibrate import CalibrationConfig
from ..model.models import TuningRecord, model_info
from ..model.onnxtorch import OnnxModule
from .fakequant import FakeQuantModel, export_trained, fake_quantized, qdq_path_for
from .transforms import calibration_batch, equalizable_pairs, prepare, remove_starting_points
from ..quant.qdq import spec_of
from ..quant.quantspec import Scheme
from ..run.quantize import fp32_onnx_path
from ..quant.recipe import QuantRecipe, Refinement, RefineSettings
from ..progress import logged_progress
from ..store import cache_root, file_sha256, locked

log = logging.getLogger(__name__)


class RefineStopped(RuntimeError):
    """A refinement did not fit in the time it was given (said before it started when its measured estimate is
    over, or when the time ran out part way); nothing was written."""


@dataclass
class RefineConfig:
    """Which refinements, on which model and calibration (`recipe` is the same as a `QuantRecipe`).

    Raises:
        ValueError: (on construction) an unknown refinement or scheme, or a count below 1.
    """

    model: str
    refinements: list[Refinement | str] = field(default_factory=lambda: list(Refinement))
    calibration: CalibrationConfig = field(default_factory=lambda: CalibrationConfig(method="mse"))
    scheme: Scheme | str = Scheme.TENSORRT
    # how they measure and train: `RefineSettings`, whose defaults these are
    patches: int = RefineSettings.patches
    patch_size: int = RefineSettings.patch_size
    adaround_steps: int = RefineSettings.adaround_steps
    equalize: float = RefineSettings.equalize
    seed: int = RefineSettings.seed

    def __post_init__(self):
        recipe = self.recipe  # checks everything
        self.refinements, self.scheme = recipe.refinements, recipe.scheme

    @property
    def recipe(self) -> QuantRecipe:
        """The recipe these refinements are part of."""
        return QuantRecipe(self.calibration, self.scheme, refinements=list(self.refinements),
                           refine=RefineSettings(self.patches, self.patch_size, self.adaround_steps, self.equalize,
                                                 self.seed))

    def key(self, weights_hash: str) -> str:
        """The cache key of the refined model: `QuantRecipe.key`, which covers the calibration images by their
        pixels and the code of every module the refined model passes through."""
        images = load_calibration_images(self.calibration.data)
        return self.recipe.key(weights_hash, images_digest(images), 16)


def refine(config: RefineConfig, cache_dir: Path | None = None,
           progress: Callable[[float, str], None] | None = None,
           seconds_left: Callable[[], float] | None = None) -> Path:
    """The refined model's file (made once, then read from the cache).

    Args:
        config: the refinements.
        cache_dir: the cache folder (default: `sr.store.cache_root()`).
        progress: called with (fraction done, message).
        seconds_left: the time the refinements may still take (None: no limit): the whole list's least time
            (`refinements_estimate`) is checked before any of it runs, and AdaRound stops at a Conv when the
            rest would not fit.

    Returns:
        the path of a weight file (`.safetensors`) or, for an ONNX model, an `.onnx` file; pass it wherever a
        model name goes. Its `qat` record names the original model (`base`), which `eval` compares against.

    Raises:
        FileNotFoundError: unknown model or calibration folder.
        ValueError: see RefineConfig; an ONNX model with ops the interpreter does not cover.
        RefineStopped: `seconds_left` too short (the list's estimate, AdaRound's, or at AdaRound's next Conv).
    """
    info = model_info(config.model)
    out = cache_root(cache_dir) / "refined" / f"{info.name.replace(':', '-')}-{config.key(file_sha256(info.path))}" \
        f"{info.tuned_suffix}"
    with locked(out):
        if out.is_file():
            return out
        _refine_into(config, out, progress or logged_progress(f"refining {info.name}"), seconds_left)
    return out


def _refine_into(config: RefineConfig, out: Path, progress: Callable[[float, str], None],
                 seconds_left: Callable[[], float] | None = None) -> None:
    scale = model_info(config.model).scale
    x = calibration_batch(config.calibration, scale, config.patches, config.patch_size, config.seed)
    if seconds_left is not None:  # the whole list's least time, from one timed pass, before any of it runs
        needed, left = refinements_estimate(config, x), seconds_left()
        if needed > left:
            raise RefineStopped(f"{', '.join(r.value for r in config.refinements)} would take at least {needed:.0f} s "
                                f"here (from one measured pass of the model), more than the {max(0.0, left):.0f} s "
                                "left")
    strength = config.equalize if Refinement.EQUALIZE in config.refinements else 0.0
    structure, fixes = prepare(config.model, Refinement.CENTRED_IO in config.refinements, strength, x,
                               out.with_name(out.stem), config.scheme)
    student, calibrated = fake_quantized(structure, config.calibration, config.scheme.value, fixes)
    student.eval()
    for parameter in student.parameters():
        parameter.requires_grad_(False)
    reference = OnnxModule(student.fp32).eval().requires_grad_(False)  # the same function as the original model
    with torch.no_grad():
        target = reference(x)
    # each step is given a `report(done, total)` for its own progress (AdaRound: Conv by Conv)
    steps = {Refinement.RANGE_SEARCH: lambda report: search_ranges(student, x, target, student.frozen_groups),
             Refinement.ADAROUND: lambda report: adaround(student, reference, x, config.adaround_steps, progress=report,
                                                          seconds_left=seconds_left),
             Refinement.BIAS_CORRECTION: lambda report: correct_biases(student, reference, x)}
    before = _output_mse(student, x, target)
    for index, refinement in enumerate(r for r in config.refinements if r in steps):
        progress(index / len(config.refinements), f"{refinement.value}")
        steps[refinement](lambda done, total, i=index, name=refinement.value: progress(
            (i + done / max(1, total)) / len(config.refinements), f"{name}: Conv {done + 1} of {total}"))
        log.info("%s: output MSE vs FP32 %.3g -> %.3g", refinement.value, before, _output_mse(student, x, target))
    record = TuningRecord("ptq", config.scheme.value, student.ranges(), str(config.model), json.loads(json.dumps({
        "refinements": [r.value for r in config.refinements], "base_sha256": file_sha256(model_info(config.model).path),
        "calibration": asdict(config.calibration), "patches": config.patches}, default=str)))
    export_trained(structure, calibrated.fp32_onnx, student.weights(), record, out,
                   qdq_path_for(out, config.scheme.value), calibrated.ranges)
    remove_starting_points(out.with_name(out.stem))


def refinements_estimate(config: RefineConfig, x: torch.Tensor) -> float:
    """The least time a list of refinements takes on `x`, in passes of the FP32 network timed once: equalization
    one per Conv pair it balances, bias correction two per Conv, AdaRound its `adaround_estimate` passes, the
    range search one per candidate step of each tensor; the fake quantizers only add to it."""
    graph = onnx.load(str(fp32_onnx_path(config.model)))
    network = OnnxModule(graph).eval().requires_grad_(False)
    with torch.no_grad():
        started = time.perf_counter()
        network(x)
        one = time.perf_counter() - started
    convs = sum(node.op_type == "Conv" for node in graph.graph.node)
    passes = {Refinement.EQUALIZE: len(equalizable_pairs(graph)), Refinement.BIAS_CORRECTION: 2 * convs,
              Refinement.ADAROUND: 2 * convs + config.adaround_steps / 5,
              Refinement.RANGE_SEARCH: 26 * len(spec_of(graph, config.scheme).activations)}
    return one * sum(passes.get(r, 0) for r in config.refinements)


def adaround_estimate(student: FakeQuantModel, x: torch.Tensor, convs: int, steps: int) -> float:
    """The least time AdaRound takes on `x`, from one timed pass of the fake-quantized network: per Conv, two
    passes for its input and target, then `steps` forward and backward passes of that Conv alone, at least a
    fifth of one pass each over all Convs (measured here: 0.19 on the teacher, 0.55 on an XLSR, whose passes are
    mostly the fake quantizers'): (2 x convs + steps / 5) passes."""
    with torch.no_grad():
        started = time.perf_counter()
        student(x)
        one = time.perf_counter() - started
    return one * (2 * convs + steps / 5)


@torch.no_grad()
def _output_mse(student: FakeQuantModel, x: torch.Tensor, target: torch.Tensor) -> float:
    return float(((student(x) - target) ** 2).mean())


@torch.no_grad()
def search_ranges(student: FakeQuantModel, x: torch.Tensor, target: torch.Tensor, frozen: set[str],
                  factors: np.ndarray = np.geomspace(0.5, 2.0, 25)) -> dict[str, float]:
    """Greedy output-error range search (see the module docstring); changes `student`'s step sizes.

    Returns:
        {group: chosen factor of its starting step size}.
    """
    chosen = {}
    for group in student.groups:
        if group in frozen:
            continue
        start = student.scale(group)
        errors = []
        for factor in [1.0, *factors]:
            student.set_scale(group, start * factor)
            errors.append((_output_mse(student, x, target), factor))
        best = min(errors)[1]
        student.set_scale(group, start * best)
        chosen[group] = best
    return chosen


def _conv_nodes(student: FakeQuantModel):
    """The Conv nodes of the fake-quantized graph whose weight is fake-quantized, in graph order."""
    producers = {n.output[0]: n for n in student.network.nodes}
    for node in student.network.nodes:
        weight = producers.get(node.input[1]) if len(node.input) > 1 else None
        if node.op_type == "Conv" and weight is not None and weight.op_type == "FakeQuantWeight":
            yield node, weight.input[0], (node.input[2] if len(node.input) > 2 else "")


@torch.no_grad()
def correct_biases(student: FakeQuantModel, reference: OnnxModule, x: torch.Tensor) -> None:
    """Empirical bias correction (see the module docstring); changes `student`'s biases."""
    biases = {**student.network.named_onnx_parameters()}
    for node, _, bias in _conv_nodes(student):
        if bias not in biases:
            continue
        _, got = student(x, keep={node.output[0]})
        _, want = reference(x, keep={node.output[0]})
        biases[bias] -= (got[node.output[0]] - want[node.output[0]]).mean(dim=(0, 2, 3))


_ZETA, _GAMMA = 1.1, -0.1  # AdaRound's rectified-sigmoid stretch


def _soft_rounding(v: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.sigmoid(v) * (_ZETA - _GAMMA) + _GAMMA, 0.0, 1.0)


def adaround(student: FakeQuantModel, reference: OnnxModule, x: torch.Tensor, steps: int = 300,
             regulariser: float = 0.1, seed: int = 0, progress: Callable[[int, int], None] | None = None,
             seconds_left: Callable[[], float] | None = None) -> None:
    """AdaRound (see the module docstring), Conv by Conv in graph order; changes `student`'s weights to values
    on their INT8 grid. `progress(done, total)` is called before each Conv (a long refinement says where it is).

    Raises:
        RefineStopped: `seconds_left` is under the estimate (`adaround_estimate`) before the first Conv, or
            reaches 0 before a later one (`student` then holds some rounded Convs: discard it).
    """
    torch.manual_seed(seed)
    weights = student.network.named_onnx_parameters()
    convs = list(_conv_nodes(student))
    if seconds_left is not None:
        needed, left = adaround_estimate(student, x, len(convs), steps), seconds_left()
        if needed > left:
            raise RefineStopped(f"AdaRound would take at least {needed:.0f} s here ({len(convs)} Convs, {steps} steps "
                                f"each, from one measured pass), more than the {max(0.0, left):.0f} s left")
    sizes, started = [weights[name].numel() for _, name, _ in convs], time.perf_counter()
    for index, (node, name, bias) in enumerate(convs):
        if seconds_left is not None and index:  # the rest, projected from the Convs done (by their weights' size)
            rest = (time.perf_counter() - started) / sum(sizes[:index]) * sum(sizes[index:])
            if rest > seconds_left():
                raise RefineStopped(f"AdaRound stopped at Conv {index + 1} of {len(convs)}: the rest would take "
                                    f"about {rest:.0f} s, more than the {max(0.0, seconds_left()):.0f} s left")
        if progress is not None:
            progress(index, len(convs))
        with torch.no_grad():
            _, got = student(x, keep={node.input[0]})
            _, want = reference(x, keep={node.output[0]})
        inputs, target = got[node.input[0]], want[node.output[0]]
        weight = weights[name]
        scale = (weight.detach().abs().amax(dim=(1, 2, 3), keepdim=True) / 127.0).clamp_min(1e-12)
        floor = torch.floor(weight.detach() / scale)
        rest = (weight.detach() / scale - floor).clamp(0.01, 0.99)
        v = torch.nn.Parameter(-torch.log((_ZETA - _GAMMA) / (rest - _GAMMA) - 1))  # h(v) = rest at the start
        b = weights.get(bias)
        conv = student.network.ops["Conv"]
        nearest = scale * torch.clamp(torch.round(weight.detach() / scale), -127, 127)
        with torch.no_grad():
            start = float(((conv(None, node, [inputs, nearest, b])[0] - target) ** 2).mean()) + 1e-20
        optimizer = torch.optim.Adam([v], lr=1e-2)
        for step in range(steps):
            soft = scale * torch.clamp(floor + _soft_rounding(v), -127, 127)
            error = ((conv(None, node, [inputs, soft, b])[0] - target) ** 2).mean() / start
            loss = error
            if step >= steps // 5:  # AdaRound's warm-up without the regulariser, then beta from 20 down to 2
                beta = 20 - (20 - 2) * (step - steps // 5) / max(1, steps - steps // 5 - 1)
                loss = error + regulariser * (1 - (2 * _soft_rounding(v) - 1).abs().pow(beta)).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            hard = floor + (_soft_rounding(v) >= 0.5).float()
            largest = weight.abs().flatten(1).argmax(dim=1)  # keep each channel's largest weight, and so its step
            flat = hard.flatten(1)
            flat[torch.arange(flat.shape[0]), largest] = torch.round(weight / scale).flatten(1)[
                torch.arange(flat.shape[0]), largest]
            weight.copy_(scale * torch.clamp(flat.view_as(weight), -127, 127))


