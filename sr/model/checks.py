"""Checking a user's ONNX file without trusting it: size, format, self-contained tensors, standard ops, one image in
and one out, finite weights; a runtime's error message made fit to show a visitor."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

MAX_BYTES = int(float(os.environ.get("SR_MAX_ONNX_MB", "200")) * 1024 * 1024)
STANDARD_DOMAINS = {"", "ai.onnx"}


class UserModelError(ValueError):
    """The file is not an ONNX super-resolution model the lab can run."""


def check_file(path: str | os.PathLike) -> onnx.ModelProto:
    """Load and check a user's ONNX file without trusting it.

    Raises:
        FileNotFoundError: no such file.
        UserModelError: too large, not ONNX, external data, custom ops, or not an image-to-image model.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such ONNX file: {path.name}")
    size = path.stat().st_size
    if size == 0:
        raise UserModelError(f"{path.name} is empty (0 bytes)")
    if size > MAX_BYTES:
        raise UserModelError(f"{path.name} is {size / 2**20:.0f} MB, more than the limit of {MAX_BYTES / 2**20:.0f} MB "
                             "(SR_MAX_ONNX_MB)")
    try:
        model = onnx.load_model_from_string(path.read_bytes())
    except Exception as error:  # protobuf raises its own DecodeError
        raise UserModelError(f"{path.name} is not an ONNX model ({type(error).__name__}: {clean_message(error)})") from None
    if any(_is_external(tensor) for tensor in _tensors(model.graph)):
        raise UserModelError(f"{path.name} keeps tensors in external files; the lab only accepts self-contained "
                             "ONNX files (save with all tensors inside)")
    custom = sorted({node.domain for node in _nodes(model.graph)} - STANDARD_DOMAINS)
    if custom:
        raise UserModelError(f"{path.name} uses custom-op domains ({', '.join(custom)}); only standard ONNX ops run here")
    try:
        onnx.checker.check_model(model)
        model = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception as error:
        raise UserModelError(f"{path.name} fails the ONNX checker: {clean_message(error)}") from None
    _check_image_to_image(model, path.name)
    _check_finite(model, path.name)
    return model


def _check_finite(model: onnx.ModelProto, name: str) -> None:
    """Refuse NaN or infinite weights (no range, histogram or INT8 scale can be made from them)."""
    for init in model.graph.initializer:
        if init.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16):
            values = numpy_helper.to_array(init)
            if not np.isfinite(values.astype(np.float32)).all():
                bad = int(np.size(values) - np.isfinite(values.astype(np.float32)).sum())
                raise UserModelError(f"{name}: its weight {init.name!r} holds {bad} NaN or infinite value(s); "
                                     "fix the model (a diverged training run?) and upload it again")


def _nodes(graph: onnx.GraphProto):
    """Every node of a graph and of its subgraphs (If / Loop / Scan bodies), depth first."""
    for node in graph.node:
        yield node
        for attribute in node.attribute:
            for sub in ([attribute.g] if attribute.HasField("g") else []) + list(attribute.graphs):
                yield from _nodes(sub)


def _tensors(graph: onnx.GraphProto):
    """Every tensor stored in a graph: initializers, sparse initializers, and the tensors of node attributes
    (Constant's value, ConstantOfShape's, ...), in its subgraphs too."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield from (sparse.values, sparse.indices)
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t
            yield from attribute.tensors
            for sparse in ([attribute.sparse_tensor] if attribute.HasField("sparse_tensor") else []) + \
                    list(attribute.sparse_tensors):
                yield from (sparse.values, sparse.indices)
            for sub in ([attribute.g] if attribute.HasField("g") else []) + list(attribute.graphs):
                yield from _tensors(sub)


def _is_external(tensor: onnx.TensorProto) -> bool:
    """True for a tensor whose data would be read from another file."""
    return tensor.data_location == TensorProto.EXTERNAL or len(tensor.external_data) > 0


def clean_message(message: str) -> str:
    """A runtime's error message fit to show a visitor: one line, no file paths, no tensor contents (a shape list
    printed by an error could carry bytes a hostile model read), at most 300 characters."""
    import re

    message = " ".join(str(message).split())
    message = re.sub(r"(?<![\w.])/(?:[\w.+-]+/)*[\w.+-]+", "<path>", message)
    message = re.sub(r"\{[-\d,\s]{12,}\}|\[[-\d,\s]{24,}\]", "{...}", message)
    return message[:300]


def _dims(value_info) -> list:
    return [d.dim_value if d.HasField("dim_value") else None for d in value_info.type.tensor_type.shape.dim]


def _check_image_to_image(model: onnx.ModelProto, name: str) -> None:
    initializers = {init.name for init in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    if len(inputs) != 1:
        raise UserModelError(f"{name} has {len(inputs)} inputs; an SR model takes one image")
    for kind, value in (("input", inputs[0]), ("output", model.graph.output[0])):
        rank = len(value.type.tensor_type.shape.dim)
        if rank != 4:
            raise UserModelError(f"{name}: its {kind} {value.name!r} has rank {rank}, not 4 (an image batch); "
                                 "is it a classifier?")
        if value.type.tensor_type.elem_type != TensorProto.FLOAT:
            raise UserModelError(f"{name}: its {kind} is {TensorProto.DataType.Name(value.type.tensor_type.elem_type)}, "
                                 "not float32")
