"""The calibration statistics: every activation tensor of an ONNX graph observed (by the caller's observer: ONNX
Runtime's, made in the run layer), one small batch at a time, in two passes (min/max, then a 2048-bin |x| histogram
over [0, amax]): `TensorStats`."""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Protocol, Sequence

import numpy as np
import onnx

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


class Observes(Protocol):
    """What observes the tensors (`sr.run.sessions.Observer`, made by the caller: this layer runs no model)."""

    batch: int | None  # the one batch size the model takes (1: a model exported with batch 1), None: any

    def observe(self, array: np.ndarray) -> dict[str, np.ndarray]:
        """{tensor name: its value} for an input batch, the input's included."""


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
                       num_samples: int, observer: Callable[[str | os.PathLike, Sequence[str]], Observes],
                       batch_size: int = 8, progress: Callable[[float, str], None] | None = None) -> list[TensorStats]:
    """Stream the calibration patches through the model twice: min/max, then |x| histograms over [0, amax].

    Args:
        model_path: the FP32 ONNX model.
        patches: a callable returning a fresh iterable of float32 1x3xPxP patches (called once per pass).
        num_samples: how many patches each pass yields (for the progress fraction).
        observer: makes what observes the model's tensors, from the model and the tensor names
            (`sr.run.sessions.Observer`, its threads set by the caller).
        batch_size: patches per run (1 where the model takes one at a time).
        progress: called with (fraction done, message).

    Returns:
        one TensorStats per activation tensor, in graph order.
    """
    model = onnx.load(str(model_path), load_external_data=False)
    names = activation_tensors(model)
    observing = observer(model_path, names)
    batch_size = observing.batch or batch_size  # a model exported with batch 1 takes one patch at a time
    low = {name: np.inf for name in names}
    high = {name: -np.inf for name in names}
    passes = 2  # every method's statistics are the histograms (minmax's too: they serve the coverage and plots)

    def run_pass(handle: Callable[[str, np.ndarray], None], number: int) -> None:
        for done, batch in enumerate(_batches(patches(), batch_size), start=1):
            values = observing.observe(batch)
            tensors = [(name, values[name]) for name in names]
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
