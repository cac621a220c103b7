"""The threshold searches, pure numpy functions of a tensor's |x| histogram (each the counterpart of one in NVIDIA
ModelOpt's `modelopt.torch.quantization.calib.histogram`, the oracle the tests call: see `sr.quant.calibrate`), and
the range each tensor gets from them (`choose_ranges`: `TensorRange`), with what it clips."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..choices import Choice
from .calibrate import Method
from .statistics import TensorStats

NUM_QUANTIZED_BINS = 128  # int8 magnitudes of a signed tensor (ModelOpt: 1 << (num_bits - 1))
START_BIN = 128  # the smallest candidate threshold of the entropy and mse searches (ModelOpt's start_bin)


class RangeSource(Choice, noun="range source"):
    """Where a tensor's range came from: a threshold search (the calibration methods' values), fixed in advance
    (the image's 8-bit grid, LiteRT's fixed output grids, a fix), or learned by QAT."""

    MINMAX = Method.MINMAX.value
    ENTROPY = Method.ENTROPY.value
    ENTROPY_ZEROS = Method.ENTROPY_ZEROS.value
    PERCENTILE = Method.PERCENTILE.value
    MSE = Method.MSE.value
    FIXED = "fixed"
    QAT = "qat"

    @property
    def searched(self) -> bool:
        """True for a range a threshold search chose (a fixed or learned one is not searched again)."""
        return self not in (RangeSource.FIXED, RangeSource.QAT)


@dataclass
class TensorRange:
    """The range chosen for one tensor, and how much of the calibration data falls outside it."""

    name: str
    low: float
    high: float
    observed_min: float
    observed_max: float
    clipped_fraction: float  # share of calibration values outside [low, high]
    method: RangeSource  # (a cache entry's string is parsed)

    def __post_init__(self):
        self.method = RangeSource.parse(self.method)

    def to_dict(self) -> dict:
        """The fields as a JSON-ready dict."""
        return {"name": self.name, "observed_min": self.observed_min, "observed_max": self.observed_max,
                "low": self.low, "high": self.high, "clipped_fraction": self.clipped_fraction,
                "method": self.method.value}


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
