"""`ModelInfo`, the one model type every stage accepts: a lab weight file or a registered ONNX model, read from its
metadata (`model_info`); its FP32 graph (a weight file's cached export), engine, record, centred-I/O copy, a frozen
torch module of it, and how a tuned copy is saved (`save_tuned`).
"""
from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from safetensors import safe_open
from torch import nn

from . import export, networks, weights
from .centring import IO_OFFSET, CentringImpossible, centre_user_io, user_io
from .onnxtorch import OnnxModule
from ..store import (Memo, cache_root, code_digest, file_identity, file_sha256, library_versions, locked, short_hash,
                     write_atomic)
from .contract import Contract
from .networks import with_io_offset
from .usermodel import lookup, register_graph
from .weights import load_model, read_metadata, resolve_weights, save_weights
from .wrapper import STANDARD_KEY, set_metadata

log = logging.getLogger(__name__)

RECORD_KEY = "qat"  # a tuned model's record: weight-file metadata "qat", or an ONNX model's metadata_props "sr.qat"


@dataclass(frozen=True)
class ModelInfo:
    """A model every stage accepts, read from its metadata only (no weights loaded): a lab weight file (its
    architecture's config), or a user's ONNX model registered with `sr.model.usermodel` (its standard graph stands for
    the weights; `contract` says what it takes and returns). The stages ask it what they need, never which kind
    it is: where its FP32 graph is, which engine runs it, how a tuned copy is saved (`save_tuned`)."""

    name: str  # the shipped name, the file's stem, or a registered model's "onnx:<key>"
    path: Path
    arch: str
    scale: int
    final_activation: str
    parameters: int
    contract: object | None = None  # sr.model.contract.Contract of a user's model
    input_range: tuple[str, float] | None = None  # (tensor, high) of a user's model's fixed input range [0, high]

    @property
    def uploaded(self) -> bool:
        """A user's model (an ONNX file they brought), not one of the lab's weight files."""
        return self.contract is not None

    @property
    def tuned_suffix(self) -> str:
        """The file type a tuned copy is saved as."""
        return ".onnx" if self.uploaded else ".safetensors"

    @property
    def fp32_engine(self) -> str:
        """The runtime of the FP32 model (an `sr.run.runtime.EngineKind` value): PyTorch for a weight file, ONNX
        Runtime for a user's graph."""
        return "ort" if self.uploaded else "torch"

    def io_offset(self) -> float:
        """The centred-I/O offset built into the model (0 for none, and for a user's graph)."""
        return 0.0 if self.uploaded else float(read_metadata(self.path)["config"].get("io_offset", 0.0))

    def fp32_onnx(self, run: export.Runner, cache_dir: Path | None = None) -> Path:
        """The FP32 ONNX model: a user's standard graph as it is; a weight file's export (`sr.model.export`), made once
        and cached by the file's hash, the export code and the library versions.

        Args:
            run: runs a graph once on ONNX Runtime, to check an export against torch (`sr.run.sessions.run_once`).
            cache_dir: the cache folder (default: `sr.store.cache_root()`).
        """
        if self.uploaded:
            return self.path
        parts = {"weights": file_sha256(self.path),
                 "code": code_digest(sys.modules[__name__], networks, weights, export),
                 "versions": library_versions("torch", "onnx", "onnxruntime")}
        path = cache_root(cache_dir) / "onnx" / f"{self.path.stem}-{short_hash(json.dumps(parts, sort_keys=True))}.onnx"
        if _checks(path):
            return path
        with locked(path):  # concurrent callers wait for one export instead of racing the exporter
            if not _checks(path):
                export.export_onnx(load_model(self.path), path, run)
        return path

    def frozen_module(self, device: torch.device | str = "cpu") -> nn.Module:
        """The FP32 model as a frozen torch module on `device` (a teacher, a reference): a weight file's network,
        or a user's standard graph run by `sr.model.onnxtorch` (both take and return [0, 1] RGB NCHW images).

        Raises:
            ValueError: a user's graph with ops the interpreter does not cover.
        """
        module = OnnxModule(onnx.load(str(self.path))) if self.uploaded else load_model(self.path)
        return module.to(device).eval().requires_grad_(False)  # (an OnnxModule's constants move with it)

    @property
    def input_top(self) -> float:
        """The top of the input's value range: 1, or 255 for a user's model that takes 0..255."""
        return self.input_range[1] if self.input_range else 1.0

    def centring_reason(self) -> str | None:
        """None when centred I/O can be built into the model (the lab's architectures; a user's graph whose input
        reaches only convolutions and whose output comes from one), else why not, in words."""
        if not self.uploaded:
            return None
        try:
            self._centred_user_graph()
        except CentringImpossible as error:
            return str(error)
        return None

    def _centred_user_graph(self) -> tuple[onnx.ModelProto, list[str]]:
        """`sr.model.centring.centre_user_io` on a user's standard graph (CentringImpossible says why it cannot be)."""
        graph = onnx.load(str(self.path))
        return centre_user_io(graph, user_io(graph), self.input_top)

    def centred_copy(self, work: Path) -> tuple[str | None, list[str] | None]:
        """The model with centred I/O built in, saved as `<work>.centred<tuned_suffix>`: a lab architecture through
        `with_io_offset`, a user's graph through `sr.model.centring.centre_user_io`.

        Returns:
            (the copy's name, or None when the model is centred already or cannot be; the tensors on the centred
            grid: None for the model's own input and output, [] when nothing was centred).
        """
        if self.uploaded:
            try:
                centred_graph, centred = self._centred_user_graph()
            except CentringImpossible as error:
                log.info("centred I/O left out for %s: %s", self.name, error)
                return None, []
            return save_tuned(self.name, centred_graph, {}, Path(f"{work}.centred.onnx")), centred
        base = load_model(self.path)
        if base.config.io_offset:
            return None, None
        out = str(Path(f"{work}.centred.safetensors"))
        kept = {k: v for k, v in read_metadata(self.path).items() if k not in ("arch", "config", RECORD_KEY)}
        save_weights(with_io_offset(base, IO_OFFSET), out, extra=kept)
        return out, None

    def record(self) -> TuningRecord | None:
        """What fine-tuning or refining recorded in the model's file (`sr.tune.qat`, `sr.tune.ptq`), or None (also
        for a record that is not one)."""
        if self.uploaded:
            props = {p.key: p.value for p in onnx.load(str(self.path), load_external_data=False).metadata_props}
            record = json.loads(props[f"sr.{RECORD_KEY}"]) if f"sr.{RECORD_KEY}" in props else None
        else:
            record = read_metadata(self.path).get(RECORD_KEY)
        try:
            return TuningRecord.from_json(record) if isinstance(record, dict) else None
        except (KeyError, TypeError, ValueError):
            return None


@dataclass(frozen=True)
class TuningRecord:
    """What QAT or a PTQ refinement recorded in the model it wrote: how it was tuned (`kind`), for which scheme,
    the ranges it learned, the model it started from, and the rest of the run (`details`: the base's hash, the
    configuration, the history, the machine)."""

    kind: str  # "qat" or "ptq"
    scheme: str
    ranges: dict[str, tuple[float, float]]
    base: str | None
    details: dict

    def to_json(self) -> dict:
        """The form written into the model's metadata."""
        return {"kind": self.kind, "scheme": self.scheme, "ranges": {t: list(r) for t, r in self.ranges.items()},
                "base": self.base, **self.details}

    @classmethod
    def from_json(cls, record: dict) -> "TuningRecord":
        """The record from its metadata form (a QAT record of older files has no `kind`)."""
        own = ("kind", "scheme", "ranges", "base")
        return cls(str(record.get("kind", "qat")), str(record["scheme"]),
                   {t: (float(low), float(high)) for t, (low, high) in record["ranges"].items()},
                   record.get("base"), {k: v for k, v in record.items() if k not in own})


def _checks(path: Path) -> bool:
    try:
        onnx.checker.check_model(str(path))
        return True
    except Exception:  # absent, partial or corrupt: export it (again)
        return False


def is_uploaded(name: str | os.PathLike | None) -> bool:
    """True for a registered user's model (cheap: no file is read for a weight file)."""
    return lookup(str(name or "")) is not None


def with_values(model: onnx.ModelProto, values: dict[str, np.ndarray]) -> onnx.ModelProto:
    """A copy of an ONNX model with some initializers' values replaced (by name)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for initializer in copy.graph.initializer:
        if initializer.name in values:
            initializer.CopyFrom(onnx.numpy_helper.from_array(values[initializer.name], initializer.name))
    return copy


def save_tuned(base: str | os.PathLike, graph: onnx.ModelProto, changed: dict[str, np.ndarray], out: str | os.PathLike,
               record: dict | None = None) -> str:
    """A copy of `base` with some weights changed, saved the way `base` is, and the name to use it by.

    Args:
        base: the model that was tuned.
        graph: its FP32 ONNX graph (a user's standard graph keeps the tuned values itself).
        changed: {initializer name: new value}; for a weight file the initializer names are its state-dict names.
        out: the file to write (`tuned_suffix`).
        record: what the tuning records (under RECORD_KEY).

    Returns:
        a weight file's path, or the registered name of a user's tuned graph (its contract kept).

    Raises:
        ValueError: a changed tensor that the weight file does not have.
    """
    info, out = model_info(base), Path(out)
    if info.uploaded:
        copy = with_values(graph, {name: np.asarray(value) for name, value in changed.items()})
        set_metadata(copy, STANDARD_KEY, json.dumps(Contract(scale=info.contract.scale,
                                                             fixed_size=info.contract.fixed_size).to_dict()))
        if record is not None:
            set_metadata(copy, f"sr.{RECORD_KEY}", json.dumps(record))
        write_atomic(copy.SerializeToString(), out)
        return register_graph(out).name
    model = load_model(base)
    state = model.state_dict()
    missing = set(changed) - set(state)
    if missing:
        raise ValueError(f"tuned tensors {sorted(missing)} are not in {info.name}'s weights")
    state.update({name: torch.as_tensor(np.asarray(value)).to(state[name].dtype) for name, value in changed.items()})
    model.load_state_dict(state)
    metadata = {k: v for k, v in read_metadata(base).items() if k not in ("arch", "config", RECORD_KEY)}
    save_weights(model, out, extra={**metadata, **({RECORD_KEY: record} if record is not None else {})})
    return str(out)


_ONNX_FILES = Memo(64)  # (path, size, mtime) -> the registered model of an .onnx file given by its path


def _onnx_file(name_or_path: str | os.PathLike):
    """The registered model of an ONNX file given by its path (a tuned copy a refinement or QAT wrote, registered
    on first use, or a user's file `sr.run.register.register_onnx` registered); None for anything else."""
    path = Path(name_or_path)
    if path.suffix.lower() != ".onnx" or not path.is_file():
        return None
    key = file_identity(path)
    found = _ONNX_FILES.peek(key)
    if found is None or not found.standard_onnx.is_file():  # the cache's cap may have evicted it since
        found = register_graph(path)
        _ONNX_FILES.put(key, found)
    return found


def model_info(name_or_path: str | os.PathLike) -> ModelInfo:
    """Architecture, scale, final activation and parameter count of a weight file.

    Args:
        name_or_path: a shipped model name, a weight file, a registered ONNX model, or an ONNX file's path (a
            tuned copy the lab wrote, registered on first use, or a user's file registered before).

    Returns:
        the ModelInfo.

    Raises:
        FileNotFoundError: no such model.
        ValueError: not a weight file written by `save_weights`.
    """
    user = lookup(str(name_or_path)) or _onnx_file(name_or_path)
    if user is not None:  # a registered ONNX model (sr.model.usermodel): its standard graph stands for the weights
        return ModelInfo(user.name, user.standard_onnx, "onnx", user.contract.scale, "unknown", user.parameters,
                         user.contract, user.input_range)
    path = resolve_weights(name_or_path)
    metadata = read_metadata(path)
    if "arch" not in metadata or "config" not in metadata:
        raise ValueError(f"{path.name} has no 'arch'/'config' metadata: it was not written by sr.save_weights")
    with safe_open(str(path), framework="pt") as handle:
        parameters = sum(int(np.prod(handle.get_slice(key).get_shape())) for key in handle.keys())
    config = metadata["config"]
    return ModelInfo(path.stem, path, metadata["arch"], int(config["scale"]),
                     str(config.get("final_activation", "relu")), parameters)
