"""A super-resolution model the user brings as an ONNX file: checked, its contract detected, and turned into the
lab's standard graph, so every stage (calibrate, quantize, engines, diagnose, eval) takes it like a shipped one.

The lab's standard graph takes `input` float32 1x3xHxW RGB in [0, 1] (the LR image) and returns `output`
1x3x(sH)x(sW) RGB. A user's model may differ in its contract, which is detected from the graph and a probe run
(and can be overridden):

- layout NCHW or NHWC; 1 channel (Y of BT.601 YCbCr) or 3 (RGB); values in [0, 1] or [0, 255];
- LR in, HR out, or pre-upsampled (VDSR-style: bicubic-upscaled input, output of the same size);
- a dynamic or a fixed input size (the engines tile to the fixed size);
- the scale (the output/input size ratio on the probe; for a pre-upsampled model it cannot be seen: given or 3).

The standard graph wraps the user's graph with what bridges the two: a cubic Resize for a pre-upsampled model,
RGB -> Y before and Y + bicubic Cb/Cr -> RGB after for a Y-only model (what the SR literature does), a x255 /
/255 pair for [0, 255] models, Transposes for NHWC. Registered models get the name `onnx:<digest>`, which
`sr.model.models.model_info` and `sr.run.quantize.fp32_onnx_path` resolve.

This module registers a model (`register_graph`: the standard graph cached by file hash and overrides, the room
uploads may take) and finds it again (`lookup`); the steps are modules of their own: `checks` (an untrusted
file), `contract` and `probe` (detecting the contract), `wrapper` (the standard graph). A user's own file is run
to learn its contract, and only the run layer runs models: `sr.run.register.register_onnx` is the public call.
"""
from __future__ import annotations

import importlib
import json
import os
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnx

from ..cost import CostLimits, Uncountable, check_cost, graph_cost
from ..store import (Memo, cache_cap_bytes, cache_root, code_digest, disk_bytes, evict, file_sha256, locked,
                    short_hash, touch, write_atomic)
from . import checks, contract as contract_module, probe, wrapper
from .checks import UserModelError, check_file
from .contract import Contract, Overrides, Runner, detect_contract
from .wrapper import known_input, standard_contract, standard_graph

PREFIX = "onnx:"


@dataclass(frozen=True)
class UserModel:
    """A registered model: its name in the lab, the user's file, the contract, and the standard graph."""

    name: str
    source: Path
    contract: Contract
    standard_onnx: Path
    float_ops: tuple[str, ...]  # op types no INT8 scheme quantizes (they run in float in every INT8 model)
    parameters: int
    macs_per_pixel: float = 0.0  # multiply-accumulates per LR pixel (`macs_per_pixel`): the cost of running it
    input_range: tuple[str, float] | None = None  # (the user's input tensor, the top of its range): `known_input`


def macs_per_pixel(model: onnx.ModelProto) -> float:
    """Multiply-accumulates per input pixel of a standard graph (or any NCHW image model), counted by
    `sr.cost.graph_cost` before anything runs; 0.0 for a graph whose cost cannot be counted (a model registered
    without cost limits, from the CLI)."""
    try:
        return graph_cost(model).macs_per_pixel
    except Uncountable:
        return 0.0


# The registry.

# the models this process has registered or read back: bounded and thread-safe (a process-wide LRU); a model
# evicted here is read back from its cache folder, the same UserModel as registered (its registration.json)
_REGISTRY = Memo(256)


# what runs a user's file to learn its contract when no runner is handed in (a file given by its path to
# `sr.model.models.model_info`, a teacher or a model named by path): the run layer sets it when it is imported
# (`sr.run.register`; `register_graph` imports that module by name when nothing has yet), so the model layer
# itself makes no session
_PROBE: list[Callable[[onnx.ModelProto], Runner]] = []


def set_probe(runner: Callable[[onnx.ModelProto], Runner]) -> None:
    """Make `runner` what probes a user's file registered without a runner of its own (the run layer's)."""
    _PROBE[:] = [runner]


def register_graph(path: str | os.PathLike, overrides: Overrides = Overrides(),
                   cache_dir: str | os.PathLike | None = None, limits: CostLimits | None = None,
                   runner: Callable[[onnx.ModelProto], Runner] | None = None) -> UserModel:
    """Check an ONNX file, learn its contract, write its standard graph (cached by file hash and overrides) and
    register it. A user's own file is run on probe images to learn its contract (`runner`: what runs it, from the
    run layer; `sr.run.register.register_onnx` hands it, and the one `set_probe` set serves a file named by its
    path); a standard graph the lab wrote (a tuned copy) says its contract itself and needs none.

    Returns:
        the UserModel; `model.name` works wherever a shipped model name does.

    Args:
        limits: refuse a graph over these costs, or whose cost cannot be counted, before it runs (a server's
            policy; none by default).
        runner: makes the probe's `Runner` for a checked graph.

    Raises:
        FileNotFoundError, UserModelError: see `check_file` and `detect_contract`; a user's file without a
            `runner` when the run layer has set none (`set_probe`), in words.
        sr.cost.Uncountable, sr.cost.TooCostly: `limits` given, and the graph is uncountable or over them.
    """
    path = Path(path)
    model = check_file(path)
    if limits is not None:
        check_cost(model, limits)
    key = short_hash(json.dumps({"file": file_sha256(path), "overrides": asdict(overrides),
                                 "code": code_digest(sys.modules[__name__], checks, contract_module, probe, wrapper)},
                                sort_keys=True), 12)  # the code that checks it and makes its contract and graph
    folder = cache_root(cache_dir) / "user" / key
    with locked(folder):
        saved = folder / "contract.json"
        if saved.is_file() and (folder / "standard.onnx").is_file():
            contract = Contract.from_dict(json.loads(saved.read_text()))
        else:
            contract = standard_contract(model)  # a standard graph the lab wrote (QAT): taken as it is
            standard = model if contract is not None else None
            if standard is None:
                if runner is None and not _PROBE:  # the run layer not imported yet: its probe, by name
                    importlib.import_module(".run.register", __package__.rpartition(".")[0])
                runner = runner or next(iter(_PROBE), None)
                if runner is None:
                    raise UserModelError(f"{path.name} is a model the lab has not registered: register it first "
                                         "(sr.register_onnx, or --onnx), which runs it to learn its contract")
                contract = detect_contract(model, runner(model), overrides)
                standard = standard_graph(model, contract)
            write_atomic(standard.SerializeToString(), folder / "standard.onnx")
            write_atomic(json.dumps(contract.to_dict()).encode(), saved)
        touch(folder)  # used now: the cache's LRU eviction counts uploaded models too
    _make_room(folder, path.name)
    from ..quant.quantspec import ALL_INT8_OPS, LITERT_OPS, TENSORRT_INPUT_OPS

    covered = {*ALL_INT8_OPS, *LITERT_OPS, *TENSORRT_INPUT_OPS, "Constant", "Identity"}
    ops = sorted({node.op_type for node in model.graph.node} - covered)
    parameters = sum(int(np.prod(init.dims)) for init in model.graph.initializer)
    record = folder / "registration.json"  # what lookup needs to give the same model in every process
    if not record.is_file():
        write_atomic(json.dumps({"float_ops": ops, "parameters": parameters}).encode(), record)
    standard = onnx.load(str(folder / "standard.onnx"))
    registered = UserModel(f"{PREFIX}{key}", path, contract, folder / "standard.onnx", tuple(ops), parameters,
                           macs_per_pixel(standard), known_input(standard))
    _REGISTRY.put(registered.name, registered)
    return registered


HOLD_SECONDS = 3600.0  # an uploaded model is held this long after its last use against other uploads
UPLOAD_SHARE = 0.5  # uploaded models may fill at most this share of the cache's cap


def _make_room(folder: Path, name: str) -> None:
    """Keep the uploaded models within their share of the cache after registering `folder`: the least recently
    used models unused for HOLD_SECONDS go first (the lab's own entries are never touched by an upload, nor is a
    model a visitor used within the hour); when that is not enough, this upload is the one refused, in words."""
    share = cache_cap_bytes() * UPLOAD_SHARE
    evict(folder.parent, share, keep=folder, kinds=[folder.parent.name], hold_seconds=HOLD_SECONDS)
    if disk_bytes(folder.parent) > share:
        with locked(folder):
            shutil.rmtree(folder, ignore_errors=True)
        raise UserModelError(f"{name}: the server's room for uploaded models is full of models other visitors are "
                             "using (each is held for an hour after its last use); try again later, or run the lab "
                             "locally")


def lookup(name: str, cache_dir: str | os.PathLike | None = None) -> UserModel | None:
    """The registered model called `name` (also one registered by another process, from the cache), or None."""
    if not str(name).startswith(PREFIX):
        return None
    known = _REGISTRY.peek(name)
    if known is not None and known.standard_onnx.is_file():  # the cache's total cap may have evicted it since
        touch(known.standard_onnx.parent)  # used now: held for another HOLD_SECONDS
        return known
    folder = cache_root(cache_dir) / "user" / str(name)[len(PREFIX):]
    if not (folder / "contract.json").is_file():
        return None
    contract = Contract.from_dict(json.loads((folder / "contract.json").read_text()))
    standard = onnx.load(str(folder / "standard.onnx"))
    try:  # as registered: the user's own graph's parameters and the ops no scheme covers
        record = json.loads((folder / "registration.json").read_text())
        ops, parameters = tuple(record["float_ops"]), int(record["parameters"])
    except (OSError, ValueError, KeyError):  # an entry older than the record: counted on the standard graph
        ops, parameters = (), sum(int(np.prod(init.dims)) for init in standard.graph.initializer)
    found = UserModel(str(name), folder / "standard.onnx", contract, folder / "standard.onnx", ops, parameters,
                      macs_per_pixel(standard), known_input(standard))
    _REGISTRY.put(found.name, found)  # model_info asks on every call: read the file once per process
    return found
