"""What INT8 costs in time on the CPU reference: the latency each tensor a mixed-precision model leaves in float adds,
beside FP32 and all-INT8 (int8-ready reports it with its choice)."""
from __future__ import annotations

import time
from dataclasses import replace

import numpy as np

from ..quant.calibrate import CalibrationConfig
from ..quant.calibrated import CalibratedModel
from ..run.engines import OrtEngine
from ..run.quantize import calibrate_model
from ..run.runtime import engine_for


def float_latencies(model: str, calibration: CalibrationConfig, chosen: CalibratedModel,
                    lr: np.ndarray) -> tuple[list[dict], dict]:
    """The tensors a chosen INT8 model (`model` calibrated as `calibration` says) leaves in float, each with the
    CPU latency it adds (measured by leaving the tensors in float one more at a time), and the latency of FP32,
    all-INT8 and the chosen model, on the reference engine."""
    crop = lr[:128, :128]
    fp32 = _milliseconds(engine_for(chosen.model), crop)
    kept = list(chosen.fixes.keep_float)
    floats, base = [], None
    if kept:
        base_model = calibrate_model(model, calibration, chosen.scheme,
                                     fixes=replace(chosen.fixes, keep_float=[]))
        base = previous = _milliseconds(engine_for(base_model.model, base_model), crop)
        for index, tensor in enumerate(kept):
            partial = calibrate_model(model, calibration, chosen.scheme,
                                      fixes=replace(chosen.fixes, keep_float=kept[:index + 1]))
            now = _milliseconds(engine_for(partial.model, partial), crop)
            floats.append({"tensor": tensor, "latency_ms_added": round(now - previous, 3)})
            previous = now
    chosen_ms = _milliseconds(engine_for(chosen.model, chosen), crop)
    return floats, {"fp32": round(fp32, 3), "int8_all": round(chosen_ms if base is None else base, 3),
                    "chosen": round(chosen_ms, 3), "input": f"{crop.shape[1]}x{crop.shape[0]}"}


def _milliseconds(engine: OrtEngine, lr: np.ndarray, runs: int = 7) -> float:
    engine.run(lr)
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        engine.run(lr)
        times.append(time.perf_counter() - started)
    return 1000.0 * float(np.median(times))
