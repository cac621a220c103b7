"""A deployment bundle: everything a deployment tool needs to run the INT8 model the lab made, in one folder (or
zip), with a README saying how it was made and how well it does. Every model in it is the user's own graph (a
user's model without the lab's wrapper: its own inputs, outputs and names), and the figures in its README are
measured on those INT8 networks with the reference engine (ONNX Runtime on the CPU; a user's network inside the
lab's float wrapper, which changes no value the network sees).

- `model.qdq.onnx`: the TensorRT QDQ model (`tensorrt` scheme: Q/DQ where NVIDIA ModelOpt puts them, symmetric
  INT8, per-channel weights, float biases): `trtexec --onnx=model.qdq.onnx --stronglyTyped`;
- `model.npu-int8.onnx`: every tensor in INT8, the output included, as LiteRT's 8-bit specification says (`npu`
  scheme: asymmetric INT8 activations, INT32 biases, a Concat's inputs on its output's grid), with its figures
  on Qualcomm's HTP arithmetic too where `onnxruntime-qnn` is installed;
- `model.cpu-int8.onnx`: the ONNX Runtime CPU model (`cpu` scheme: UINT8 activations, fast-kernel rewrites);
- `model.tflite`: the npu model as a full-integer LiteRT file written from the lab's spec and ranges
  (`sr.run.tflite`), with what LiteRT's XNNPACK and reference kernels gave on it (or why there is none);
- `model.fp32.onnx`: the FP32 model the ranges belong to;
- `calibration.cache` (only with `trt_version`, a TensorRT 10 release): the ranges of the tensors the tensorrt
  model quantizes, as a TensorRT 10 calibration cache (`TRT-<major*10000+minor*100+patch>-EntropyCalibration2`,
  then `tensor: <big-endian hex of the float32 scale>`, scale = amax / 127). TensorRT 11 removed implicit INT8
  calibration: the QDQ model is the way there;
- `ranges.json`: per tensor the range, the method, the sample count, the calibration-data digest, the lab version;
- `README.md`: how it was made, its loss against FP32 on the given images, the commands that use it.
"""
from __future__ import annotations

import json
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx

from .. import __version__
from ..quant.calibdata import images_digest, load_calibration_images
from ..quant.calibrate import CalibrationConfig, Method
from ..quant.searches import TensorRange
from ..metrics import brightness_ratio, psnr_y
from ..model.models import model_info
from ..run.quantize import calibrate_model, fp32_onnx_path
from ..quant.calibrated import CalibratedModel
from ..quant.quantspec import Scheme
from ..quant.recipe import Fixes
from ..quant.qdq import spec_of, tie_fused_ranges
from ..run.conformance import EngineRefused
from ..run.npu import litert_available, qnn_available
from ..run.runtime import EngineKind, engine_for, tflite_model
from ..run.tflite import SizeDependent
from ..model.wrapper import unwrap
from ..store import write_atomic

CALIBRATORS = {Method.ENTROPY: "EntropyCalibration2", Method.ENTROPY_ZEROS: "EntropyCalibration2",
               Method.MINMAX: "MinMaxCalibration", Method.PERCENTILE: "EntropyCalibration2",
               Method.MSE: "EntropyCalibration2"}



def tensorrt_cache_tag(version: str) -> str:
    """The version field of a TensorRT 10 calibration cache header: `TRT-<major*10000+minor*100+patch>`.

    Args:
        version: a TensorRT 10 release, "10.3" or "10.3.0".

    Returns:
        e.g. "TRT-100300".

    Raises:
        ValueError: not a TensorRT 10 version (TensorRT 11 has no implicit INT8 calibration; older ones are not
            supported here).
    """
    parts = str(version).strip().split(".")
    if not 1 <= len(parts) <= 3 or not all(p.isdigit() for p in parts):
        raise ValueError(f"not a TensorRT version: {version!r}; give e.g. 10.3.0")
    major, minor, patch = (int(p) for p in (parts + ["0", "0"])[:3])
    if major != 10:
        raise ValueError(f"a calibration cache is for TensorRT 10 only (got {version}): TensorRT 11 removed implicit "
                         "INT8 calibration; deploy model.qdq.onnx with --stronglyTyped instead")
    if minor > 99 or patch > 99:
        raise ValueError(f"not a TensorRT version: {version!r}")
    return f"TRT-{major * 10000 + minor * 100 + patch}"


@dataclass
class Bundle:
    """What `export_bundle` wrote, and the INT8 model's measured loss."""

    folder: Path
    files: list[str]
    psnr_fp32_vs_int8_db: float | None  # mean PSNR of INT8 against FP32 on the measured images
    brightness: float | None
    measured_on: str = ""  # e.g. "5 given images"


def calibration_cache_text(ranges: dict[str, TensorRange], method: Method, trt_version: str = "10.0.0") -> str:
    """TensorRT 10's calibration cache: header, then `name: <hex of big-endian float32 amax / 127>` per tensor.

    Args:
        ranges: tensor -> range (symmetric amax = max(|low|, |high|)).
        method: names the calibrator in the header.
        trt_version: the TensorRT 10 release the cache is for (its header names it).

    Returns:
        the text.
    """
    lines = [f"{tensorrt_cache_tag(trt_version)}-{CALIBRATORS[Method.parse(method)]}"]
    for name, r in ranges.items():
        scale = max(abs(r.low), abs(r.high)) / 127.0
        lines.append(f"{name}: {struct.pack('>f', scale).hex()}")
    return "\n".join(lines) + "\n"


def parse_calibration_cache(text: str) -> dict[str, float]:
    """The scales of a TensorRT calibration cache (the inverse of `calibration_cache_text`).

    Raises:
        ValueError: a line that is not `name: 8 hex digits`.
    """
    scales = {}
    for line in text.strip().splitlines()[1:]:
        name, _, value = line.rpartition(": ")
        if not name or len(value) != 8:
            raise ValueError(f"not a calibration cache line: {line!r}")
        scales[name] = struct.unpack(">f", bytes.fromhex(value))[0]
    return scales


def _measure(int8: CalibratedModel, images: Sequence[np.ndarray], fp32_outputs: Sequence[np.ndarray],
             engine=None) -> tuple[float | None, float | None]:
    """Mean PSNR-Y of the INT8 model against the FP32 outputs and its brightness ratio, with the reference engine
    (or the target `engine` given)."""
    if not images:
        return None, None
    quantized = engine or engine_for(int8.model, int8)
    pairs = [(fp32, quantized.run(image)) for image, fp32 in zip(images, fp32_outputs)]
    return (float(np.mean([psnr_y(q, f, int8.scale) for f, q in pairs])),
            float(np.mean([brightness_ratio(q, f) for f, q in pairs])))


FILES = {Scheme.TENSORRT: "model.qdq.onnx", Scheme.NPU: "model.npu-int8.onnx", Scheme.CPU: "model.cpu-int8.onnx"}
# every file a bundle may hold: one left from an earlier bundle in the same folder is removed, never shipped
BUNDLE_FILES = {*FILES.values(), "model.fp32.onnx", "calibration.cache", "ranges.json", "README.md", "model.tflite"}


def _tflite_figures(int8: CalibratedModel, images: Sequence[np.ndarray], fp32_outputs: Sequence[np.ndarray],
                    out: Path) -> tuple[bool, list[str]]:
    """Write `model.tflite` (the npu model as a full-integer LiteRT file, `sr.run.tflite`) and say what LiteRT's
    kernels gave on it; or say why there is none.

    Returns:
        (whether `model.tflite` was written, the README's lines about it).
    """
    if not litert_available():
        return False, ["No `model.tflite`: LiteRT (`ai-edge-litert`) is not installed."]
    try:
        source, sized = tflite_model(int8), None
    except SizeDependent as error:  # a file per size: the one for the first image's size is shipped
        source, sized = None, error
    except ValueError as error:
        return False, [f"No `model.tflite`: {error}."]
    lines, first = [], None
    for kind, what in ((EngineKind.LITERT, "XNNPACK"), (EngineKind.LITERT_REF, "TFLite's reference kernels")):
        try:
            engine = engine_for(int8.model, int8, kind=kind)
        except (ValueError, EngineRefused) as error:
            lines.append(f"`model.tflite` on LiteRT, {what}: not used ({error}).")
            continue
        ran = len(engine.sizes)
        psnr, _ = _measure(int8, images, fp32_outputs, engine)
        first = first or (engine.sizes[ran] if len(engine.sizes) > ran else None)
        verdict = engine.conformance
        wrapped = getattr(engine, "wrapper", None) is not None and any(engine.sides)
        around = (" (the file is your graph alone; the lab ran its own float pre- and post-processing around it: "
                  "what your deployment does before and after the model)") if wrapped else ""
        lines.append(f"`model.tflite` on LiteRT, {what}: {psnr:.2f} dB PSNR-Y vs FP32{around}; against the reference "
                     f"on the conformance probe: mean {verdict.mean_levels:.2f} levels, 99.9th percentile "
                     f"{verdict.p999_levels:.0f}, max {verdict.max_levels}.")
    if sized is not None:
        if first is None:
            return False, [f"No `model.tflite`: {sized}, and LiteRT ran no image here."] + lines
        source = tflite_model(int8, first)
        lines.insert(0, f"`model.tflite` is written for {first[0]} x {first[1]} inputs (the first image's, or its "
                        "first tile's): "
                        f"{sized}; a converter folds that float for the "
                        "shape it converts, and so does the lab: the figures below ran the file written for each "
                        "image's size.")
    write_atomic(source.read_bytes(), out / "model.tflite")
    return True, lines


def _npu_figures(int8: CalibratedModel, images: Sequence[np.ndarray], fp32_outputs: Sequence[np.ndarray]):
    """The npu model as Qualcomm's HTP (simulated) runs it: (engine name, PSNR-Y vs FP32, brightness, its
    conformance), or (None, the reason) where it cannot run here."""
    if not qnn_available():
        return None, "onnxruntime-qnn is not installed"
    try:
        engine = engine_for(int8.model, int8, kind=EngineKind.QNN_HTP)
    except (ValueError, EngineRefused) as error:
        return None, str(error)
    return engine.name, (*_measure(int8, images, fp32_outputs, engine), engine.conformance)


def _write_model(source: Path, out: Path) -> None:
    """The user's own graph of a lab model file (`sr.model.wrapper.unwrap`), written atomically."""
    write_atomic(unwrap(onnx.load(str(source))).SerializeToString(), out)


def export_bundle(model: str, config: CalibrationConfig, out: str | Path, fixes: Fixes | None = None,
                  images: Sequence[np.ndarray] = (), calibration_images: Sequence[np.ndarray] | None = None,
                  trt_version: str | None = None, progress=None, shown_as: str | None = None) -> Bundle:
    """Calibrate (or reuse the cache) and write the deployment bundle of the module docstring.

    Example:
        >>> export_bundle("xlsr-clip", CalibrationConfig(method="mse", samples=1000), "bundle/", trt_version="10.3")

    Args:
        model: a shipped name, a weight file or a registered ONNX model.
        config: the calibration.
        out: the folder to write (created).
        fixes: per-tensor overrides (as applied in the app).
        progress: called with (fraction, message) while calibrating (a caller may raise from it to stop).
        images: LR images (uint8 HxWx3) to measure the INT8 loss on, for the README.
        calibration_images: images to calibrate on instead of `config.data`.
        trt_version: a TensorRT 10 release: also write its calibration cache (None: no cache).
        shown_as: the model's name in the README (an uploaded model's file name; default: the lab's name for it).

    Returns:
        the Bundle (its figures are the tensorrt model's).

    Raises:
        ValueError: a `trt_version` that is not TensorRT 10.
    """
    if trt_version is not None:
        tensorrt_cache_tag(trt_version)  # refuse a bad version before any work
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    made = {}
    for index, scheme in enumerate(FILES):
        step = (lambda f, m, i=index: progress((i + f) / len(FILES), f"{m} ({scheme.value})")) if progress else None
        made[scheme] = calibrate_model(model, config, scheme, images=calibration_images, fixes=fixes, progress=step)
    tensorrt = made[Scheme.TENSORRT]
    for scheme, name in FILES.items():
        _write_model(made[scheme].qdq_onnx, out / name)
    _write_model(fp32_onnx_path(model), out / "model.fp32.onnx")
    spec = spec_of(tensorrt.fp32_onnx, Scheme.TENSORRT, tensorrt.fixes.keep_float)
    ranges = {user_name(t): r for t, r in tie_fused_ranges(spec, tensorrt.ranges).items()}
    if trt_version is not None:
        write_atomic(calibration_cache_text(ranges, tensorrt.config.method, trt_version).encode(),
                     out / "calibration.cache")
    digest = images_digest(load_calibration_images(config.data if calibration_images is None else calibration_images))
    _write_ranges(out, model, config, tensorrt, ranges, digest, fixes)
    measured_on = "given images"
    if not images:  # no images given: measure on the calibration images, and say so
        images = load_calibration_images(config.data if calibration_images is None else calibration_images)[:8]
        measured_on = "calibration images (no test images were given)"
    fp32 = engine_for(model)  # the FP32 outputs once, for the three INT8 models
    fp32_outputs = [fp32.run(image) for image in images]
    figures = {scheme: _measure(made[scheme], images, fp32_outputs) for scheme in FILES}
    npu = _npu_figures(made[Scheme.NPU], images, fp32_outputs)
    with_tflite, litert = _tflite_figures(made[Scheme.NPU], images, fp32_outputs, out)
    write_atomic(_readme(model, config, tensorrt, figures, len(images), measured_on, trt_version, npu,
                         litert, shown_as).encode(), out / "README.md")
    _remove_stale(out, trt_version is not None, with_tflite)
    files = sorted(p.name for p in out.iterdir())
    psnr, brightness = figures[Scheme.TENSORRT]
    return Bundle(out, files, psnr, brightness, f"{len(images)} {measured_on}")


def _write_ranges(out: Path, model: str, config: CalibrationConfig, tensorrt: CalibratedModel, ranges: dict,
                  digest: str, fixes: Fixes | None) -> None:
    model = Path(model).name if "/" in model or "\\" in model else model  # a file's name, never a server path
    write_atomic(json.dumps({"model": model, "method": tensorrt.config.method.value, "auto": tensorrt.choice and tensorrt.choice.to_json(),
                             "samples": config.samples,
                             "seed": config.seed, "calibration_data_digest": digest, "lab_version": __version__,
                             "fixes": json.loads((fixes or Fixes()).key()), "scheme": Scheme.TENSORRT.value,
                             "tensors": [{**r.to_dict(), "name": name} for name, r in ranges.items()]},
                            indent=1).encode(), out / "ranges.json")


def _remove_stale(out: Path, with_cache: bool, with_tflite: bool) -> None:
    """Delete what an earlier bundle left in the same folder that this one did not write (another model's
    calibration cache, a .tflite this graph has none of): the folder holds exactly the bundle asked for."""
    written = {*FILES.values(), "model.fp32.onnx", "ranges.json", "README.md"} | (
        {"calibration.cache"} if with_cache else set()) | ({"model.tflite"} if with_tflite else set())
    for stale in BUNDLE_FILES - written:
        (out / stale).unlink(missing_ok=True)


def user_name(tensor: str) -> str:
    """A tensor's name in the user's own graph (the lab prefixes a user's names with `user/`)."""
    return tensor[len("user/"):] if tensor.startswith("user/") else tensor


def _readme(model: str, config: CalibrationConfig, int8: CalibratedModel, figures: dict, count: int,
            measured_on: str, trt_version: str | None, npu: tuple = (None, "not measured"),
            litert: Sequence[str] = (), shown_as: str | None = None) -> str:
    info = model_info(model)
    lines = []
    for scheme, name in FILES.items():
        psnr, brightness = figures[scheme]
        lines.append(f"| `{name}` | {scheme.value} | " + ("not measured" if psnr is None else
                     f"{psnr:.2f} dB | {brightness:.4f}") + " |")
    method = int8.config.method.value if not int8.choice else (
        f"{int8.choice.method} (chosen by the automatic method, the best against FP32 of "
        f"{', '.join(int8.choice.candidates)} on {int8.choice.held_back_images} held-back calibration images)")
    engine, measured = npu
    if engine is None:
        on_npu = f"Not run on Qualcomm's HTP arithmetic here: {measured}."
    else:
        psnr, brightness, verdict = measured
        on_npu = (f"`model.npu-int8.onnx` as Qualcomm's Hexagon NPU computes it ({engine}: `libQnnHtp` from "
                  f"`onnxruntime-qnn`, simulated on x86, CPU fallback off): {psnr:.2f} dB PSNR-Y vs FP32, "
                  f"brightness {brightness:.4f}; against the reference on the conformance probe: mean "
                  f"{verdict.mean_levels:.2f} levels, 99.9th percentile {verdict.p999_levels:.0f}, max "
                  f"{verdict.max_levels} (the NPU rounds its requantization its own way).")
    notes = int8.warnings(figures[Scheme.TENSORRT][1], measured_on)
    warnings = "".join(f"\n**Warning:** {note}.\n" for note in notes)
    cache = (f"| `calibration.cache` | TensorRT {trt_version}, implicit INT8: `trtexec --onnx=model.fp32.onnx --int8 "
             f"--calib=calibration.cache` (only the tensors `model.qdq.onnx` quantizes) |\n" if trt_version else "")
    return f"""# INT8 bundle of `{shown_as or info.name}` (x{info.scale})

Made by SR INT8 Lab {__version__}: {method} calibration, {config.samples} samples (seed {config.seed}),
{"fixes: " + int8.fixes.key() if not int8.fixes.is_empty() else "no per-tensor fixes"}.
{warnings}
Each model is the network itself, with its own inputs and outputs (for a model you brought: your graph, your
tensor names; the lab's colour conversion and layout handling are not in it and are not quantized).

Measured on {count} {measured_on}, each INT8 model run by ONNX Runtime on the CPU against the FP32 model:

| file | scheme | PSNR-Y vs FP32 | brightness INT8/FP32 |
|---|---|---|---|
{chr(10).join(lines)}

{on_npu}
{"".join(chr(10) + line + chr(10) for line in litert)}
| file | use |
|---|---|
| `model.qdq.onnx` | TensorRT 10 or 11: `trtexec --onnx=model.qdq.onnx --stronglyTyped --saveEngine=model.plan` |
| `model.npu-int8.onnx` | NPUs (LiteRT's 8-bit specification: asymmetric INT8 activations, INT32 biases, every tensor in INT8, the output included): Qualcomm QNN through ONNX Runtime's QNN execution provider, or a LiteRT converter |
| `model.cpu-int8.onnx` | ONNX Runtime on a CPU (UINT8 activations) |
| `model.tflite` | LiteRT (TFLite) full-integer INT8, NHWC, the npu model's scales exactly (no converter): an INT8 image in (pixel - 128) and out, any height and width; where a graph cannot be written this way the lines above say why |
| `model.fp32.onnx` | the FP32 model the ranges belong to |
{cache}| `ranges.json` | the ranges, how they were chosen, and the calibration data's digest |

TensorRT 11 removed implicit INT8 calibration: the QDQ model is the way there. A calibration cache is written
only when a TensorRT 10 version is given (`--trt-version`).
"""


def zip_bundle(bundle: Bundle, path: str | Path) -> Path:
    """The bundle folder as one zip file (for a download)."""
    path = Path(path)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name in bundle.files:
            archive.write(bundle.folder / name, name)
    return path
