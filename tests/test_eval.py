"""`python -m sr eval` end to end, against the numbers published in weights/README.md."""
import json
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def published_set5() -> dict[str, float]:
    card = (ROOT / "weights" / "README.md").read_text()
    return {name: float(psnr) for name, psnr in re.findall(r"^\| `([\w-]+)` \| [\d,]+ \| ([\d.]+) /", card, re.M)}


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


@pytest.mark.parametrize("model", ["teacher", "xlsr-relu", "xlsr-clip", "xlsr-relu-kd", "xlsr-clip-kd", "xlsr-relu-qat",
                                   "xlsr-clip-qat"])
def test_eval_reproduces_the_weights_card(model, data_dir):
    done = run_cli("eval", "--model", model, "--data", str(data_dir / "Set5"), "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert set(report) >= {"model", "data", "scale", "bicubic", "mean", "images"}
    assert report["scale"] == 3 and len(report["images"]) == 5
    assert set(report["images"][0]) >= {"name", "psnr_y", "ssim_y"}
    assert report["bicubic"]["psnr_y"] == pytest.approx(30.40, abs=0.01)
    assert report["mean"]["psnr_y"] == pytest.approx(published_set5()[model], abs=0.01)


def published_int8_loss() -> dict[str, tuple[float, float]]:
    """The QAT models' INT8 loss vs their original FP32 model (Set5, Set14) from the card's QAT table."""
    card = (ROOT / "weights" / "README.md").read_text()
    rows = re.findall(r"^\| `([\w-]+-qat)` \| [^|]+ \| [^|]+ \| [^|]+ \| ([\d.-]+) / ([\d.-]+) \|", card, re.M)
    return {name: (float(set5), float(set14)) for name, set5, set14 in rows}


@pytest.mark.parametrize("model", ["xlsr-relu-qat", "xlsr-clip-qat"])
def test_shipped_qat_model_int8_loss_matches_the_card(model, data_dir):
    """The issue's check: INT8 (tensorrt scheme, ONNX Runtime) against the *original* FP32 model, named in the
    JSON; the card's figure is reproduced to 0.01 dB."""
    done = run_cli("eval", "--model", model, "--engine", "ort-int8", "--scheme", "tensorrt", "--data",
                   str(data_dir / "Set5"), "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["fp32_reference"]["model"] == model.removesuffix("-qat")
    assert report["fp32_reference"]["psnr_y"] == pytest.approx(published_set5()[model.removesuffix("-qat")], abs=0.01)
    assert report["int8_vs_reference_db"] == pytest.approx(published_int8_loss()[model][0], abs=0.01)


def test_eval_degraded_json(data_dir):
    """The report names its degradation, and the edge PSNR sits beside PSNR/SSIM; a degraded LR scores lower."""
    reports = {}
    for degradation in ("clean", "strong"):
        done = run_cli("eval", "--model", "xlsr-relu", "--data", str(data_dir / "Set5"), "--degradation", degradation,
                       "--json")
        assert done.returncode == 0, done.stderr
        reports[degradation] = json.loads(done.stdout)
    strong, clean = reports["strong"], reports["clean"]
    assert strong["degradation"] == {"name": "strong", "blur": 1.0, "noise": 8.0, "jpeg": 40, "seed": 0}
    assert clean["degradation"]["name"] == "clean"
    assert set(strong["mean"]) == set(strong["bicubic"]) == {"psnr_y", "ssim_y", "edge_psnr_y"}
    assert clean["mean"]["edge_psnr_y"] < clean["mean"]["psnr_y"]  # edges are where SR errs most
    assert strong["mean"]["psnr_y"] < clean["mean"]["psnr_y"] - 3 and strong["bicubic"]["psnr_y"] < 26
    again = json.loads(run_cli("eval", "--model", "xlsr-relu", "--data", str(data_dir / "Set5"), "--degradation",
                               "strong", "--json").stdout)
    assert again["mean"] == strong["mean"]  # seeded per image: the same LR in every run


def test_eval_int8_json(data_dir):
    done = run_cli("eval", "--model", "xlsr-clip", "--data", str(data_dir / "Set5"), "--engine", "ort-int8",
                   "--method", "minmax", "--samples", "10", "--scheme", "cpu", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["int8_mean"] == report["mean"]
    assert report["fp32_mean"]["psnr_y"] - report["int8_mean"]["psnr_y"] < 1.0
    assert 0.9 < report["brightness_ratio"] < 1.1


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


def test_recommended_calibration_is_the_one_the_findings_derive():
    from sr.evaluate import RECOMMENDED_CALIBRATION, RECOMMENDED_SCHEME

    derived = json.loads((ROOT / "docs" / "findings.json").read_text())["recommended"]
    assert (RECOMMENDED_CALIBRATION.method.value, RECOMMENDED_CALIBRATION.samples, RECOMMENDED_SCHEME.value) == (
        derived["method"], derived["samples"], derived["scheme"])
    rows = json.loads((ROOT / "docs" / "findings.json").read_text())["rows"]
    # 5 models x 5 methods x (3 sample counts on tensorrt + 100 samples on npu, npu-per-tensor, cpu) x 2 sets
    assert (ROOT / "docs" / "findings.md").read_text().count("<!-- findings:") == 2 and len(rows) == 300
    assert {r["scheme"] for r in rows} == {"tensorrt", "npu", "npu-per-tensor", "cpu"}


@pytest.mark.parametrize("method", ["entropy", "entropy-zeros"])
def test_both_entropy_readings_from_the_cli(method, data_dir):
    done = run_cli("eval", "--model", "xlsr-relu", "--engine", "ort-int8", "--method", method, "--samples", "100",
                   "--scheme", "tensorrt", "--data", str(data_dir / "Set5"), "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["method"] == method and report["calibration"]["inputs"] == "downscaled"
    findings = json.loads((ROOT / "docs" / "findings.json").read_text())["rows"]
    published = next(r for r in findings if r["model"] == "xlsr-relu" and r["method"] == method and r["samples"] == 100
                      and r["scheme"] == "tensorrt" and r["data"] == "Set5")
    assert report["fp32_mean"]["psnr_y"] - report["int8_mean"]["psnr_y"] == pytest.approx(published["drop_db"], abs=0.01)


def test_recommended_refuses_explicit_settings():
    done = run_cli("eval", "--model", "xlsr-clip", "--data", "weights", "--engine", "ort-int8", "--recommended",
                   "--samples", "100")
    assert done.returncode == 2 and "--recommended chooses the method" in done.stderr


@pytest.mark.skipif(__import__("sr.engines", fromlist=["x"]).tensorrt_available(), reason="TensorRT is present here")
def test_tensorrt_engine_without_tensorrt_is_a_clear_error():
    done = run_cli("eval", "--model", "xlsr-clip", "--data", "weights", "--engine", "tensorrt")
    assert done.returncode == 2 and "needs an NVIDIA GPU with TensorRT" in done.stderr and "Traceback" not in done.stderr


def test_calibrate_out_may_be_a_folder(tmp_path):
    done = run_cli("calibrate", "--model", "xlsr-relu", "--method", "minmax", "--samples", "10", "--out", str(tmp_path))
    assert done.returncode == 0, done.stderr
    written = list(tmp_path.glob("*.qdq.onnx"))
    assert [p.name for p in written] == ["xlsr-relu-minmax-10-tensorrt.qdq.onnx"]
    assert written[0].stat().st_mode & 0o044  # readable by others, like any file the user writes
