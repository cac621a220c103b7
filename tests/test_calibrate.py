"""Threshold searches on synthetic histograms with known answers, against a literal reference implementation."""
import numpy as np
import pytest

from sr.calibrate import (CalibrationConfig, Method, TensorStats, calibration_patches, choose_ranges,
                          clipped_fraction, entropy_threshold_bins, mse_threshold_bins, percentile_threshold_bins,
                          threshold)


def reference_entropy_bins(hist, levels=128, start=128):
    """TensorRT's loop as in the GTC 2017 talk / pytorch-quantization, one candidate at a time."""
    hist = np.asarray(hist, dtype=np.float64)
    best, best_i = np.inf, len(hist)
    for i in range(start, len(hist) + 1):
        group = (np.arange(i) * levels) // i
        nonzero = hist[:i] > 0
        q = np.zeros(i)
        for level in range(levels):
            members = (group == level) & nonzero
            if members.any():
                q[members] = hist[:i][members].sum() / members.sum()
        p = hist[:i].copy()
        p[-1] += hist[i:].sum()
        p, q = p / p.sum(), q / q.sum()
        if np.any((p > 0) & (q == 0)):
            divergence = np.inf
        else:
            mask = p > 0
            divergence = float(np.sum(p[mask] * np.log(p[mask] / q[mask])))
        if divergence <= best:  # ties -> the larger threshold
            best, best_i = divergence, i
    return best_i


def _abs_histogram(values, bins=2048):
    values = np.abs(values)
    return np.bincount(np.minimum((values / values.max() * bins).astype(int), bins - 1), minlength=bins)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_entropy_matches_the_reference_loop(seed):
    rng = np.random.default_rng(seed)
    hist = _abs_histogram(np.concatenate([rng.laplace(size=20000), rng.normal(0, 8, 30)]))
    assert entropy_threshold_bins(hist) == reference_entropy_bins(hist)


def test_uniform_keeps_everything():
    uniform = np.full(2048, 100)
    assert entropy_threshold_bins(uniform) == 2048
    assert percentile_threshold_bins(uniform, 99.99) == 2048
    assert percentile_threshold_bins(uniform, 50.0) == 1024
    assert 2000 <= mse_threshold_bins(uniform) <= 2048  # MSE trades a sliver of clipping for a finer step


def test_gaussian_thresholds_are_ordered():
    rng = np.random.default_rng(0)
    hist = _abs_histogram(rng.normal(size=400_000))  # amax ~ 5 sigma
    sigma_bins = 2048 / np.abs(rng.normal(size=400_000)).max()
    entropy, mse = entropy_threshold_bins(hist), mse_threshold_bins(hist)
    assert 2.5 * sigma_bins < entropy < 2048 and 2.0 * sigma_bins < mse < 2048
    assert percentile_threshold_bins(hist, 99.9) < percentile_threshold_bins(hist, 99.999)
    # 99.9 % of |N(0,1)| lies below 3.29 sigma
    assert percentile_threshold_bins(hist, 99.9) == pytest.approx(3.29 * sigma_bins, rel=0.03)


def test_spike_of_outliers_is_clipped_except_by_minmax():
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(size=100_000), np.full(5, 40.0)])  # body within ~5, a spike at 40
    hist = _abs_histogram(values)
    stats = TensorStats("t", float(values.min()), 40.0, hist)
    assert threshold(stats, Method.MINMAX) == 40.0
    for method in (Method.ENTROPY, Method.PERCENTILE):
        assert 2.0 < threshold(stats, method) < 6.0, method
    # MSE keeps the spike: clipping 5 values by ~35 costs more than rounding 100k values with a coarser step
    assert threshold(stats, Method.MSE) > 30.0
    chosen = choose_ranges([stats], Method.ENTROPY, symmetric=True)["t"]
    assert chosen.low == -chosen.high
    assert 5 / values.size <= chosen.clipped_fraction < 0.01
    assert clipped_fraction(stats, -40.0, 40.0) == 0.0


def test_entropy_never_clips_into_an_empty_bin():
    """TensorRT's quirk: outliers folded into an empty bin make Q zero where P is not (infinite KL)."""
    hist = np.zeros(2048, np.int64)
    hist[:100] = 1000
    hist[2047] = 3
    assert entropy_threshold_bins(hist) == reference_entropy_bins(hist) == 2048


def test_mse_matches_brute_force():
    rng = np.random.default_rng(3)
    values = np.abs(rng.standard_t(3, 50_000))
    hist = _abs_histogram(values)
    width = values.max() / 2048
    centres = (np.arange(2048) + 0.5) * width

    def error(t_bins):
        t = t_bins * width
        step = t / 127
        quantized = np.clip(np.round(centres / step), 0, 127) * step
        return np.sum(hist * (centres - quantized) ** 2)

    best = mse_threshold_bins(hist)
    assert error(best) <= min(error(b) for b in range(64, 2049, 16)) * 1.02


def test_asymmetric_ranges_include_zero():
    hist = np.zeros(2048, np.int64)
    hist[:1000] = 5
    stats = TensorStats("relu", 0.0, 4.0, hist)
    chosen = choose_ranges([stats], Method.MINMAX, symmetric=False)["relu"]
    assert (chosen.low, chosen.high) == (0.0, 4.0)


def test_patches_are_deterministic(photo):
    first = list(calibration_patches([photo], 10, 16, seed=4))
    second = list(calibration_patches([photo], 10, 16, seed=4))
    assert len(first) == 10 and first[0].shape == (1, 3, 16, 16)
    assert all(np.array_equal(a, b) for a, b in zip(first, second))
    assert not np.array_equal(first[0], next(iter(calibration_patches([photo], 1, 16, seed=5))))


@pytest.mark.parametrize("kwargs, message", [
    ({"method": "kl"}, "unknown calibration method 'kl'; choose one of: minmax, entropy, percentile, mse"),
    ({"samples": 0}, "samples must be an integer from 10 to 1000, got 0"),
    ({"samples": 5000}, "samples must be an integer from 10 to 1000"),
    ({"percentile": 100.5}, "percentile must be between"),
])
def test_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CalibrationConfig(**kwargs)
