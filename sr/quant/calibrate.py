"""Streaming INT8 calibration: per-tensor statistics over calibration patches, and the threshold searches.

Every activation tensor of the ONNX graph is observed through ONNX Runtime, one small batch at a time, so memory
does not grow with the sample count (onnxruntime's own histogram calibrators keep every activation of every
sample). Two passes: the first finds each tensor's min/max, the second fills a 2048-bin histogram of |x| over
[0, amax]. The threshold searches are pure numpy functions of that histogram, each the counterpart of a
function in NVIDIA ModelOpt's `modelopt.torch.quantization.calib.histogram` (the oracle the tests call):

- `minmax`: amax itself;
- `entropy`: `_compute_amax_entropy`, the KL-divergence search of Migacz, "8-bit Inference with TensorRT"
  (GTC 2017) as NVIDIA publishes it: the zero bin is first replaced by bin 1;
- `entropy-zeros`: the same search counting the zero bin, i.e. the talk taken literally;
- `percentile`: `_compute_amax_percentile`, the lower edge of the bin where the CDF reaches the percentile;
- `mse`: `_compute_amax_mse`, the bin centre (from bin 128) minimising the MSE of quantized bin centres.

Calibration images reach the network as a deployed model sees them: bicubic-downscaled by the model's scale
(`CalibrationInputs.DOWNSCALED`), unless `raw` crops are asked for. Images are uint8 HxWx3; the graph sees
float32 NCHW in [0, 1].
"""
from __future__ import annotations

import hashlib
import io
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import onnx
import onnxruntime as ort

from ..choices import Choice
from ..data import degrade, list_images, load_image
from .quantspec import float_activations
from ..store import PROJECT_ROOT, Memo, file_identity, write_atomic

log = logging.getLogger(__name__)

NUM_BINS = 2048  # TensorRT's and ModelOpt's histogram size
NUM_QUANTIZED_BINS = 128  # int8 magnitudes of a signed tensor (ModelOpt: 1 << (num_bits - 1))
START_BIN = 128  # the smallest candidate threshold of the entropy and mse searches (ModelOpt's start_bin)
DEFAULT_CALIB_DIR = PROJECT_ROOT / "calib_data"
MIN_SAMPLES, MAX_SAMPLES = 10, 1000


class Method(Choice, noun="calibration method"):
    """How a tensor's threshold is chosen from its |x| histogram."""

    MINMAX = "minmax"
    ENTROPY = "entropy"  # ModelOpt / pytorch-quantization: the zero spike is flattened (bins[0] = bins[1])
    ENTROPY_ZEROS = "entropy-zeros"  # the GTC 2017 loop literally: the zero spike of a ReLU output counts
    PERCENTILE = "percentile"
    MSE = "mse"
    AUTO = "auto"  # every search above from one set of statistics, scored on held-back images (sr.run.quantize)


class CalibrationInputs(Choice, noun="calibration input"):
    """What the network is fed during calibration."""

    DOWNSCALED = "downscaled"  # crops of the images bicubic-downscaled by the model's scale, as in deployment
    RAW = "raw"  # crops of the images as they are (full-resolution photo statistics)


@dataclass
class CalibrationConfig:
    """One calibration: method, sample count, where the images come from and how they are fed."""

    method: Method = Method.ENTROPY
    samples: int = 100
    patch_size: int = 64  # side of the LR patches fed to the network
    seed: int = 0
    percentile: float = 99.99  # only for Method.PERCENTILE (99.9 / 99.99 / 99.999)
    data: str | None = None  # image folder; None = calib_data/ (filled from scikit-image's photos)
    inputs: CalibrationInputs = CalibrationInputs.DOWNSCALED
    # Experiments: a calibration set that differs from what inference sees. value -> gain * value, then
    # contrast around mid grey; a wrong preprocessing normalisation is a gain too.
    gain: float = 1.0
    contrast: float = 1.0

    def __post_init__(self):
        self.method = Method.parse(self.method)
        self.inputs = CalibrationInputs.parse(self.inputs)
        if isinstance(self.samples, bool) or not isinstance(self.samples, int) \
                or not MIN_SAMPLES <= self.samples <= MAX_SAMPLES:
            raise ValueError(f"samples must be an integer from {MIN_SAMPLES} to {MAX_SAMPLES}, got {self.samples!r}")
        if self.patch_size < 8:
            raise ValueError(f"patch_size must be at least 8 pixels, got {self.patch_size}")
        if not 50.0 < self.percentile < 100.0:
            raise ValueError(f"percentile must be between 50 and 100 (e.g. 99.99), got {self.percentile}")
        for name in ("gain", "contrast"):
            if not 0.0 < getattr(self, name) <= 4.0:
                raise ValueError(f"{name} must be in (0, 4] (1 = unchanged), got {getattr(self, name)}")
        if self.data is not None:
            self.data = str(self.data)

    @property
    def transformed(self) -> bool:
        """True when the calibration images are altered (gain or contrast) before use."""
        return self.gain != 1.0 or self.contrast != 1.0


@dataclass
class TensorStats:
    """What the two calibration passes saw of one tensor: |x| histogram over [0, amax]."""

    name: str
    observed_min: float
    observed_max: float
    histogram: np.ndarray = field(repr=False)  # int64 counts, NUM_BINS bins of |x| over [0, amax]

    @property
    def amax(self) -> float:
        """The largest |x| seen."""
        return max(abs(self.observed_min), abs(self.observed_max))

    @property
    def bin_width(self) -> float:
        """Width of one histogram bin (0 for an all-zero tensor)."""
        return self.amax / len(self.histogram) if self.amax > 0 else 0.0


@dataclass
class TensorRange:
    """The range chosen for one tensor, and how much of the calibration data falls outside it."""

    name: str
    low: float
    high: float
    observed_min: float
    observed_max: float
    clipped_fraction: float  # share of calibration values outside [low, high]
    method: str

    def to_dict(self) -> dict:
        """The fields as a JSON-ready dict."""
        return {"name": self.name, "observed_min": self.observed_min, "observed_max": self.observed_max,
                "low": self.low, "high": self.high, "clipped_fraction": self.clipped_fraction, "method": self.method}


# ----------------------------------------------------------------------------------------------------------------
# Threshold searches: pure functions of a |x| histogram of equal-width bins starting at 0; each returns the
# threshold in bin widths (threshold = bins * bin_width), as ModelOpt's return `calib_bin_edges[i]` or a centre.


def _prefix_sums(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Prefix sums of the counts, of the non-empty bins and of c log c (each with a leading 0)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        c_log_c = np.where(counts > 0, counts * np.log(np.where(counts > 0, counts, 1.0)), 0.0)
    return (np.concatenate([[0.0], np.cumsum(counts)]), np.concatenate([[0], np.cumsum(counts > 0)]),
            np.concatenate([[0.0], np.cumsum(c_log_c)]))


def entropy_threshold_bins(histogram: np.ndarray, num_quantized_bins: int = NUM_QUANTIZED_BINS,
                           start_bin: int = START_BIN, count_zeros: bool = False) -> float:
    """The KL-divergence threshold search (Migacz, GTC 2017), for all candidates at once.

    As ModelOpt's `_compute_amax_entropy`: unless `count_zeros` (the talk taken literally), bin 0 first gets bin
    1's count. After a ReLU, bin 0 holds every exact zero (often 10-60 % of the values); left in, that spike
    dominates P, and Q matches it best with narrow levels: a small threshold that clips the tail.

    For every candidate i in [start_bin, len(histogram)]:

        |<------------------- histogram of |x| (2048 bins) ------------------->|
        |<------- reference P: bins[0:i] ------->| + outliers sum(bins[i:]) added to P[i-1]
        |<- Q: bins[0:i] merged into 128 levels (bin t -> level floor(t * 128 / i)), each level's count
              spread evenly over its non-empty bins; empty bins stay empty ->|

    and the threshold minimises KL(P || Q) (infinite where Q = 0 < P; ties go to the largest, ModelOpt's
    `last_argmin`). Instead of building P and Q per candidate, KL is expanded into prefix sums: C(i) = sum(bins[0:i]),
    S_j and n_j the count and the number of non-empty bins of level j, m_j = S_j / n_j and Z the total,
        Z * KL(i) = sum_{t < i-1} c_t log(c_t / Z) + L log(L / Z) - sum_j S_j log(m_j / C(i)) - T log(m_last / C(i))
    where T = sum(bins[i:]) and L = c_{i-1} + T; that is O(levels) per candidate instead of O(bins).

    Args:
        histogram: counts of |x| in equal bins from 0.
        num_quantized_bins: quantized levels of one sign (128 for int8).
        start_bin: the smallest candidate.
        count_zeros: keep bin 0 as collected (`entropy-zeros`).

    Returns:
        the number of bins i below the threshold (threshold = i * bin_width); len(histogram) when empty.
    """
    counts = np.array(histogram, dtype=np.float64)
    num_bins = counts.size
    if not count_zeros and num_bins > 1:
        counts[0] = counts[1]
    total = counts.sum()
    if total == 0 or num_bins <= start_bin:
        return float(num_bins)
    prefix, nonzero_prefix, c_log_c_prefix = _prefix_sums(counts)
    widths = np.arange(start_bin, num_bins + 1)  # candidate i
    levels = np.arange(num_quantized_bins + 1)
    # first bin of level j: ceil(j * i / levels) (bin t is in level j iff j * i <= t * levels < (j + 1) * i)
    bounds = -((-levels[None, :] * widths[:, None]) // num_quantized_bins)
    level_sum = np.diff(prefix[bounds], axis=1)  # S_j, K x levels
    level_nonzero = np.diff(nonzero_prefix[bounds], axis=1)  # n_j
    inside = prefix[widths]  # C(i)
    tail = total - inside  # T
    last = counts[widths - 1] + tail  # L
    with np.errstate(divide="ignore", invalid="ignore"):
        level_mean = np.where(level_nonzero > 0, level_sum / np.maximum(level_nonzero, 1), 0.0)
        log_q = np.where(level_sum > 0, np.log(level_mean / inside[:, None]), 0.0)
        reference = (c_log_c_prefix[widths - 1] - np.log(total) * prefix[widths - 1]
                     + np.where(last > 0, last * np.log(last / total), 0.0))
        cross = (level_sum * log_q).sum(axis=1) + np.where(tail > 0, tail * log_q[:, -1], 0.0)
    divergence = (reference - cross) / total
    divergence[(counts[widths - 1] == 0) & (tail > 0)] = np.inf
    best = divergence.size - 1 - int(np.argmin(divergence[::-1]))
    return float(widths[best])


def percentile_threshold_bins(histogram: np.ndarray, percentile: float) -> float:
    """As ModelOpt's `_compute_amax_percentile`: the lower edge of the first bin where the CDF reaches
    `percentile` % (so the bin that crosses the percentile is itself clipped).

    Args:
        histogram: counts of |x| in equal bins from 0.
        percentile: in (0, 100].

    Returns:
        the threshold in bins; len(histogram) when empty.
    """
    counts = np.asarray(histogram, dtype=np.float64)
    total = counts.sum()
    if total == 0:
        return float(counts.size)
    cdf = np.cumsum(counts / total)
    return float(min(int(np.searchsorted(cdf, percentile / 100.0)), counts.size))


def mse_threshold_bins(histogram: np.ndarray, num_bits: int = 8, start_bin: int = START_BIN,
                       chunk: int = 256) -> float:
    """As ModelOpt's `_compute_amax_mse`: each candidate amax is a bin centre c_i (i from `start_bin` to the last
    bin but one); the bin centres are fake-quantized with it (symmetric, narrow range: round(c * 127 / amax)
    clamped to +-127) and the count-weighted squared error is summed; the first minimum wins.

    Args:
        histogram: counts of |x| in equal bins from 0.
        num_bits: quantization bits (8).
        start_bin: the smallest candidate.
        chunk: candidates evaluated per numpy block (memory: chunk x bins doubles).

    Returns:
        the threshold in bins (a bin centre, i + 0.5); len(histogram) when empty or too short.
    """
    counts = np.asarray(histogram, dtype=np.float64)
    num_bins = counts.size
    if counts.sum() == 0 or num_bins <= start_bin + 1:
        return float(num_bins)
    levels = float((1 << (num_bits - 1)) - 1)
    centres = np.arange(num_bins, dtype=np.float64) + 0.5
    errors = []
    for first in range(start_bin, num_bins - 1, chunk):
        amax = centres[first : min(first + chunk, num_bins - 1), None]
        scale = levels / amax
        quantized = np.clip(np.round(centres[None, :] * scale), -levels, levels) / scale
        errors.append(((quantized - centres[None, :]) ** 2 * counts[None, :]).sum(axis=1))
    return float(centres[start_bin + int(np.argmin(np.concatenate(errors)))])


SEARCHES = (Method.ENTROPY, Method.ENTROPY_ZEROS, Method.PERCENTILE, Method.MSE)  # the histogram searches


def threshold_bins(histogram: np.ndarray, method: Method, percentile: float = 99.99) -> float:
    """The threshold, in bins, that a histogram search picks (the searches are looked up at call time).

    Args:
        histogram: counts of |x| in equal bins from 0.
        method: one of SEARCHES.
        percentile: for Method.PERCENTILE.

    Returns:
        the threshold in bin widths.

    Raises:
        ValueError: unknown method, or minmax (which needs no histogram).
    """
    method = Method.parse(method)
    if method is Method.ENTROPY:
        return entropy_threshold_bins(histogram)
    if method is Method.ENTROPY_ZEROS:
        return entropy_threshold_bins(histogram, count_zeros=True)
    if method is Method.PERCENTILE:
        return percentile_threshold_bins(histogram, percentile)
    if method is Method.MSE:
        return mse_threshold_bins(histogram)
    raise ValueError(f"{method.value} is not a histogram search; choose one of: "
                     f"{', '.join(m.value for m in SEARCHES)}")


def threshold(stats: TensorStats, method: Method, percentile: float = 99.99) -> float:
    """The symmetric threshold (amax) that `method` picks for a tensor.

    Args:
        stats: the tensor's statistics.
        method: the search.
        percentile: for Method.PERCENTILE.

    Returns:
        the threshold, in the tensor's units.

    Raises:
        ValueError: unknown method.
    """
    method = Method.parse(method)
    if method is Method.MINMAX or stats.amax == 0.0:
        return stats.amax
    return threshold_bins(stats.histogram, method, percentile) * stats.bin_width


def clipped_energy(stats: TensorStats, low: float, high: float) -> float:
    """Share of a tensor's signal energy (sum of x^2 over the calibration values) that the range cuts off: the
    energy of what clipping removes, sum of (|x| - limit)^2 over the values beyond it, from the |x| histogram
    (bin centres, the bins wholly beyond the limit, as `clipped_fraction` counts them); for one-signed tensors
    the side that cannot be clipped is ignored. (It used to count the whole x^2 of every clipped value, so a
    Softmax's 1s clipped to 0.9995 were said to lose 81% of its energy.)"""
    if stats.histogram.sum() == 0 or stats.bin_width == 0:
        return 0.0
    limit = max(abs(low), abs(high)) if stats.observed_min < 0 else high
    centres = (np.arange(len(stats.histogram)) + 0.5) * stats.bin_width
    energy = float(np.sum(stats.histogram * centres ** 2))
    first_clipped = int(np.ceil(limit / stats.bin_width - 1e-9))
    cut = stats.histogram[first_clipped:] * np.maximum(centres[first_clipped:] - limit, 0.0) ** 2
    return float(np.sum(cut)) / energy if energy else 0.0


def clipped_fraction(stats: TensorStats, low: float, high: float) -> float:
    """Share of the calibration values outside [low, high], estimated from the |x| histogram.

    Exact at bin edges; for one-signed tensors the side that cannot be clipped is ignored.

    Args:
        stats: the tensor's statistics.
        low, high: the range.

    Returns:
        a fraction in [0, 1].
    """
    total = stats.histogram.sum()
    if total == 0 or stats.bin_width == 0:
        return 0.0
    limit = max(abs(low), abs(high)) if stats.observed_min < 0 else high
    first_clipped = int(np.ceil(limit / stats.bin_width - 1e-9))
    return float(stats.histogram[first_clipped:].sum() / total)


def choose_ranges(stats: Sequence[TensorStats], method: Method, symmetric: bool,
                  percentile: float = 99.99) -> dict[str, TensorRange]:
    """One range per tensor.

    Symmetric (TensorRT): [-T, T]. Asymmetric (uint8): [max(min, -T), min(max, T)], always including 0 so that
    zero is exactly representable.

    Args:
        stats: the tensors' statistics.
        method: the threshold search.
        symmetric: the scheme's activations are symmetric.
        percentile: for Method.PERCENTILE.

    Returns:
        {tensor name: TensorRange}, in the order of `stats`.
    """
    method = Method.parse(method)
    ranges = {}
    for item in stats:
        amax = threshold(item, method, percentile)
        if symmetric:
            low, high = -amax, amax
        else:
            low, high = min(0.0, max(item.observed_min, -amax)), max(0.0, min(item.observed_max, amax))
        ranges[item.name] = TensorRange(item.name, float(low), float(high), item.observed_min, item.observed_max,
                                        clipped_fraction(item, low, high), method.value)
    return ranges


# ----------------------------------------------------------------------------------------------------------------
# Calibration data.

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


# ----------------------------------------------------------------------------------------------------------------
# Observing the tensors through ONNX Runtime.


def activation_tensors(model: onnx.ModelProto) -> list[str]:
    """Every float tensor that a real INT8 deployment quantizes: the graph input and each node output, in graph
    order; constants are left out (initializers, Constant outputs, and what Identity nodes make of them), and so
    are integer tensors (an exporter's shape arithmetic: Shape, Gather, Concat of int64 pads) and masks.

    Args:
        model: the FP32 ONNX model.

    Returns:
        the tensor names.
    """
    constants = {init.name for init in model.graph.initializer}
    floating = float_activations(model)
    names = [model.graph.input[0].name]
    for node in model.graph.node:
        if node.op_type == "Constant" or (node.op_type == "Identity" and node.input[0] in constants):
            constants.update(node.output)
            continue
        names.extend(out for out in node.output if out and out not in constants and out in floating)
    return names


def observing_session(model_path: str | os.PathLike, tensors: Sequence[str], threads: int = 0) -> ort.InferenceSession:
    """An ONNX Runtime session of the model that also returns `tensors` as outputs (basic optimisations only,
    so every observed tensor survives).

    Args:
        model_path: the FP32 ONNX model.
        tensors: tensor names to expose.
        threads: intra-op threads (0: ONNX Runtime's default).

    Returns:
        the session.
    """
    model = onnx.load(str(model_path))
    existing = {output.name for output in model.graph.output}
    for name in tensors:
        if name not in existing:
            model.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC  # observed tensors stay outputs
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _batches(patches: Iterable[np.ndarray], size: int) -> Iterator[np.ndarray]:
    batch: list[np.ndarray] = []
    for patch in patches:
        if batch and patch.shape != batch[0].shape:
            yield np.concatenate(batch)
            batch = []
        batch.append(patch)
        if len(batch) == size:
            yield np.concatenate(batch)
            batch = []
    if batch:
        yield np.concatenate(batch)


def collect_statistics(model_path: str | os.PathLike, patches: Callable[[], Iterable[np.ndarray]],
                       num_samples: int, threads: int = 0, batch_size: int = 8,
                       progress: Callable[[float, str], None] | None = None) -> list[TensorStats]:
    """Stream the calibration patches through the model twice: min/max, then |x| histograms over [0, amax].

    Args:
        model_path: the FP32 ONNX model.
        patches: a callable returning a fresh iterable of float32 1x3xPxP patches (called once per pass).
        num_samples: how many patches each pass yields (for the progress fraction).
        progress: called with (fraction done, message).

    Returns:
        one TensorStats per activation tensor, in graph order.
    """
    model = onnx.load(str(model_path), load_external_data=False)
    names = activation_tensors(model)
    session = observing_session(model_path, names, threads)
    input_name = session.get_inputs()[0].name
    if session.get_inputs()[0].shape[0] == 1:  # a model exported with batch 1 takes one patch at a time
        batch_size = 1
    outputs = [o.name for o in session.get_outputs()]
    index = {name: outputs.index(name) if name in outputs else None for name in names}
    low = {name: np.inf for name in names}
    high = {name: -np.inf for name in names}
    passes = 2  # every method's statistics are the histograms (minmax's too: they serve the coverage and plots)

    def run_pass(handle: Callable[[str, np.ndarray], None], number: int) -> None:
        for done, batch in enumerate(_batches(patches(), batch_size), start=1):
            values = session.run(None, {input_name: batch})
            tensors = [(name, batch if name == input_name else values[index[name]]) for name in names]
            # numpy releases the GIL in these array loops: one thread per core halves the histogram time
            list(workers.map(lambda item: handle(*item), tensors))
            if progress is not None:
                progress((number + min(1.0, done * batch_size / max(1, num_samples))) / passes,
                         f"calibration pass {number + 1} of {passes}")

    workers = ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1)))

    def observe_range(name: str, value: np.ndarray) -> None:
        low[name] = min(low[name], float(value.min()))
        high[name] = max(high[name], float(value.max()))

    run_pass(observe_range, 0)
    histograms = {name: np.zeros(NUM_BINS, np.int64) for name in names}
    scale = {name: (NUM_BINS / max(abs(low[name]), abs(high[name]))) if max(abs(low[name]), abs(high[name])) > 0
             else 0.0 for name in names}

    def observe_histogram(name: str, value: np.ndarray) -> None:
        scaled = np.abs(value.ravel())
        scaled *= np.float32(scale[name])
        bins = scaled.astype(np.int32)
        np.minimum(bins, NUM_BINS - 1, out=bins)
        histograms[name] += np.bincount(bins, minlength=NUM_BINS)

    run_pass(observe_histogram, 1)
    workers.shutdown()
    return [TensorStats(name, low[name], high[name], histograms[name]) for name in names]

