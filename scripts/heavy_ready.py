"""`int8-ready` on a heavy pre-upsampled network: a full-size VDSR (Kim et al., CVPR 2016: 20 3x3 convolutions of
64 channels on the bicubic-upscaled luma, 665 k multiply-adds per output pixel), trained briefly on T91, through
`int8-ready --data Set5 --budget-minutes 10` with a target nothing meets (-100 dB), so the search walks every
route it can in the budget. Prints the route's timings (each step's seconds, each candidate's loss and when it
was measured) and writes them to docs/heavy_ready.json.

    python scripts/heavy_ready.py --data ../shared/data          # 10 minutes of search, plus the training
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import standins  # noqa: E402
from sr.lab.ready import ReadyConfig, make_ready  # noqa: E402
from sr.run.runtime import cpu_name  # noqa: E402
from sr.store import write_atomic  # noqa: E402
from sr.run.register import register_onnx  # noqa: E402


class Vdsr(nn.Module):
    """VDSR as published: 20 convolutions, 64 channels, ReLU, a global residual on the upscaled luma."""

    def __init__(self, layers: int = 20, channels: int = 64):
        super().__init__()
        body = [nn.Conv2d(1, channels, 3, padding=1), nn.ReLU()]
        for _ in range(layers - 2):
            body += [nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU()]
        body.append(nn.Conv2d(channels, 1, 3, padding=1))
        self.body = nn.Sequential(*body)
        with torch.no_grad():
            self.body[-1].weight.mul_(0.1)

    def forward(self, y):
        return (y + self.body(y)).clamp(0.0, 1.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--budget-minutes", type=float, default=10.0)
    parser.add_argument("--train-steps", type=int, default=100)
    args = parser.parse_args()
    data, folder = Path(args.data), Path(tempfile.mkdtemp())
    model = standins.train_briefly(Vdsr(), 3, str(data / "T91"), args.train_steps, luma=True, pre_upsampled=True)
    path = standins._export(model, folder / "vdsr-665k.onnx", torch.rand(1, 1, 72, 96))
    user = register_onnx(path)
    per_output = user.macs_per_pixel / user.contract.scale ** 2  # (counted per LR pixel; it runs at HR size)
    print(f"{user.name}: {per_output / 1e3:.0f} k multiply-adds per output pixel "
          f"({'pre-upsampled' if user.contract.pre_upsampled else 'not pre-upsampled?'}, x{user.contract.scale})")
    started = time.perf_counter()
    result = make_ready(ReadyConfig(user.name, data=str(data / "Set5"), target_db=-100.0,
                                    budget_minutes=args.budget_minutes),
                        progress=lambda f, m: print(f"  [{time.perf_counter() - started:6.1f} s] {m}", flush=True))
    report = {"macs_per_output_pixel": per_output, "cpu": cpu_name(), "load_average": os.getloadavg()[0],
              "budget_minutes": args.budget_minutes, "wall_seconds": time.perf_counter() - started,
              "ready": result.to_json()}
    write_atomic(json.dumps(report, indent=1).encode(), ROOT / "docs" / "heavy_ready.json")
    for step in result.steps:
        print(f"{step.route}: {step.seconds:.0f} s; " + "; ".join(
            f"{c.what}: {c.loss_db:+.3f} dB at {c.at:.0f} s" for c in step.tried) + "".join(
            f" ({note})" for note in step.notes))
    print(f"chosen: {result.chosen.what}, {result.loss_db:+.3f} dB, search {result.seconds:.0f} s of "
          f"{60 * args.budget_minutes:.0f}")


if __name__ == "__main__":
    main()
