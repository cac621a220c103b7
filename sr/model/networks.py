"""The lab's SR networks (XLSR and the teacher), their configs, the name -> constructor table, and centred I/O
built into them (`with_io_offset`). Tensors are float32 NCHW RGB in [0, 1]."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from enum import Enum

import torch
import torch.nn.functional as F
from torch import nn

from ..choices import Choice
from .centring import IO_OFFSET

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


class _CentredIO(nn.Module):
    """The forward pass both networks share: with centred I/O (`config.io_offset`), the input shifted down and
    padded with the value that stands for a black pixel (the padding the input convolutions no longer do), and
    the output shifted back up. A subclass gives its `features` (what feeds `tail`) and its layers."""

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The features `tail` reads, from the (shifted, padded) input."""
        raise NotImplementedError

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
        y = self.output(self.depth_to_space(self.tail(self.features(x))))
        return y + offset if offset else y


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


class XLSR(_CentredIO):
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

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The fused main and skip branches, from the (shifted, padded) input."""
        features = self.gblocks(self.head_mix(self.head_relu(self.head(x))))
        return self.fuse_relu(self.fuse(torch.cat([features, self.skip(x)], dim=1)))


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


class Teacher(_CentredIO):
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

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The residual body's output plus the head's, from the (shifted, padded) input."""
        features = self.head(x)
        return features + self.body(features)


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
