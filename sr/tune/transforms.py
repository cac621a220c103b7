"""Function-preserving changes made to a model before it is quantized (PTQ refinements and QAT start from them):

- centred I/O (`sr.model.networks.with_io_offset`): an 8-bit image's levels become exactly the INT8 values at step 1/255,
  so the input and output are quantized losslessly; those two ranges are fixed in advance;
- channel equalization: per-channel scales moved between a Conv and the Conv that reads it (through a ReLU, LeakyReLU, PReLU or a
  Concat), so a per-tensor INT8 range serves every channel (activation equalization, in the spirit of the
  cross-layer equalization of Nagel et al., ICCV 2019, which balances weights instead).

Both give a new model file (a weight file, or a standard ONNX graph for a user's model) computing the same
function to float rounding.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
import torch

from ..graph import GraphIndex
from ..quant.calibdata import calibration_patches, load_calibration_images, prepare_calibration_images
from ..model.models import model_info, save_tuned, with_values
from ..model.onnxtorch import OnnxModule
from ..quant.qdq import spec_of
from ..run.quantize import fp32_onnx_path

from ..quant.quantspec import Scheme
from ..quant.recipe import Fixes
log = logging.getLogger(__name__)

# activations f with f(e x) = e f(x) for e > 0, per channel: a per-channel scale passes through them unchanged
POSITIVE_HOMOGENEOUS = ("Relu", "LeakyRelu", "PRelu")


def prepare(model: str, io_offset: bool, equalize: float, patches: torch.Tensor | None,
            work: Path, scheme: Scheme | str = Scheme.TENSORRT) -> tuple[str, Fixes]:
    """The model to quantize and the ranges fixed in advance.

    Args:
        model: a shipped name, a weight file or a registered ONNX model.
        io_offset: centred I/O (the lab's architectures only; an ONNX model keeps its own I/O).
        equalize: channel-equalization strength (0: none).
        patches: calibration patches (needed when `equalize` > 0).
        work: where the changed model files go (`<work>.centred.safetensors`, `<work>.equalized.*`).
        scheme: the INT8 scheme the ranges are for.

    Returns:
        (the model name or file to quantize, the ranges fixed in advance: the centred input and output on the
        8-bit grid, step 1/255: +-127/255 for symmetric INT8 (-128/255 is then the level -128), -128/255..127/255
        for UINT8, whose zero point is then exactly 128).
    """
    structure, info = str(model), model_info(model)
    centred: list[str] | None = []
    if io_offset:
        copy, centred = info.centred_copy(work)
        structure = copy or structure
    if equalize > 0:
        structure = _equalized(structure, equalize, patches, work)
    low = -127 / 255 if Scheme.parse(scheme).symmetric else -128 / 255
    if centred:  # the centred tensors the scheme quantizes, on the 8-bit grid of the input's range
        top = info.input_top
        quantized = spec_of(onnx.load(str(fp32_onnx_path(structure))), scheme).activations
        return structure, Fixes(fixed_range={t: (low * top, 127 / 255 * top) for t in centred if t in quantized})
    if not load_io_offset(structure):
        return structure, Fixes()
    graph = onnx.load(str(fp32_onnx_path(structure)))
    return structure, Fixes(fixed_range={tensor: (low, 127 / 255) for tensor in io_tensors(graph)})


def remove_starting_points(work: Path) -> None:
    """Delete the files `prepare(..., work)` wrote (once the model made from them is saved)."""
    for kind in ("centred", "equalized"):
        for leftover in work.parent.glob(f"{work.name}.{kind}.*"):
            leftover.unlink(missing_ok=True)


def load_io_offset(model: str) -> float:
    """The centred-I/O offset of a model (0 for none, and for ONNX models)."""
    return model_info(model).io_offset()


def _equalized(structure: str, strength: float, patches: torch.Tensor, work: Path) -> str:
    """`structure` with its channels equalized, as a new file (registered, for an ONNX model)."""
    graph = onnx.load(str(fp32_onnx_path(structure)))
    changed = equalize_channels(graph, patches, strength)
    return save_tuned(structure, graph, changed, Path(f"{work}.equalized{model_info(structure).tuned_suffix}"))


def calibration_batch(calibration, scale: int, count: int = 32, size: int = 48, seed: int = 0) -> torch.Tensor:
    """`count` calibration patches of `size` px (network inputs: downscaled as the calibration says) as one batch.

    Raises:
        ValueError: no calibration image is that large once downscaled.
    """
    images = prepare_calibration_images(load_calibration_images(calibration.data), calibration, scale)
    patches = [p for p in calibration_patches(images, count * 2, size, seed) if p.shape[2:] == (size, size)][:count]
    if not patches:
        raise ValueError(f"no calibration image is {size} px on a side once downscaled")
    return torch.from_numpy(np.concatenate(patches))


def io_tensors(model: onnx.ModelProto) -> tuple[str, str]:
    """(the quantized image the network reads, the quantized image it writes) of a centred-I/O graph: the input
    after the offset and the padding, and the output before the offset is added back."""
    index = GraphIndex(model)
    tensor = model.graph.input[0].name
    while all(n.op_type in ("Sub", "Pad") for n in index.readers(tensor)) and len(index.readers(tensor)) == 1:
        tensor = index.readers(tensor)[0].output[0]
    output = model.graph.output[0].name
    while index.producer(output).op_type == "Add":
        output = index.producer(output).input[0]
    return tensor, output


def equalizable_pairs(model: onnx.ModelProto) -> list[tuple[str, list[tuple[str, int]]]]:
    """Where per-channel scales can move between layers without changing the function: a Conv B whose input is
    made, through an optional ReLU, LeakyReLU or PReLU and/or a Concat, only by Convs (each feeding nothing else).
    Scaling channel c of a producer (its weights and bias) by e > 0 and B's weights for input channel c by 1 / e is
    exact (those activations commute with positive scaling, a PReLU's slopes staying per channel; Concat only
    stacks).

    Returns:
        [(B's output, [(a producer Conv's output, its first channel in B's input), ...])], in graph order.
    """
    index = GraphIndex(model)
    producer = index.producers
    consumers = {name: len(readers) for name, readers in index.consumers.items()}
    shapes = {i.name: tuple(i.dims) for i in model.graph.initializer}

    def conv_behind(tensor: str) -> str | None:
        node = producer.get(tensor)
        if node is not None and node.op_type in POSITIVE_HOMOGENEOUS and consumers.get(tensor) == 1:
            tensor, node = node.input[0], producer.get(node.input[0])
        ok = node is not None and node.op_type == "Conv" and consumers.get(tensor) == 1 and len(node.input) > 2
        return node.output[0] if ok else None

    pairs = []
    for node in model.graph.node:
        if node.op_type != "Conv" or node.input[1] not in shapes:
            continue
        source = producer.get(node.input[0])
        parts = list(source.input) if source is not None and source.op_type == "Concat" and \
            consumers.get(node.input[0]) == 1 else [node.input[0]]
        found, offset = [], 0
        for part in parts:
            conv = conv_behind(part)
            if conv is None:
                found = []
                break
            found.append((conv, offset))
            weight = producer[conv].input[1]
            offset += shapes[weight][0]
        if found:
            pairs.append((node.output[0], found))
    return pairs


@torch.no_grad()
def equalize_channels(model: onnx.ModelProto, x: torch.Tensor, strength: float = 0.5,
                      limit: float = 16.0) -> dict[str, np.ndarray]:
    """Activation equalization over `equalizable_pairs`: channel c of B's input, of peak |value| r_c on the patches
    `x` where the tensor's peak is R, is scaled by e_c = (R / r_c) ** strength (at most `limit`), so a per-tensor
    INT8 range serves the small channels better; B's weights take 1 / e_c. Pairs are done in graph order, each on
    the ranges left by the ones before.

    Args:
        model: the FP32 model (not changed).
        x: calibration patches.
        strength: 0 changes nothing, 1 gives every channel the tensor's peak.
        limit: the largest scale.

    Returns:
        {initializer name: new value} for the weights and biases that changed.
    """
    nodes = {n.output[0]: n for n in model.graph.node}
    arrays = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    # the float tensors only: an integer initializer (a shape, a pad size) stays as it is
    values = {name: a.astype(np.float32) for name, a in arrays.items() if np.issubdtype(a.dtype, np.floating)}
    changed: dict[str, np.ndarray] = {}
    for consumer, producers in equalizable_pairs(model):
        b = nodes[consumer]
        trial = with_values(model, {**values, **changed})
        _, seen = OnnxModule(trial)(x, keep={b.input[0]})
        peaks = seen[b.input[0]].abs().amax(dim=(0, 2, 3)).numpy()
        if not peaks.max() > 0:
            continue
        scales = np.where(peaks > peaks.max() * 1e-6, (peaks.max() / np.maximum(peaks, 1e-30)) ** strength, 1.0)
        scales = np.clip(scales, 1.0, limit).astype(np.float32)
        for conv, first in producers:
            weight, bias = nodes[conv].input[1], nodes[conv].input[2]
            count = values[weight].shape[0]
            part = scales[first:first + count]
            changed[weight] = changed.get(weight, values[weight]) * part[:, None, None, None]
            changed[bias] = changed.get(bias, values[bias]) * part
        weight = b.input[1]
        group = next((a.i for a in b.attribute if a.name == "group"), 1)
        w = changed.get(weight, values[weight]).copy()
        per_group_in, per_group_out = w.shape[1], w.shape[0] // group
        for channel, e in enumerate(scales):
            g = channel // per_group_in
            w[g * per_group_out:(g + 1) * per_group_out, channel % per_group_in] /= e
        changed[weight] = w
    return changed


def centring_reason(model: str) -> str | None:
    """None when centred I/O can be built into `model`, else why not, in words (`sr.model.models.ModelInfo`)."""
    return model_info(model).centring_reason()
