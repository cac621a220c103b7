"""SR INT8 Lab: the Gradio app, a thin shell over `sr/` (layout, event wiring and every word a user reads).

    python app.py [--host 0.0.0.0] [--port 7860] [--share]
"""
from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import contextvars
import hmac
import inspect
import json
import logging
import math
import os
import re
import secrets
import shutil
import tempfile
import threading
import time
import types
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr
from PIL import Image as PILImage
import numpy as np
import pandas as pd

import app_jobs
from sr.quant.calibdata import ensure_calibration_images
from sr.quant.calibrate import CalibrationConfig, Method
from sr.tune.ptq import RefineConfig, refine
from sr.lab.compare import InputMode, OutputKind, available_models, compare, roi_strip
from sr.data import ImageLoadError, bicubic_resize, load_image
from sr.lab.coverage import range_coverage
from sr.lab.diagnose import DiagnoseConfig, DiagnosisCancelled, diagnose
from sr.lab.fixes import Fix, NoFixReason, advise_fix, apply_fix
from sr.lab.bundle import export_bundle, zip_bundle
from sr.lab.compare import prepare_input
from sr.model.models import is_uploaded, model_info
from sr.model.contract import Overrides
from sr.model.usermodel import register_onnx
from sr.lab.plots import DifferenceKind, difference_image, histogram_figure, range_chart
from sr.quant.quantspec import Scheme
from sr.quant.recipe import Refinement
from sr.lab.ready import ReadyConfig, make_ready
from sr.box import BoxLimit, Exceeded, Limits, Stopped, run_boxed
from sr.cost import CostLimits, TooCostly, Uncountable
from sr.store import Memo, cache_root, remove_stale_temps, write_atomic

log = logging.getLogger("app")
HEAVY = "heavy"  # one concurrency id for all CPU-heavy work: parallel users queue instead of oversubscribing
# Four lanes, one job running in each: "quick" (a comparison of the shipped models with settings this server has
# already run: it reads the cache, a second or two, in this process), "short" (a first calibration of the shipped
# models estimated under SHORT_SECONDS), "long" (the rest on the shipped models: big calibrations, diagnoses,
# bundles, int8-ready) and "uploaded" (anything touching an uploaded model). All but quick run in a box at a lower
# priority. A lane keeps at most WAITING[lane] requests waiting in a heavy slot (the rest are refused in words),
# and each visitor at most SHARE requests in each lane: one visitor's long jobs or floods cannot hold the slots,
# and a long job never delays a short one.
HEAVY_SLOTS = 16
_LANES = {lane: threading.Lock() for lane in ("uploaded", "long", "short", "quick")}
_WAITING: dict[str, list[object]] = {"long": [], "short": [], "quick": []}  # the requests waiting, first first
WAITING = {"long": 1, "short": 10, "quick": HEAVY_SLOTS}
SHORT_SECONDS = 30.0
# requests one visitor may have in each lane at once (and in the upload check, "probe")
SHARE = {"quick": 2, "short": 1, "long": 1, "uploaded": 1, "probe": 1}
_SHARES: dict[tuple[str, str], int] = {}  # (visitor, lane) -> requests in it now
_SHARES_LOCK = threading.Lock()
# and at most RATE heavy requests started in any RATE_SECONDS: a flood sent at once is answered in words at once,
# instead of taking turns in the slots ahead of everyone who came after it
RATE, RATE_SECONDS = 4, 10.0
_STARTS = Memo(4096)  # visitor -> the times of its latest heavy requests
_DONE = Memo(1024)  # the comparison settings this server has completed: run again, they read the cache
QUICK_DECODE_PIXELS = 4_000_000  # a larger image, or one of more than 8 bits, is decoded in the long lane


UPLOADED_NICE = 10  # the CPU priority of boxed work (CFS weight 110 against the quick lane's 1024)
# the box every uploaded model runs in (sr.box: a process of its own): memory and wall time the operator can set
BOX_MEMORY_BYTES = int(float(os.environ.get("SR_BOX_MEMORY_GB", "3")) * 2**30)
SHIPPED_BOX_BYTES = int(float(os.environ.get("SR_SHIPPED_BOX_MEMORY_GB", "8")) * 2**30)  # short and long lanes
PROBE_SECONDS = float(os.environ.get("SR_PROBE_SECONDS", "60"))  # an upload's check and contract probe
PROBES = 2  # uploads checked at once (each in its box): one visitor's upload waits at most PROBE_SECONDS for another


def _direct(work, *args, progress=None, stop=None, **kwargs):
    """Trusted work (the shipped models) in this process, as `_boxed` would run it: `stop` reaches work that
    polls a `should_stop` (the boxed work is killed instead)."""
    if progress is not None:
        kwargs["progress"] = progress
    if stop is not None and "should_stop" in inspect.signature(work).parameters:
        kwargs["should_stop"] = stop
    return work(*args, **kwargs)


def _boxed(seconds: float, memory: int | None = None, nice: int = UPLOADED_NICE):
    """How to run work in a box (sr.box) with `memory` (BOX_MEMORY_BYTES by default), `seconds` and `nice`,
    killed at its deadline; what it cost in words when it goes over."""

    def run(work, *args, progress=None, stop=None, **kwargs):
        return run_boxed(work, *args, box=Limits(memory or BOX_MEMORY_BYTES, seconds, nice),
                         progress=progress, should_stop=stop, **kwargs)

    return run


@contextlib.contextmanager
def _visitor_share(visitor: str | None, lane: str):
    """Count one request of `visitor` (a page session) in `lane`; over its SHARE it is refused in words."""
    if visitor is None:  # a direct call (tests, scripts): nobody to share with
        yield
        return
    with _SHARES_LOCK:
        now, starts = time.monotonic(), _STARTS.get(visitor, list)
        starts[:] = [t for t in starts if now - t < RATE_SECONDS]
        if len(starts) >= RATE:
            raise gr.Error(f"You sent more than {RATE} requests in {RATE_SECONDS:.0f} s; wait a moment (each visitor "
                           "gets a fair share of this server).")
        starts.append(now)
        held = _SHARES.get((visitor, lane), 0)
        if held >= SHARE[lane]:
            raise gr.Error(f"You already have {held} request(s) of this kind running; wait for {'it' if held == 1 else 'them'} "
                           "to finish (each visitor gets a fair share of this server).")
        _SHARES[(visitor, lane)] = held + 1
    try:
        yield
    finally:
        with _SHARES_LOCK:
            left = _SHARES.pop((visitor, lane)) - 1
            if left:
                _SHARES[(visitor, lane)] = left


def _wait_turn(lane: str, progress) -> None:
    """Take `lane`'s lock, showing the real place in line; a lane with WAITING[lane] waiting already is refused
    in words (a waiting request holds one of the heavy slots)."""
    me = object()
    with _SHARES_LOCK:
        if len(_WAITING[lane]) >= WAITING[lane] and _LANES[lane].locked():
            raise gr.Error(f"The server is busy with other visitors' {lane} jobs (first calibrations, diagnoses, "
                           "bundles): try again in a minute. Comparisons with settings already run answer at once.")
        _WAITING[lane].append(me)
    try:
        while not _LANES[lane].acquire(timeout=0.5):
            if progress is not None:
                progress(None, desc=f"waiting: number {_WAITING[lane].index(me) + 1} in line")
    finally:
        with _SHARES_LOCK:
            _WAITING[lane].remove(me)


@contextlib.contextmanager
def _lane(*models, progress=None, kind: str = "long", visitor: str | None = None):
    """Hold the lane of this work and yield how to run the work in it: "uploaded" when any model is an uploaded
    ONNX model (in a box: `_boxed`), else `kind` ("quick": the caller knows it reads the cache, in this process;
    "short" or "long": in a box too, for its priority and its kill). The uploaded lane does not wait inside a
    heavy slot: when another uploaded model is being worked on, this one is refused in words."""
    lane = "uploaded" if any(is_uploaded(m) for m in models) else kind
    with _visitor_share(visitor, lane):
        if lane == "uploaded" and not _LANES[lane].acquire(blocking=False):
            raise gr.Error("Another visitor's uploaded model is being processed (uploaded models take turns so that "
                           "nobody's comparison of the shipped models waits for them): try again in a minute.")
        if lane != "uploaded":
            _wait_turn(lane, progress)
        try:
            # short jobs (a first calibration of the shipped models, bounded) at the usual priority, so that the
            # long and uploaded ones take only the CPU they leave
            yield _direct if lane == "quick" else _boxed(MAX_REQUEST_SECONDS,
                                                         None if lane == "uploaded" else SHIPPED_BOX_BYTES,
                                                         0 if lane == "short" else UPLOADED_NICE)
        finally:
            _LANES[lane].release()


# Every heavy request stops (in words) after this many seconds: with the cost cap on uploaded models, ordinary
# work takes well under a minute; the operator can raise it (SR_MAX_REQUEST_SECONDS)
MAX_REQUEST_SECONDS = float(os.environ.get("SR_MAX_REQUEST_SECONDS", "300"))


def _capped(progress, what: str):
    """`progress` for one heavy request, which stops it once it has run MAX_REQUEST_SECONDS (the library calls it
    between batches, so the request ends there, its caches left whole)."""
    deadline = time.monotonic() + MAX_REQUEST_SECONDS

    def report(fraction, desc=None, **kwargs):
        if time.monotonic() > deadline:
            raise gr.Error(f"The {what} was stopped: it ran longer than {MAX_REQUEST_SECONDS:.0f} s, the limit for one "
                           "request on this server: try fewer calibration samples, a smaller image, or run it locally.")
        progress(fraction, desc=desc, **kwargs)

    return report


PANELS = ("Original", "FP32 model A", "INT8 model A", "FP32 model B", "INT8 model B")
MAX_UPLOAD = "25mb"
# an uploaded model's cost, known from its graph before anything runs (sr.model.usermodel.macs_per_pixel); the operator
# can raise it (SR_MAX_MMAC_PER_PIXEL); ten 3x3 convolutions of 256 channels need 5.9 million
MAX_MACS_PER_PIXEL = float(os.environ.get("SR_MAX_MMAC_PER_PIXEL", "2.0")) * 1e6
# and the largest tensor it makes (values per input pixel: x4 at 256 channels is 4096) and its scale, the largest
# the page offers; a graph whose cost cannot be counted (control flow, sizes known only at run time) is refused
COST_LIMITS = CostLimits(MAX_MACS_PER_PIXEL, float(os.environ.get("SR_MAX_TENSOR_PER_PIXEL", "4096")),
                         float(os.environ.get("SR_MAX_SCALE", "4")))
MODES = {"Upscale my image": InputMode.UPSCALE, "Check against ground truth": InputMode.GROUND_TRUTH}
CALIB_SOURCES = ("calib_data/", "my uploads")
DIAGNOSE_SIDE = 128  # the diagnosis measures on a centre crop of at most this many LR pixels a side
MAX_CALIBRATION_FILES = 64
MAX_CALIBRATION_PIXELS = 4_000_000  # per calibration image file
# what a session keeps of each: at most this many pixels (downscaled on upload; the calibration crops 64x64
# patches after downscaling by the model's scale anyway), so that 64 uploads hold at most ~100 MB
KEPT_CALIBRATION_PIXELS = 500_000
SESSION_STATE_SECONDS = 3600  # per-session state (images, results) is freed this long after it was set
# and at most this many sessions keep state at once (Gradio drops the least recently active beyond it): memory
# for sessions is bounded however many ids clients make up
MAX_SESSIONS = int(os.environ.get("SR_MAX_SESSIONS", "48"))
COVERAGE_WARNING = 0.01  # warn when a tensor has more than 1% of this image's values outside its range
COVERAGE_SIDE = 128  # the coverage check runs on a copy downscaled to at most this many pixels a side
HEADER_CHAR_PX, HEADER_PADDING_PX = 10, 48  # a header word's characters (bold monospace) and a cell's padding + menu
WIDE_COLUMN_PX = 220  # a column of names (tensors, models, engines)
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


def _untouched(component: gr.Image, payload):
    """The uploaded file's path; a pasted data URL is written to a file first, byte for byte."""
    if payload is None:
        return None
    if payload.url and payload.url.startswith("data:"):
        header, _, body = payload.url.partition(",")
        data = base64.b64decode(body) if ";base64" in header else body.encode()
        return str(_pasted(data))
    if payload.path is None:
        raise gr.Error("The upload arrived without a file.")
    return str(payload.path)


PASTED_KEEP = 32  # pasted images (data: URLs) kept on disk, newest first; the same bytes are one file


def _pasted(data: bytes) -> Path:
    """A pasted image's bytes as a file under the cache's pasted/ (named by their hash: pasting the same image
    again adds nothing), the oldest beyond PASTED_KEEP removed: pastes cannot fill the disk."""
    folder = cache_root() / "pasted"
    path = folder / f"{hashlib.sha256(data).hexdigest()[:32]}.upload"
    if not path.is_file():
        write_atomic(data, path)
    os.utime(path)
    kept = sorted(folder.glob("*.upload"), key=lambda p: p.stat().st_mtime if p.exists() else 0, reverse=True)
    for old in kept[PASTED_KEEP:]:
        old.unlink(missing_ok=True)
    return path


def untouched_image(**kwargs) -> gr.Image:
    """A gr.Image whose upload reaches the handler as the very file the user sent (a path): Gradio neither decodes
    nor converts it, so RGBA, 16-bit, CMYK and broken files all meet `sr.data.load_image` and its messages. (An
    instance override rather than a subclass: Gradio writes a .pyi stub beside any module defining a component.)"""
    component = gr.Image(type="filepath", image_mode=None, **kwargs)
    component.preprocess = types.MethodType(_untouched, component)
    return component


def _examples() -> list[str]:
    images = ensure_calibration_images()
    return [str(p) for p in images if p.name.endswith("-0.png")][:4]


@contextlib.contextmanager
def _user_errors(action: str):
    """Turn what the library raises into messages a person reads: its ValueError and FileNotFoundError as they
    are, anything else as "The <action> failed" (the traceback stays in the server log, never on the page)."""
    try:
        yield
    except gr.Error:
        raise
    except BoxLimit as error:
        log.warning("%s stopped in its box: %s", action, error)
        advice = {Exceeded.TIME: "try fewer calibration samples or a smaller image, or run it locally",
                  Exceeded.MEMORY: "try a smaller image, or run it locally",
                  Exceeded.DIED: "run it locally (python -m sr ...) to see why"}[error.exceeded]
        raise gr.Error(f"The {action} was stopped: it {error.words} (one request on this server gets at most "
                       f"{error.limits.memory_bytes / 2**30:.1f} GB and {error.limits.seconds:.0f} s); {advice}. "
                       "Nothing else was affected.") from None
    except FileNotFoundError as error:  # the library names files by their base name; never a server path
        raise gr.Error(_no_paths(str(error))) from None
    except ValueError as error:
        raise gr.Error(str(error)) from None
    except PermissionError:
        log.exception("%s failed", action)
        raise gr.Error(f"The {action} failed: the server cannot write its cache folder (read-only?). The operator "
                       "can point SR_CACHE_DIR at a writable one.") from None
    except Exception as error:
        log.exception("%s failed", action)
        raise gr.Error(f"The {action} failed: {type(error).__name__}: {_no_paths(str(error))}") from None


def _no_paths(message: str) -> str:
    """A message without absolute file paths (a visitor sees the file's name at most)."""
    return re.sub(r"(?<![\w.])/(?:[^\s/:'\"]+/)+([^\s/:'\"]+)", r"\1", message)


def _visitor(request) -> str | None:
    """Whose request this is (its page session; None for a direct call), for the fair shares and the names it
    gave its models (set for the rest of this request)."""
    visitor = getattr(request, "session_hash", None) or None
    _VISITOR.set(visitor)
    return visitor


def _light(image) -> bool:
    """Whether the image decodes cheaply (at most QUICK_DECODE_PIXELS, 8 bits a sample): priced from its header,
    before any pixel is decoded; a heavy one is decoded in the long lane, in the requester's share."""
    if not isinstance(image, (str, os.PathLike)):
        return True
    try:
        with PILImage.open(image) as header:
            return header.size[0] * header.size[1] <= QUICK_DECODE_PIXELS and header.mode in ("RGB", "RGBA", "L", "P",
                                                                                             "LA", "1")
    except Exception:  # noqa: BLE001 (unreadable: the decoder's own words come later, in the long lane)
        return False


def _check_image(image) -> None:
    if image is None:
        raise gr.Error("Upload an image first (drag and drop, file picker or paste).")


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
                         progress=lambda fraction, message: progress(fraction, desc=message))
        name = re.sub(r"[^\w.-]+", "-", _shown(model_a)).strip("-")
        archive = zip_bundle(bundle, folder / f"{name}-int8-{config.method.value}.zip")
        shutil.rmtree(folder / "bundle", ignore_errors=True)  # the zip is what is offered
        return str(archive)


READY_IMAGES = 4  # the search measures on this many calibration images (each candidate: one pass over them)


def make_ready_for(model_a, samples, scheme, target, minutes, uploads, model_b, request: gr.Request = None,
                   progress=gr.Progress()):
    """Make model A INT8-ready (`sr.lab.ready`, what `python -m sr int8-ready` runs): the route taken as a table,
    the chosen model's bundle as a zip, and the chosen model offered as model A when it is a tuned copy."""
    progress = _capped(progress, "INT8-ready search")
    with _user_errors("INT8-ready search"):
        minutes = min(float(minutes), (MAX_REQUEST_SECONDS - 60) / 60)  # room for the bundle within the cap
        config = ReadyConfig(model_a, target_db=float(target), budget_minutes=minutes, scheme=scheme,
                             calibration=CalibrationConfig(method=Method.AUTO, samples=int(samples)),
                             max_images=READY_IMAGES, qat=app_jobs.POLICY.enabled)
        folder = _bundle_folder()
        with _lane(model_a, progress=progress, visitor=_visitor(request)) as run:
            result = run(make_ready, config, progress=lambda fraction, message: progress(fraction, desc=message))
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


def ready_report(result, model_a) -> str:
    """The INT8-ready search as the page shows it: each route's candidates, the choice, what it costs."""
    lines = [f"**{_shown(model_a)}**: target {result.target_db:.3f} dB below the original FP32 model, measured on "
             f"{result.measured_on} (the CLI's `int8-ready --data` measures on your own ground-truth images).", "",
             "| route | candidate | loss vs original FP32 (dB) | brightness |", "|---|---|---|---|"]
    for step in result.steps:
        lines += [f"| {step.route} | {c.what} | {c.loss_db:+.3f} | {c.brightness:.3f} |" for c in step.tried]
    notes = [note for step in result.steps for note in step.notes]
    if not app_jobs.POLICY.enabled:
        notes.append("QAT is off on this server (fine-tuning is allowed only with --allow-training); run "
                     "`python -m sr int8-ready` locally for that route")
    verdict = "target met" if result.met else "target **not** met: the best reached"
    lines += ["", f"**Chosen: {result.chosen.what}**, {result.loss_db:+.3f} dB, {verdict}, in {result.seconds:.0f} s. "
              "The bundle below is this model."]
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


BUNDLE_KEEP_SECONDS = 900  # a bundle's zip stays this long for its download, then the next bundle removes it


def _bundle_folder() -> Path:
    """A fresh folder for one bundle under the cache's bundles/, after removing those older than
    BUNDLE_KEEP_SECONDS (so bundles cannot fill the disk)."""
    root = _remove_old_bundles()
    return Path(tempfile.mkdtemp(prefix="bundle-", dir=root))


def _remove_old_bundles() -> Path:
    """Remove the bundles older than BUNDLE_KEEP_SECONDS (also every few minutes, from `_sweeper`)."""
    root = cache_root() / "bundles"
    root.mkdir(parents=True, exist_ok=True)
    for old in root.iterdir():
        try:
            if time.time() - old.stat().st_mtime > BUNDLE_KEEP_SECONDS:
                shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
        except OSError:
            pass
    return root


def _sweeper(every: float = BUNDLE_KEEP_SECONDS / 3) -> None:
    """Remove old bundles every `every` seconds, whether or not anyone asks for a new one."""
    while True:
        time.sleep(every)
        with contextlib.suppress(OSError):
            _remove_old_bundles()


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
        return CalibrationConfig(method=method, samples=int(samples), gain=float(gain), seed=int(seed or 0))
    except (TypeError, ValueError) as error:  # a missing or non-numeric widget value through the API
        if isinstance(error, ValueError) and "samples must" in str(error):
            raise
        raise ValueError(f"the calibration settings must be numbers (samples {samples!r}, gain {gain!r}, seed "
                         f"{seed!r})") from None


def _refined(run, model: str, refinements, calibration: CalibrationConfig, scheme: str, progress) -> str:
    """`model`, or its refined version (sr.tune.ptq; made once per setting, then cached)."""
    if not refinements:
        return model
    config = RefineConfig(model, list(refinements), calibration, scheme)
    return str(run(refine, config, progress=lambda fraction, message: progress(
        fraction, desc=f"refining {model}: {message} (first time only)")))


REFERENCE_TARGET = "reference (ONNX Runtime, CPU)"
# what the INT8 panels run on: the reference, or a target's own numerics (sr.run.runtime's engine kinds)
TARGETS = {REFERENCE_TARGET: None, "Qualcomm HTP v73 (simulated)": "qnn-htp", "LiteRT, XNNPACK": "litert",
           "LiteRT, reference kernels": "litert-ref"}


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
        first_run = lambda fraction, message: progress(  # noqa: E731
            fraction, desc=f"{message}: calibrating these settings for the first time (about {estimate:.0f} s in all; "
                           "later runs read the cache)")
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


def done_note(state) -> str:
    """The page's "done" line: how long the comparison took and which calibration sample it drew."""
    if not state:
        return ""
    return (f"Done at {state['finished']} in {state['seconds']:.1f} s (calibration sample {state.get('sample', 1)} "
            f"of these settings, seed {state['seed']}).")


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


_CHARTS = Memo(16)  # (the two calibrations' keys, models) -> their range chart (it depends on nothing else)


def _chart(first, second):
    """The range chart of two calibrations (remembered)."""
    return _CHARTS.get((first.key, second.key, first.model, second.model), lambda: range_chart(first, second))


def run_slider(state, left, right):
    """The two chosen panels for the before/after slider."""
    if not state:
        return None
    return (state["panels"][PANELS.index(left)], state["panels"][PANELS.index(right)])


DIFFERENCES = {  # label -> (panel index of the output, panel index of the reference)
    "INT8 A vs FP32 A": (2, 1), "INT8 B vs FP32 B": (4, 3), "INT8 B vs INT8 A": (4, 2), "FP32 B vs FP32 A": (3, 1)}
# label -> (panel index of the target's INT8 output, which model's reference INT8 output it is set against)
TARGET_DIFFERENCES = {"INT8 A: target vs reference": (2, 0), "INT8 B: target vs reference": (4, 1)}
DIFFERENCE_KINDS = {"|difference| of luma": DifferenceKind.LUMA, "|difference| per channel": DifferenceKind.CHANNELS,
                    "brightness shift (blue: darker, red: brighter)": DifferenceKind.BRIGHTNESS_SHIFT}


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


def diagnosis_text(report) -> str:
    """The diagnosis in one Markdown paragraph."""
    if not report.ranking:
        return "Nothing to rank."
    top = report.ranking[0]
    whole = (f"FP32 {report.fp32_psnr_y:.2f} dB and all activations INT8 {report.int8_psnr_y:.2f} dB against the "
             "ground truth" if report.has_truth else
             f"all activations INT8 are {report.int8_psnr_vs_fp32_db:.2f} dB from the FP32 output (no ground truth)")
    return (f"**{_shown(report.model)}**, {report.method} / {report.samples} samples / {report.scheme}: {whole}, "
            f"brightness "
            f"{report.int8_brightness:.3f}. The worst tensor is `{top.tensor}` ({top.op} -> "
            f"{', '.join(top.consumers) or 'output'}): quantized alone it puts the output "
            f"{top.alone_psnr_vs_fp32_db:.2f} dB from FP32; keeping only it in float recovers {top.recovery_db:.2f} dB. "
            f"Its range [{top.low:.3g}, {top.high:.3g}] clips {100 * top.clipped_fraction:.3f}% of its calibration "
            f"values and {100 * top.clipped_energy:.1f}% of their energy (observed [{top.observed_min:.3g}, "
            f"{top.observed_max:.3g}]).")


def ranking_frame(report) -> pd.DataFrame:
    """The diagnosis ranking with the app's column names."""
    return pd.DataFrame([{"tensor": r.tensor, "op": r.op, "PSNR vs FP32, alone (dB)": _number(r.alone_psnr_vs_fp32_db, 2),
                          "drop vs truth, alone (dB)": _number(r.psnr_drop_db, 3),
                          "recovery if kept float (dB)": _number(r.recovery_db, 3),
                          "brightness alone": _number(r.brightness, 4), "SQNR (dB)": _number(r.sqnr_db, 1),
                          "clipped %": _number(100 * r.clipped_fraction, 3),
                          "clipped energy %": _number(100 * r.clipped_energy, 2)} for r in report.ranking])


# per owner token (one per browser: its tabs share it): the running diagnoses' stop events, each set by Cancel
# and polled by its diagnosis, removed when it ends (the table holds running diagnoses only)
_STOPS: dict[str, set[threading.Event]] = {}
_STOPS_LOCK = threading.Lock()


def run_diagnose(image, model_a, model_b, which, mode, method, samples, scheme, gain=1.0, seed=0, owner=None,
                 request: gr.Request = None, progress=gr.Progress()):
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
                          _calibration(method, samples, gain, seed), scheme, stop, progress, _visitor(request))
    finally:
        if ident is not None:
            with _STOPS_LOCK:
                running = _STOPS.get(ident, set())
                running.discard(stop)
                if not running:
                    _STOPS.pop(ident, None)


def _diagnosed(image, model, mode, calibration, scheme, stop, progress, visitor):
    with _user_errors("diagnosis"):
        config = DiagnoseConfig(model, calibration, scheme, max_side=DIAGNOSE_SIDE)
        try:
            with _lane(model, progress=progress, visitor=visitor) as run:
                report = run(diagnose, config, images=[image], mode=MODES.get(mode, mode),
                             progress=lambda f, m: progress(f, desc=f"{m} (cancel to stop)"), stop=stop.is_set)
                advice = run(advise_fix, report, image, MODES.get(mode, mode),
                             progress=lambda f, m: progress(f, desc=f"measuring the fixes: {m}"), stop=stop.is_set)
        except DiagnosisCancelled as error:
            raise gr.Error(f"Diagnosis cancelled: {error}.") from None
        except Stopped:
            raise gr.Error("Diagnosis cancelled: stopped at once (your model runs in a box of its own).") from None
    culprit = advice.tensor or (report.ranking[0].tensor if report.ranking else None)
    chosen = report.calibrated.ranges.get(culprit)
    figure = histogram_figure(report.stats[culprit], max(abs(chosen.low), abs(chosen.high))) if culprit else None
    note = (f"\n\nMeasured on the centre {DIAGNOSE_SIDE}x{DIAGNOSE_SIDE} LR pixels of the image at most (two "
            "simulated passes per tensor).")
    fix = gr.update(value=FIX_LABELS[advice.fix]) if advice.fix is not None else gr.update()
    return (ranking_frame(report), figure, diagnosis_text(report) + "\n\n" + advice_text(advice, report) + note,
            gr.update(choices=[r.tensor for r in report.ranking], value=culprit), report, fix)


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
                          progress=lambda f, m: progress(f, desc=m))
    against = "truth" if outcome.has_truth else "FP32"
    table = pd.DataFrame([
        {"INT8 model": "before", f"PSNR vs {against} (dB)": _number(outcome.psnr_before_db, 2),
         "brightness vs FP32": _number(outcome.brightness_before, 4)},
        {"INT8 model": f"after: {fix_label} on {tensor}", f"PSNR vs {against} (dB)": _number(outcome.psnr_after_db, 2),
         "brightness vs FP32": _number(outcome.brightness_after, 4)}])
    return outcome.before, outcome.after, table


# Owner tokens: issued by this server to each browser when the page loads (kept in its localStorage), signed so
# that only tokens it issued are accepted. Jobs and cancellations belong to the token, never to the session hash
# a client sends (anyone can send anyone's). SR_OWNER_SECRET keeps tokens valid across restarts.
_OWNER_SECRET = os.environ.get("SR_OWNER_SECRET", "").encode() or secrets.token_bytes(32)


def _signature(ident: str) -> str:
    return hmac.new(_OWNER_SECRET, ident.encode(), hashlib.sha256).hexdigest()[:32]


def issue_owner(current=None) -> str:
    """This browser's owner token: the one it holds when this server issued it, else a fresh one."""
    if _verified_owner(current):
        return current
    ident = secrets.token_urlsafe(18)
    return f"{ident}.{_signature(ident)}"


def _verified_owner(token) -> str | None:
    """The owner a token names, when this server signed it (None otherwise)."""
    ident, _, signature = str(token or "").partition(".")
    # bytes, not str: compare_digest refuses a str with non-ASCII characters (a TypeError, not a refusal)
    return ident if ident and hmac.compare_digest(signature.encode(), _signature(ident).encode()) else None


def _owner(token) -> str:
    """The owner behind a request's token; a token this server did not issue is refused in words."""
    ident = _verified_owner(token)
    if ident is None:
        raise gr.Error("This page has no owner token from this server (it may have restarted): reload the page.")
    return ident


def start_training(steps, activation, use_teacher, alpha, kd_mode="output", owner=None):
    """Queue a job for this page's owner and stream its loss and validation PSNR until it ends."""
    try:
        job = app_jobs.start(_owner(owner), int(steps), activation, bool(use_teacher), float(alpha), kd_mode)
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
        job = app_jobs.start_qat(_owner(owner), model, int(steps), bool(use_teacher))
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
    return app_jobs.cancel(_owner(owner))


def _compare_controls(models: list[str]) -> dict:
    first = next(iter(PRESETS))
    model_a, model_b = PRESETS[first]["models"]
    with gr.Row():
        with gr.Column(scale=1):
            examples = _examples()
            controls = {"image": untouched_image(value=examples[0] if examples else None, label="Input image",
                                                 sources=["upload", "clipboard"], elem_id="input-image")}
            gr.Examples(examples, inputs=controls["image"])
            with gr.Row():  # within the first screen (1400x900), beside the image they act on
                controls["run"] = gr.Button("Run", variant="primary", elem_id="run")
                controls["recalibrate"] = gr.Button("Recalibrate (new sample)", elem_id="recalibrate")
            controls["mode"] = gr.Radio(list(MODES), value="Upscale my image", label="Mode")
            controls["preset"] = gr.Radio(list(PRESETS), value=first, label="Preset")
            controls["preset_note"] = gr.Markdown()
            controls["model_a"] = gr.Dropdown(models, value=model_a, label=f"Model A ({_label(model_a)})",
                                              elem_id="model-a")
            controls["model_b"] = gr.Dropdown(models, value=model_b, label=f"Model B ({_label(model_b)})",
                                              elem_id="model-b")
            controls.update(_your_model())
        with gr.Column(scale=1):
            controls["method"] = gr.Dropdown([m.value for m in Method], value="entropy", label="Calibration method",
                                             info=METHOD_HELP)
            controls["samples"] = gr.Radio([10, 100, 1000], value=100, label="Calibration samples")
            controls["scheme"] = gr.Radio([s.value for s in Scheme], value="tensorrt", label="INT8 scheme",
                                          info="tensorrt: Q/DQ where NVIDIA ModelOpt puts them (checked against ModelOpt; "
                                               "attention, gates and ConvTranspose may differ); npu: LiteRT's 8-bit "
                                               "specification, what phone NPUs run (every tensor INT8 with a zero "
                                               "point, INT32 biases; npu-per-tensor: one scale per weight tensor); "
                                               "npu-symmetric: symmetric-only accelerators; cpu: UINT8, ONNX "
                                               "Runtime's x86 path")
            controls["target"] = gr.Radio(list(TARGETS), value=REFERENCE_TARGET, label="INT8 panels run on",
                                          elem_id="target",
                                          info="the lab's reference, or a target's own integer arithmetic on the same "
                                               "INT8 model (npu / npu-per-tensor scheme): Qualcomm's Hexagon NPU as "
                                               "onnxruntime-qnn simulates it, or the bundle's .tflite in LiteRT; "
                                               "each is checked against the reference first")
            controls["refine"] = gr.CheckboxGroup(
                [r.value for r in Refinement if r is not Refinement.RANGE_SEARCH], value=[],
                label="Post-training refinements (both models)", elem_id="refine",
                info="centred-io: the image's 256 levels exactly on the INT8 grid; equalize: per-channel scales moved "
                     "between layers so small channels keep their precision; adaround: learned weight rounding; "
                     "bias-correction: the INT8 mean shift removed. FP32 panels then show the refined model (the "
                     "same function for the first two). The README's table says what each is worth.")
            controls["calib_source"] = gr.Radio(list(CALIB_SOURCES), value=CALIB_SOURCES[0], label="Calibration images")
            controls["calib_files"] = gr.File(label="My calibration images", file_count="multiple", file_types=["image"])
            controls["gain"] = gr.Slider(0.1, 2.0, 1.0, step=0.05, label="Calibration brightness gain (experiment)",
                                         info="Scale the calibration images' brightness: below 1 reproduces a "
                                              "calibration set darker than what the model sees at run time.")
            controls["seed"] = gr.Number(0, precision=0, label="Calibration seed")
            controls["display"] = gr.Radio(["bicubic", "nearest"], value="bicubic", label="Original shown with")
            controls.update(_deploy())
    return controls


def _your_model() -> dict:
    with gr.Accordion("Your own ONNX model", open=False):
        parts = {"onnx": gr.File(label="Drop an ONNX super-resolution model", file_types=[".onnx"],
                                 elem_id="onnx-upload")}
        examples = sorted((Path(__file__).resolve().parent / "examples").glob("*.onnx"))
        if examples:  # small models of other families (examples/README.md says how each was made)
            gr.Examples([[str(path)] for path in examples], inputs=parts["onnx"], elem_id="onnx-examples",
                        label="Or try an example model (examples/README.md says what each is)")
        parts["contract"] = gr.Markdown(elem_id="contract")  # (the deploy panel serves it too: model A)
        with gr.Row():
            parts["layout"] = gr.Dropdown(["auto", "nchw", "nhwc"], value="auto", label="Layout")
            parts["color"] = gr.Dropdown(["auto", "rgb", "y"], value="auto", label="Colour")
            parts["value_range"] = gr.Dropdown(["auto", "1", "255"], value="auto", label="Value range")
            parts["scale"] = gr.Dropdown(["auto", "2", "3", "4"], value="auto", label="Scale")
        parts["pre_upsampled"] = gr.Checkbox(False, label="Pre-upsampled input (VDSR-style)")
    return parts


def _deploy() -> dict:
    """Model A's deployment: its INT8 bundle as set, or the INT8-ready search (any model A, shipped or yours)."""
    with gr.Accordion("Deploy model A: INT8 bundle, INT8-ready search", open=True):
        parts = {"bundle_button": gr.Button("Download INT8 model (model A, these calibration settings)",
                                            elem_id="bundle-button")}
        with gr.Row():
            parts["ready_target"] = gr.Number(0.05, label="Target loss vs FP32 (dB)", minimum=0, maximum=10)
            parts["ready_minutes"] = gr.Slider(1, 4, value=2, step=0.5, label="Time budget (minutes)")
        parts["ready_button"] = gr.Button("Make model A INT8-ready (range methods, refinements, mixed precision"
                                          + (", QAT" if app_jobs.POLICY.enabled else "") + ")", elem_id="ready-button")
        parts["ready_report"] = gr.Markdown(elem_id="ready-report")
        parts["bundle"] = gr.File(label="INT8 deployment bundle", elem_id="bundle")
    return parts


def _table(label: str, headers: list[str], elem_id: str, wide: tuple[int, ...] = ()) -> gr.Dataframe:
    """A read-only table whose headers break between words only: each column at least as wide as its header's
    longest word (Gradio's own sizing squeezed "brightness" into "brightn ess" on a narrow page); the `wide`
    columns (names, engines) get room for their values; a page narrower than the table scrolls it sideways."""
    widths = [max(HEADER_CHAR_PX * max(len(word) for word in header.split()) + HEADER_PADDING_PX,
                  WIDE_COLUMN_PX if index in wide else 0) for index, header in enumerate(headers)]
    return gr.Dataframe(label=label, headers=headers, column_widths=[f"{w}px" for w in widths], wrap=True,
                        interactive=False, elem_id=elem_id, elem_classes=["sr-table"])


def _compare_outputs() -> dict:
    with gr.Column(visible=False) as results:  # shown when there is something to show
        # what the page is doing: "Running..." from the click, "Done in ..." once every view is drawn (the
        # browser test waits on it too)
        status = gr.Markdown(elem_id="run-status")
        with gr.Row():
            panels = [gr.Image(label=name, format="png", type="numpy", interactive=False, elem_classes=["sr-panel"],
                               buttons=["download", "fullscreen"], elem_id=f"panel-{i}") for i, name in enumerate(PANELS)]
        outputs = {"panels": panels, "coverage": gr.Markdown(label="Calibration coverage", elem_id="coverage"),
                   "metrics": _table("Metrics (Y-PSNR/SSIM with the scale shaved from each border)",
                                     ["output", "engine", "PSNR vs FP32 (dB)", "SSIM vs FP32", "brightness vs FP32",
                                      "ΔE2000", "time on this CPU (ms)"], elem_id="metrics", wide=(0, 1))}
        gr.Markdown("PSNR and SSIM: of each output against the FP32 output of the same model (Y channel; higher is "
                    "closer). Brightness: mean luma of the output over FP32's (below 1 is darker). ΔE2000: mean "
                    "colour difference, CIEDE2000 (below 1 is invisible to most people). Time: wall time of that "
                    "output on this server's CPU, in milliseconds.", elem_id="metrics-help")
        outputs["difference"] = _difference_view()
        with gr.Row():
            outputs["left"] = gr.Dropdown(list(PANELS), value=PANELS[1], label="Slider left")
            outputs["right"] = gr.Dropdown(list(PANELS), value=PANELS[2], label="Slider right")
        outputs["slider"] = gr.ImageSlider(label="Before / after", format="png", type="numpy")
        with gr.Row():
            outputs["center_x"] = gr.Slider(0, 1, 0.5, label="Zoom centre x")
            outputs["center_y"] = gr.Slider(0, 1, 0.5, label="Zoom centre y")
            outputs["size"] = gr.Slider(16, 256, 64, step=8, label="Zoom crop (px)")
        outputs["roi"] = gr.Image(label="Zoom: the same crop of every panel (and of the difference view)", format="png",
                                  type="numpy", interactive=False, elem_id="zoom")
        outputs["chart"] = gr.Plot(label="Activation ranges: observed vs chosen, clipped share")
        outputs["state"] = gr.State(None, time_to_live=SESSION_STATE_SECONDS)
    outputs["results"], outputs["status"] = results, status
    return outputs


def _difference_view() -> dict:
    gr.Markdown("### Difference view\nWhere INT8 departs from FP32, amplified. Click any panel to zoom every "
                "panel, and this view, at that point.")
    with gr.Row():
        view = {"pair": gr.Dropdown([*DIFFERENCES, *TARGET_DIFFERENCES], value=next(iter(DIFFERENCES)),
                                    label="Compare"),
                "kind": gr.Radio(list(DIFFERENCE_KINDS), value=next(iter(DIFFERENCE_KINDS)), label="Show"),
                "gain": gr.Slider(1, 128, 16, step=1, label="Gain (x)")}
    view["image"] = gr.Image(label="Amplified difference", format="png", type="numpy", interactive=False,
                             elem_id="difference", buttons=["download", "fullscreen"])
    return view


def _wire_compare(c: dict, o: dict) -> None:
    calib_images = gr.State(None, time_to_live=SESSION_STATE_SECONDS)
    c["calib_files"].upload(load_calibration_uploads, c["calib_files"], calib_images, api_name=False)
    history = gr.State(None)
    inputs = [c["image"], c["model_a"], c["model_b"], c["method"], c["samples"], c["scheme"], c["mode"], c["display"],
              c["calib_source"], calib_images, c["gain"], c["seed"], history, c["refine"], c["target"]]
    outputs = [*o["panels"], o["metrics"], o["coverage"], o["chart"], o["state"], history]
    d = o["difference"]
    zoom = [o["state"], o["center_x"], o["center_y"], o["size"], d["pair"], d["kind"], d["gain"]]
    difference = [o["state"], d["pair"], d["kind"], d["gain"]]
    reveal = lambda: (gr.update(visible=True), "Running...")  # noqa: E731
    run = c["run"].click(reveal, None, [o["results"], o["status"]], api_name=False, queue=False).then(
        run_compare, inputs, outputs, api_name="compare", concurrency_id=HEAVY, concurrency_limit=HEAVY_SLOTS)
    again = c["recalibrate"].click(new_seed, None, c["seed"], api_name=False).then(
        reveal, None, [o["results"], o["status"]], api_name=False).then(
        run_compare, inputs, outputs, api_name=False, concurrency_id=HEAVY, concurrency_limit=HEAVY_SLOTS)
    uploads = c["uploads"]
    # change, not upload: a click on an example model sets the file too
    c["onnx"].change(load_onnx_model, [c["onnx"], c["layout"], c["color"], c["value_range"], c["pre_upsampled"],
                                       c["scale"], c["model_b"], uploads],
                     [c["model_a"], c["model_b"], c["contract"], uploads], api_name=False,
                     concurrency_id="probe", concurrency_limit=PROBES)
    c["bundle_button"].click(build_bundle, [c["image"], c["model_a"], c["method"], c["samples"], c["gain"], c["seed"],
                                            c["mode"]], c["bundle"], api_name=False, concurrency_id=HEAVY,
                             concurrency_limit=HEAVY_SLOTS)
    ready = c["ready_button"].click(
        make_ready_for, [c["model_a"], c["samples"], c["scheme"], c["ready_target"], c["ready_minutes"], uploads,
                         c["model_b"]],
        [c["ready_report"], c["bundle"], c["model_a"], c["model_b"], uploads, c["method"], c["gain"], c["seed"],
         c["refine"], c["calib_source"]], api_name=False, concurrency_id=HEAVY, concurrency_limit=HEAVY_SLOTS)
    shown = ready.success(reveal, None, [o["results"], o["status"]], api_name=False).then(  # the chosen model shown
        run_compare, inputs, outputs, api_name=False, concurrency_id=HEAVY, concurrency_limit=HEAVY_SLOTS)
    _after_comparison([run, again, shown], o, d, zoom, difference)
    c["preset"].change(apply_preset, c["preset"], [c["model_a"], c["model_b"], c["method"], c["gain"], c["preset_note"]],
                       api_name=False)
    c["model_a"].input(relabel_a, c["model_a"], c["model_a"], api_name=False)
    c["model_b"].input(relabel_b, c["model_b"], c["model_b"], api_name=False)
    for control in (o["left"], o["right"]):
        control.change(run_slider, [o["state"], o["left"], o["right"]], o["slider"], api_name=False)
    for control in (o["center_x"], o["center_y"], o["size"]):
        # input: dragging and typing in the number box alike; always_last drops the stale ones
        control.input(run_roi, zoom, o["roi"], api_name=False, trigger_mode="always_last")


def _after_comparison(events: list, o: dict, d: dict, zoom: list, difference: list) -> None:
    """What follows every comparison: the panels' names, the slider, the difference view, the zoom, the done line."""
    for event in events:
        event.success(panel_labels, o["state"], o["panels"], api_name=False).then(
            run_slider, [o["state"], o["left"], o["right"]], o["slider"], api_name=False).then(
            run_difference, difference, d["image"], api_name=False).then(run_roi, zoom, o["roi"], api_name=False).then(
            done_note, o["state"], o["status"], api_name=False)
        event.failure(lambda: "Stopped: the message above says why.", None, o["status"], api_name=False)
    for control in (d["pair"], d["kind"], d["gain"]):
        control.change(run_difference, difference, d["image"], api_name=False).then(
            run_roi, zoom, o["roi"], api_name=False)
    for panel in [*o["panels"], d["image"]]:
        panel.select(zoom_at, [o["state"], o["size"], d["pair"], d["kind"], d["gain"]],
                     [o["center_x"], o["center_y"], o["roi"]], api_name=False)


def _diagnose_tab(c: dict) -> None:
    gr.Markdown("Quantize one tensor at a time (and all but one) to find the tensor whose range does the damage, "
                "then fix it in one click.")
    with gr.Row():
        which = gr.Radio(["model A", "model B"], value="model A", label="Diagnose")
        button = gr.Button("Diagnose", variant="primary", elem_id="diagnose")
        cancel = gr.Button("Cancel", elem_id="cancel-diagnosis")
    summary = gr.Markdown(label="Diagnosis summary")
    ranking = _table("Tensors ranked by how far their quantization alone moves the output from FP32",
                     ["tensor", "op", "PSNR vs FP32, alone (dB)", "drop vs truth, alone (dB)",
                      "recovery if kept float (dB)", "brightness alone", "SQNR (dB)", "clipped %", "clipped energy %"],
                     elem_id="ranking", wide=(0,))
    histogram = gr.Plot(label="Histogram of the culprit with its chosen range")
    report_state = gr.State(None, time_to_live=SESSION_STATE_SECONDS)
    with gr.Row():
        tensor = gr.Dropdown([], label="Tensor to fix")
        fix = gr.Dropdown(list(FIX_LABELS.values()), value=FIX_LABELS[Fix.RANGE_MINMAX], label="Fix")
        fix_button = gr.Button("Apply fix", elem_id="apply-fix")
    with gr.Row():
        before = gr.Image(label="Before (INT8)", format="png", type="numpy", interactive=False)
        after = gr.Image(label="After the fix (INT8)", format="png", type="numpy", interactive=False)
    fix_metrics = _table("Before / after", ["INT8 model", "PSNR (dB)", "brightness vs FP32"], elem_id="fix-metrics",
                         wide=(0,))
    button.click(run_diagnose, [c["image"], c["model_a"], c["model_b"], which, c["mode"], c["method"], c["samples"],
                                c["scheme"], c["gain"], c["seed"], c["owner"]],
                 [ranking, histogram, summary, tensor, report_state, fix], concurrency_id=HEAVY,
                 concurrency_limit=HEAVY_SLOTS, api_name="diagnose")
    cancel.click(cancel_diagnosis, c["owner"], None, api_name=False)
    fix_button.click(run_fix, [c["image"], report_state, tensor, fix, c["mode"]], [before, after, fix_metrics],
                     concurrency_id=HEAVY, concurrency_limit=HEAVY_SLOTS, api_name=False)


def _train_tab(c: dict) -> None:
    if not app_jobs.POLICY.enabled:
        gr.Markdown("Training is off on this deployment: a public Space would let anyone spend its CPU. Run the "
                    "lab yourself with `python app.py --allow-training` to train or distil XLSR models here.")
    gr.Markdown(f"A short XLSR training or distillation run on the CPU (needs the training images at "
                f"`../shared/data/`, or set `SR_TRAIN_DIRS`), at most {app_jobs.POLICY.max_steps} steps. Jobs run "
                "one at a time in the order asked; only this browser (its tabs share one owner token) can cancel its "
                "job; the result appears in the "
                "model lists.")
    with gr.Row():
        steps = gr.Number(300, precision=0, label="Steps", minimum=1, maximum=app_jobs.POLICY.max_steps)
        activation = gr.Radio(["relu", "clipped_relu", "linear"], value="clipped_relu", label="Final activation")
        use_teacher = gr.Checkbox(True, label="Distil from the teacher")
        kd_mode = gr.Dropdown([("output (match its output)", "output"),
                               ("upcycled (also zoomed-in/out inputs and flips, DUKD)", "upcycled"),
                               ("feature (also its features, through an adapter)", "feature")],
                              value="output", label="Distillation mode")
        alpha = gr.Slider(0, 1, 0.5, label="alpha (ground-truth weight)")
    with gr.Row():
        on = app_jobs.POLICY.enabled  # off: the controls are shown disabled, with the reason above them
        train_button = gr.Button("Start" if on else "Start (training is off here)", variant="primary", interactive=on)
        cancel_button = gr.Button("Cancel", interactive=on)
    status = gr.Markdown()
    loss_plot = gr.LinePlot(x="step", y="loss", title="Training loss")
    val_plot = gr.LinePlot(x="step", y="val_psnr", title="Validation PSNR (dB)")
    event = train_button.click(start_training, [steps, activation, use_teacher, alpha, kd_mode, c["owner"]],
                               [status, loss_plot, val_plot],
                               api_name=False)
    event.then(refresh_models, None, [c["model_a"], c["model_b"]], api_name=False)
    cancel_button.click(cancel_training, c["owner"], status, api_name=False)
    _qat_section(c)


def _qat_section(c: dict) -> None:
    gr.Markdown("### Fine-tune model A for INT8 (QAT)\nQuantization-aware fine-tuning of **model A** (Compare tab), "
                "your uploaded "
                "ONNX model included: the INT8 model itself, TensorRT scheme, is trained against the images and the "
                "original FP32 model, its ranges learned; the lab's own networks also get centred I/O (every 8-bit "
                "level exactly an INT8 value). The result joins the model lists as model A, and its learned "
                "ranges go into the deployment bundle. Same limits and queue as training.")
    with gr.Row():
        steps = gr.Number(300, precision=0, label="Fine-tuning steps", minimum=1, maximum=app_jobs.POLICY.max_steps)
        guided = gr.Checkbox(False, label="Guided by the teacher (the shipped 940k-parameter FP32 model; several "
                             "times slower per step; see the README for what it is worth)")
        on = app_jobs.POLICY.enabled
        start = gr.Button("Fine-tune model A for INT8" if on else "Fine-tune model A for INT8 (fine-tuning is off here)",
                          variant="primary", elem_id="qat-button", interactive=on)
        cancel = gr.Button("Cancel", interactive=on)
    status = gr.Markdown(elem_id="qat-status")
    plot = gr.LinePlot(x="step", y="val_psnr", title="Fake-quantized validation PSNR (dB, in training)")
    result = gr.State(None)
    event = start.click(start_qat, [c["model_a"], steps, guided, c["owner"]], [status, plot, result], api_name=False)
    event.then(offer_result, [result, c["uploads"], c["model_b"]], [c["model_a"], c["model_b"], c["uploads"]],
               api_name=False)
    cancel.click(cancel_training, c["owner"], status, api_name=False)


def build_demo() -> gr.Blocks:
    """The app's Blocks: Compare, diagnosis and training tabs."""
    # Gradio's own temp files (uploads, outputs) older than an hour are deleted every hour
    with gr.Blocks(title="SR INT8 Lab", delete_cache=(3600, 3600)) as demo:
        gr.Markdown("# SR INT8 Lab\nWhat INT8 post-training quantization does to a super-resolution network, side "
                    "by side: FP32 and INT8 outputs of two models (by default a ReLU and a Clipped-ReLU XLSR, "
                    "Ayazoglu, CVPRW 2021), with metrics, a check that the calibration covers your image, "
                    "recalibration and a diagnosis of the tensor behind the damage. Pick an example or upload an "
                    "image, then press **Run**.")
        with gr.Tab("Compare"):
            controls = _compare_controls(available_models())
            controls["uploads"] = gr.State([])  # this tab's ONNX models (uploaded, or made INT8-ready)
            # this browser's owner token (jobs and cancellations belong to it), issued when the page loads
            controls["owner"] = gr.BrowserState(None, storage_key="sr-int8-lab-owner")
            _wire_compare(controls, _compare_outputs())
        with gr.Tab("Why is it dull?"):
            _diagnose_tab(controls)
        with gr.Tab("Train"):
            _train_tab(controls)
        demo.load(issue_owner, controls["owner"], controls["owner"], api_name=False)
    return demo


# panel titles wrap beside the panel's buttons instead of running under them (Gradio floats a label over the image)
CSS = """
.sr-panel [data-testid="block-label"] { white-space: normal; max-width: calc(100% - 72px); line-height: 1.3; }
.sr-table th .header { word-break: normal !important; overflow-wrap: normal !important; hyphens: none; }
"""
MAX_REQUEST_BYTES = 32 * 1024 * 1024  # any request but a file upload (which has MAX_UPLOAD per file)
MAX_UPLOAD_FILES = 64  # files in one upload request (the calibration uploads' cap)
MAX_UPLOAD_REQUEST_BYTES = 256 * 1024 * 1024  # one upload request in all
# what uploads may bring in an hour (Gradio keeps uploaded files an hour): from one client address, and in all;
# so the disk uploads take is bounded however many requests arrive
_CLIENT_UPLOADS = float(os.environ.get("SR_UPLOAD_MB_PER_HOUR", "2048")) * 2**20
UPLOAD_BYTES_PER_HOUR = {"client": _CLIENT_UPLOADS, "all": 4 * _CLIENT_UPLOADS}


class RequestSizeLimit:
    """ASGI middleware, the server's door: a request body over MAX_REQUEST_BYTES is refused (413, in words; a
    chunked one too: it is read here first, then handed on), an upload request over MAX_UPLOAD_FILES files or
    MAX_UPLOAD_REQUEST_BYTES in all likewise (Gradio caps each file itself), and a queue call naming an event the
    page does not have gets 404 in words instead of a server error. A queue call carries file references, not
    files: a `data:` URL of 100 MB in its payload used to pass the upload cap and land in Gradio's temp folder."""

    def __init__(self, app, max_bytes: int = MAX_REQUEST_BYTES, events: frozenset = frozenset()):
        self.app, self.max_bytes, self.events = app, max_bytes, events

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "").rstrip("/")
        declared = dict(scope.get("headers") or []).get(b"content-length")
        limit = MAX_UPLOAD_REQUEST_BYTES if path.endswith("/upload") else self.max_bytes
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return await self._refuse(send, 413, self._too_large(limit))
        if path.endswith("/upload"):
            return await self._upload(scope, receive, send)
        body, more = b"", True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > limit:
                return await self._refuse(send, 413, self._too_large(limit))
        if path.endswith("/queue/join") and self.events and self._unknown_event(body):
            return await self._refuse(send, 404, "no such event on this page: reload it")
        replayed = [{"type": "http.request", "body": body, "more_body": False}]

        async def replay():
            return replayed.pop() if replayed else await receive()

        return await self.app(scope, replay, send)

    def _unknown_event(self, body: bytes) -> bool:
        try:
            index = json.loads(body).get("fn_index")
        except (ValueError, AttributeError):
            return False  # Gradio answers a malformed call itself (422)
        return index is not None and index not in self.events

    async def _upload(self, scope, receive, send):
        """An upload streamed on to Gradio, its files and bytes counted on the way (a multipart part each), its
        bytes charged to its client's and everyone's hourly budget."""
        headers = dict(scope.get("headers") or [])
        client = (headers.get(b"x-forwarded-for", b"").split(b",")[0].strip().decode(errors="replace")
                  or (scope.get("client") or ("?",))[0])
        if not _UPLOADS.allows(client):
            return await self._refuse(send, 429, "this server has taken all the uploads it takes in an hour (from "
                                                 "you, or from everyone): try again later")
        boundary = headers.get(b"content-type", b"").partition(b"boundary=")[2].strip(b'"')
        seen, parts, tail = 0, 0, b""

        async def counted():
            nonlocal seen, parts, tail
            message = await receive()
            chunk = message.get("body", b"")
            seen += len(chunk)
            _UPLOADS.charge(client, len(chunk))
            parts += (tail + chunk).count(b"--" + boundary) - tail.count(b"--" + boundary) if boundary else 0
            tail = (tail + chunk)[-(len(boundary) + 2):]
            if seen > MAX_UPLOAD_REQUEST_BYTES or parts > MAX_UPLOAD_FILES + 1:  # + the closing boundary
                raise _TooLarge()
            return message

        try:
            return await self.app(scope, counted, send)
        except _TooLarge:
            return await self._refuse(send, 413, f"an upload request may carry at most {MAX_UPLOAD_FILES} files and "
                                                 f"{MAX_UPLOAD_REQUEST_BYTES // 2**20} MB in all")

    @staticmethod
    def _too_large(limit: int) -> str:
        return (f"the request is larger than {limit // 2**20} MB; upload files through the page (up to 25 MB each) "
                "instead of inside the request")

    @staticmethod
    async def _refuse(send, status: int, words: str) -> None:
        body = json.dumps({"error": words}).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


class _TooLarge(Exception):
    """A streamed request body went over the limit."""


class _UploadBudget:
    """Bytes uploaded in the last hour, per client address and in all (UPLOAD_BYTES_PER_HOUR)."""

    def __init__(self):
        self.charges: list[tuple[float, str, int]] = []
        self.lock = threading.Lock()

    def _recent(self) -> list[tuple[float, str, int]]:
        hour_ago = time.monotonic() - 3600
        self.charges = [c for c in self.charges if c[0] > hour_ago]
        return self.charges

    def allows(self, client: str) -> bool:
        with self.lock:
            recent = self._recent()
            mine = sum(size for _, who, size in recent if who == client)
            return mine < UPLOAD_BYTES_PER_HOUR["client"] and sum(c[2] for c in recent) < UPLOAD_BYTES_PER_HOUR["all"]

    def charge(self, client: str, size: int) -> None:
        with self.lock:
            if self.charges and self.charges[-1][1] == client and time.monotonic() - self.charges[-1][0] < 1:
                when, who, total = self.charges[-1]
                self.charges[-1] = (when, who, total + size)  # one entry a second per client: the list stays short
            else:
                self.charges.append((time.monotonic(), client, size))


_UPLOADS = _UploadBudget()


def main() -> None:
    """Parse the command line and launch the server."""
    parser = argparse.ArgumentParser(description="SR INT8 Lab")
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", "7860")))
    parser.add_argument("--share", action="store_true", help="a temporary public gradio.live link")
    parser.add_argument("--allow-training", action="store_true", help="let users train models (off on a public "
                        "Space; SR_ALLOW_TRAINING=1 does the same)")
    args = parser.parse_args()
    app_jobs.POLICY.enabled = app_jobs.POLICY.enabled or args.allow_training
    logging.basicConfig(level=logging.INFO)
    for folder in ("int8", "onnx"):
        remove_stale_temps(cache_root() / folder)  # what crashed writers left behind
    threading.Thread(target=_sweeper, name="bundle-sweeper", daemon=True).start()
    from starlette.middleware import Middleware

    demo = build_demo()
    door = Middleware(RequestSizeLimit, events=frozenset(demo.fns))
    demo.queue(default_concurrency_limit=1).launch(server_name=args.host, server_port=args.port, share=args.share,
                                                   max_file_size=MAX_UPLOAD, css=CSS, show_error=False,
                                                   state_session_capacity=MAX_SESSIONS,
                                                   app_kwargs={"middleware": [door]})


if __name__ == "__main__":
    main()
