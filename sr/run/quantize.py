"""The INT8 pipeline: `calibrate_model` turns a model and a calibration into a QDQ model, cached under its
`sr.quant.recipe.QuantRecipe`'s key, which covers everything that determines the result (weights, every setting, the
scheme, the images' pixels, the fixes, the code of every module involved, the library versions).

The statistics are observed once per model and image set and shared by every method; the ranges are chosen from
them (or, with the automatic method, every search is tried and the best kept, scored against FP32 on held-back
images); `sr.quant.qdq` writes the model as the spec says; `sr.quant.calibrated` holds the entry. Also here: a
user's model's known input range and a fine-tuned model's learned ranges.
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import onnx

from .. import data
from ..model.centring import moves_values, user_io
from ..quant.calibdata import images_digest, load_calibration_images, prepare_calibration_images
from ..quant.calibrate import CalibrationConfig, Method
from ..quant.calibrated import AutoChoice, CalibratedModel, calibrate_entry, read_entry
from .engines import reference
from .sessions import Observer, run_once
from ..metrics import brightness_ratio, psnr_y
from ..model.models import TuningRecord, model_info
from ..quant.quantspec import WRAPPER_PREFIX, Scheme, litert_fixed_outputs
from ..quant.recipe import Fixes, QuantRecipe
from ..progress import logged_progress
from ..store import Memo, cache_root, file_identity, file_sha256, locked, write_atomic

log = logging.getLogger(__name__)


AUTO_CANDIDATES = (Method.ENTROPY, Method.PERCENTILE, Method.MSE, Method.MINMAX)
AUTO_HELD_BACK = 4  # calibration images kept out of the statistics to score the candidates on (at most)
AUTO_SIDE = 128  # LR pixels a side of each held-back image's centre crop


def fp32_onnx_path(model_name: str | os.PathLike, cache_dir: Path | None = None) -> Path:
    """The FP32 ONNX model of a model (`sr.model.models.ModelInfo.fp32_onnx`: a weight file's cached export, or a
    user's standard graph).

    Raises:
        FileNotFoundError: no such model.
    """
    return model_info(model_name).fp32_onnx(run_once, cache_dir)


def calibrate_model(model_name: str | os.PathLike, config: CalibrationConfig | None = None,
                    scheme: Scheme | str = Scheme.TENSORRT, images: Sequence[np.ndarray] | None = None,
                    fixes: Fixes | None = None, cache_dir: Path | None = None, threads: int = 0,
                    progress: Callable[[float, str], None] | None = None) -> CalibratedModel:
    """Calibrate a model and write its QDQ INT8 ONNX model, or return the cached one.

    An entry is built in a temp folder and renamed into place while holding the entry's lock, so threads and
    processes that ask for the same entry wait for one calibration and then read it; its manifest records each
    file's SHA-256, and an entry that fails the check (a corrupt or partial file) is rebuilt.

    Example: `calibrate_model("xlsr-clip", CalibrationConfig(method="auto"), "tensorrt").qdq_onnx`.

    Args:
        model_name: a shipped model name or a weight file.
        config: the calibration (default: CalibrationConfig()).
        scheme: the INT8 scheme.
        images: calibration images (uint8 HxWx3); None reads `config.data` (or calib_data/).
        fixes: per-tensor overrides.
        cache_dir: the cache folder (default: `sr.store.cache_root()`).
        threads: ONNX Runtime threads for the observation passes (0: its default).
        progress: called with (fraction done, message).

    Returns:
        the CalibratedModel.

    Raises:
        FileNotFoundError: unknown model or calibration folder.
        ValueError: bad configuration, or a fix that names a tensor the model does not have.
    """
    config = config or CalibrationConfig()
    scheme = Scheme.parse(scheme)
    if config.method is Method.AUTO:
        return _calibrate_auto(model_name, config, scheme, images, fixes, cache_dir, threads, progress)
    fixes = with_known_input_range(model_name, fixes or Fixes(), scheme)
    info = model_info(model_name)
    source = load_calibration_images(config.data if images is None else images)
    network_inputs = prepare_calibration_images(source, config, info.scale)
    weights_hash, data_hash, recipe = file_sha256(info.path), images_digest(network_inputs), QuantRecipe(config, scheme, fixes)
    key = recipe.key(weights_hash, data_hash)
    entry = cache_root(cache_dir) / "int8" / key
    fp32 = fp32_onnx_path(model_name, cache_dir)

    def result(found, seconds: float, cached: bool) -> CalibratedModel:
        ranges, stats, producers = found
        return CalibratedModel(str(model_name), scheme, config, fixes, key, fp32, entry / "model.qdq.onnx",
                               ranges, stats, producers, seconds, cached, info.scale)

    found = read_entry(entry)
    if found is None:
        with locked(entry):
            found = read_entry(entry)  # another thread or process may have built it while we waited
            if found is None:
                started = time.perf_counter()
                progress = progress or logged_progress(f"calibrating {info.name} ({config.method.value}, "
                                                       f"{config.samples} samples, {scheme.value})")
                made = calibrate_entry(entry, fp32, network_inputs, config, scheme, fixes, info.name,
                                       partial(Observer, threads=threads), progress, recipe.statistics_key(
                                           weights_hash, data_hash), learned_ranges(model_name, scheme))
                return result(made, time.perf_counter() - started, False)
    return result(found, 0.0, True)


def _calibrate_auto(model_name, config: CalibrationConfig, scheme: Scheme, images, fixes: Fixes | None,
                    cache_dir: Path | None, threads: int, progress) -> CalibratedModel:
    """Method.AUTO: calibrate every AUTO_CANDIDATES search from one set of statistics (the images minus the
    held-back ones), score each INT8 model against FP32 on centre crops of the held-back images (ONNX Runtime on
    the CPU, the reference numerics), keep the best by PSNR. The choice is cached beside the calibrations."""
    source = load_calibration_images(config.data if images is None else images)
    if len(source) < 2:
        raise ValueError("the automatic method needs at least two calibration images (some are held back to score "
                         "the candidates)")
    held = source[len(source) - max(1, min(AUTO_HELD_BACK, len(source) // 5)):]
    rest = source[:len(source) - len(held)]
    info = model_info(model_name)
    scale = info.scale
    # downscaled as deployed (and as calibration feeds them); an image too small for that is used as it is
    lrs = [_centre_crop(data.degrade(image, scale)[1] if min(image.shape[:2]) >= 2 * scale else image)
           for image in held]
    key = QuantRecipe(config, scheme, fixes or Fixes()).key(file_sha256(info.path), images_digest(source))
    record = cache_root(cache_dir) / "auto" / f"{key}.json"
    try:
        choice = AutoChoice.from_json(json.loads(record.read_text()))
        method = Method.parse(choice.method)
    except (OSError, ValueError, KeyError, TypeError):  # not chosen yet, or an unreadable record: choose again
        choice = None
    if choice is not None:
        return replace(calibrate_model(model_name, replace(config, method=method), scheme, rest, fixes, cache_dir,
                                       threads, progress), choice=choice)
    fp32 = reference(fp32_onnx_path(model_name, cache_dir), scale)
    truths = [fp32.run(lr) for lr in lrs]
    made, candidates = {}, {}
    for method in AUTO_CANDIDATES:
        made[method] = calibrate_model(model_name, replace(config, method=method), scheme, rest, fixes, cache_dir,
                                       threads, progress)
        engine = reference(made[method].qdq_onnx, scale)
        outputs = [engine.run(lr) for lr in lrs]
        candidates[method.value] = {
            "psnr_vs_fp32_db": float(np.mean([min(psnr_y(o, t, scale), 99.0) for o, t in zip(outputs, truths)])),
            "brightness": float(np.mean([brightness_ratio(o, t) for o, t in zip(outputs, truths)]))}
    best = max(AUTO_CANDIDATES, key=lambda m: candidates[m.value]["psnr_vs_fp32_db"])
    choice = AutoChoice(best.value, candidates, len(held))
    write_atomic(json.dumps(choice.to_json()).encode(), record)
    return replace(made[best], choice=choice)


def _centre_crop(image: np.ndarray, side: int = AUTO_SIDE) -> np.ndarray:
    height, width = image.shape[:2]
    top, left = max(0, (height - side) // 2), max(0, (width - side) // 2)
    return np.ascontiguousarray(image[top:top + side, left:left + side])


def with_known_input_range(model_name: str | os.PathLike, fixes: Fixes, scheme: Scheme | str) -> Fixes:
    """A user's model takes values in a range its contract states ([0, 1] or [0, 255] of what it is fed): that is
    its input's range, whatever a calibration search would pick (entropy, fed the many dark pixels of a luma
    channel, chose +-0.063 for a Y input spanning [0.06, 0.92] and turned the output dark). The range is read off
    the lab's wrapper itself (`sr.model.wrapper.known_input`), so a tuned copy registered again keeps it. Fixes given
    for the input, and ranges a QAT run learned for it, win.

    Args:
        model_name: any model name.
        fixes: the fixes asked for.
        scheme: the INT8 scheme.

    Under LiteRT's specification (`npu`, `npu-per-tensor`) every model's image input and image output are fixed
    to the contract's [0, 1] (or [0, high]) too: an 8-bit pixel is then exactly one INT8 level (step 1/255, zero
    point -128) on the way in and on the way out, as an NPU's integer image input and output are (a wider
    output range spends levels on values the 8-bit image clips anyway; a narrower one, as mse or entropy may
    choose, can never reach white).

    Under LiteRT the outputs of Sigmoid, Softmax, Tanh and an L2 normalization take the specification's fixed
    grids (`sr.quant.quantspec.litert_fixed_outputs`: step 1/256 zero point -128, and 1/128 zero point 0)
    whatever their calibrated range.

    Returns:
        `fixes`, with the user's input range fixed for a registered ONNX model (and every model's image input
        and output and the fixed output grids, under LiteRT).
    """
    known = model_info(model_name).input_range
    litert = Scheme.parse(scheme).litert
    if known is None and not litert:
        return fixes
    fp32 = fp32_onnx_path(model_name)
    image_in, image_out = _image_io(fp32)
    tensor, high = known or (image_in, 1.0)
    learned = learned_ranges(model_name, scheme) or {}
    wanted = {t: (0.0, high) for t in [*_same_values(fp32, tensor), *([image_out] if litert else [])]}
    if litert:
        wanted = {**_fixed_outputs(fp32), **wanted}
    fixed = {t: span for t, span in wanted.items()
             if t not in fixes.fixed_range and t not in fixes.range_method and t not in fixes.keep_float
             and t not in learned}
    if not fixed:
        return fixes
    return Fixes(dict(fixes.range_method), list(fixes.keep_float), {**fixes.fixed_range, **fixed})


_SAME_VALUES = Memo(256)  # (graph file, size, mtime, tensor) -> `_same_values` (asked on every calibration call)


def _same_values(fp32: Path, tensor: str) -> list[str]:
    """`tensor` and the tensors that hold its values moved about (`moves_values`): the same range (an NHWC
    model's Transpose output is what its first Conv reads, and what is quantized). Remembered per graph file, so
    a cached calibration does not read the graph again."""
    return _SAME_VALUES.get((file_identity(fp32), tensor),
                            lambda: _walk_same_values(onnx.load(str(fp32)), tensor))


_IMAGE_IO = Memo(256)  # (graph file, size, mtime) -> `_image_io` (asked on every calibration call under LiteRT)


def _image_io(fp32: Path) -> tuple[str, str]:
    """(the image the network reads, the image it writes) of a graph file: the graph's input and output, or for
    a user's model inside the lab's wrapper the user's own (`sr.model.centring.user_io`); remembered per file."""
    def read() -> tuple[str, str]:
        model = onnx.load(str(fp32), load_external_data=False)
        if any(node.name.startswith(WRAPPER_PREFIX) for node in model.graph.node):
            return user_io(model)
        return model.graph.input[0].name, model.graph.output[0].name

    return _IMAGE_IO.get(file_identity(fp32), read)


_FIXED_OUTPUTS = Memo(256)  # (graph file, size, mtime) -> `_fixed_outputs`


def _fixed_outputs(fp32: Path) -> dict[str, tuple[float, float]]:
    """{output of a Sigmoid / Softmax / Tanh / L2 normalization of the network (not the lab's wrapper): its fixed
    LiteRT range}."""
    def read() -> dict[str, tuple[float, float]]:
        return litert_fixed_outputs(onnx.load(str(fp32), load_external_data=False))

    return _FIXED_OUTPUTS.get(file_identity(fp32), read)


def _walk_same_values(model: onnx.ModelProto, tensor: str) -> list[str]:
    found, frontier = [], [tensor]
    while frontier:
        current = frontier.pop()
        found.append(current)
        frontier += [n.output[0] for n in model.graph.node if current in n.input[:1] and moves_values(n)]
    return found


def learned_ranges(model_name: str | os.PathLike, scheme: Scheme | str) -> dict[str, tuple[float, float]] | None:
    """The activation ranges a QAT run learned for `scheme` (`sr.tune.qat`), recorded in the model file, or None.

    Args:
        model_name: a shipped model name, a weight file or a registered ONNX model.
        scheme: the INT8 scheme asked for; ranges learned for another scheme do not apply.

    Returns:
        {tensor: (low, high)}, or None when the model was not fine-tuned for `scheme`.
    """
    record = qat_record(model_name)
    if record is None or record.scheme != Scheme.parse(scheme).value:
        return None
    return dict(record.ranges)


def qat_record(model_name: str | os.PathLike) -> TuningRecord | None:
    """What `sr.tune.qat` (or `sr.tune.ptq`) recorded in a tuned model's file (scheme, learned ranges, the model it started
    from, its run), or None for a model that was not tuned."""
    return model_info(model_name).record()
