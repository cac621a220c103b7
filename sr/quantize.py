"""QDQ INT8 models from our calibration ranges and the one description of what is quantized (`sr.quantspec`),
and their on-disk cache.

The symmetric schemes (`tensorrt`, `npu`) are written here, Q/DQ pair by Q/DQ pair, exactly as the spec says;
the `cpu` scheme (asymmetric UINT8, INT32 biases, ORT's fast x86 kernels) is written by
`onnxruntime.quantization.quantize_static`, fed our ranges through its calibration cache. Every written model is
read back (`sr.quantspec.graph_quantization`) and must quantize what its spec says, or the writer raises.
"""
from __future__ import annotations

import io
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from enum import Enum
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import onnx
from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.calibrate import TensorData, TensorsData, save_tensors_data

from . import calibrate, data, export, models, rewrite
from .calibrate import (CalibrationConfig, Method, TensorRange, TensorStats, calibration_patches, choose_ranges,
                        clipped_energy, clipped_fraction, collect_statistics, images_digest, load_calibration_images,
                        prepare_calibration_images)
from .engines import OrtEngine
from .export import export_onnx
from .metrics import brightness_ratio, psnr_y
from .models import load_model, model_info
from .quantspec import (ALL_INT8_OPS, QuantSpec, Scheme, activation_qparams, fp32_initializer_of, fused_ties,
                        graph_quantization, is_wrapper, quant_spec, used_names, weight_int8)
from .rewrite import REWRITE_OPS, rewrite_for_fast_int8
from .store import (cache_cap_bytes, cache_root, code_digest, evict, file_sha256, library_versions, locked,
                    logged_progress, publish_dir, remove_stale_temps, short_hash, temp_dir, touch, write_atomic)

log = logging.getLogger(__name__)

QUANTIZED_OPS = list(ALL_INT8_OPS)  # the op types the all-INT8 placements cover (others stay float)


class _QuietQuantizer(logging.Filter):
    """onnxruntime.quantization logs advice and notes on the *root* logger ("Please consider pre-processing",
    "Created a copy of bias input ...") for every model; below ERROR they are noise here. Dropped by their
    source file, once, at import: no logger level is ever changed."""

    def filter(self, record: logging.LogRecord) -> bool:
        source = record.pathname.replace(os.sep, "/")
        return record.levelno >= logging.ERROR or "onnxruntime/quantization" not in source


logging.getLogger().addFilter(_QuietQuantizer())


@dataclass
class Fixes:
    """Per-tensor overrides applied on top of a calibration (see `sr.diagnose.Fix`)."""

    range_method: dict[str, Method] = field(default_factory=dict)  # tensor -> method used for its range instead
    keep_float: list[str] = field(default_factory=list)  # tensors left unquantized (their QDQ pair removed)
    # tensor -> a range known in advance, whatever the calibration saw: the input of a network fed [0, 1] images,
    # the output of a Clip(0, 1)
    fixed_range: dict[str, tuple[float, float]] = field(default_factory=dict)

    def __post_init__(self):
        self.range_method = {tensor: Method.parse(method) for tensor, method in self.range_method.items()}
        self.fixed_range = {tensor: (float(low), float(high)) for tensor, (low, high) in self.fixed_range.items()}
        for tensor, (low, high) in self.fixed_range.items():
            if not low <= 0.0 <= high or low == high:
                raise ValueError(f"the fixed range of {tensor!r} must include 0 and not be empty, got [{low}, {high}]")

    def is_empty(self) -> bool:
        """True when nothing is overridden."""
        return not self.range_method and not self.keep_float and not self.fixed_range

    def key(self) -> str:
        """A canonical JSON string of the overrides (part of the cache key)."""
        return json.dumps({"range_method": {t: m.value for t, m in sorted(self.range_method.items())},
                           "keep_float": sorted(self.keep_float),
                           "fixed_range": {t: list(r) for t, r in sorted(self.fixed_range.items())}}, sort_keys=True)


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
    scale: int = 3
    # with Method.AUTO: {"method": the one chosen, "candidates": {method: {"psnr_vs_fp32_db", "brightness"}},
    # "held_back_images": how many images scored them}; `config` is then the chosen method's
    choice: dict | None = None

    def warnings(self, brightness: float | None = None, measured_on: str = "the calibration images") -> list[str]:
        """Plain-words warnings: quantized tensors whose range cuts off more than CLIP_ENERGY_WARNING of their
        signal energy on the calibration images, and (given the INT8/FP32 brightness measured somewhere) an
        output darker or brighter than FP32 by more than BRIGHTNESS_WARNING."""
        notes = []
        stats = {item.name: item for item in self.stats}
        quantized = spec_of(self.fp32_onnx, self.scheme, self.fixes.keep_float).activations
        cut = {name: clipped_energy(stats[name], r.low, r.high) for name, r in self.ranges.items()
               if name in quantized and name in stats and r.method not in ("qat", "fixed")}
        over = sorted((share, name) for name, share in cut.items() if share > CLIP_ENERGY_WARNING)
        if over:
            share, name = over[-1]
            r = self.ranges[name]
            notes.append(f"{len(over)} INT8 range{'s' if len(over) > 1 else ''} cut off more than "
                         f"{100 * CLIP_ENERGY_WARNING:.0f}% of a tensor's signal energy on the calibration images "
                         f"(worst: {name}, {100 * share:.0f}%; {self.config.method.value} chose [{r.low:.3g}, "
                         f"{r.high:.3g}] for values up to {r.observed_max:.3g}): another method (mse, minmax, or "
                         "auto, which tries each) keeps more of it")
        if brightness is not None and abs(brightness - 1.0) > BRIGHTNESS_WARNING:
            notes.append(f"the INT8 output is {'darker' if brightness < 1 else 'brighter'} than FP32 on "
                         f"{measured_on} (brightness ratio {brightness:.3f}): its ranges clip the image")
        return notes


CLIP_ENERGY_WARNING = 0.05  # a range that cuts off more of a tensor's signal energy than this is reported
BRIGHTNESS_WARNING = 0.02  # an INT8 output whose brightness departs from FP32's by more than this is reported
AUTO_CANDIDATES = (Method.ENTROPY, Method.PERCENTILE, Method.MSE, Method.MINMAX)
AUTO_HELD_BACK = 4  # calibration images kept out of the statistics to score the candidates on (at most)
AUTO_SIDE = 128  # LR pixels a side of each held-back image's centre crop


def _fp32_key(weights: Path) -> str:
    parts = {"weights": file_sha256(weights), "code": code_digest(models, export),
             "versions": library_versions("torch", "onnx", "onnxruntime")}
    return short_hash(json.dumps(parts, sort_keys=True))


def fp32_onnx_path(model_name: str | os.PathLike, cache_dir: Path | None = None) -> Path:
    """The FP32 ONNX export of a model, cached by the weight file's hash, the export code and library versions.

    Args:
        model_name: a shipped model name or a weight file.
        cache_dir: the cache folder (default: `sr.store.cache_root()`).

    Returns:
        the path of the .onnx file.

    Raises:
        FileNotFoundError: no such model.
    """
    info = model_info(model_name)
    if info.arch == "onnx":  # a user's model: its standard graph is the FP32 model
        return info.path
    weights = info.path
    path = cache_root(cache_dir) / "onnx" / f"{weights.stem}-{_fp32_key(weights)}.onnx"
    if _loads(path):
        return path
    with locked(path):  # concurrent callers wait for one export instead of racing the exporter
        if not _loads(path):
            export_onnx(load_model(weights), path)
    return path


def _loads(path: Path) -> bool:
    try:
        onnx.checker.check_model(str(path))
        return True
    except Exception:
        return False


def tie_fused_ranges(spec: QuantSpec, ranges: dict[str, TensorRange]) -> dict[str, TensorRange]:
    """The range each quantized tensor is written with: its tie group's (`QuantSpec.activations[t].group`).

    Args:
        spec: what is quantized.
        ranges: the calibrated ranges (one per calibrated tensor).

    Returns:
        {quantized tensor: its range}, in the spec's order.
    """
    return {tensor: _tied(tensor, ranges[a.group], ranges.get(tensor, ranges[a.group]))
            for tensor, a in spec.activations.items()}


def _tied(tensor: str, source: TensorRange, own: TensorRange) -> TensorRange:
    """`tensor`'s range taken from `source` (its tie group), its own observations kept."""
    return TensorRange(tensor, source.low, source.high, own.observed_min, own.observed_max, own.clipped_fraction,
                       source.method)


def spec_of(fp32: Path | onnx.ModelProto, scheme: Scheme | str, keep_float: Sequence[str] = (),
            per_tensor_weights: bool = False) -> QuantSpec:
    """`sr.quantspec.quant_spec` of an FP32 model file or graph."""
    model = fp32 if isinstance(fp32, onnx.ModelProto) else onnx.load(str(fp32), load_external_data=False)
    return quant_spec(model, scheme, keep_float, per_tensor_weights)


def write_qdq_model(fp32_onnx: Path, ranges: dict[str, TensorRange], scheme: Scheme, out: Path,
                    keep_float: Sequence[str] = (), fast: bool = True, per_tensor_weights: bool = False) -> Path:
    """Write the QDQ model of `fp32_onnx` that its spec describes, with our ranges.

    Args:
        fp32_onnx: the FP32 model.
        ranges: one range per calibrated activation tensor (the spec's tie groups need theirs).
        scheme: the INT8 scheme.
        out: where to write the QDQ model (atomically).
        keep_float: tensors that get no QDQ pair.
        fast: for the cpu scheme, apply `sr.rewrite` (every Conv on ORT's fast INT8 kernel, same outputs).
        per_tensor_weights: npu only: one scale per weight tensor.

    Returns:
        `out`.

    Raises:
        RuntimeError: the written model does not quantize what the spec says (a writer bug: nothing is written).
    """
    scheme = Scheme.parse(scheme)
    model = onnx.load(str(fp32_onnx))
    spec = quant_spec(model, scheme, keep_float, per_tensor_weights)
    missing = [g for g in spec.groups() if g not in ranges]
    if missing:
        raise ValueError(f"no calibrated range for {', '.join(missing)}")
    if scheme.symmetric:
        written = insert_qdq(model, spec, ranges)
    else:
        written = _ort_qdq(model, spec, ranges, keep_float, fast)
    check_against_spec(written, model, spec)
    write_atomic(written.SerializeToString(), out)
    return out


def check_against_spec(qdq: onnx.ModelProto, fp32: onnx.ModelProto, spec: QuantSpec) -> None:
    """Raise unless a QDQ model quantizes exactly the spec's activations and weights (for the cpu scheme, whose
    writer folds ReLU/Clip into the Conv before it, a spec tensor the written graph no longer has is allowed).

    Raises:
        RuntimeError: naming the tensors that differ.
    """
    found = graph_quantization(qdq, fp32)
    present = {name for node in qdq.graph.node for name in node.output} | {i.name for i in qdq.graph.input}
    fp32_tensors = {name for node in fp32.graph.node for name in node.output} | {i.name for i in fp32.graph.input}
    written = {t for t in found.activations if t in fp32_tensors}
    wanted = set(spec.activations) if spec.scheme.symmetric else {t for t in spec.activations if t in present}
    extra, lacking = sorted(written - wanted), sorted(wanted - written)
    weights_differ = sorted(set(found.weights) ^ set(spec.weights)) if spec.scheme.symmetric else []
    if extra or lacking or weights_differ:
        raise RuntimeError(f"the QDQ model does not match its spec: quantized but not in the spec {extra}, "
                           f"in the spec but not quantized {lacking}, weights differing {weights_differ}")


def insert_qdq(model: onnx.ModelProto, spec: QuantSpec, ranges: dict[str, TensorRange]) -> onnx.ModelProto:
    """A copy of `model` with a QuantizeLinear/DequantizeLinear pair on each activation of a symmetric spec and
    INT8 weights (an INT8 initializer and a DequantizeLinear) for each of its weights; biases stay float.

    Args:
        model: the FP32 model.
        spec: a tensorrt or npu spec of it.
        ranges: the calibrated ranges (each tie group's range is used for all its members).

    Returns:
        the QDQ model (opset >= 13: per-channel DequantizeLinear).
    """
    result = onnx.ModelProto()
    result.CopyFrom(model)
    graph = result.graph
    outputs = {o.name for o in graph.output}
    arrays = {i.name: i for i in graph.initializer}
    added_inits, weight_nodes, after = [], [], {}
    producer_index = {name: index for index, node in enumerate(graph.node) for name in node.output}
    rename: dict[str, str] = {}  # tensor -> what its consumers read now
    for tensor, activation in spec.activations.items():
        source, target = tensor, f"{tensor}_dequantized"
        if tensor in outputs:  # the graph output keeps its name: the producer's result is renamed instead
            source, target = f"{tensor}_float", tensor
            producer = graph.node[producer_index[tensor]]
            producer.output[list(producer.output).index(tensor)] = source
        else:
            rename[tensor] = target
        r = ranges[activation.group]
        inits, pair = _activation_pair(tensor, activation, r.low, r.high, source, target)
        added_inits += inits
        after.setdefault(producer_index.get(tensor, -1), []).extend(pair)
    for name, weight in spec.weights.items():
        inits, node = _weight_dequantizer(name, onnx.numpy_helper.to_array(arrays[name]), weight.axis)
        added_inits += inits
        weight_nodes.append(node)
        rename[name] = node.output[0]
    rebuilt = weight_nodes + after.get(-1, [])
    for index, node in enumerate(graph.node):
        for position, name in enumerate(node.input):
            node.input[position] = rename.get(name, name)
        rebuilt.append(node)
        rebuilt.extend(after.get(index, []))
    used = used_names(rebuilt)
    kept = [i for i in graph.initializer if i.name in used]
    del graph.node[:]
    graph.node.extend(rebuilt)
    del graph.initializer[:]
    graph.initializer.extend(kept + added_inits)
    for opset in result.opset_import:
        if opset.domain in ("", "ai.onnx") and opset.version < 13:
            opset.version = 13
    return result


def _activation_pair(tensor: str, activation, low: float, high: float, source: str, target: str):
    """(initializers, [QuantizeLinear, DequantizeLinear]) of one activation: `source` in, `target` out."""
    from onnx import TensorProto, helper, numpy_helper

    scale, zero = activation_qparams(activation, low, high)
    dtype = TensorProto.INT8 if activation.signed else TensorProto.UINT8
    inits = [numpy_helper.from_array(np.array(scale, np.float32), f"{tensor}_scale"),
             helper.make_tensor(f"{tensor}_zero_point", dtype, [], [zero])]
    pair = [helper.make_node("QuantizeLinear", [source, f"{tensor}_scale", f"{tensor}_zero_point"],
                             [f"{tensor}_quantized"], name=f"{tensor}_QuantizeLinear"),
            helper.make_node("DequantizeLinear", [f"{tensor}_quantized", f"{tensor}_scale", f"{tensor}_zero_point"],
                             [target], name=f"{tensor}_DequantizeLinear")]
    return inits, pair


def _weight_dequantizer(name: str, values: np.ndarray, axis: int | None):
    """(initializers, DequantizeLinear) of one weight in symmetric INT8 (`sr.quantspec.weight_int8`)."""
    from onnx import helper, numpy_helper

    quantized, scale = weight_int8(values, axis)
    inits = [numpy_helper.from_array(quantized, f"{name}_quantized"), numpy_helper.from_array(scale, f"{name}_scale"),
             numpy_helper.from_array(np.zeros(scale.shape, np.int8), f"{name}_zero_point")]
    node = helper.make_node("DequantizeLinear", [f"{name}_quantized", f"{name}_scale", f"{name}_zero_point"],
                            [f"{name}_dequantized"], name=f"{name}_DequantizeLinear",
                            **({} if axis is None else {"axis": axis}))
    return inits, node


def without_quantization(qdq: onnx.ModelProto, fp32: onnx.ModelProto, activations: Sequence[str] = (),
                         float_weights: bool = False, weights_from: onnx.ModelProto | None = None) -> onnx.ModelProto:
    """A written QDQ model with some of its quantization taken out again: the Q/DQ pairs of `activations` removed
    (their consumers read the float tensor), and with `float_weights` every weight read in FP32 (the diagnosis
    measures a tensor's damage this way, on the real INT8 model rather than a re-derived simulation).

    Args:
        qdq: the written model.
        fp32: the FP32 model it was written from (for the weights).
        activations: FP32 tensor names whose pairs are removed.
        float_weights: replace each INT8 weight (and INT32 bias) by its FP32 value.
        weights_from: the FP32 graph whose weights those are, when the writer changed their shapes (the cpu
            scheme's fast-kernel rewrite); default `fp32`.

    Returns:
        a new model.
    """
    model = onnx.ModelProto()
    model.CopyFrom(qdq)
    graph = model.graph
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    removed, rename, restore = _activation_pairs(graph, consumers, set(activations))
    if float_weights:
        fp32 = weights_from if weights_from is not None else fp32
        initializers = {i.name: i for i in graph.initializer}
        fp32_initializers = {i.name: i for i in fp32.graph.initializer}
        for node in graph.node:
            if node.op_type == "DequantizeLinear" and node.input[0] in initializers \
                    and initializers[node.input[0]].data_type in (onnx.TensorProto.INT8, onnx.TensorProto.INT32):
                name = fp32_initializer_of(node, consumers, fp32, set(fp32_initializers))
                if name is not None:
                    removed.add(id(node))
                    rename[node.output[0]] = name
                    if name not in initializers:
                        graph.initializer.append(fp32_initializers[name])
                        initializers[name] = fp32_initializers[name]
    kept = [node for node in graph.node if id(node) not in removed]
    for node in kept:
        for position, name in enumerate(node.input):
            node.input[position] = restore.get(rename.get(name, name), rename.get(name, name))
        for position, name in enumerate(node.output):
            node.output[position] = restore.get(name, name)
    del graph.node[:]
    graph.node.extend(kept)
    used = used_names(kept)
    for init in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(init)
    return model


def _activation_pairs(graph: onnx.GraphProto, consumers: dict, drop: set[str]) -> tuple[set, dict, dict]:
    """The Q/DQ pairs of the activations in `drop`: (ids of their nodes, {DQ output: float tensor} for their
    consumers, {renamed producer output: the graph output's name} for a quantized graph output)."""
    initializers = {i.name for i in graph.initializer}
    outputs = {o.name for o in graph.output}
    removed, rename, restore = set(), {}, {}
    for node in graph.node:
        if node.op_type != "QuantizeLinear" or node.input[0] in initializers:
            continue
        pairs = [dq for dq in consumers.get(node.output[0], []) if dq.op_type == "DequantizeLinear"]
        tensor = next((dq.output[0] for dq in pairs if dq.output[0] in outputs), node.input[0])
        if tensor not in drop:
            continue
        removed.add(id(node))
        removed.update(id(dq) for dq in pairs)
        for dq in pairs:
            if dq.output[0] in outputs:
                restore[node.input[0]] = dq.output[0]  # the producer gets the output's name back
            else:
                rename[dq.output[0]] = node.input[0]
    return removed, rename, restore


def _ort_qdq(model: onnx.ModelProto, spec: QuantSpec, ranges: dict[str, TensorRange], keep_float: Sequence[str],
             fast: bool) -> onnx.ModelProto:
    """The cpu scheme through `onnxruntime.quantization.quantize_static` (UINT8 activations, INT32 biases)."""
    op_types, own_movers = QUANTIZED_OPS, []
    if fast:  # every Conv on ORT's fast INT8 kernel; the outputs stay bit-identical
        # the model's own Pad/Slice (a centred model's input padding) stay float: only the rewrite's are quantized
        own_movers = [node.name for node in model.graph.node if node.op_type in REWRITE_OPS]
        model, ranges = rewrite_for_fast_int8(model, ranges)
        op_types = QUANTIZED_OPS + REWRITE_OPS
    tied = dict(ranges)  # ties found on the graph ORT sees (the rewrite renames and adds tensors)
    for tensor, source in fused_ties(model, set(ranges) - set(keep_float)).items():  # a float tensor ties nothing
        tied[tensor] = _tied(tensor, ranges[source], ranges[tensor])
    tensor_data = {name: TensorData(lowest=np.float32(r.low), highest=np.float32(r.high)) for name, r in tied.items()}
    wrapper = [node.name for node in model.graph.node if is_wrapper(node.name)]
    with tempfile.TemporaryDirectory(prefix="sr-qdq-") as work:
        cache = Path(work) / "ranges.json"
        save_tensors_data(TensorsData(CalibrationMethod.MinMax, tensor_data), cache)
        temp, source = Path(work) / "model.qdq.onnx", Path(work) / "model.fp32.onnx"
        onnx.save(model, str(source))
        quantize_static(
            str(source), str(temp), calibration_data_reader=None, calibration_cache_path=str(cache),
            quant_format=QuantFormat.QDQ, op_types_to_quantize=op_types, per_channel=True,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
            nodes_to_exclude=_nodes_touching(model, keep_float) + own_movers + wrapper,
            extra_options={"ActivationSymmetric": False, "WeightSymmetric": True,
                           "QDQKeepRemovableActivations": False, "QuantizeBias": True},
        )
        return onnx.load(str(temp))


def _nodes_touching(model: onnx.ModelProto, tensors: Sequence[str]) -> list[str]:
    """Nodes that produce or consume one of `tensors`: excluding them all keeps those tensors in float (a
    quantized consumer would otherwise put a QDQ pair on its input). The price: those ops run in float."""
    wanted = set(tensors)
    return [node.name for node in model.graph.node if wanted & (set(node.output) | set(node.input))]


def cache_key(weights_hash: str, config: CalibrationConfig, scheme: Scheme, data_hash: str, fixes: Fixes) -> str:
    """The key of a calibrated model: everything that determines the QDQ file.

    That is the weights, every calibration setting, the scheme, the calibration images' pixels, the fixes, the
    code of the modules that compute the result (their source and the functions they hold now) and the versions
    of torch, onnx and onnxruntime.

    Args:
        weights_hash: the weight file's SHA-256.
        config: the calibration.
        scheme: the INT8 scheme.
        data_hash: `images_digest` of the network's calibration inputs.
        fixes: per-tensor overrides.

    Returns:
        20 hex digits.
    """
    settings = {k: (v.value if isinstance(v, Enum) else v) for k, v in asdict(config).items() if k != "data"}
    parts = {"weights": weights_hash, "config": settings, "scheme": scheme.value, "data": data_hash,
             "fixes": fixes.key(), "code": code_digest(data, models, export, calibrate, rewrite, sys.modules[__name__]),
             "versions": library_versions("torch", "onnx", "onnxruntime")}
    return short_hash(json.dumps(parts, sort_keys=True), 20)


def calibrate_model(model_name: str | os.PathLike, config: CalibrationConfig | None = None,
                    scheme: Scheme | str = Scheme.TENSORRT, images: Sequence[np.ndarray] | None = None,
                    fixes: Fixes | None = None, cache_dir: Path | None = None, threads: int = 0,
                    progress: Callable[[float, str], None] | None = None) -> CalibratedModel:
    """Calibrate a model and write its QDQ INT8 ONNX model, or return the cached one.

    An entry is built in a temp folder and renamed into place while holding the entry's lock, so threads and
    processes that ask for the same entry wait for one calibration and then read it; its manifest records each
    file's SHA-256, and an entry that fails the check (a corrupt or partial file) is rebuilt.

    Example:
        >>> int8 = calibrate_model("xlsr-clip", CalibrationConfig(method="entropy", samples=100), "tensorrt")
        >>> int8.qdq_onnx, int8.ranges["output"].high

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
    weights_hash, data_hash = file_sha256(info.path), images_digest(network_inputs)
    key = cache_key(weights_hash, config, scheme, data_hash, fixes)
    entry = cache_root(cache_dir) / "int8" / key
    fp32 = fp32_onnx_path(model_name, cache_dir)

    def result(found, seconds: float, cached: bool) -> CalibratedModel:
        ranges, stats, producers = found
        return CalibratedModel(str(model_name), scheme, config, fixes, key, fp32, entry / "model.qdq.onnx",
                               ranges, stats, producers, seconds, cached, info.scale)

    found = _read_entry(entry)
    if found is None:
        with locked(entry):
            found = _read_entry(entry)  # another thread or process may have built it while we waited
            if found is None:
                started = time.perf_counter()
                progress = progress or logged_progress(f"calibrating {info.name} ({config.method.value}, "
                                                       f"{config.samples} samples, {scheme.value})")
                made = _calibrate_entry(entry, fp32, network_inputs, config, scheme, fixes, info.name, threads,
                                        progress, statistics_key(weights_hash, config, data_hash),
                                        learned_ranges(model_name, scheme))
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
    scale = model_info(model_name).scale
    lrs = [_centre_crop(data.bicubic_resize(image, max(1, image.shape[1] // scale), max(1, image.shape[0] // scale)))
           for image in held]
    key = short_hash(json.dumps([file_sha256(model_info(model_name).path), asdict(config), scheme.value,
                                 images_digest(source), (fixes or Fixes()).key(), code_digest(sys.modules[__name__])],
                                default=str), 20)
    record = cache_root(cache_dir) / "auto" / f"{key}.json"
    try:
        choice = json.loads(record.read_text())
        chosen = calibrate_model(model_name, replace(config, method=choice["method"]), scheme, rest, fixes,
                                 cache_dir, threads, progress)
        return replace(chosen, choice=choice)
    except (OSError, ValueError, KeyError):
        pass
    reference = OrtEngine(fp32_onnx_path(model_name, cache_dir), scale, cpu_only=True)
    truths = [reference.run(lr) for lr in lrs]
    made, candidates = {}, {}
    for method in AUTO_CANDIDATES:
        made[method] = calibrate_model(model_name, replace(config, method=method), scheme, rest, fixes, cache_dir,
                                       threads, progress)
        engine = OrtEngine(made[method].qdq_onnx, scale, cpu_only=True)
        outputs = [engine.run(lr) for lr in lrs]
        candidates[method.value] = {
            "psnr_vs_fp32_db": float(np.mean([min(psnr_y(o, t, scale), 99.0) for o, t in zip(outputs, truths)])),
            "brightness": float(np.mean([brightness_ratio(o, t) for o, t in zip(outputs, truths)]))}
    best = max(AUTO_CANDIDATES, key=lambda m: candidates[m.value]["psnr_vs_fp32_db"])
    choice = {"method": best.value, "candidates": candidates, "held_back_images": len(held)}
    write_atomic(json.dumps(choice).encode(), record)
    return replace(made[best], choice=choice)


def _centre_crop(image: np.ndarray, side: int = AUTO_SIDE) -> np.ndarray:
    height, width = image.shape[:2]
    top, left = max(0, (height - side) // 2), max(0, (width - side) // 2)
    return np.ascontiguousarray(image[top:top + side, left:left + side])


def with_known_input_range(model_name: str | os.PathLike, fixes: Fixes, scheme: Scheme | str) -> Fixes:
    """A user's model takes values in a range its contract states ([0, 1] or [0, 255] of what it is fed): that is
    its input's range, whatever a calibration search would pick (entropy, fed the many dark pixels of a luma
    channel, chose +-0.063 for a Y input spanning [0.06, 0.92] and turned the output dark). The range is read off
    the lab's wrapper itself (`sr.usermodel.known_input`), so a tuned copy registered again keeps it. Fixes given
    for the input, and ranges a QAT run learned for it, win.

    Args:
        model_name: any model name.
        fixes: the fixes asked for.
        scheme: the INT8 scheme.

    Returns:
        `fixes`, with the user's input range fixed for a registered ONNX model.
    """
    from .usermodel import lookup

    user = lookup(str(model_name))
    if user is None or user.input_range is None:
        return fixes
    tensor, high = user.input_range
    if tensor in fixes.fixed_range or tensor in fixes.range_method or tensor in fixes.keep_float \
            or tensor in (learned_ranges(model_name, scheme) or {}):
        return fixes
    return Fixes(dict(fixes.range_method), list(fixes.keep_float), {**fixes.fixed_range, tensor: (0.0, high)})


def learned_ranges(model_name: str | os.PathLike, scheme: Scheme | str) -> dict[str, tuple[float, float]] | None:
    """The activation ranges a QAT run learned for `scheme` (`sr.qat`), recorded in the model file, or None.

    Args:
        model_name: a shipped model name, a weight file or a registered ONNX model.
        scheme: the INT8 scheme asked for; ranges learned for another scheme do not apply.

    Returns:
        {tensor: (low, high)}, or None when the model was not fine-tuned for `scheme`.
    """
    record = qat_record(model_name)
    if record is None or record.get("scheme") != Scheme.parse(scheme).value:
        return None
    return {tensor: (float(low), float(high)) for tensor, (low, high) in record["ranges"].items()}


def qat_record(model_name: str | os.PathLike) -> dict | None:
    """What `sr.qat` recorded in a fine-tuned model's file (scheme, learned ranges, the model it started from,
    its run), or None for a model that was not fine-tuned."""
    info = model_info(model_name)
    if info.arch == "onnx":
        props = {p.key: p.value for p in onnx.load(str(info.path), load_external_data=False).metadata_props}
        record = json.loads(props["sr.qat"]) if "sr.qat" in props else None
    else:
        record = models.read_metadata(info.path).get("qat")
    return record if isinstance(record, dict) else None


def fixed_input_size(fp32: Path | onnx.ModelProto) -> tuple[int, int] | None:
    """(height, width) of a model (a file or a loaded graph) that takes only one input size, else None."""
    model = fp32 if isinstance(fp32, onnx.ModelProto) else onnx.load(str(fp32), load_external_data=False)
    dims = model.graph.input[0].type.tensor_type.shape.dim
    height, width = (d.dim_value if d.HasField("dim_value") else 0 for d in dims[2:4])
    return (height, width) if height and width else None


def statistics_key(weights_hash: str, config: CalibrationConfig, data_hash: str) -> str:
    """The key of a model's tensor statistics: everything that determines them, and nothing that only chooses
    ranges from them (method, percentile, scheme, fixes), so switching the method reuses the observation passes.

    Args:
        weights_hash: the weight file's SHA-256.
        config: the calibration (its samples, patch size and seed count; the images are `data_hash`).
        data_hash: `images_digest` of the network's calibration inputs (gain and downscaling included).

    Returns:
        20 hex digits.
    """
    parts = {"weights": weights_hash, "samples": config.samples, "patch": config.patch_size, "seed": config.seed,
             "data": data_hash, "code": code_digest(data, models, export, calibrate),
             "versions": library_versions("torch", "onnx", "onnxruntime")}
    return short_hash(json.dumps(parts, sort_keys=True), 20)


def _stats_bytes(stats: list[TensorStats]) -> bytes:
    """The statistics as an .npz file's bytes (names, observed min/max, histograms)."""
    buffer = io.BytesIO()
    np.savez(buffer, names=np.array([s.name for s in stats]), low=np.array([s.observed_min for s in stats]),
             high=np.array([s.observed_max for s in stats]), histograms=np.stack([s.histogram for s in stats]))
    return buffer.getvalue()


def _load_stats(path: Path) -> list[TensorStats]:
    """The statistics `_stats_bytes` wrote (OSError, ValueError or KeyError for a missing or broken file)."""
    arrays = np.load(path)
    return [TensorStats(str(n), float(lo), float(hi), h) for n, lo, hi, h in
            zip(arrays["names"], arrays["low"], arrays["high"], arrays["histograms"])]


def cached_statistics(fp32: Path, key: str, network_inputs: list[np.ndarray], config: CalibrationConfig,
                      cache_dir: Path | None = None, threads: int = 0, progress=None) -> list[TensorStats]:
    """The tensor statistics of a calibration, from the cache or observed (then cached).

    Args:
        fp32: the FP32 ONNX model.
        key: `statistics_key(...)`.
        network_inputs: the prepared calibration images.
        config: the calibration (samples, patch size, seed).
        cache_dir: the cache folder (default: `sr.store.cache_root()`).
        threads: ONNX Runtime threads.
        progress: called with (fraction done, message).

    Returns:
        one TensorStats per activation tensor, in graph order.
    """
    path = cache_root(cache_dir) / "stats" / f"{key}.npz"
    with locked(path):
        try:
            stats = _load_stats(path)
            touch(path)
            return stats
        except (OSError, ValueError, KeyError):
            pass
        patch = fixed_input_size(fp32) or config.patch_size  # a fixed-size model sees patches of its size
        stats = collect_statistics(
            fp32, lambda: calibration_patches(network_inputs, config.samples, patch, config.seed),
            config.samples, need_histograms=True, threads=threads, progress=progress)
        write_atomic(_stats_bytes(stats), path)
    evict(path.parent, cache_cap_bytes(), keep=[path, fp32])
    return stats


def _calibrate_entry(entry: Path, fp32: Path, network_inputs: list[np.ndarray], config: CalibrationConfig,
                     scheme: Scheme, fixes: Fixes, model: str, threads: int, progress, stats_key: str,
                     learned: dict[str, tuple[float, float]] | None = None) -> tuple:
    """Observe (or reuse the statistics), choose the ranges (a QAT model's learned ones where it has them), write
    and publish the entry (the caller holds its lock)."""
    remove_stale_temps(entry.parent)
    stats = cached_statistics(fp32, stats_key, network_inputs, config, entry.parent.parent, threads, progress)
    ranges = choose_ranges(stats, config.method, scheme.symmetric, config.percentile)
    unmatched = sorted(set(learned or {}) - set(ranges))
    if unmatched:
        raise ValueError(f"the model's learned ranges name tensors its graph does not have: {', '.join(unmatched)}; "
                         "the model file and its QAT record disagree")
    for tensor, (low, high) in (learned or {}).items():
        found = next(s for s in stats if s.name == tensor)
        ranges[tensor] = TensorRange(tensor, low, high, found.observed_min, found.observed_max,
                                     clipped_fraction(found, low, high), "qat")
    ranges = _apply_fixes(ranges, stats, fixes, config, scheme, model)
    producers = _producers(fp32)
    _write_entry(entry, fp32, ranges, stats, producers, config, scheme, fixes)
    evict(entry.parent, cache_cap_bytes(), keep=[entry, fp32])
    return ranges, stats, producers


def _apply_fixes(ranges: dict[str, TensorRange], stats: list[TensorStats], fixes: Fixes, config: CalibrationConfig,
                 scheme: Scheme, model: str) -> dict[str, TensorRange]:
    for tensor in [*fixes.range_method, *fixes.keep_float, *fixes.fixed_range]:
        if tensor not in ranges:
            raise ValueError(f"no tensor {tensor!r} in {model}; tensors: {', '.join(ranges)}")
    for tensor, method in fixes.range_method.items():
        ranges[tensor] = choose_ranges([s for s in stats if s.name == tensor], method, scheme.symmetric,
                                       config.percentile)[tensor]
    for tensor, (low, high) in fixes.fixed_range.items():
        found = next(s for s in stats if s.name == tensor)
        if scheme.symmetric:
            low, high = -max(abs(low), abs(high)), max(abs(low), abs(high))
        ranges[tensor] = TensorRange(tensor, low, high, found.observed_min, found.observed_max,
                                     clipped_fraction(found, low, high), "fixed")
    return ranges


def _producers(fp32: Path) -> dict[str, str]:
    model = onnx.load(str(fp32))
    producers = {name: node.op_type for node in model.graph.node for name in node.output if name}
    producers[model.graph.input[0].name] = "Input"
    return producers


def _write_entry(entry: Path, fp32: Path, ranges: dict[str, TensorRange], stats: list[TensorStats],
                 producers: dict[str, str], config: CalibrationConfig, scheme: Scheme, fixes: Fixes) -> None:
    """Build the entry in a temp folder beside it, then publish it (the caller holds the entry's lock)."""
    work = temp_dir(entry.parent)
    try:
        write_qdq_model(fp32, ranges, scheme, work / "model.qdq.onnx", keep_float=fixes.keep_float)
        (work / "ranges.json").write_text(json.dumps({"ranges": [r.to_dict() for r in ranges.values()],
                                                      "producers": producers}))
        (work / "stats.npz").write_bytes(_stats_bytes(stats))
        manifest = {name: file_sha256(work / name) for name in ("model.qdq.onnx", "ranges.json", "stats.npz")}
        (work / "manifest.json").write_text(json.dumps({"files": manifest, "config": asdict(config),
                                                        "scheme": scheme.value, "fixes": fixes.key()}, default=str))
        publish_dir(work, entry)
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)


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
        stats = _load_stats(entry / "stats.npz")
        touch(entry)
        return ranges, stats, saved["producers"]
    except (OSError, ValueError, KeyError, json.JSONDecodeError):
        if entry.exists():
            log.warning("cache entry %s is unreadable; rebuilding", entry.name)
        return None
