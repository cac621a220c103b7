"""The INT8-ready table: per model, the INT8 loss against the *original* FP32 model on Set5 and Set14 (tensorrt
scheme, ONNX Runtime executing the QDQ model) for plain calibration and each post-training refinement added in
turn, and for the QAT models when they exist. Writes docs/int8_ready.json; `scripts/findings_tables.py` puts it
in docs/near-lossless.md.

    python scripts/int8_ready.py --data ../shared/data --models xlsr-relu xlsr-clip --qat xlsr-relu=weights/xlsr-relu-qat.safetensors
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from sr.quant.calibrate import CalibrationConfig  # noqa: E402
from sr.lab.evaluate import EvalConfig, evaluate  # noqa: E402
from sr.tune.ptq import RefineConfig, refine  # noqa: E402
from sr.store import write_atomic  # noqa: E402

STEPS = {  # row label -> refinements (each row adds one to the row before, except the AdaRound rows)
    "PTQ (mse, 100 samples)": [],
    "+ centred I/O": ["centred-io"],
    "+ channel equalization": ["centred-io", "equalize"],
    "+ bias correction": ["centred-io", "equalize", "bias-correction"],
    "+ AdaRound (instead of bias correction)": ["centred-io", "equalize", "adaround"],
    "+ AdaRound + bias correction": ["centred-io", "equalize", "adaround", "bias-correction"],
    "+ output-error range search (with bias correction, no AdaRound)": ["centred-io", "equalize", "range-search", "bias-correction"],
}
CALIBRATION = CalibrationConfig(method="mse", samples=100)


def losses(model: str, data: Path) -> dict:
    """{"Set5": ..., "Set14": ...}: INT8 PSNR-Y, the original FP32 PSNR-Y and the loss between them."""
    row = {}
    for name in ("Set5", "Set14"):
        report = evaluate(EvalConfig(model=model, data=str(data / name), engine="ort-int8", calibration=CALIBRATION,
                                     scheme="tensorrt"))
        reference = report.get("fp32_reference", report["fp32_mean"])
        row[name] = {"int8": report["int8_mean"]["psnr_y"], "fp32_original": reference["psnr_y"],
                     "fp32_own": report["fp32_mean"]["psnr_y"],
                     "loss_db": reference["psnr_y"] - report["int8_mean"]["psnr_y"]}
    return row


START, END = "<!-- int8ready:start -->", "<!-- int8ready:end -->"


def table_markdown(table: dict) -> str:
    """The README table: loss vs the original FP32 model, Set5 / Set14, per model and row."""
    models = list(table)
    labels = [label for label in [*STEPS, "QAT"] if any(label in table[m] for m in models)]
    lines = ["| INT8 (tensorrt scheme, ONNX Runtime) | " + " | ".join(f"`{m}` Set5 / Set14" for m in models) + " |",
             "|---" * (len(models) + 1) + "|"]
    for label in labels:
        cells = []
        for model in models:
            row = table[model].get(label)
            cells.append("-" if row is None else f"{row['Set5']['loss_db']:.3f} / {row['Set14']['loss_db']:.3f}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def statements(table: dict) -> list[str]:
    """What the table says, computed from it."""
    def loss(model, label, name):
        return table[model][label][name]["loss_db"] if label in table[model] else None

    lines = []
    for model in table:
        plain, best = (loss(model, "PTQ (mse, 100 samples)", n) for n in ("Set5", "Set14")), \
            (loss(model, "+ bias correction", n) for n in ("Set5", "Set14"))
        plain, best = list(plain), list(best)
        if None not in plain + best:
            lines.append(f"- `{model}`: centred I/O, equalization and bias correction together take the post-training "
                         f"loss from {plain[0]:.3f} / {plain[1]:.3f} to {best[0]:.3f} / {best[1]:.3f} dB "
                         f"({100 * (1 - best[0] / plain[0]):.0f} / {100 * (1 - best[1] / plain[1]):.0f} % less), with "
                         "no training.")
        ada = [loss(model, "+ AdaRound + bias correction", n) for n in ("Set5", "Set14")]
        if None not in ada + best:
            lines.append(f"  AdaRound on top changes it by {ada[0] - best[0]:+.3f} / {ada[1] - best[1]:+.3f} dB "
                         f"for {table[model]['+ AdaRound + bias correction']['seconds']:.0f} s of optimisation.")
        search = [loss(model, "+ output-error range search (with bias correction, no AdaRound)", n)
                  for n in ("Set5", "Set14")]
        if None not in search + best:
            lines.append(f"  The output-error range search instead takes it to {search[0]:.3f} / {search[1]:.3f} dB "
                         f"({search[0] - best[0]:+.3f} / {search[1] - best[1]:+.3f} dB against bias correction alone), "
                         "still with no training.")
        qat = [loss(model, "QAT", n) for n in ("Set5", "Set14")]
        if None not in qat:
            lines.append(f"  QAT (`{table[model]['QAT']['model']}`): {qat[0]:.3f} / {qat[1]:.3f} dB against the "
                         "original FP32 model.")
    return lines


def rewrite_readme(table: dict, readme: Path = ROOT / "docs" / "near-lossless.md") -> None:
    """Replace the text between the int8ready markers."""
    from findings_tables import replace_between

    replace_between(readme, START, END, "\n".join([table_markdown(table), "", *statements(table)]),
                    "the INT8-ready table")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--models", nargs="+", default=["xlsr-relu", "xlsr-clip"])
    parser.add_argument("--qat", nargs="*", default=[], metavar="MODEL=FILE", help="QAT results per model")
    parser.add_argument("--rows", nargs="*", default=list(STEPS), help="which rows (default: all)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "int8_ready.json")
    parser.add_argument("--readme-only", action="store_true", help="rewrite the README table from --out, measure nothing")
    args = parser.parse_args()
    table = json.loads(args.out.read_text()) if args.out.is_file() else {}
    if args.readme_only:
        rewrite_readme(table)
        return
    qat = dict(item.split("=", 1) for item in args.qat)
    for model in args.models:
        rows = table.setdefault(model, {})
        for label in args.rows:
            started = time.perf_counter()
            path = refine(RefineConfig(model, STEPS[label], CALIBRATION, "tensorrt")) if STEPS[label] else model
            seconds = time.perf_counter() - started
            rows[label] = {"refinements": STEPS[label], "seconds": round(seconds, 1), **losses(str(path), args.data)}
            print(model, label, json.dumps(rows[label]), flush=True)
            write_atomic(json.dumps(table, indent=2).encode(), args.out)
        if model in qat:
            rows["QAT"] = {"model": qat[model], **losses(qat[model], args.data)}
            print(model, "QAT", json.dumps(rows["QAT"]), flush=True)
            write_atomic(json.dumps(table, indent=2).encode(), args.out)
    rewrite_readme(table)


if __name__ == "__main__":
    main()
