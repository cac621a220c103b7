"""Threshold searches against NVIDIA ModelOpt itself (the reference they name), on synthetic and real histograms."""
import numpy as np
import pytest

from oracles.modelopt_reference import modelopt_thresholds_bins
from sr.quant.calibdata import calibration_patches, prepare_calibration_images
from sr.quant.calibrate import CalibrationConfig, CalibrationInputs, Method
from sr.quant.searches import (SEARCHES, choose_ranges, clipped_fraction, entropy_threshold_bins, mse_threshold_bins,
                               percentile_threshold_bins, threshold, threshold_bins)
from sr.quant.statistics import TensorStats

pytest.importorskip("modelopt.torch.quantization.calib.histogram", reason="nvidia-modelopt is a test dependency")



def _abs_histogram(values, bins=2048):
    values = np.abs(values)
    return np.bincount(np.minimum((values / values.max() * bins).astype(int), bins - 1), minlength=bins)


def _synthetic(kind: str) -> np.ndarray:
    rng = np.random.default_rng(7)
    values = {"gaussian": lambda: rng.normal(size=200_000),
              "laplacian": lambda: rng.laplace(size=200_000),
              "post-relu zero spike": lambda: np.maximum(rng.normal(0.3, 1.0, 200_000), 0.0),
              "heavy tail": lambda: rng.standard_t(2, 200_000)}[kind]()
    return _abs_histogram(values)


@pytest.mark.parametrize("kind", ["gaussian", "laplacian", "post-relu zero spike", "heavy tail"])
@pytest.mark.parametrize("method", list(SEARCHES))
def test_synthetic_histograms_match_modelopt(kind, method):
    hist = _synthetic(kind)
    assert abs(threshold_bins(hist, method) - modelopt_thresholds_bins(hist, method)) <= 1.0


def test_the_zero_spike_is_what_separates_the_two_entropy_methods():
    """A post-ReLU tensor: half its values exact zeros, the rest a heavy tail. Counting the spike (the GTC
    description taken literally) drives the KL threshold down to the first candidate; ModelOpt's flattening
    keeps the tail."""
    rng = np.random.default_rng(0)
    hist = _abs_histogram(np.concatenate([rng.laplace(size=50_000) ** 2, np.zeros(40_000)]))
    zeros, flattened = entropy_threshold_bins(hist, count_zeros=True), entropy_threshold_bins(hist)
    assert zeros == modelopt_thresholds_bins(hist, Method.ENTROPY_ZEROS) == 128
    assert flattened == modelopt_thresholds_bins(hist, Method.ENTROPY) > 3 * zeros


def test_uniform_keeps_everything():
    uniform = np.full(2048, 100)
    assert entropy_threshold_bins(uniform) == 2048
    assert percentile_threshold_bins(uniform, 99.99) == 2047  # the lower edge of the bin that crosses it
    assert percentile_threshold_bins(uniform, 50.0) == 1023
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
    for method in (Method.ENTROPY, Method.ENTROPY_ZEROS, Method.PERCENTILE):
        assert 2.0 < threshold(stats, method) < 6.0, method
    # MSE keeps the spike: clipping 5 values by ~35 costs more than rounding 100k values with a coarser step
    assert threshold(stats, Method.MSE) > 30.0
    chosen = choose_ranges([stats], Method.ENTROPY, symmetric=True)["t"]
    assert chosen.low == -chosen.high
    assert 5 / values.size <= chosen.clipped_fraction < 0.01
    assert clipped_fraction(stats, -40.0, 40.0) == 0.0


def test_entropy_never_clips_into_an_empty_bin():
    """Outliers folded into an empty bin make Q zero where P is not (infinite KL): that candidate is never chosen."""
    hist = np.zeros(2048, np.int64)
    hist[:100] = 1000
    hist[2047] = 3
    assert entropy_threshold_bins(hist) == modelopt_thresholds_bins(hist, Method.ENTROPY) == 2048


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
    ({"method": "kl"}, "unknown calibration method 'kl'; choose one of: minmax, entropy, entropy-zeros, percentile, mse"),
    ({"inputs": "hr"}, "unknown calibration input 'hr'; choose one of: downscaled, raw"),
    ({"gain": 0.0}, "gain must be in"),
    ({"samples": 0}, "samples must be an integer from 10 to 1000, got 0"),
    ({"samples": 5000}, "samples must be an integer from 10 to 1000"),
    ({"percentile": 100.5}, "percentile must be between"),
])
def test_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CalibrationConfig(**kwargs)


def test_calibration_inputs_are_downscaled_like_deployment(photo):
    downscaled = prepare_calibration_images([photo], CalibrationConfig(), scale=3)[0]
    raw = prepare_calibration_images([photo], CalibrationConfig(inputs=CalibrationInputs.RAW), scale=3)[0]
    assert downscaled.shape == (20, 30, 3) and raw.shape == photo.shape
    dark = prepare_calibration_images([photo], CalibrationConfig(inputs="raw", gain=0.5), scale=3)[0]
    assert np.abs(dark.astype(int) - photo.astype(int) * 0.5).max() <= 0.5 + 1e-9  # float32 rounding of .5 cases


SHIPPED = ["xlsr-relu", "xlsr-clip", "xlsr-relu-kd", "xlsr-clip-kd", "teacher"]


@pytest.fixture(scope="module")
def real_histograms():
    """Histograms collected from each shipped model: its post-ReLU tensor with the biggest zero spike, and a signed
    Conv output of the teacher (ModelOpt's Python loop takes ~2 s per entropy search, so not
    all; bench covers every tensor)."""
    from sr.run.quantize import calibrate_model

    picked = []
    for index, model in enumerate(SHIPPED):
        stats = [s for s in calibrate_model(model, CalibrationConfig(method="minmax", samples=10), "tensorrt").stats
                 if s.histogram.sum() > 0]
        relu = max((s for s in stats if "relu" in s.name.lower()), key=lambda s: s.histogram[0] / s.histogram.sum())
        picked.append((model, relu))
        if index == len(SHIPPED) - 1:  # the teacher's: the widest network
            picked.append((model, next(s for s in stats if s.observed_min < 0)))
    return picked


@pytest.mark.parametrize("method", list(SEARCHES))
def test_real_histograms_match_modelopt(real_histograms, method):
    # entropy-zeros differs from entropy only by the zero spike: it is checked where there is one (post-ReLU)
    picked = [(m, s) for m, s in real_histograms if method is not Method.ENTROPY_ZEROS or s.observed_min >= 0]
    differences = {f"{model} {s.name}": abs(threshold_bins(s.histogram, method) - modelopt_thresholds_bins(s.histogram, method))
                   for model, s in picked}
    assert max(differences.values()) <= 1.0, differences


def test_clipped_energy_is_the_energy_clipping_removes():
    """A range is warned about by the energy it cuts off: sum (|x| - limit)^2 beyond it, against sum x^2."""
    from sr.quant.searches import clipped_energy
    from sr.quant.statistics import TensorStats

    histogram = np.zeros(2048, np.int64)
    histogram[-1] = 1000  # a Softmax: most values at its top, 1.0
    histogram[1000] = 10
    stats = TensorStats("softmax", 0.0, 1.0, histogram)
    width = stats.bin_width
    assert clipped_energy(stats, 0.0, 1.0) == 0.0
    almost = 2047 * width  # the last bin's lower edge: its values lose at most one bin width
    assert 0 < clipped_energy(stats, 0.0, almost) < 1e-6
    half = clipped_energy(stats, 0.0, 0.5)  # the top values lose half their amplitude: a quarter of their energy
    centre = 2047.5 * width
    expected = 1000 * (centre - 0.5) ** 2 / (1000 * centre ** 2 + 10 * (1000.5 * width) ** 2)
    assert half == pytest.approx(expected, rel=1e-9) and 0.2 < half < 0.25
