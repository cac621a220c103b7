"""`python -m sr bench`: every figure is a ratio or a reading taken in one run, on the same data.

- fidelity: our entropy / percentile / mse thresholds against NVIDIA ModelOpt's `_compute_amax_*` on identical
  histograms (every tensor of the model), in bins;
- end to end: our two-pass collection + search against ModelOpt's own `HistogramCalibrator` (which grows its
  bins batch by batch) and against onnxruntime's entropy calibrator, on the same samples: wall time, peak RSS
  (each in a fresh process) and the threshold differences relative to amax;
- peak RSS of a large-sample entropy calibration (ours);
- latency of every engine present (ORT FP32 and INT8 of both schemes, the cpu scheme with and without the
  `sr.quant.rewrite` step; OpenVINO FP32, BF16 and INT8) at 1 and 2 threads, on 320x240 and 1280x720 inputs: the bare
  session and the end-to-end `engine.run` (tiling, uint8 conversion), medians of interleaved runs.

ModelOpt (`nvidia-modelopt`, a test dependency) is optional here: without it those figures are None. The
ModelOpt oracle itself lives outside `sr/` (`oracles/modelopt_reference.py`, beside it in the source tree).
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..quant.calibdata import calibration_patches, load_calibration_images, prepare_calibration_images
from ..quant.calibrate import CalibrationConfig, Method
from ..quant.searches import SEARCHES, threshold, threshold_bins
from ..quant.statistics import collect_statistics
from ..model.models import model_info
from ..run.runtime import cpu_name
from ..run.sessions import Observer
from ..store import PROJECT_ROOT

log = logging.getLogger(__name__)


@dataclass
class BenchConfig:
    """What `python -m sr bench` measures on."""

    model: str = "xlsr-clip"
    samples: int = 100
    large_samples: int = 1000
    patch_size: int = 64

    def __post_init__(self):
        CalibrationConfig(samples=self.samples)
        CalibrationConfig(samples=self.large_samples)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _patches(model: str, samples: int, patch_size: int):
    config = CalibrationConfig(samples=samples, patch_size=patch_size)
    images = prepare_calibration_images(load_calibration_images(None), config, model_info(model).scale)
    return lambda: calibration_patches(images, samples, patch_size, config.seed)


def _ours(fp32, patches, samples: int) -> tuple[dict, dict]:
    stats = collect_statistics(fp32, patches, samples, Observer)
    return {s.name: threshold(s, Method.ENTROPY) for s in stats}, {s.name: s.amax for s in stats}


def _modelopt(fp32, patches) -> tuple[dict, dict]:
    from oracles.modelopt_reference import histogram_calibrator

    return histogram_calibrator(fp32, patches)


def _onnxruntime(fp32, patches) -> tuple[dict, dict]:
    from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator

    class Reader:
        def __init__(self):
            self.iterator = iter(patches())

        def get_next(self):
            patch = next(self.iterator, None)
            return None if patch is None else {"input": patch}

    with tempfile.TemporaryDirectory() as work:
        calibrator = create_calibrator(str(fp32), None, os.path.join(work, "augmented.onnx"), CalibrationMethod.Entropy,
                                       extra_options={"num_bins": 2048, "num_quantized_bins": 128})
        with contextlib.redirect_stdout(io.StringIO()):  # it prints progress lines
            calibrator.collect_data(Reader())
            result = calibrator.compute_data()
    return {name: float(max(abs(float(d.range_value[0])), abs(float(d.range_value[1])))) for name, d in result.items()}, {}


def _child(kind: str, model: str, samples: int, patch_size: int) -> dict:
    """Runs in a fresh process: one calibration, its time, thresholds and peak RSS."""
    from ..run.quantize import fp32_onnx_path

    fp32 = fp32_onnx_path(model)
    patches = _patches(model, samples, patch_size)
    baseline_mb = _peak_rss_mb()
    started = time.perf_counter()
    if kind == "ours":
        thresholds, amax = _ours(fp32, patches, samples)
    elif kind == "modelopt":
        thresholds, amax = _modelopt(fp32, patches)
    else:
        thresholds, amax = _onnxruntime(fp32, patches)
    return {"seconds": time.perf_counter() - started, "thresholds": thresholds, "amax": amax,
            "peak_rss_mb": _peak_rss_mb(), "baseline_rss_mb": baseline_mb}


def _run_child(kind: str, config: BenchConfig, samples: int) -> dict:
    command = [sys.executable, "-c", "import json, sys; from sr.lab.bench import _child; "
               f"print(json.dumps(_child({kind!r}, {config.model!r}, {samples}, {config.patch_size})))"]
    root = str(PROJECT_ROOT)
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"benchmark child {kind} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def modelopt_available() -> bool:
    """True when ModelOpt and the oracle module (`oracles/`, beside `sr/` in the source tree) can be imported."""
    try:
        from oracles.modelopt_reference import modelopt_available as available
    except ImportError:
        return False
    return available()


def _identical_histogram_differences(model: str, samples: int, patch_size: int) -> dict:
    from oracles.modelopt_reference import modelopt_thresholds_bins

    from ..run.quantize import fp32_onnx_path

    stats = collect_statistics(fp32_onnx_path(model), _patches(model, samples, patch_size), samples, Observer)
    worst = {}
    for method in SEARCHES:
        differences = [abs(threshold_bins(s.histogram, method) - modelopt_thresholds_bins(s.histogram, method))
                       for s in stats
                       if s.histogram.sum() > 0 and (method is not Method.ENTROPY_ZEROS or s.observed_min >= 0)]
        worst[method.value] = float(max(differences))
    return worst


def _relative_differences(ours: dict, theirs: dict) -> dict:
    differences = {name: abs(ours["thresholds"][name] - theirs["thresholds"][name]) / ours["amax"][name]
                   for name in ours["thresholds"] if name in theirs["thresholds"] and ours["amax"][name] > 0}
    worst = max(differences, key=differences.get)
    return {"max": differences[worst], "median": float(np.median(list(differences.values()))), "worst_tensor": worst}


SIZES = ((320, 240), (1280, 720))
THREADS = (1, 2)


def _latency_engines(config: BenchConfig, threads: int, work: str) -> tuple[dict, dict]:
    """(name -> (end-to-end run(lr), session run(float array)) for every engine present that agrees with the
    reference, name -> its conformance verdict (refused ones included)), at `threads`."""
    from ..run.conformance import EngineRefused
    from ..run.engines import OrtEngine, openvino_available
    from ..run.quantize import calibrate_model
    from ..quant.qdq import write_unrewritten_cpu_model
    from ..run.runtime import EngineKind, create_engine

    scale = model_info(config.model).scale
    calibration = CalibrationConfig(method="entropy", samples=config.samples)
    int8 = {scheme: calibrate_model(config.model, calibration, scheme) for scheme in ("cpu", "tensorrt", "npu")}
    plain = write_unrewritten_cpu_model(int8["cpu"].fp32_onnx, int8["cpu"].ranges, Path(work) / "plain.onnx")
    engines = {"ort_fp32": create_engine(EngineKind.ORT, config.model, None, threads),
               "ort_int8_cpu_unrewritten": OrtEngine(plain, scale, threads)}
    engines.update({f"ort_int8_{scheme}": create_engine(EngineKind.ORT_INT8, config.model, int8[scheme], threads)
                    for scheme in int8})
    others = [("openvino_fp32", EngineKind.OPENVINO, None), ("openvino_bf16", EngineKind.OPENVINO_BF16, None)]
    others += [(f"openvino_int8_{scheme}", EngineKind.OPENVINO_INT8, int8[scheme]) for scheme in int8]
    verdicts = {}
    for name, kind, calibrated in others if openvino_available() else []:
        try:
            engines[name] = create_engine(kind, config.model, calibrated, threads)
            verdicts[name] = engines[name].conformance
        except EngineRefused as error:  # wrong on this CPU: timed not at all, reported
            verdicts[name] = error.conformance
        except Exception as error:  # could not build the model at all
            verdicts[name] = f"{type(error).__name__}: {error}"
    summaries = {name: {"passed": v.passed, "mean_levels": v.mean_levels, "p999_levels": v.p999_levels,
                        "max_levels": v.max_levels, "psnr_db": v.psnr_db} if not isinstance(v, str) else
                 {"passed": False, "error": v, "mean_levels": float("nan"), "p999_levels": float("nan"),
                  "max_levels": -1, "psnr_db": float("nan")} for name, v in verdicts.items()}
    return {name: (engine.run, engine._run_array) for name, engine in engines.items()}, summaries


class _Heartbeat:
    """Says what the benchmark is doing at least every `every` seconds (the log, not a bar: the figures are
    timings, and a redrawn bar would cost time itself): each step's message when it starts, and "still ..." from
    a thread of its own while one step (a calibrator in a child process, say) runs longer. A context manager."""

    def __init__(self, every: float = 10.0):
        self.every, self.started, self.last, self.message = every, time.perf_counter(), 0.0, "starting"
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._repeat, name="bench-heartbeat", daemon=True)

    def __enter__(self) -> "_Heartbeat":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()

    def __call__(self, message: str, force: bool = False) -> None:
        self.message = message
        now = time.perf_counter()
        if force or now - self.last >= self.every:
            log.info("bench [%.0f s]: %s", now - self.started, message)
            self.last = now

    def _repeat(self) -> None:
        while not self._done.wait(self.every / 4):
            now = time.perf_counter()
            if now - self.last >= self.every:
                log.info("bench [%.0f s]: still %s", now - self.started, self.message)
                self.last = now


def _median_ms(times: list[float]) -> float:
    return float(np.median(times) * 1e3)


def _latency(config: BenchConfig, rounds: int = 3, block: int = 4, beat: _Heartbeat | None = None) -> dict:
    """Per engine, threads and input size: the bare session time and the end-to-end time (tiling and uint8
    conversion included), and ratios to ORT FP32 of the same run.

    Engines take turns in blocks (`rounds` times `block` runs each, the first run of every block dropped):
    interleaved, so that a slow minute of the shared machine hits every engine alike, but not run by run,
    because the runtimes' spinning worker threads would then slow each other down.
    """
    if beat is None:
        with _Heartbeat() as own:
            return _latency(config, rounds, block, own)
    rng = np.random.default_rng(0)
    table, conformance = {}, {}
    with tempfile.TemporaryDirectory() as work:
        for threads in THREADS:
            beat(f"making and checking every engine at {threads} thread(s)", force=True)
            engines, conformance = _latency_engines(config, threads, work)
            for width, height in SIZES:
                lr = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
                times = _timed(engines, lr, rounds, block, beat, f"at {threads} thread(s), {width}x{height}")
                table.update({f"{name}@{threads}t@{width}x{height}": {"session_ms": _median_ms(session),
                                                                      "end_to_end_ms": _median_ms(end_to_end)}
                              for name, (session, end_to_end) in times.items()})
    for key, row in table.items():
        _, threads, size = key.split("@")
        base = table[f"ort_fp32@{threads}@{size}"]
        row["session_ratio"] = row["session_ms"] / base["session_ms"]
        row["end_to_end_ratio"] = row["end_to_end_ms"] / base["end_to_end_ms"]
    return table, conformance


def _timed(engines: dict, lr: np.ndarray, rounds: int, block: int, beat, where: str) -> dict:
    """{engine: (session times, end-to-end times)} of one input: the engines take turns in blocks (see
    `_latency`), the first run of every block dropped."""
    array = np.divide(lr.transpose(2, 0, 1)[None], np.float32(255.0), dtype=np.float32)
    times = {name: ([], []) for name in engines}
    for round_index in range(rounds):
        for name, (run, session) in engines.items():
            beat(f"timing {name} {where}, round {round_index + 1} of {rounds}")
            times[name][0].extend(_block(session, array, block))
            times[name][1].extend(_block(run, lr, block))
    return times


def _block(call, argument, block: int) -> list[float]:
    """The seconds of `block` runs of `call(argument)`, after one run left out (the warm-up of the block)."""
    seconds = []
    for index in range(block + 1):
        started = time.perf_counter()
        call(argument)
        if index:
            seconds.append(time.perf_counter() - started)
    return seconds


def _latency_ratios(table: dict) -> dict:
    """The headline ratios at 2 threads, 320x240: the ORT INT8 path, and the best INT8 engine present that
    agrees with the reference (refused engines are not in the table)."""
    at = "@2t@320x240"
    int8 = [key for key in table if key.endswith(at) and "int8" in key and "unrewritten" not in key]
    best = min(int8, key=lambda key: table[key]["session_ms"])
    return {"latency_ratio_int8_cpu_vs_ort_fp32": table[f"ort_int8_cpu{at}"]["session_ratio"],
            "latency_ratio_int8_cpu_vs_ort_fp32_end_to_end": table[f"ort_int8_cpu{at}"]["end_to_end_ratio"],
            "latency_ratio_int8_best_vs_ort_fp32": table[best]["session_ratio"],
            "latency_ratio_int8_best_vs_ort_fp32_end_to_end": min(table[k]["end_to_end_ratio"] for k in int8),
            "latency_int8_best_engine": best.split("@")[0]}


def run_bench(config: BenchConfig) -> dict:
    """Measure everything the module docstring lists.

    Args:
        config: the model and sample counts.

    Returns:
        a flat JSON-ready dict of figures (ModelOpt figures None without ModelOpt).
    """
    model_info(config.model)  # an unknown model is refused before any work
    with _Heartbeat() as beat:
        return _measure_all(config, beat)


def _measure_all(config: BenchConfig, beat: _Heartbeat) -> dict:
    beat("calibration speed and memory: ours, onnxruntime, ours at the large sample count, ModelOpt (each in a "
         "process of its own), then the latency and conformance of every engine", force=True)
    ours = _run_child("ours", config, config.samples)
    beat(f"ours: {ours['seconds']:.1f} s; now onnxruntime's calibrator", force=True)
    ort_run = _run_child("ort", config, config.samples)
    beat(f"onnxruntime: {ort_run['seconds']:.1f} s; now ours at {config.large_samples} samples (peak memory)",
         force=True)
    large = _run_child("ours", config, config.large_samples)
    report = {"model": config.model, "samples": config.samples, "large_samples": config.large_samples,
              "calib_seconds_ours": ours["seconds"], "calib_seconds_ort": ort_run["seconds"],
              "calib_speedup_vs_ort": ort_run["seconds"] / ours["seconds"],
              "calib_peak_rss_mb_ours": ours["peak_rss_mb"], "calib_peak_rss_mb_ort": ort_run["peak_rss_mb"],
              "calib_large_peak_rss_mb": large["peak_rss_mb"], "calib_large_seconds": large["seconds"],
              "threshold_diff_vs_ort_relative": _relative_differences(ours, ort_run),
              "calib_max_threshold_diff_bins_vs_modelopt": None, "calib_threshold_diff_bins_vs_modelopt": None,
              "calib_speedup_vs_modelopt": None, "calib_seconds_modelopt": None, "calib_peak_rss_mb_modelopt": None,
              "threshold_diff_vs_modelopt_end_to_end_relative": None}
    if modelopt_available():
        beat("ModelOpt's threshold searches on identical histograms, then its calibrator", force=True)
        per_method = _identical_histogram_differences(config.model, config.samples, config.patch_size)
        modelopt = _run_child("modelopt", config, config.samples)
        report.update(calib_max_threshold_diff_bins_vs_modelopt=max(per_method.values()),
                      calib_threshold_diff_bins_vs_modelopt=per_method,
                      calib_speedup_vs_modelopt=modelopt["seconds"] / ours["seconds"],
                      calib_seconds_modelopt=modelopt["seconds"], calib_peak_rss_mb_modelopt=modelopt["peak_rss_mb"],
                      threshold_diff_vs_modelopt_end_to_end_relative=_relative_differences(ours, modelopt))
    beat("calibration done; timing every engine at 1 and 2 threads, 320x240 and 1280x720", force=True)
    report["latency"], report["conformance"] = _latency(config, beat=beat)
    report["cpu"] = cpu_name()
    report.update(_latency_ratios(report["latency"]))
    return report


def format_bench(report: dict) -> str:
    """The bench report as text lines."""
    lines = [f"model {report['model']}, {report['samples']} calibration samples (entropy)",
             f"calibration time      ours {report['calib_seconds_ours']:.2f} s, onnxruntime "
             f"{report['calib_seconds_ort']:.2f} s -> {report['calib_speedup_vs_ort']:.1f}x",
             f"peak RSS              ours {report['calib_peak_rss_mb_ours']:.0f} MB, onnxruntime "
             f"{report['calib_peak_rss_mb_ort']:.0f} MB; ours with {report['large_samples']} samples "
             f"{report['calib_large_peak_rss_mb']:.0f} MB"]
    if report["calib_speedup_vs_modelopt"] is not None:
        end_to_end = report["threshold_diff_vs_modelopt_end_to_end_relative"]
        lines += [f"vs ModelOpt           same histograms: max {report['calib_max_threshold_diff_bins_vs_modelopt']:.1f} "
                  f"bins ({json.dumps(report['calib_threshold_diff_bins_vs_modelopt'])})",
                  f"                      end to end: {report['calib_seconds_modelopt']:.1f} s -> "
                  f"{report['calib_speedup_vs_modelopt']:.1f}x; thresholds differ by max {100 * end_to_end['max']:.2f}% "
                  f"of amax ({end_to_end['worst_tensor']}), median {100 * end_to_end['median']:.2f}%"]
    else:
        lines.append("vs ModelOpt           not installed (pip install -r requirements-dev.txt)")
    lines.append(f"latency ({report['model']}, x{model_info(report['model']).scale}), ms: session / end to end "
                 "(ratio to ORT FP32 of the same threads and size)")
    for key, row in report["latency"].items():
        lines.append(f"  {key:<44}{row['session_ms']:>8.1f} / {row['end_to_end_ms']:>7.1f}   "
                     f"({row['session_ratio']:.2f} / {row['end_to_end_ratio']:.2f})")
    lines.append(f"conformance to the reference (ONNX Runtime CPU) on {report.get('cpu', 'this CPU')}, 8-bit levels:")
    for name, verdict in report.get("conformance", {}).items():
        lines.append(f"  {name:<28}{'agrees' if verdict['passed'] else 'REFUSED'}: mean {verdict['mean_levels']:.2f}, "
                     f"99.9th percentile {verdict['p999_levels']:.0f}, max {verdict['max_levels']}")
    lines.append(f"INT8 / ORT FP32 at 2 threads, 320x240 (session / end to end): ORT cpu scheme "
                 f"{report['latency_ratio_int8_cpu_vs_ort_fp32']:.2f} / "
                 f"{report['latency_ratio_int8_cpu_vs_ort_fp32_end_to_end']:.2f}; best "
                 f"({report['latency_int8_best_engine']}) {report['latency_ratio_int8_best_vs_ort_fp32']:.2f} / "
                 f"{report['latency_ratio_int8_best_vs_ort_fp32_end_to_end']:.2f}")
    return "\n".join(lines)
