"""What makes an INT8 model, as one value: `QuantRecipe` (the calibration, the scheme, the per-tensor fixes and
the post-training refinements), and its one `key()`, which covers every input and the code of every module that
determines the result. The calibration cache (`sr.run.quantize`), the automatic method's choice and the refined
models (`sr.tune.ptq`) are all keyed by it, so nothing cached survives a change in what made it.

Example:
    >>> recipe = QuantRecipe(CalibrationConfig(method="mse"), "tensorrt", refinements=["equalize"])
    >>> recipe.key(weights_sha256, images_digest(images))
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from enum import Enum

from .calibrate import CalibrationConfig, Method
from ..choices import Choice
from .quantspec import Scheme
from ..store import code_digest_of, library_versions, short_hash


class Refinement(Choice, noun="PTQ refinement"):
    """One post-training refinement (`sr.tune.ptq`); applied in this order whatever order they are given in."""

    CENTRED_IO = "centred-io"
    EQUALIZE = "equalize"
    RANGE_SEARCH = "range-search"
    ADAROUND = "adaround"
    BIAS_CORRECTION = "bias-correction"


ORDER = list(Refinement)


@dataclass
class Fixes:
    """Per-tensor overrides applied on top of a calibration (see `sr.lab.diagnose.Fix`)."""

    range_method: dict[str, Method] = field(default_factory=dict)  # tensor -> method used for its range instead
    keep_float: list[str] = field(default_factory=list)  # tensors left unquantized (their QDQ pair removed)
    # tensor -> a range known in advance, whatever the calibration saw: the input of a network fed [0, 1] images,
    # the output of a Clip(0, 1)
    fixed_range: dict[str, tuple[float, float]] = field(default_factory=dict)

    def __post_init__(self):
        self.range_method = {tensor: Method.parse(method) for tensor, method in self.range_method.items()}
        self.fixed_range = {tensor: (float(low), float(high)) for tensor, (low, high) in self.fixed_range.items()}
        for tensor, (low, high) in self.fixed_range.items():
            if not low <= 0.0 <= high or low == high:
                raise ValueError(f"the fixed range of {tensor!r} must include 0 and not be empty, got [{low}, {high}]")

    def is_empty(self) -> bool:
        """True when nothing is overridden."""
        return not self.range_method and not self.keep_float and not self.fixed_range

    def key(self) -> str:
        """A canonical JSON string of the overrides (part of the cache key)."""
        return json.dumps({"range_method": {t: m.value for t, m in sorted(self.range_method.items())},
                           "keep_float": sorted(self.keep_float),
                           "fixed_range": {t: list(r) for t, r in sorted(self.fixed_range.items())}}, sort_keys=True)


# the modules whose code determines a calibrated model; the automatic method's choice is also scored (an engine,
# PSNR); a refined model passes through the fake quantizers and the refinements as well. By name: this module
# does not import them (they import it); `code_digest_of` refuses a key where one is not loaded.
CALIBRATED_BY = ("sr.data", "sr.model.checks", "sr.model.probe", "sr.model.contract", "sr.model.wrapper",
                 "sr.model.usermodel", "sr.model.onnxtorch", "sr.model.centring", "sr.model.export",
                 "sr.model.networks", "sr.model.weights", "sr.model.models", "sr.quant.calibrate",
                 "sr.quant.statistics", "sr.quant.searches", "sr.quant.calibdata", "sr.quant.rewrite",
                 "sr.quant.trtfusion", "sr.quant.quantspec", "sr.quant.readback", "sr.quant.qdq", "sr.quant.recipe",
                 "sr.quant.calibrated", "sr.run.sessions", "sr.run.quantize")
SCORED_BY = ("sr.run.engines", "sr.metrics")
REFINED_BY = ("sr.tune.transforms", "sr.tune.fakequant", "sr.tune.ptq")
OBSERVED_BY = ("sr.data", "sr.model.checks", "sr.model.probe", "sr.model.contract", "sr.model.wrapper",
               "sr.model.usermodel", "sr.model.centring", "sr.model.networks", "sr.model.weights", "sr.model.models",
               "sr.model.export", "sr.quant.calibrate", "sr.quant.statistics", "sr.quant.searches",
               "sr.quant.calibdata", "sr.run.sessions")
VERSIONS = ("torch", "onnx", "onnxruntime")


@dataclass
class RefineSettings:
    """How the refinements measure and train (used only when a recipe has refinements)."""

    patches: int = 32  # calibration patches the refinements measure on
    patch_size: int = 48
    adaround_steps: int = 300  # Adam steps per Conv
    equalize: float = 0.5  # channel-equalization strength (with `equalize`)
    seed: int = 0

    def __post_init__(self):
        for name in ("patches", "patch_size", "adaround_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")


@dataclass
class QuantRecipe:
    """Everything that makes an INT8 model of a given model and calibration images.

    Raises:
        ValueError: (on construction) an unknown scheme or refinement, AdaRound with one weight step per tensor,
            or a count below 1.
    """

    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    scheme: Scheme | str = Scheme.TENSORRT
    fixes: Fixes = field(default_factory=Fixes)
    refinements: list[Refinement | str] = field(default_factory=list)
    refine: RefineSettings = field(default_factory=RefineSettings)

    def __post_init__(self):
        self.scheme = Scheme.parse(self.scheme)
        chosen = {Refinement.parse(r) for r in self.refinements}
        self.refinements = [r for r in ORDER if r in chosen]
        if Refinement.ADAROUND in self.refinements and self.scheme is Scheme.NPU_PER_TENSOR:
            raise ValueError("AdaRound here rounds onto per-channel weight steps, and the npu-per-tensor scheme has "
                             "one step per weight tensor: leave AdaRound out or use the npu scheme")

    def key(self, weights_hash: str, data_hash: str, length: int = 20) -> str:
        """The cache key of what this recipe makes: the weights, every setting (calibration, scheme, fixes, and the
        refinements with theirs), the calibration images by their pixels, the code of every module the result
        passes through (`code()`) and the library versions.

        Args:
            weights_hash: the model file's SHA-256.
            data_hash: `sr.quant.calibdata.images_digest` of the images (as the caller feeds them).
            length: hex digits.
        """
        parts = {"weights": weights_hash, "data": data_hash, "calibration": _settings(self.calibration),
                 "scheme": self.scheme.value, "fixes": self.fixes.key(),
                 "code": code_digest_of(*self.code()),
                 "versions": library_versions(*VERSIONS)}
        if self.refinements:
            parts["refinements"] = {"steps": [r.value for r in self.refinements], **asdict(self.refine)}
        return short_hash(json.dumps(parts, sort_keys=True, default=str), length)

    def code(self) -> tuple[str, ...]:
        """The modules whose code determines what this recipe makes."""
        scored = SCORED_BY if self.calibration.method is Method.AUTO else ()
        return (*CALIBRATED_BY, *scored, *(REFINED_BY if self.refinements else ()))

    def statistics_key(self, weights_hash: str, data_hash: str) -> str:
        """The key of the tensor statistics the calibration observes: only what determines them (the samples,
        patch size and seed; not the method, percentile, scheme or fixes, which only choose ranges from them), so
        that switching the method reuses the observation passes."""
        c = self.calibration
        parts = {"weights": weights_hash, "samples": c.samples, "patch": c.patch_size, "seed": c.seed,
                 "data": data_hash, "code": code_digest_of(*OBSERVED_BY), "versions": library_versions(*VERSIONS)}
        return short_hash(json.dumps(parts, sort_keys=True), 20)


def _settings(calibration: CalibrationConfig) -> dict:
    """The calibration's settings, its image folder left out (the images are keyed by their pixels)."""
    return {k: (v.value if isinstance(v, Enum) else v) for k, v in asdict(calibration).items() if k != "data"}
