"""Does a teacher pay inside QAT? Teacher-guided QAT against plain QAT on the INT8 student that ships.

Both XLSR twins, the tensorrt scheme, the same steps, recipe and seeds with and without the teacher (`sr qat
--teacher teacher --beta B`); each result's INT8 model (ONNX Runtime executing the QDQ model) is scored on Set5
and Set14 (PSNR-Y and edge PSNR-Y) against the ground truth, and compared with the original FP32 student and
with the teacher. Writes docs/kd_qat.json and the table in docs/near-lossless.md between the `<!-- kdqat:* -->` markers.

    python scripts/kd_qat.py --data ../shared/data --steps 500 --seeds 0 1     # about 25 minutes on one core
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from sr.lab.evaluate import EvalConfig, evaluate  # noqa: E402
from sr.tune.qat import QatConfig, quantization_aware_training  # noqa: E402
from sr.store import write_atomic  # noqa: E402

START, END = "<!-- kdqat:start -->", "<!-- kdqat:end -->"
SETS = ("Set5", "Set14")


def scores(model: str, data: Path, int8: bool) -> dict:
    """{set: {"psnr_y", "edge_psnr_y"}} of a model (its INT8 tensorrt model, or FP32)."""
    result = {}
    for name in SETS:
        report = evaluate(EvalConfig(model=model, data=str(data / name), engine="ort-int8" if int8 else "torch"))
        mean = report["int8_mean"] if int8 else report["mean"]
        result[name] = {"psnr_y": mean["psnr_y"], "edge_psnr_y": mean["edge_psnr_y"]}
    return result


def run(twin: str, seed: int, teacher: str | None, args, work: Path) -> dict:
    out = work / f"{twin}-s{seed}-{'kd' if teacher else 'plain'}.safetensors"
    config = QatConfig(model=twin, out=str(out), steps=args.steps, lr=2e-4, range_lr=2e-3, alpha=0.5,
                       beta=args.beta if teacher else 0.0, teacher=teacher, kd_mode=args.kd_mode, equalize=0.5,
                       seed=seed, train_dirs=[str(args.data / "T91"), str(args.data / "BSD200")], val_dir=None,
                       checkpoint_every=10**9, val_every=10**9)
    started = time.perf_counter()
    result = quantization_aware_training(config)
    return {"twin": twin, "seed": seed, "teacher": teacher, "seconds": time.perf_counter() - started,
            "steps": result.steps, **scores(str(result.weights), args.data, int8=True)}


def summary(rows: list[dict], references: dict) -> list[dict]:
    """Per twin and arm (plain / teacher): mean and spread (max - min) over seeds of each set's PSNR."""
    table = []
    for twin in dict.fromkeys(r["twin"] for r in rows):
        for arm in ("plain", "teacher"):
            picked = [r for r in rows if r["twin"] == twin and (r["teacher"] is not None) == (arm == "teacher")]
            entry = {"twin": twin, "arm": arm, "seeds": [r["seed"] for r in picked]}
            for name in SETS:
                for metric in ("psnr_y", "edge_psnr_y"):
                    values = [r[name][metric] for r in picked]
                    entry[f"{name}_{metric}_mean"] = float(np.mean(values))
                    entry[f"{name}_{metric}_spread"] = float(np.max(values) - np.min(values))
                entry[f"{name}_vs_original_db"] = entry[f"{name}_psnr_y_mean"] - references[twin][name]["psnr_y"]
                entry[f"{name}_vs_teacher_db"] = entry[f"{name}_psnr_y_mean"] - references["teacher"][name]["psnr_y"]
            table.append(entry)
    return table


def verdicts(table: list[dict]) -> list[dict]:
    """Per twin: the teacher's gain per set, and whether it is at least twice the larger seed spread."""
    found = []
    for twin in dict.fromkeys(t["twin"] for t in table):
        plain, kd = (next(t for t in table if t["twin"] == twin and t["arm"] == arm) for arm in ("plain", "teacher"))
        entry = {"twin": twin}
        for name in SETS:
            gain = kd[f"{name}_psnr_y_mean"] - plain[f"{name}_psnr_y_mean"]
            spread = max(kd[f"{name}_psnr_y_spread"], plain[f"{name}_psnr_y_spread"])
            entry[f"{name}_gain_db"], entry[f"{name}_spread_db"] = gain, spread
        entry["pays"] = all(entry[f"{n}_gain_db"] >= 2 * entry[f"{n}_spread_db"] and entry[f"{n}_gain_db"] > 0
                            for n in SETS)
        found.append(entry)
    return found


def markdown(results: dict) -> str:
    lines = [f"Teacher-guided QAT against plain QAT, {results['steps']} steps from the original twin (centred I/O, "
             f"equalization 0.5, lr 2e-4, alpha 0.5; with the teacher: beta {results['beta']}, "
             f"{results['kd_mode']} mode), seeds {', '.join(map(str, results['seeds']))}; INT8 (tensorrt scheme, "
             "ONNX Runtime) PSNR-Y / edge PSNR-Y in dB, mean over seeds (spread max - min):", "",
             "| twin | QAT | Set5 | Set14 | Set5 vs original FP32 | Set5 vs teacher | s per run |", "|---|---|---|---|---|---|---|"]
    for t in results["table"]:
        seconds = np.mean([r["seconds"] for r in results["rows"] if r["twin"] == t["twin"]
                           and (r["teacher"] is not None) == (t["arm"] == "teacher")])
        cells = [f"{t[f'{n}_psnr_y_mean']:.3f} ({t[f'{n}_psnr_y_spread']:.3f}) / {t[f'{n}_edge_psnr_y_mean']:.3f}"
                 for n in SETS]
        lines.append(f"| `{t['twin']}` | {t['arm']} | {cells[0]} | {cells[1]} | {t['Set5_vs_original_db']:+.3f} | "
                     f"{t['Set5_vs_teacher_db']:+.3f} | {seconds:.0f} |")
    lines.append("")
    for v in results["verdicts"]:
        lines.append(f"- `{v['twin']}`: the teacher moves INT8 PSNR-Y by {v['Set5_gain_db']:+.3f} dB on Set5 and "
                     f"{v['Set14_gain_db']:+.3f} dB on Set14 (seed spread {v['Set5_spread_db']:.3f} / "
                     f"{v['Set14_spread_db']:.3f}): " + ("**it pays** (a gain of at least twice the spread on both)."
                                                         if v["pays"] else "**it does not pay** here."))
    return "\n".join(lines)


def rewrite_readme(results: dict, readme: Path = ROOT / "docs" / "near-lossless.md") -> None:
    from findings_tables import replace_between

    replace_between(readme, START, END, markdown(results), "the teacher-guided QAT table")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--beta", type=float, default=0.25)
    parser.add_argument("--kd-mode", default="output")
    parser.add_argument("--twins", nargs="+", default=["xlsr-relu", "xlsr-clip"])
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "kd_qat")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "kd_qat.json")
    parser.add_argument("--readme-only", action="store_true")
    args = parser.parse_args()
    if args.readme_only:
        rewrite_readme(json.loads(args.out.read_text()))
        return
    args.work.mkdir(parents=True, exist_ok=True)
    references = {name: scores(name, args.data, int8=False) for name in [*args.twins, "teacher"]}
    rows = []
    for twin in args.twins:
        for seed in args.seeds:
            for teacher in (None, "teacher"):
                rows.append(run(twin, seed, teacher, args, args.work))
                print(json.dumps(rows[-1]), flush=True)
    table = summary(rows, references)
    results = {"steps": args.steps, "seeds": args.seeds, "beta": args.beta, "kd_mode": args.kd_mode,
               "references": references, "rows": rows, "table": table, "verdicts": verdicts(table)}
    write_atomic(json.dumps(results, indent=1).encode(), args.out)
    print(f"wrote {args.out}")
    rewrite_readme(results)


if __name__ == "__main__":
    main()
