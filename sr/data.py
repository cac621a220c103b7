"""Image loading, the SR degradations (HR -> LR: clean bicubic, or bicubic then seeded blur, noise and JPEG) and
the random patch sampler used for training.

Convention: arrays at this module's edges are uint8 HxWx3 RGB; nothing here returns float tensors except
`PatchSampler.batch`, which returns float32 NCHW RGB in [0, 1] (the convention inside `sr/`).
"""
from __future__ import annotations

import io
import logging
import os
import re
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from scipy.ndimage import gaussian_filter

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm")

# 40 MP: a 8000x5000 photo still loads; a decompression bomb (a tiny file claiming 50000x50000) does not.
DEFAULT_MAX_PIXELS = 40_000_000


class ImageLoadError(ValueError):
    """The file is not an image we can read (corrupt, empty, not an image, or too large)."""


def load_image(source: str | os.PathLike | bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Read any image PIL understands as uint8 RGB.

    Grayscale and palette images are expanded to RGB; 16-bit and 32-bit images are scaled to 8 bits; CMYK is
    converted; EXIF orientation is applied. Transparent images (RGBA, LA, palette with transparency) are
    **composited on white**, which is what a viewer shows, instead of dropping alpha (that would reveal
    whatever colour hides under fully transparent pixels).

    Args:
        source: a path or the file's bytes.
        max_pixels: refuse images with more pixels than this, before decoding them (decompression bombs).

    Returns:
        uint8 array of shape HxWx3.

    Raises:
        FileNotFoundError: the path does not exist.
        ImageLoadError: the data is empty, corrupt, not an image, or larger than `max_pixels`.
    """
    name = "the uploaded file" if isinstance(source, (bytes, bytearray)) else str(source)
    if isinstance(source, (bytes, bytearray)):
        if not source:
            raise ImageLoadError("the uploaded file is empty (0 bytes)")
        stream = io.BytesIO(source)
    else:
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"no such image file: {path}")
        if path.stat().st_size == 0:
            raise ImageLoadError(f"{path.name} is empty (0 bytes)")
        stream = io.BytesIO(path.read_bytes())
    try:
        with Image.open(stream) as image:
            width, height = image.size  # read from the header, before any pixel is decoded
            if width * height > max_pixels:
                raise ImageLoadError(
                    f"{Path(name).name} is {width}x{height} = {width * height / 1e6:.1f} MP, more than the "
                    f"limit of {max_pixels / 1e6:.1f} MP"
                )
            image.load()
            image = ImageOps.exif_transpose(image)
            return _to_rgb8(image)
    except ImageLoadError:
        raise
    except Image.DecompressionBombError as error:  # PIL refuses before we can read the size ourselves
        raise ImageLoadError(f"{Path(name).name} has too many pixels: more than the limit of "
                             f"{max_pixels / 1e6:.1f} MP ({error})") from error
    except UnidentifiedImageError as error:
        raise ImageLoadError(f"{Path(name).name} is not an image we can read (PNG, JPEG, WebP, TIFF, BMP, GIF and "
                             "the other formats Pillow decodes)") from error
    except (OSError, ValueError, SyntaxError) as error:  # truncated or corrupt data inside a valid header
        raise ImageLoadError(f"{Path(name).name} is corrupt or truncated ({error})") from error


def frame_count(path: str | os.PathLike) -> int:
    """How many frames an image file holds (an animated GIF, WebP or APNG: more than one), 1 when unreadable."""
    try:
        with Image.open(path) as image:
            return int(getattr(image, "n_frames", 1))
    except Exception:
        return 1


def _to_rgb8(image: Image.Image) -> np.ndarray:
    mode = image.mode
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        values = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if mode.startswith("I;16") or values.max(initial=0) > 255 else 255.0
        if mode == "F" and values.max(initial=0) <= 1.0:
            peak = 1.0
        gray = np.clip(np.rint(values / peak * 255.0), 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"), dtype=np.uint8).copy()
    if mode != "RGB":
        image = image.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV
    array = np.asarray(image)
    if array.dtype != np.uint8:  # 48-bit RGB decoded by some plugins
        array = np.clip(np.rint(array.astype(np.float64) / 257.0), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(array)


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Image files directly inside `folder`, sorted by name.

    Args:
        folder: the folder (not searched recursively).

    Returns:
        the paths of files whose suffix is one of IMAGE_SUFFIXES (any case).

    Raises:
        FileNotFoundError: the folder does not exist or holds no image.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"no such image folder: {folder}")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise FileNotFoundError(f"{folder} holds no images (looked for {', '.join(IMAGE_SUFFIXES)})")
    return files


def modcrop(image: np.ndarray, scale: int) -> np.ndarray:
    """Crop the bottom/right so that height and width are multiples of `scale` (the literature's convention).

    Args:
        image: HxW or HxWxC array.
        scale: the SR factor.

    Returns:
        a view of `image`, (H - H % scale) x (W - W % scale).
    """
    height, width = image.shape[:2]
    return image[: height - height % scale, : width - width % scale]


def bicubic_resize(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """Bicubic resize of uint8 HxWx3 with PIL; when shrinking, PIL widens the kernel (antialiasing) like
    MATLAB's `imresize`, which is how the SR benchmarks make their LR images.

    Args:
        image: uint8 HxWx3 RGB.
        width: the output width in pixels.
        height: the output height in pixels.

    Returns:
        uint8 height x width x 3 RGB.
    """
    return np.asarray(Image.fromarray(image).resize((width, height), Image.Resampling.BICUBIC))


@dataclass(frozen=True)
class Degradation:
    """What is done to the bicubic LR image after downscaling, in this order: Gaussian blur, Gaussian noise,
    JPEG. All zero / None is the clean bicubic setting of the SR benchmarks.

    The random part (the noise) is seeded per image from `seed` and the image's name (`image_seed`), so every
    run that names the same degradation sees exactly the same LR images, in training and in evaluation.
    Order and kinds follow the "classical" degradation model used by blind SR (blur, noise, JPEG; e.g. Wang et
    al., Real-ESRGAN, ICCVW 2021, one pass of its second-order pipeline), applied to the LR image at fixed
    strengths instead of sampled ones.

    Raises:
        ValueError: (on construction) a negative blur or noise, or a JPEG quality outside 1..100.
    """

    blur: float = 0.0  # Gaussian sigma in LR pixels (0: none)
    noise: float = 0.0  # Gaussian noise sigma in 0..255 units (0: none)
    jpeg: int | None = None  # JPEG quality 1..100 (None: not compressed)
    seed: int = 0

    def __post_init__(self):
        if self.blur < 0 or self.noise < 0:
            raise ValueError(f"blur and noise must be >= 0, got blur={self.blur}, noise={self.noise}")
        if self.jpeg is not None and not 1 <= self.jpeg <= 100:
            raise ValueError(f"jpeg quality must be 1..100 (or none), got {self.jpeg}")

    @property
    def is_clean(self) -> bool:
        """True when the LR image is left as bicubic made it."""
        return self.blur == 0 and self.noise == 0 and self.jpeg is None

    def spec(self) -> str:
        """The canonical text form: a preset's name when it is one, else e.g. "blur=1.0,noise=5.0,jpeg=40,seed=0"."""
        for name, preset in DEGRADATIONS.items():
            if preset == self:
                return name
        jpeg = "none" if self.jpeg is None else str(self.jpeg)
        return f"blur={self.blur:g},noise={self.noise:g},jpeg={jpeg},seed={self.seed}"

    def to_dict(self) -> dict:
        """The fields and the canonical name, for reports and metadata."""
        return {"name": self.spec(), **asdict(self)}

    @classmethod
    def parse(cls, value: "Degradation | str | None") -> "Degradation":
        """A preset name ("clean", "strong"), a spec "blur=1,noise=5,jpeg=40[,seed=0]" (any subset), or a Degradation.

        Raises:
            ValueError: an unknown preset or field, or a value that is not a number; the message lists the presets.
        """
        if value is None:
            return DEGRADATIONS["clean"]
        if isinstance(value, Degradation):
            return value
        text = str(value).strip().lower()
        if text in DEGRADATIONS:
            return DEGRADATIONS[text]
        fields: dict = {}
        for part in filter(None, re.split(r"[,\s]+", text)):
            key, _, number = part.partition("=")
            if key not in ("blur", "noise", "jpeg", "seed") or not number:
                raise ValueError(f"unknown degradation {value!r}; choose a preset ({', '.join(DEGRADATIONS)}) or "
                                 "give blur=SIGMA,noise=SIGMA,jpeg=QUALITY")
            try:
                fields[key] = None if (key == "jpeg" and number == "none") else (
                    int(number) if key in ("jpeg", "seed") else float(number))
            except ValueError:
                raise ValueError(f"degradation field {key}={number} is not a number") from None
        return cls(**fields)


# "strong": clearly visible blur, noise and blocking on the LR image (x3), yet an SR network can still recover
# structure; chosen by eye on Set5, not taken from a paper.
DEGRADATIONS = {"clean": Degradation(), "strong": Degradation(blur=1.0, noise=8.0, jpeg=40)}


def image_seed(name: str, seed: int) -> np.random.SeedSequence:
    """The seed of one image's degradation: `seed` combined with a CRC-32 of its file name (stable across runs,
    machines and Python's hash randomisation), so an image gets the same noise wherever it is loaded."""
    return np.random.SeedSequence([seed, zlib.crc32(name.encode())])


def degrade_lr(lr: np.ndarray, degradation: Degradation, name: str = "") -> np.ndarray:
    """Apply `degradation` to a (bicubic) LR image: Gaussian blur, then Gaussian noise, then JPEG.

    Args:
        lr: uint8 HxWx3 RGB.
        degradation: the strengths; a clean one returns `lr` unchanged.
        name: the image's name; with `degradation.seed` it seeds the noise (`image_seed`).

    Returns:
        uint8 HxWx3 RGB.
    """
    if degradation.is_clean:
        return lr
    image = lr.astype(np.float64)
    if degradation.blur > 0:  # reflect at the borders, channels blurred apart
        image = gaussian_filter(image, sigma=(degradation.blur, degradation.blur, 0), mode="reflect", truncate=3.0)
    if degradation.noise > 0:
        image = image + np.random.default_rng(image_seed(name, degradation.seed)).normal(0.0, degradation.noise,
                                                                                         image.shape)
    image = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    if degradation.jpeg is not None:  # PIL's encoder: 4:2:0 chroma subsampling, as most cameras and the web
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=degradation.jpeg)
        image = np.asarray(Image.open(buffer).convert("RGB"))
    return np.ascontiguousarray(image)


def degrade(hr: np.ndarray, scale: int, degradation: Degradation | None = None,
            name: str = "") -> tuple[np.ndarray, np.ndarray]:
    """HR -> (cropped HR, LR): crop to a multiple of `scale`, antialiased bicubic downscale, then `degradation`.

    Args:
        hr: uint8 HxWx3.
        scale: 2, 3 or 4.
        degradation: None or a clean one for the benchmarks' bicubic LR; else blur/noise/JPEG (`degrade_lr`).
        name: the image's name, which seeds its noise (the file name; the same in every run).

    Returns:
        (hr_cropped uint8 (s*h)x(s*w)x3, lr uint8 hxwx3).

    Raises:
        ValueError: the image is smaller than `scale` pixels on a side.
    """
    hr = modcrop(hr, scale)
    if hr.shape[0] < scale or hr.shape[1] < scale:
        raise ValueError(f"image of {hr.shape[1]}x{hr.shape[0]} px is too small to downscale by {scale}")
    lr = bicubic_resize(hr, hr.shape[1] // scale, hr.shape[0] // scale)
    return hr, lr if degradation is None else degrade_lr(lr, degradation, name)


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """The edge-to-inside conversion.

    Args:
        image: uint8 HxWx3 RGB.

    Returns:
        float32 1x3xHxW RGB in [0, 1] (a copy).
    """
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).unsqueeze(0).float().div_(255.0)


def to_uint8(tensor: torch.Tensor) -> np.ndarray:
    """The inside-to-edge conversion.

    Args:
        tensor: float 1x3xHxW RGB, any range and device.

    Returns:
        uint8 HxWx3 RGB: clamped to [0, 1], times 255, rounded.
    """
    array = tensor.detach().float().clamp(0.0, 1.0).mul(255.0).round().squeeze(0).permute(1, 2, 0)
    return array.to(torch.uint8).cpu().numpy()


@dataclass(frozen=True)
class _Pair:
    lr: np.ndarray
    hr: np.ndarray
    clean_lr: np.ndarray  # the bicubic LR before the degradation (the same array when there is none)


class PatchSampler:
    """Random aligned LR/HR patch pairs from one or more image folders, with the 8 flips/rotations.

    LR images are made once, for the whole image, with `degrade` (so the patches match evaluation exactly, with
    the same `degradation` seeded by the file name); images smaller than one HR patch are skipped with a log
    line. Deterministic for a given seed; the degradation does not change which patches are drawn.

    Example:
        >>> sampler = PatchSampler(["path/to/T91"], scale=3, lr_patch=32, seed=0)
        >>> lr, hr = sampler.batch(16)   # 16x3x32x32 and 16x3x96x96, float32 in [0, 1]
    """

    def __init__(self, folders, scale: int, lr_patch: int, seed: int = 0, degradation: Degradation | None = None):
        """Load and degrade every image of `folders` once.

        Args:
            folders: a folder or a list of folders of HR images.
            scale: the SR factor.
            lr_patch: the LR patch side in pixels; HR patches are `lr_patch * scale`.
            seed: the random stream's seed (`reseed` restarts it).
            degradation: applied to each LR image (None: clean bicubic); its noise is seeded by the file name.

        Raises:
            ValueError: `lr_patch` below 4, or no image large enough for one HR patch.
            FileNotFoundError: a folder is missing or holds no image.
            ImageLoadError: an image cannot be read.
        """
        if lr_patch < 4:
            raise ValueError(f"lr_patch must be at least 4 pixels, got {lr_patch}")
        self.scale, self.lr_patch = scale, lr_patch
        self.pairs: list[_Pair] = []
        for folder in [folders] if isinstance(folders, (str, os.PathLike)) else folders:
            for path in list_images(folder):
                hr = load_image(path)
                if min(hr.shape[:2]) < lr_patch * scale:
                    log.info("skipping %s: %dx%d is smaller than a %d px HR patch",
                             path.name, hr.shape[1], hr.shape[0], lr_patch * scale)
                    continue
                hr, clean = degrade(hr, scale)
                lr = clean if degradation is None else degrade_lr(clean, degradation, path.name)
                self.pairs.append(_Pair(lr=lr, hr=hr, clean_lr=clean))
        if not self.pairs:
            raise ValueError(f"no training image in {folders} is large enough for {lr_patch}x{scale} px patches")
        self.rng = np.random.default_rng(seed)

    def reseed(self, *seed: int) -> None:
        """Restart the random stream (training seeds it with (seed, rank, step)).

        Args:
            *seed: integers, combined by numpy's SeedSequence.
        """
        self.rng = np.random.default_rng(list(seed))

    def batch(self, size: int, with_clean: bool = False) -> tuple[torch.Tensor, ...]:
        """`size` random aligned patch pairs, each under a random one of the 8 flips/rotations.

        Args:
            size: the number of pairs N.
            with_clean: also return the same patches of the clean bicubic LR (what a teacher trained on clean
                inputs is shown in distillation); the random draws are the same either way.

        Returns:
            (LR Nx3xPxP, HR Nx3x(sP)x(sP)) and, with `with_clean`, the clean LR Nx3xPxP; float32 RGB in [0, 1],
            P = lr_patch, s = scale.
        """
        p, s = self.lr_patch, self.scale
        lr_batch = np.empty((size, p, p, 3), np.uint8)
        clean_batch = np.empty((size, p, p, 3), np.uint8) if with_clean else None
        hr_batch = np.empty((size, p * s, p * s, 3), np.uint8)
        images = self.rng.integers(len(self.pairs), size=size)
        transforms = self.rng.integers(8, size=size)
        for i, (index, transform) in enumerate(zip(images, transforms)):
            pair = self.pairs[index]
            y = int(self.rng.integers(pair.lr.shape[0] - p + 1))
            x = int(self.rng.integers(pair.lr.shape[1] - p + 1))
            lr = pair.lr[y : y + p, x : x + p]
            hr = pair.hr[y * s : (y + p) * s, x * s : (x + p) * s]
            lr_batch[i], hr_batch[i] = _dihedral(lr, transform), _dihedral(hr, transform)
            if with_clean:
                clean_batch[i] = _dihedral(pair.clean_lr[y : y + p, x : x + p], transform)
        as_tensor = lambda a: torch.from_numpy(a).permute(0, 3, 1, 2).float().div_(255.0)
        if with_clean:
            return as_tensor(lr_batch), as_tensor(hr_batch), as_tensor(clean_batch)
        return as_tensor(lr_batch), as_tensor(hr_batch)


def _dihedral(patch: np.ndarray, transform: int) -> np.ndarray:
    """One of the 8 symmetries of the square: `transform` in 0..7 = rotation (0-3 quarter turns) x flip."""
    patch = np.rot90(patch, k=transform % 4)
    return patch[:, ::-1] if transform >= 4 else patch
