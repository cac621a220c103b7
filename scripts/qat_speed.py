"""QAT's seconds per step and what a cheaper step costs in quality: per model and LR patch size, from the shipped
model (batch 16, 2 CPU threads), the seconds per step (from step 50, setup excluded) and the INT8 loss of the
result against the original FP32 model on Set5 (tensorrt scheme, mse, ONNX Runtime): for 300 steps each, and
with --seconds for the same wall time each (the steps it took).

    python scripts/qat_speed.py --data ../shared/data
    python scripts/qat_speed.py --data ../shared/data --seconds 60 --patches 32 16
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from sr.quant.calibrate import CalibrationConfig  # noqa: E402
from sr.lab.evaluate import EvalConfig, evaluate  # noqa: E402
from sr.tune.qat import QatConfig, quantization_aware_training  # noqa: E402


def one(model: str, patch: int, steps: int, data: Path, work: Path, seconds: float | None = None) -> dict:
    marks = {}
    config = QatConfig(model=model, out=str(work / f"{model}-{patch}.safetensors"), steps=steps, lr_patch=patch,
                       batch_size=16, val_dir=None, checkpoint_every=10**9, device="cpu", max_seconds=seconds,
                       train_dirs=[str(data / "T91"), str(data / "BSD200")])
    result = quantization_aware_training(config, lambda event: marks.setdefault(event["step"], time.perf_counter()))
    last = max(marks)
    per_step = (marks[last] - marks[50]) / (last - 50)
    report = evaluate(EvalConfig(model=config.out, data=str(data / "Set5"), engine="ort-int8",
                                 calibration=CalibrationConfig(method="mse", samples=100)))
    return {"model": model, "patch": patch, "seconds_per_step": per_step, "loss_db": report["int8_vs_reference_db"],
            "steps": result.steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--models", nargs="+", default=["xlsr-relu"])
    parser.add_argument("--patches", nargs="+", type=int, default=[32, 24, 16])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seconds", type=float, default=None, help="the same wall time for each run instead")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp())
    steps = 10**6 if args.seconds else args.steps
    print(f"| model | LR patch | steps | s/step ({torch.get_num_threads()} threads) | INT8 loss vs original FP32, "
          "Set5 (dB) |")
    print("|---|---|---|---|---|")
    for model in args.models:
        for patch in args.patches:
            row = one(model, patch, steps, args.data, work, args.seconds)
            print(f"| {model} | {patch} | {row['steps']} | {row['seconds_per_step']:.3f} | {row['loss_db']:.3f} |",
                  flush=True)


if __name__ == "__main__":
    main()
