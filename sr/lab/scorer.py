"""The diagnosis's measuring stick: the written QDQ model, and copies of it with some quantization taken out (or
only one tensor's left in), scored on evaluation pairs (centre-cropped) with the reference engine (ONNX Runtime
on the CPU) against the truth and the FP32 output."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import onnx

from .compare import InputMode, prepare_input
from ..data import degrade, list_images, load_image
from ..run.engines import reference
from ..model.checks import clean_message
from ..run.runtime import EngineKind, create_engine, engine_for
from ..metrics import brightness_ratio, psnr_y
from ..quant.calibrated import CalibratedModel
from ..quant.quantspec import Scheme
from ..quant.qdq import spec_of, tie_fused_ranges, with_float_weights, without_quantization
from ..quant.readback import graph_quantization
from ..quant.rewrite import rewrite_for_fast_int8


def eval_pairs(data: str | None, images: Sequence | None, mode: InputMode, scale: int,
                max_side: int | None) -> list[tuple]:
    """[(lr, truth or None)] to measure on, centre-cropped to `max_side` LR pixels a side."""
    if images:
        prepared = [prepare_input(image, mode, scale) for image in images]
        pairs = [(p.lr, p.truth) for p in prepared]
    elif data is None:
        raise ValueError("no images to measure on: give a folder of ground-truth images, or the images")
    else:
        pairs = [tuple(reversed(degrade(load_image(path), scale))) for path in list_images(data)]
    return [centre_crop(lr, truth, scale, max_side) for lr, truth in pairs] if max_side else pairs


def centre_crop(lr: np.ndarray, truth: np.ndarray | None, scale: int, max_side: int) -> tuple:
    """The centre of an LR image (at most `max_side` pixels a side) and the matching part of its truth.

    Args:
        lr: uint8 HxWx3.
        truth: uint8 (sH)x(sW)x3 or None.
        scale: the model's scale.
        max_side: the largest side kept.

    Returns:
        (lr crop, truth crop or None).
    """
    height, width = lr.shape[:2]
    top, left = max(0, (height - max_side) // 2), max(0, (width - max_side) // 2)
    lr = lr[top : top + max_side, left : left + max_side]
    if truth is not None:
        truth = truth[top * scale : (top + lr.shape[0]) * scale, left * scale : (left + lr.shape[1]) * scale]
    return np.ascontiguousarray(lr), truth


@dataclass(frozen=True)
class TargetScore:
    """The whole INT8 model as a target runs it (an NPU's arithmetic, LiteRT, OpenVINO), or why it did not."""

    engine: str  # the engine's name (the chip, the scheme)
    psnr_y: float | None  # against the truth (None without one, or refused)
    psnr_vs_fp32_db: float | None
    brightness: float | None
    refused: str | None = None

    def to_json(self) -> dict:
        """JSON-ready fields (an identical output's infinite PSNR as None)."""
        def finite(value):
            return value if value is None or math.isfinite(value) else None

        return {"engine": self.engine, "psnr_y": finite(self.psnr_y), "psnr_vs_fp32_db": finite(self.psnr_vs_fp32_db),
                "brightness": self.brightness, "refused": self.refused}


# the targets that run a graph in INT8 whole, with no float path (a tensor left in float is refused)
WHOLE_INT8_TARGETS = (EngineKind.QNN_HTP, EngineKind.LITERT, EngineKind.LITERT_REF)


def int8_target(engine: str, scheme: Scheme | str | None = None) -> EngineKind:
    """The INT8 target named (any INT8 engine but the reference itself), checked against the scheme it would run
    when one is given: LiteRT takes LiteRT's specification only, the HTP an all-INT8 placement, TensorRT not cpu.

    Raises:
        ValueError: not an INT8 target, or one that cannot run the scheme, in words with the choices.
    """
    kind = EngineKind.parse(engine)
    if not kind.is_int8 or kind is EngineKind.ORT_INT8:
        targets = ", ".join(k.value for k in EngineKind if k.is_int8 and k is not EngineKind.ORT_INT8)
        raise ValueError(f"{engine!r} is not an INT8 target (the reference, ort-int8, is always measured); "
                         f"choose one of: {targets}")
    if scheme is None:
        return kind
    scheme = Scheme.parse(scheme)
    takes = {EngineKind.LITERT: [s for s in Scheme if s.litert], EngineKind.LITERT_REF: [s for s in Scheme if s.litert],
             EngineKind.QNN_HTP: [s for s in Scheme if s.all_int8 and s is not Scheme.CPU],
             EngineKind.TENSORRT: [s for s in Scheme if s is not Scheme.CPU]}.get(kind, list(Scheme))
    if scheme not in takes:
        raise ValueError(f"{kind.value} cannot run the {scheme.value} scheme whole; the schemes it runs: "
                         f"{', '.join(s.value for s in takes)}")
    return kind


def output_figures(outputs: Sequence[np.ndarray], references: Sequence[np.ndarray],
                   truths: Sequence[np.ndarray | None], scale: int) -> tuple[float | None, float, float]:
    """(PSNR-Y against the truths, or None where one is missing; PSNR-Y against the FP32 `references`; brightness
    against them), means over the images."""
    vs_fp32 = float(np.mean([psnr_y(o, r, scale) for o, r in zip(outputs, references)]))
    vs_truth = float(np.mean([psnr_y(o, t, scale) for o, t in zip(outputs, truths)])) \
        if all(t is not None for t in truths) else None
    bright = float(np.mean([brightness_ratio(o, r) for o, r in zip(outputs, references)]))
    return vs_truth, vs_fp32, bright


def target_score(kind: EngineKind, calibrated: CalibratedModel, lrs: Sequence[np.ndarray],
                 references: Sequence[np.ndarray], truths: Sequence[np.ndarray | None], scale: int) -> TargetScore:
    """A calibrated model run by an INT8 target, whose engine is checked against the reference first
    (`sr.run.runtime.create_engine`), scored by `output_figures`; or the target and why it gave nothing."""
    name = kind.value
    try:
        engine = create_engine(kind, calibrated.model, calibrated)
        name = engine.name
        outputs = [engine.run(lr) for lr in lrs]
    except Exception as error:  # refused, not installed, no device, a size it cannot compile: said, not raised
        return TargetScore(name, None, None, None, clean_message(error).splitlines()[0][:400] or type(error).__name__)
    return TargetScore(name, *output_figures(outputs, references, truths, scale))


class Scorer:
    """Scores the written QDQ model, and copies of it with some quantization taken out, on the evaluation pairs
    with the reference engine (ONNX Runtime on the CPU): "all INT8" is the model the bundle ships."""

    def __init__(self, calibrated: CalibratedModel, pairs: list[tuple]):
        self.fp32 = onnx.load(str(calibrated.fp32_onnx))
        self.qdq = onnx.load(str(calibrated.qdq_onnx))
        self.spec = spec_of(self.fp32, calibrated.scheme, calibrated.fixes.keep_float)
        self.ranges = {**calibrated.ranges, **tie_fused_ranges(self.spec, calibrated.ranges)}
        self.scale = calibrated.scale
        fp32_engine = engine_for(calibrated.model)
        self.lrs = [lr for lr, _ in pairs]
        self.radius: int | None | bool = False  # the model's receptive radius once a large image needed tiles
        self.references = [fp32_engine.run(lr) for lr in self.lrs]
        self.truths = [truth for _, truth in pairs]
        self.has_truth = all(truth is not None for truth in self.truths)
        # the points: what the written model really quantizes (the cpu writer folds ReLU/Clip into the Conv)
        # one point per tie group (a Conv output quantized on its activation's grid is part of that activation's
        # point: what it clips, the activation clips anyway)
        # the cpu writer changed some weights' shapes (sr.quant.rewrite): their FP32 values come from the rewritten graph
        self.weights_from = rewrite_for_fast_int8(self.fp32, calibrated.ranges)[0] \
            if calibrated.scheme is Scheme.CPU else None
        written = graph_quantization(self.qdq, self.fp32).activations
        self.written = [t for t in self.spec.activations if t in written]
        self.points = [t for t in self.written if self.spec.activations[t].group == t]

    def _members(self, points: Sequence[str]) -> list[str]:
        groups = set(points)
        return [t for t in self.written if self.spec.activations[t].group in groups]

    def outputs(self, dropped: Sequence[str] = (), alone: str | None = None) -> list[np.ndarray]:
        """The INT8 outputs of the written model without the pairs of the groups in `dropped`, or with `alone`'s
        group as its only quantized activations (weights in FP32)."""
        if alone is not None:
            kept = set(self._members([alone]))
            model = with_float_weights(without_quantization(self.qdq, self.fp32,
                                                            [t for t in self.written if t not in kept]),
                                       self.fp32, self.weights_from)
        elif dropped:
            model = without_quantization(self.qdq, self.fp32, self._members(dropped))
        else:
            model = self.qdq
        engine = reference(model, self.scale)  # seamless tiles (of a fixed-size model's size), one radius for all
        engine._radius = self.radius
        outputs = [engine.run(lr) for lr in self.lrs]
        self.radius = engine._radius
        return outputs

    def score(self, dropped: Sequence[str] = (), alone: str | None = None) -> tuple[float, float, float]:
        """(PSNR vs truth or None, PSNR vs FP32, brightness vs FP32), means over the images."""
        return self._figures(self.outputs(dropped, alone))

    def on_target(self, kind: EngineKind, calibrated: CalibratedModel) -> TargetScore:
        """The written model as an INT8 target runs it, scored like `score`; a target that refuses it says why."""
        return target_score(kind, calibrated, self.lrs, self.references, self.truths, self.scale)

    def _figures(self, outputs: list[np.ndarray]) -> tuple[float | None, float, float]:
        return output_figures(outputs, self.references, self.truths, self.scale)

    def fp32_psnr(self) -> float | None:
        """FP32 PSNR against the truth (None without truth)."""
        if not self.has_truth:
            return None
        return float(np.mean([psnr_y(r, t, self.scale) for r, t in zip(self.references, self.truths)]))
