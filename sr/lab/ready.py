"""Make a model INT8-ready within a time budget: the cheapest route that reaches a target loss.

Every candidate is measured the same way: PSNR-Y against the ground truth on the given images (or the
calibration images), the original FP32 model minus the INT8 model, the INT8 model being the QDQ file the bundle
ships run by the reference engine (ONNX Runtime on the CPU). That is the loss `eval` reports against the original
(`int8_vs_reference_db`). The routes are tried in order of cost, and the first to meet the target ends the search:

1. **range methods**: each range search (entropy, percentile, mse, minmax) from one set of statistics;
2. **refinements** on the best method: centred I/O (the lab's architectures), channel equalization, bias
   correction, then AdaRound as well (`sr.tune.ptq`);
3. **mixed precision**: the fewest tensors left in float to reach the target. Tensors are ranked by what leaving
   each one alone in float recovers, then added in that order (what NNCF's accuracy-aware quantization and
   Polygraphy's precision bisect do by hand). Each one's CPU latency cost is measured;
4. **QAT** in the time left (`sr.tune.qat`), stopping once its validation on the same images meets the target
   (where the written INT8 model then misses it, training on from those weights to the target less that gap).

The best candidate (the first to meet the target, else the lowest loss) is written as the deployment bundle.

Example:
    >>> result = make_ready(ReadyConfig("xlsr-relu", data="path/to/Set5", target_db=0.05, budget_minutes=5))
    >>> result.loss_db, [step.route for step in result.steps]
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .bundle import export_bundle
from .latency import float_latencies
from ..quant.calibdata import ensure_calibration_images, load_calibration_images
from ..quant.calibrate import CalibrationConfig, Method
from ..quant.calibrated import CalibratedModel
from .compare import InputMode
from ..data import list_images
from .scorer import WHOLE_INT8_TARGETS, Scorer, TargetScore, eval_pairs, int8_target, target_score
from ..metrics import brightness_ratio, psnr_y
from ..model.models import model_info
from ..tune.ptq import RefineConfig, RefineStopped, refine
from ..tune.fakequant import original_model
from ..run.quantize import AUTO_CANDIDATES, calibrate_model
from ..quant.quantspec import Scheme
from ..quant.recipe import Fixes, Refinement
from ..run.runtime import EngineKind, engine_for
from ..store import cache_root, short_hash
from ..tune.train import default_training_dirs
from ..tune.transforms import centring_reason

RESERVE_SECONDS = 20.0  # kept back from QAT for its own export and the bundle
MIN_QAT_SECONDS = 45.0  # less time than this left: QAT is not started
# QAT's LR patch side here: 16 px steps take a third of the time of 32 px ones (xlsr-relu, 2 cores: 0.028 s
# against 0.085 s) and, in the same 60 s, reached 0.102 dB against 0.123 (scripts/qat_speed.py)
QAT_PATCH = 16


@dataclass
class ReadyConfig:
    """What to make INT8-ready, measured on which images, to what target, in how much time.

    Raises:
        ValueError: (on construction) a bad number; an unknown model or folder is found by `make_ready`.
    """

    model: str
    data: str | None = None  # ground-truth images to measure on (None: the calibration images)
    # the largest loss against the original FP32 model accepted: a loss at or below it meets it (the loss can be
    # negative: INT8 may score above FP32 on the truth; a negative target asks for that)
    target_db: float = 0.05
    budget_minutes: float = 10.0
    out: str | None = None  # the bundle folder (None: no bundle)
    calibration: CalibrationConfig = field(default_factory=lambda: CalibrationConfig(method=Method.AUTO))
    scheme: Scheme | str = Scheme.TENSORRT
    max_float: int = 8  # the most tensors mixed precision may leave in float
    max_images: int = 16  # the most images measured on
    train_dirs: list[str] | None = None  # QAT's training images (None: the lab's training folders, if present)
    qat: bool = True  # allow the QAT route
    # an INT8 target the chosen model is checked on as it runs it, and judged by (qnn-htp, litert, ...); a target
    # with no float path leaves the mixed-precision route out
    engine: str | None = None

    def __post_init__(self):
        self.scheme = Scheme.parse(self.scheme)
        if self.engine is not None:
            int8_target(self.engine, self.scheme)
        if not math.isfinite(self.target_db):
            raise ValueError(f"the target loss must be a finite number of dB, got {self.target_db}")
        if not (self.budget_minutes > 0 and math.isfinite(self.budget_minutes)):
            raise ValueError(f"the time budget must be more than 0 minutes, got {self.budget_minutes}")
        if self.max_float < 0 or self.max_images < 1:
            raise ValueError("max_float must be 0 or more and max_images 1 or more")


@dataclass
class Candidate:
    """One INT8 model tried, and its measured loss."""

    what: str
    model: str  # the model file quantized (the original, or a tuned copy)
    calibration: CalibrationConfig
    fixes: Fixes
    loss_db: float
    brightness: float
    calibrated: CalibratedModel = field(repr=False)
    at: float = 0.0  # seconds into the search when it was measured

    def to_json(self) -> dict:
        return {"what": self.what, "loss_db": round(self.loss_db, 4), "brightness": round(self.brightness, 4),
                "at_seconds": round(self.at, 1)}


@dataclass
class Step:
    """One route taken: what it tried, its best, and the seconds it took."""

    route: str
    tried: list[Candidate]
    seconds: float
    notes: list[str] = field(default_factory=list)
    best: Candidate | None = None
    # QAT: its validation loss (fake-quantized, on the measurement images) as it trained: {"seconds", "step",
    # "loss_db"}, seconds into the search
    validation: list[dict] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"route": self.route, "seconds": round(self.seconds, 1), "tried": [c.to_json() for c in self.tried],
                "best": None if self.best is None else self.best.what, "notes": self.notes,
                **({"validation": self.validation} if self.validation else {})}


@dataclass
class ReadyResult:
    """What `make_ready` did and what it chose."""

    model: str
    target_db: float
    measured_on: str
    fp32_psnr_db: float
    chosen: Candidate
    steps: list[Step]
    seconds: float
    float_tensors: list[dict]  # {"tensor", "latency_ms_added"} for the tensors left in float
    latency_ms: dict  # {"fp32", "int8_all", "chosen"} on the CPU reference engine
    bundle: Path | None = None
    target: TargetScore | None = None  # the chosen model as the target asked for runs it

    @property
    def loss_db(self) -> float:
        return self.chosen.loss_db

    @property
    def target_loss_db(self) -> float | None:
        """The loss against the original FP32 model as the target runs the chosen model (None: no target, or
        refused)."""
        ran = self.target is not None and self.target.psnr_y is not None
        return self.fp32_psnr_db - self.target.psnr_y if ran else None

    @property
    def met(self) -> bool:
        if self.target is not None:  # judged as the target runs it
            return self.target_loss_db is not None and self.target_loss_db <= self.target_db
        return self.chosen.loss_db <= self.target_db

    def curve(self) -> list[dict]:
        """The best loss reached so far against the seconds spent, one point per candidate measured."""
        points, best = [], math.inf
        for candidate in sorted((c for s in self.steps for c in s.tried), key=lambda c: c.at):
            best = min(best, candidate.loss_db)
            points.append({"seconds": round(candidate.at, 1), "best_loss_db": round(best, 4)})
        return points

    def to_json(self) -> dict:
        return {"model": self.model, "target_db": self.target_db, "met": self.met,
                "loss_db_vs_original": round(self.loss_db, 4), "brightness": round(self.chosen.brightness, 4),
                "fp32_psnr_db": round(self.fp32_psnr_db, 3), "measured_on": self.measured_on,
                "seconds": round(self.seconds, 1), "route": [s.to_json() for s in self.steps],
                "chosen": {"what": self.chosen.what, "model": self.chosen.model,
                           "method": self.chosen.calibration.method.value,
                           "samples": self.chosen.calibration.samples},
                "float_tensors": self.float_tensors, "latency_ms": self.latency_ms, "curve": self.curve(),
                "bundle": None if self.bundle is None else str(self.bundle),
                **({} if self.target is None else {"target": {**self.target.to_json(), "loss_db": self.target_loss_db}})}


class _Judge:
    """The one measure of every candidate: the original FP32 model's PSNR-Y against the truth minus the INT8
    model's, and INT8's brightness over FP32's, on the same pairs."""

    def __init__(self, original: str, pairs: list[tuple], started: float | None = None):
        self.pairs, self.scale = pairs, model_info(original).scale
        self.started = time.perf_counter() if started is None else started
        fp32, mark = engine_for(original), time.perf_counter()
        self.fp32_outputs = [fp32.run(lr) for lr, _ in pairs]
        self.seconds_per_image = (time.perf_counter() - mark) / max(1, len(pairs))  # FP32, on the reference
        self.fp32_psnr = float(np.mean([psnr_y(o, t, self.scale) for o, t in zip(self.fp32_outputs, self.truths)]))

    def subset(self, count: int) -> "_Judge":
        """The same measure on the first `count` images (their FP32 outputs reused): the search's judge for a
        heavy model, whose winner is then confirmed on every image."""
        if count >= len(self.pairs):
            return self
        part = copy.copy(self)
        part.pairs, part.fp32_outputs = self.pairs[:count], self.fp32_outputs[:count]
        part.fp32_psnr = float(np.mean([psnr_y(o, t, self.scale) for o, t in zip(part.fp32_outputs, part.truths)]))
        return part

    @property
    def truths(self) -> list[np.ndarray]:
        return [truth for _, truth in self.pairs]

    def loss(self, calibrated: CalibratedModel) -> tuple[float, float]:
        engine = engine_for(calibrated.model, calibrated)
        outputs = [engine.run(lr) for lr, _ in self.pairs]
        int8 = float(np.mean([psnr_y(o, t, self.scale) for o, t in zip(outputs, self.truths)]))
        bright = float(np.mean([brightness_ratio(o, r) for o, r in zip(outputs, self.fp32_outputs)]))
        return self.fp32_psnr - int8, bright

    def on_target(self, kind: EngineKind, calibrated: CalibratedModel) -> TargetScore:
        """A calibrated model as an INT8 target runs it, on the same pairs (or why the target refused it)."""
        return target_score(kind, calibrated, [lr for lr, _ in self.pairs], self.fp32_outputs, self.truths,
                            self.scale)

    def candidate(self, what: str, model: str, calibration: CalibrationConfig, scheme: Scheme,
                  fixes: Fixes | None = None, progress=None) -> Candidate:
        calibrated = calibrate_model(model, calibration, scheme, fixes=fixes, progress=progress)
        loss, bright = self.loss(calibrated)
        return Candidate(what, model, calibration, calibrated.fixes, loss, bright, calibrated,
                         time.perf_counter() - self.started)


class _Clock:
    def __init__(self, minutes: float):
        self.start = time.perf_counter()
        self.deadline = self.start + 60.0 * minutes

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def since(self, mark: float) -> float:
        return time.perf_counter() - mark


def make_ready(config: ReadyConfig, progress: Callable[[float, str], None] | None = None,
               should_stop: Callable[[], bool] | None = None) -> ReadyResult:
    """Try the routes of the module docstring in order until the target is met or the budget is spent.

    Args:
        config: the model, images, target and budget.
        progress: called with (fraction of the budget spent, message).
        should_stop: polled between candidates; True ends the search with the best so far.

    Returns:
        the ReadyResult (its bundle written when `config.out` is given).

    Raises:
        ValueError / FileNotFoundError: bad configuration, or images too small for the model.
    """
    clock = _Clock(config.budget_minutes)
    say = _announcer(clock, progress)
    info = model_info(config.model)  # the constructor reads nothing: an unknown model or folder is said here
    if config.data is not None:
        list_images(config.data)
    original = original_model(config.model)
    pairs = _pairs(config, info.scale)
    measured_on = f"{len(pairs)} images of {Path(config.data).name}" if config.data else \
        f"{len(pairs)} calibration images"
    judge = _Judge(original, pairs, clock.start)
    search = judge.subset(_search_images(judge, clock))  # a heavy model is searched on fewer images
    steps: list[Step] = []
    stop = should_stop or (lambda: False)
    target = int8_target(config.engine) if config.engine else None
    whole = target in WHOLE_INT8_TARGETS
    routes = [_range_methods, _refinements] + ([] if whole else [_mixed_precision]) + ([_qat] if config.qat else [])
    for route in routes:
        best = _best(steps)
        if best is not None and (best.loss_db <= config.target_db or clock.left() <= 0 or stop()):
            break
        step = route(config, search, best, clock, say, stop)
        if step is not None:
            steps.append(step)
    if search is not judge and steps:
        steps[0].notes.append(f"a heavy model ({judge.seconds_per_image:.1f} s a FP32 image): candidates scored on "
                              f"{len(search.pairs)} of {len(pairs)} images, the chosen one confirmed on all of them")
    if whole and steps:
        steps[0].notes.append(f"mixed precision left out: {target.value} runs no tensor in float")
    chosen = _confirmed(_chosen(steps, config.target_db), judge, search, say)
    say(f"chosen: {chosen.what}, {chosen.loss_db:.3f} dB below the original FP32")
    on_target = None
    if target is not None:
        say(f"checking the chosen model on {target.value}")
        on_target = judge.on_target(target, chosen.calibrated)
    floats, latency = float_latencies(chosen.model, chosen.calibration, chosen.calibrated, pairs[0][0])
    bundle = None
    if config.out:
        say("writing the bundle")
        bundle = export_bundle(chosen.model, chosen.calibration, config.out, chosen.fixes,
                               images=[lr for lr, _ in pairs[:8]]).folder
    return ReadyResult(config.model, config.target_db, measured_on, judge.fp32_psnr, chosen, steps,
                       clock.since(clock.start), floats, latency, bundle, on_target)


def loss_on(candidate: Candidate, data: str, max_images: int = 16) -> tuple[float, float]:
    """A candidate's (loss against the original FP32 model, brightness) on another folder of ground-truth images:
    the chosen model checked on images the search did not see."""
    scale = candidate.calibrated.scale
    judge = _Judge(original_model(candidate.model),
                   eval_pairs(data, None, InputMode.GROUND_TRUTH, scale, None)[:max_images])
    return judge.loss(candidate.calibrated)


def _announcer(clock: _Clock, progress) -> Callable[[str], None]:
    budget = clock.deadline - clock.start

    def say(message: str) -> None:
        if progress is not None:
            progress(min(1.0, clock.since(clock.start) / budget), message)
    return say


def _pairs(config: ReadyConfig, scale: int) -> list[tuple]:
    """(LR, truth) pairs of the measurement images: the data folder's, else the calibration images'."""
    if config.data:
        return eval_pairs(config.data, None, InputMode.GROUND_TRUTH, scale, None)[:config.max_images]
    images = load_calibration_images(config.calibration.data)[:config.max_images]
    return eval_pairs(None, images, InputMode.GROUND_TRUTH, scale, None)


SEARCH_SHARE = 0.2  # the most of the budget the range methods' scoring may take before the search uses fewer images


def _search_images(judge: _Judge, clock: _Clock) -> int:
    """How many images the candidates are scored on: all of them, unless scoring the four range methods on all
    (an INT8 pass costs about twice the FP32 one) would take more than SEARCH_SHARE of the budget."""
    per_image = 4 * 2 * max(judge.seconds_per_image, 1e-6)
    return max(1, min(len(judge.pairs), int(SEARCH_SHARE * (clock.deadline - clock.start) / per_image)))


def _confirmed(chosen: Candidate, judge: _Judge, search: _Judge, say) -> Candidate:
    """The chosen candidate measured on every image (as it was, when the search used them all)."""
    if search is judge:
        return chosen
    say(f"confirming {chosen.what} on all {len(judge.pairs)} images")
    loss, bright = judge.loss(chosen.calibrated)
    return replace(chosen, loss_db=loss, brightness=bright)


def _best(steps: Sequence[Step]) -> Candidate | None:
    tried = [c for s in steps for c in s.tried]
    return min(tried, key=lambda c: c.loss_db) if tried else None


def _chosen(steps: Sequence[Step], target: float) -> Candidate:
    """The first candidate (in route order) to meet the target, else the one with the lowest loss."""
    for step in steps:
        for candidate in step.tried:
            if candidate.loss_db <= target:
                return candidate
    return _best(steps)


def _range_methods(config: ReadyConfig, judge: _Judge, best, clock: _Clock, say, stop) -> Step:
    mark, tried = time.perf_counter(), []
    methods = [config.calibration.method] if config.calibration.method is not Method.AUTO else list(AUTO_CANDIDATES)
    for method in methods:
        if tried and (clock.left() <= 0 or stop()):
            break
        say(f"range methods: {method.value}")
        tried.append(judge.candidate(method.value, config.model, replace(config.calibration, method=method),
                                     config.scheme))
        if tried[-1].loss_db <= config.target_db:
            break
    step = Step("range methods", tried, clock.since(mark))
    step.best = min(tried, key=lambda c: c.loss_db)
    return step


def _refinement_lists(config: ReadyConfig, model: str) -> tuple[list[list[Refinement]], list[str]]:
    notes, first = [], [Refinement.EQUALIZE, Refinement.BIAS_CORRECTION]
    reason = centring_reason(model)
    if reason is None:
        first.insert(0, Refinement.CENTRED_IO)
    else:
        notes.append(f"centred I/O left out: {reason}")
    lists = [first]
    if config.scheme is not Scheme.NPU_PER_TENSOR:
        lists.append([*first[:-1], Refinement.ADAROUND, Refinement.BIAS_CORRECTION])
    else:
        notes.append("AdaRound left out: it rounds onto per-channel weight steps, and npu-per-tensor has one step "
                     "per weight tensor")
    return lists, notes


def _refinements(config: ReadyConfig, judge: _Judge, best: Candidate, clock: _Clock, say, stop) -> Step | None:
    if model_info(best.model).record() is not None:
        return Step("refinements", [], 0.0, ["the model is already tuned; refinements start from an original"])
    mark, tried = time.perf_counter(), []
    lists, notes = _refinement_lists(config, best.model)
    for refinements in lists:
        if tried and (clock.left() <= 0 or stop()):
            break
        names = ", ".join(r.value for r in refinements)
        say(f"refinements: {names}")
        try:
            path = refine(RefineConfig(best.model, refinements, best.calibration, config.scheme),
                          progress=lambda fraction, message, n=names: say(f"refinements: {n}: {message}"),
                          seconds_left=lambda: -1.0 if stop() else clock.left())
        except RefineStopped as error:  # the budget's rest goes to the routes after this one
            notes.append(f"{names}: not tried: {error}")
            break
        except ValueError as error:  # an op the interpreter does not cover: the route is closed, in words
            return Step("refinements", tried, clock.since(mark), [*notes, f"refinements are not possible: {error}"])
        tried.append(judge.candidate(f"{best.calibration.method.value} + {names}", str(path), best.calibration,
                                     config.scheme))
        if tried[-1].loss_db <= config.target_db:
            break
    step = Step("refinements", tried, clock.since(mark), notes)
    step.best = min(tried, key=lambda c: c.loss_db) if tried else None
    return step


def _mixed_precision(config: ReadyConfig, judge: _Judge, best: Candidate, clock: _Clock, say, stop) -> Step | None:
    if config.max_float == 0:
        return None
    mark = time.perf_counter()
    scorer = Scorer(best.calibrated, judge.pairs)
    all_int8 = scorer.score()[0]
    gains = []
    for index, point in enumerate(scorer.points):
        if clock.left() <= 0 or stop():
            break
        say(f"mixed precision: what keeping each tensor in float recovers ({index + 1} of {len(scorer.points)})")
        gains.append((scorer.score(dropped=[point])[0] - all_int8, point))
    kept: list[str] = []
    for gain, point in sorted(gains, reverse=True)[:config.max_float]:
        if gain <= 0 or clock.left() <= 0:
            break
        kept.append(point)
        if judge.fp32_psnr - scorer.score(dropped=kept)[0] <= config.target_db:
            break
    if not kept:
        return Step("mixed precision", [], clock.since(mark), ["no tensor left in float lowers the loss"])
    say(f"mixed precision: {len(kept)} tensor(s) in float, written and measured")
    fixes = replace(best.fixes, keep_float=[*best.fixes.keep_float, *kept])
    what = f"{best.what} + {len(kept)} tensor(s) in float"
    candidate = judge.candidate(what, best.model, best.calibration, config.scheme, fixes)
    step = Step("mixed precision", [candidate], clock.since(mark),
                [f"ranked {len(gains)} of {len(scorer.points)} tensors by what keeping each in float recovers"])
    step.best = candidate
    return step


def _qat(config: ReadyConfig, judge: _Judge, best: Candidate, clock: _Clock, say, stop) -> Step | None:
    from ..tune.qat import QatConfig, quantization_aware_training

    seconds = clock.left() - RESERVE_SECONDS
    if seconds < MIN_QAT_SECONDS:
        return Step("QAT", [], 0.0, [f"not started: {max(0.0, clock.left()):.0f} s of the budget left"])
    train_dirs = config.train_dirs or [d for d in default_training_dirs() if Path(d).is_dir()]
    notes = [] if train_dirs else ["QAT trains on the measurement images (no training folders were found)"]
    train_dirs = train_dirs or [config.data or str(config.calibration.data or ensure_calibration_images()[0].parent)]
    mark, model = time.perf_counter(), original_model(config.model)
    info, reached, validation, candidates, margin, steps = model_info(model), {"loss": math.inf}, [], [], 0.0, 0

    def seen(event: dict) -> None:
        if "val_psnr" in event and event.get("fp32_val_psnr") is not None:
            reached["loss"] = event["fp32_val_psnr"] - event["val_psnr"]
            validation.append({"seconds": round(clock.since(clock.start), 1), "step": steps + event["step"],
                               "loss_db": round(reached["loss"], 4)})
        say(f"QAT: step {steps + event['step']}" + (f", validation loss {reached['loss']:.3f} dB"
                                                    if math.isfinite(reached["loss"]) else ""))

    while True:  # a round; another from its weights where its validation met the target and the INT8 model not
        out = cache_root() / "ready" / f"{info.name.replace(':', '-')}-{short_hash(str(time.time()), 8)}-qat{info.tuned_suffix}"
        out.parent.mkdir(parents=True, exist_ok=True)
        qat_config = QatConfig(model=model, out=str(out), scheme=config.scheme, calibration=best.calibration,
                               steps=100_000, lr_patch=QAT_PATCH, max_seconds=seconds, train_dirs=train_dirs,
                               val_dir=config.data, val_every=50, checkpoint_every=100_000, keep_best=config.data is not
                               None, equalize=0.5 if Refinement.EQUALIZE.value in best.what else 0.0)
        goal, reached["loss"] = config.target_db - margin, math.inf
        try:  # the time budget is QAT's own max_seconds, so its end is said as such ("time budget of N s reached")
            result = quantization_aware_training(qat_config, seen, lambda: reached["loss"] <= goal or stop())
        except ValueError as error:  # an op the interpreter does not cover: the route is closed, in words
            notes.append(f"{'another QAT round' if candidates else 'QAT'} is not possible: {error}")
            break
        steps += result.steps
        candidates.append(judge.candidate(f"QAT, {steps} steps", str(result.weights), best.calibration, config.scheme))
        seconds, loss = clock.left() - RESERVE_SECONDS, candidates[-1].loss_db
        if loss <= config.target_db or reached["loss"] > goal or seconds < MIN_QAT_SECONDS or stop():
            break
        margin = max(margin + 0.002, loss - reached["loss"])  # the gap between the proxy and the written model
        notes.append(f"QAT's fake-quantized validation reached {reached['loss']:.3f} dB, the written INT8 model {loss:.3f} "
                     f"dB: trained on from those weights, to {config.target_db - margin:.3f} dB fake-quantized")
        model = str(result.weights)
    step = Step("QAT", candidates, clock.since(mark), notes, validation=validation)
    step.best = min(candidates, key=lambda c: c.loss_db) if candidates else None
    return step
