"""The measurements behind docs/findings.md, and its tables themselves (between the `<!-- findings:* -->`
markers; no figure there is typed by hand), the bench tables of docs/measured.md and the README's summary. Writes docs/findings.json, docs/findings.png
(INT8 loss per method) and docs/zero-spike.png (a post-ReLU histogram with both entropy thresholds).

    python scripts/findings.py --data ../shared/data            # about 15 minutes on 2 CPU cores
    python -m sr bench --json > docs/bench.json && python scripts/findings.py --readme-only

Grid: every shipped model x method x samples (10, 100, 1000) on the tensorrt scheme, and x method at 100 samples
on the npu, npu-per-tensor, npu-symmetric and cpu schemes; Set5 and Set14; INT8 Y-PSNR loss against the same model's FP32 output, and the brightness
ratio INT8 / FP32 (mean and darkest image). Then: calibration inputs (raw crops vs bicubic-downscaled), the dark
calibration set, and the other candidate causes of dull INT8 output.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sr.quant.calibrate import CalibrationConfig, Method  # noqa: E402
from sr.data import degrade, list_images, load_image  # noqa: E402
from sr.lab.diagnose import DiagnoseConfig, diagnose  # noqa: E402
from sr.run.runtime import engine_for  # noqa: E402
from sr.metrics import brightness_ratio, psnr_y  # noqa: E402
from sr.model.weights import load_model, save_weights  # noqa: E402
from sr.run.quantize import calibrate_model  # noqa: E402
from sr.quant.recipe import Fixes
from sr.tune.train import TrainConfig, train  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MODELS = ["xlsr-relu", "xlsr-clip", "xlsr-relu-kd", "xlsr-clip-kd", "teacher"]
METHODS = [m.value for m in Method]
SETS = ("Set5", "Set14")


class Bench:
    """FP32 outputs computed once per model and set; INT8 models scored against them."""

    def __init__(self, data: Path):
        self.sets = {name: [degrade(load_image(p), 3) for p in list_images(data / name)] for name in SETS}
        self.fp32: dict[tuple[str, str], list[np.ndarray]] = {}

    def reference(self, model: str, name: str) -> list[np.ndarray]:
        key = (model, name)
        if key not in self.fp32:
            engine = engine_for(model)
            self.fp32[key] = [engine.run(lr) for _, lr in self.sets[name]]
        return self.fp32[key]

    def score(self, model: str, int8, name: str = "Set5", images=None) -> dict:
        engine = engine_for(int8.model, int8)
        pairs = images or self.sets[name]
        references = self.reference(model, name) if images is None else [
            engine_for(model).run(lr) for _, lr in pairs]
        outputs = [engine.run(lr) for _, lr in pairs]
        fp32 = np.mean([psnr_y(r, hr, 3) for r, (hr, _) in zip(references, pairs)])
        quantized = np.mean([psnr_y(o, hr, 3) for o, (hr, _) in zip(outputs, pairs)])
        ratios = [brightness_ratio(o, r) for o, r in zip(outputs, references)]
        return {"fp32": float(fp32), "int8": float(quantized), "drop_db": float(fp32 - quantized),
                "brightness": float(np.mean(ratios)), "darkest": float(np.min(ratios))}


def grid(bench: Bench) -> list[dict]:
    rows = []
    for model in MODELS:
        for scheme in ("tensorrt", "npu", "npu-per-tensor", "npu-symmetric", "cpu"):
            for method in METHODS:
                for samples in ((10, 100, 1000) if scheme == "tensorrt" else (100,)):
                    int8 = calibrate_model(model, CalibrationConfig(method=method, samples=samples), scheme)
                    for name in SETS:
                        rows.append({"model": model, "scheme": scheme, "method": method, "samples": samples,
                                     "data": name, **bench.score(model, int8, name)})
                        print(json.dumps(rows[-1]), flush=True)
    return rows


def calibration_inputs(bench: Bench) -> list[dict]:
    rows = []
    for model in MODELS:
        for method in ("entropy", "mse"):
            for inputs in ("raw", "downscaled"):
                int8 = calibrate_model(model, CalibrationConfig(method=method, samples=100, inputs=inputs), "tensorrt")
                for name in SETS:
                    rows.append({"model": model, "method": method, "inputs": inputs, "data": name,
                                 **bench.score(model, int8, name)})
                    print(json.dumps(rows[-1]), flush=True)
    return rows


def dark_calibration(bench: Bench, data: Path) -> list[dict]:
    """Calibrate on 20 BSD200 images made darker (gain), evaluate on Set14 at normal brightness."""
    folder = tempfile.mkdtemp(prefix="bsd20-")
    for path in list_images(data / "BSD200")[:20]:
        (Path(folder) / path.name).write_bytes(path.read_bytes())
    input_range = Fixes(fixed_range={"input": (0.0, 1.0)})
    bounded = Fixes(fixed_range={"input": (0.0, 1.0), "output": (0.0, 1.0)})
    cases = [(model, method, gain, "none", None) for model in ("xlsr-relu", "xlsr-clip")
             for method in ("minmax", "entropy", "percentile") for gain in (1.0, 0.4, 0.2)]
    cases += [(model, "minmax", 0.4, "keep input float", Fixes(keep_float=["input"])) for model in ("xlsr-relu", "xlsr-clip")]
    cases += [(model, "minmax", 0.4, "input range fixed to [0, 1]", input_range) for model in ("xlsr-relu", "xlsr-clip")]
    cases += [("xlsr-clip", "minmax", 0.4, "input and Clip output ranges fixed to [0, 1] (npu scheme: the output "
               "is quantized there)", bounded)]
    rows = []
    for model, method, gain, fix, fixes in cases:
        config = CalibrationConfig(method=method, samples=100, data=folder, gain=gain)
        int8 = calibrate_model(model, config, "npu" if fixes is bounded else "tensorrt", fixes=fixes)
        rows.append({"model": model, "method": method, "gain": gain, "fix": fix, "data": "Set14",
                     **bench.score(model, int8, "Set14")})
        print(json.dumps(rows[-1]), flush=True)
    # a wider calibration set: the dark images and the default calib_data/ together
    mixed = [*_images(folder, 0.4), *[load_image(p) for p in list_images(ROOT / "calib_data")]]
    for model in ("xlsr-relu", "xlsr-clip"):
        int8 = calibrate_model(model, CalibrationConfig(method="minmax", samples=100), "tensorrt", images=mixed)
        rows.append({"model": model, "method": "minmax", "gain": 0.4, "fix": "dark + calib_data/ together",
                     "data": "Set14", **bench.score(model, int8, "Set14")})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def _images(folder: str, gain: float) -> list[np.ndarray]:
    return [np.clip(np.rint(load_image(p) * gain), 0, 255).astype(np.uint8) for p in list_images(folder)]


def other_candidates(bench: Bench, data: Path) -> list[dict]:
    """A handful of calibration images, an under-trained model, an image-carrying branch joined by a Concat."""
    rows = []
    few = tempfile.mkdtemp(prefix="few-")
    for path in list_images(ROOT / "calib_data")[:2]:
        (Path(few) / path.name).write_bytes(path.read_bytes())
    for method in ("minmax", "entropy", "mse"):
        int8 = calibrate_model("xlsr-relu", CalibrationConfig(method=method, samples=100, data=few), "tensorrt")
        rows.append({"case": "2 calibration images", "model": "xlsr-relu", "method": method, **bench.score("xlsr-relu", int8, "Set14")})
        print(json.dumps(rows[-1]), flush=True)
    work = Path(tempfile.mkdtemp(prefix="under-"))
    young = train(TrainConfig(arch="xlsr", final_activation="relu", train_dirs=[str(data / "T91")], val_dir=None,
                              out=str(work / "xlsr-relu-300.safetensors"), steps=300, device="cpu",
                              checkpoint_every=10**9, val_every=10**9)).weights
    for method in ("minmax", "entropy", "mse"):
        int8 = calibrate_model(str(young), CalibrationConfig(method=method, samples=100), "tensorrt")
        rows.append({"case": "under-trained (300 steps)", "model": "xlsr-relu-300", "method": method,
                     **bench.score(str(young), int8, "Set14")})
        print(json.dumps(rows[-1]), flush=True)
    planted = load_model("xlsr-relu")  # the skip branch 40x wider, the fusing conv 40x smaller: same FP32 output
    import torch

    with torch.no_grad():
        planted.skip.weight.mul_(40.0)
        planted.skip.bias.mul_(40.0)
        planted.fuse.weight[:, 32:].div_(40.0)
    path = save_weights(planted, work / "xlsr-relu-wide-branch.safetensors")
    for method in ("minmax", "entropy", "mse"):
        int8 = calibrate_model(str(path), CalibrationConfig(method=method, samples=100), "tensorrt")
        rows.append({"case": "wide image branch into a Concat", "model": "xlsr-relu-wide-branch", "method": method,
                     **bench.score(str(path), int8, "Set14")})
        print(json.dumps(rows[-1]), flush=True)
    fixed = calibrate_model(str(path), CalibrationConfig(method="entropy", samples=100), "tensorrt",
                            fixes=Fixes(range_method={"/Concat_output_0": "minmax", "/skip/Conv_output_0": "minmax"}))
    rows.append({"case": "wide image branch into a Concat", "model": "xlsr-relu-wide-branch",
                 "method": "entropy + minmax on skip/concat", **bench.score(str(path), fixed, "Set14")})
    print(json.dumps(rows[-1]), flush=True)
    return rows


def recommended(rows: list[dict]) -> dict:
    """The tensorrt-scheme calibration with the smallest mean loss over models and both sets."""
    losses = {}
    for row in rows:
        if row["scheme"] == "tensorrt":
            losses.setdefault((row["method"], row["samples"]), []).append(row["drop_db"])
    (method, samples), values = min(losses.items(), key=lambda item: np.mean(item[1]))
    return {"method": method, "samples": samples, "scheme": "tensorrt", "mean_drop_db": float(np.mean(values))}


def zero_spike_figure(out: Path) -> dict:
    from sr.lab.plots import histogram_figure

    int8 = calibrate_model("xlsr-relu", CalibrationConfig(method="entropy", samples=100), "tensorrt")
    tensor = "/gblocks/gblocks.2/relu/Relu_output_0"
    stats = next(s for s in int8.stats if s.name == tensor)
    figure = histogram_figure(stats, methods=(Method.ENTROPY, Method.ENTROPY_ZEROS),
                              title=f"xlsr-relu {tensor}: {100 * stats.histogram[0] / stats.histogram.sum():.0f}% of "
                                    "the values in bin 0 (exact zeros after the ReLU)")
    figure.savefig(out / "zero-spike.png", dpi=110)
    from sr.quant.searches import threshold

    return {"tensor": tensor, "zero_share": float(stats.histogram[0] / stats.histogram.sum()),
            "entropy": threshold(stats, Method.ENTROPY), "entropy_zeros": threshold(stats, Method.ENTROPY_ZEROS),
            "amax": stats.amax}


def loss_figure(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(9, 4))
    width = 0.15
    for index, model in enumerate(MODELS):
        drops = [next(r["drop_db"] for r in rows if r["model"] == model and r["method"] == m and r["scheme"] == "tensorrt"
                      and r["samples"] == 100 and r["data"] == "Set5") for m in METHODS]
        axis.bar([i + index * width for i in range(len(METHODS))], drops, width, label=model)
    axis.set_xticks([i + 2 * width for i in range(len(METHODS))], METHODS)
    axis.set_ylabel("Set5 Y-PSNR loss of INT8 vs FP32 (dB)")
    axis.set_title("tensorrt scheme (symmetric INT8), 100 calibration samples, bicubic-downscaled calibration inputs")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(out / "findings.png", dpi=110)


def diagnoses(data: Path) -> dict:
    return {model: diagnose(DiagnoseConfig(model, CalibrationConfig(method=method, samples=100), "tensorrt",
                                           data=str(data / "Set5"), top=3)).to_json()
            for model in ("xlsr-relu", "xlsr-clip-kd") for method in ("entropy-zeros",)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--out", default=str(ROOT / "docs"))
    parser.add_argument("--readme-only", action="store_true", help="rewrite the README tables from findings.json")
    parser.add_argument("--resume", action="store_true", help="keep the sections findings.json already has")
    args = parser.parse_args()
    data, out = Path(args.data), Path(args.out)
    out.mkdir(exist_ok=True)
    path = out / "findings.json"
    if not args.readme_only:
        bench = Bench(data)
        results = json.loads(path.read_text()) if args.resume and path.is_file() else {}
        sections = {"rows": lambda: grid(bench), "inputs": lambda: calibration_inputs(bench),
                    "dark": lambda: dark_calibration(bench, data), "candidates": lambda: other_candidates(bench, data),
                    "zero_spike": lambda: zero_spike_figure(out), "diagnosis": lambda: diagnoses(data)}
        for name, measure in sections.items():
            if name not in results:
                results[name] = measure()
                if name == "rows":
                    results["recommended"] = recommended(results["rows"])
                path.write_text(json.dumps(results, indent=1))  # after each section: a crash loses one section
        loss_figure(results["rows"], out)
    import findings_tables

    bench = out / "bench.json"
    findings_tables.rewrite_readme(json.loads(path.read_text()), ROOT,
                                   json.loads(bench.read_text()) if bench.is_file() else None)


if __name__ == "__main__":
    main()
