"""The README's Findings section, written from docs/findings.json (by scripts/findings.py): every figure in it
comes from the measurements, and every comparison in the prose is computed, not typed.

    python scripts/findings.py --readme-only
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

START, END = "<!-- findings:start -->", "<!-- findings:end -->"
BENCH_START, BENCH_END = "<!-- bench:start -->", "<!-- bench:end -->"
SUMMARY_START, SUMMARY_END = "<!-- summary:start -->", "<!-- summary:end -->"
MODELS = ["xlsr-relu", "xlsr-clip", "xlsr-relu-kd", "xlsr-clip-kd", "teacher"]
METHODS = ["entropy", "entropy-zeros", "minmax", "percentile", "mse"]


def _pick(rows, **where) -> list[dict]:
    return [r for r in rows if all(r.get(k) == v for k, v in where.items())]


def _one(rows, **where) -> dict:
    found = _pick(rows, **where)
    assert len(found) == 1, (where, len(found))
    return found[0]


def _cell(rows, **where) -> str:
    set5, set14 = _one(rows, data="Set5", **where), _one(rows, data="Set14", **where)
    return f"{set5['drop_db']:.2f} / {set14['drop_db']:.2f} ({min(set5['darkest'], set14['darkest']):.3f})"


def _mean(rows, **where) -> float:
    return float(np.mean([r["drop_db"] for r in _pick(rows, **where)]))


def method_table(rows, scheme: str) -> str:
    lines = ["| model | FP32 Set5 / Set14 | " + " | ".join(METHODS) + " |", "|---" * (len(METHODS) + 2) + "|"]
    for model in MODELS:
        fp32 = f"{_one(rows, model=model, scheme=scheme, method='minmax', samples=100, data='Set5')['fp32']:.2f} / " \
               f"{_one(rows, model=model, scheme=scheme, method='minmax', samples=100, data='Set14')['fp32']:.2f}"
        cells = [_cell(rows, model=model, scheme=scheme, method=m, samples=100) for m in METHODS]
        lines.append(f"| `{model}` | {fp32} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def samples_table(rows) -> str:
    lines = ["| method | 10 samples | 100 samples | 1000 samples |", "|---|---|---|---|"]
    for method in METHODS:
        cells = []
        for samples in (10, 100, 1000):
            five = _mean(rows, scheme="tensorrt", method=method, samples=samples, data="Set5")
            fourteen = _mean(rows, scheme="tensorrt", method=method, samples=samples, data="Set14")
            cells.append(f"{five:.2f} / {fourteen:.2f}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def inputs_table(rows) -> str:
    lines = ["| model | entropy raw | entropy downscaled | mse raw | mse downscaled |", "|---|---|---|---|---|"]
    for model in MODELS:
        cells = [_cell(rows, model=model, method=m, inputs=i) for m in ("entropy", "mse") for i in ("raw", "downscaled")]
        lines.append(f"| `{model}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def dark_table(rows) -> str:
    lines = ["| model | method | calibration brightness gain | fix | Set14 loss (dB) | brightness INT8/FP32 (darkest image) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| `{r['model']}` | {r['method']} | {r['gain']:.1f} | {r['fix']} | {r['drop_db']:.2f} | "
                     f"{r['brightness']:.3f} ({r['darkest']:.3f}) |")
    return "\n".join(lines)


def candidates_table(rows) -> str:
    lines = ["| case | model | method | Set14 loss (dB) | brightness (darkest image) |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['case']} | `{r['model']}` | {r['method']} | {r['drop_db']:.2f} | "
                     f"{r['brightness']:.3f} ({r['darkest']:.3f}) |")
    return "\n".join(lines)


def _statements(results: dict) -> list[str]:
    rows, dark, spike = results["rows"], results["dark"], results["zero_spike"]
    t = dict(scheme="tensorrt", samples=100)
    relu = np.mean([_mean(rows, model=m, method=k, **t) for m in ("xlsr-relu", "xlsr-relu-kd") for k in METHODS])
    clip = np.mean([_mean(rows, model=m, method=k, **t) for m in ("xlsr-clip", "xlsr-clip-kd") for k in METHODS])
    verdict = "helps" if clip < relu - 0.05 else ("hurts" if clip > relu + 0.05 else "makes no material difference")
    entropy, zeros = _mean(rows, method="entropy", **t), _mean(rows, method="entropy-zeros", **t)
    darkest_normal = min(r["darkest"] for r in rows)
    dark_04 = [r for r in dark if r["gain"] == 0.4 and r["fix"] == "none"]
    worst_dark = min(dark_04, key=lambda r: r["brightness"])
    kept = [r for r in dark if r["fix"] == "keep input float"]
    fixed_input = [r for r in dark if r["fix"] == "input range fixed to [0, 1]"]
    bounded = [r for r in dark if r["fix"].startswith("input and Clip output")]
    mixed = [r for r in dark if r["fix"].startswith("dark + calib_data")]
    clip_dark = [r for r in dark_04 if r["model"] == "xlsr-clip" and r["method"] == worst_dark["method"]]
    best = results["recommended"]
    candidates = results["candidates"]
    few = max(r["drop_db"] for r in candidates if r["case"].startswith("2 calibration"))
    young = max(r["drop_db"] for r in candidates if r["case"].startswith("under-trained"))
    wide = {r["method"]: r for r in candidates if r["case"].startswith("wide image branch")}
    kept_text = ", ".join(f"{r['brightness']:.3f}" for r in kept)
    mixed_text = ", ".join(f"{r['brightness']:.3f}" for r in mixed)
    fixed_text = ", ".join(f"{r['brightness']:.3f}" for r in fixed_input)
    bounded_text = ", ".join(f"{r['brightness']:.3f}" for r in bounded)
    return [
        f"1. **The Clipped ReLU {verdict} for INT8 robustness on our models**: over every method at 100 samples "
        f"(tensorrt scheme, Set5 and Set14), the two ReLU XLSRs lose {relu:.2f} dB on average and the two "
        f"Clipped-ReLU XLSRs {clip:.2f} dB.",
        f"2. **Entropy as NVIDIA publishes it is not the problem; the zero spike is.** ModelOpt's entropy (zero bin "
        f"flattened) loses {entropy:.2f} dB on average (all models, both sets, 100 samples); the same search "
        f"counting the zeros (`entropy-zeros`) loses {zeros:.2f} dB. On `{spike['tensor']}` of xlsr-relu, "
        f"{100 * spike['zero_share']:.0f}% of the calibration values are exact zeros: counting them pulls the "
        f"threshold from {spike['entropy']:.3g} to {spike['entropy_zeros']:.3g} (observed max {spike['amax']:.3g}), "
        f"clipping the tail (`docs/zero-spike.png`).",
        f"3. **With calibration data like the deployment data, INT8 does not come out dark here**: the darkest "
        f"single image over the whole grid keeps {darkest_normal:.3f} of its FP32 brightness.",
        f"4. **It does come out dark when the calibration set is darker than what the model sees**: calibrated on "
        f"20 BSD200 images at 40% brightness, `{worst_dark['model']}` ({worst_dark['method']}) keeps "
        f"{worst_dark['brightness']:.3f} of its brightness on Set14 (darkest image {worst_dark['darkest']:.3f}), "
        f"{worst_dark['drop_db']:.1f} dB below FP32; the Clipped ReLU does not protect (`xlsr-clip`: "
        f"{clip_dark[0]['brightness']:.3f}). Keeping the input tensor in float recovers only to "
        f"{kept_text}, because every internal range was calibrated on "
        f"the darker data; fixing the input's range to [0, 1] gives {fixed_text}, and also the Clipped ReLU's output "
        f"to its bounds [0, 1] (where the Clip really fixes the range) {bounded_text}; calibrating on the dark "
        f"images together with `calib_data/` gives {mixed_text}. More samples cannot fix it (they come from the "
        "same dark set); a calibrator whose preprocessing scales images differently from inference is the same "
        "brightness gain. The app's coverage check flags it on the first run, and the preset "
        "\"dark calibration set\" reproduces it.",
        f"5. **The other candidates** (Set14): two calibration images instead of sixty cost at most {few:.2f} dB, "
        f"an under-trained model (300 steps) at most {young:.2f} dB; neither darkens. An image-carrying branch "
        f"40x wider than the rest, joined by a Concat, does: entropy loses {wide['entropy']['drop_db']:.1f} dB "
        f"(brightness {wide['entropy']['brightness']:.3f}, darkest image {wide['entropy']['darkest']:.3f}); minmax "
        f"ranges on the branch and the Concat leave {wide['entropy + minmax on skip/concat']['drop_db']:.1f} dB, "
        "the price of one 8-bit grid spread over a 40x wider range (`python -m sr diagnose` ranks that Concat "
        "first; the cure is a network without the disparity, or that tensor kept in float).",
        f"6. **Recommended** (`--recommended`, re-derived from the table: the smallest mean loss of the tensorrt "
        f"scheme): `{best['method']}` with {best['samples']} samples, {best['mean_drop_db']:.3f} dB on average.",
    ]


def seed_answers(results: dict, int8_ready: dict | None, kd: dict | None) -> list[str]:
    """The lab's founding questions, in their order, each answered from the measurements: does the Clipped ReLU
    matter (and where), what the smaller retrained model costs, what distillation buys in FP32 and in INT8; then
    what the INT8 target (placement, per-tensor weights) does."""
    rows = results["rows"]
    t = dict(scheme="tensorrt", samples=100, method="entropy")

    def fp32(model, name):
        return _one(rows, model=model, data=name, **t)["fp32"]

    relu = np.mean([_mean(rows, model=m, method=k, scheme="tensorrt", samples=100)
                    for m in ("xlsr-relu", "xlsr-relu-kd") for k in METHODS])
    clip = np.mean([_mean(rows, model=m, method=k, scheme="tensorrt", samples=100)
                    for m in ("xlsr-clip", "xlsr-clip-kd") for k in METHODS])
    lines = ["**The questions this lab was built for**, answered from the measurements below:", ""]
    where = ""
    if int8_ready and all("QAT" in int8_ready.get(m, {}) for m in ("xlsr-relu", "xlsr-clip")):
        q = {m: int8_ready[m]["QAT"] for m in ("xlsr-relu", "xlsr-clip")}
        centred = {m: int8_ready[m]["+ centred I/O"]["Set5"]["loss_db"] - int8_ready[m]["PTQ (mse, 100 samples)"]
                   ["Set5"]["loss_db"] for m in ("xlsr-relu", "xlsr-clip")}
        where = (f"; centred I/O changes the Set5 loss by {centred['xlsr-relu']:+.3f} dB (ReLU) and "
                 f"{centred['xlsr-clip']:+.3f} dB (Clipped ReLU); after QAT the twins lose "
                 f"{q['xlsr-relu']['Set5']['loss_db']:.3f} / {q['xlsr-relu']['Set14']['loss_db']:.3f} (ReLU) and "
                 f"{q['xlsr-clip']['Set5']['loss_db']:.3f} / {q['xlsr-clip']['Set14']['loss_db']:.3f} dB (Clipped ReLU)")
    bounded = [r for r in results["dark"] if r["fix"].startswith("input and Clip output")]
    lines.append(f"- **Does the Clipped ReLU matter?** Post-training (tensorrt, every method, 100 samples, both "
                 f"sets) the ReLU XLSRs lose {relu:.2f} dB and the Clipped-ReLU XLSRs {clip:.2f} dB on average"
                 f"{where}. It does not protect against a dark calibration set by itself (4. below); its bound "
                 "helps only where it fixes a range that is quantized: with every tensor in INT8 (`npu`) and its "
                 "output range fixed to [0, 1], the dark case keeps "
                 + ", ".join(f"{r['brightness']:.3f}" for r in bounded) + " of its brightness.")
    teacher = [fp32("teacher", n) for n in ("Set5", "Set14")]
    small = [fp32("xlsr-clip", n) for n in ("Set5", "Set14")]
    drops = {m: [_one(rows, model=m, data=n, **t)["drop_db"] for n in ("Set5", "Set14")]
             for m in ("teacher", "xlsr-clip")}
    lines.append(f"- **The smaller retrained model**: the 22k-parameter Clipped-ReLU XLSR scores {small[0]:.2f} / "
                 f"{small[1]:.2f} dB in FP32 against the 940k-parameter teacher's {teacher[0]:.2f} / "
                 f"{teacher[1]:.2f} (Set5 / Set14), 43x fewer parameters for {teacher[0] - small[0]:.2f} dB; in "
                 f"INT8 (entropy, 100 samples) the teacher loses {drops['teacher'][0]:.2f} / {drops['teacher'][1]:.2f} "
                 f"dB and the XLSR {drops['xlsr-clip'][0]:.2f} / {drops['xlsr-clip'][1]:.2f}.")
    kd_fp32 = {m: [fp32(f"{m}-kd", n) - fp32(m, n) for n in ("Set5", "Set14")] for m in ("xlsr-relu", "xlsr-clip")}
    text = (f"- **Distillation**: in FP32 the distilled twins move Set5 / Set14 by "
            f"{kd_fp32['xlsr-relu'][0]:+.3f} / {kd_fp32['xlsr-relu'][1]:+.3f} dB (ReLU) and "
            f"{kd_fp32['xlsr-clip'][0]:+.3f} / {kd_fp32['xlsr-clip'][1]:+.3f} dB (Clipped ReLU)")
    if kd:
        text += ("; inside QAT, on the INT8 model that ships, the teacher moves them by " + ", ".join(
            f"{v['Set5_gain_db']:+.3f} / {v['Set14_gain_db']:+.3f} dB (`{v['twin']}`, seed spread "
            f"{v['Set5_spread_db']:.3f} / {v['Set14_spread_db']:.3f}: {'pays' if v['pays'] else 'does not pay'})"
            for v in kd["verdicts"]) + ". With this teacher (33.5 dB, 0.8 dB above its students) distillation is "
            "a wash, in FP32 and in INT8")
    lines.append(text + ".")
    schemes = {s: _mean(rows, scheme=s, samples=100) for s in ("tensorrt", "npu", "npu-per-tensor", "npu-symmetric",
                                                                "cpu")}
    per_tensor = [np.mean([_one(rows, model=m, scheme="npu-per-tensor", samples=100, method=k, data=n)["drop_db"]
                           - _one(rows, model=m, scheme="npu", samples=100, method=k, data=n)["drop_db"]
                           for m in ("xlsr-relu", "xlsr-clip") for k in METHODS]) for n in ("Set5", "Set14")]
    lines.append(f"- **The INT8 target**: at 100 samples, averaged over models, methods and sets, the `tensorrt` "
                 f"placement (Q/DQ where ModelOpt puts them, the output in float) loses {schemes['tensorrt']:.2f} dB, "
                 f"`npu` (LiteRT's specification) {schemes['npu']:.2f}, `npu-symmetric` "
                 f"{schemes['npu-symmetric']:.2f}, `cpu` {schemes['cpu']:.2f}; per-tensor weights "
                 f"(`npu-per-tensor`) cost the two XLSRs {per_tensor[0]:+.3f} / {per_tensor[1]:+.3f} dB more than "
                 "per-channel ones (Set5 / Set14), with no darkening.")
    return lines


def findings_section(results: dict, int8_ready: dict | None = None, kd: dict | None = None) -> str:
    rows = results["rows"]
    return "\n\n".join([
        START,
        "\n".join(seed_answers(results, int8_ready, kd)),
        "Each cell: Y-PSNR loss of INT8 against the same model in FP32, Set5 / Set14 (dB), and in brackets the "
        "brightness ratio INT8/FP32 of the darkest image of both sets. Calibration: 64x64 patches of "
        "`calib_data/`, bicubic-downscaled by the model's scale (as a deployed model sees its inputs).",
        "**tensorrt scheme** (symmetric INT8 activations), 100 samples:",
        method_table(rows, "tensorrt"),
        "**npu scheme** (LiteRT's 8-bit specification, what phone NPUs run: every tensor INT8, the network output "
        "included, activations with a zero point, INT32 biases, a Concat's inputs on one grid, the image input and "
        "output on the 8-bit grid), 100 samples:",
        method_table(rows, "npu"),
        "**npu-per-tensor scheme** (the npu scheme with one scale per weight tensor), 100 samples:",
        method_table(rows, "npu-per-tensor"),
        "**npu-symmetric scheme** (the npu placement with symmetric activations and float biases: symmetric-only "
        "accelerators; what `npu` was before it followed LiteRT), 100 samples:",
        method_table(rows, "npu-symmetric"),
        "**cpu scheme** (asymmetric UINT8 activations, the npu-symmetric placement), 100 samples:",
        method_table(rows, "cpu"),
        "**Sample count** (tensorrt scheme), mean loss over the five models, Set5 / Set14 (dB):",
        samples_table(rows),
        "**Calibration inputs**: raw photo crops (what this lab fed before) against bicubic-downscaled crops "
        "(what the model sees in deployment; now the default), tensorrt, 100 samples:",
        inputs_table(results["inputs"]),
        "**A darker calibration set** (20 BSD200 images, brightness scaled by the gain; tensorrt, 100 samples; "
        "evaluated on Set14 at normal brightness):",
        dark_table(results["dark"]),
        "**Other candidates** (tensorrt, 100 samples, Set14):",
        candidates_table(results["candidates"]),
        "\n".join(_statements(results)),
        END,
    ])


def bench_section(bench: dict) -> str:
    """The README's benchmark tables from docs/bench.json (`python -m sr bench --json > docs/bench.json`)."""
    e2e, ort = bench["threshold_diff_vs_modelopt_end_to_end_relative"], bench["threshold_diff_vs_ort_relative"]
    rows = [
        ("largest threshold difference from ModelOpt, identical histograms, every tensor (entropy, "
         "entropy-zeros, percentile, mse)", f"**{bench['calib_max_threshold_diff_bins_vs_modelopt']:g} bins** "
         f"({', '.join(f'{k} {v:g}' for k, v in bench['calib_threshold_diff_bins_vs_modelopt'].items())})", "<= 1 bin"),
        (f"our collection + entropy search vs ModelOpt's `HistogramCalibrator` collect + `compute_amax`, "
         f"{bench['samples']} samples", f"{bench['calib_seconds_ours']:.2f} s vs {bench['calib_seconds_modelopt']:.1f} s: "
         f"**{bench['calib_speedup_vs_modelopt']:.0f}x** faster", ">= 10x"),
        ("end-to-end threshold difference from ModelOpt's own collection (its bins grow batch by batch)",
         f"max {100 * e2e['max']:.1f}% of amax (`{e2e['worst_tensor']}`), median {100 * e2e['median']:.2f}%", ""),
        ("vs onnxruntime's entropy calibrator (`num_bins=2048`, `num_quantized_bins=128`)",
         f"{bench['calib_speedup_vs_ort']:.1f}x faster; thresholds differ by max {100 * ort['max']:.0f}% of amax, "
         f"median {100 * ort['median']:.1f}% (a signed-histogram variant: 64 levels a sign)", ""),
        ("peak RSS: ours / ModelOpt / onnxruntime", f"{bench['calib_peak_rss_mb_ours']:.0f} / "
         f"{bench['calib_peak_rss_mb_modelopt']:.0f} / {bench['calib_peak_rss_mb_ort']:.0f} MB", ""),
        (f"peak RSS, {bench['large_samples']}-sample entropy calibration (ours)",
         f"**{bench['calib_large_peak_rss_mb']:.0f} MB** ({bench['calib_large_seconds']:.0f} s)", "< 1 GiB"),
        ("INT8 / ORT FP32, ORT `cpu` scheme, 2 threads, 320x240: session / end to end",
         f"**{bench['latency_ratio_int8_cpu_vs_ort_fp32']:.2f}** / "
         f"{bench['latency_ratio_int8_cpu_vs_ort_fp32_end_to_end']:.2f}", "<= 0.5"),
        (f"INT8 / ORT FP32, best engine ({bench['latency_int8_best_engine']}), 2 threads, 320x240: session / end to end",
         f"**{bench['latency_ratio_int8_best_vs_ort_fp32']:.2f}** / "
         f"{bench['latency_ratio_int8_best_vs_ort_fp32_end_to_end']:.2f}", "<= 0.35"),
    ]
    lines = [f"`python -m sr bench --json` ({bench['model']}, one run, written by `scripts/findings.py` from "
             "`docs/bench.json`):", "", "| figure | measured | target |", "|---|---|---|"]
    lines += [f"| {name} | {value} | {target} |" for name, value, target in rows]
    verdicts = bench.get("conformance", {})
    if verdicts:
        lines += ["", f"Conformance to the reference (ONNX Runtime on the CPU, the written QDQ model) on "
                  f"{bench.get('cpu', 'the bench CPU')}, in 8-bit levels on the probe; a refused engine is not timed:",
                  "", "| engine | verdict | mean | 99.9th percentile | max |", "|---|---|---|---|---|"]
        lines += [f"| {name} | {'agrees' if v['passed'] else '**refused**'} | {v['mean_levels']:.2f} | "
                  f"{v['p999_levels']:.0f} | {v['max_levels']} |" for name, v in verdicts.items()]
    lines += ["", "Latency (ms, session / end to end, ratio to ORT FP32 of the same threads and size in brackets; "
              "end to end adds tiling and the uint8 conversion):", "",
              "| engine | 1 thread, 320x240 | 2 threads, 320x240 | 1 thread, 1280x720 | 2 threads, 1280x720 |",
              "|---|---|---|---|---|"]
    names = dict.fromkeys(key.split("@")[0] for key in bench["latency"])
    for name in names:
        cells = []
        for threads, size in (("1t", "320x240"), ("2t", "320x240"), ("1t", "1280x720"), ("2t", "1280x720")):
            row = bench["latency"][f"{name}@{threads}@{size}"]
            cells.append(f"{row['session_ms']:.0f} / {row['end_to_end_ms']:.0f} ({row['session_ratio']:.2f})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join([BENCH_START, *lines, BENCH_END])


def _replace(text: str, start: str, end: str, section: str, readme: Path) -> str:
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.S)
    if not pattern.search(text):
        raise SystemExit(f"{readme} has no {start} ... {end} markers")
    return pattern.sub(lambda _: section, text)


def replace_between(path: Path, start: str, end: str, body: str, what: str) -> None:
    """Write `body` between the `start` and `end` markers of the file at `path` (atomically), and say so."""
    from sr.store import write_atomic

    text = _replace(path.read_text(), start, end, f"{start}\n{body}\n{end}", path)
    write_atomic(text.encode(), path)
    print(f"rewrote {what} in {path}")


def summary_section(results: dict, bench: dict | None, int8_ready: dict | None, kd: dict | None) -> str:
    """The README's few headline figures, each from the JSON its script wrote."""
    rows = results["rows"]
    lines = [SUMMARY_START]
    clip = {name: _one(rows, model="xlsr-clip", scheme="tensorrt", method="entropy", samples=100, data=name)
            for name in ("Set5", "Set14")}
    relu = {name: _one(rows, model="xlsr-relu", scheme="tensorrt", method="entropy", samples=100, data=name)
            for name in ("Set5", "Set14")}
    lines.append(f"- **Post-training INT8** (the first screen's settings: entropy, 100 samples, `tensorrt` scheme) "
                 f"loses {relu['Set5']['drop_db']:.2f} / {relu['Set14']['drop_db']:.2f} dB (`xlsr-relu`) and "
                 f"{clip['Set5']['drop_db']:.2f} / {clip['Set14']['drop_db']:.2f} dB (`xlsr-clip`) on Set5 / Set14 "
                 "against the same model in FP32 ([findings](docs/findings.md)).")
    dark = next((r for r in results["dark"] if r["model"] == "xlsr-relu" and r["method"] == "entropy"
                 and r["gain"] == 0.4 and r["fix"] == "none"), None)
    if dark:
        lines.append(f"- **Dark** when the calibration images are darker than the inputs: at 40% brightness "
                     f"`xlsr-relu` keeps {dark['brightness']:.2f} of its brightness, {dark['drop_db']:.1f} dB down.")
    if int8_ready:
        qat = {m: int8_ready[m].get("QAT") for m in int8_ready}
        if all(qat.values()):
            lines.append("- **Near-lossless after QAT**: " + ", ".join(
                f"`{m}-qat` {q['Set5']['loss_db']:.3f} / {q['Set14']['loss_db']:.3f} dB" for m, q in qat.items())
                + " against the original FP32 model ([near-lossless INT8](docs/near-lossless.md)).")
    if kd:
        lines.append("- **A teacher inside QAT**: " + "; ".join(
            f"`{v['twin']}` {v['Set5_gain_db']:+.3f} / {v['Set14_gain_db']:+.3f} dB (seed spread "
            f"{v['Set5_spread_db']:.3f} / {v['Set14_spread_db']:.3f}): {'pays' if v['pays'] else 'does not pay'}"
            for v in kd["verdicts"]) + f" ({kd['steps']}-step runs).")
    if bench:
        refused = [name for name, v in bench.get("conformance", {}).items() if not v["passed"]]
        lines.append(f"- **Speed** on {bench.get('cpu', 'this CPU')}, 2 threads, 320x240: ONNX Runtime `cpu` scheme "
                     f"{bench['latency_ratio_int8_cpu_vs_ort_fp32']:.2f}x the FP32 time; the fastest engine that "
                     f"agrees with the reference ({bench['latency_int8_best_engine']}) "
                     f"{bench['latency_ratio_int8_best_vs_ort_fp32']:.2f}x"
                     + (f"; refused here: {', '.join(refused)}" if refused else "; every engine agreed with the "
                        "reference") + " ([measured](docs/measured.md)).")
    lines.append(SUMMARY_END)
    return "\n".join(lines)


def rewrite_readme(results: dict, root: Path, bench: dict | None = None) -> None:
    """Replace the text between the findings markers (docs/findings.md), the bench markers (docs/measured.md)
    and the summary markers (README.md), and say which files changed."""
    findings, measured, readme = root / "docs" / "findings.md", root / "docs" / "measured.md", root / "README.md"
    extra = {name: json.loads((root / "docs" / f"{name}.json").read_text()) if (root / "docs" / f"{name}.json").is_file()
             else None for name in ("int8_ready", "kd_qat")}
    findings.write_text(_replace(findings.read_text(), START, END,
                                 findings_section(results, extra["int8_ready"], extra["kd_qat"]), findings))
    changed = [findings]
    if bench is not None:
        measured.write_text(_replace(measured.read_text(), BENCH_START, BENCH_END, bench_section(bench), measured))
        changed.append(measured)
    summary = summary_section(results, bench, extra["int8_ready"], extra["kd_qat"])
    readme.write_text(_replace(readme.read_text(), SUMMARY_START, SUMMARY_END, summary, readme))
    changed.append(readme)
    print("rewrote " + ", ".join(str(path.relative_to(root)) for path in changed))
