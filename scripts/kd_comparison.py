"""Evaluate the distillation-mode comparison of issue 15 (weights/README.md, "Distillation modes").

Reads the runs written by the commands in the card (default folder runs/i15/: <setting>-<mode>.safetensors with
setting relu, clip, strong-relu, ... and mode plain, output, upcycled, feature), evaluates each on Set5 and Set14
with `sr.lab.evaluate.evaluate` (the torch engine, as `python -m sr eval`; runs trained on degraded inputs are
evaluated on the same degradation), and writes results.json beside them, a Markdown table on stdout, and the
validation curves as a PNG. `--int8` adds the INT8 loss (ort-int8, the recommended calibration) of each run.

Example:
    OMP_NUM_THREADS=1 python scripts/kd_comparison.py --runs runs/i15 --data ../shared/data --figure docs/kd-curves.png
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sr.lab.evaluate import EvalConfig, evaluate  # noqa: E402
from sr.model.weights import read_metadata  # noqa: E402

MODES = ("plain", "output", "upcycled", "feature")
METRICS = ("psnr_y", "ssim_y", "edge_psnr_y")


def evaluate_run(path: Path, data: Path, int8: bool) -> dict:
    """Set5 and Set14 means of one run (on its own training degradation), and its metadata's figures."""
    metadata = read_metadata(path)
    degradation = metadata["train"].get("degradation", "clean")
    row = {"run": path.stem, "steps": metadata["steps"], "wall_seconds": metadata["wall_seconds"],
           "kd_mode": metadata.get("kd_mode") or "plain", "degradation": degradation,
           "history": metadata["history"], "machine": metadata["machine"]}
    for name in ("Set5", "Set14"):
        report = evaluate(EvalConfig(model=str(path), data=str(data / name), degradation=degradation))
        row[name] = report["mean"]
        row[f"{name}_bicubic"] = report["bicubic"]
        if int8:
            quantized = evaluate(EvalConfig(model=str(path), data=str(data / name), engine="ort-int8",
                                            recommended=True, degradation=degradation))
            row[f"{name}_int8_drop"] = quantized["fp32_mean"]["psnr_y"] - quantized["int8_mean"]["psnr_y"]
    return row


def table(rows: dict[str, dict]) -> str:
    """Markdown: one line per run, gains over the plain fine-tune of the same setting."""
    lines = ["| run | KD mode | LR | Set5 PSNR / SSIM / edge | Set14 PSNR / SSIM / edge | gain Set5 / Set14 (PSNR) | "
             "gain Set5 / Set14 (edge) | INT8 loss Set5 / Set14 | steps | wall time |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, row in rows.items():
        setting = name.rsplit("-", 1)[0]
        base = rows.get(f"{setting}-plain")
        cells = [f"{row[s]['psnr_y']:.3f} / {row[s]['ssim_y']:.4f} / {row[s]['edge_psnr_y']:.3f}" for s in ("Set5", "Set14")]
        gain = lambda metric: " / ".join(f"{row[s][metric] - base[s][metric]:+.3f}" for s in ("Set5", "Set14")) \
            if base is not None and base is not row else "-"
        int8 = " / ".join(f"{row[s + '_int8_drop']:.3f}" for s in ("Set5", "Set14")) if "Set5_int8_drop" in row else "-"
        lines.append(f"| `{name}` | {row['kd_mode']} | {row['degradation']} | {cells[0]} | {cells[1]} | "
                     f"{gain('psnr_y')} | {gain('edge_psnr_y')} | {int8} | {row['steps']} | {row['wall_seconds']:.0f} s |")
    return "\n".join(lines)


def plot(rows: dict[str, dict], path: Path) -> None:
    """Set5 validation PSNR against step, one panel per setting, one line per mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = sorted({name.rsplit("-", 1)[0] for name in rows})
    figure, axes = plt.subplots(1, len(settings), figsize=(4.2 * len(settings), 3.4), squeeze=False)
    for axis, setting in zip(axes[0], settings):
        for mode in MODES:
            row = rows.get(f"{setting}-{mode}")
            if row is None:
                continue
            points = [(h["step"], h["val_psnr"]) for h in row["history"] if "val_psnr" in h]
            axis.plot(*zip(*points), marker="o", label=mode)
        axis.set_title(f"{setting} (Set5, LR {rows[next(n for n in rows if n.startswith(setting))]['degradation']})")
        axis.set_xlabel("step")
        axis.set_ylabel("validation PSNR-Y (dB)")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=90)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default="runs/i15", help="folder of <setting>-<mode>.safetensors runs")
    parser.add_argument("--data", default="../shared/data", help="folder holding Set5 and Set14")
    parser.add_argument("--figure", default=None, help="write the validation curves here (PNG)")
    parser.add_argument("--int8", action="store_true", help="also measure each run's INT8 loss (slower)")
    parser.add_argument("--shipped", nargs="*", default=[], metavar="MODEL",
                        help="also evaluate these shipped models (clean LR), e.g. xlsr-relu xlsr-relu-kd")
    args = parser.parse_args()
    torch.set_num_threads(1)
    runs, data = Path(args.runs), Path(args.data)
    paths = sorted((p for p in runs.glob("*.safetensors") if p.stem.rsplit("-", 1)[-1] in MODES),
                   key=lambda p: (p.stem.rsplit("-", 1)[0], MODES.index(p.stem.rsplit("-", 1)[1])))
    rows = {p.stem: evaluate_run(p, data, args.int8) for p in paths}
    shipped = {name: evaluate_run(Path(f"weights/{name}.safetensors"), data, args.int8) for name in args.shipped}
    (runs / "results.json").write_text(json.dumps({**rows, **shipped}, indent=1))
    print(table(rows))
    for name, row in shipped.items():
        print(f"| `{name}` | " + " | ".join(f"{row[s]['psnr_y']:.3f} / {row[s]['ssim_y']:.4f} / {row[s]['edge_psnr_y']:.3f}"
                                             + (f" (INT8 -{row[s + '_int8_drop']:.3f})" if args.int8 else "")
                                             for s in ("Set5", "Set14")) + " |")
    if args.figure:
        plot(rows, Path(args.figure))


if __name__ == "__main__":
    main()
