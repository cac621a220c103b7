"""The SR networks (XLSR and the teacher), the name -> constructor table, and self-describing weight files.

Tensors are float32 NCHW RGB in [0, 1]. A weight file is a safetensors file whose metadata holds the
architecture name and its config (`{"arch": "xlsr", "config": "{...json...}"}`), so `load_model(path)` needs
nothing but the file.
"""
from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import asdict, dataclass
from enum import Enum
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from . import export
from .centring import IO_OFFSET, CentringImpossible, centre_user_io, user_io
from ..choices import Choice
from .onnxtorch import OnnxModule
from ..store import (PROJECT_ROOT, Memo, atomic_path, cache_root, code_digest, file_identity, file_sha256,
                     library_versions, locked, short_hash, write_atomic)
from .contract import Contract
from .usermodel import lookup, register_onnx
from .wrapper import STANDARD_KEY, set_metadata

log = logging.getLogger(__name__)

WEIGHTS_DIR = PROJECT_ROOT / "weights"
SCALES = (2, 3, 4)


class FinalActivation(Choice, noun="final activation"):
    """The activation after depth-to-space. `clipped_relu` is Ayazoglu's fix (CVPRW 2021): clamp to [0, 1].

    `FinalActivation.parse(value)` (from `Choice`, i.e. `sr.choices.parse_choice(cls, value, "final activation")`)
    accepts a member or its value and otherwise raises ValueError("unknown final activation 'x'; choose one of:
    relu, clipped_relu, linear").
    """

    RELU = "relu"
    CLIPPED_RELU = "clipped_relu"
    LINEAR = "linear"


def _final_activation(kind: FinalActivation, offset: float = 0.0) -> nn.Module:
    """The final activation, for outputs shifted down by `offset` (centred I/O)."""
    if kind is FinalActivation.RELU:
        return nn.ReLU() if not offset else _Floor(-offset)
    if kind is FinalActivation.CLIPPED_RELU:
        return nn.Hardtanh(-offset, 1.0 - offset)  # exported as Clip(0, 1), or Clip(-o, 1 - o)
    return nn.Identity()


class _Floor(nn.Module):
    """max(x, floor): a ReLU for outputs shifted down by -floor (exported as Clip with a min only)."""

    def __init__(self, floor: float):
        super().__init__()
        self.floor = floor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.clamp(x, min=self.floor)


def _pad_input_explicitly(model: nn.Module) -> None:
    """With centred I/O the input convolutions pad with -offset (a black pixel), done in `forward` by F.pad."""
    if model.config.io_offset:
        for name in model.INPUT_CONVS:
            getattr(model, name).padding = (0, 0)


def with_io_offset(model: nn.Module, offset: float = IO_OFFSET) -> nn.Module:
    """The same network with centred I/O: it subtracts `offset` from its input, its layers work on centred values,
    and it adds `offset` to its output. The convolutions that read the input absorb the shift in their biases
    (b + offset * sum(W)), they pad with -offset (what a black pixel becomes) instead of 0, and the last
    convolution gives the shift back (b - offset): the same function, to float rounding.

    Why: symmetric INT8 (TensorRT) spends half its levels on negative values a [0, 1] image never has, so the
    input and output are quantized at step 1/127, twice the 8-bit grid. Centred, with a fixed range of
    +-127/255, every 8-bit level is an INT8 value and the input and output quantization lose nothing.

    Args:
        model: an XLSR or Teacher without an offset.
        offset: the shift.

    Returns:
        a new model (CPU, eval mode) whose config records `io_offset`.
    """
    spec = model_spec(model)
    if spec["config"].get("io_offset"):
        raise ValueError("the model already has centred I/O")
    shifted = build_model(spec["arch"], **{**spec["config"], "io_offset": offset})
    shifted.load_state_dict(model.state_dict())
    with torch.no_grad():
        for name in shifted.INPUT_CONVS:
            conv = getattr(shifted, name)
            conv.bias += offset * conv.weight.sum(dim=(1, 2, 3))
        shifted.tail.bias -= offset
    return shifted.eval()


@dataclass
class XLSRConfig:
    """XLSR's hyper-parameters; the defaults are the paper's x3 network.

    Raises:
        ValueError: (on construction) a scale other than 2, 3 or 4, or an unknown final activation.
    """

    scale: int = 3
    final_activation: FinalActivation = FinalActivation.RELU
    channels: int = 32
    skip_channels: int = 16
    groups: int = 4  # the GBlocks' 3x3 convolutions are grouped: 4 groups of 8 channels, as in the paper
    num_gblocks: int = 3

    # centred I/O (`with_io_offset`): the layers see x - io_offset and produce y - io_offset, added back at the end
    io_offset: float = 0.0

    def __post_init__(self):
        _check_scale(self.scale)
        self.final_activation = FinalActivation.parse(self.final_activation)


@dataclass
class TeacherConfig:
    """The teacher's hyper-parameters.

    Raises:
        ValueError: (on construction) a scale other than 2, 3 or 4, or an unknown final activation.
    """

    scale: int = 3
    final_activation: FinalActivation = FinalActivation.RELU  # the large "original" model keeps its ReLU
    channels: int = 64
    num_blocks: int = 12  # ~0.9M parameters: clearly stronger than XLSR, still trainable on 2 CPU cores

    # centred I/O (`with_io_offset`): the layers see x - io_offset and produce y - io_offset, added back at the end
    io_offset: float = 0.0

    def __post_init__(self):
        _check_scale(self.scale)
        self.final_activation = FinalActivation.parse(self.final_activation)


def _check_scale(scale: int) -> None:
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale}")


class GBlock(nn.Module):
    """3x3 grouped convolution + ReLU, then a 1x1 convolution that mixes the groups."""

    def __init__(self, channels: int, groups: int):
        """Build the layers.

        Args:
            channels: input and output channels.
            groups: groups of the 3x3 convolution (must divide `channels`).
        """
        super().__init__()
        self.grouped = nn.Conv2d(channels, channels, 3, padding=1, groups=groups)
        self.relu = nn.ReLU()
        self.mix = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Run the module.

        Args:
            x: float32 NxCxHxW features.

        Returns:
            NxCxHxW features.
        """
        return self.mix(self.relu(self.grouped(x)))


class XLSR(nn.Module):
    """XLSR, Ayazoglu, "Extremely Lightweight Quantization Robust Real-Time Single-Image Super Resolution for
    Mobile Devices", CVPRW 2021: about 22k parameters at x3.

    input -> conv3x3(3->32) -> ReLU -> conv1x1 -> 3 GBlocks --.
      `---> conv3x3(3->16) (skip branch) ------------------- concat(48) -> conv1x1(48->32) -> ReLU
          -> conv3x3(32->3*s*s) -> depth-to-space -> final activation
    """

    INPUT_CONVS = ("head", "skip")  # the convolutions that read the image (`with_io_offset`)

    def __init__(self, config: XLSRConfig | None = None):
        """Build the layers.

        Args:
            config: the hyper-parameters; None for the paper's x3 network.
        """
        super().__init__()
        self.config = config = config or XLSRConfig()
        c = config.channels
        self.head = nn.Conv2d(3, c, 3, padding=1)
        self.head_relu = nn.ReLU()
        self.head_mix = nn.Conv2d(c, c, 1)
        self.gblocks = nn.Sequential(*[GBlock(c, config.groups) for _ in range(config.num_gblocks)])
        self.skip = nn.Conv2d(3, config.skip_channels, 3, padding=1)
        self.fuse = nn.Conv2d(c + config.skip_channels, c, 1)
        self.fuse_relu = nn.ReLU()
        self.tail = nn.Conv2d(c, 3 * config.scale**2, 3, padding=1)
        self.depth_to_space = nn.PixelShuffle(config.scale)
        self.output = _final_activation(config.final_activation, config.io_offset)
        _pad_input_explicitly(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Run the module.

        Args:
            x: float32 Nx3xHxW RGB in [0, 1].

        Returns:
            Nx3x(sH)x(sW) RGB, s = config.scale; in [0, 1] only with the Clipped ReLU output.
        """
        offset = self.config.io_offset
        if offset:  # the padding the input convolutions no longer do: the value that stands for a black pixel
            x = F.pad(x - offset, (1, 1, 1, 1), value=-offset)
        features = self.gblocks(self.head_mix(self.head_relu(self.head(x))))
        fused = self.fuse_relu(self.fuse(torch.cat([features, self.skip(x)], dim=1)))
        y = self.output(self.depth_to_space(self.tail(fused)))
        return y + offset if offset else y


class ResBlock(nn.Module):
    """conv3x3 -> ReLU -> conv3x3 plus the identity (EDSR's block, without batch norm or residual scaling)."""

    def __init__(self, channels: int):
        """Build the layers.

        Args:
            channels: input and output channels.
        """
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(), nn.Conv2d(channels, channels, 3, padding=1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Run the module.

        Args:
            x: float32 NxCxHxW features.

        Returns:
            NxCxHxW features.
        """
        return x + self.body(x)


class Teacher(nn.Module):
    """An EDSR-baseline-like residual network (Lim et al., CVPRW 2017) with an ESPCN-style sub-pixel tail and
    a ReLU output: the big "original" model, and the teacher for knowledge distillation."""

    INPUT_CONVS = ("head",)

    def __init__(self, config: TeacherConfig | None = None):
        """Build the layers.

        Args:
            config: the hyper-parameters; None for the shipped x3 teacher's.
        """
        super().__init__()
        self.config = config = config or TeacherConfig()
        c = config.channels
        self.head = nn.Conv2d(3, c, 3, padding=1)
        self.body = nn.Sequential(*[ResBlock(c) for _ in range(config.num_blocks)], nn.Conv2d(c, c, 3, padding=1))
        self.tail = nn.Conv2d(c, 3 * config.scale**2, 3, padding=1)
        self.depth_to_space = nn.PixelShuffle(config.scale)
        self.output = _final_activation(config.final_activation, config.io_offset)
        _pad_input_explicitly(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Run the module.

        Args:
            x: float32 Nx3xHxW RGB in [0, 1].

        Returns:
            Nx3x(sH)x(sW) RGB, s = config.scale, non-negative (ReLU output).
        """
        offset = self.config.io_offset
        features = self.head(F.pad(x - offset, (1, 1, 1, 1), value=-offset) if offset else x)
        y = self.output(self.depth_to_space(self.tail(features + self.body(features))))
        return y + offset if offset else y


MODELS: dict[str, tuple[type[nn.Module], type]] = {
    "xlsr": (XLSR, XLSRConfig),
    "teacher": (Teacher, TeacherConfig),
}


def build_model(arch: str, **config) -> nn.Module:
    """A fresh model: `build_model("xlsr", scale=3, final_activation="clipped_relu")`.

    Args:
        arch: a key of MODELS ("xlsr", "teacher").
        **config: fields of the architecture's config dataclass.

    Returns:
        the model, randomly initialised (torch's global RNG), in training mode.

    Raises:
        ValueError: unknown architecture, unknown config field, or a bad config value.
    """
    if arch not in MODELS:
        raise ValueError(f"unknown architecture {arch!r}; choose one of: {', '.join(MODELS)}")
    model_class, config_class = MODELS[arch]
    try:
        return model_class(config_class(**config))
    except TypeError as error:
        raise ValueError(f"bad config for {arch}: {error}") from None


def model_spec(model: nn.Module) -> dict:
    """What a weight file records about a model's architecture.

    Args:
        model: a model built here (an instance of a MODELS class).

    Returns:
        {"arch": name, "config": {field: value}}, enums as their values.
    """
    arch = next(name for name, (cls, _) in MODELS.items() if isinstance(model, cls))
    config = {k: (v.value if isinstance(v, Enum) else v) for k, v in asdict(model.config).items()}
    return {"arch": arch, "config": config}


def count_parameters(model: nn.Module) -> int:
    """The number of scalar parameters of `model`.

    Args:
        model: any module.

    Returns:
        the count.
    """
    return sum(p.numel() for p in model.parameters())


def save_weights(model: nn.Module, path: str | os.PathLike, extra: dict | None = None) -> Path:
    """Write the model's weights and spec to a safetensors file, atomically (`sr.store.atomic_path`).

    Args:
        model: a model built here (`build_model`), on any device.
        path: the weight file to write; its folder is created.
        extra: more metadata (training config, steps, validation PSNR), each value stored as a JSON string.

    Returns:
        `path`.
    """
    path = Path(path)
    spec = model_spec(model)
    metadata = {"arch": spec["arch"], "config": json.dumps(spec["config"])}
    metadata.update({k: json.dumps(v) for k, v in (extra or {}).items()})
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(path) as temp:
        save_file(tensors, str(temp), metadata=metadata)
    return path


def resolve_weights(name_or_path: str | os.PathLike) -> Path:
    """The weight file of a shipped model name (`xlsr-clip`) or a path.

    Args:
        name_or_path: a file (absolute, or relative to the working directory or to the project), or the stem
            of a file in `weights/`.

    Returns:
        the file's path.

    Raises:
        FileNotFoundError: neither a file nor a shipped name; the message lists the shipped names.
    """
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = WEIGHTS_DIR / f"{name_or_path}.safetensors"
    if shipped.is_file():
        return shipped
    in_project = WEIGHTS_DIR.parent / path  # e.g. runs/<name>.safetensors, trained in the app
    if not path.is_absolute() and in_project.is_file():
        return in_project
    names = ", ".join(shipped_models()) or "(none)"
    raise FileNotFoundError(f"no model {str(name_or_path)!r}: not a file, and not a shipped model ({names})")


def shipped_models() -> list[str]:
    """The shipped model names.

    Returns:
        the stems of the `.safetensors` files in `weights/`, sorted.
    """
    return sorted(p.stem for p in WEIGHTS_DIR.glob("*.safetensors"))


def read_metadata(name_or_path) -> dict:
    """The metadata of a weight file, JSON values decoded.

    Args:
        name_or_path: a shipped model name or a weight file.

    Returns:
        {key: decoded value}; a value that is not JSON stays a string.

    Raises:
        FileNotFoundError: no such model.
        ValueError: the file is not a safetensors file.
    """
    path = resolve_weights(name_or_path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            raw = handle.metadata() or {}
    except Exception as error:  # safetensors raises its own error types for non-safetensors files
        raise ValueError(f"{path.name} is not a safetensors weight file ({error})") from None
    decoded = {}
    for key, value in raw.items():
        try:
            decoded[key] = json.loads(value)
        except json.JSONDecodeError:
            decoded[key] = value
    return decoded


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

    def fp32_onnx(self, cache_dir: Path | None = None) -> Path:
        """The FP32 ONNX model: a user's standard graph as it is; a weight file's export (`sr.model.export`), made once
        and cached by the file's hash, the export code and the library versions.

        Args:
            cache_dir: the cache folder (default: `sr.store.cache_root()`).
        """
        if self.uploaded:
            return self.path
        parts = {"weights": file_sha256(self.path), "code": code_digest(sys.modules[__name__], export),
                 "versions": library_versions("torch", "onnx", "onnxruntime")}
        path = cache_root(cache_dir) / "onnx" / f"{self.path.stem}-{short_hash(json.dumps(parts, sort_keys=True))}.onnx"
        if _checks(path):
            return path
        with locked(path):  # concurrent callers wait for one export instead of racing the exporter
            if not _checks(path):
                export.export_onnx(load_model(self.path), path)
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

    def record(self) -> dict | None:
        """What fine-tuning or refining recorded in the model's file (`sr.tune.qat`, `sr.tune.ptq`), or None."""
        if self.uploaded:
            props = {p.key: p.value for p in onnx.load(str(self.path), load_external_data=False).metadata_props}
            record = json.loads(props[f"sr.{RECORD_KEY}"]) if f"sr.{RECORD_KEY}" in props else None
        else:
            record = read_metadata(self.path).get(RECORD_KEY)
        return record if isinstance(record, dict) else None


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
        return register_onnx(out).name
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
    """The registered model of an ONNX file given by its path (a tuned copy a refinement or QAT wrote, or a
    user's file), registered on first use; None for anything else."""
    path = Path(name_or_path)
    if path.suffix.lower() != ".onnx" or not path.is_file():
        return None
    key = file_identity(path)
    found = _ONNX_FILES.peek(key)
    if found is None or not found.standard_onnx.is_file():  # the cache's cap may have evicted it since
        found = register_onnx(path)
        _ONNX_FILES.put(key, found)
    return found


def model_info(name_or_path: str | os.PathLike) -> ModelInfo:
    """Architecture, scale, final activation and parameter count of a weight file.

    Args:
        name_or_path: a shipped model name, a weight file, a registered ONNX model, or an ONNX file's path
            (registered on first use).

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


def load_model(name_or_path: str | os.PathLike) -> nn.Module:
    """Build the model described by a weight file and load its weights (no pickle is executed).

    Args:
        name_or_path: a shipped model name or a weight file.

    Returns:
        the model on the CPU, in eval mode.

    Raises:
        FileNotFoundError: no such model.
        ValueError: not a safetensors file, or one without our architecture metadata, or weights that do
            not fit the recorded architecture.
    """
    if lookup(str(name_or_path)) is not None:
        raise ValueError(f"{name_or_path} is an ONNX model: it has no PyTorch weights (use the ort or openvino "
                         "engines)")
    path = resolve_weights(name_or_path)
    metadata = read_metadata(path)
    if "arch" not in metadata or "config" not in metadata:
        raise ValueError(f"{path.name} has no 'arch'/'config' metadata: it was not written by sr.save_weights")
    model = build_model(metadata["arch"], **metadata["config"])
    from safetensors.torch import load_file

    try:
        model.load_state_dict(load_file(str(path)))
    except RuntimeError as error:
        raise ValueError(f"{path.name}: weights do not match {metadata['arch']} {metadata['config']}: {error}") from None
    return model.eval()


@torch.no_grad()
def upscale(model: nn.Module, lr: torch.Tensor) -> torch.Tensor:
    """Run `model` without gradients and clamp its output.

    Args:
        model: an SR model.
        lr: float32 1x3xHxW RGB in [0, 1], on the model's device.

    Returns:
        float32 1x3x(sH)x(sW) clamped to [0, 1].
    """
    return model(lr).clamp_(0.0, 1.0)
