"""`python -m sr`'s arguments and outputs, in this process (`sr.cli.main`): every bad argument gets one clear line and
exit status 2, the JSON outputs keep their keys, and --help lists the commands."""
import argparse
import dataclasses
import importlib
import json
import subprocess

import pytest

from sr import cli


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """`python -m sr ARGS`, in this process (`sr.cli.main`): its exit status and what it printed."""
    import contextlib
    import io

    from sr import cli

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main(list(args))
        except SystemExit as exit:  # argparse's errors and --help
            code = exit.code if isinstance(exit.code, int) else 1
    return subprocess.CompletedProcess(list(args), code, out.getvalue(), err.getvalue())


@pytest.mark.parametrize("args, message", [
    (["calibrate", "--model", "xlsr-clip", "--method", "kl"], "unknown calibration method 'kl'"),
    (["calibrate", "--model", "xlsr-clip", "--samples", "0"], "samples must be an integer from 10 to 1000, got 0"),
    (["calibrate", "--model", "missing-model"], "no model 'missing-model'"),
    (["eval", "--model", "xlsr-clip", "--data", "/nonexistent"], "no such image folder"),
    (["eval", "--model", "xlsr-clip", "--data", ".", "--engine", "gpu"], "unknown engine 'gpu'"),
    (["eval", "--model", "xlsr-clip", "--data", "weights", "--scale", "2"], "x3 model; the scale asked for (x2) does not match"),
    (["eval", "--model", "xlsr-clip", "--data", "weights", "--threads", "-1"], "threads must be 0"),
    (["export-int8", "--model", "xlsr-clip", "--out", "README.md"], "is a file; give a folder"),
    (["eval", "--model", "xlsr-clip", "--data", "weights", "--engine", "ort-int8", "--calib-inputs", "hr"],
     "unknown calibration input 'hr'"),
    (["eval", "--model", "xlsr-clip", "--data", "weights", "--degradation", "heavy"],
     "unknown degradation 'heavy'; choose a preset (clean, strong) or give blur=SIGMA,noise=SIGMA,jpeg=QUALITY"),
    (["eval", "--model", "xlsr-clip", "--data", "weights", "--degradation", "jpeg=101"], "jpeg quality must be 1..100"),
    (["distill", "--kd-mode", "logits", "--out", "x.safetensors"],
     "unknown distillation mode 'logits'; choose one of: output, upcycled, feature"),
    (["train", "--degradation", "blur=-1", "--out", "x.safetensors"], "blur and noise must be >= 0"),
])
def test_bad_arguments_give_clear_errors(args, message):
    done = run_cli(*args)
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr


def test_calibrate_json_schema(tmp_path):
    out = tmp_path / "m.onnx"
    done = run_cli("calibrate", "--model", "xlsr-relu", "--method", "percentile", "--samples", "10",
                   "--scheme", "tensorrt", "--out", str(out), "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert set(report) == {"model", "method", "samples", "scheme", "qdq_model", "tensors", "auto", "warnings"}
    assert out.is_file() and report["qdq_model"] == str(out)
    assert set(report["tensors"][0]) == {"name", "observed_min", "observed_max", "low", "high", "clipped_fraction"}
    assert any(t["clipped_fraction"] > 0 for t in report["tensors"])


def test_help_lists_the_commands():
    done = run_cli("--help")
    for command in ("train", "distill", "eval", "calibrate", "bench"):
        assert command in done.stdout


def test_recommended_refuses_explicit_settings():
    done = run_cli("eval", "--model", "xlsr-clip", "--data", "weights", "--engine", "ort-int8", "--recommended",
                   "--samples", "100")
    assert done.returncode == 2 and "--recommended chooses the method" in done.stderr


@pytest.mark.skipif(__import__("sr.run.engines", fromlist=["x"]).tensorrt_available(), reason="TensorRT is present here")
def test_tensorrt_engine_without_tensorrt_is_a_clear_error():
    done = run_cli("eval", "--model", "xlsr-clip", "--data", "weights", "--engine", "tensorrt")
    assert done.returncode == 2 and "needs an NVIDIA GPU with TensorRT" in done.stderr and "Traceback" not in done.stderr


def test_calibrate_out_may_be_a_folder(tmp_path):
    done = run_cli("calibrate", "--model", "xlsr-relu", "--method", "minmax", "--samples", "10", "--out", str(tmp_path))
    assert done.returncode == 0, done.stderr
    written = list(tmp_path.glob("*.qdq.onnx"))
    assert [p.name for p in written] == ["xlsr-relu-minmax-10-tensorrt.qdq.onnx"]
    assert written[0].stat().st_mode & 0o044  # readable by others, like any file the user writes


def _options(command: str) -> set[str]:
    parser = cli.build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {action.dest for action in commands.choices[command]._actions}


SET_OTHERWISE = ("model", "calibration", "scheme")


@pytest.mark.parametrize("command, config_path, skip", [
    ("train", "sr.tune.train.TrainConfig", ()), ("distill", "sr.tune.distill.DistillConfig", ()),
    ("qat", "sr.tune.qat.QatConfig", SET_OTHERWISE), ("int8-ready", "sr.lab.ready.ReadyConfig", SET_OTHERWISE),
    ("eval", "sr.lab.evaluate.EvalConfig", SET_OTHERWISE), ("diagnose", "sr.lab.diagnose.DiagnoseConfig", SET_OTHERWISE),
    ("bench", "sr.lab.bench.BenchConfig", ("model",)), ("calibrate", "sr.quant.calibrate.CalibrationConfig", ()),
])
def test_every_config_field_is_an_option(command, config_path, skip):
    """The options are made from the config's fields, so none is forgotten (the calibration's land under their
    calib_ names)."""
    module, name = config_path.rsplit(".", 1)
    config = getattr(importlib.import_module(module), name)
    renamed = {"seed": "calib_seed", "data": "calib_data", "inputs": "calib_inputs"} if name == "CalibrationConfig" else {}
    wanted = {renamed.get(f.name, f.name) for f in dataclasses.fields(config) if f.name not in skip}
    assert wanted <= _options(command), wanted - _options(command)


def test_a_config_field_without_help_stops_the_parser(monkeypatch):
    from sr import options

    monkeypatch.setattr(options, "READY_HELP", {k: v for k, v in options.READY_HELP.items() if k != "max_images"})
    monkeypatch.setattr(cli, "READY_HELP", options.READY_HELP)
    with pytest.raises(KeyError, match="max_images"):
        cli.build_parser()


def test_new_options_reach_the_config(tmp_path):
    """Fields that had no option before (`--max-images`, `--max-side`, `--keep-best`) now reach their configs (each
    command prints its config before any work; these stop there on a missing folder)."""
    result = run_cli("int8-ready", "--model", "xlsr-clip", "--max-images", "0")
    assert result.returncode == 2 and "max_images" in result.stderr
    result = run_cli("diagnose", "--model", "xlsr-clip", "--data", str(tmp_path / "none"), "--max-side", "64")
    assert result.returncode == 2 and '"max_side": 64' in result.stderr
    result = run_cli("qat", "--model", "xlsr-clip", "--out", str(tmp_path / "q.safetensors"), "--keep-best",
                     "--train-dirs", str(tmp_path / "none"), "--samples", "10")
    assert result.returncode == 2 and '"keep_best": true' in result.stderr and not (tmp_path / "q.safetensors").exists()
