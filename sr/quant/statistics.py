"""The calibration statistics: every activation tensor of an ONNX graph observed through ONNX Runtime, one small
batch at a time, in two passes (min/max, then a 2048-bin |x| histogram over [0, amax]): `TensorStats`."""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import onnx
import onnxruntime as ort

from .quantspec import float_activations

NUM_BINS = 2048  # TensorRT's and ModelOpt's histogram size


@dataclass
class TensorStats:
    """What the two calibration passes saw of one tensor: |x| histogram over [0, amax]."""

    name: str
    observed_min: float
    observed_max: float
    histogram: np.ndarray = field(repr=False)  # int64 counts, NUM_BINS bins of |x| over [0, amax]

    @property
    def amax(self) -> float:
        """The largest |x| seen."""
        return max(abs(self.observed_min), abs(self.observed_max))

    @property
    def bin_width(self) -> float:
        """Width of one histogram bin (0 for an all-zero tensor)."""
        return self.amax / len(self.histogram) if self.amax > 0 else 0.0


def activation_tensors(model: onnx.ModelProto) -> list[str]:
    """Every float tensor that a real INT8 deployment quantizes: the graph input and each node output, in graph
    order; constants are left out (initializers, Constant outputs, and what Identity nodes make of them), and so
    are integer tensors (an exporter's shape arithmetic: Shape, Gather, Concat of int64 pads) and masks.

    Args:
        model: the FP32 ONNX model.

    Returns:
        the tensor names.
    """
    constants = {init.name for init in model.graph.initializer}
    floating = float_activations(model)
    names = [model.graph.input[0].name]
    for node in model.graph.node:
        if node.op_type == "Constant" or (node.op_type == "Identity" and node.input[0] in constants):
            constants.update(node.output)
            continue
        names.extend(out for out in node.output if out and out not in constants and out in floating)
    return names


def observing_session(model_path: str | os.PathLike, tensors: Sequence[str], threads: int = 0) -> ort.InferenceSession:
    """An ONNX Runtime session of the model that also returns `tensors` as outputs (basic optimisations only,
    so every observed tensor survives).

    Args:
        model_path: the FP32 ONNX model.
        tensors: tensor names to expose.
        threads: intra-op threads (0: ONNX Runtime's default).

    Returns:
        the session.
    """
    model = onnx.load(str(model_path))
    existing = {output.name for output in model.graph.output}
    for name in tensors:
        if name not in existing:
            model.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC  # observed tensors stay outputs
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _batches(patches: Iterable[np.ndarray], size: int) -> Iterator[np.ndarray]:
    batch: list[np.ndarray] = []
    for patch in patches:
        if batch and patch.shape != batch[0].shape:
            yield np.concatenate(batch)
            batch = []
        batch.append(patch)
        if len(batch) == size:
            yield np.concatenate(batch)
            batch = []
    if batch:
        yield np.concatenate(batch)


def collect_statistics(model_path: str | os.PathLike, patches: Callable[[], Iterable[np.ndarray]],
                       num_samples: int, threads: int = 0, batch_size: int = 8,
                       progress: Callable[[float, str], None] | None = None) -> list[TensorStats]:
    """Stream the calibration patches through the model twice: min/max, then |x| histograms over [0, amax].

    Args:
        model_path: the FP32 ONNX model.
        patches: a callable returning a fresh iterable of float32 1x3xPxP patches (called once per pass).
        num_samples: how many patches each pass yields (for the progress fraction).
        progress: called with (fraction done, message).

    Returns:
        one TensorStats per activation tensor, in graph order.
    """
    model = onnx.load(str(model_path), load_external_data=False)
    names = activation_tensors(model)
    session = observing_session(model_path, names, threads)
    input_name = session.get_inputs()[0].name
    if session.get_inputs()[0].shape[0] == 1:  # a model exported with batch 1 takes one patch at a time
        batch_size = 1
    outputs = [o.name for o in session.get_outputs()]
    index = {name: outputs.index(name) if name in outputs else None for name in names}
    low = {name: np.inf for name in names}
    high = {name: -np.inf for name in names}
    passes = 2  # every method's statistics are the histograms (minmax's too: they serve the coverage and plots)

    def run_pass(handle: Callable[[str, np.ndarray], None], number: int) -> None:
        for done, batch in enumerate(_batches(patches(), batch_size), start=1):
            values = session.run(None, {input_name: batch})
            tensors = [(name, batch if name == input_name else values[index[name]]) for name in names]
            # numpy releases the GIL in these array loops: one thread per core halves the histogram time
            list(workers.map(lambda item: handle(*item), tensors))
            if progress is not None:
                progress((number + min(1.0, done * batch_size / max(1, num_samples))) / passes,
                         f"calibration pass {number + 1} of {passes}")

    workers = ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1)))

    def observe_range(name: str, value: np.ndarray) -> None:
        low[name] = min(low[name], float(value.min()))
        high[name] = max(high[name], float(value.max()))

    run_pass(observe_range, 0)
    histograms = {name: np.zeros(NUM_BINS, np.int64) for name in names}
    scale = {name: (NUM_BINS / max(abs(low[name]), abs(high[name]))) if max(abs(low[name]), abs(high[name])) > 0
             else 0.0 for name in names}

    def observe_histogram(name: str, value: np.ndarray) -> None:
        scaled = np.abs(value.ravel())
        scaled *= np.float32(scale[name])
        bins = scaled.astype(np.int32)
        np.minimum(bins, NUM_BINS - 1, out=bins)
        histograms[name] += np.bincount(bins, minlength=NUM_BINS)

    run_pass(observe_histogram, 1)
    workers.shutdown()
    return [TensorStats(name, low[name], high[name], histograms[name]) for name in names]
