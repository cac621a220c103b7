"""Calibration images and patches: `calib_data/` (filled on first use from scikit-image's photos), a folder or a
list of images, fed as a deployed model sees them (bicubic-downscaled by its scale unless `raw`, the experiment's
gain and contrast), their digest for the cache key, and random patches cut from them."""
from __future__ import annotations

import hashlib
import io
import logging
import os
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from ..data import degrade, list_images, load_image
from ..store import PROJECT_ROOT, Memo, file_identity, write_atomic
from .calibrate import CalibrationConfig, CalibrationInputs

log = logging.getLogger(__name__)

DEFAULT_CALIB_DIR = PROJECT_ROOT / "calib_data"

_SKIMAGE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket",
                   "hubble_deep_field", "immunohistochemistry", "camera", "brick", "grass", "gravel")


def ensure_calibration_images(folder: str | os.PathLike = DEFAULT_CALIB_DIR, crops_per_photo: int = 6,
                              crop_size: int = 256, seed: int = 0) -> list[Path]:
    """The images in `folder`; if it holds none, first fill it with random crops of the photographs that ship
    inside scikit-image (no download). Users may drop their own images in instead.

    Args:
        folder: the calibration folder.
        crops_per_photo, crop_size, seed: how the default crops are cut (256 px: 85 LR px after a x3 downscale,
            room for distinct 64 px patches).

    Returns:
        the image paths, sorted.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        return list_images(folder)
    except FileNotFoundError:
        pass
    from PIL import Image
    from skimage import data as skdata

    rng = np.random.default_rng(seed)
    crops: dict[str, bytes] = {}  # made in full first, so a failure leaves the folder empty, not half-filled
    for name in _SKIMAGE_PHOTOS:
        photo = np.asarray(getattr(skdata, name)())
        if photo.ndim == 2:
            photo = np.repeat(photo[..., None], 3, axis=2)
        photo = photo[..., :3].astype(np.uint8)
        height, width = photo.shape[:2]
        for index in range(crops_per_photo):
            y = int(rng.integers(0, max(1, height - crop_size + 1)))
            x = int(rng.integers(0, max(1, width - crop_size + 1)))
            buffer = io.BytesIO()
            Image.fromarray(photo[y : y + crop_size, x : x + crop_size]).save(buffer, format="PNG")
            crops[f"skimage-{name}-{index}.png"] = buffer.getvalue()
    for file_name, png in crops.items():
        write_atomic(png, folder / file_name)
    log.info("filled %s with crops of scikit-image's photos", folder)
    return list_images(folder)


def load_calibration_images(source: str | os.PathLike | Sequence[np.ndarray] | None) -> list[np.ndarray]:
    """The calibration images as given.

    Args:
        source: a folder, a list of uint8 HxWx3 arrays, or None for the default `calib_data/`.

    Returns:
        uint8 HxWx3 images.

    Raises:
        FileNotFoundError: no such folder, or no image in it.
        ValueError: an empty list.
    """
    if source is None:
        return _load_folder(ensure_calibration_images())
    if isinstance(source, (str, os.PathLike)):
        return _load_folder(list_images(source))
    images = [np.asarray(image) for image in source]
    if not images:
        raise ValueError("no calibration images were given")
    return images


_FOLDERS = Memo(8)  # a folder's files (name, size, mtime) -> its decoded images (read-only)
_PREPARED = Memo(8)  # (ids of those images, how they are fed) -> (the images, the network's inputs)


def _load_folder(paths: list[Path]) -> list[np.ndarray]:
    """Decode a folder's images, remembered while no file changes (the app asks for calib_data/ on every run)."""
    memo = tuple(file_identity(p) for p in paths)

    def decoded() -> list[np.ndarray]:
        images = [load_image(p) for p in paths]
        for image in images:
            image.flags.writeable = False  # shared between callers
        return images

    return _FOLDERS.get(memo, decoded)


def prepare_calibration_images(images: Sequence[np.ndarray], config: CalibrationConfig,
                               scale: int) -> list[np.ndarray]:
    """What the network is fed: each image bicubic-downscaled by `scale` (unless `config.inputs` is raw), then
    the experiment's gain and contrast.

    Args:
        images: uint8 HxWx3 images.
        config: the calibration.
        scale: the model's upscaling factor.

    Returns:
        uint8 HxWx3 images (images too small to downscale are used as they are).
    """
    memo = (tuple(id(image) for image in images), config.inputs, config.gain, config.contrast, scale)
    found = _PREPARED.peek(memo)
    if found is not None and all(a is b for a, b in zip(found[0], images)):  # the very same arrays, not reused ids
        return found[1]
    prepared = []
    for image in images:
        image = np.asarray(image)[..., :3]
        if config.inputs is CalibrationInputs.DOWNSCALED and min(image.shape[:2]) >= 2 * scale:
            image = degrade(image, scale)[1]
        if config.transformed:
            values = (image.astype(np.float32) / 255.0 - 0.5) * config.contrast + 0.5
            image = np.clip(np.rint(values * config.gain * 255.0), 0, 255).astype(np.uint8)
        prepared.append(np.ascontiguousarray(image))
    if all(not image.flags.writeable for image in images):  # the shared folder images: remember the result
        _PREPARED.put(memo, (list(images), prepared))
    return prepared


def images_digest(images: Sequence[np.ndarray]) -> str:
    """A hash of the images' pixels and shapes (part of the cache key).

    Returns:
        16 hex digits.
    """
    digest = hashlib.sha256()
    for image in images:
        digest.update(str(image.shape).encode())
        digest.update(np.ascontiguousarray(image).tobytes())
    return digest.hexdigest()[:16]


def calibration_patches(images: Sequence[np.ndarray], samples: int, patch_size: int | tuple[int, int],
                        seed: int = 0) -> Iterator[np.ndarray]:
    """Random crops of the images, generated lazily and deterministically for a seed.

    Args:
        images: uint8 HxWx3 images, as the network sees them (see `prepare_calibration_images`).
        samples: how many crops.
        patch_size: the crop side (images smaller than that are used whole), or the (height, width) a fixed-size
            model takes (images smaller than that are mirrored at their borders up to it: every patch has the
            size the model accepts).
        seed: the random stream.

    Yields:
        float32 1x3xPxP patches in [0, 1].
    """
    rng = np.random.default_rng(seed)
    patch_y, patch_x = (patch_size, patch_size) if isinstance(patch_size, int) else patch_size
    for _ in range(samples):
        image = images[int(rng.integers(len(images)))]
        height, width = image.shape[:2]
        size_y, size_x = min(patch_y, height), min(patch_x, width)
        y = int(rng.integers(height - size_y + 1))
        x = int(rng.integers(width - size_x + 1))
        patch = image[y : y + size_y, x : x + size_x, :3]
        if not isinstance(patch_size, int) and (size_y, size_x) != (patch_y, patch_x):
            patch = np.pad(patch, ((0, patch_y - size_y), (0, patch_x - size_x), (0, 0)), mode="symmetric")
        yield np.ascontiguousarray(patch.transpose(2, 0, 1)[None], dtype=np.float32) / 255.0
