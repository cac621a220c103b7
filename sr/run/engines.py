"""Inference engines behind one interface: `engine.run(lr uint8 HxWx3) -> uint8 (sH)x(sW)x3`.

PyTorch FP32, ONNX Runtime FP32 and INT8 (QDQ models from `sr.run.quantize`), and TensorRT (a strongly typed
engine built from the `tensorrt`-scheme QDQ model; needs an NVIDIA GPU, `tensorrt` and torch with CUDA, see
requirements-gpu.txt). Large inputs run in overlapping tiles: the overlap covers the network's receptive field,
measured per model the first time an image needs tiles (`receptive_radius`), so the stitched result equals the
whole-image result exactly (no seams) while memory stays bounded; a model that looks farther than MAX_RADIUS
(global pooling, attention over the whole image) runs whole instead.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import torch

from ..choices import Choice
from ..data import to_tensor, to_uint8
from .sessions import fixed_size, ort_providers, ort_session
from ..store import (cache_cap_bytes, cache_root, code_digest, evict, file_sha256, locked, short_hash,
                    write_atomic)

log = logging.getLogger(__name__)

TILE = 512  # LR pixels per tile side: inputs up to 512x512 run whole (a split costs the overlap twice)
OVERLAP = 32  # LR pixels of tile overlap when none was measured (XLSR looks 5 pixels away, the teacher 27)
MAX_RADIUS = 96  # LR pixels: the farthest context `receptive_radius` looks for


def receptive_radius(run_array: Callable[[np.ndarray], np.ndarray], scale: int,
                     fixed: tuple[int, int] | None = None, limit: int = MAX_RADIUS) -> int | None:
    """How far a network looks, in LR pixels: the smallest r such that changing the input only farther than r from
    a pixel (in the max norm) leaves that pixel's output unchanged. Measured, not assumed: two random images that
    agree within r of the centre and differ beyond it (the second darker), a binary search over r (about 9 runs of a
    (2 limit + 3)-pixel square, or of the model's fixed size).

    Returns:
        the radius, or None when it reaches beyond `limit` (global pooling, whole-image attention: tiles
        cannot be seamless).
    """
    if fixed is not None:
        limit = min(limit, (min(fixed) - 3) // 2)
        height, width = fixed
    else:
        height = width = 2 * limit + 3
    if limit < 1:
        return None
    rng = np.random.default_rng(0)
    # beyond r, a darker random image: a systematic change (a global average moves with it) as well as a local one
    base = rng.random((1, 3, height, width), dtype=np.float32)
    other = np.float32(0.2) * rng.random((1, 3, height, width), dtype=np.float32)
    cy, cx = height // 2, width // 2
    rows, cols = np.ogrid[:height, :width]

    def centre(image: np.ndarray) -> np.ndarray:
        return run_array(image)[0, :, cy * scale:(cy + 1) * scale, cx * scale:(cx + 1) * scale]

    reference = centre(base)

    def reaches_beyond(radius: int) -> bool:
        inside = (np.abs(rows - cy) <= radius) & (np.abs(cols - cx) <= radius)
        return bool(np.abs(centre(np.where(inside, base, other)) - reference).max() > 1e-6)

    if reaches_beyond(limit):
        return None
    low, high = 0, limit  # reaches beyond `high`: no; the answer is in [low, high]
    while low < high:
        middle = (low + high) // 2
        low, high = (middle + 1, high) if reaches_beyond(middle) else (low, middle)
    return high


class Seamless:
    """What every engine shares: `run` in seamless tiles, the overlap measured on the engine's own model the
    first time an image needs tiles (images up to one tile run whole and need no overlap)."""

    scale: int
    fixed: tuple[int, int] | None = None
    max_side: int | None = None  # the largest input side the engine takes (TensorRT's profile), None: any
    _radius: int | None | bool = False  # False: not measured yet

    def _run_array(self, array: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def run(self, lr: np.ndarray) -> np.ndarray:
        """Upscale uint8 HxWx3 to uint8 (sH)x(sW)x3, in seamless tiles (of the model's size if it is fixed)."""
        height, width = lr.shape[:2]
        side = self.max_side or TILE
        whole = (height, width) == self.fixed if self.fixed else max(height, width) <= side
        if whole:
            return tiled(self._run_array, lr, self.scale, tile=max(height, width, 1), fixed=self.fixed)
        if self._radius is False:
            self._radius = receptive_radius(self._run_array, self.scale, self.fixed)
            if self._radius is None:
                log.warning("%s looks farther than %d pixels: its tiles cannot be seamless; it runs whole where "
                            "it can", getattr(self, "name", "the model"), MAX_RADIUS)
        overlap = MAX_RADIUS if self._radius is None else self._radius
        if self._radius is None and self.fixed is None and self.max_side is None:
            return tiled(self._run_array, lr, self.scale, tile=max(height, width), fixed=None)
        tile = side if self.max_side is None else max(1, self.max_side - 2 * overlap)
        return tiled(self._run_array, lr, self.scale, tile=tile, overlap=overlap, fixed=self.fixed)


def tiled(run_array: Callable[[np.ndarray], np.ndarray], lr: np.ndarray, scale: int, tile: int = TILE,
          overlap: int = OVERLAP, fixed: tuple[int, int] | None = None) -> np.ndarray:
    """Run a network over overlapping tiles of an image and stitch the tiles' centres.

    Args:
        run_array: float32 1x3xhxw in [0, 1] -> float32 1x3x(sh)x(sw).
        lr: uint8 HxWx3.
        scale: the network's upscaling factor.
        tile: tile side in LR pixels.
        overlap: LR pixels of context on each side (>= the receptive-field radius gives a seamless result).
        fixed: (height, width) of a network that takes only that size: every tile is exactly that size, the
            image mirrored at its borders to fill them.

    Returns:
        uint8 (sH)x(sW)x3.

    Raises:
        ValueError: `lr` is not uint8 HxWx3.
    """
    if lr.ndim != 3 or lr.shape[2] != 3 or lr.dtype != np.uint8:
        raise ValueError(f"expected a uint8 HxWx3 image, got {lr.dtype} {lr.shape}")
    height, width = lr.shape[:2]
    image = np.divide(lr.transpose(2, 0, 1)[None], np.float32(255.0), dtype=np.float32)  # one pass, same values
    out = np.empty((height * scale, width * scale, 3), np.uint8)
    for y, x, window, (top, left), (h, w) in _windows(image, tile, overlap, fixed):
        result = run_array(window)
        top, left, h, w = top * scale, left * scale, h * scale, w * scale
        # transposed first: the product is a new HxWx3 array in memory order, rounded and clipped in place
        block = result[0, :, top : top + h, left : left + w].transpose(1, 2, 0) * np.float32(255.0)
        np.rint(block, out=block)
        np.clip(block, 0, 255, out=block)
        out[y * scale : y * scale + h, x * scale : x * scale + w] = block
    return out


def _windows(image: np.ndarray, tile: int, overlap: int, fixed: tuple[int, int] | None):
    """(y, x, input window, offset of the kept part in the window, kept size), all in LR pixels."""
    height, width = image.shape[2:]
    if fixed is None:
        for y in range(0, height, tile):
            for x in range(0, width, tile):
                y0, x0 = max(0, y - overlap), max(0, x - overlap)
                y1, x1 = min(height, y + tile + overlap), min(width, x + tile + overlap)
                yield y, x, image[:, :, y0:y1, x0:x1], (y - y0, x - x0), (min(tile, height - y), min(tile, width - x))
        return
    size_y, size_x = fixed
    margin = min(overlap, (min(size_y, size_x) - 1) // 4)
    step_y, step_x = size_y - 2 * margin, size_x - 2 * margin
    padded = np.pad(image, ((0, 0), (0, 0), (margin, margin + step_y), (margin, margin + step_x)), mode="reflect")
    for y in range(0, height, step_y):
        for x in range(0, width, step_x):
            window = np.ascontiguousarray(padded[:, :, y : y + size_y, x : x + size_x])
            yield y, x, window, (margin, margin), (min(step_y, height - y), min(step_x, width - x))


class TorchEngine(Seamless):
    """PyTorch FP32 on the CPU (or a given device)."""

    def __init__(self, model: torch.nn.Module, device: str = "cpu", name: str = "torch"):
        self.model, self.device, self.name = model.eval().to(device), torch.device(device), name
        self.scale = model.config.scale

    @torch.no_grad()
    def _run_array(self, array: np.ndarray) -> np.ndarray:
        return self.model(torch.from_numpy(array).to(self.device)).float().cpu().numpy()


class OrtEngine(Seamless):
    """ONNX Runtime: an FP32 model or a QDQ INT8 model, on the best provider present (`provider` says which), or
    on the CPU alone (`cpu_only`: the lab's reference numerics; the model may then be a ModelProto in memory)."""

    def __init__(self, onnx_path: str | os.PathLike | onnx.ModelProto, scale: int, threads: int = 0, name: str = "ort",
                 cpu_only: bool = False):
        providers = ["CPUExecutionProvider"] if cpu_only else ort_providers(onnx_path)
        # no memory arena: a 1024x768 input's tiles made the arena keep several hundred MB per session for good
        self.session = ort_session(onnx_path, threads, providers, log_level=3, arena=False)
        self.provider = self.session.get_providers()[0]
        self.input_name = self.session.get_inputs()[0].name
        self.fixed = fixed_size(self.session.get_inputs()[0].shape)
        self.scale, self.path = scale, None if isinstance(onnx_path, onnx.ModelProto) else Path(onnx_path)
        self.name = name if self.provider == "CPUExecutionProvider" else f"{name} ({self.provider})"

    def _run_array(self, array: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: array})[0]


def reference(onnx_path: str | os.PathLike | onnx.ModelProto, scale: int, threads: int = 0,
              name: str = "ort-reference") -> OrtEngine:
    """The lab's reference numerics: ONNX Runtime's CPU kernels on an FP32 or QDQ model. Every INT8 figure the
    lab shows is measured with it, and every other engine is checked against it (`sr.run.runtime`); the one place
    it is made."""
    return OrtEngine(onnx_path, scale, threads, name=name, cpu_only=True)


def openvino_available() -> bool:
    """True when OpenVINO's runtime can be imported."""
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


def unsigned_activations(model: "onnx.ModelProto") -> int:
    """Re-express every signed-INT8 activation Q/DQ pair as UINT8 with its zero point moved by 128, in place.

    The grid is the same (q_uint8 = q_int8 + 128 for every value, the clamp included), so the numerics are
    unchanged; weights (Q/DQ of initializers, per-channel) keep their INT8 zero points. Why: OpenVINO 2026.4's
    CPU plugin runs the signed-activation path wrongly on some CPUs (AMD Zen 4 without AMX: posterized, dark
    output, 13-16 dB from ONNX Runtime on the same file), while the unsigned path agrees with ONNX Runtime on
    both Intel and AMD. The conformance check (`sr.run.conformance`) is what makes that claim safe on a CPU
    nobody tried.

    Args:
        model: a QDQ ONNX model (changed in place).

    Returns:
        how many zero points were moved.
    """
    from onnx import numpy_helper

    initializers = {init.name: init for init in model.graph.initializer}
    moved = set()
    for node in model.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear") or len(node.input) < 3:
            continue
        zero = initializers.get(node.input[2])
        if zero is None or zero.data_type != onnx.TensorProto.INT8 or zero.dims:
            continue  # per-channel (weights) or not a constant
        if node.op_type == "DequantizeLinear" and node.input[0] in initializers:
            continue  # a quantized weight stored as INT8
        moved.add(zero.name)
    for name in moved:
        value = numpy_helper.to_array(initializers[name]).astype(np.int16) + 128
        initializers[name].CopyFrom(numpy_helper.from_array(value.astype(np.uint8), name))
    return len(moved)


def _openvino_source(onnx_path: Path) -> Path:
    """The file OpenVINO reads: the model itself, or its unsigned-activation twin (cached by the model's hash)."""
    model = onnx.load(str(onnx_path))
    if not unsigned_activations(model):
        return onnx_path
    twin = cache_root() / "openvino" / f"{onnx_path.stem}-{file_sha256(onnx_path)[:16]}-u8.onnx"
    if not twin.is_file():
        write_atomic(model.SerializeToString(), twin)
        evict(twin.parent, cache_cap_bytes(), keep=twin)
    return twin


class Precision(Choice, noun="OpenVINO precision"):
    """The precision OpenVINO runs an FP32 model in (its INFERENCE_PRECISION_HINT)."""

    F32 = "f32"
    BF16 = "bf16"  # where the CPU has it (AMX, AVX512-BF16)


class OpenVinoEngine(Seamless):
    """OpenVINO on the CPU: an FP32 ONNX model (run in FP32, or BF16 where the CPU has it) or a QDQ INT8 model,
    whose Q/DQ pairs OpenVINO turns into fused INT8 kernels (grouped convolutions included). Signed activations
    run through the equivalent unsigned graph (`unsigned_activations`).

    One compiled model per input shape (OpenVINO is fastest on static shapes), LATENCY hint, threads settable.
    """

    def __init__(self, onnx_path: str | os.PathLike, scale: int, threads: int = 0,
                 precision: Precision | str = "f32", name: str = "openvino"):
        import openvino as ov

        precision = Precision.parse(precision)
        self.core, self.path, self.scale, self.name = ov.Core(), _openvino_source(Path(onnx_path)), scale, name
        self.config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": precision.value}
        if threads:
            self.config["INFERENCE_NUM_THREADS"] = threads
        # per input shape: the compiled model and its infer requests, one per thread (a request is not reentrant);
        # evicting a shape drops its requests with it (they used to live on in each thread and keep it alive)
        self.compiled: dict[tuple, tuple[object, threading.local]] = {}
        self.lock = threading.Lock()
        dims = self.core.read_model(str(self.path)).inputs[0].get_partial_shape()
        self.fixed = fixed_size([d.get_length() if d.is_static else None for d in dims])

    def _compiled(self, shape: tuple):
        with self.lock:
            if shape not in self.compiled:
                model = self.core.read_model(str(self.path))
                model.reshape({model.inputs[0].any_name: list(shape)})
                if len(self.compiled) >= 8:
                    self.compiled.pop(next(iter(self.compiled)))
                self.compiled[shape] = (self.core.compile_model(model, "CPU", self.config), threading.local())
            return self.compiled[shape]

    def _run_array(self, array: np.ndarray) -> np.ndarray:
        compiled, requests = self._compiled(tuple(array.shape))
        # the output buffer of a request is reused by its next inference, which on this thread only comes after
        # the caller has consumed this one
        if not hasattr(requests, "request"):
            requests.request = compiled.create_infer_request()
        return requests.request.infer({0: array})[compiled.outputs[0]]


def tensorrt_available() -> bool:
    """True when TensorRT and a CUDA GPU are both usable."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


def tensorrt_profile_shapes(fixed: tuple[int, int] | None = None) -> tuple[tuple[int, ...], ...]:
    """(min, opt, max) input shapes of the TensorRT optimisation profile: tiles up to TILE + 2 * OVERLAP a side,
    or exactly the model's size when it takes only one (`fixed`)."""
    if fixed is not None:
        return ((1, 3, *fixed),) * 3
    side = TILE + 2 * OVERLAP
    return (1, 3, 8, 8), (1, 3, side, side), (1, 3, side, side)


def tensorrt_plan_key(qdq_onnx: str | os.PathLike, gpu_name: str, tensorrt_version: str,
                      fixed: tuple[int, int] | None = None) -> str:
    """The cache key of a TensorRT plan.

    Args:
        qdq_onnx: the QDQ model the plan is built from (its hash already covers the calibration code).
        gpu_name: the CUDA device's name.
        tensorrt_version: `tensorrt.__version__`.

    Returns:
        20 hex digits over the model's hash, the GPU, TensorRT's version, the profile's shapes and this
        module's code.
    """
    parts = {"model": file_sha256(qdq_onnx), "gpu": gpu_name, "tensorrt": tensorrt_version,
             "profile": tensorrt_profile_shapes(fixed), "code": code_digest(sys.modules[__name__])}
    return short_hash(json.dumps(parts, sort_keys=True), 20)


class TensorRTEngine(Seamless):
    """A strongly typed TensorRT engine built from a `tensorrt`-scheme QDQ model (TensorRT 10/11 API).

    The engine is cached on disk, keyed by `tensorrt_plan_key` (model, GPU, TensorRT version, profile); device
    buffers are torch CUDA tensors. Inputs run in tiles of at most TILE + 2 * OVERLAP pixels per side, the
    optimisation profile's maximum, or of the model's own size when it is fixed. One execution context, used
    by one thread at a time (its input shape and addresses are per call).
    """

    def __init__(self, qdq_onnx: str | os.PathLike, scale: int, cache_dir: str | os.PathLike | None = None,
                 name: str = "tensorrt"):
        import tensorrt as trt

        if not torch.cuda.is_available():
            raise RuntimeError("TensorRT needs an NVIDIA GPU with CUDA; none is visible")
        self.trt, self.scale, self.name = trt, scale, name
        self.logger = trt.Logger(trt.Logger.WARNING)
        qdq_onnx = Path(qdq_onnx)
        dims = onnx.load(str(qdq_onnx), load_external_data=False).graph.input[0].type.tensor_type.shape.dim
        self.fixed = fixed_size([d.dim_value if d.HasField("dim_value") else None for d in dims])
        self.max_side = None if self.fixed else TILE + 2 * OVERLAP
        self.lock = threading.Lock()
        cache = Path(cache_dir or cache_root() / "tensorrt")
        key = tensorrt_plan_key(qdq_onnx, torch.cuda.get_device_name(), trt.__version__, self.fixed)
        plan_path = cache / f"{qdq_onnx.stem}-{key}.plan"
        runtime = trt.Runtime(self.logger)
        self.engine = runtime.deserialize_cuda_engine(plan_path.read_bytes()) if plan_path.is_file() else None
        if self.engine is None:  # missing or stale/corrupt plan
            with locked(plan_path):
                plan = self._build(qdq_onnx)
                write_atomic(plan, plan_path)
            self.engine = runtime.deserialize_cuda_engine(plan)
        self.context = self.engine.create_execution_context()
        self.input_name, self.output_name = self.engine.get_tensor_name(0), self.engine.get_tensor_name(1)
        self.stream = torch.cuda.Stream()

    def _build(self, qdq_onnx: Path) -> bytes:
        trt = self.trt
        builder = trt.Builder(self.logger)
        network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
        parser = trt.OnnxParser(network, self.logger)
        if not parser.parse(qdq_onnx.read_bytes()):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise RuntimeError(f"TensorRT could not parse {qdq_onnx.name}: {errors}")
        config = builder.create_builder_config()
        profile = builder.create_optimization_profile()
        profile.set_shape(network.get_input(0).name, *tensorrt_profile_shapes(self.fixed))
        config.add_optimization_profile(profile)
        plan = builder.build_serialized_network(network, config)
        if plan is None:
            raise RuntimeError(f"TensorRT failed to build an engine from {qdq_onnx.name}")
        return bytes(plan)

    def _run_array(self, array: np.ndarray) -> np.ndarray:
        source = torch.from_numpy(array).cuda()
        _, _, height, width = array.shape
        result = torch.empty((1, 3, height * self.scale, width * self.scale), device="cuda", dtype=torch.float32)
        with self.lock:  # the context's shape and addresses belong to one call at a time
            self.context.set_input_shape(self.input_name, tuple(source.shape))
            self.context.set_tensor_address(self.input_name, source.data_ptr())
            self.context.set_tensor_address(self.output_name, result.data_ptr())
            with torch.cuda.stream(self.stream):
                if not self.context.execute_async_v3(self.stream.cuda_stream):
                    raise RuntimeError("TensorRT inference failed")
            self.stream.synchronize()
        return result.cpu().numpy()


def latency_ms(engine, lr: np.ndarray, repeats: int = 10, warmup: int = 2) -> float:
    """Median wall time of `engine.run(lr)` in milliseconds.

    Args:
        engine: any engine.
        lr: the input, uint8 HxWx3.
        repeats, warmup: timed and untimed runs.

    Returns:
        the median in ms.
    """
    for _ in range(warmup):
        engine.run(lr)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        engine.run(lr)
        times.append((time.perf_counter() - start) * 1e3)
    return float(np.median(times))


__all__ = ["TorchEngine", "OrtEngine", "OpenVinoEngine", "Precision", "TensorRTEngine", "openvino_available",
           "tensorrt_available", "tiled", "latency_ms", "unsigned_activations",
           "to_tensor", "to_uint8"]
