"""Image-quality metrics as the SR literature computes them, an edge-region PSNR, and the two "dullness"
measures of the app.

Inputs are uint8 HxWx3 RGB arrays (values 0..255). PSNR and SSIM are computed on the Y channel of ITU-R
BT.601 YCbCr with `shave` pixels removed from every border (BasicSR `metrics/psnr_ssim.py`, and the
convention of EDSR/RCAN/XLSR tables).
"""
from __future__ import annotations

import math

import numpy as np
from scipy.ndimage import binary_dilation, sobel
from skimage.color import deltaE_ciede2000, rgb2lab
from skimage.metrics import structural_similarity


def rgb_to_y(image: np.ndarray) -> np.ndarray:
    """The luma of ITU-R BT.601 YCbCr, as MATLAB's rgb2ycbcr but not rounded to uint8.

    Args:
        image: uint8 or float RGB, values 0..255, shape HxWx3 (or ...x3).

    Returns:
        float64 Y in 16..235, shape HxW.
    """
    image = np.asarray(image)
    channel = lambda index: image[..., index].astype(np.float64)  # one HxW float at a time, not an HxWx3 copy
    return 16.0 + (65.481 * channel(0) + 128.553 * channel(1) + 24.966 * channel(2)) / 255.0


def _y_pair(output: np.ndarray, reference: np.ndarray, shave: int) -> tuple[np.ndarray, np.ndarray]:
    if output.shape != reference.shape:
        raise ValueError(f"images differ in shape: {output.shape} vs {reference.shape}")
    a, b = rgb_to_y(output), rgb_to_y(reference)
    if shave:
        if min(a.shape) <= 2 * shave:
            raise ValueError(f"image of {a.shape[1]}x{a.shape[0]} px is too small to shave {shave} px per border")
        a, b = a[shave:-shave, shave:-shave], b[shave:-shave, shave:-shave]
    return a, b


def psnr_y(output: np.ndarray, reference: np.ndarray, shave: int = 0) -> float:
    """Y-channel PSNR in dB (peak 255), the SR literature's convention.

    Args:
        output: uint8 HxWx3 RGB, the image scored.
        reference: uint8 HxWx3 RGB ground truth, the same shape.
        shave: pixels removed from every border before scoring (the scale, by convention).

    Returns:
        PSNR in dB; `inf` for identical images.

    Raises:
        ValueError: the shapes differ, or the image is too small to shave `shave` pixels per border.
    """
    a, b = _y_pair(output, reference, shave)
    mse = float(np.mean((a - b) ** 2))
    return math.inf if mse == 0.0 else 10.0 * math.log10(255.0**2 / mse)


def edge_mask(reference_y: np.ndarray, percentile: float = 90.0, dilation: int = 2) -> np.ndarray:
    """The pixels near strong gradients: Sobel magnitude of `reference_y` above its `percentile`-th percentile,
    dilated by `dilation` pixels (a (2 * dilation + 1)^2 square).

    Args:
        reference_y: float HxW luma of the ground truth.
        percentile: 0..100; 90 keeps the strongest 10% of gradients before the dilation.
        dilation: pixels added around each kept pixel (0: none).

    Returns:
        bool HxW; all False for an image without any gradient.
    """
    magnitude = np.hypot(sobel(reference_y, axis=0, mode="reflect"), sobel(reference_y, axis=1, mode="reflect"))
    mask = magnitude > np.percentile(magnitude, percentile)  # strict: a flat image has no edge pixel
    if dilation:
        mask = binary_dilation(mask, structure=np.ones((2 * dilation + 1,) * 2, bool))
    return mask


def edge_psnr_y(output: np.ndarray, reference: np.ndarray, shave: int = 0, percentile: float = 90.0,
                dilation: int = 2) -> float:
    """Y-PSNR in dB restricted to the edge region of the ground truth (`edge_mask` of its shaved Y): where
    sharpening, ringing and blur differ most, and where a plain PSNR averages them away among flat pixels.

    Args:
        output: uint8 HxWx3 RGB, the image scored.
        reference: uint8 HxWx3 RGB ground truth, the same shape.
        shave: pixels removed from every border before anything else.
        percentile: see `edge_mask`.
        dilation: see `edge_mask`.

    Returns:
        PSNR in dB over the edge pixels; `inf` when they are identical; `nan` when the reference has no edge.

    Raises:
        ValueError: the shapes differ, or the image is too small to shave.
    """
    a, b = _y_pair(output, reference, shave)
    mask = edge_mask(b, percentile, dilation)
    if not mask.any():
        return math.nan
    mse = float(np.mean((a[mask] - b[mask]) ** 2))
    return math.inf if mse == 0.0 else 10.0 * math.log10(255.0**2 / mse)


def ssim_y(output: np.ndarray, reference: np.ndarray, shave: int = 0) -> float:
    """Y-channel SSIM (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5, C1 = (0.01 * 255)^2,
    C2 = (0.03 * 255)^2), from scikit-image.

    Args:
        output: uint8 HxWx3 RGB, the image scored.
        reference: uint8 HxWx3 RGB ground truth, the same shape.
        shave: pixels removed from every border before scoring.

    Returns:
        the mean SSIM, at most 1.

    Raises:
        ValueError: the shapes differ, the image is too small to shave, or (scikit-image) smaller than the
            11x11 window.
    """
    a, b = _y_pair(output, reference, shave)
    if a.size <= SSIM_STRIP_PIXELS:
        return float(structural_similarity(a, b, data_range=255.0, gaussian_weights=True, sigma=1.5,
                                           use_sample_covariance=False))
    return _ssim_in_strips(a, b)


SSIM_STRIP_PIXELS = 1 << 21  # above this, SSIM runs in horizontal strips (about 10 float64 copies per strip)
_SSIM_RADIUS = 5  # the Gaussian window's radius: int(3.5 * 1.5 + 0.5), scikit-image's truncate and sigma


def _ssim_in_strips(a: np.ndarray, b: np.ndarray) -> float:
    """The same mean SSIM as one call on the whole image, computed strip by strip: each strip carries
    _SSIM_RADIUS rows of context on both sides, so every kept row of the SSIM map sees exactly the pixels it
    would see in the whole image; the map's border of _SSIM_RADIUS pixels is left out of the mean, as
    scikit-image does."""
    height, width = a.shape
    rows = max(4 * _SSIM_RADIUS, SSIM_STRIP_PIXELS // width)
    total, count = 0.0, 0
    for top in range(_SSIM_RADIUS, height - _SSIM_RADIUS, rows):
        bottom = min(top + rows, height - _SSIM_RADIUS)
        lo, hi = top - _SSIM_RADIUS, min(height, bottom + _SSIM_RADIUS)
        _, ssim_map = structural_similarity(a[lo:hi], b[lo:hi], data_range=255.0, gaussian_weights=True, sigma=1.5,
                                            use_sample_covariance=False, full=True)
        kept = ssim_map[top - lo : bottom - lo, _SSIM_RADIUS : width - _SSIM_RADIUS]
        total += float(kept.sum(dtype=np.float64))
        count += kept.size
    return total / count


def brightness_ratio(output: np.ndarray, reference: np.ndarray) -> float:
    """Mean brightness (mean of all RGB values) of `output` over that of `reference`: < 1 means darker.

    Args:
        output: uint8 RGB image.
        reference: uint8 RGB image (any shape; only the means are compared).

    Returns:
        the ratio; 1 when both are black, `inf` when only the reference is.
    """
    reference_mean = float(np.mean(reference, dtype=np.float64))
    if reference_mean == 0.0:
        return 1.0 if float(np.mean(output, dtype=np.float64)) == 0.0 else math.inf
    return float(np.mean(output, dtype=np.float64)) / reference_mean


def delta_e(output: np.ndarray, reference: np.ndarray) -> float:
    """Mean CIEDE2000 colour difference (CIELAB, D65) between two RGB images; about 2.3 is just noticeable.

    Args:
        output: uint8 HxWx3 RGB.
        reference: uint8 HxWx3 RGB, the same shape.

    Returns:
        the mean Delta E 2000 over all pixels.

    Raises:
        ValueError: the shapes differ.
    """
    if output.shape != reference.shape:
        raise ValueError(f"images differ in shape: {output.shape} vs {reference.shape}")
    return float(np.mean(deltaE_ciede2000(rgb2lab(output), rgb2lab(reference))))
