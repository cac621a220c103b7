"""Image loading, the SR degradation (HR -> LR) and the random patch sampler used for training.

Convention: arrays at this module's edges are uint8 HxWx3 RGB; nothing here returns float tensors except
`PatchSampler.batch`, which returns float32 NCHW RGB in [0, 1] (the convention inside `sr/`).
"""
from __future__ import annotations

import io
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

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
    name = "<bytes>" if isinstance(source, (bytes, bytearray)) else str(source)
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
        raise ImageLoadError(f"{Path(name).name} is not an image we can read ({error})") from error
    except (OSError, ValueError, SyntaxError) as error:  # truncated or corrupt data inside a valid header
        raise ImageLoadError(f"{Path(name).name} is corrupt or truncated ({error})") from error


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


def degrade(hr: np.ndarray, scale: int) -> tuple[np.ndarray, np.ndarray]:
    """HR -> (cropped HR, LR): crop to a multiple of `scale`, then antialiased bicubic downscale.

    Args:
        hr: uint8 HxWx3.
        scale: 2, 3 or 4.

    Returns:
        (hr_cropped uint8 (s*h)x(s*w)x3, lr uint8 hxwx3).

    Raises:
        ValueError: the image is smaller than `scale` pixels on a side.
    """
    hr = modcrop(hr, scale)
    if hr.shape[0] < scale or hr.shape[1] < scale:
        raise ValueError(f"image of {hr.shape[1]}x{hr.shape[0]} px is too small to downscale by {scale}")
    return hr, bicubic_resize(hr, hr.shape[1] // scale, hr.shape[0] // scale)


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


class PatchSampler:
    """Random aligned LR/HR patch pairs from one or more image folders, with the 8 flips/rotations.

    LR images are made once, for the whole image, with `degrade` (so the patches match evaluation exactly);
    images smaller than one HR patch are skipped with a log line. Deterministic for a given seed.

    Example:
        >>> sampler = PatchSampler(["path/to/T91"], scale=3, lr_patch=32, seed=0)
        >>> lr, hr = sampler.batch(16)   # 16x3x32x32 and 16x3x96x96, float32 in [0, 1]
    """

    def __init__(self, folders, scale: int, lr_patch: int, seed: int = 0):
        """Load and degrade every image of `folders` once.

        Args:
            folders: a folder or a list of folders of HR images.
            scale: the SR factor.
            lr_patch: the LR patch side in pixels; HR patches are `lr_patch * scale`.
            seed: the random stream's seed (`reseed` restarts it).

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
                hr, lr = degrade(hr, scale)
                self.pairs.append(_Pair(lr=lr, hr=hr))
        if not self.pairs:
            raise ValueError(f"no training image in {folders} is large enough for {lr_patch}x{scale} px patches")
        self.rng = np.random.default_rng(seed)

    def reseed(self, *seed: int) -> None:
        """Restart the random stream (training seeds it with (seed, rank, step)).

        Args:
            *seed: integers, combined by numpy's SeedSequence.
        """
        self.rng = np.random.default_rng(list(seed))

    def batch(self, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`size` random aligned patch pairs, each under a random one of the 8 flips/rotations.

        Args:
            size: the number of pairs N.

        Returns:
            (LR Nx3xPxP, HR Nx3x(sP)x(sP)), float32 RGB in [0, 1], P = lr_patch, s = scale.
        """
        p, s = self.lr_patch, self.scale
        lr_batch = np.empty((size, p, p, 3), np.uint8)
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
        as_tensor = lambda a: torch.from_numpy(a).permute(0, 3, 1, 2).float().div_(255.0)
        return as_tensor(lr_batch), as_tensor(hr_batch)


def _dihedral(patch: np.ndarray, transform: int) -> np.ndarray:
    """One of the 8 symmetries of the square: `transform` in 0..7 = rotation (0-3 quarter turns) x flip."""
    patch = np.rot90(patch, k=transform % 4)
    return patch[:, ::-1] if transform >= 4 else patch
