"""The page's words: the labels, presets and notes it shows, how a model is named on screen, and every table and
report made from the library's results (metrics, coverage, diagnosis, fix advice, the INT8-ready route). No gradio."""
from __future__ import annotations

import contextvars
import math

import numpy as np
import pandas as pd

from sr.lab.compare import InputMode, OutputKind, available_models
from sr.lab.fixes import Fix, NoFixReason
from sr.lab.plots import DifferenceKind
from sr.model.models import is_uploaded, model_info
from sr.store import Memo
from ui import jobs

PANELS = ("Original", "FP32 model A", "INT8 model A", "FP32 model B", "INT8 model B")
MODES = {"Upscale my image": InputMode.UPSCALE, "Check against ground truth": InputMode.GROUND_TRUTH}
CALIB_SOURCES = ("calib_data/", "my uploads")
COVERAGE_WARNING = 0.01  # warn when a tensor has more than 1% of this image's values outside its range
METHOD_HELP = ("entropy: NVIDIA's KL search as ModelOpt publishes it (the spike of exact zeros after a ReLU is "
               "flattened first); entropy-zeros: the same search counting that spike, which pulls thresholds down "
               "and clips the tails.")
PRESETS = {
    "ReLU vs Clipped ReLU, same XLSR": {"models": ("xlsr-relu", "xlsr-clip"), "method": "entropy", "gain": 1.0},
    "big ReLU teacher vs small Clipped-ReLU student": {"models": ("teacher", "xlsr-clip-kd"), "method": "entropy",
                                                        "gain": 1.0},
    "dark calibration set (40% brightness)": {"models": ("xlsr-relu", "xlsr-clip"), "method": "minmax", "gain": 0.4},
}
PRESET_NOTES = {
    "dark calibration set (40% brightness)": (
        "**Why this comes out dull and dark:** every range was calibrated on images at 40% brightness, so each "
        "layer clips the brighter values of your image. The highlights are capped at a grey level (on the astronaut "
        "the brightest 1% reaches level 107 of 255 instead of 254) while the shadows keep theirs: the image looks "
        "flat and washed out rather than evenly darker, and is darker on average (brightness ratio 0.65 there, "
        "about 0.7 on Set14 with minmax; the Clipped ReLU does not protect). More samples cannot help: they come "
        "from the same dark set. A preprocessing mismatch (the calibrator normalising differently from inference) "
        "does the same. **Fix:** calibrate on images like the ones you deploy on (set the gain back to 1), or a "
        "wider set."),
}
FIX_LABELS = {Fix.RANGE_MINMAX: "range from minmax", Fix.RANGE_MSE: "range from mse",
              Fix.RANGE_PERCENTILE: "range from percentile 99.99", Fix.KEEP_FLOAT: "keep in float (no QDQ)"}


# (visitor, registered ONNX model name) -> the file name that visitor gave it: two visitors who upload the same
# bytes under different names each see their own
_UPLOADED = Memo(4096)
_VISITOR: contextvars.ContextVar[str | None] = contextvars.ContextVar("visitor", default=None)


def _shown(model: str | None) -> str | None:
    """How a model is named on screen: an uploaded ONNX model by the file name this visitor gave it."""
    return _UPLOADED.peek((_VISITOR.get(), model), model)


def _label(model: str) -> str:
    """A panel label naming the model, its final activation and its size."""
    info = model_info(model)
    size = f"{info.parameters / 1e6:.2f}M" if info.parameters >= 1e5 else f"{info.parameters / 1e3:.0f}k"
    if info.uploaded:
        return f"{_shown(info.name)} (your ONNX model), {size}"
    activation = {"relu": "ReLU output", "clipped_relu": "Clipped-ReLU output"}.get(info.final_activation,
                                                                                 info.final_activation)
    return f"{info.name}, {activation}, {size}"


def _model_choices(uploads) -> list:
    """The model lists' entries: the shipped models, then this visitor's models, each shown by the name its
    visitor gave it (the value stays the lab's name)."""
    shipped = available_models()
    return [*shipped, *((_shown(m), m) if is_uploaded(m) else m for m in dict.fromkeys(uploads or [])
                        if m not in shipped)]


def contract_text(user) -> str:
    """The detected contract of an uploaded model, in words."""
    c = user.contract
    sure = "" if c.confidence_db is None else f" (the [0, {c.value_range}] reading fits a bicubic upscale " \
        f"{c.confidence_db:.1f} dB better than the other)"
    return (f"**{_shown(user.name)}**: layout {c.layout.value.upper()}, "
            f"{'Y (BT.601 luma; Cb/Cr upscaled bicubically)' if c.color.value == 'y' else 'RGB'}, values in "
            f"[0, {c.value_range}]{sure}, x{c.scale}" + (", pre-upsampled input" if c.pre_upsampled else "")
            + (f", {c.sizes_in_words()}" + (" (tiled to it)" if c.fixed_size else "") if c.sizes_in_words() else "")
            + (f". Left in float by the INT8 model: {', '.join(user.float_ops)}." if user.float_ops else ".")
            + " Wrong? Override it below and upload again.")


def ready_report(result, model_a) -> str:
    """The INT8-ready search as the page shows it: each route's candidates, the choice, what it costs."""
    lines = [f"**{_shown(model_a)}**: target {result.target_db:.3f} dB below the original FP32 model, measured on "
             f"{result.measured_on} (the CLI's `int8-ready --data` measures on your own ground-truth images).", "",
             "| route | candidate | loss vs original FP32 (dB) | brightness |", "|---|---|---|---|"]
    for step in result.steps:
        lines += [f"| {step.route} | {c.what} | {c.loss_db:+.3f} | {c.brightness:.3f} |" for c in step.tried]
    notes = [note for step in result.steps for note in step.notes]
    if not jobs.POLICY.enabled:
        notes.append("QAT is off on this server (fine-tuning is allowed only with --allow-training); run "
                     "`python -m sr int8-ready` locally for that route")
    on = result.target
    verdict = "target met" if result.met else "target **not** met: the best reached" if on is None or not on.refused \
        else "target **not** met: the target refused the model"
    if on is not None:
        verdict += f" as {on.engine} runs it"
    lines += ["", f"**Chosen: {result.chosen.what}**, {result.loss_db:+.3f} dB on the reference, {verdict}, in "
              f"{result.seconds:.0f} s. The bundle below is this model."]
    if on is not None:
        lines.append(f"- as {on.engine} runs it: " + (f"refused: {on.refused}" if on.refused else
                     f"{result.target_loss_db:+.3f} dB against the original FP32, brightness {on.brightness:.3f}"))
    lines += [f"- left in float: `{e['tensor']}` ({e['latency_ms_added']:+.2f} ms on this CPU)"
              for e in result.float_tensors]
    calibration = f"{result.chosen.calibration.method.value}, {result.chosen.calibration.samples} samples"
    if result.float_tensors:  # (model A stays as it was: make_ready_for offers only fully-INT8 tuned models)
        lines.append(f"- the comparison above now shows model A calibrated as the bundle is ({calibration}) with every "
                     "tensor in INT8: the page has no per-tensor setting, so the refinements and the tensors left in "
                     "float are in the bundle only")
    else:
        lines.append(f"- the comparison above now shows the chosen model as model A, calibrated as the bundle is "
                     f"({calibration})")
    lines += [f"- {note}" for note in notes]
    return "\n".join(lines)


def _number(value, digits: int):
    if value is None:
        return None
    return "∞" if isinstance(value, float) and math.isinf(value) else round(float(value), digits)


def metrics_frame(rows) -> pd.DataFrame:
    """The comparison's OutputMetrics as a table with the app's column names and sensible decimals."""
    names = {OutputKind.FP32: "FP32", OutputKind.INT8: "INT8", OutputKind.BICUBIC: "bicubic"}
    records = []
    for row in rows:
        record = {"output": f"{names[row.kind]} {_shown(row.model) or ''}".strip(), "engine": row.engine,
                  "PSNR vs FP32 (dB)": _number(row.psnr_vs_fp32_db, 2), "SSIM vs FP32": _number(row.ssim_vs_fp32, 4),
                  "brightness vs FP32": _number(row.brightness_vs_fp32, 4), "ΔE2000": _number(row.delta_e_vs_fp32, 2),
                  "time on this CPU (ms)": _number(row.latency_ms, 0)}
        if row.psnr_vs_truth_db is not None:
            record["PSNR vs truth (dB)"] = _number(row.psnr_vs_truth_db, 2)
            record["SSIM vs truth"] = _number(row.ssim_vs_truth, 4)
        records.append(record)
    return pd.DataFrame(records)


def coverage_note(result, coverages) -> str:
    """The first hint: does each model's calibration cover the values this image produces? (`coverages`: each
    calibration's `range_coverage` on the image.)"""
    lines = []
    for calibrated, checked in zip(result.calibrations, coverages):
        if not checked:  # a graph with no quantized activation under this scheme (a lone Resize, say)
            lines.append(f"✓ {_shown(calibrated.model)}: no activation of it is quantized under the "
                         f"{calibrated.scheme.value} scheme, so no range can clip this image.")
            continue
        worst = checked[0]
        share = 100 * worst.outside_fraction
        if worst.outside_fraction > COVERAGE_WARNING:
            lines.append(f"⚠️ **{_shown(calibrated.model)}: the calibration does not cover this image.** "
                         f"{share:.1f}% of "
                         f"`{worst.tensor}` falls outside its calibrated range [{worst.low:.3g}, {worst.high:.3g}] "
                         f"(this image: [{worst.image_min:.3g}, {worst.image_max:.3g}]); those values are clipped. "
                         "Calibrate on images like this one.")
        else:
            lines.append(f"✓ {_shown(calibrated.model)}: the calibration covers this image (worst tensor "
                         f"`{worst.tensor}`, "
                         f"{share:.2f}% outside its range).")
    return "\n\n".join(lines)


REFERENCE_TARGET = "reference (ONNX Runtime, CPU)"
# what the INT8 panels run on: the reference, or a target's own numerics (sr.run.runtime's engine kinds)
TARGETS = {REFERENCE_TARGET: None, "Qualcomm HTP v73 (simulated)": "qnn-htp", "LiteRT, XNNPACK": "litert",
           "LiteRT, reference kernels": "litert-ref"}


def done_note(state) -> str:
    """The page's "done" line: how long the comparison took and which calibration sample it drew."""
    if not state:
        return ""
    return (f"Done at {state['finished']} in {state['seconds']:.1f} s (calibration sample {state.get('sample', 1)} "
            f"of these settings, seed {state['seed']}).")


def spread_note(history) -> str:
    """How much the INT8 result moves between calibration samples (after two or more)."""
    runs = list(history["runs"].values())
    if len(runs) < 2:
        return ""
    losses = np.array(runs, dtype=np.float64)
    parts = [f"model {name}: {losses[:, i].mean():.2f} ± {losses[:, i].std():.2f} dB from FP32"
             for i, name in enumerate("AB")]
    return (f"\n\n**Across {len(runs)} calibration samples** (seeds {', '.join(map(str, history['runs']))}): "
            + "; ".join(parts) + ".")


DIFFERENCES = {  # label -> (panel index of the output, panel index of the reference)
    "INT8 A vs FP32 A": (2, 1), "INT8 B vs FP32 B": (4, 3), "INT8 B vs INT8 A": (4, 2), "FP32 B vs FP32 A": (3, 1)}
# label -> (panel index of the target's INT8 output, which model's reference INT8 output it is set against)
TARGET_DIFFERENCES = {"INT8 A: target vs reference": (2, 0), "INT8 B: target vs reference": (4, 1)}
DIFFERENCE_KINDS = {"|difference| of luma": DifferenceKind.LUMA, "|difference| per channel": DifferenceKind.CHANNELS,
                    "brightness shift (blue: darker, red: brighter)": DifferenceKind.BRIGHTNESS_SHIFT}


def diagnosis_text(report) -> str:
    """The diagnosis paragraph (`sr.lab.diagnose.DiagnosisReport.paragraph`) with this visitor's name for the model."""
    return report.paragraph(_shown(report.model), markdown=True)


def ranking_frame(report) -> pd.DataFrame:
    """The diagnosis ranking with the app's column names."""
    return pd.DataFrame([{"tensor": r.tensor, "op": r.op, "PSNR vs FP32, alone (dB)": _number(r.alone_psnr_vs_fp32_db, 2),
                          "drop vs truth, alone (dB)": _number(r.psnr_drop_db, 3),
                          "recovery if kept float (dB)": _number(r.recovery_db, 3),
                          "brightness alone": _number(r.brightness, 4), "SQNR (dB)": _number(r.sqnr_db, 1),
                          "clipped %": _number(100 * r.clipped_fraction, 3),
                          "clipped energy %": _number(100 * r.clipped_energy, 2)} for r in report.ranking])


NO_FIX_WORDS = {
    NoFixReason.DARKER_CALIBRATION: "the calibration images are darker than this image (the brightness gain is below "
                                    "1), so every range is too narrow at once: calibrate on images like this one "
                                    "(gain 1, or your own images)",
    NoFixReason.BRIGHTER_CALIBRATION: "the calibration images are brighter than this image (the brightness gain is "
                                      "above 1): calibrate on images like this one",
    NoFixReason.SPREAD: "the loss is spread over many tensors, or their ranges are already the best of those offered: "
                        "try another calibration method, more samples, or int8-ready's refinements",
}


def advice_text(advice, report) -> str:
    """The measured fix (or why none) in one sentence: the numbers are the fix tab's own before and after."""
    against = "the truth" if report.has_truth else "FP32"
    tried = len(advice.tried)
    if advice.fix is None:
        return (f"**No fix is offered:** none of the {tried} tried (every fix on the worst tensors, each measured on "
                f"this image) raises PSNR vs {against} above {advice.psnr_before_db:.2f} dB (the best reached "
                f"{advice.psnr_after_db:.2f} dB): {NO_FIX_WORDS[advice.reason]}.")
    return (f"**Measured fix:** {FIX_LABELS[advice.fix]} on `{advice.tensor}` takes the real INT8 model from "
            f"{advice.psnr_before_db:.2f} to {advice.psnr_after_db:.2f} dB vs {against} on this image "
            f"(+{advice.gain_db:.2f} dB, the best of {tried} tried); it is preselected below.")
