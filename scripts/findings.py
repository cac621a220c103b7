"""The measurements behind the README's "Findings": INT8 vs FP32 on Set5/Set14 for every shipped model,
calibration method, scheme and sample count, plus the diagnosis of the worst case. Writes docs/findings.json
and docs/findings.png.

    python scripts/findings.py --data ../shared/data
"""
import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from sr.diagnose import diagnose
from sr.evaluate import EvalConfig, evaluate

MODELS = ["xlsr-relu", "xlsr-clip", "xlsr-relu-kd", "xlsr-clip-kd", "teacher"]
METHODS = ["entropy", "minmax", "percentile", "mse"]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default="../shared/data")
    parser.add_argument("--out", default="docs")
    args = parser.parse_args()
    rows = []
    for model in MODELS:
        for scheme in ("tensorrt", "cpu"):
            for method in METHODS:
                big = method == "entropy" and scheme == "tensorrt" and model != "teacher"
                for samples in ((10, 100, 1000) if big else (100,)):
                    for data in (("Set5", "Set14") if scheme == "tensorrt" else ("Set5",)):
                        report = evaluate(EvalConfig(model=model, data=f"{args.data}/{data}", engine="ort-int8",
                                                     method=method, samples=samples, scheme=scheme))
                        rows.append({"model": model, "scheme": scheme, "method": method, "samples": samples,
                                     "data": data, "fp32": report["fp32_mean"]["psnr_y"],
                                     "int8": report["int8_mean"]["psnr_y"],
                                     "drop_db": report["fp32_mean"]["psnr_y"] - report["int8_mean"]["psnr_y"],
                                     "brightness": report["brightness_ratio"]})
                        print(json.dumps(rows[-1]), flush=True)
    culprits = {model: diagnose(model, "entropy", 100, "tensorrt", data=f"{args.data}/Set5", top=3).to_json()
                for model in MODELS if model != "teacher"}
    out = Path(args.out)
    out.mkdir(exist_ok=True)
    (out / "findings.json").write_text(json.dumps({"rows": rows, "diagnosis": culprits}, indent=1))
    figure, axis = plt.subplots(figsize=(9, 4))
    width = 0.15
    for index, model in enumerate(MODELS):
        drops = [next(r["drop_db"] for r in rows if r["model"] == model and r["method"] == m and r["scheme"] == "tensorrt"
                      and r["samples"] == 100 and r["data"] == "Set5") for m in METHODS]
        axis.bar([i + index * width for i in range(len(METHODS))], drops, width, label=model)
    axis.set_xticks([i + 2 * width for i in range(len(METHODS))], METHODS)
    axis.set_ylabel("Set5 Y-PSNR loss of INT8 vs FP32 (dB)")
    axis.set_title("tensorrt scheme (symmetric INT8), 100 calibration samples")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(out / "findings.png", dpi=110)


if __name__ == "__main__":
    main()
