"""The other handlers: an uploaded ONNX model checked and registered, model A's bundle and INT8-ready search, the
diagnosis (its cancel) and its fix, and the training and QAT jobs started, streamed and cancelled for their owner."""
from __future__ import annotations

import re
import shutil
import threading
from pathlib import Path

import gradio as gr
import pandas as pd

from sr.progress import Cancelled
from sr.cost import TooCostly, Uncountable
from sr.lab.bundle import export_bundle, zip_bundle
from sr.lab.compare import prepare_input
from sr.lab.diagnose import DiagnoseConfig, diagnose
from sr.lab.fixes import advise_fix, apply_fix
from sr.lab.plots import histogram_figure
from sr.lab.ready import ReadyConfig, make_ready
from sr.model.models import is_uploaded, model_info
from sr.model.contract import Overrides
from sr.run.register import register_onnx
from sr.quant.calibrate import CalibrationConfig, Method
from ui import jobs
from ui.comparison import _calibration, _check_image
from ui.server import (COST_LIMITS, MAX_REQUEST_SECONDS, PROBE_SECONDS, _boxed, _bundle_folder, _capped, _lane, _owner,
                       _user_errors, _verified_owner, _visitor, _visitor_share, to_page)
from ui.words import (_UPLOADED, _VISITOR, CALIB_SOURCES, FIX_LABELS, MODES, TARGETS, _label, _model_choices, _number, _shown,
                      advice_text, contract_text, diagnosis_text, ranking_frame, ready_report)

DIAGNOSE_SIDE = 128  # the diagnosis measures on a centre crop of at most this many LR pixels a side


def load_onnx_model(file, layout, color, value_range, pre_upsampled, scale, model_b, choices,
                    request: gr.Request = None):
    """Check and register an uploaded ONNX model; it becomes model A (and B too when B's scale differs)."""
    if file is None:
        return gr.update(), gr.update(), "", choices
    path = file if isinstance(file, str) else getattr(file, "name", str(file))
    auto = lambda value, cast=str: None if value in (None, "auto") else cast(value)  # noqa: E731
    overrides = Overrides(auto(layout), auto(color), auto(value_range, int), True if pre_upsampled else None,
                          auto(scale, int))
    with _user_errors("model check"), _visitor_share(_visitor(request), "probe"):
        try:  # checked, costed (before anything runs) and probed in a box of its own
            user = _boxed(PROBE_SECONDS)(register_onnx, path, overrides, limits=COST_LIMITS)
        except (Uncountable, TooCostly) as error:
            raise gr.Error(f"{Path(path).name} cannot run on this server: {error} (the shipped teacher needs 0.9 "
                           "million multiply-accumulates a pixel). Run it locally (python -m sr ... --onnx) for no "
                           "limit.") from None
    _UPLOADED.put((_VISITOR.get(), user.name), Path(path).name)
    choices = [*(choices or []), user.name]
    models = _model_choices(choices)
    same_scale = model_info(model_b).scale == user.contract.scale
    return (gr.update(choices=models, value=user.name, label=f"Model A ({_label(user.name)})"),
            gr.update(choices=models) if same_scale else gr.update(choices=models, value=user.name,
                                                                 label=f"Model B ({_label(user.name)})"),
            contract_text(user), choices)


def build_bundle(image, model_a, method, samples, gain, seed, mode, request: gr.Request = None,
                 progress=gr.Progress()):
    """Calibrate model A as set and offer the deployment bundle as a zip."""
    progress = _capped(progress, "INT8 export")
    with _user_errors("INT8 export"):
        config = _calibration(method, samples, gain, seed)
        lr = []
        if image is not None:
            lr = [prepare_input(image, MODES.get(mode, mode), model_info(model_a).scale).lr]
        folder = _bundle_folder()
        with _lane(model_a, progress=progress, visitor=_visitor(request)) as run:
            bundle = run(export_bundle, model_a, config, folder / "bundle", images=lr, shown_as=_shown(model_a),
                         progress=to_page(progress))
        name = re.sub(r"[^\w.-]+", "-", _shown(model_a)).strip("-")
        archive = zip_bundle(bundle, folder / f"{name}-int8-{config.method.value}.zip")
        shutil.rmtree(folder / "bundle", ignore_errors=True)  # the zip is what is offered
        return str(archive)


READY_IMAGES = 4  # the search measures on this many calibration images (each candidate: one pass over them)


def make_ready_for(model_a, samples, scheme, target, minutes, uploads, model_b, panels=None,
                   request: gr.Request = None, progress=gr.Progress()):
    """Make model A INT8-ready (`sr.lab.ready`, what `python -m sr int8-ready` runs): the route taken as a table,
    the chosen model's bundle as a zip, and the chosen model offered as model A when it is a tuned copy. With a
    target chosen for the INT8 panels (`panels`), the choice is checked and judged as that target runs it."""
    progress = _capped(progress, "INT8-ready search")
    with _user_errors("INT8-ready search"):
        minutes = min(float(minutes), (MAX_REQUEST_SECONDS - 60) / 60)  # room for the bundle within the cap
        config = ReadyConfig(model_a, target_db=float(target), budget_minutes=minutes, scheme=scheme,
                             calibration=CalibrationConfig(method=Method.AUTO, samples=int(samples)),
                             max_images=READY_IMAGES, qat=jobs.POLICY.enabled, engine=_target(panels))
        folder = _bundle_folder()
        with _lane(model_a, progress=progress, visitor=_visitor(request)) as run:
            result = run(make_ready, config, progress=to_page(progress))
            chosen = result.chosen
            bundle = run(export_bundle, chosen.model, chosen.calibration, folder / "bundle", chosen.fixes,
                         shown_as=f"{_shown(model_a)}, made INT8-ready")
            tuned = chosen.model != str(model_a) and not chosen.fixes.keep_float
            offered = (run(register_onnx, chosen.model).name if chosen.model.endswith(".onnx") else chosen.model) \
                if tuned else None
        name = re.sub(r"[^\w.-]+", "-", _shown(model_a)).strip("-")
        archive = zip_bundle(bundle, folder / f"{name}-int8-ready.zip")
        shutil.rmtree(folder / "bundle", ignore_errors=True)
    if offered and is_uploaded(offered):
        _UPLOADED.put((_VISITOR.get(), offered), f"{_shown(model_a)}, INT8-ready")
    a, b, uploads = offer_result(offered, uploads, model_b, request)
    # the page's settings become the chosen model's calibration (the comparison that follows shows what the bundle
    # holds); its refinements are in the tuned model already
    shown = chosen.calibration
    return (ready_report(result, model_a), str(archive), a, b, uploads, gr.update(value=shown.method.value),
            gr.update(value=shown.gain), gr.update(value=shown.seed), gr.update(value=[]),
            gr.update(value=CALIB_SOURCES[0]))


# per owner token (one per browser: its tabs share it): the running diagnoses' stop events, each set by Cancel
# and polled by its diagnosis, removed when it ends (the table holds running diagnoses only)
_STOPS: dict[str, set[threading.Event]] = {}
_STOPS_LOCK = threading.Lock()


def run_diagnose(image, model_a, model_b, which, mode, method, samples, scheme, gain=1.0, seed=0, owner=None,
                 panels=None, request: gr.Request = None, progress=gr.Progress()):
    """Rank the tensors of model A or B by the damage their INT8 range does (the `diagnose` API endpoint).

    It measures on the image's centre crop of at most DIAGNOSE_SIDE LR pixels a side, and stops on Cancel (from
    the page whose owner token started it; an API call without one cannot be cancelled)."""
    _check_image(image)
    progress = _capped(progress, "diagnosis")
    stop, ident = threading.Event(), _verified_owner(owner)
    if ident is not None:  # only its own browser's Cancel can reach it
        with _STOPS_LOCK:
            _STOPS.setdefault(ident, set()).add(stop)
    try:
        return _diagnosed(image, model_a if which == "model A" else model_b, mode,
                          _calibration(method, samples, gain, seed), scheme, stop, progress, _visitor(request),
                          _target(panels))
    finally:
        if ident is not None:
            with _STOPS_LOCK:
                running = _STOPS.get(ident, set())
                running.discard(stop)
                if not running:
                    _STOPS.pop(ident, None)


def _target(panels) -> str | None:
    """The engine kind of the target the INT8 panels run on (None: the reference)."""
    if panels is not None and panels not in TARGETS:
        raise gr.Error(f"Unknown INT8 target {panels!r}; choose one of: {', '.join(TARGETS)}")
    return TARGETS.get(panels)


def _diagnosed(image, model, mode, calibration, scheme, stop, progress, visitor, engine=None):
    with _user_errors("diagnosis"):
        config = DiagnoseConfig(model, calibration, scheme, max_side=DIAGNOSE_SIDE, engine=engine)
        try:
            with _lane(model, progress=progress, visitor=visitor) as run:
                report = run(diagnose, config, images=[image], mode=MODES.get(mode, mode),
                             progress=to_page(progress, "{} (cancel to stop)"), stop=stop.is_set)
                advice = run(advise_fix, report, image, MODES.get(mode, mode),
                             progress=to_page(progress, "measuring the fixes: {}"), stop=stop.is_set)
        except Cancelled as error:
            raise gr.Error(f"Diagnosis cancelled: {error}.") from None
    culprit = advice.tensor or (report.ranking[0].tensor if report.ranking else None)
    chosen = report.calibrated.ranges.get(culprit)
    figure = histogram_figure(report.stats[culprit], max(abs(chosen.low), abs(chosen.high))) if culprit else None
    note = (f"\n\nMeasured on the centre {DIAGNOSE_SIDE}x{DIAGNOSE_SIDE} LR pixels of the image at most (two "
            "simulated passes per tensor).")
    fix = gr.update(value=FIX_LABELS[advice.fix]) if advice.fix is not None else gr.update()
    return (ranking_frame(report), figure, diagnosis_text(report) + "\n\n" + advice_text(advice, report) + note,
            gr.update(choices=[r.tensor for r in report.ranking], value=culprit), report, fix)


def cancel_diagnosis(owner=None) -> None:
    """Ask this page's running diagnosis to stop after its current pass (nobody else's)."""
    with _STOPS_LOCK:
        running = list(_STOPS.get(_owner(owner), ()))
    for stop in running:
        stop.set()
    if running:
        gr.Info("Stopping the diagnosis after the current pass." if len(running) == 1 else
                f"Stopping this browser's {len(running)} diagnoses after their current passes.")


def run_fix(image, report, tensor, fix_label, mode, request: gr.Request = None, progress=gr.Progress()):
    """Recalibrate with one fix on one tensor; the real INT8 model before and after."""
    _check_image(image)
    if report is None:
        raise gr.Error("Run the diagnosis first.")
    fix = next((fix for fix, label in FIX_LABELS.items() if label == fix_label), None)
    if fix is None:
        raise gr.Error(f"Unknown fix {fix_label!r}; choose one of: {', '.join(FIX_LABELS.values())}")
    progress = _capped(progress, "fix")
    with _user_errors("fix"):
        with _lane(report.model, progress=progress, visitor=_visitor(request)) as run:
            outcome = run(apply_fix, report, tensor, fix, image, MODES.get(mode, mode),
                          progress=to_page(progress))
    against = "truth" if outcome.has_truth else "FP32"
    table = pd.DataFrame([
        {"INT8 model": "before", f"PSNR vs {against} (dB)": _number(outcome.psnr_before_db, 2),
         "brightness vs FP32": _number(outcome.brightness_before, 4)},
        {"INT8 model": f"after: {fix_label} on {tensor}", f"PSNR vs {against} (dB)": _number(outcome.psnr_after_db, 2),
         "brightness vs FP32": _number(outcome.brightness_after, 4)}])
    return outcome.before, outcome.after, table


def start_training(steps, activation, use_teacher, alpha, kd_mode="output", owner=None):
    """Queue a job for this page's owner and stream its loss and validation PSNR until it ends."""
    try:
        job = jobs.start(_owner(owner), int(steps), activation, bool(use_teacher), float(alpha), kd_mode)
    except (PermissionError, ValueError) as error:
        raise gr.Error(str(error)) from None
    for snapshot in job.stream():
        frame = pd.DataFrame(snapshot.history or [{"step": 0, "loss": None}])
        frame["step"] = frame["step"].astype(float)  # a numeric x axis, not one category per step
        validation = frame.dropna(subset=["val_psnr"])[["step", "val_psnr"]] if "val_psnr" in frame \
            else pd.DataFrame({"step": [], "val_psnr": []})
        yield snapshot.status, frame[["step", "loss"]].dropna(), validation


def start_qat(model, steps, use_teacher=False, owner=None):
    """Queue a QAT job for model A and stream its fake-quantized validation PSNR; the last value carries the new
    model, and the status line the written INT8 model's score on the reference."""
    try:
        job = jobs.start_qat(_owner(owner), model, int(steps), bool(use_teacher))
    except (PermissionError, ValueError, FileNotFoundError) as error:
        raise gr.Error(str(error)) from None
    for snapshot in job.stream():
        frame = pd.DataFrame(snapshot.history or [{"step": 0}])
        frame["step"] = frame["step"].astype(float)
        validation = frame.dropna(subset=["val_psnr"])[["step", "val_psnr"]] if "val_psnr" in frame \
            else pd.DataFrame({"step": [], "val_psnr": []})
        yield snapshot.status, validation, job.result if snapshot.done else None


def offer_result(result, uploads, model_b, request: gr.Request = None):
    """Add a finished INT8-ready model to the model lists and make it model A."""
    if not result:
        return gr.update(), gr.update(), uploads
    _visitor(request)
    if is_uploaded(result):
        if _UPLOADED.peek((_VISITOR.get(), result)) is None:  # (make_ready_for names it after its source)
            _UPLOADED.put((_VISITOR.get(), result), f"{result[5:13]} (INT8-ready)")
        uploads = [*(uploads or []), result]
    models = _model_choices([*(uploads or []), *([] if is_uploaded(result) else [result])])
    return gr.update(choices=models, value=result, label=f"Model A ({_label(result)})"), gr.update(choices=models), \
        uploads


def cancel_training(owner=None):
    """Stop this page's job (its weights so far are kept); nobody else's job is touched."""
    return jobs.cancel(_owner(owner))
