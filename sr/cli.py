"""`python -m sr <command>`: each sub-command fills a config dataclass, prints it, and calls one library function."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import asdict

from . import __version__


def _add_training_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--arch", default="xlsr", help="architecture: xlsr or teacher (default: xlsr)")
    parser.add_argument("--final-activation", default="relu", help="relu, clipped_relu or linear (default: relu)")
    parser.add_argument("--scale", type=int, default=3, help="2, 3 or 4 (default: 3)")
    parser.add_argument("--train-dirs", nargs="+", default=["../shared/data/T91", "../shared/data/BSD200"],
                        metavar="DIR", help="training image folders")
    parser.add_argument("--val-dir", default="../shared/data/Set5", help="validation folder ('' for none)")
    parser.add_argument("--out", required=True, help="weight file to write (.safetensors)")
    parser.add_argument("--steps", type=int, default=20_000)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr-patch", type=int, default=32, help="LR patch side in pixels (default: 32)")
    parser.add_argument("--max-lr", type=float, default=2e-3, help="one-cycle peak learning rate")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--val-every", type=int, default=1000)
    parser.add_argument("--checkpoint-every", type=int, default=1000)
    parser.add_argument("--resume", action="store_true", help="continue from <out>.ckpt.pt")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--init", default=None, help="start from these weights (shipped name or file)")
    parser.add_argument("--amp", action="store_true", help="bf16 autocast on CUDA")
    parser.add_argument("--max-seconds", type=float, default=None, help="stop early after this many seconds")
    parser.add_argument("--model-config", type=json.loads, default={}, metavar="JSON",
                        help='extra architecture fields, e.g. \'{"num_blocks": 8}\'')


def _training_fields(args: argparse.Namespace) -> dict:
    return dict(arch=args.arch, final_activation=args.final_activation, scale=args.scale,
                train_dirs=args.train_dirs, val_dir=args.val_dir or None, out=args.out, steps=args.steps,
                batch_size=args.batch_size, lr_patch=args.lr_patch, max_lr=args.max_lr, seed=args.seed,
                val_every=args.val_every, checkpoint_every=args.checkpoint_every, resume=args.resume,
                device=args.device, max_seconds=args.max_seconds, amp=args.amp, init=args.init, model_config=args.model_config)


def _print_config(config) -> None:
    print(f"# {type(config).__name__}: {json.dumps(asdict(config), default=str)}", file=sys.stderr)


def cmd_train(args: argparse.Namespace) -> int:
    from .train import TrainConfig, train

    config = TrainConfig(**_training_fields(args))
    _print_config(config)
    result = train(config)
    print(f"wrote {result.weights} after {result.steps} steps in {result.wall_seconds:.0f} s"
          + (f"; best validation PSNR {result.best_val_psnr:.3f} dB" if result.best_val_psnr else ""))
    return 0


def cmd_distill(args: argparse.Namespace) -> int:
    from .distill import DistillConfig, distill

    config = DistillConfig(**_training_fields(args), teacher=args.teacher, alpha=args.alpha)
    _print_config(config)
    result = distill(config)
    print(f"wrote {result.weights} after {result.steps} steps in {result.wall_seconds:.0f} s"
          + (f"; best validation PSNR {result.best_val_psnr:.3f} dB" if result.best_val_psnr else ""))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .evaluate import EvalConfig, evaluate, format_report

    config = EvalConfig(model=args.model, data=args.data, scale=args.scale, engine=args.engine,
                        method=args.method, samples=args.samples, scheme=args.scheme,
                        recommended=args.recommended, threads=args.threads)
    _print_config(config)
    report = evaluate(config, progress=not args.json)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    import shutil

    from .calibrate import CalibrationConfig
    from .quantize import calibrate_model

    config = CalibrationConfig(method=args.method, samples=args.samples, patch_size=args.patch_size,
                               seed=args.seed, percentile=args.percentile, data=args.data)
    _print_config(config)
    int8 = calibrate_model(args.model, config, args.scheme, threads=args.threads)
    qdq = int8.qdq_onnx
    if args.out:
        from .export import write_atomic

        qdq = write_atomic(int8.qdq_onnx.read_bytes(), args.out)
    if args.json:
        print(json.dumps({"model": args.model, "method": config.method.value, "samples": config.samples,
                          "scheme": int8.scheme.value, "qdq_model": str(qdq), "tensors": [
                              {k: v for k, v in r.to_dict().items() if k != "method"} for r in int8.ranges.values()]},
                         indent=2))
        return 0
    print(f"{'tensor':<44}{'op':>13}{'observed min':>14}{'max':>9}{'low':>10}{'high':>9}{'clipped':>10}")
    for r in int8.ranges.values():
        print(f"{r.name[-44:]:<44}{int8.producers.get(r.name, ''):>13}{r.observed_min:>14.4f}{r.observed_max:>9.4f}"
              f"{r.low:>10.4f}{r.high:>9.4f}{100 * r.clipped_fraction:>9.3f}%")
    print(f"QDQ model: {qdq}" + (" (from the cache)" if int8.cached else f" ({int8.seconds:.1f} s)"))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import BenchConfig, format_bench, run_bench

    config = BenchConfig(model=args.model, samples=args.samples, large_samples=args.large_samples)
    _print_config(config)
    report = run_bench(config)
    print(json.dumps(report, indent=2) if args.json else format_bench(report))
    return 0


def cmd_diagnose(args: argparse.Namespace) -> int:
    from .diagnose import diagnose

    print(f"# diagnose: model={args.model} method={args.method} samples={args.samples} scheme={args.scheme} "
          f"data={args.data}", file=sys.stderr)
    report = diagnose(args.model, args.method, args.samples, args.scheme, data=args.data, top=args.top)
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
        return 0
    print(report.summary().replace("**", "").replace("`", ""))
    print(f"{'tensor':<44}{'op':>9}{'drop alone':>12}{'recovery':>10}{'SQNR':>8}{'clipped':>10}")
    for r in report.ranking:
        print(f"{r.tensor[-44:]:<44}{r.op:>9}{r.psnr_drop_db:>11.3f} {r.recovery_db:>9.3f} {r.sqnr_db:>7.1f}"
              f"{100 * r.clipped_fraction:>9.3f}%")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m sr", description=(
        "SR INT8 Lab: train, distill, export, calibrate and evaluate super-resolution networks in INT8."))
    parser.add_argument("--version", action="version", version=f"sr {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    train = commands.add_parser("train", help="train a model from scratch (torchrun for several GPUs/processes)")
    _add_training_arguments(train)
    train.set_defaults(run=cmd_train)

    distill = commands.add_parser("distill", help="train a student with a frozen teacher (knowledge distillation)")
    _add_training_arguments(distill)
    distill.add_argument("--teacher", default="teacher", help="teacher: shipped name or weight file")
    distill.add_argument("--alpha", type=float, default=0.5, help="weight of the ground-truth loss (default 0.5)")
    distill.set_defaults(run=cmd_distill)

    evaluate = commands.add_parser("eval", help="PSNR/SSIM of bicubic and a model (FP32 or INT8) on a folder")
    evaluate.add_argument("--model", required=True, help="shipped model name or weight file")
    evaluate.add_argument("--data", required=True, help="folder of ground-truth (HR) images")
    evaluate.add_argument("--scale", type=int, default=None, help="default: the model's own scale")
    evaluate.add_argument("--engine", default="torch", help="torch, ort, ort-int8 or tensorrt (default: torch)")
    evaluate.add_argument("--method", default="entropy", help="INT8 calibration: entropy, minmax, percentile, mse")
    evaluate.add_argument("--samples", type=int, default=100, help="calibration samples (10..1000)")
    evaluate.add_argument("--scheme", default="tensorrt", help="INT8 scheme: tensorrt or cpu")
    evaluate.add_argument("--recommended", action="store_true",
                          help="use the calibration and fixes the README recommends (overrides --method/--scheme)")
    evaluate.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads (0 = its default)")
    evaluate.add_argument("--json", action="store_true", help="print one JSON object")
    evaluate.set_defaults(run=cmd_eval)

    calibrate = commands.add_parser("calibrate", help="calibrate a model for INT8 and write its QDQ ONNX model")
    calibrate.add_argument("--model", required=True, help="shipped model name or weight file")
    calibrate.add_argument("--method", default="entropy", help="entropy, minmax, percentile or mse")
    calibrate.add_argument("--samples", type=int, default=100, help="calibration patches, 10..1000")
    calibrate.add_argument("--scheme", default="tensorrt", help="tensorrt (symmetric int8) or cpu (uint8)")
    calibrate.add_argument("--percentile", type=float, default=99.99, help="for --method percentile")
    calibrate.add_argument("--patch-size", type=int, default=64, help="calibration patch side (LR px)")
    calibrate.add_argument("--seed", type=int, default=0)
    calibrate.add_argument("--data", default=None, help="calibration image folder (default: calib_data/)")
    calibrate.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads (0 = its default)")
    calibrate.add_argument("--out", default=None, help="also copy the QDQ model here")
    calibrate.add_argument("--json", action="store_true", help="print one JSON object")
    calibrate.set_defaults(run=cmd_calibrate)

    bench = commands.add_parser("bench", help="calibration speed/memory vs onnxruntime, and engine latency")
    bench.add_argument("--model", default="xlsr-clip")
    bench.add_argument("--samples", type=int, default=100, help="samples for the comparison with onnxruntime")
    bench.add_argument("--large-samples", type=int, default=1000, help="samples for the peak-memory run")
    bench.add_argument("--json", action="store_true", help="print one JSON object")
    bench.set_defaults(run=cmd_bench)
    diagnose = commands.add_parser("diagnose", help="rank the tensors whose INT8 range damages the output")
    diagnose.add_argument("--model", required=True)
    diagnose.add_argument("--method", default="entropy")
    diagnose.add_argument("--samples", type=int, default=100)
    diagnose.add_argument("--scheme", default="tensorrt")
    diagnose.add_argument("--data", required=True, help="folder of ground-truth images to measure on")
    diagnose.add_argument("--top", type=int, default=None, help="keep the N worst tensors")
    diagnose.add_argument("--json", action="store_true")
    diagnose.set_defaults(run=cmd_diagnose)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
