"""Diagnostics on a model with a planted out-of-range branch, the fixes, and the JSON schema."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sr.quant.calibrate import CalibrationConfig
from sr.lab.compare import InputMode
from sr.lab.coverage import range_coverage
from sr.lab.diagnose import DiagnoseConfig, diagnose
from sr.lab.fixes import Fix, apply_fix
from sr.model.weights import load_model, save_weights

ROOT = Path(__file__).resolve().parent.parent
PLANTED = {"/skip/Conv_output_0", "/Concat_output_0"}


@pytest.fixture(scope="module")
def planted(tmp_path_factory, data_dir):
    """xlsr-relu with its skip branch scaled up 40x and the fusing 1x1 conv scaled down to match: the FP32
    output is unchanged, but the skip tensor (and the concat where it meets the main branch) now spans a
    range 40x wider than the rest."""
    model = load_model("xlsr-relu")
    with torch.no_grad():
        model.skip.weight.mul_(40.0)
        model.skip.bias.mul_(40.0)
        model.fuse.weight[:, 32:].div_(40.0)
    folder = tmp_path_factory.mktemp("planted")
    path = save_weights(model, folder / "planted.safetensors")
    images = folder / "images"
    images.mkdir()
    for name in ("butterfly.png", "bird.png"):
        Image.open(data_dir / "Set5" / name).save(images / name)
    return str(path), str(images)


@pytest.fixture(scope="module")
def planted_report(planted):
    """The diagnosis of the planted model on its two images (ground truth), made once for the tests that read it."""
    path, images = planted
    return diagnose(_config(path, images))


def test_ranking_puts_the_planted_tensor_first(planted_report):
    report = planted_report
    assert report.ranking[0].tensor in PLANTED, [r.tensor for r in report.ranking[:3]]
    assert report.ranking[0].psnr_drop_db > 0.5 and report.int8_psnr_y < report.fp32_psnr_y - 0.5
    assert report.ranking[0].clipped_fraction > 0


def test_one_paragraph_for_the_cli_and_the_page(planted_report):
    """The diagnosis is written once (`DiagnosisReport.paragraph`): the CLI prints it plain, the page shows the
    same words with the model's shown name in bold and the tensor as code, and it carries the report's figures."""
    from ui.words import diagnosis_text

    report, top = planted_report, planted_report.ranking[0]
    plain, page = report.paragraph(), diagnosis_text(report)
    assert f"The worst tensor is {top.tensor} " in plain and f"The worst tensor is `{top.tensor}` " in page
    assert f"recovers {top.recovery_db:.2f} dB" in plain and f"FP32 {report.fp32_psnr_y:.2f} dB" in plain
    assert page.replace("`", "").replace("**", "").split(", ", 1)[1] == plain.split(", ", 1)[1]


def _config(path, images, method="entropy"):
    return DiagnoseConfig(path, CalibrationConfig(method=method, samples=20), "tensorrt", data=images)


@pytest.mark.parametrize("fix", [Fix.RANGE_MINMAX, Fix.RANGE_MSE])
def test_fixes_recover_psnr(planted, planted_report, fix):
    path, images = planted
    report = planted_report
    image = np.asarray(Image.open(Path(images) / "butterfly.png").convert("RGB"))
    outcome = apply_fix(report, report.ranking[0].tensor, fix, image, InputMode.GROUND_TRUTH)
    assert outcome.has_truth and outcome.psnr_after_db > outcome.psnr_before_db + 0.3, outcome
    with pytest.raises(ValueError, match="unknown fix 'magic'; choose one of: range-minmax"):
        apply_fix(report, report.ranking[0].tensor, "magic", image, InputMode.GROUND_TRUTH)


def test_upscale_mode_reports_against_fp32(planted, planted_report):
    """Without ground truth there is no "drop": figures are against the FP32 output, and agree with a real
    comparison of the simulated all-INT8 output."""
    path, images = planted
    image = np.asarray(Image.open(Path(images) / "bird.png").convert("RGB"))
    report = diagnose(_config(path, None), images=[image], mode=InputMode.UPSCALE)
    assert not report.has_truth and report.fp32_psnr_y is None
    assert report.int8_psnr_y == report.int8_psnr_vs_fp32_db < 40
    assert all(r.psnr_drop_db is None and math.isfinite(r.alone_psnr_vs_fp32_db) for r in report.ranking)
    assert report.ranking[0].tensor in PLANTED
    truth_mode = planted_report
    assert truth_mode.has_truth and 20 < truth_mode.int8_psnr_y < truth_mode.fp32_psnr_y < 40
    assert truth_mode.ranking[0].psnr_drop_db > 0.5


def test_range_coverage_flags_an_image_outside_the_calibration(photo):
    """Calibrated on a dark set, a normal image leaves the input tensor's range: the check says so."""
    from sr.run.quantize import calibrate_model

    dark = calibrate_model("xlsr-relu", CalibrationConfig(method="minmax", samples=10, gain=0.3), "tensorrt")
    normal = calibrate_model("xlsr-relu", CalibrationConfig(method="minmax", samples=10), "tensorrt")
    bright = np.full((40, 40, 3), 230, np.uint8)
    worst_dark, worst_normal = range_coverage(dark, bright)[0], range_coverage(normal, bright)[0]
    assert worst_dark.outside_fraction > 0.5 and worst_normal.outside_fraction < 0.01
    # what the tensorrt model quantizes: the Conv inputs (the input among them), not the output
    checked = {c.tensor for c in range_coverage(dark, bright)}
    assert "input" in checked and "output" not in checked


def test_diagnose_json_schema(data_dir, capsys):
    from sr import cli

    code = cli.main(["diagnose", "--model", "xlsr-clip", "--method", "entropy", "--samples", "10", "--scheme",
                     "tensorrt", "--data", str(data_dir / "Set5"), "--json", "--top", "3"])
    out, err = capsys.readouterr()
    assert code == 0, err
    report = json.loads(out)
    assert set(report) == {"model", "method", "scheme", "samples", "has_truth", "fp32_psnr_y", "int8_psnr_y",
                           "int8_psnr_vs_fp32_db", "int8_brightness", "ranking"}
    assert len(report["ranking"]) == 3 and report["has_truth"]
    assert set(report["ranking"][0]) == {"tensor", "op", "alone_psnr_vs_fp32_db", "psnr_drop_db", "recovery_db",
                                         "sqnr_db", "clipped_fraction"}


def test_keep_in_float_removes_the_tensors_qdq(planted, planted_report):
    import onnx

    path, images = planted
    report = planted_report
    image = np.asarray(Image.open(Path(images) / "butterfly.png").convert("RGB"))
    outcome = apply_fix(report, "/Concat_output_0", Fix.KEEP_FLOAT, image, InputMode.GROUND_TRUTH)
    graph = onnx.load(str(outcome.calibrated.qdq_onnx)).graph
    quantized_inputs = {node.input[0] for node in graph.node if node.op_type == "QuantizeLinear"}
    assert "/Concat_output_0" not in quantized_inputs
    from sr.quant.qdq import spec_of

    everything = set(spec_of(outcome.calibrated.fp32_onnx, "tensorrt").activations)
    assert quantized_inputs == everything - {"/Concat_output_0"}  # the rest of the network stays INT8


def test_diagnosis_is_bounded_and_cancellable(planted):
    from sr.progress import Cancelled

    path, images = planted
    image = np.asarray(Image.open(Path(images) / "butterfly.png").convert("RGB"))
    config = DiagnoseConfig(path, CalibrationConfig(method="entropy", samples=20), "tensorrt", max_side=32)
    report = diagnose(config, images=[image], mode=InputMode.UPSCALE)
    assert report.ranking and report.ranking[0].tensor in PLANTED
    calls = []
    with pytest.raises(Cancelled, match="stopped after 2 of"):
        diagnose(config, images=[image], mode=InputMode.UPSCALE, should_stop=lambda: calls.append(1) or len(calls) > 2)


@pytest.mark.parametrize("model, scheme", [("xlsr-relu", "tensorrt"), ("xlsr-clip", "npu"), ("xlsr-clip", "cpu")])
def test_all_int8_is_the_eval_figure(model, scheme, data_dir):
    """The diagnosis measures the written QDQ model with the reference engine: its "all INT8" PSNR is what
    `eval --engine ort-int8` reports for the same settings (the simulation it replaced was 0.6 dB off)."""
    from sr.lab.evaluate import EvalConfig, evaluate

    calibration = CalibrationConfig(method="entropy", samples=20)
    report = diagnose(DiagnoseConfig(model, calibration, scheme, data=str(data_dir / "Set5")))
    scored = evaluate(EvalConfig(model=model, data=str(data_dir / "Set5"), engine="ort-int8",
                                 calibration=calibration, scheme=scheme))
    assert report.int8_psnr_y == pytest.approx(scored["int8_mean"]["psnr_y"], abs=0.01)
    assert report.fp32_psnr_y == pytest.approx(scored["fp32_mean"]["psnr_y"], abs=0.01)
    from sr.quant.qdq import spec_of

    spec = spec_of(report.calibrated.fp32_onnx, scheme)
    assert {r.tensor for r in report.ranking} == {t for t, a in spec.activations.items() if a.group == t}
