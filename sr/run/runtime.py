"""Which engine runs what: ONNX Runtime on the CPU is the reference numerics, and every other engine is checked
against it on a probe when it is created (`sr.run.conformance.conformance`) and refused in words when it disagrees.

The one place that decides which engine serves a purpose (scores, the app's panels, the bundle, the diagnosis,
the benchmark), so that the lab shows one INT8: the written QDQ model as ONNX Runtime's CPU kernels execute it.

Example:
    >>> engine = create_engine("openvino-int8", "xlsr-clip", int8)   # EngineRefused if it is wrong on this CPU
    >>> engine, refused = best_int8_engine(int8)                     # the fastest that agrees, and who did not
"""
from __future__ import annotations

import functools
import logging
import platform
import sys
from pathlib import Path

import onnx

from ..choices import Choice
from .conformance import (BF16_TOLERANCE, FP32_TOLERANCE, INT8_TOLERANCE, NPU_TOLERANCE, Conformance,
                          EngineRefused, conformance)
from .engines import (OpenVinoEngine, OrtEngine, Precision, TensorRTEngine, TorchEngine, openvino_available,
                      reference, tensorrt_available)
from .npu import DEFAULT_HTP_ARCH, LiteRTEngine, QnnHtpEngine
from ..model.models import model_info
from ..model.weights import load_model
from ..model.wrapper import wrapper_parts
from ..quant.qdq import spec_of, tie_fused_ranges
from .quantize import fp32_onnx_path
from ..quant.calibrated import CalibratedModel
from ..quant.quantspec import Scheme
from ..store import cache_cap_bytes, cache_root, code_digest, evict, file_sha256, short_hash
from .tflite import DECOMPOSED, WRITTEN_BY, SizeDependent, write_tflite

log = logging.getLogger(__name__)


class EngineKind(Choice, noun="engine"):
    """The runtimes a model can be evaluated with."""

    TORCH = "torch"
    ORT = "ort"
    ORT_INT8 = "ort-int8"  # the reference INT8: ONNX Runtime's CPU kernels on the written QDQ model
    OPENVINO = "openvino"  # FP32 (INFERENCE_PRECISION_HINT f32)
    OPENVINO_BF16 = "openvino-bf16"
    OPENVINO_INT8 = "openvino-int8"  # the QDQ model, its Q/DQ pairs fused into INT8 kernels
    TENSORRT = "tensorrt"
    QNN_HTP = "qnn-htp"  # Qualcomm's Hexagon NPU arithmetic (libQnnHtp's x86 simulation), CPU fallback off
    LITERT = "litert"  # the lab's full-integer .tflite in LiteRT's interpreter, XNNPACK kernels
    LITERT_REF = "litert-ref"  # the same .tflite on TFLite's reference integer kernels

    @property
    def is_int8(self) -> bool:
        """True for the engines that run a calibrated INT8 model."""
        return self in (EngineKind.ORT_INT8, EngineKind.OPENVINO_INT8, EngineKind.TENSORRT, EngineKind.QNN_HTP,
                        EngineKind.LITERT, EngineKind.LITERT_REF)


def cpu_name() -> str:
    """The CPU's model name (part of a conformance verdict's key: a kernel path can be right on one CPU and wrong
    on another)."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


class Purpose(Choice, noun="engine purpose"):
    """What an engine is for (`engine_for`)."""

    MEASURE = "measure"  # every figure and panel: the reference numerics (ONNX Runtime on the CPU)
    NATIVE = "native"  # FP32 in the model's own runtime (PyTorch for a weight file, ONNX Runtime for a graph)
    SPEED = "speed"  # the fastest engine present that agrees with the reference on the probe


def engine_for(model: str, int8: CalibratedModel | None = None, purpose: Purpose | str = Purpose.MEASURE,
               kind: EngineKind | str | None = None, threads: int = 0, htp_arch: str = DEFAULT_HTP_ARCH):
    """The one engine policy: the engine that runs `model` (its INT8 model `int8`, or FP32) for a purpose, or the
    engine kind asked for; every engine but the reference is checked against it (`create_engine`).

    Args:
        model: a shipped model name, a weight file or a registered ONNX model.
        int8: the calibrated model for INT8, None for FP32.
        purpose: `Purpose` (ignored when `kind` is given).
        kind: a runtime asked for by name (`EngineKind`).
        threads: runtime threads (0: its default).
        htp_arch: the HTP generation of the qnn-htp engine.

    Raises:
        EngineRefused: the engine asked for disagrees with the reference on this machine.
        ValueError: an INT8 kind without a calibrated model, or an unknown kind or purpose.
    """
    if kind is not None:
        return create_engine(kind, model, int8, threads, htp_arch)
    purpose = Purpose.parse(purpose)
    if purpose is Purpose.SPEED:
        return best_int8_engine(int8, threads)[0] if int8 is not None else create_engine(
            model_info(model).fp32_engine, model, None, threads)
    if purpose is Purpose.NATIVE and int8 is None:
        return create_engine(model_info(model).fp32_engine, model, None, threads)
    return reference_engine(model, int8, threads)


def reference_engine(model: str, int8: CalibratedModel | None = None, threads: int = 0) -> OrtEngine:
    """The reference: ONNX Runtime on the CPU, on the QDQ model (INT8) or the FP32 export.

    Args:
        model: a shipped model name, a weight file or a registered ONNX model.
        int8: the calibrated model for INT8, None for FP32.
        threads: ONNX Runtime threads (0: its default).

    Returns:
        the engine; its name says what it runs.
    """
    if int8 is None:
        return reference(fp32_onnx_path(model), model_info(model).scale, threads, name="ort-fp32")
    return reference(int8.qdq_onnx, int8.scale, threads, name=f"ort-int8-{int8.scheme.value}")


def _checked(engine, model: str, int8: CalibratedModel | None, tolerance, kind: str):
    """`engine` if it agrees with the reference on the probe, else EngineRefused (the verdict is remembered per
    model file, engine kind, CPU and input size)."""
    path = int8.qdq_onnx if int8 is not None else fp32_onnx_path(model)
    key = (kind, file_sha256(path), cpu_name(), getattr(engine, "fixed", None))
    verdict = conformance(engine, lambda: reference_engine(model, int8), tolerance, key)
    if not verdict.passed:
        raise EngineRefused(verdict)
    engine.conformance = verdict
    return engine


def create_engine(kind: EngineKind | str, model: str, int8: CalibratedModel | None = None, threads: int = 0,
                  htp_arch: str = DEFAULT_HTP_ARCH):
    """An engine of `kind` for `model`, checked against the reference unless it is the reference.

    Args:
        kind: the runtime.
        model: a shipped model name, a weight file or a registered ONNX model.
        int8: the calibrated model, for INT8 kinds.
        threads: runtime threads (0: its default).
        htp_arch: the HTP generation of the qnn-htp engine (`sr.run.npu.HTP_ARCHS`).

    Returns:
        an object with `run(lr uint8 HxWx3) -> uint8 (sH)x(sW)x3` and a `name`.

    Raises:
        ValueError: an INT8 kind without a calibrated model, TensorRT with a scheme it does not run, or an NPU
            that cannot run the whole graph (said in words).
        EngineRefused: the engine disagrees with the reference on this machine (the message gives the figures).
    """
    kind = EngineKind.parse(kind)
    scale = model_info(model).scale
    if kind is EngineKind.TORCH:  # native FP32, for display and timing: checked like every other engine
        return _checked(TorchEngine(load_model(model), name="torch-fp32"), model, None, FP32_TOLERANCE, kind.value)
    if kind is EngineKind.ORT:
        engine = OrtEngine(fp32_onnx_path(model), scale, threads, name="ort-fp32")
        return engine if engine.provider == "CPUExecutionProvider" else _checked(engine, model, None, FP32_TOLERANCE,
                                                                                 engine.provider)
    if kind in (EngineKind.OPENVINO, EngineKind.OPENVINO_BF16):
        precision = Precision.BF16 if kind is EngineKind.OPENVINO_BF16 else Precision.F32
        engine = OpenVinoEngine(fp32_onnx_path(model), scale, threads, precision, name=f"openvino-{precision.value}")
        return _checked(engine, model, None, BF16_TOLERANCE if precision is Precision.BF16 else FP32_TOLERANCE,
                        kind.value)
    if int8 is None:
        raise ValueError(f"the {kind.value} engine needs a calibrated INT8 model")
    if kind is EngineKind.ORT_INT8:  # the reference on every install (a GPU wheel's providers are not it)
        return reference(int8.qdq_onnx, scale, threads, name=f"ort-int8-{int8.scheme.value}")
    if kind is EngineKind.OPENVINO_INT8:
        engine = OpenVinoEngine(int8.qdq_onnx, scale, threads, name=f"openvino-int8-{int8.scheme.value}")
        return _checked(engine, model, int8, INT8_TOLERANCE, kind.value)
    if kind in (EngineKind.LITERT, EngineKind.LITERT_REF):
        kernels = "xnnpack" if kind is EngineKind.LITERT else "reference"
        contract = model_info(model).contract
        try:
            tflite, per_size = tflite_model(int8), None
        except SizeDependent:  # a float from the image's size: a file per size, as a converter writes one
            tflite, per_size = None, functools.partial(tflite_model, int8)
        fp32 = onnx.load(str(int8.fp32_onnx))
        engine = LiteRTEngine(tflite, scale, kernels, name=f"{kind.value}-{int8.scheme.value}",
                              wrapper=wrapper_parts(fp32),
                              nhwc=contract is not None and contract.layout.value == "nhwc", per_size=per_size)
        # XNNPACK runs the reference's arithmetic op for op: the INT8 tolerance; but where the file decomposes an op
        # the reference runs whole (a LayerNorm: MEAN, SUB, L2_NORMALIZATION), or on the reference kernels, the NPU's
        decomposed = any(node.op_type in DECOMPOSED for node in fp32.graph.node)
        return _checked(engine, model, int8, INT8_TOLERANCE if kernels == "xnnpack" and not decomposed else
                        NPU_TOLERANCE, kind.value)
    if kind is EngineKind.QNN_HTP:
        engine = QnnHtpEngine(int8.qdq_onnx, scale, htp_arch, name=f"qnn-htp-{int8.scheme.value}")
        return _checked(engine, model, int8, NPU_TOLERANCE, f"{kind.value}-v{engine.htp_arch}")
    if int8.scheme is Scheme.CPU:
        raise ValueError("the tensorrt engine runs the symmetric schemes only (tensorrt, npu), not cpu")
    return _checked(TensorRTEngine(int8.qdq_onnx, scale), model, int8, INT8_TOLERANCE, kind.value)


def tflite_model(int8: CalibratedModel, size: tuple[int, int] | None = None) -> Path:
    """The full-integer .tflite of a calibrated model (`sr.run.tflite`), written once per QDQ model, writer (keyed by
    the QDQ model's hash, which the ranges, spec and fixes are all in, and the writer's code: `WRITTEN_BY`) and size
    and kept in the cache.

    Args:
        size: the (height, width) of the user's input it is for, where the graph computes a float from the image's
            size (an attention's 1 / sqrt(H x W)); None: any size.

    Raises:
        TfliteUnsupported: (a ValueError) a scheme other than npu / npu-per-tensor, or a graph the writer cannot
            express (named); `SizeDependent`, one of them, where a size is needed and none was given.
    """
    key = short_hash(f"{file_sha256(int8.qdq_onnx)} {code_digest(*(sys.modules[name] for name in WRITTEN_BY))}")
    sized = f"-{size[0]}x{size[1]}" if size else ""
    path = cache_root() / "tflite" / f"{int8.qdq_onnx.stem}-{key}{sized}.tflite"  # the writer's code is in the key
    if not path.is_file():
        spec = spec_of(int8.fp32_onnx, int8.scheme, int8.fixes.keep_float)
        write_tflite(int8.fp32_onnx, spec, tie_fused_ranges(spec, int8.ranges), path, size)
        evict(path.parent, cache_cap_bytes(), keep=path)
    return path


def int8_candidates(int8: CalibratedModel) -> list[EngineKind]:
    """The INT8 engines present for a calibrated model, fastest first (the reference last)."""
    kinds = []
    if int8.scheme is not Scheme.CPU and tensorrt_available():
        kinds.append(EngineKind.TENSORRT)
    if openvino_available():
        kinds.append(EngineKind.OPENVINO_INT8)
    return [*kinds, EngineKind.ORT_INT8]


def best_int8_engine(int8: CalibratedModel, threads: int = 0) -> tuple[object, list[Conformance]]:
    """The fastest INT8 engine present that agrees with the reference (for speed: the benchmark, batch work).

    Args:
        int8: the calibrated model.
        threads: runtime threads.

    Returns:
        (the engine, the verdicts of the engines refused on the way).
    """
    refused = []
    for kind in int8_candidates(int8)[:-1]:  # the last candidate is the reference, which is not checked
        try:
            return create_engine(kind, int8.model, int8, threads), refused
        except EngineRefused as error:
            log.warning("%s", error)
            refused.append(error.conformance)
        except Exception as error:  # a runtime that cannot even build the model: the next one is tried
            log.warning("%s could not run %s (%s: %s); trying the next engine", kind.value, int8.qdq_onnx.name,
                        type(error).__name__, error)
    return create_engine(EngineKind.ORT_INT8, int8.model, int8, threads), refused


__all__ = ["EngineKind", "Purpose", "engine_for", "create_engine", "reference_engine", "best_int8_engine", "int8_candidates", "EngineRefused",
           "tflite_model",
           "cpu_name"]
