"""`python -m sr bench`: every figure is a ratio or a reading taken in one run, on the same data.

- our entropy calibration vs onnxruntime's `create_calibrator(..., Entropy, num_bins=2048,
  num_quantized_bins=128)` on the same samples: wall time, peak RSS of each (each runs in a fresh process)
  and the largest threshold disagreement in TensorRT bins (amax / 2048);
- peak RSS of a 1000-sample entropy calibration;
- latency of PyTorch FP32, ORT FP32 and ORT INT8 (both schemes) on a 320x240 input.
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import numpy as np

from .calibrate import (CalibrationConfig, Method, calibration_patches, collect_statistics, load_calibration_images,
                        threshold)


@dataclass
class BenchConfig:
    model: str = "xlsr-clip"
    samples: int = 100
    large_samples: int = 1000
    patch_size: int = 64

    def __post_init__(self):
        CalibrationConfig(samples=self.samples)
        CalibrationConfig(samples=self.large_samples)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _child(kind: str, model: str, samples: int, patch_size: int) -> dict:
    """Runs in a fresh process: one calibration, its time, thresholds and peak RSS."""
    from .quantize import fp32_onnx_path

    fp32 = fp32_onnx_path(model)
    images = load_calibration_images(None)
    baseline_mb = _peak_rss_mb()
    started = time.perf_counter()
    if kind == "ours":
        stats = collect_statistics(fp32, lambda: calibration_patches(images, samples, patch_size), samples)
        thresholds = {s.name: threshold(s, Method.ENTROPY) for s in stats}
        amax = {s.name: s.amax for s in stats}
    else:
        from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator

        class Reader:
            def __init__(self):
                self.patches = iter(calibration_patches(images, samples, patch_size))

            def get_next(self):
                patch = next(self.patches, None)
                return None if patch is None else {"input": patch}

        with tempfile.TemporaryDirectory() as work:
            calibrator = create_calibrator(str(fp32), None, os.path.join(work, "augmented.onnx"),
                                           CalibrationMethod.Entropy,
                                           extra_options={"num_bins": 2048, "num_quantized_bins": 128})
            import contextlib
            import io

            with contextlib.redirect_stdout(io.StringIO()):  # it prints progress lines
                calibrator.collect_data(Reader())
                result = calibrator.compute_data()
        thresholds = {name: float(max(abs(float(d.range_value[0])), abs(float(d.range_value[1]))))
                      for name, d in result.items()}
        amax = {}
    return {"seconds": time.perf_counter() - started, "thresholds": thresholds, "amax": amax,
            "peak_rss_mb": _peak_rss_mb(), "baseline_rss_mb": baseline_mb}


def _run_child(kind: str, config: BenchConfig, samples: int) -> dict:
    command = [sys.executable, "-c", "import json, sys; from sr.bench import _child; "
               f"print(json.dumps(_child({kind!r}, {config.model!r}, {samples}, {config.patch_size})))"]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"benchmark child {kind} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_bench(config: BenchConfig) -> dict:
    from .engines import latency_ms
    from .evaluate import create_engine
    from .quantize import calibrate_model

    ours = _run_child("ours", config, config.samples)
    theirs = _run_child("ort", config, config.samples)
    large = _run_child("ours", config, config.large_samples)
    differences = {name: abs(ours["thresholds"][name] - theirs["thresholds"][name]) / (ours["amax"][name] / 2048)
                   for name in ours["thresholds"] if name in theirs["thresholds"] and ours["amax"][name] > 0}
    worst = max(differences, key=differences.get)

    lr = np.asarray(load_calibration_images(None)[0])
    rng = np.random.default_rng(0)
    lr = rng.integers(0, 256, (240, 320, 3), dtype=np.uint8) if lr.shape[0] < 240 or lr.shape[1] < 320 else lr[:240, :320]
    latency = {"torch_fp32": latency_ms(create_engine("torch", config.model), lr),
               "ort_fp32": latency_ms(create_engine("ort", config.model), lr)}
    for scheme in ("cpu", "tensorrt"):
        int8 = calibrate_model(config.model, CalibrationConfig(method="entropy", samples=config.samples), scheme)
        latency[f"ort_int8_{scheme}"] = latency_ms(create_engine("ort-int8", config.model, int8), lr)
    return {
        "model": config.model, "samples": config.samples,
        "calib_seconds_ours": ours["seconds"], "calib_seconds_ort": theirs["seconds"],
        "calib_speedup_vs_ort": theirs["seconds"] / ours["seconds"],
        "calib_max_threshold_diff_bins": differences[worst], "calib_max_threshold_diff_tensor": worst,
        "calib_median_threshold_diff_bins": float(np.median(list(differences.values()))),
        "calib_peak_rss_mb_ours": ours["peak_rss_mb"], "calib_peak_rss_mb_ort": theirs["peak_rss_mb"],
        "calib_1000_peak_rss_mb": large["peak_rss_mb"], "calib_1000_seconds": large["seconds"],
        "latency_ms": latency,
        "latency_ratio_int8_cpu_vs_ort_fp32": latency["ort_int8_cpu"] / latency["ort_fp32"],
    }


def format_bench(report: dict) -> str:
    lat = report["latency_ms"]
    return "\n".join([
        f"model {report['model']}, {report['samples']} calibration samples (entropy)",
        f"calibration time      ours {report['calib_seconds_ours']:.2f} s, onnxruntime {report['calib_seconds_ort']:.2f} s"
        f"  -> {report['calib_speedup_vs_ort']:.1f}x",
        f"peak RSS              ours {report['calib_peak_rss_mb_ours']:.0f} MB, onnxruntime "
        f"{report['calib_peak_rss_mb_ort']:.0f} MB; ours with {1000} samples {report['calib_1000_peak_rss_mb']:.0f} MB",
        f"threshold difference  max {report['calib_max_threshold_diff_bins']:.1f} bins "
        f"({report['calib_max_threshold_diff_tensor']}), median {report['calib_median_threshold_diff_bins']:.1f}",
        "latency (320x240, x3) " + ", ".join(f"{k} {v:.1f} ms" for k, v in lat.items()),
        f"INT8 (cpu) / ORT FP32 latency: {report['latency_ratio_int8_cpu_vs_ort_fp32']:.2f}",
    ])
