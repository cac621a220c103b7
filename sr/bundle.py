"""A deployment bundle: everything a deployment tool needs to run the INT8 model the lab made, in one folder (or
zip), with a README saying how it was made and how well it does.

- `model.qdq.onnx`: the TensorRT QDQ model (symmetric INT8 activations, per-channel symmetric weights) with the
  chosen ranges and fixes (`trtexec --onnx=model.qdq.onnx --stronglyTyped`);
- `calibration.cache`: the same ranges as a TensorRT calibration cache for the FP32 model (`trtexec
  --onnx=model.fp32.onnx --int8 --calib=calibration.cache`): a header line naming the calibrator, then one
  `tensor: <big-endian hex of the float32 scale>` line per tensor, scale = amax / 127;
- `model.fp32.onnx`: the model in the lab's standard interface (1x3xHxW RGB in [0, 1] in, x s out);
- `model.cpu-int8.onnx`: the ONNX Runtime CPU model (`cpu` scheme: UINT8 activations, fast-kernel rewrites);
- `ranges.json`: per tensor the range, the method, the sample count, the calibration-data digest, the lab version;
- `README.md`: how it was made, its loss against FP32 on the given images, the commands that use it.
"""
from __future__ import annotations

import json
import shutil
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from . import __version__
from .calibrate import CalibrationConfig, Method, TensorRange, images_digest, load_calibration_images
from .engines import OrtEngine
from .metrics import brightness_ratio, psnr_y
from .models import model_info
from .quantize import CalibratedModel, Fixes, Scheme, calibrate_model, fp32_onnx_path, tie_fused_ranges
from .store import write_atomic

CALIBRATORS = {Method.ENTROPY: "EntropyCalibration2", Method.ENTROPY_ZEROS: "EntropyCalibration2",
               Method.MINMAX: "MinMaxCalibration", Method.PERCENTILE: "EntropyCalibration2",
               Method.MSE: "EntropyCalibration2"}
TENSORRT_VERSION_TAG = "TRT-100000"  # the header's TensorRT version field (10.0.0); TensorRT checks the calibrator name


@dataclass
class Bundle:
    """What `export_bundle` wrote, and the INT8 model's measured loss."""

    folder: Path
    files: list[str]
    psnr_fp32_vs_int8_db: float | None  # mean PSNR of INT8 against FP32 on the measured images
    brightness: float | None
    measured_on: str = ""  # e.g. "5 given images"


def calibration_cache_text(ranges: dict[str, TensorRange], method: Method) -> str:
    """TensorRT's calibration cache: header, then `name: <hex of big-endian float32 amax / 127>` per tensor.

    Args:
        ranges: tensor -> range (symmetric amax = max(|low|, |high|)).
        method: names the calibrator in the header.

    Returns:
        the text.
    """
    lines = [f"{TENSORRT_VERSION_TAG}-{CALIBRATORS[Method.parse(method)]}"]
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


def _measure(int8: CalibratedModel, images: Sequence[np.ndarray]) -> tuple[float | None, float | None]:
    if not images:
        return None, None
    fp32, quantized = OrtEngine(int8.fp32_onnx, int8.scale), OrtEngine(int8.qdq_onnx, int8.scale)
    pairs = [(fp32.run(image), quantized.run(image)) for image in images]
    return (float(np.mean([psnr_y(q, f, int8.scale) for f, q in pairs])),
            float(np.mean([brightness_ratio(q, f) for f, q in pairs])))


def export_bundle(model: str, config: CalibrationConfig, out: str | Path, fixes: Fixes | None = None,
                  images: Sequence[np.ndarray] = (), calibration_images: Sequence[np.ndarray] | None = None) -> Bundle:
    """Calibrate (or reuse the cache) and write the deployment bundle of the module docstring.

    Example:
        >>> export_bundle("xlsr-clip", CalibrationConfig(method="mse", samples=1000), "bundle/")

    Args:
        model: a shipped name, a weight file or a registered ONNX model.
        config: the calibration.
        out: the folder to write (created).
        fixes: per-tensor overrides (as applied in the app).
        images: LR images (uint8 HxWx3) to measure the INT8 loss on, for the README.
        calibration_images: images to calibrate on instead of `config.data`.

    Returns:
        the Bundle.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tensorrt = calibrate_model(model, config, Scheme.TENSORRT, images=calibration_images, fixes=fixes)
    cpu = calibrate_model(model, config, Scheme.CPU, images=calibration_images, fixes=fixes)
    shutil.copyfile(tensorrt.qdq_onnx, out / "model.qdq.onnx")
    shutil.copyfile(cpu.qdq_onnx, out / "model.cpu-int8.onnx")
    shutil.copyfile(fp32_onnx_path(model), out / "model.fp32.onnx")
    import onnx

    ranges = tie_fused_ranges(onnx.load(str(tensorrt.fp32_onnx)), tensorrt.ranges)
    write_atomic(calibration_cache_text(ranges, config.method).encode(), out / "calibration.cache")
    digest = images_digest(load_calibration_images(config.data if calibration_images is None else calibration_images))
    write_atomic(json.dumps({"model": model, "method": config.method.value, "samples": config.samples,
                             "seed": config.seed, "calibration_data_digest": digest, "lab_version": __version__,
                             "fixes": json.loads((fixes or Fixes()).key()),
                             "tensors": [r.to_dict() for r in ranges.values()]}, indent=1).encode(),
                 out / "ranges.json")
    measured_on = "given images"
    if not images:  # no images given: measure on the calibration images, and say so
        images = load_calibration_images(config.data if calibration_images is None else calibration_images)[:8]
        measured_on = "calibration images (no test images were given)"
    psnr, brightness = _measure(tensorrt, images)
    (out / "README.md").write_text(_readme(model, config, tensorrt, psnr, brightness, len(images), measured_on))
    files = sorted(p.name for p in out.iterdir())
    return Bundle(out, files, psnr, brightness, f"{len(images)} {measured_on}")


def _readme(model: str, config: CalibrationConfig, int8: CalibratedModel, psnr: float | None,
            brightness: float | None, count: int, measured_on: str) -> str:
    info = model_info(model)
    measured = ("Not measured." if psnr is None else f"On {count} {measured_on}: INT8 is {psnr:.2f} dB PSNR-Y "
                f"from FP32, brightness ratio {brightness:.4f}.")
    return f"""# INT8 bundle of `{info.name}` (x{info.scale})

Made by SR INT8 Lab {__version__}: {config.method.value} calibration, {config.samples} samples (seed {config.seed}),
{"fixes: " + int8.fixes.key() if not int8.fixes.is_empty() else "no per-tensor fixes"}.
The models have the lab's standard interface: `input` float32 1x3xHxW RGB in [0, 1], `output` 1x3x(sH)x(sW). For
a model you brought, that is your graph wrapped by the lab (layout, value range, and for a Y-only model the
RGB -> Y conversion with bicubic Cb/Cr) so that it takes and returns RGB images; your own layers are unchanged.

{measured}

| file | use |
|---|---|
| `model.qdq.onnx` | TensorRT: `trtexec --onnx=model.qdq.onnx --stronglyTyped --saveEngine=model.plan` |
| `calibration.cache` | TensorRT, implicit INT8: `trtexec --onnx=model.fp32.onnx --int8 --calib=calibration.cache` |
| `model.fp32.onnx` | the FP32 model the ranges belong to |
| `model.cpu-int8.onnx` | ONNX Runtime on a CPU (UINT8 activations) |
| `ranges.json` | the ranges, how they were chosen, and the calibration data's digest |
"""


def zip_bundle(bundle: Bundle, path: str | Path) -> Path:
    """The bundle folder as one zip file (for a download)."""
    path = Path(path)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name in bundle.files:
            archive.write(bundle.folder / name, name)
    return path
