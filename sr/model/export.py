"""torch -> ONNX (opset 17, dynamic height/width), checked against torch and written atomically. The check runs the
graph on ONNX Runtime through the runner the caller passes (`sr.run.sessions.run_once`: the run layer makes every
session).

The graph takes `input` float32 1x3xHxW in [0, 1] and returns `output` 1x3x(sH)x(sW).
"""
from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import torch
from torch import nn

from ..store import write_atomic

OPSET = 17
INPUT, OUTPUT = "input", "output"


def onnx_bytes(model: nn.Module) -> bytes:
    """The serialized ONNX graph of `model` (eval mode, CPU), checked by `onnx.checker`.

    Args:
        model: a network taking float32 1x3xHxW in [0, 1].

    Returns:
        the ModelProto's bytes.
    """
    model = model.eval().cpu()
    example = torch.rand(1, 3, 24, 32)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(model, (example,), buffer, opset_version=OPSET, input_names=[INPUT],
                          output_names=[OUTPUT], dynamic_axes={INPUT: {0: "batch", 2: "height", 3: "width"},
                                                               OUTPUT: {0: "batch", 2: "out_height", 3: "out_width"}},
                          dynamo=False)
    proto = fold_constants(onnx.load_from_string(buffer.getvalue()))
    onnx.checker.check_model(proto)
    return proto.SerializeToString()


def fold_constants(model: onnx.ModelProto) -> onnx.ModelProto:
    """Replace every node whose inputs are all constants by a Constant of its value (the TorchScript exporter
    leaves F.pad's pads as a small int64 subgraph: ConstantOfShape, Concat, Reshape, Slice, Transpose, Cast).

    Args:
        model: the exported model (changed in place).

    Returns:
        `model`.
    """
    from onnx.reference import ReferenceEvaluator

    values = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    kept = []
    for node in model.graph.node:
        if node.op_type == "Constant":
            values[node.output[0]] = onnx.numpy_helper.to_array(node.attribute[0].t)
        elif node.input and all(name in values for name in node.input if name):
            inputs = [name for name in node.input if name]
            declared = [onnx.helper.make_tensor_value_info(
                name, onnx.helper.np_dtype_to_tensor_dtype(values[name].dtype), values[name].shape) for name in inputs]
            single = onnx.helper.make_model(
                onnx.helper.make_graph([node], "fold", declared, [onnx.helper.make_tensor_value_info(o, 0, None)
                                                                  for o in node.output]),
                opset_imports=model.opset_import)
            outputs = ReferenceEvaluator(single).run(None, {name: values[name] for name in inputs})
            for name, value in zip(node.output, outputs):
                values[name] = np.asarray(value)
                kept.append(onnx.helper.make_node("Constant", [], [name], value=onnx.numpy_helper.from_array(
                    np.asarray(value), name)))
            continue
        kept.append(node)
    used = {name for node in kept for name in node.input}
    kept = [n for n in kept if n.op_type != "Constant" or n.output[0] in used]
    del model.graph.node[:]
    model.graph.node.extend(kept)
    return model


Runner = Callable[[bytes | str, np.ndarray], np.ndarray]  # (ONNX graph's bytes or file, input) -> its output


def max_abs_difference(model: nn.Module, onnx_model: bytes | str | os.PathLike, run: Runner, height: int = 37,
                       width: int = 53, seed: int = 0) -> float:
    """Largest |torch - ONNX Runtime| over a random image of an odd size (checks the dynamic axes too).

    Args:
        model: the torch network.
        onnx_model: its ONNX export (bytes or a path).
        run: runs the graph once (`sr.run.sessions.run_once`).
        height, width, seed: the random test image.

    Returns:
        the largest absolute difference.
    """
    generator = torch.Generator().manual_seed(seed)
    image = torch.rand(1, 3, height, width, generator=generator)
    with torch.no_grad():
        expected = model.eval().cpu()(image).numpy()
    source = onnx_model if isinstance(onnx_model, bytes) else str(onnx_model)
    actual = run(source, image.numpy())
    return float(np.max(np.abs(actual - expected)))


def export_onnx(model: nn.Module, path: str | os.PathLike, run: Runner, tolerance: float = 1e-4) -> Path:
    """Export `model` to ONNX at `path` (atomically), after checking ONNX Runtime matches torch within `tolerance`.

    Args:
        model: the torch network.
        path: the .onnx file to write.
        run: runs the graph once on ONNX Runtime (`sr.run.sessions.run_once`).
        tolerance: the largest accepted |torch - ONNX Runtime|.

    Returns:
        `path`.

    Example:
        >>> export_onnx(load_model("xlsr-clip"), "cache/xlsr-clip.onnx", run_once)

    Raises:
        RuntimeError: ONNX Runtime's output differs from torch's by more than `tolerance`.
    """
    data = onnx_bytes(model)
    difference = max_abs_difference(model, data, run)
    if difference > tolerance:
        raise RuntimeError(f"ONNX export differs from torch by {difference:.2e} (> {tolerance:.0e})")
    return write_atomic(data, path)
