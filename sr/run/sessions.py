"""ONNX Runtime sessions, made in one place for the library: the options (threads, graph optimisation, logging, the
memory arena), the execution providers, a session's fixed input size, and the observing mode: an FP32 model run with
chosen intermediate tensors as extra outputs (`Observer`), whole batches for the calibration statistics or in tiles
of an image (of the model's own size where it takes only one) for the range coverage. The layers below the run layer
make none: they are handed an `Observer` or `run_once` by their caller. (`sr.run.npu` and `sr.run.tflite` still make
their own special sessions: QNN's HTP, a one-thread float graph, a probe of an exporter's shape arithmetic.)
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import onnx

from ..store import cache_root


def fixed_size(shape) -> tuple[int, int] | None:
    """(height, width) when a 1x3xHxW input shape is static, else None."""
    height, width = shape[2:4]
    return (height, width) if isinstance(height, int) and isinstance(width, int) and height > 0 and width > 0 else None


def ort_providers(onnx_path: str | os.PathLike, available: list[str] | None = None) -> list:
    """ONNX Runtime execution providers for a model, best first, with the CPU as the fallback.

    Where `onnxruntime-gpu` is installed (requirements-gpu.txt), a QDQ model goes to the TensorRT execution
    provider (explicit quantization from the Q/DQ pairs, engines cached in the cache folder) and an FP32 model to
    CUDA. Written from ONNX Runtime's documentation: no GPU provider could run where this lab was built.

    Args:
        onnx_path: the model.
        available: the providers present (default: `onnxruntime.get_available_providers()`).

    Returns:
        a providers list for `ort_session`.
    """
    import onnxruntime as ort

    available = ort.get_available_providers() if available is None else available
    quantized = b"QuantizeLinear" in Path(onnx_path).read_bytes()
    chain: list = []
    if quantized and "TensorrtExecutionProvider" in available:
        chain.append(("TensorrtExecutionProvider", {"trt_engine_cache_enable": True,
                                                    "trt_engine_cache_path": str(cache_root() / "ort-tensorrt")}))
    if "CUDAExecutionProvider" in available:
        chain.append("CUDAExecutionProvider")
    return [*chain, "CPUExecutionProvider"]


def ort_session(source: str | os.PathLike | bytes | onnx.ModelProto, threads: int = 0, providers: list | None = None,
                basic: bool = False, log_level: int | None = None, arena: bool = True):
    """An ONNX Runtime inference session: the one place the library makes one.

    Args:
        source: the model: a file, its bytes or a ModelProto.
        threads: intra-op threads (0: ONNX Runtime's default).
        providers: execution providers, best first (default: the CPU alone, the lab's reference numerics).
        basic: basic graph optimisations only (every intermediate tensor survives, as observing needs).
        log_level: ONNX Runtime's log severity (3: errors only; None: its default).
        arena: keep ONNX Runtime's CPU memory arena (an engine that runs many tile sizes goes without).

    Returns:
        the `onnxruntime.InferenceSession`.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    if basic:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    if log_level is not None:
        options.log_severity_level = log_level
    if not arena:
        options.enable_cpu_mem_arena = False
    if isinstance(source, onnx.ModelProto):
        source = source.SerializeToString()
    elif not isinstance(source, bytes):
        source = str(source)
    return ort.InferenceSession(source, options, providers=providers or ["CPUExecutionProvider"])


def run_once(source: str | os.PathLike | bytes | onnx.ModelProto, array: np.ndarray) -> np.ndarray:
    """A model's first output for one input, ONNX Runtime on the CPU (a session made for this one run: an export
    checked against torch, `sr.model.export`)."""
    session = ort_session(source)
    return session.run(None, {session.get_inputs()[0].name: array})[0]


class Observer:
    """The observing mode: an FP32 model run by ONNX Runtime on the CPU with `tensors` as outputs too (basic
    optimisations only, so every observed tensor survives). `observe` gives every tensor asked for, the input's
    included; `tiles` runs an image in non-overlapping tiles, of the model's own size where it takes only one.

    Args:
        model_path: the FP32 ONNX model.
        tensors: the tensor names to observe.
        threads: intra-op threads (0: ONNX Runtime's default).
    """

    def __init__(self, model_path: str | os.PathLike, tensors: Sequence[str], threads: int = 0):
        model = onnx.load(str(model_path))
        existing = {output.name for output in model.graph.output}
        for name in tensors:
            if name not in existing:
                model.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
        self.session = ort_session(model, threads, basic=True)
        self.input_name = self.session.get_inputs()[0].name
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.fixed = fixed_size(self.session.get_inputs()[0].shape)
        self.batch = 1 if self.session.get_inputs()[0].shape[0] == 1 else None  # None: any batch

    def observe(self, array: np.ndarray) -> dict[str, np.ndarray]:
        """{tensor name: its value} for an input batch (float32 Nx3xHxW), the input itself under its own name."""
        values = dict(zip(self.outputs, self.session.run(None, {self.input_name: array})))
        values[self.input_name] = array
        return values

    def tiles(self, image: np.ndarray, tile: int) -> Iterator[dict[str, np.ndarray]]:
        """`observe` of each non-overlapping tile of a float32 1x3xHxW image, `tile` pixels a side, or of the
        model's fixed size (the last tiles mirrored up to it)."""
        tile_y, tile_x = self.fixed or (tile, tile)
        for y in range(0, image.shape[2], tile_y):
            for x in range(0, image.shape[3], tile_x):
                block = image[:, :, y : y + tile_y, x : x + tile_x]
                if self.fixed and block.shape[2:] != self.fixed:  # the block mirrored up to the model's size
                    block = np.pad(block, ((0, 0), (0, 0), (0, tile_y - block.shape[2]),
                                           (0, tile_x - block.shape[3])), mode="symmetric")
                yield self.observe(block)


__all__ = ["fixed_size", "ort_providers", "ort_session", "run_once", "Observer"]
