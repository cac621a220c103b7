"""The CLI's options, made from the config dataclasses: one option per field, its flag from the field's name, its
type and default from the field, its help from the tables here. A field added to a config without a help text
here fails the parser's construction (KeyError), so the CLI cannot drift from the library: the option exists, or
the command skips that field on purpose because it sets it another way (the model, the calibration).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from enum import Enum
from typing import Sequence

TRAIN_HELP = {
    "arch": "architecture: xlsr or teacher",
    "final_activation": "relu, clipped_relu or linear",
    "scale": "2, 3 or 4",
    "train_dirs": "training image folders",
    "val_dir": "validation folder ('' for none)",
    "out": "weight file to write (.safetensors)",
    "steps": "optimizer steps; the default takes over an hour on 2 CPU cores",
    "batch_size": "patches per step (per process under torchrun)",
    "lr_patch": "LR patch side in pixels",
    "max_lr": "one-cycle peak learning rate",
    "seed": "random seed",
    "val_every": "validate every N steps",
    "checkpoint_every": "checkpoint every N steps",
    "resume": "continue from <out>.ckpt.pt",
    "device": "auto, cpu or cuda",
    "init": "start from these weights (shipped name or file)",
    "amp": "bf16 autocast on CUDA",
    "max_seconds": "stop early after this many seconds (the weights so far are saved)",
    "model_config": "extra architecture fields as JSON, e.g. '{\"num_blocks\": 8}'",
    "degradation": "LR images for training and validation: clean (bicubic), strong (blur 1.0, noise 8, JPEG 40), "
                   "or blur=SIGMA,noise=SIGMA,jpeg=QUALITY (seeded per image)",
}
DISTILL_HELP = {
    **TRAIN_HELP,
    "teacher": "teacher: shipped name or weight file",
    "alpha": "weight of the ground-truth loss; 1 - alpha goes to the teacher's output(s)",
    "kd_mode": "output (match the teacher's output), upcycled (also its outputs on zoomed-in/zoomed-out inputs and "
               "under flips/rotations, DUKD) or feature (also its features before the tail, through a 1x1 adapter)",
    "feature_weight": "--kd-mode feature: weight of the feature hint",
}
QAT_HELP = {
    "out": "the trained model: .safetensors (a PyTorch model) or .onnx (an ONNX model); the QDQ model goes beside it "
           "as <name>.<scheme>.qdq.onnx",
    "steps": "optimizer steps (XLSR: about 0.9 s each on 2 busy CPU cores, so 500 take 7-8 minutes)",
    "batch_size": "patches per step",
    "lr_patch": "LR patch side in pixels",
    "lr": "weight learning rate",
    "range_lr": "learning rate of the log step sizes",
    "alpha": "weight of L1 to the HR image; 1 - alpha - beta goes to L1 to the frozen FP32 model's output",
    "teacher": "teacher-guided QAT: a larger FP32 model (a shipped name such as teacher, a weight file or an ONNX file)",
    "beta": "weight of L1 to the teacher's output (with --teacher)",
    "kd_mode": "output or upcycled (with --teacher; upcycled: also on zoomed-in, zoomed-out and flipped inputs)",
    "seed": "random seed of the training",
    "train_dirs": "training image folders",
    "val_dir": "validation folder ('' for none)",
    "val_every": "validate every N steps",
    "checkpoint_every": "checkpoint every N steps",
    "resume": "continue from <out>.ckpt.pt",
    "device": "auto, cpu or cuda",
    "max_seconds": "stop early after this many seconds (the learning rate decays over them)",
    "io_offset": "keep the model's own I/O (default: centred I/O, an 8-bit image exactly on the INT8 grid, where "
                 "it can be built in)",
    "equalize": "channel-equalization strength before calibration, 0..1 (sr/tune/transforms.py)",
    "keep_best": "end with the weights of the best validation (then measure the result on other images)",
}
READY_HELP = {
    "engine": "an INT8 target to check the chosen model on, as it runs it, and to judge the target loss by (the "
              "search itself measures on the reference): qnn-htp, litert, litert-ref (no float path: mixed "
              "precision is left out), openvino-int8 or tensorrt",
    "data": "ground-truth (HR) images to measure the loss on (default: the calibration images)",
    "target_db": "the largest loss against the original FP32 model accepted, dB (a loss at or below it meets it; negative: INT8 must score above FP32)",
    "budget_minutes": "time for the whole search, the bundle included",
    "out": "write the deployment bundle of the chosen model here",
    "max_float": "the most tensors mixed precision may leave in float",
    "max_images": "the most images measured on",
    "train_dirs": "QAT's training images (default: the lab's training folders, else the measurement images)",
    "qat": "stop before the QAT route",
}
EVAL_HELP = {
    "data": "folder of ground-truth (HR) images",
    "scale": "the scale (default: the model's own)",
    "engine": "torch, ort, openvino, openvino-bf16, ort-int8, openvino-int8, qnn-htp (Qualcomm's Hexagon NPU "
              "arithmetic, simulated), litert / litert-ref (the lab's .tflite on LiteRT's XNNPACK / reference "
              "kernels; the npu schemes) or tensorrt (default: the model's own FP32 runtime: torch for a weight "
              "file, ort for an ONNX model)",
    "htp_arch": "the Hexagon NPU generation --engine qnn-htp simulates: 68, 69, 73 (Snapdragon 8 Gen 2), 75, 79 "
                "or 81",
    "recommended": "calibrate as the README's findings recommend (a method, sample count and scheme; no per-tensor "
                   "fixes); not combinable with --method/--samples/--scheme",
    "threads": "ONNX Runtime threads (0 = its default)",
    "degradation": "LR images: clean (bicubic, the benchmarks'), strong (blur 1.0, noise 8, JPEG 40) or "
                   "blur=SIGMA,noise=SIGMA,jpeg=QUALITY; seeded by file name, the same in every run",
}
DIAGNOSE_HELP = {
    "data": "folder of ground-truth images to measure on",
    "top": "keep the N worst tensors",
    "max_side": "measure on a centre crop of at most this many LR pixels a side (default: whole images)",
    "engine": "an INT8 target to score the whole INT8 model on as well, as it runs it: qnn-htp (Qualcomm's HTP), "
              "litert, litert-ref, openvino-int8 or tensorrt (the ranking stays on the reference)",
}
BENCH_HELP = {
    "samples": "samples for the comparisons",
    "large_samples": "samples for the peak-memory run",
    "patch_size": "calibration patch side, LR px",
}
CALIBRATION_HELP = {
    "method": "entropy, entropy-zeros, percentile, mse, minmax or auto. auto calibrates entropy, percentile, mse and "
              "minmax from one set of statistics, scores each against FP32 on held-back calibration images and keeps "
              "the best (and says which); entropy is NVIDIA's KL search as ModelOpt publishes it (the zero bin "
              "flattened); entropy-zeros counts the spike of exact zeros after a ReLU, which pulls the threshold down",
    "samples": "calibration patches, 10..1000",
    "patch_size": "calibration patch side, LR px",
    "seed": "calibration sample seed",
    "percentile": "for --method percentile",
    "data": "calibration image folder (default: calib_data/)",
    "inputs": "downscaled (bicubic by the model's scale, as in deployment) or raw crops",
    "gain": "experiment: multiply the calibration images by this brightness gain, e.g. 0.4",
    "contrast": "experiment: contrast gain around mid grey",
}


def _field_default(field: dataclasses.Field):
    """A dataclass field's default (its factory called), or MISSING."""
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return dataclasses.MISSING


def _base_type(hint) -> type:
    """int, float, bool, list, dict, or str for anything given as text (enums, `X | str`, names)."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        kinds = [_base_type(h) for h in typing.get_args(hint) if h is not type(None)]
        return str if str in kinds or len(kinds) != 1 else kinds[0]
    origin = typing.get_origin(hint) or hint
    return origin if origin in (int, float, bool, list, dict) else str


def _shown(value) -> str:
    if isinstance(value, Enum):
        return str(value.value)
    if isinstance(value, (list, tuple)):
        return " ".join(map(str, value)) or "none"
    return "none" if value is None else str(value)


def add_config_options(parser: argparse.ArgumentParser, config_type: type, helps: dict[str, str],
                       skip: Sequence[str] = (), required: Sequence[str] = (), unset: dict[str, str] | None = None,
                       flags: dict[str, tuple[str, ...]] | None = None, dests: dict[str, str] | None = None) -> None:
    """One option per field of `config_type`, the fields in `skip` left out (see the module docstring).

    Args:
        parser: where the options go.
        config_type: the config dataclass.
        helps: {field: help text}; every field not skipped must have one.
        skip: fields the command sets another way.
        required: fields that must be given.
        unset: {field: the default to show}: the option defaults to None, so the command can tell whether the
            user set it (and the config's default, or the command's, applies when not).
        flags: {field: its flags}, where they are not `--field-name`.
        dests: {field: the attribute name in the parsed arguments}, where it is not the field's name.
    """
    hints, unset, flags, dests = typing.get_type_hints(config_type), unset or {}, flags or {}, dests or {}
    for field in dataclasses.fields(config_type):
        if field.name in skip:
            continue
        text, default, kind = helps[field.name], _field_default(field), _base_type(hints[field.name])
        dashed = field.name.replace("_", "-")
        options = {"dest": dests.get(field.name, field.name)}
        if kind is bool:
            off = default is True
            parser.add_argument(*flags.get(field.name, (f"--no-{dashed}" if off else f"--{dashed}",)),
                                action="store_false" if off else "store_true", help=text, **options)
            continue
        if kind is list:
            options.update(nargs="+", metavar="DIR")
        elif kind is dict:
            options.update(type=json.loads, metavar="JSON")
        elif kind in (int, float):
            options["type"] = kind
        if field.name in required:
            options["required"] = True
        else:
            options["default"] = None if field.name in unset else (
                default.value if isinstance(default, Enum) else default)
            shown = unset.get(field.name, _shown(default))
            text = f"{text} (default: {shown})" if shown and "(default:" not in text else text
        parser.add_argument(*flags.get(field.name, (f"--{dashed}",)), help=text.replace("%", "%%"), **options)


def config_values(args: argparse.Namespace, config_type: type, skip: Sequence[str] = (),
                  dests: dict[str, str] | None = None) -> dict:
    """{field: the parsed value} for the fields of `config_type` that `add_config_options` made options of."""
    dests = dests or {}
    return {f.name: getattr(args, dests.get(f.name, f.name)) for f in dataclasses.fields(config_type)
            if f.name not in skip and hasattr(args, dests.get(f.name, f.name))}
