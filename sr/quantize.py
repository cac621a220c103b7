"""QDQ INT8 models from our calibration ranges (written by `onnxruntime.quantization`), and their on-disk cache.

Two schemes:

- `tensorrt`: symmetric INT8 activations, per-channel symmetric INT8 weights: what TensorRT executes from an
  explicitly quantized (QDQ) network. ONNX Runtime runs the same model on the CPU with the same numerics.
- `cpu`: asymmetric UINT8 activations, per-channel INT8 weights: ONNX Runtime's fast x86 path.

What is quantized: the graph input, every Conv (weights per output channel, activations per tensor, bias in
INT32), every ReLU/Clip, the Concat and the DepthToSpace. A Conv followed by a ReLU/Clip is one fused unit in
TensorRT (and ONNX Runtime folds the activation into the Conv's output quantization for uint8): the Conv output
gets the activation's range, as TensorRT's layer fusion does. Nothing stays in float except the final
dequantization of the network output, and whatever a fix explicitly excludes.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.calibrate import TensorData, TensorsData, save_tensors_data

from . import __version__
from .calibrate import (CalibrationConfig, Method, TensorRange, TensorStats, calibration_patches, choose_ranges,
                        collect_statistics, images_digest, load_calibration_images, parse_choice)
from .export import export_onnx, file_sha256, write_atomic
from .models import load_model, resolve_weights

log = logging.getLogger(__name__)

CACHE_DIR = Path(__file__).resolve().parent.parent / "cache"  # $SR_CACHE_DIR overrides it


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The cache folder: the argument, else $SR_CACHE_DIR, else cache/ in the project (read at call time)."""
    return Path(cache_dir or os.environ.get("SR_CACHE_DIR") or CACHE_DIR)
QUANTIZED_OPS = ["Conv", "Relu", "Clip", "Concat", "DepthToSpace"]


class Scheme(str, Enum):
    TENSORRT = "tensorrt"
    CPU = "cpu"

    @classmethod
    def parse(cls, value) -> "Scheme":
        return parse_choice(cls, value, "INT8 scheme")

    @property
    def symmetric(self) -> bool:
        return self is Scheme.TENSORRT


@dataclass
class Fixes:
    """Per-tensor overrides applied on top of a calibration (see `sr.diagnose`)."""

    range_method: dict[str, str] = field(default_factory=dict)  # tensor -> method used for its range instead
    keep_float: list[str] = field(default_factory=list)  # tensors left unquantized (their QDQ pair removed)

    def is_empty(self) -> bool:
        return not self.range_method and not self.keep_float

    def key(self) -> str:
        return json.dumps({"range_method": dict(sorted(self.range_method.items())),
                           "keep_float": sorted(self.keep_float)}, sort_keys=True)


@dataclass
class CalibratedModel:
    """An INT8 model and everything that made it."""

    model: str
    scheme: Scheme
    config: CalibrationConfig
    fixes: Fixes
    key: str
    fp32_onnx: Path
    qdq_onnx: Path
    ranges: dict[str, TensorRange]
    stats: list[TensorStats]
    producers: dict[str, str]  # tensor -> op type that produces it
    seconds: float  # time spent calibrating (0 when read from the cache)
    cached: bool

    def table(self) -> list[dict]:
        return [r.to_dict() for r in self.ranges.values()]


def fp32_onnx_path(model_name: str | os.PathLike, cache_dir: Path | None = None) -> Path:
    """The FP32 ONNX export of a model, cached by the weight file's hash."""
    cache_dir = cache_root(cache_dir)
    weights = resolve_weights(model_name)
    path = cache_dir / "onnx" / f"{weights.stem}-{file_sha256(weights)[:16]}.onnx"
    if not path.is_file() or not _loads(path):
        export_onnx(load_model(weights), path)
    return path


def _loads(path: Path) -> bool:
    try:
        onnx.checker.check_model(str(path))
        return True
    except Exception:
        return False


def tie_fused_ranges(model: onnx.ModelProto, ranges: dict[str, TensorRange]) -> dict[str, TensorRange]:
    """Give a Conv output that feeds only a ReLU/Clip (possibly through a DepthToSpace, a pure permutation)
    the activation's output range: TensorRT fuses Conv+ReLU and quantizes once, after the activation."""
    consumers: dict[str, list[onnx.NodeProto]] = {}
    producer = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
        for name in node.output:
            producer[name] = node
    tied = dict(ranges)
    for node in model.graph.node:
        if node.op_type not in ("Relu", "Clip") or node.output[0] not in ranges:
            continue
        source = ranges[node.output[0]]
        tensor = node.input[0]
        while tensor in ranges and len(consumers.get(tensor, [])) == 1 and tensor in producer:
            tied[tensor] = TensorRange(tensor, source.low, source.high, ranges[tensor].observed_min,
                                       ranges[tensor].observed_max, ranges[tensor].clipped_fraction, source.method)
            if producer[tensor].op_type != "DepthToSpace":
                break
            tensor = producer[tensor].input[0]
    return tied


def write_qdq_model(fp32_onnx: Path, ranges: dict[str, TensorRange], scheme: Scheme, out: Path,
                    keep_float: Sequence[str] = ()) -> Path:
    """Quantize `fp32_onnx` with `onnxruntime.quantization.quantize_static`, fed our ranges through its
    calibration cache (no calibration runs inside ORT). `keep_float` tensors get no QDQ pair."""
    scheme = Scheme.parse(scheme)
    model = onnx.load(str(fp32_onnx))
    tied = tie_fused_ranges(model, ranges)
    data = {name: TensorData(lowest=np.float32(r.low), highest=np.float32(r.high)) for name, r in tied.items()}
    excluded = _nodes_touching(model, keep_float)
    with tempfile.TemporaryDirectory(prefix="sr-qdq-") as work:
        cache = Path(work) / "ranges.json"
        save_tensors_data(TensorsData(CalibrationMethod.MinMax, data), cache)
        temp = Path(work) / "model.qdq.onnx"
        quiet = logging.getLogger()  # quantize_static warns on the root logger about optional pre-processing
        level = quiet.level
        quiet.setLevel(logging.ERROR)
        try:
            quantize_static(
                str(fp32_onnx), str(temp), calibration_data_reader=None, calibration_cache_path=str(cache),
                quant_format=QuantFormat.QDQ, op_types_to_quantize=QUANTIZED_OPS, per_channel=True,
                activation_type=QuantType.QInt8 if scheme.symmetric else QuantType.QUInt8,
                weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax, nodes_to_exclude=excluded,
                extra_options={"ActivationSymmetric": scheme.symmetric, "WeightSymmetric": True,
                               "QDQKeepRemovableActivations": scheme.symmetric},
            )
        finally:
            quiet.setLevel(level)
        write_atomic(temp.read_bytes(), out)
    return out


def _nodes_touching(model: onnx.ModelProto, tensors: Sequence[str]) -> list[str]:
    """Nodes that produce or consume one of `tensors`: excluding them all keeps those tensors in float (a
    quantized consumer would otherwise put a QDQ pair on its input). The price: those ops run in float."""
    wanted = set(tensors)
    return [node.name for node in model.graph.node if wanted & (set(node.output) | set(node.input))]


def cache_key(weights_hash: str, config: CalibrationConfig, scheme: Scheme, data_hash: str, fixes: Fixes) -> str:
    parts = {"weights": weights_hash, "method": config.method.value, "samples": config.samples,
             "patch": config.patch_size, "seed": config.seed, "percentile": config.percentile,
             "scheme": scheme.value, "data": data_hash, "fixes": fixes.key(), "version": __version__}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]


def calibrate_model(model_name: str | os.PathLike, config: CalibrationConfig | None = None,
                    scheme: Scheme | str = Scheme.TENSORRT, images: Sequence[np.ndarray] | None = None,
                    fixes: Fixes | None = None, cache_dir: Path | None = None, threads: int = 0,
                    progress: Callable[[float, str], None] | None = None) -> CalibratedModel:
    """Calibrate a model and write its QDQ INT8 ONNX model, or return the cached one.

    The cache key is (weights hash, method, samples, patch size, seed, scheme, calibration-data hash, fixes).
    An entry is a folder written under a temp name and renamed into place; its manifest records each file's
    SHA-256, and an entry that fails the check (a corrupt or partial file) is rebuilt.

    Example:
        >>> int8 = calibrate_model("xlsr-clip", CalibrationConfig(method="entropy", samples=100), "tensorrt")
        >>> int8.qdq_onnx, int8.ranges["output"].high

    Raises:
        FileNotFoundError: unknown model or calibration folder.
        ValueError: bad configuration.
    """
    config = config or CalibrationConfig()
    scheme = Scheme.parse(scheme)
    fixes = fixes or Fixes()
    cache_dir = cache_root(cache_dir)
    weights = resolve_weights(model_name)
    calibration_images = load_calibration_images(config.data if images is None else images)
    key = cache_key(file_sha256(weights), config, scheme, images_digest(calibration_images), fixes)
    entry = cache_dir / "int8" / key
    cached = _read_entry(entry)
    fp32 = fp32_onnx_path(weights, cache_dir)
    if cached is not None:
        ranges, stats, producers = cached
        return CalibratedModel(str(model_name), scheme, config, fixes, key, fp32, entry / "model.qdq.onnx",
                               ranges, stats, producers, 0.0, True)

    started = time.perf_counter()
    stats = collect_statistics(
        fp32, lambda: calibration_patches(calibration_images, config.samples, config.patch_size, config.seed),
        config.samples, need_histograms=True, threads=threads, progress=progress)
    ranges = choose_ranges(stats, config.method, scheme.symmetric, config.percentile)
    for tensor, method in fixes.range_method.items():
        if tensor not in ranges:
            raise ValueError(f"no tensor {tensor!r} in {weights.stem}; tensors: {', '.join(ranges)}")
        ranges[tensor] = choose_ranges([s for s in stats if s.name == tensor], Method.parse(method),
                                       scheme.symmetric, config.percentile)[tensor]
    for tensor in fixes.keep_float:
        if tensor not in ranges:
            raise ValueError(f"no tensor {tensor!r} in {weights.stem}; tensors: {', '.join(ranges)}")
    model = onnx.load(str(fp32))
    producers = {node.output[0]: node.op_type for node in model.graph.node if node.output}
    producers[model.graph.input[0].name] = "Input"

    work = Path(tempfile.mkdtemp(dir=_ensure(cache_dir / "int8"), prefix=f".{key}."))
    try:
        write_qdq_model(fp32, ranges, scheme, work / "model.qdq.onnx", keep_float=fixes.keep_float)
        (work / "ranges.json").write_text(json.dumps({"ranges": [r.to_dict() for r in ranges.values()],
                                                      "producers": producers}))
        np.savez(work / "stats.npz", names=np.array([s.name for s in stats]),
                 low=np.array([s.observed_min for s in stats]), high=np.array([s.observed_max for s in stats]),
                 histograms=np.stack([s.histogram for s in stats]))
        manifest = {name: file_sha256(work / name) for name in ("model.qdq.onnx", "ranges.json", "stats.npz")}
        (work / "manifest.json").write_text(json.dumps({"files": manifest, "config": asdict(config),
                                                        "scheme": scheme.value, "fixes": fixes.key()}, default=str))
        if entry.exists():
            shutil.rmtree(entry, ignore_errors=True)
        os.replace(work, entry)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    seconds = time.perf_counter() - started
    return CalibratedModel(str(model_name), scheme, config, fixes, key, fp32, entry / "model.qdq.onnx", ranges,
                           stats, producers, seconds, False)


def _ensure(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _read_entry(entry: Path):
    """(ranges, stats, producers) of a valid cache entry, or None (missing, partial or corrupt)."""
    try:
        manifest = json.loads((entry / "manifest.json").read_text())
        for name, digest in manifest["files"].items():
            if file_sha256(entry / name) != digest:
                log.warning("cache entry %s is corrupt (%s changed); rebuilding", entry.name, name)
                return None
        saved = json.loads((entry / "ranges.json").read_text())
        ranges = {}
        for item in saved["ranges"]:
            ranges[item["name"]] = TensorRange(item["name"], item["low"], item["high"], item["observed_min"],
                                               item["observed_max"], item["clipped_fraction"], item["method"])
        arrays = np.load(entry / "stats.npz")
        stats = [TensorStats(str(n), float(lo), float(hi), h) for n, lo, hi, h in
                 zip(arrays["names"], arrays["low"], arrays["high"], arrays["histograms"])]
        return ranges, stats, saved["producers"]
    except (OSError, ValueError, KeyError, json.JSONDecodeError):
        if entry.exists():
            log.warning("cache entry %s is unreadable; rebuilding", entry.name)
        return None
