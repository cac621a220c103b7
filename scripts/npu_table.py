"""INT8 as the NPU runs it: for every shipped model and every family stand-in (tests/standins.py, trained 300
steps on T91), the `npu` (LiteRT's specification) and `npu-symmetric` models, entropy calibration at 100 samples,
measured on Set5: PSNR-Y against the same model's FP32 output on the reference (ONNX Runtime's CPU kernels), on
Qualcomm's Hexagon NPU arithmetic (`qnn-htp`, libQnnHtp's x86 simulation, the chip named) and, for `npu`, on the
bundle's .tflite in LiteRT (XNNPACK and the reference kernels); the loss against the ground truth (FP32 minus
INT8), whether white comes out white, and how far each target is from the reference on the Set5 images
themselves (mean / 99.9th percentile / max 8-bit levels); a target that cannot run a model says why. Writes docs/npu.json and the table between
the `npu` markers in docs/how-int8-is-made.md.

    python scripts/npu_table.py --data ../shared/data              # about 10 minutes on 2 CPU cores
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import standins  # noqa: E402
from sr.quant.calibrate import CalibrationConfig  # noqa: E402
from sr.lab.compare import InputMode  # noqa: E402
from sr.lab.scorer import eval_pairs  # noqa: E402
from sr.run.npu import DEFAULT_HTP_ARCH  # noqa: E402
from sr.metrics import psnr_y  # noqa: E402
from sr.model.models import model_info  # noqa: E402
from sr.model.weights import shipped_models  # noqa: E402
from sr.run.quantize import calibrate_model  # noqa: E402
from sr.run.runtime import EngineKind, cpu_name, engine_for  # noqa: E402
from sr.store import write_atomic  # noqa: E402
from sr.run.register import register_onnx  # noqa: E402



ENGINES = {"npu": ("qnn-htp", "litert", "litert-ref"), "npu-symmetric": ("qnn-htp",)}


def _scores(outputs, pairs, fp32_out, fp32_truth, scale) -> dict:
    return {"vs_fp32_db": float(np.mean([psnr_y(o, f, scale) for o, f in zip(outputs, fp32_out)])),
            "loss_db": fp32_truth - float(np.mean([psnr_y(o, t, scale) for o, (_, t) in zip(outputs, pairs)]))}


def measure(model: str, data: Path, arch: str) -> list[dict]:
    """One row per (scheme, engine): the reference's figures, then each target's, with its agreement."""
    scale = model_info(model).scale
    pairs = eval_pairs(str(data / "Set5"), None, InputMode.GROUND_TRUTH, scale, None)
    fp32 = engine_for(model)
    fp32_out = [fp32.run(lr) for lr, _ in pairs]
    fp32_truth = float(np.mean([psnr_y(o, t, scale) for o, (_, t) in zip(fp32_out, pairs)]))
    white = np.full((40, 40, 3), 255, np.uint8)
    rows = []
    for scheme, kinds in ENGINES.items():
        int8 = calibrate_model(model, CalibrationConfig(method="entropy", samples=100), scheme)
        reference = engine_for(model, int8)
        ref_out = [reference.run(lr) for lr, _ in pairs]
        rows.append({"model": model, "scheme": scheme, "engine": reference.name,
                     **_scores(ref_out, pairs, fp32_out, fp32_truth, scale), "white_max": int(reference.run(white).max())})
        for kind in kinds:
            started = time.perf_counter()
            try:
                engine = engine_for(model, int8, kind=EngineKind(kind), htp_arch=arch)
            except Exception as error:  # refused in words: the reason is the row
                rows.append({"model": model, "scheme": scheme, "engine": kind, "refused": str(error)})
                continue
            outputs = [engine.run(lr) for lr, _ in pairs]
            diff = np.concatenate([np.abs(o.astype(np.int16) - r.astype(np.int16)).ravel()
                                   for o, r in zip(outputs, ref_out)])
            rows.append({"model": model, "scheme": scheme, "engine": engine.name,
                         **_scores(outputs, pairs, fp32_out, fp32_truth, scale), "white_max": int(engine.run(white).max()),
                         "vs_reference": {"mean": float(diff.mean()), "p999": float(np.percentile(diff, 99.9)),
                                          "max": int(diff.max()), "share_differing": float((diff > 0).mean())},
                         "seconds_per_image": (time.perf_counter() - started) / len(pairs)})
    for row in rows:
        print(json.dumps(row), flush=True)
    return rows


def markdown(rows: list[dict], arch: str, cpu: str) -> str:
    lines = [f"Measured on {cpu}; `qnn-htp` is Qualcomm's HTP v{arch} as `onnxruntime-qnn` 2.7 (QAIRT 2.51) "
             "simulates it on x86; `litert` is the bundle's .tflite on LiteRT 2.3's XNNPACK, `litert-ref` on its "
             "reference kernels (entropy calibration, 100 samples, Set5; the agreement is over every output pixel "
             "of Set5).", "",
             "| model | scheme | engine | PSNR-Y vs FP32 (dB) | loss vs truth (dB) | white (max level) | "
             "vs the reference: mean / p99.9 / max levels, pixels differing |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "refused" in r:
            lines.append(f"| {r['model']} | {r['scheme']} | {r['engine']} | refused: {r['refused'][:160]} | | | |")
            continue
        v = r.get("vs_reference")
        agreement = "(the reference)" if v is None else \
            f"{v['mean']:.2f} / {v['p999']:.0f} / {v['max']}, {100 * v['share_differing']:.0f}%"
        lines.append(f"| {r['model']} | {r['scheme']} | {r['engine']} | {r['vs_fp32_db']:.2f} | {r['loss_db']:.3f} | "
                     f"{r['white_max']} | {agreement} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--htp-arch", default=DEFAULT_HTP_ARCH)
    parser.add_argument("--only", nargs="+", default=shipped_models() + standins.FAMILY_NAMES,
                        help="measure these models again; the saved rows of the others are kept")
    args = parser.parse_args()
    order = shipped_models() + standins.FAMILY_NAMES
    if unknown := sorted(set(args.only) - set(order)):
        parser.error(f"unknown model(s): {', '.join(unknown)}; choose from {', '.join(order)}")
    data, saved = Path(args.data), ROOT / "docs" / "npu.json"
    measured: dict[str, list] = {}
    if saved.is_file() and set(args.only) != set(order):
        kept = json.loads(saved.read_text())
        if kept.get("htp_arch") != args.htp_arch or kept.get("cpu") != cpu_name():
            parser.error("the saved rows are from another chip or CPU: measure every model (no --only)")
        for row in kept["rows"]:
            measured.setdefault(row["model"], []).append(row)
    with tempfile.TemporaryDirectory() as work:
        for name in args.only:
            if name in shipped_models():
                measured[name] = measure(name, data, args.htp_arch)
                continue
            user = register_onnx(standins.family(name, Path(work), str(data / "T91")))
            measured[name] = [{**row, "model": name} for row in measure(user.name, data, args.htp_arch)]
    rows = [row for name in order for row in measured.get(name, [])]
    cpu = cpu_name()
    write_atomic(json.dumps({"cpu": cpu, "htp_arch": args.htp_arch, "rows": rows}, indent=1).encode(),
                 ROOT / "docs" / "npu.json")
    doc = ROOT / "docs" / "how-int8-is-made.md"
    text = doc.read_text()
    table = markdown(rows, args.htp_arch, cpu)
    text = re.sub(r"<!-- npu:start -->.*<!-- npu:end -->", lambda _: f"<!-- npu:start -->\n{table}\n<!-- npu:end -->",
                  text, flags=re.S)
    write_atomic(text.encode(), doc)
    print(table)


if __name__ == "__main__":
    main()
