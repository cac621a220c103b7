"""`python -m sr <command>`: each sub-command fills a config dataclass, prints it, and calls one library function.

The labels, tables and messages a person reads are made here; the library returns numbers and dataclasses.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import sys
from enum import Enum
from pathlib import Path

from . import __version__
from .progress import logged_progress
from .quant.calibrate import CalibrationConfig, Method
from .quant.calibrated import AutoChoice
from .run.conformance import EngineRefused
from .options import (BENCH_HELP, CALIBRATION_HELP, DIAGNOSE_HELP, DISTILL_HELP, EVAL_HELP, QAT_HELP, READY_HELP,
                      TRAIN_HELP, add_config_options, config_values)
from .quant.quantspec import Scheme
from .tune.distill import DistillConfig
from .tune.train import TrainConfig

CALIBRATION_DEFAULTS = CalibrationConfig()


def _training_fields(args: argparse.Namespace, config_type=TrainConfig) -> dict:
    fields = config_values(args, config_type)
    fields["val_dir"] = args.val_dir or None
    return fields


_CALIBRATION_DESTS = {"seed": "calib_seed", "data": "calib_data", "inputs": "calib_inputs"}


def _add_calibration_arguments(parser: argparse.ArgumentParser, data_flag: tuple[str, ...] = ("--calib-data",),
                               refine: bool = True, seed_flag: str = "--seed", method: str = "auto") -> None:
    """The calibration options, one per CalibrationConfig field, and --scheme; the method, samples and scheme
    default to None so that --recommended can tell what the user set."""
    add_config_options(parser, CalibrationConfig, CALIBRATION_HELP, unset={"method": method, "samples": str(
        CALIBRATION_DEFAULTS.samples)}, flags={"seed": (seed_flag,), "data": data_flag, "inputs": ("--calib-inputs",)},
        dests=_CALIBRATION_DESTS)
    parser.add_argument("--scheme", default=None, help="tensorrt (Q/DQ where NVIDIA ModelOpt puts them), npu (every "
                        "tensor INT8, the output included) or cpu (uint8, ONNX Runtime's x86 path) (default: tensorrt)")
    if not refine:
        return
    parser.add_argument("--refine", default=None, metavar="LIST", help="post-training refinements before quantizing, "
                        "comma-separated: centred-io, equalize, range-search, adaround, bias-correction (sr/tune/ptq.py; the "
                        "refined model is cached and compared against the original)")


def _add_model_arguments(parser: argparse.ArgumentParser, required: bool = True) -> None:
    """--model NAME or --onnx PATH (a user's model, with overrides for what detection gets wrong)."""
    which = parser.add_mutually_exclusive_group(required=required)
    which.add_argument("--model", help="shipped model name or weight file")
    which.add_argument("--onnx", metavar="PATH", help="your own ONNX super-resolution model (its contract is detected "
                       "and printed; override it with the options below)")
    parser.add_argument("--layout", default=None, help="ONNX model: nchw or nhwc")
    parser.add_argument("--color", default=None, help="ONNX model: rgb or y (Y of BT.601; Cb/Cr upscaled bicubically)")
    parser.add_argument("--range", dest="value_range", type=int, default=None, help="ONNX model: 1 or 255")
    parser.add_argument("--pre-upsampled", action="store_true", default=None,
                        help="ONNX model: takes a bicubic-upscaled input (VDSR-style)")
    if not any(action.dest == "scale" for action in parser._actions):
        parser.add_argument("--scale", type=int, default=None, help="ONNX model: its scale (2, 3, 4)")


def _model(args: argparse.Namespace) -> str:
    """The model name to hand the library: a shipped name, or a registered ONNX model (contract printed)."""
    if not getattr(args, "onnx", None):
        return args.model
    from .model.contract import Overrides
    from .run.register import register_onnx

    user = register_onnx(args.onnx, Overrides(args.layout, args.color, args.value_range, args.pre_upsampled,
                                              args.scale))
    contract = user.contract
    sure = "" if contract.confidence_db is None else (
        f", range reading {contract.confidence_db:.1f} dB ahead" if contract.confidence_db >= 0.5 else
        ", the two range readings fit alike (a tie: [0, 1] assumed; --range overrides)")
    print(f"# {args.onnx} -> {user.name}: {contract.layout.value}, {contract.color.value}, values in "
          f"[0, {contract.value_range}], x{contract.scale}" + (", pre-upsampled" if contract.pre_upsampled else "")
          + (f", {contract.sizes_in_words()}" if contract.sizes_in_words() else "")
          + sure + (f"; left in float by the INT8 model: {', '.join(user.float_ops)}" if user.float_ops else ""),
          file=sys.stderr)
    return user.name


def _refined(args: argparse.Namespace, model: str, calibration: CalibrationConfig, scheme: Scheme) -> str:
    """`model`, or with --refine the refined model's file (made once, then cached)."""
    if not getattr(args, "refine", None):
        return model
    from .tune.ptq import RefineConfig, refine
    from .quant.recipe import Refinement

    config = RefineConfig(model, [r.strip() for r in args.refine.split(",") if r.strip()], calibration, scheme)
    if Refinement.CENTRED_IO in config.refinements:
        from .tune.transforms import centring_reason

        reason = centring_reason(model)
        if reason is not None:  # said, not only logged: the refinement the user asked for is left out
            print(f"# centred I/O left out: {reason}", file=sys.stderr)
    path = refine(config)
    print(f"# refined ({', '.join(r.value for r in config.refinements)}): {path}", file=sys.stderr)
    return str(path)


def _calibration(args: argparse.Namespace, method: Method = Method.AUTO) -> tuple[CalibrationConfig, Scheme]:
    """The calibration options as a CalibrationConfig (`method` when --method is not given), and the scheme."""
    fields = config_values(args, CalibrationConfig, dests=_CALIBRATION_DESTS)
    fields["method"] = fields["method"] or method
    fields["samples"] = CALIBRATION_DEFAULTS.samples if fields["samples"] is None else fields["samples"]
    return CalibrationConfig(**fields), Scheme.parse(args.scheme or Scheme.TENSORRT)


def _print_config(config) -> None:
    fields = {k: (v.value if isinstance(v, Enum) else v) for k, v in dataclasses.asdict(config).items()}
    print(f"# {type(config).__name__}: {json.dumps(fields, default=str)}", file=sys.stderr)


def _trained(result) -> str:
    return (f"wrote {result.weights} after {result.steps} steps in {result.wall_seconds:.0f} s"
            + (f"; best validation PSNR {result.best_val_psnr:.3f} dB" if result.best_val_psnr else ""))


def cmd_train(args: argparse.Namespace) -> int:
    """`train`: fill TrainConfig, train, print where the weights went."""
    from .tune.train import train

    config = TrainConfig(**_training_fields(args))
    _print_config(config)
    print(_trained(train(config)))
    return 0


def cmd_distill(args: argparse.Namespace) -> int:
    """`distill`: fill DistillConfig, distill, print where the weights went."""
    from .tune.distill import distill

    config = DistillConfig(**_training_fields(args, DistillConfig))
    _print_config(config)
    print(_trained(distill(config)))
    return 0


def format_report(report: dict) -> str:
    """The evaluation report as a text table."""
    degradation = report.get("degradation", {}).get("name", "clean")
    lines = [f"{report['model']} on {report['data']} (x{report['scale']}, engine {report['engine']}, "
             f"LR {degradation})", f"{'image':<24}{'PSNR-Y':>10}{'SSIM-Y':>10}{'edge PSNR':>11}"]
    row_line = lambda name, row: f"{name:<24}{row['psnr_y']:>10.3f}{row['ssim_y']:>10.4f}{row['edge_psnr_y']:>11.3f}"
    lines += [row_line(row["name"], row) for row in report["images"]]
    lines.append(row_line("mean", report["mean"]))
    lines.append(row_line("bicubic", report["bicubic"]))
    if "fp32_mean" in report:
        lines.append(f"{'fp32 (same model)':<24}{report['fp32_mean']['psnr_y']:>10.3f}"
                     f"{report['fp32_mean']['ssim_y']:>10.4f}")
        lines.append(f"INT8 {report['method']}/{report['samples']} samples/{report['scheme']}: "
                     f"{report['int8_mean']['psnr_y'] - report['fp32_mean']['psnr_y']:+.3f} dB vs FP32, "
                     f"brightness ratio {report['brightness_ratio']:.4f} (darkest image {report['worst_brightness_ratio']:.4f})")
        auto = report.get("auto")
        lines += _choice_and_warnings(AutoChoice.from_json(auto) if auto else None, report.get("warnings", []))
    return "\n".join(lines)


def _choice_and_warnings(choice, warnings: list) -> list[str]:
    """What the automatic method chose (with each candidate's score), and the warnings, as text lines."""
    lines = []
    if choice:
        scores = ", ".join(f"{name} {c['psnr_vs_fp32_db']:.2f} dB" for name, c in choice.candidates.items())
        lines.append(f"method auto chose {choice.method} (PSNR vs FP32 on {choice.held_back_images} held-back "
                     f"calibration images: {scores})")
    return lines + [f"warning: {note}" for note in warnings]


def cmd_eval(args: argparse.Namespace) -> int:
    """`eval`: fill EvalConfig, evaluate, print a table or JSON."""
    from .lab.evaluate import EvalConfig, evaluate
    from .model.models import model_info

    if args.recommended and (args.method or args.samples is not None or args.scheme):
        raise ValueError("--recommended chooses the method, samples and scheme itself; drop --method/--samples/--scheme")
    calibration, scheme = _calibration(args)
    model = _refined(args, _model(args), calibration, scheme)
    fields = config_values(args, EvalConfig, skip=("model", "calibration", "scheme"))
    fields["engine"] = args.engine or model_info(model).fp32_engine  # the model's own FP32 runtime
    fields["scale"] = None if args.onnx else args.scale
    config = EvalConfig(model=model, calibration=calibration, scheme=scheme, **fields)
    _print_config(config)
    report = evaluate(config, progress=None if args.json else logged_progress(f"eval {config.model}", every=2.0))
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    """`calibrate`: fill CalibrationConfig, calibrate (or read the cache), print the ranges."""
    from .run.quantize import calibrate_model
    from .store import write_atomic

    config, scheme = _calibration(args)
    model = _refined(args, _model(args), config, scheme)
    _print_config(config)
    int8 = calibrate_model(model, config, scheme, threads=args.threads)
    out = Path(args.out) if args.out else None
    if out is not None and (out.is_dir() or args.out.endswith(("/", os.sep))):  # a folder: the file goes inside,
        out.mkdir(parents=True, exist_ok=True)  # named for what it is
        out = out / f"{model.replace(':', '-')}-{config.method.value}-{config.samples}-{scheme.value}.qdq.onnx"
    qdq = write_atomic(int8.qdq_onnx.read_bytes(), out) if out else int8.qdq_onnx
    if args.json:
        print(json.dumps({"model": model, "method": int8.config.method.value, "samples": config.samples,
                          "auto": int8.choice and int8.choice.to_json(), "warnings": [str(w) for w in int8.warnings()],
                          "scheme": int8.scheme.value, "qdq_model": str(qdq), "tensors": [
                              {k: v for k, v in r.to_dict().items() if k != "method"} for r in int8.ranges.values()]},
                         indent=2))
        return 0
    print(f"{'tensor':<44}{'op':>13}{'observed min':>14}{'max':>9}{'low':>10}{'high':>9}{'clipped':>10}")
    for r in int8.ranges.values():
        print(f"{r.name[-44:]:<44}{int8.producers.get(r.name, ''):>13}{r.observed_min:>14.4f}{r.observed_max:>9.4f}"
              f"{r.low:>10.4f}{r.high:>9.4f}{100 * r.clipped_fraction:>9.3f}%")
    print(f"QDQ model: {qdq}" + (" (from the cache)" if int8.cached else f" ({int8.seconds:.1f} s)"))
    for line in _choice_and_warnings(int8.choice, int8.warnings()):
        print(line, file=sys.stderr)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    """`bench`: fill BenchConfig, measure, print the figures."""
    from .lab.bench import BenchConfig, format_bench, run_bench

    config = BenchConfig(model=_model(args) if args.onnx else args.model or "xlsr-clip",
                         **config_values(args, BenchConfig, skip=("model",)))
    _print_config(config)
    report = run_bench(config)
    print(json.dumps(report, indent=2) if args.json else format_bench(report))
    return 0


def cmd_export_int8(args: argparse.Namespace) -> int:
    """`export-int8`: calibrate and write the deployment bundle (QDQ for TensorRT, calibration cache, CPU model)."""
    from .lab.bundle import export_bundle
    from .data import degrade, list_images, load_image
    from .model.models import model_info

    config, _ = _calibration(args)
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise ValueError(f"--out {args.out} is a file; give a folder for the bundle")
    model = _refined(args, _model(args), config, Scheme.TENSORRT)
    _print_config(config)
    scale = model_info(model).scale
    images = [degrade(load_image(p), scale)[1] for p in list_images(args.data)] if args.data else []
    bundle = export_bundle(model, config, args.out, images=images, trt_version=args.trt_version)
    print(f"wrote {bundle.folder}: {', '.join(bundle.files)}")
    if bundle.psnr_fp32_vs_int8_db is not None:
        print(f"INT8 vs FP32 on {bundle.measured_on}: {bundle.psnr_fp32_vs_int8_db:.2f} dB, brightness "
              f"{bundle.brightness:.4f}")
    return 0


def _db(value: float | None) -> str:
    return "-" if value is None else ("inf" if math.isinf(value) else f"{value:.3f}")


def cmd_diagnose(args: argparse.Namespace) -> int:
    """`diagnose`: fill DiagnoseConfig, rank the tensors, print a table or JSON."""
    from .lab.diagnose import DiagnoseConfig, diagnose

    calibration, scheme = _calibration(args)
    config = DiagnoseConfig(_refined(args, _model(args), calibration, scheme), calibration, scheme,
                            **config_values(args, DiagnoseConfig, skip=("model", "calibration", "scheme")))
    _print_config(config)
    report = diagnose(config)
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
        return 0
    print(report.paragraph())
    print(f"{'tensor':<44}{'op':>9}{'vs FP32 alone':>15}{'drop alone':>12}{'recovery':>10}{'SQNR':>8}{'clipped':>10}")
    for r in report.ranking:
        print(f"{r.tensor[-44:]:<44}{r.op:>9}{_db(r.alone_psnr_vs_fp32_db):>15}{_db(r.psnr_drop_db):>12}"
              f"{r.recovery_db:>10.3f}{r.sqnr_db:>8.1f}{100 * r.clipped_fraction:>9.3f}%")
    return 0


def _add_commands(commands) -> None:
    train = commands.add_parser("train", help="train a model from scratch (torchrun for several GPUs/processes)")
    add_config_options(train, TrainConfig, TRAIN_HELP, required=("out",))
    train.set_defaults(run=cmd_train)

    distill = commands.add_parser("distill", help="train a student with a frozen teacher (knowledge distillation)")
    add_config_options(distill, DistillConfig, DISTILL_HELP, required=("out",))
    distill.set_defaults(run=cmd_distill)
    _add_int8_commands(commands)
    _add_qat_command(commands)
    _add_ready_command(commands)


def _add_int8_commands(commands) -> None:
    from .lab.evaluate import EvalConfig

    evaluate = commands.add_parser("eval", help="PSNR/SSIM of bicubic and a model (FP32 or INT8) on a folder")
    add_config_options(evaluate, EvalConfig, EVAL_HELP, skip=("model", "calibration", "scheme"), required=("data",),
                       unset={"scale": "", "engine": ""})
    _add_model_arguments(evaluate)
    _add_calibration_arguments(evaluate)
    evaluate.add_argument("--json", action="store_true", help="print one JSON object")
    evaluate.set_defaults(run=cmd_eval)

    calibrate = commands.add_parser("calibrate", help="calibrate a model for INT8 and write its QDQ ONNX model")
    _add_model_arguments(calibrate)
    _add_calibration_arguments(calibrate, ("--calib-data", "--data"))
    calibrate.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads (0 = its default)")
    calibrate.add_argument("--out", default=None, help="also copy the QDQ model here")
    calibrate.add_argument("--json", action="store_true", help="print one JSON object")
    calibrate.set_defaults(run=cmd_calibrate)

    from .lab.bench import BenchConfig

    bench = commands.add_parser("bench", help="calibration speed, memory and fidelity vs ModelOpt and onnxruntime; "
                                "engine latency and conformance (about 7 minutes on 2 CPU cores; progress is logged)")
    _add_model_arguments(bench, required=False)
    add_config_options(bench, BenchConfig, BENCH_HELP, skip=("model",))
    bench.add_argument("--json", action="store_true", help="print one JSON object")
    bench.set_defaults(run=cmd_bench)

    export = commands.add_parser("export-int8", help="write a deployment bundle: TensorRT, NPU and CPU INT8 models, ranges, README")
    _add_model_arguments(export)
    _add_calibration_arguments(export)
    export.add_argument("--out", required=True, help="the bundle folder")
    export.add_argument("--data", default=None, help="HR images to measure the INT8 loss on (for the README)")
    export.add_argument("--trt-version", help="also write a TensorRT 10 calibration cache (e.g. 10.3.0)")
    export.set_defaults(run=cmd_export_int8)

    from .lab.diagnose import DiagnoseConfig

    diagnose = commands.add_parser("diagnose", help="rank the tensors whose INT8 range damages the output")
    _add_model_arguments(diagnose)
    _add_calibration_arguments(diagnose)
    add_config_options(diagnose, DiagnoseConfig, DIAGNOSE_HELP, skip=("model", "calibration", "scheme"),
                       required=("data",))
    diagnose.add_argument("--json", action="store_true", help="print one JSON object")
    diagnose.set_defaults(run=cmd_diagnose)


def _add_ready_command(commands) -> None:
    from .lab.ready import ReadyConfig

    ready = commands.add_parser("int8-ready", help="make a model INT8-ready in a time budget: range methods, then "
                                "refinements, then mixed precision, then QAT, until the target loss is met")
    _add_model_arguments(ready)
    _add_calibration_arguments(ready, refine=False)
    add_config_options(ready, ReadyConfig, READY_HELP, skip=("model", "calibration", "scheme"))
    ready.add_argument("--json", action="store_true", help="print one JSON object")
    ready.set_defaults(run=cmd_ready)


def format_ready(result) -> str:
    """The route taken, each candidate's loss, and what was chosen, as text."""
    lines = [f"# {result.model}: target {result.target_db:.3f} dB below the original FP32 "
             f"({result.fp32_psnr_db:.2f} dB PSNR-Y on {result.measured_on})"]
    for step in result.steps:
        lines.append(f"{step.route} ({step.seconds:.0f} s):")
        lines += [f"  {c.what:<60} loss {c.loss_db:+.3f} dB, brightness {c.brightness:.3f}" for c in step.tried]
        lines += [f"  note: {note}" for note in step.notes]
    target = result.target
    verdict = "met" if result.met else "NOT met (the best reached)" if target is None or not target.refused else \
        "NOT met (the target refused the model)"
    judged = "" if target is None else f" as {target.engine} runs it"
    lines.append(f"chosen: {result.chosen.what}: loss {result.loss_db:+.3f} dB against the original FP32 (negative: "
                 f"INT8 scored higher) on the reference, target {verdict}{judged}, in {result.seconds:.0f} s")
    if target is not None:
        lines.append(f"as {target.engine} runs it: " + (f"refused: {target.refused}" if target.refused else
                     f"loss {result.target_loss_db:+.3f} dB against the original FP32, brightness {target.brightness:.3f}"))
    for entry in result.float_tensors:
        lines.append(f"  left in float: {entry['tensor']} ({entry['latency_ms_added']:+.2f} ms on the CPU reference)")
    latency = result.latency_ms
    lines.append(f"latency on the CPU reference ({latency['input']} LR): FP32 {latency['fp32']:.2f} ms, all INT8 "
                 f"{latency['int8_all']:.2f} ms, chosen {latency['chosen']:.2f} ms")
    if result.bundle is not None:
        lines.append(f"bundle: {result.bundle}")
    return "\n".join(lines)


def cmd_ready(args: argparse.Namespace) -> int:
    """`int8-ready`: fill ReadyConfig, search, print the route and the choice (or JSON); exit 1 if not met."""
    from .lab.ready import ReadyConfig, make_ready

    calibration, scheme = _calibration(args)
    config = ReadyConfig(model=_model(args), calibration=calibration, scheme=scheme,
                         **config_values(args, ReadyConfig, skip=("model", "calibration", "scheme")))
    _print_config(config)
    report = None if args.json else (lambda f, m: print(f"[{100 * f:3.0f}% of the budget] {m}", file=sys.stderr))
    result = make_ready(config, progress=report)
    print(json.dumps(result.to_json(), indent=2) if args.json else format_ready(result))
    return 0 if result.met else 1


def _add_qat_command(commands) -> None:
    from .tune.qat import QatConfig

    qat = commands.add_parser("qat", help="quantization-aware fine-tuning: the INT8 model, trained (torchrun for "
                              "several GPUs/processes)")
    _add_model_arguments(qat)
    # the calibration the ranges start from: the same options as every INT8 command (its --method default mse;
    # --calib-seed, since --seed is the training's)
    _add_calibration_arguments(qat, refine=False, seed_flag="--calib-seed", method="mse")
    add_config_options(qat, QatConfig, QAT_HELP, skip=("model", "calibration", "scheme"), required=("out",))
    qat.set_defaults(run=cmd_qat)


def cmd_qat(args: argparse.Namespace) -> int:
    """`qat`: fill QatConfig, fine-tune, print what was written and the INT8 figures."""
    from .tune.qat import QatConfig, quantization_aware_training

    calibration, scheme = _calibration(args, Method.MSE)
    config = QatConfig(model=_model(args), calibration=calibration, scheme=scheme,
                       **config_values(args, QatConfig, skip=("model", "calibration", "scheme")))
    config.val_dir = config.val_dir or None
    from .model.models import model_info

    suffix = model_info(config.model).tuned_suffix
    if Path(config.out).suffix != suffix:
        raise ValueError(f"--out must end in {suffix} for this model, got {config.out}")
    _print_config(config)
    result = quantization_aware_training(config)
    if int(os.environ.get("RANK", "0")):  # under torchrun, rank 0 reports
        return 0
    print(f"wrote {result.weights} and {result.qdq_onnx} after {result.steps} steps in {result.wall_seconds:.0f} s")
    if result.history and "val_psnr" in result.history[-1] and result.fp32_val_psnr is not None:
        last = result.history[-1]["val_psnr"]
        print(f"validation: INT8 (fake-quantized) {last:.3f} dB, original FP32 {result.fp32_val_psnr:.3f} dB, "
              f"loss {result.fp32_val_psnr - last:+.3f} dB")
    if config.val_dir:  # the figure that counts: the file written, on the reference
        from .lab.evaluate import score_written
        from .run.register import register_onnx

        written = register_onnx(result.weights).name if result.weights.suffix == ".onnx" else str(result.weights)
        print(f"validation: {score_written(written, config.val_dir, config.scheme).in_words()}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `python -m sr`."""
    parser = argparse.ArgumentParser(prog="python -m sr", description=(
        "SR INT8 Lab: train, distill, export, calibrate and evaluate super-resolution networks in INT8."))
    parser.add_argument("--version", action="version", version=f"sr {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    _add_commands(parser.add_subparsers(dest="command", metavar="COMMAND", required=True))
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the CLI.

    Returns:
        the exit status: 0, 1 when `int8-ready` did not meet its target, 2 for a bad argument or missing file (one line on stderr), 130 when interrupted.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except EngineRefused as error:
        print(f"error: {error}. Use --engine ort-int8 (the reference) or ort.", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
