"""Streaming INT8 calibration: per-tensor statistics over calibration patches, and the threshold searches.

Every activation tensor of the ONNX graph is observed through ONNX Runtime, one small batch at a time, so memory
does not grow with the sample count (onnxruntime's own histogram calibrators keep every activation of every
sample). Two passes: the first finds each tensor's min/max, the second fills a 2048-bin histogram of |x| over
[0, amax] (TensorRT's layout). The threshold searches are pure numpy functions of that histogram:

- `minmax`: amax itself;
- `entropy`: TensorRT's KL-divergence search (Migacz, "8-bit Inference with TensorRT", GTC 2017);
- `percentile`: the |x| value below which `percentile` % of the values lie;
- `mse`: the threshold that minimises the expected quantization MSE (clipping + rounding).

Inputs are uint8 HxWx3 images; the graph sees float32 NCHW in [0, 1].
"""
from __future__ import annotations

import hashlib
import io
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import onnx
import onnxruntime as ort

from .data import list_images, load_image

log = logging.getLogger(__name__)

NUM_BINS = 2048  # TensorRT's histogram size
NUM_QUANTIZED_BINS = 128  # int8 magnitudes
PACKAGE_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CALIB_DIR = PACKAGE_ROOT / "calib_data"
MIN_SAMPLES, MAX_SAMPLES = 10, 1000


def parse_choice(choices: type[Enum], value, noun: str):
    """`choices(value)`, or a ValueError that names the bad value and lists the options."""
    try:
        return choices(value)
    except ValueError:
        options = ", ".join(choice.value for choice in choices)
        raise ValueError(f"unknown {noun} {value!r}; choose one of: {options}") from None


class Method(str, Enum):
    MINMAX = "minmax"
    ENTROPY = "entropy"
    PERCENTILE = "percentile"
    MSE = "mse"

    @classmethod
    def parse(cls, value) -> "Method":
        return parse_choice(cls, value, "calibration method")


@dataclass
class CalibrationConfig:
    method: Method = Method.ENTROPY
    samples: int = 100
    patch_size: int = 64  # side of the LR patches fed to the network
    seed: int = 0
    percentile: float = 99.99  # only for Method.PERCENTILE (99.9 / 99.99 / 99.999)
    data: str | None = None  # image folder; None = calib_data/ (filled from scikit-image's photos)

    def __post_init__(self):
        self.method = Method.parse(self.method)
        if not isinstance(self.samples, int) or not MIN_SAMPLES <= self.samples <= MAX_SAMPLES:
            raise ValueError(f"samples must be an integer from {MIN_SAMPLES} to {MAX_SAMPLES}, got {self.samples!r}")
        if self.patch_size < 8:
            raise ValueError(f"patch_size must be at least 8 pixels, got {self.patch_size}")
        if not 50.0 < self.percentile < 100.0:
            raise ValueError(f"percentile must be between 50 and 100 (e.g. 99.99), got {self.percentile}")


@dataclass
class TensorStats:
    """What the two calibration passes saw of one tensor: |x| histogram over [0, amax]."""

    name: str
    observed_min: float
    observed_max: float
    histogram: np.ndarray = field(repr=False)  # int64 counts, NUM_BINS bins of |x| over [0, amax]

    @property
    def amax(self) -> float:
        return max(abs(self.observed_min), abs(self.observed_max))

    @property
    def bin_width(self) -> float:
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
        return {"name": self.name, "observed_min": self.observed_min, "observed_max": self.observed_max,
                "low": self.low, "high": self.high, "clipped_fraction": self.clipped_fraction, "method": self.method}


# ----------------------------------------------------------------------------------------------------------------
# Threshold searches: pure functions of a |x| histogram; each returns the number of bins kept, i.e. the
# threshold is `bins * bin_width`.


def entropy_threshold_bins(histogram: np.ndarray, num_quantized_bins: int = NUM_QUANTIZED_BINS,
                           start_bin: int = NUM_QUANTIZED_BINS) -> int:
    """TensorRT's entropy calibration (Migacz, "8-bit Inference with TensorRT", GTC 2017), for all candidates at
    once.

    For every candidate i in [start_bin, len(histogram)]:

        |<------------------- histogram of |x| (2048 bins) ------------------->|
        |<------- reference P: bins[0:i] ------->| + outliers sum(bins[i:]) added to P[i-1]
        |<- Q: bins[0:i] merged into 128 levels (bin t -> level floor(t * 128 / i)), each level's count
              spread evenly over its non-empty bins; empty bins stay empty ->|

    and the threshold minimises KL(P || Q). This is the algorithm of the talk and of TensorRT's
    pytorch-quantization / ModelOpt `_compute_amax_entropy`; a candidate whose outliers land in an empty bin
    (Q = 0 where P > 0) has infinite divergence; ties go to the largest threshold (their `last_argmin`).

    Instead of building P and Q per candidate, KL is expanded into prefix sums: with C(i) = sum(bins[0:i]),
    S_j and n_j the count and the number of non-empty bins of level j, m_j = S_j / n_j and Z the total,
        Z * KL(i) = sum_{t < i-1} c_t log(c_t / Z) + L log(L / Z) - sum_j S_j log(m_j / C(i)) - T log(m_last / C(i))
    where T = sum(bins[i:]) and L = c_{i-1} + T; that is O(levels) per candidate instead of O(bins).

    Returns:
        the number of bins i below the threshold (threshold = i * bin_width).
    """
    counts = np.asarray(histogram, dtype=np.float64)
    num_bins = counts.size
    total = counts.sum()
    if total == 0 or num_bins <= start_bin:
        return num_bins
    prefix = np.concatenate([[0.0], np.cumsum(counts)])
    nonzero_prefix = np.concatenate([[0], np.cumsum(counts > 0)])
    with np.errstate(divide="ignore", invalid="ignore"):
        c_log_c = np.where(counts > 0, counts * np.log(np.where(counts > 0, counts, 1.0)), 0.0)
    c_log_c_prefix = np.concatenate([[0.0], np.cumsum(c_log_c)])

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
    return int(widths[best])


def percentile_threshold_bins(histogram: np.ndarray, percentile: float) -> int:
    """Smallest i such that bins[0:i] hold at least `percentile` % of the values."""
    counts = np.asarray(histogram, dtype=np.float64)
    total = counts.sum()
    if total == 0:
        return counts.size
    cumulative = np.cumsum(counts) / total
    return int(min(np.searchsorted(cumulative, percentile / 100.0 - 1e-12) + 1, counts.size))


def mse_threshold_bins(histogram: np.ndarray, num_levels: int = 127, start_bin: int = 16) -> int:
    """Threshold (in bins) minimising the expected MSE of symmetric quantization with `num_levels` steps per side.

    Values are taken at their bin centres c: a value below the threshold T costs the uniform rounding error
    (T / num_levels)^2 / 12, a value above costs its clipping error (c - T)^2. Vectorised over every candidate.
    """
    counts = np.asarray(histogram, dtype=np.float64)
    num_bins = counts.size
    if counts.sum() == 0:
        return num_bins
    centres = np.arange(num_bins) + 0.5  # in bin units
    candidates = np.arange(min(start_bin, num_bins), num_bins + 1)
    # sum over bins t >= T of n_t (c_t - T)^2 = S2 - 2 T S1 + T^2 S0 with suffix sums S_k = sum n_t c_t^k
    suffix = lambda values: np.concatenate([np.cumsum(values[::-1])[::-1], [0.0]])
    s0, s1, s2 = suffix(counts), suffix(counts * centres), suffix(counts * centres**2)
    t = candidates.astype(np.float64)
    clip_error = s2[candidates] - 2 * t * s1[candidates] + t * t * s0[candidates]
    rounding_error = (counts.sum() - s0[candidates]) * (t / num_levels) ** 2 / 12.0
    return int(candidates[int(np.argmin(clip_error + rounding_error))])


def threshold(stats: TensorStats, method: Method, percentile: float = 99.99) -> float:
    """The symmetric threshold (amax) that `method` picks for a tensor."""
    method = Method.parse(method)
    if method is Method.MINMAX or stats.amax == 0.0:
        return stats.amax
    if method is Method.ENTROPY:
        bins = entropy_threshold_bins(stats.histogram)
    elif method is Method.PERCENTILE:
        bins = percentile_threshold_bins(stats.histogram, percentile)
    else:
        bins = mse_threshold_bins(stats.histogram)
    return bins * stats.bin_width


def clipped_fraction(stats: TensorStats, low: float, high: float) -> float:
    """Share of the calibration values outside [low, high], estimated from the |x| histogram (exact at bin
    edges; for one-signed tensors the side that cannot be clipped is ignored)."""
    total = stats.histogram.sum()
    if total == 0 or stats.bin_width == 0:
        return 0.0
    limit = max(abs(low), abs(high)) if stats.observed_min < 0 else high
    first_clipped = int(np.ceil(limit / stats.bin_width - 1e-9))
    return float(stats.histogram[first_clipped:].sum() / total)


def choose_ranges(stats: Sequence[TensorStats], method: Method, symmetric: bool,
                  percentile: float = 99.99) -> dict[str, TensorRange]:
    """One range per tensor. Symmetric (TensorRT): [-T, T]. Asymmetric (uint8): [max(min, -T), min(max, T)],
    always including 0 so that zero is exactly representable."""
    ranges = {}
    for item in stats:
        amax = threshold(item, method, percentile)
        if symmetric:
            low, high = -amax, amax
        else:
            low, high = min(0.0, max(item.observed_min, -amax)), max(0.0, min(item.observed_max, amax))
        ranges[item.name] = TensorRange(item.name, float(low), float(high), item.observed_min, item.observed_max,
                                        clipped_fraction(item, low, high), Method.parse(method).value)
    return ranges


# ----------------------------------------------------------------------------------------------------------------
# Calibration data.

_SKIMAGE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket",
                   "hubble_deep_field", "immunohistochemistry", "camera", "brick", "grass", "gravel")


def ensure_calibration_images(folder: str | os.PathLike = DEFAULT_CALIB_DIR, crops_per_photo: int = 6,
                              crop_size: int = 192, seed: int = 0) -> list[Path]:
    """The images in `folder`; if it holds none, first fill it with random crops of the photographs that ship
    inside scikit-image (no download). Users may drop their own images in instead."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        return list_images(folder)
    except FileNotFoundError:
        pass
    from PIL import Image
    from skimage import data as skdata

    from .export import write_atomic

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
    """uint8 HxWx3 images from a folder, a list of arrays, or (None) the default `calib_data/`."""
    if source is None:
        return [load_image(p) for p in ensure_calibration_images()]
    if isinstance(source, (str, os.PathLike)):
        return [load_image(p) for p in list_images(source)]
    images = [np.asarray(image) for image in source]
    if not images:
        raise ValueError("no calibration images were given")
    return images


def images_digest(images: Sequence[np.ndarray]) -> str:
    """A hash of the calibration images' pixels (part of the cache key)."""
    digest = hashlib.sha256()
    for image in images:
        digest.update(str(image.shape).encode())
        digest.update(np.ascontiguousarray(image).tobytes())
    return digest.hexdigest()[:16]


def calibration_patches(images: Sequence[np.ndarray], samples: int, patch_size: int, seed: int = 0) -> Iterator[np.ndarray]:
    """`samples` random patch_size x patch_size crops (float32 1x3xPxP in [0, 1]), generated lazily and
    deterministically for a seed. Images smaller than a patch are used whole."""
    rng = np.random.default_rng(seed)
    for _ in range(samples):
        image = images[int(rng.integers(len(images)))]
        height, width = image.shape[:2]
        size_y, size_x = min(patch_size, height), min(patch_size, width)
        y = int(rng.integers(height - size_y + 1))
        x = int(rng.integers(width - size_x + 1))
        patch = image[y : y + size_y, x : x + size_x, :3]
        yield np.ascontiguousarray(patch.transpose(2, 0, 1)[None], dtype=np.float32) / 255.0


# ----------------------------------------------------------------------------------------------------------------
# Observing the tensors through ONNX Runtime.


def activation_tensors(model: onnx.ModelProto) -> list[str]:
    """Every float tensor that a real INT8 deployment quantizes: the graph input and each node output (weights,
    biases and Constant outputs excluded), in graph order."""
    initializers = {init.name for init in model.graph.initializer}
    names = [model.graph.input[0].name]
    for node in model.graph.node:
        if node.op_type == "Constant":
            continue
        names.extend(out for out in node.output if out and out not in initializers)
    return names


def _observing_session(model_path: str | os.PathLike, tensors: Sequence[str], threads: int) -> ort.InferenceSession:
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
                       num_samples: int, need_histograms: bool = True, threads: int = 0, batch_size: int = 8,
                       progress: Callable[[float, str], None] | None = None) -> list[TensorStats]:
    """Stream the calibration patches through the model twice: min/max, then |x| histograms over [0, amax].

    Args:
        model_path: the FP32 ONNX model.
        patches: a callable returning a fresh iterable of float32 1x3xPxP patches (called once per pass).
        num_samples: how many patches each pass yields (for the progress fraction).
        need_histograms: False for minmax, which needs only the first pass (the histograms stay empty).
        progress: called with (fraction done, message).

    Returns:
        one TensorStats per activation tensor, in graph order.
    """
    model = onnx.load(str(model_path), load_external_data=False)
    names = activation_tensors(model)
    session = _observing_session(model_path, names, threads)
    input_name = session.get_inputs()[0].name
    outputs = [o.name for o in session.get_outputs()]
    index = {name: outputs.index(name) if name in outputs else None for name in names}
    low = {name: np.inf for name in names}
    high = {name: -np.inf for name in names}
    passes = 2 if need_histograms else 1

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
    if need_histograms:
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

