"""Small stand-ins for the SR models users bring, built here (no download): each is a working upscaler (hand-set
weights, or a shipped model inside another contract), exported to ONNX by torch."""
from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper
from torch import nn

from sr.model.weights import load_model


def _export(model: nn.Module, path: Path, example: torch.Tensor, dynamic: bool = True,
            names: tuple[str, str] = ("lr", "sr")) -> Path:
    buffer = io.BytesIO()
    given, made = names
    axes = {given: {2: "h", 3: "w"}, made: {2: "H", 3: "W"}} if dynamic else None
    if dynamic and example.shape[-1] in (1, 3):  # NHWC (RGB or Y)
        axes = {given: {1: "h", 2: "w"}, made: {1: "H", 2: "W"}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (example,), buffer, opset_version=17, input_names=[given],
                          output_names=[made], dynamic_axes=axes, dynamo=False)
    path.write_bytes(buffer.getvalue())
    return path


def conv_stack(path: Path, channels: int, layers: int) -> Path:
    """An x3 RGB model of `layers` 3x3 convolutions of `channels` channels and a pixel shuffle (random weights,
    small enough to keep the output in range): a model as slow as wanted, for the cost cap and the lanes."""
    body = [nn.Conv2d(3, channels, 3, padding=1)]
    for _ in range(layers - 2):
        body += [nn.ReLU(), nn.Conv2d(channels, channels, 3, padding=1)]
    body += [nn.ReLU(), nn.Conv2d(channels, 27, 3, padding=1), nn.PixelShuffle(3)]
    model = nn.Sequential(*body)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(0.1)
    return _export(model, path, torch.rand(1, 3, 16, 16))


class FsrcnnY(nn.Module):
    """FSRCNN-like, Y only: 5x5 feature conv, PReLU, shrink, map, expand, and a stride-3 ConvTranspose. The
    weights carry the Y channel through channel 0 and upscale it with a bilinear kernel; the other channels are
    small random noise, so the model is a real (if plain) upscaler."""

    def __init__(self):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.feature, self.shrink = nn.Conv2d(1, 16, 5, padding=2), nn.Conv2d(16, 8, 1)
        self.map, self.expand = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 16, 1)
        self.acts = nn.ModuleList([nn.PReLU(c) for c in (16, 8, 8, 16)])
        self.up = nn.ConvTranspose2d(16, 1, 9, stride=3, padding=3)
        with torch.no_grad():
            for conv in (self.feature, self.shrink, self.map, self.expand):
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) * 0.01)
                conv.bias.zero_()
                centre = conv.weight.shape[-1] // 2
                conv.weight[0].zero_()
                conv.weight[0, 0, centre, centre] = 1.0
            ramp = torch.tensor([1, 2, 3, 2, 1], dtype=torch.float32) / 3
            kernel = torch.zeros(9)
            kernel[2:7] = ramp
            self.up.weight.zero_()
            self.up.weight[0, 0] = torch.outer(kernel, kernel)
            self.up.bias.zero_()

    def forward(self, y):
        x = y
        for conv, act in zip((self.feature, self.shrink, self.map, self.expand), self.acts):
            x = act(conv(x))
        return self.up(x).clamp(0.0, 1.0)  # trained on [0, 1] images, it clamps its output to that range


class VdsrLike(nn.Module):
    """VDSR-like: the input is already bicubic-upscaled; a few convs predict a (tiny) residual added to it."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 3, 3, padding=1))
        with torch.no_grad():
            for parameter in self.body.parameters():
                parameter.mul_(0.01)

    def forward(self, x):
        return (x + self.body(x)).clamp(0.0, 1.0)


class Nhwc(nn.Module):
    """A shipped model that takes and returns NHWC images."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


class Range255(nn.Module):
    """A shipped model that takes and returns values in [0, 255]."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x / 255.0) * 255.0


class TanhOutput(nn.Module):
    """A shipped model with a Tanh at its output: 0.5 + 0.5 tanh(atanh(2y - 1)) is y again."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        y = self.inner(x).clamp(0.001, 0.999)
        return 0.5 + 0.5 * torch.tanh(0.5 * torch.log(y / (1 - y)))


def build_all(folder: Path) -> dict[str, Path]:
    """Every stand-in as an ONNX file in `folder`: name -> path."""
    folder.mkdir(parents=True, exist_ok=True)
    rgb = torch.rand(1, 3, 24, 32)
    return {
        "fsrcnn-y": _export(FsrcnnY(), folder / "fsrcnn-y.onnx", torch.rand(1, 1, 24, 32)),
        "vdsr-pre-upsampled": _export(VdsrLike(), folder / "vdsr.onnx", torch.rand(1, 3, 72, 96)),
        "xlsr-nhwc": _export(Nhwc(load_model("xlsr-clip")), folder / "xlsr-nhwc.onnx", rgb.permute(0, 2, 3, 1)),
        "xlsr-255": _export(Range255(load_model("xlsr-relu")), folder / "xlsr-255.onnx", rgb * 255),
        "xlsr-fixed-48": _export(load_model("xlsr-clip"), folder / "xlsr-fixed.onnx", torch.rand(1, 3, 48, 48),
                                 dynamic=False),
        "xlsr-tanh": _export(TanhOutput(load_model("xlsr-clip")), folder / "xlsr-tanh.onnx", rgb),
        "xlsr-clip-exported": _export(load_model("xlsr-clip"), folder / "xlsr-clip.onnx", rgb),
    }


def bad_files(folder: Path, good: Path) -> dict[str, tuple[Path, str]]:
    """Files the lab must refuse, with the words its message must contain."""
    folder.mkdir(parents=True, exist_ok=True)
    model = onnx.load(str(good))
    external = folder / "external.onnx"
    onnx.save(model, str(external), save_as_external_data=True, all_tensors_to_one_file=True,
              location="external.bin", size_threshold=0)
    custom = onnx.load(str(good))
    custom.graph.node[0].domain = "com.example.secret"
    custom_path = folder / "custom.onnx"
    custom_path.write_bytes(custom.SerializeToString())
    classifier = nn.Sequential(nn.Conv2d(3, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
    truncated = folder / "truncated.onnx"
    truncated.write_bytes(good.read_bytes()[:300])
    empty = folder / "empty.onnx"
    empty.write_bytes(b"")
    return {"external data": (external, "external files"), "custom op": (custom_path, "custom-op domains"),
            "classifier": (_export(classifier, folder / "classifier.onnx", torch.rand(1, 3, 24, 32), dynamic=False),
                           "rank 2"),
            "truncated": (truncated, "not an ONNX model"), "empty": (empty, "empty")}


def mean_abs(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(np.abs(a.astype(np.float64) - b.astype(np.float64))))


def constant_reading(location: str, offset: int = 0) -> onnx.ModelProto:
    """The hostile model of the report: a Constant whose tensor has external data at `location` (8 bytes), cast
    to int64 and used as a Reshape shape, so that an error message would print the bytes."""
    constant = onnx.TensorProto()
    constant.name, constant.data_type = "stolen", TensorProto.UINT8
    constant.dims.append(8)
    constant.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", "8")):
        entry = constant.external_data.add()
        entry.key, entry.value = key, value
    nodes = [helper.make_node("Constant", [], ["bytes"], value=constant),
             helper.make_node("Cast", ["bytes"], ["shape"], to=TensorProto.INT64),
             helper.make_node("Reshape", ["lr", "shape"], ["flat"]),
             helper.make_node("Reshape", ["flat", "back"], ["y"]),
             helper.make_node("Resize", ["y", "", "scales"], ["sr"], mode="nearest")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("lr", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("sr", TensorProto.FLOAT, [1, 3, 24, 24])],
                              [helper.make_tensor("back", TensorProto.INT64, [4], [1, 3, 8, 8]),
                               helper.make_tensor("scales", TensorProto.FLOAT, [4], [1, 1, 3, 3])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def shape_padded(path: Path) -> Path:
    """waifu2x-like, as some exporters write it: x2 RGB, replicate padding whose pads come out of an int64 shape
    subgraph (Shape -> Gather -> Mul -> Unsqueeze -> Tile -> Add), a valid 3x3 conv, LeakyReLU 0.1, pixel shuffle."""
    from onnx import numpy_helper

    rng = np.random.default_rng(5)
    weight = rng.normal(0, 0.05, (12, 3, 3, 3)).astype(np.float32)
    weight[:, :, 1, 1] += np.repeat(np.eye(3, dtype=np.float32), 4, axis=0)  # roughly nearest-neighbour x2
    nodes = [helper.make_node("Shape", ["lr"], ["shape"]),
             helper.make_node("Gather", ["shape", "two"], ["height"], axis=0),
             helper.make_node("Mul", ["height", "zero"], ["nothing"]),
             helper.make_node("Unsqueeze", ["nothing", "axis0"], ["nothing1"]),
             helper.make_node("Tile", ["nothing1", "eight"], ["zeros8"]),
             helper.make_node("Add", ["pads_const", "zeros8"], ["pads"]),
             helper.make_node("Pad", ["lr", "pads"], ["padded"], mode="edge"),
             helper.make_node("Conv", ["padded", "w"], ["features"]),
             helper.make_node("LeakyRelu", ["features"], ["activated"], alpha=0.1),
             helper.make_node("DepthToSpace", ["activated"], ["sr"], blocksize=2, mode="CRD")]
    constants = [numpy_helper.from_array(np.array(2, np.int64), "two"),
                 numpy_helper.from_array(np.array(0, np.int64), "zero"),
                 numpy_helper.from_array(np.array([0], np.int64), "axis0"),
                 numpy_helper.from_array(np.array([8], np.int64), "eight"),
                 numpy_helper.from_array(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), "pads_const"),
                 numpy_helper.from_array(weight, "w")]
    graph = helper.make_graph(nodes, "waifu2x-like",
                              [helper.make_tensor_value_info("lr", TensorProto.FLOAT, [1, 3, "h", "w"])],
                              [helper.make_tensor_value_info("sr", TensorProto.FLOAT, [1, 3, "H", "W"])], constants)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    path.write_bytes(model.SerializeToString())
    return path


# The families people ship, as small trainable stand-ins. Each core takes RGB or Y in [0, 1] NCHW; `family`
# puts it in its contract and trains it briefly, so that its tensor statistics are those of a working network.

class MultipleOf(nn.Module):
    """The shipped x3 XLSR with a coarse context branch that works on 4x4 blocks (a PixelUnshuffle, as U-Nets and
    window attention have): its export runs only on sides that are a multiple of 4."""

    def __init__(self, multiple: int = 4):
        super().__init__()
        self.net, self.multiple = load_model("xlsr-clip"), multiple
        self.context = nn.Conv2d(3 * multiple**2, 3 * (3 * multiple) ** 2, 1)
        with torch.no_grad():
            self.context.weight.mul_(0.05)
            self.context.bias.zero_()

    def forward(self, x):
        blocks = nn.functional.pixel_unshuffle(x, self.multiple)
        return self.net(x) + nn.functional.pixel_shuffle(self.context(blocks), 3 * self.multiple)


class MinimumSize(nn.Module):
    """The shipped x3 XLSR behind a wide reflection pad (cropped off its output again): its export runs only on
    sides larger than the pad."""

    def __init__(self, pad: int = 24):
        super().__init__()
        self.net, self.pad = load_model("xlsr-clip"), pad

    def forward(self, x):
        out = self.net(nn.functional.pad(x, [self.pad] * 4, mode="reflect"))
        crop = 3 * self.pad
        return out[:, :, crop:-crop, crop:-crop]


def sized(kind: str, folder: Path) -> Path:
    """A user's export that takes only some sizes: "multiple-of-4" or "min-25" (x3 RGB, dynamic H/W)."""
    model = MultipleOf(4) if kind == "multiple-of-4" else MinimumSize(24)
    return _export(model.eval(), folder / f"xlsr-{kind}.onnx", torch.rand(1, 3, 48, 48))


class EspcnCore(nn.Module):
    """ESPCN-like (Shi et al. 2016): Y in, tanh between 5x5 / 3x3 convs, a x3 pixel shuffle."""

    def __init__(self, scale: int = 3):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 32, 5, padding=2), nn.Tanh(), nn.Conv2d(32, 16, 3, padding=1), nn.Tanh(),
                                  nn.Conv2d(16, scale * scale, 3, padding=1), nn.PixelShuffle(scale))

    def forward(self, y):
        return self.body(y)


class Esa(nn.Module):
    """RLFN's enhanced spatial attention: 1x1 down, strided conv, MaxPool, conv, bilinear Resize back, Sigmoid gate."""

    def __init__(self, channels: int, inner: int = 8):
        super().__init__()
        self.down, self.strided = nn.Conv2d(channels, inner, 1), nn.Conv2d(inner, inner, 3, stride=2)
        self.pool, self.conv = nn.MaxPool2d(7, 3), nn.Conv2d(inner, inner, 3, padding=1)
        self.skip, self.up = nn.Conv2d(inner, inner, 1), nn.Conv2d(inner, channels, 1)

    def forward(self, x):
        c1 = self.down(x)
        small = self.conv(self.pool(self.strided(c1)))
        back = nn.functional.interpolate(small, size=x.shape[2:], mode="bilinear", align_corners=False)
        return x * torch.sigmoid(self.up(back + self.skip(c1)))


class RlfnLike(nn.Module):
    """RLFN-like (Kong et al., NTIRE 2022 efficient SR): a residual block with ESA, RGB x4 by pixel shuffle."""

    def __init__(self, scale: int = 4, channels: int = 16):
        super().__init__()
        self.head = nn.Conv2d(3, channels, 3, padding=1)
        self.body = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.LeakyReLU(0.05),
                                  nn.Conv2d(channels, channels, 3, padding=1))
        self.esa = Esa(channels)
        self.tail = nn.Sequential(nn.Conv2d(channels, 3 * scale * scale, 3, padding=1), nn.PixelShuffle(scale))

    def forward(self, x):
        feature = self.head(x)
        return self.tail(self.esa(self.body(feature)) + feature)


class Rrdb(nn.Module):
    """One residual-in-residual dense block (ESRGAN): dense Concat, LeakyReLU 0.2, residuals scaled by 0.2."""

    def __init__(self, channels: int = 16, growth: int = 8):
        super().__init__()
        self.convs = nn.ModuleList([nn.Conv2d(channels + k * growth, growth if k < 2 else channels, 3, padding=1)
                                    for k in range(3)])

    def forward(self, x):
        features = [x]
        for k, conv in enumerate(self.convs):
            out = conv(torch.cat(features, dim=1))
            if k < 2:
                features.append(nn.functional.leaky_relu(out, 0.2))
        return x + 0.2 * out


class RrdbX4(nn.Module):
    """Real-ESRGAN-like x4: RRDB trunk, two nearest x2 Resizes each followed by a conv and LeakyReLU 0.2."""

    def __init__(self, channels: int = 16):
        super().__init__()
        self.head, self.block = nn.Conv2d(3, channels, 3, padding=1), Rrdb(channels)
        self.trunk = nn.Conv2d(channels, channels, 3, padding=1)
        self.up1, self.up2 = nn.Conv2d(channels, channels, 3, padding=1), nn.Conv2d(channels, channels, 3, padding=1)
        self.last = nn.Conv2d(channels, 3, 3, padding=1)

    def forward(self, x):
        feature = self.head(x)
        feature = feature + self.trunk(self.block(feature))
        for conv in (self.up1, self.up2):
            feature = nn.functional.leaky_relu(conv(nn.functional.interpolate(feature, scale_factor=2.0,
                                                                              mode="nearest")), 0.2)
        return self.last(feature)


class TransformerBlock(nn.Module):
    """A SwinIR-light-like transformer block: LayerNorm, attention by MatMul and Softmax, GELU MLP. Attention runs
    across channels as Restormer's (MDTA): q and k L2-normalized over the pixels, a learned temperature, so any
    image size runs without Swin's window padding and the logits stay within +-temperature whatever the size.
    `size_scaled`: the attention this stand-in used to have, q^T k / sqrt(H x W) with no normalization (logits
    that grow with the image's side; a float computed from the size), kept for the paths that handle one."""

    def __init__(self, channels: int = 16, size_scaled: bool = False):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(channels), nn.LayerNorm(channels)
        self.qkv, self.proj = nn.Linear(channels, 3 * channels), nn.Linear(channels, channels)
        self.mlp = nn.Sequential(nn.Linear(channels, 2 * channels), nn.GELU(), nn.Linear(2 * channels, channels))
        self.size_scaled = size_scaled
        self.temperature = nn.Parameter(torch.ones(1))

    def forward(self, x):
        batch, channels, height, width = x.shape
        tokens = x.flatten(2).transpose(1, 2)  # B, HW, C
        q, k, v = self.qkv(self.norm1(tokens)).chunk(3, dim=-1)
        if self.size_scaled:
            logits = q.transpose(1, 2) @ k / (height * width) ** 0.5
        else:
            q, k = nn.functional.normalize(q.transpose(1, 2), dim=-1), nn.functional.normalize(k.transpose(1, 2), dim=-1)
            logits = q @ k.transpose(1, 2) * self.temperature
        attention = torch.softmax(logits, dim=-1)  # B, C, C
        tokens = tokens + self.proj((attention @ v.transpose(1, 2)).transpose(1, 2))
        tokens = tokens + self.mlp(self.norm2(tokens))
        return tokens.transpose(1, 2).reshape(batch, channels, height, width)


class SwinLightLike(nn.Module):
    """SwinIR-light-like x2: conv head, one transformer block, conv, pixel shuffle."""

    def __init__(self, scale: int = 2, channels: int = 16, size_scaled: bool = False):
        super().__init__()
        self.head, self.block = nn.Conv2d(3, channels, 3, padding=1), TransformerBlock(channels, size_scaled)
        self.tail = nn.Sequential(nn.Conv2d(channels, 3 * scale * scale, 3, padding=1), nn.PixelShuffle(scale))

    def forward(self, x):
        feature = self.head(x)
        return self.tail(feature + self.block(feature))


def size_scaled_attention(path: Path, train_dir: str, steps: int = 60) -> Path:
    """The SwinIR-like stand-in with the attention it used to have (`TransformerBlock(size_scaled=True)`: its
    1 / sqrt(H x W) a float computed from the image's size), trained `steps` steps: for the per-size paths."""
    torch.manual_seed(0)
    model = train_briefly(SwinLightLike(size_scaled=True), 2, train_dir, steps)
    path.parent.mkdir(parents=True, exist_ok=True)
    return _export(model, path, torch.rand(1, 3, 24, 24))


class Waifu2xLike(nn.Module):
    """waifu2x upconv_7-like x2 (RGB): replicate padding of 7 px, six valid 3x3 convs with LeakyReLU 0.1, a
    stride-2 ConvTranspose; exported with its pads computed by an int64 shape subgraph (`with_shape_pads`)."""

    def __init__(self, widths=(16, 32, 32, 64, 64, 64)):
        super().__init__()
        layers, channels = [], 3
        for width in widths:
            layers += [nn.Conv2d(channels, width, 3), nn.LeakyReLU(0.1)]
            channels = width
        self.body = nn.Sequential(*layers)
        self.up = nn.ConvTranspose2d(channels, 3, 4, stride=2, padding=3)

    def forward(self, x):
        return self.up(self.body(nn.functional.pad(x, (7, 7, 7, 7), mode="replicate")))


def with_shape_pads(path: Path) -> Path:
    """Rewrite the first Pad's constant pads as some exporters write them: the same values out of an int64 shape
    subgraph (Shape -> Gather -> Mul by 0 -> Unsqueeze -> Tile -> Add to the constant)."""
    from onnx import numpy_helper

    model = onnx.load(str(path))
    pad = next(n for n in model.graph.node if n.op_type == "Pad")
    source = pad.input[1]
    nodes = [helper.make_node("Shape", [model.graph.input[0].name], ["sp_shape"]),
             helper.make_node("Gather", ["sp_shape", "sp_two"], ["sp_height"], axis=0),
             helper.make_node("Mul", ["sp_height", "sp_zero"], ["sp_nothing"]),
             helper.make_node("Unsqueeze", ["sp_nothing", "sp_axis0"], ["sp_nothing1"]),
             helper.make_node("Tile", ["sp_nothing1", "sp_eight"], ["sp_zeros8"]),
             helper.make_node("Add", [source, "sp_zeros8"], ["sp_pads"])]
    pad.input[1] = "sp_pads"
    index = list(model.graph.node).index(pad)
    for offset, node in enumerate(nodes):
        model.graph.node.insert(index + offset, node)
    model.graph.initializer.extend([numpy_helper.from_array(np.array(2, np.int64), "sp_two"),
                                    numpy_helper.from_array(np.array(0, np.int64), "sp_zero"),
                                    numpy_helper.from_array(np.array([0], np.int64), "sp_axis0"),
                                    numpy_helper.from_array(np.array([8], np.int64), "sp_eight")])
    onnx.checker.check_model(model)
    path.write_bytes(model.SerializeToString())
    return path


def _y(rgb: torch.Tensor) -> torch.Tensor:
    return (65.481 * rgb[:, 0:1] + 128.553 * rgb[:, 1:2] + 24.966 * rgb[:, 2:3] + 16.0) / 255.0


def train_briefly(model: nn.Module, scale: int, folder: str, steps: int = 300, luma: bool = False,
                  pre_upsampled: bool = False, seed: int = 0) -> nn.Module:
    """`steps` Adam steps of L1 on 24 px LR patches of `folder` (bicubic-downscaled, as the lab evaluates)."""
    from sr.data import PatchSampler

    torch.manual_seed(seed)
    sampler = PatchSampler(folder, scale, 24, seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    model.train()
    for _ in range(steps):
        lr, hr = (torch.as_tensor(a) for a in sampler.batch(8))
        if pre_upsampled:
            lr = nn.functional.interpolate(lr, scale_factor=scale, mode="bicubic", align_corners=False).clamp(0, 1)
        if luma:
            lr, hr = _y(lr), _y(hr)
        loss = (model(lr) - hr).abs().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


FAMILIES = {  # name -> (core, scale, takes Y, pre-upsampled, how it is exported)
    "fsrcnn": (FsrcnnY, 3, True, False, "nchw"),
    "vdsr": (VdsrLike, 3, False, True, "nchw"),
    "espcn": (EspcnCore, 3, True, False, "nhwc-tf"),
    "rlfn": (RlfnLike, 4, False, False, "nchw"),
    "rrdb": (RrdbX4, 4, False, False, "nchw"),
    "swinir-light": (SwinLightLike, 2, False, False, "nchw"),
    "waifu2x": (Waifu2xLike, 2, False, False, "nchw-shape-pads"),
}


def family(name: str, folder: Path, train_dir: str, steps: int = 300, seed: int = 0) -> Path:
    """The stand-in `name` of FAMILIES, trained `steps` steps on `train_dir`, as `folder/<name>.onnx`: the same
    model whatever ran before it in the process (its initial weights are drawn after seeding, not from wherever
    the global generator happens to be)."""
    folder.mkdir(parents=True, exist_ok=True)
    make, scale, luma, pre, export = FAMILIES[name]
    torch.manual_seed(seed)
    model = train_briefly(make(), scale, train_dir, steps, luma, pre, seed)
    channels = 1 if luma else 3
    side = 24 * (scale if pre else 1)
    if export == "nhwc-tf":
        return _export(Nhwc(model), folder / f"{name}.onnx", torch.rand(1, side, side, channels),
                       names=("serving_default_input_1:0", "StatefulPartitionedCall:0"))  # TensorFlow's names
    path = _export(model, folder / f"{name}.onnx", torch.rand(1, channels, side, side))
    return with_shape_pads(path) if export == "nchw-shape-pads" else path


FAMILY_NAMES = list(FAMILIES)


# ----------------------------------------------------------------------------------------------------------------
# Hostile models (the public Space's report): small files whose cost shows only when they run.

def _x3(extra_nodes: list, extra_inits: list, added: str | None, opset: int = 17) -> onnx.ModelProto:
    """An x3 RGB upscaler (a nearest Resize) with `extra_nodes`; `added` (a scalar tensor they make) is added to
    the output, so the extra work is not dead code."""
    nodes = [helper.make_node("Resize", ["lr", "", "x3"], ["up"], mode="nearest"), *extra_nodes]
    nodes.append(helper.make_node("Add", ["up", added], ["sr"]) if added else helper.make_node("Identity", ["up"], ["sr"]))
    graph = helper.make_graph(nodes, "hostile", [helper.make_tensor_value_info("lr", TensorProto.FLOAT, [1, 3, "h", "w"])],
                              [helper.make_tensor_value_info("sr", TensorProto.FLOAT, [1, 3, "H", "W"])],
                              [helper.make_tensor("x3", TensorProto.FLOAT, [4], [1, 1, 3, 3]), *extra_inits])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _int64(name: str, values: list) -> onnx.TensorProto:
    return helper.make_tensor(name, TensorProto.INT64, [len(values)], values)


def huge_at_run_time(side_times: int = 1500) -> onnx.ModelProto:
    """The report's 3 KB model that killed the server: a (h x side_times) x (h x side_times) tensor made from the
    input's size at run time (48000 x 48000 on a 32-pixel side), summed and added (times zero) to the output."""
    nodes = [helper.make_node("Shape", ["lr"], ["shape"]),
             helper.make_node("Gather", ["shape", "two"], ["side"]),
             helper.make_node("Mul", ["side", "times"], ["big_side"]),
             helper.make_node("Concat", ["big_side", "big_side"], ["big_shape"], axis=0),
             helper.make_node("ConstantOfShape", ["big_shape"], ["big"]),
             helper.make_node("ReduceSum", ["big"], ["total"], keepdims=0),
             helper.make_node("Mul", ["total", "zero"], ["nothing"])]
    return _x3(nodes, [_int64("two", [2]), _int64("times", [side_times]),
                       helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0])], "nothing")


def huge_from_values() -> onnx.ModelProto:
    """A tensor whose size is read from the input's values (its brightest pixel x 48000): unknowable before it
    runs."""
    nodes = [helper.make_node("ReduceMax", ["lr"], ["top"], keepdims=0),
             helper.make_node("Mul", ["top", "many"], ["count"]),
             helper.make_node("Cast", ["count"], ["side"], to=TensorProto.INT64),
             helper.make_node("Reshape", ["side", "one"], ["side1"]),
             helper.make_node("Concat", ["side1", "side1"], ["big_shape"], axis=0),
             helper.make_node("ConstantOfShape", ["big_shape"], ["big"]),
             helper.make_node("ReduceSum", ["big"], ["total"], keepdims=0),
             helper.make_node("Mul", ["total", "zero"], ["nothing"])]
    return _x3(nodes, [helper.make_tensor("many", TensorProto.FLOAT, [], [48000.0]), _int64("one", [1]),
                       helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0])], "nothing")


def matmul_at_run_time(side: int = 12288) -> onnx.ModelProto:
    """A side x side MatMul of a tensor built at run time (1.9 TMAC at 12288)."""
    nodes = [helper.make_node("ConstantOfShape", ["shape"], ["square"]),
             helper.make_node("MatMul", ["square", "square"], ["product"]),
             helper.make_node("ReduceSum", ["product"], ["total"], keepdims=0),
             helper.make_node("Mul", ["total", "zero"], ["nothing"])]
    return _x3(nodes, [_int64("shape", [side, side]), helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0])],
               "nothing")


def convs_in_a_loop(trips: int = 60, channels: int = 64) -> onnx.ModelProto:
    """Convolutions inside a Loop body run `trips` times (the report's estimate: 0.0017 M MACs a pixel; real
    about 2.2 M)."""
    weight = helper.make_tensor("w", TensorProto.FLOAT, [channels, channels, 3, 3], [0.0] * channels * channels * 9)
    body = helper.make_graph(
        [helper.make_node("Conv", ["state", "w"], ["next"], pads=[1, 1, 1, 1]),
         helper.make_node("Identity", ["cond_in"], ["cond_out"])], "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []), helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("state", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("next", TensorProto.FLOAT, None)], [weight])
    nodes = [helper.make_node("Conv", ["lr", "lift"], ["wide"], pads=[1, 1, 1, 1]),
             helper.make_node("Loop", ["trips", "yes", "wide"], ["looped"], body=body),
             helper.make_node("ReduceSum", ["looped"], ["total"], keepdims=0),
             helper.make_node("Mul", ["total", "zero"], ["nothing"])]
    return _x3(nodes, [helper.make_tensor("lift", TensorProto.FLOAT, [channels, 3, 3, 3], [0.0] * channels * 27),
                       helper.make_tensor("trips", TensorProto.INT64, [], [trips]),
                       helper.make_tensor("yes", TensorProto.BOOL, [], [True]),
                       helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0])], "nothing")


def resize_by(scale: float) -> onnx.ModelProto:
    """A nearest Resize by `scale` a side (the report's x16 took 7 GB on a 1024x768 image)."""
    graph = helper.make_graph([helper.make_node("Resize", ["lr", "", "scales"], ["sr"], mode="nearest")], "resize",
                              [helper.make_tensor_value_info("lr", TensorProto.FLOAT, [1, 3, "h", "w"])],
                              [helper.make_tensor_value_info("sr", TensorProto.FLOAT, [1, 3, "H", "W"])],
                              [helper.make_tensor("scales", TensorProto.FLOAT, [4], [1, 1, scale, scale])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def resize_from_values(channels: int = 64) -> onnx.ModelProto:
    """A Resize whose scale is read from the input's values, followed by convolutions of `channels` channels
    (the report's: estimated 0, really about 3.5 M MACs a pixel)."""
    nodes = [helper.make_node("ReduceMax", ["lr"], ["top"], keepdims=0),
             helper.make_node("Mul", ["top", "three"], ["factor"]),
             helper.make_node("Concat", ["ones", "factor1", "factor1"], ["scales"], axis=0),
             helper.make_node("Resize", ["lr", "", "scales"], ["up"], mode="nearest"),
             helper.make_node("Conv", ["up", "lift"], ["wide"], pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["wide", "back"], ["sr"], pads=[1, 1, 1, 1])]
    nodes.insert(2, helper.make_node("Reshape", ["factor", "one"], ["factor1"]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("lr", TensorProto.FLOAT, [1, 3, "h", "w"])],
                              [helper.make_tensor_value_info("sr", TensorProto.FLOAT, [1, 3, "H", "W"])],
                              [helper.make_tensor("three", TensorProto.FLOAT, [], [3.0]), _int64("one", [1]),
                               helper.make_tensor("ones", TensorProto.FLOAT, [2], [1.0, 1.0]),
                               helper.make_tensor("lift", TensorProto.FLOAT, [channels, 3, 3, 3], [0.01] * channels * 27),
                               helper.make_tensor("back", TensorProto.FLOAT, [3, channels, 3, 3], [0.01] * channels * 27)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def non_finite_weights() -> onnx.ModelProto:
    """An x3 model with a NaN and an infinity in its conv weights."""
    weight = np.zeros((27, 3, 3, 3), np.float32)
    weight[0, 0, 1, 1], weight[1, 0, 1, 1] = np.nan, np.inf
    from onnx import numpy_helper

    graph = helper.make_graph([helper.make_node("Conv", ["lr", "w"], ["c"], pads=[1, 1, 1, 1]),
                               helper.make_node("DepthToSpace", ["c"], ["sr"], blocksize=3, mode="CRD")], "g",
                              [helper.make_tensor_value_info("lr", TensorProto.FLOAT, [1, 3, "h", "w"])],
                              [helper.make_tensor_value_info("sr", TensorProto.FLOAT, [1, 3, "H", "W"])],
                              [numpy_helper.from_array(weight, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


HOSTILE = {  # name -> (builder, what the refusal says)
    "huge at run time": (huge_at_run_time, "values per input pixel"),
    "huge from values": (huge_from_values, "known only at run time"),
    "matmul at run time": (matmul_at_run_time, "multiply-accumulates per input pixel"),
    "convs in a loop": (convs_in_a_loop, "control flow"),
    "resize x16": (lambda: resize_by(16.0), "enlarges its input 16.0 times"),
    "resize from values": (resize_from_values, "known only at run time"),
}
