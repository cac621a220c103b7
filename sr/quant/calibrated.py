"""The calibration cache's entries: what a calibrated model is (`CalibratedModel`, with its plain-words
warnings; its `recipe`), the tensor statistics shared by every method, and how an entry is
built, written atomically, checked by its manifest and read back. The key is `sr.quant.recipe`'s; the pipeline is
`sr.run.quantize`.
"""
from __future__ import annotations

import io
import json
import logging
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx

from ..choices import Choice
from .calibdata import calibration_patches
from .calibrate import CalibrationConfig
from .searches import RangeSource, TensorRange, choose_ranges, clipped_energy, clipped_fraction
from .statistics import TensorStats, collect_statistics
from .qdq import fixed_input_size, spec_of, write_qdq_model
from .quantspec import Scheme
from .recipe import Fixes, QuantRecipe
from ..store import (cache_cap_bytes, cache_root, evict, file_sha256, locked, publish_dir, remove_stale_temps,
                    temp_dir, touch, write_atomic)

log = logging.getLogger(__name__)


@dataclass
class CalibratedModel:
    """An INT8 model and everything that made it."""

    model: str
    scheme: Scheme
    config: CalibrationConfig
    fixes: Fixes
    key: str
    fp32_onnx: Path
    qdq_onnx: Path
    ranges: dict[str, TensorRange]
    stats: list[TensorStats]
    producers: dict[str, str]  # tensor -> op type that produces it
    seconds: float  # time spent calibrating (0 when read from the cache)
    cached: bool
    scale: int = 3
    # with Method.AUTO: {"method": the one chosen, "candidates": {method: {"psnr_vs_fp32_db", "brightness"}},
    # "held_back_images": how many images scored them}; `config` is then the chosen method's
    choice: AutoChoice | None = None  # what the automatic method chose, when it chose

    @property
    def recipe(self) -> QuantRecipe:
        """The recipe that made this model (its refinements, if any, made the model file it calibrated)."""
        return QuantRecipe(self.config, self.scheme, self.fixes)

    def warnings(self, brightness: float | None = None, measured_on: str = "the calibration images",
                 loss_db: float | None = None) -> list[QuantWarning]:
        """What is worth warning about, as data (`QuantWarning`: its kind, its figures, and its words for the CLI,
        the page and the bundle): quantized tensors whose range cuts off more than CLIP_ENERGY_WARNING of their
        signal energy on the calibration images; and, given what was measured somewhere, an output darker or
        brighter than FP32 by more than BRIGHTNESS_WARNING, or a PSNR-Y loss against FP32 (FP32's score minus
        INT8's against the truth) of more than LOSS_WARNING_DB."""
        notes = []
        stats = {item.name: item for item in self.stats}
        quantized = spec_of(self.fp32_onnx, self.scheme, self.fixes.keep_float).activations
        cut = {name: clipped_energy(stats[name], r.low, r.high) for name, r in self.ranges.items()
               if name in quantized and name in stats and r.method.searched}
        over = sorted((share, name) for name, share in cut.items() if share > CLIP_ENERGY_WARNING)
        if over:
            share, name = over[-1]
            r = self.ranges[name]
            notes.append(QuantWarning(
                WarningKind.CLIPPED_ENERGY, {"ranges": len(over), "tensor": name, "share": share, "low": r.low,
                                             "high": r.high, "observed_max": r.observed_max},
                f"{len(over)} INT8 range{'s' if len(over) > 1 else ''} cut off more than "
                f"{100 * CLIP_ENERGY_WARNING:.0f}% of a tensor's signal energy on the calibration images "
                f"(worst: {name}, {100 * share:.0f}%; {self.config.method.value} chose [{r.low:.3g}, "
                f"{r.high:.3g}] for values up to {r.observed_max:.3g}): another method (mse, minmax, or "
                "auto, which tries each) keeps more of it"))
        if brightness is not None and abs(brightness - 1.0) > BRIGHTNESS_WARNING:
            notes.append(QuantWarning(
                WarningKind.DARKER if brightness < 1 else WarningKind.BRIGHTER, {"brightness": brightness},
                f"the INT8 output is {'darker' if brightness < 1 else 'brighter'} than FP32 on {measured_on} "
                f"(brightness ratio {brightness:.3f}): its ranges clip the image"))
        if loss_db is not None and loss_db > LOSS_WARNING_DB:
            notes.append(QuantWarning(
                WarningKind.LOSS, {"loss_db": loss_db},
                f"the INT8 model scores {loss_db:.2f} dB below FP32 (PSNR-Y) on {measured_on}: diagnose names the "
                "tensor that does the damage, and int8-ready tries the fixes in turn"))
        return notes


@dataclass(frozen=True)
class AutoChoice:
    """What the automatic method chose: the method, each candidate's score against FP32 on the held-back
    calibration images ({method: {"psnr_vs_fp32_db", "brightness"}}), and how many images those were."""

    method: str
    candidates: dict[str, dict[str, float]]
    held_back_images: int

    def to_json(self) -> dict:
        """The JSON form (the CLI's and eval's `auto`, the bundle's ranges file, the cached record)."""
        return {"method": self.method, "candidates": self.candidates, "held_back_images": self.held_back_images}

    @classmethod
    def from_json(cls, record: dict) -> "AutoChoice":
        """The choice from its JSON form (KeyError or TypeError when the record is not one)."""
        return cls(str(record["method"]), dict(record["candidates"]), int(record["held_back_images"]))


class WarningKind(Choice, noun="warning"):
    """What an INT8 model is warned about."""

    CLIPPED_ENERGY = "clipped-energy"  # a range cuts off a tensor's signal energy
    DARKER = "darker"  # the output is darker than FP32's
    BRIGHTER = "brighter"
    LOSS = "loss"  # the PSNR-Y loss against FP32 is large
    HIGHLIGHTS = "highlights"  # the brightest pixels are capped (sr.lab.compare)


@dataclass(frozen=True)
class QuantWarning:
    """One warning as data: its kind, the figures behind it, and the words the CLI, the page and the bundle show
    (`str()` gives them)."""

    kind: WarningKind
    figures: dict
    words: str

    def __str__(self) -> str:
        return self.words


CLIP_ENERGY_WARNING = 0.05  # a range that cuts off more of a tensor's signal energy than this is reported
BRIGHTNESS_WARNING = 0.02  # an INT8 output whose brightness departs from FP32's by more than this is reported
LOSS_WARNING_DB = 1.0  # an INT8 model that scores more than this below FP32 where it was measured is reported


def _stats_bytes(stats: list[TensorStats]) -> bytes:
    """The statistics as an .npz file's bytes (names, observed min/max, histograms)."""
    buffer = io.BytesIO()
    np.savez(buffer, names=np.array([s.name for s in stats]), low=np.array([s.observed_min for s in stats]),
             high=np.array([s.observed_max for s in stats]), histograms=np.stack([s.histogram for s in stats]))
    return buffer.getvalue()


def _load_stats(path: Path) -> list[TensorStats]:
    """The statistics `_stats_bytes` wrote (OSError, ValueError or KeyError for a missing or broken file)."""
    arrays = np.load(path)
    return [TensorStats(str(n), float(lo), float(hi), h) for n, lo, hi, h in
            zip(arrays["names"], arrays["low"], arrays["high"], arrays["histograms"])]


def cached_statistics(fp32: Path, key: str, network_inputs: list[np.ndarray], config: CalibrationConfig,
                      observer, cache_dir: Path | None = None, progress=None) -> list[TensorStats]:
    """The tensor statistics of a calibration, from the cache or observed (then cached).

    Args:
        fp32: the FP32 ONNX model.
        key: `QuantRecipe.statistics_key(...)`.
        network_inputs: the prepared calibration images.
        config: the calibration (samples, patch size, seed).
        observer: makes what observes the tensors (`collect_statistics`'s; the pipeline passes ONNX Runtime's,
            `sr.run.sessions.Observer`, with its threads).
        cache_dir: the cache folder (default: `sr.store.cache_root()`).
        progress: called with (fraction done, message).

    Returns:
        one TensorStats per activation tensor, in graph order.
    """
    path = cache_root(cache_dir) / "stats" / f"{key}.npz"
    with locked(path):
        try:
            stats = _load_stats(path)
            touch(path)
            return stats
        except (OSError, ValueError, KeyError):
            pass
        patch = fixed_input_size(fp32) or config.patch_size  # a fixed-size model sees patches of its size
        stats = collect_statistics(
            fp32, lambda: calibration_patches(network_inputs, config.samples, patch, config.seed),
            config.samples, observer, progress=progress)
        write_atomic(_stats_bytes(stats), path)
    evict(path.parent, cache_cap_bytes(), keep=[path, fp32])
    return stats


def calibrate_entry(entry: Path, fp32: Path, network_inputs: list[np.ndarray], config: CalibrationConfig,
                     scheme: Scheme, fixes: Fixes, model: str, observer, progress, stats_key: str,
                     learned: dict[str, tuple[float, float]] | None = None) -> tuple:
    """Observe (with `observer`, see `cached_statistics`) or reuse the statistics, choose the ranges (a QAT model's
    learned ones where it has them), write and publish the entry (the caller holds its lock)."""
    remove_stale_temps(entry.parent)
    stats = cached_statistics(fp32, stats_key, network_inputs, config, observer, entry.parent.parent, progress)
    ranges = choose_ranges(stats, config.method, scheme.symmetric, config.percentile)
    unmatched = sorted(set(learned or {}) - set(ranges))
    if unmatched:
        raise ValueError(f"the model's learned ranges name tensors its graph does not have: {', '.join(unmatched)}; "
                         "the model file and its QAT record disagree")
    for tensor, (low, high) in (learned or {}).items():
        found = next(s for s in stats if s.name == tensor)
        ranges[tensor] = TensorRange(tensor, low, high, found.observed_min, found.observed_max,
                                     clipped_fraction(found, low, high), RangeSource.QAT)
    ranges = _apply_fixes(ranges, stats, fixes, config, scheme, model)
    producers = _producers(fp32)
    _write_entry(entry, fp32, ranges, stats, producers, config, scheme, fixes)
    evict(entry.parent, cache_cap_bytes(), keep=[entry, fp32])
    return ranges, stats, producers


def _apply_fixes(ranges: dict[str, TensorRange], stats: list[TensorStats], fixes: Fixes, config: CalibrationConfig,
                 scheme: Scheme, model: str) -> dict[str, TensorRange]:
    for tensor in [*fixes.range_method, *fixes.keep_float, *fixes.fixed_range]:
        if tensor not in ranges:
            raise ValueError(f"no tensor {tensor!r} in {model}; tensors: {', '.join(ranges)}")
    for tensor, method in fixes.range_method.items():
        ranges[tensor] = choose_ranges([s for s in stats if s.name == tensor], method, scheme.symmetric,
                                       config.percentile)[tensor]
    for tensor, (low, high) in fixes.fixed_range.items():
        found = next(s for s in stats if s.name == tensor)
        if scheme.symmetric:
            low, high = -max(abs(low), abs(high)), max(abs(low), abs(high))
        ranges[tensor] = TensorRange(tensor, low, high, found.observed_min, found.observed_max,
                                     clipped_fraction(found, low, high), RangeSource.FIXED)
    return ranges


def _producers(fp32: Path) -> dict[str, str]:
    model = onnx.load(str(fp32))
    producers = {name: node.op_type for node in model.graph.node for name in node.output if name}
    producers[model.graph.input[0].name] = "Input"
    return producers


def _write_entry(entry: Path, fp32: Path, ranges: dict[str, TensorRange], stats: list[TensorStats],
                 producers: dict[str, str], config: CalibrationConfig, scheme: Scheme, fixes: Fixes) -> None:
    """Build the entry in a temp folder beside it, then publish it (the caller holds the entry's lock)."""
    work = temp_dir(entry.parent)
    try:
        write_qdq_model(fp32, ranges, scheme, work / "model.qdq.onnx", keep_float=fixes.keep_float)
        (work / "ranges.json").write_text(json.dumps({"ranges": [r.to_dict() for r in ranges.values()],
                                                      "producers": producers}))
        (work / "stats.npz").write_bytes(_stats_bytes(stats))
        manifest = {name: file_sha256(work / name) for name in ("model.qdq.onnx", "ranges.json", "stats.npz")}
        (work / "manifest.json").write_text(json.dumps({"files": manifest, "config": asdict(config),
                                                        "scheme": scheme.value, "fixes": fixes.key()}, default=str))
        publish_dir(work, entry)
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)


def read_entry(entry: Path):
    """(ranges, stats, producers) of a valid cache entry, or None (missing, partial or corrupt)."""
    try:
        manifest = json.loads((entry / "manifest.json").read_text())
        for name, digest in manifest["files"].items():
            if file_sha256(entry / name) != digest:
                log.warning("cache entry %s is corrupt (%s changed); rebuilding", entry.name, name)
                return None
        saved = json.loads((entry / "ranges.json").read_text())
        ranges = {}
        for item in saved["ranges"]:
            ranges[item["name"]] = TensorRange(item["name"], item["low"], item["high"], item["observed_min"],
                                               item["observed_max"], item["clipped_fraction"], item["method"])
        stats = _load_stats(entry / "stats.npz")
        touch(entry)
        return ranges, stats, saved["producers"]
    except (OSError, ValueError, KeyError, json.JSONDecodeError):
        if entry.exists():
            log.warning("cache entry %s is unreadable; rebuilding", entry.name)
        return None
