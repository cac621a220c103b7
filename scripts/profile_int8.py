"""Where the INT8 time goes, per operator type, from ONNX Runtime's own profiler: FP32, the plain `cpu`-scheme
QDQ model, and the same model after `sr.quant.rewrite` (every Conv on the fast INT8 kernel), on one 320x240 input.

    python scripts/profile_int8.py [--model xlsr-clip] [--threads 2] [--runs 20]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sr.quant.calibrate import CalibrationConfig  # noqa: E402
from sr.run.quantize import calibrate_model
from sr.quant.quantspec import Scheme
from sr.quant.qdq import write_unrewritten_cpu_model  # noqa: E402


def profile(path: Path, threads: int, runs: int, array: np.ndarray) -> dict[str, float]:
    """Milliseconds per run spent in each operator type (kernel time as ONNX Runtime records it)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.enable_profiling = True
    options.profile_file_prefix = str(Path(tempfile.mkdtemp()) / "profile")
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    for _ in range(3):
        session.run(None, {"input": array})
    session.end_profiling()
    options.profile_file_prefix = str(Path(tempfile.mkdtemp()) / "profile")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    for _ in range(runs):
        session.run(None, {"input": array})
    events = json.loads(Path(session.end_profiling()).read_text())
    totals: dict[str, float] = defaultdict(float)
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            totals[event["args"]["op_name"]] += event["dur"] / 1000.0 / runs
    return dict(sorted(totals.items(), key=lambda item: -item[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="xlsr-clip")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    fast = calibrate_model(args.model, CalibrationConfig(method="entropy", samples=100), Scheme.CPU)
    plain = write_unrewritten_cpu_model(fast.fp32_onnx, fast.ranges, Path(tempfile.mkdtemp()) / "plain.onnx")
    array = np.random.default_rng(0).random((1, 3, 240, 320), dtype=np.float32)
    for label, path in (("FP32", fast.fp32_onnx), ("INT8 cpu scheme, plain", plain),
                        ("INT8 cpu scheme, rewritten", fast.qdq_onnx)):
        totals = profile(path, args.threads, args.runs, array)
        print(f"{label}: {sum(totals.values()):.1f} ms of kernels per run ("
              + ", ".join(f"{op} {ms:.1f}" for op, ms in totals.items() if ms >= 0.05) + ")")


if __name__ == "__main__":
    main()
