"""The conformance check: an engine's output on a probe image against the reference engine's, within a tolerance
per kind of numerics (`Tolerance`), remembered per model, engine kind and CPU; `EngineRefused` when it disagrees.
`sr.run.runtime` runs it on every engine it makes."""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from ..store import Memo

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Tolerance:
    """How far an engine's uint8 output may be from the reference's on the probe, in 8-bit levels."""

    mean_levels: float  # mean absolute difference
    p999_levels: float  # 99.9th percentile of the absolute difference (a few edge pixels may round apart)


# FP32 is FP32 whatever the kernels (summation order only); an INT8 runtime requantizes with its own rounding
# (measured: OpenVINO's INT8 kernels are 0.3-1.0 levels from ONNX Runtime on average, p99.9 <= 5, on the shipped
# XLSRs, Intel and AMD alike); BF16 keeps 8 mantissa bits. A wrong kernel path is tens of levels off.
FP32_TOLERANCE = Tolerance(0.05, 1.0)
INT8_TOLERANCE = Tolerance(1.5, 8.0)
BF16_TOLERANCE = Tolerance(1.5, 8.0)
# an NPU requantizes with its own rounding, by design (measured, QNN HTP v68/v73/v81 against the reference on
# xlsr-clip: npu mean 0.94-1.0 levels, p99.9 5, max 7; npu-symmetric mean 1.95, p99.9 10, max 12); a wrong path
# or a misread zero point is tens of levels off
NPU_TOLERANCE = Tolerance(2.5, 16.0)


@dataclass(frozen=True)
class Conformance:
    """An engine's output on the probe against the reference engine's."""

    engine: str
    reference: str
    mean_levels: float
    p999_levels: float
    max_levels: int
    psnr_db: float  # of the engine's output against the reference's (RGB, whole image)
    tolerance: Tolerance

    @property
    def passed(self) -> bool:
        """True when the engine is within the tolerance."""
        return self.mean_levels <= self.tolerance.mean_levels and self.p999_levels <= self.tolerance.p999_levels

    def summary(self) -> str:
        """One sentence: the verdict and its figures."""
        verdict = "agrees with" if self.passed else "does not agree with"
        return (f"{self.engine} {verdict} the reference ({self.reference}) on the conformance probe: mean "
                f"{self.mean_levels:.2f} levels, 99.9th percentile {self.p999_levels:.0f}, max {self.max_levels} "
                f"(tolerance: mean <= {self.tolerance.mean_levels}, 99.9th percentile <= "
                f"{self.tolerance.p999_levels:.0f})")


class EngineRefused(RuntimeError):
    """An engine failed its conformance check against the reference: its outputs would be wrong."""

    def __init__(self, conformance: Conformance):
        super().__init__(conformance.summary() + "; it is not used on this machine")
        self.conformance = conformance


def probe_image(height: int = 48, width: int = 64, seed: int = 0) -> np.ndarray:
    """The conformance probe: a deterministic uint8 HxWx3 image with what SR inputs have (smooth shading, hard
    edges, fine texture, saturated colours, black and white).

    Args:
        height, width: its size.
        seed: the texture's seed.

    Returns:
        uint8 HxWx3.
    """
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    shade = np.stack([x / max(1, width - 1), y / max(1, height - 1), 0.5 + 0.5 * np.sin((x + y) / 5.0)], axis=2)
    texture = np.random.default_rng(seed).random((height, width, 3), dtype=np.float32)
    image = 0.7 * shade + 0.3 * texture
    image[: height // 4, : width // 4] = (1.0, 1.0, 1.0)  # saturated corners, a hard edge, a dark bar
    image[-height // 4 :, -width // 4 :] = (0.0, 0.0, 0.0)
    image[:, width // 2 : width // 2 + 2] = (1.0, 0.1, 0.1)
    return np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)


_VERDICTS = Memo(256)  # (model hash, engine kind, CPU, probe size) -> Conformance


def conformance(engine, reference, tolerance: Tolerance, key: tuple | None = None,
                probe: np.ndarray | None = None) -> Conformance:
    """Run the probe through an engine and the reference and compare (the verdict remembered under `key`).

    Args:
        engine: an object with `run(lr uint8 HxWx3) -> uint8` and a `name`.
        reference: the same kind of object, or a function that makes it (called only when the verdict is not
            remembered: the reference's session is not built for nothing).
        tolerance: what counts as agreeing.
        key: what the verdict depends on (the model file's hash, the engine's kind, the input size), or None
            not to remember it.
        probe: the input (default: `probe_image`, or the model's fixed size where it has one).

    Returns:
        the Conformance.
    """
    known = _VERDICTS.peek(key) if key is not None else None
    if known is not None:
        return known
    reference = reference() if callable(reference) else reference
    if probe is None:
        fixed = getattr(engine, "fixed", None) or getattr(reference, "fixed", None)
        probe = probe_image(*(fixed or (48, 64)))
    ours, theirs = engine.run(probe).astype(np.int16), reference.run(probe).astype(np.int16)
    difference = np.abs(ours - theirs)
    mse = float(np.mean(difference.astype(np.float64) ** 2))
    verdict = Conformance(engine.name, reference.name, float(difference.mean()),
                          float(np.percentile(difference, 99.9)), int(difference.max()),
                          float("inf") if mse == 0 else float(10 * np.log10(255.0 ** 2 / mse)), tolerance)
    log.info("%s", verdict.summary())
    if key is not None:
        _VERDICTS.put(key, verdict)
    return verdict


__all__ = ["Tolerance", "FP32_TOLERANCE", "INT8_TOLERANCE", "BF16_TOLERANCE", "NPU_TOLERANCE", "Conformance",
           "EngineRefused", "probe_image", "conformance"]
