"""NVIDIA ModelOpt as the oracle of the lab's calibration (a test and benchmark dependency, never imported by the
app or by `sr`'s calibration path): its threshold searches on a given histogram, and its own
`HistogramCalibrator` end to end. `tests/test_calibrate.py` checks the lab against these; `sr bench` reports the
same figures when ModelOpt is installed.
"""
from __future__ import annotations

import numpy as np

from sr.quant.calibrate import Method
from sr.quant.statistics import activation_tensors
from sr.run.sessions import Observer


def modelopt_available() -> bool:
    """True when ModelOpt's histogram calibrator can be imported."""
    try:
        from modelopt.torch.quantization.calib import histogram  # noqa: F401
    except Exception:
        return False
    return True


def modelopt_thresholds_bins(histogram: np.ndarray, method: Method, percentile: float = 99.99) -> float:
    """ModelOpt's threshold for a histogram over bins of width 1 from 0, in bins (the oracle of our searches).

    `_compute_amax_mse` of ModelOpt 0.47 calls `fake_tensor_quant(centers, amax, num_bits, unsigned)`
    positionally, which binds num_bits to the `bias` parameter of its autograd function; the call is made here
    with keyword-bound arguments (bias None, num_bits, unsigned), what the function means to do.
    `entropy-zeros` has no ModelOpt counterpart; its oracle runs ModelOpt's loop on a histogram whose bin 0 cannot
    be overwritten (the `bins[0] = bins[1]` step becomes a no-op).

    Args:
        histogram: counts of |x| in equal bins from 0.
        method: entropy, entropy-zeros, percentile or mse.
        percentile: for percentile.

    Returns:
        ModelOpt's threshold, in bins.

    Raises:
        ImportError: ModelOpt is not installed.
    """
    from modelopt.torch.quantization.calib import histogram as reference
    from modelopt.torch.quantization.tensor_quant import FakeTensorQuantFunction

    counts = np.asarray(histogram, dtype=np.int64)
    edges = np.arange(counts.size + 1, dtype=np.float64)
    method = Method.parse(method)
    if method is Method.PERCENTILE:
        return float(reference._compute_amax_percentile(counts, edges, percentile))
    if method is Method.MSE:
        original = reference.fake_tensor_quant
        reference.fake_tensor_quant = lambda x, amax, num_bits, unsigned: FakeTensorQuantFunction.apply(
            x, amax, None, num_bits, unsigned)
        try:
            return float(reference._compute_amax_mse(counts, edges, num_bits=8, unsigned=False))
        finally:
            reference.fake_tensor_quant = original
    if method is Method.ENTROPY_ZEROS:
        counts = counts.view(_KeepBinZero)
    return float(reference._compute_amax_entropy(counts, edges, num_bits=8, unsigned=False, stride=1, start_bin=128))


class _KeepBinZero(np.ndarray):
    """An int array on which `a[0] = ...` is ignored (and whose copies are the same kind)."""

    def __setitem__(self, key, value):
        if isinstance(key, (int, np.integer)) and key == 0:
            return
        super().__setitem__(key, value)

    def __array_wrap__(self, array, context=None, return_scalar=False):  # results of arithmetic are plain
        array = array.view(np.ndarray)
        return array[()] if return_scalar else array


def histogram_calibrator(fp32, patches) -> tuple[dict, dict]:
    """ModelOpt's HistogramCalibrator fed every tensor of every batch (as its quantizers would see them)."""
    import onnx
    import torch
    from modelopt.torch.quantization.calib.histogram import HistogramCalibrator

    names = activation_tensors(onnx.load(str(fp32), load_external_data=False))
    observer = Observer(fp32, names)
    calibrators = {name: HistogramCalibrator(num_bits=8, axis=None, unsigned=False, num_bins=2048) for name in names}
    for patch in patches():
        values = observer.observe(patch)
        for name in names:
            calibrators[name].collect(torch.from_numpy(values[name]))
    thresholds = {name: float(c.compute_amax("entropy")) for name, c in calibrators.items()}
    return thresholds, {name: float(c._calib_bin_edges[-1]) for name, c in calibrators.items()}
