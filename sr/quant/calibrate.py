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

The parts are modules of their own: `statistics` (observing the tensors, `TensorStats`), `searches` (the
threshold searches and the chosen `TensorRange`s), `calibdata` (the calibration images and patches). This module
holds what one calibration is: `CalibrationConfig`, its `Method` and how the images are fed.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..choices import Choice

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
