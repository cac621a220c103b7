"""The Compare tab's handlers: the comparison (its lane, its calibration estimate, refinements, the calibration
uploads) and its views (panel names, slider, difference view, zoom), presets, model labels and seeds."""
from __future__ import annotations

import math
import time

import gradio as gr
import numpy as np

from sr.data import ImageLoadError, bicubic_resize, load_image
from sr.lab.compare import OutputKind, available_models, compare, roi_strip
from sr.lab.coverage import range_coverage
from sr.lab.plots import difference_image, range_chart
from sr.model.models import model_info
from sr.quant.calibrate import CalibrationConfig
from sr.store import Memo
from sr.tune.ptq import RefineConfig, refine
from ui.server import (_DONE, KEPT_CALIBRATION_PIXELS, MAX_CALIBRATION_FILES, MAX_CALIBRATION_PIXELS, MAX_SESSIONS,
                       SHORT_SECONDS, _capped, _lane, _light, _user_errors, _visitor, to_page)
from ui.words import (DIFFERENCE_KINDS, DIFFERENCES, MODES, PANELS, PRESET_NOTES, PRESETS, TARGET_DIFFERENCES, TARGETS,
                      _label, coverage_note, metrics_frame, spread_note)

COVERAGE_SIDE = 128  # the coverage check runs on a copy downscaled to at most this many pixels a side


def _check_image(image) -> None:
    if image is None:
        raise gr.Error("Upload an image first (drag and drop, file picker or paste).")


def _read_calibration_uploads(files) -> list[np.ndarray] | None:
    if not files:
        return None
    if len(files) > MAX_CALIBRATION_FILES:
        gr.Warning(f"Only the first {MAX_CALIBRATION_FILES} of {len(files)} calibration images are used.")
        files = files[:MAX_CALIBRATION_FILES]
    images = []
    for file in files:
        path = file if isinstance(file, str) else getattr(file, "name", str(file))
        try:
            images.append(_kept(load_image(path, max_pixels=MAX_CALIBRATION_PIXELS)))
        except (ImageLoadError, FileNotFoundError) as error:
            gr.Warning(f"Skipped a calibration image: {error}")
    if not images:
        raise gr.Error("None of the uploaded calibration images could be read.")
    return images


def _kept(image: np.ndarray) -> np.ndarray:
    """A calibration upload as the session keeps it: downscaled to at most KEPT_CALIBRATION_PIXELS."""
    height, width = image.shape[:2]
    if height * width <= KEPT_CALIBRATION_PIXELS:
        return image
    factor = math.sqrt(KEPT_CALIBRATION_PIXELS / (height * width))
    return bicubic_resize(image, max(1, int(width * factor)), max(1, int(height * factor)))


def load_calibration_uploads(files):
    """Decode the user's calibration images once, into this session's state."""
    images = _read_calibration_uploads(files)
    if images:
        gr.Info(f"{len(images)} calibration image(s) ready; choose 'my uploads' to use them.")
    return images


_CALIBRATION_RATE = {"seconds_per_sample_mparam": 0.0}  # measured by this server's last first calibration


def _calibration_estimate(model_a: str, model_b: str, samples: int) -> float:
    """Seconds a first calibration of both models takes here: from the last first calibration this server did
    (seconds per sample and per million parameters), or, before any, 1.5 s per 100 samples of a 22k-parameter
    XLSR (`python -m sr bench` on two cores)."""
    rate = _CALIBRATION_RATE["seconds_per_sample_mparam"]
    sizes = [max(0.022, model_info(m).parameters / 1e6) for m in (model_a, model_b)]
    if rate > 0:
        return sum(rate * samples * size for size in sizes)
    return sum(1.5 * samples / 100 * max(1.0, size / 0.022 * 0.5) for size in sizes)


def _measured(calibrations) -> None:
    """Learn the calibration rate from what was just calibrated (not read from the cache)."""
    fresh = [c for c in calibrations if not c.cached and c.seconds > 0]
    if fresh:
        rates = [c.seconds / c.config.samples / max(0.022, model_info(c.model).parameters / 1e6) for c in fresh]
        _CALIBRATION_RATE["seconds_per_sample_mparam"] = float(np.mean(rates))


def _calibration(method, samples, gain, seed) -> CalibrationConfig:
    try:
        numbers = int(samples), float(gain), int(seed or 0)
    except (TypeError, ValueError):  # a missing or non-numeric widget value through the API
        raise ValueError(f"the calibration settings must be numbers (samples {samples!r}, gain {gain!r}, seed "
                         f"{seed!r})") from None
    return CalibrationConfig(method=method, samples=numbers[0], gain=numbers[1], seed=numbers[2])  # its own words


def _refined(run, model: str, refinements, calibration: CalibrationConfig, scheme: str, progress) -> str:
    """`model`, or its refined version (sr.tune.ptq; made once per setting, then cached)."""
    if not refinements:
        return model
    config = RefineConfig(model, list(refinements), calibration, scheme)
    return str(run(refine, config, progress=to_page(progress, f"refining {model}: {{}} (first time only)")))


def run_compare(image, model_a="xlsr-relu", model_b="xlsr-clip", method="entropy", samples=100, scheme="tensorrt",
                mode="Upscale my image", display="bicubic", calib_source="calib_data/", calib_images=None, gain=1.0,
                seed=0, history=None, refinements=(), target=None, request: gr.Request = None, progress=gr.Progress()):
    """The main comparison (also the `compare` API endpoint): five images, metrics, coverage, range chart.

    `history` (this tab's state) collects the INT8 loss of each calibration sample drawn for the same settings,
    so that Recalibrate can say how much the result moves between samples."""
    _check_image(image)
    progress, started = _capped(progress, "comparison"), time.perf_counter()
    with _user_errors("comparison"):
        calibration = calib_images if calib_source == "my uploads" else None
        if calib_source == "my uploads" and not calibration:
            raise gr.Error("Choose 'my uploads' only after uploading calibration images (this server keeps the "
                           f"latest {MAX_SESSIONS} visitors' uploads: upload them again if yours were dropped).")
        if mode not in MODES:
            raise gr.Error(f"Unknown mode {mode!r}; choose one of: {', '.join(MODES)}")
        if target is not None and target not in TARGETS:
            raise gr.Error(f"Unknown INT8 target {target!r}; choose one of: {', '.join(TARGETS)}")
        estimate = _calibration_estimate(model_a, model_b, int(samples))
        first_run = to_page(progress, f"{{}}: calibrating these settings for the first time (about {estimate:.0f} s "
                                      "in all; later runs read the cache)")
        settings = _calibration(method, samples, gain, seed)
        done = repr((model_a, model_b, settings, scheme, tuple(refinements or ())))
        light = calibration is None and not TARGETS.get(target) and _light(image)
        kind = "quick" if light and _DONE.peek(done) is not None else "short" if light and estimate < SHORT_SECONDS \
            else "long"
        with _lane(model_a, model_b, progress=progress, kind=kind, visitor=_visitor(request)) as run:
            tuned_a, tuned_b = (_refined(run, m, refinements, settings, scheme, progress) for m in (model_a, model_b))
            result = run(compare, image, tuned_a, tuned_b, settings, scheme, MODES[mode], display, calibration,
                         progress=first_run, target=TARGETS.get(target))
            note = coverage_note(result, [run(range_coverage, c, result.lr, max_side=COVERAGE_SIDE)
                                          for c in result.calibrations])
            _measured(result.calibrations)
    _DONE.put(done, True)
    original = result.truth if result.truth is not None else result.original
    panels = [original, result.fp32_a, result.int8_a, result.fp32_b, result.int8_b]
    tag = f" (refined: {', '.join(refinements)})" if refinements else ""
    on = f" on {target}" if TARGETS.get(target) else ""
    labels = ["Truth" if result.truth is not None else "Original", f"FP32 {_label(model_a)}{tag}",
              f"INT8 {_label(model_a)}{tag}{on}", f"FP32 {_label(model_b)}{tag}", f"INT8 {_label(model_b)}{tag}{on}"]
    state = {"panels": panels, "labels": labels, "seed": int(seed or 0),
             "reference_int8": result.reference_int8,
             "seconds": time.perf_counter() - started, "finished": time.strftime("%H:%M:%S")}
    history = _remember(history, result, (image, model_a, model_b, method, samples, scheme, mode, gain, target),
                        seed)
    state["sample"] = len(history["runs"])  # the how-many-th sample of these settings (the seed is a raw number)
    notices = "".join(f"⚠️ {notice}\n\n" for notice in result.notices)  # beside the panels, not toasts over controls
    return (*panels, metrics_frame(result.metrics), notices + note + spread_note(history),
            _chart(*result.calibrations), state, history)


def panel_labels(state):
    """Name each panel for the model (activation, size) it shows."""
    labels = state["labels"] if state else PANELS
    return [gr.update(label=label) for label in labels]


def _remember(history, result, settings, seed) -> dict:
    """This tab's INT8 losses per calibration seed, for the current settings (other settings start afresh)."""
    key = repr(settings)
    history = history if history and history.get("key") == key else {"key": key, "runs": {}}
    int8 = [row for row in result.metrics if row.kind is OutputKind.INT8]
    history["runs"][int(seed or 0)] = [row.psnr_vs_fp32_db for row in int8]
    return history


_CHARTS = Memo(16)  # (the two calibrations' keys, models) -> their range chart (it depends on nothing else)


def _chart(first, second):
    """The range chart of two calibrations (remembered)."""
    return _CHARTS.get((first.key, second.key, first.model, second.model), lambda: range_chart(first, second))


def run_slider(state, left, right):
    """The two chosen panels for the before/after slider."""
    if not state:
        return None
    return (state["panels"][PANELS.index(left)], state["panels"][PANELS.index(right)])


def _difference(state, pair, kind, gain, bar_height=28):
    if pair in TARGET_DIFFERENCES:
        if not state.get("reference_int8"):
            raise gr.Error("Choose a target under 'INT8 panels run on' and Run first: this view compares the "
                           "target's INT8 output with the reference's.")
        output, which = TARGET_DIFFERENCES[pair]
        return difference_image(state["panels"][output], state["reference_int8"][which], float(gain),
                                DIFFERENCE_KINDS[kind], bar_height)
    output, reference = DIFFERENCES[pair]
    return difference_image(state["panels"][output], state["panels"][reference], float(gain),
                            DIFFERENCE_KINDS[kind], bar_height)


def run_difference(state, pair, kind, gain):
    """The amplified difference between two panels, with its scale bar."""
    if not state:
        return None
    return _difference(state, pair, kind, gain)


def run_roi(state, center_x, center_y, size, pair=None, kind=None, gain=16):
    """The same crop of every panel (and of the difference view), enlarged."""
    if not state:
        return None
    images = list(state["panels"])
    target = pair in TARGET_DIFFERENCES and state.get("reference_int8")
    if (pair in DIFFERENCES or target) and kind in DIFFERENCE_KINDS:
        images.append(_difference(state, pair, kind, gain, bar_height=0))
    return roi_strip(images, center_x, center_y, int(size))


def zoom_at(state, size, pair, kind, gain, event: gr.SelectData):
    """Clicking a point of any panel centres the zoom there, on every panel at once."""
    if not state or event is None or event.index is None:
        return gr.update(), gr.update(), None
    height, width = state["panels"][0].shape[:2]
    center_x, center_y = (event.index[0] + 0.5) / width, (event.index[1] + 0.5) / height
    return center_x, center_y, run_roi(state, center_x, center_y, size, pair, kind, gain)


def apply_preset(preset):
    """Set the models, method and calibration gain of a preset, and show its note."""
    chosen = PRESETS[preset]
    model_a, model_b = chosen["models"]
    return (gr.update(value=model_a, label=f"Model A ({_label(model_a)})"),
            gr.update(value=model_b, label=f"Model B ({_label(model_b)})"),
            gr.update(value=chosen["method"]), gr.update(value=chosen["gain"]), PRESET_NOTES.get(preset, ""))


def relabel(model, which):
    """Name the chosen model in its dropdown's label."""
    return gr.update(label=f"Model {which} ({_label(model)})")


def relabel_a(model, request: gr.Request = None):
    _visitor(request)
    return relabel(model, "A")


def relabel_b(model, request: gr.Request = None):
    _visitor(request)
    return relabel(model, "B")


def refresh_models():
    """The model lists, after a training job added one."""
    models = available_models()
    return gr.update(choices=models), gr.update(choices=models)


def new_seed():
    """A fresh calibration seed: Recalibrate draws a new calibration sample."""
    return int(np.random.default_rng().integers(1, 1 << 30))
