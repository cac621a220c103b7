"""Bring your own model: stand-ins built here (tests/standins.py) go through detection, eval, calibration,
diagnosis and the deployment bundle; untrusted files are refused with clear messages."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import standins
from sr.bundle import export_bundle, parse_calibration_cache
from sr.calibrate import CalibrationConfig
from sr.data import degrade, list_images, load_image
from sr.diagnose import DiagnoseConfig, diagnose
from sr.engines import OrtEngine
from sr.evaluate import EvalConfig, evaluate
from sr.metrics import psnr_y
from sr.usermodel import Overrides, UserModelError, register_onnx

ROOT = Path(__file__).resolve().parent.parent
EXPECTED = {  # stand-in -> (layout, colour, range, pre-upsampled, fixed size, ops left in float)
    "fsrcnn-y": ("nchw", "y", 1, False, None, ("ConvTranspose", "PRelu")),
    "vdsr-pre-upsampled": ("nchw", "rgb", 1, True, None, ("Add",)),
    "xlsr-nhwc": ("nhwc", "rgb", 1, False, None, ("Transpose",)),
    "xlsr-255": ("nchw", "rgb", 255, False, None, ("Div", "Mul")),
    "xlsr-fixed-48": ("nchw", "rgb", 1, False, (48, 48), ()),
    "xlsr-tanh": ("nchw", "rgb", 1, False, None, ("Add", "Div", "Log", "Mul", "Sub", "Tanh")),
    "xlsr-clip-exported": ("nchw", "rgb", 1, False, None, ()),
}


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory):
    return standins.build_all(tmp_path_factory.mktemp("standins"))


@pytest.fixture(scope="module")
def registered(stand_ins):
    return {name: register_onnx(path, Overrides(scale=3) if "vdsr" in name else Overrides())
            for name, path in stand_ins.items()}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_contract_is_detected(registered, name):
    contract, model = registered[name].contract, registered[name]
    layout, color, value_range, pre, fixed, float_ops = EXPECTED[name]
    assert (contract.layout.value, contract.color.value, contract.value_range, contract.pre_upsampled,
            contract.fixed_size, contract.scale) == (layout, color, value_range, pre, fixed, 3)
    assert model.float_ops == float_ops
    assert contract.confidence_db > 3.0  # the chosen range reading is clearly the better fit


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_stand_in_evaluates_in_fp32_and_int8(registered, name, data_dir):
    report = evaluate(EvalConfig(model=registered[name].name, data=str(data_dir / "Set5"), engine="ort-int8",
                                 calibration=CalibrationConfig(method="minmax", samples=20)))
    assert report["fp32_mean"]["psnr_y"] > report["bicubic"]["psnr_y"] - 1.0  # a working upscaler
    assert report["fp32_mean"]["psnr_y"] - report["int8_mean"]["psnr_y"] < 1.0
    assert 0.98 < report["brightness_ratio"] < 1.02


def test_a_shipped_model_exported_to_onnx_gives_the_card_numbers(registered, data_dir):
    card = {"xlsr-clip": 32.762}
    report = evaluate(EvalConfig(model=registered["xlsr-clip-exported"].name, data=str(data_dir / "Set5"),
                                 engine="ort"))
    assert report["mean"]["psnr_y"] == pytest.approx(card["xlsr-clip"], abs=0.01)


def test_cli_eval_with_onnx(stand_ins, data_dir, tmp_path):
    done = subprocess.run([sys.executable, "-m", "sr", "eval", "--onnx", str(stand_ins["xlsr-nhwc"]), "--data",
                           str(data_dir / "Set5"), "--engine", "ort-int8", "--samples", "10", "--json"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "nhwc, rgb, values in [0, 1], x3" in done.stderr
    report = json.loads(done.stdout)
    assert report["int8_mean"]["psnr_y"] > 30


def test_diagnosis_on_a_user_model(registered, data_dir):
    report = diagnose(DiagnoseConfig(registered["fsrcnn-y"].name, CalibrationConfig(method="entropy", samples=20),
                                     data=str(data_dir / "Set5"), top=3, max_side=48))
    assert report.ranking and report.has_truth


def test_bundle_round_trip(registered, data_dir, tmp_path):
    model = registered["xlsr-255"].name
    config = CalibrationConfig(method="mse", samples=20)
    images = [degrade(load_image(p), 3) for p in list_images(data_dir / "Set5")[:2]]
    bundle = export_bundle(model, config, tmp_path / "bundle", images=[lr for _, lr in images])
    assert set(bundle.files) == {"README.md", "calibration.cache", "model.cpu-int8.onnx", "model.fp32.onnx",
                                 "model.qdq.onnx", "ranges.json"}
    report = evaluate(EvalConfig(model=model, data=str(data_dir / "Set5"), engine="ort-int8", calibration=config))
    shown = {row["name"]: row["psnr_y"] for row in report["images"]}
    engine = OrtEngine(bundle.folder / "model.qdq.onnx", 3)
    for path, (hr, lr) in zip(list_images(data_dir / "Set5")[:2], images):
        assert psnr_y(engine.run(lr), hr, 3) == pytest.approx(shown[path.name], abs=1e-9)
    ranges = json.loads((bundle.folder / "ranges.json").read_text())["tensors"]
    scales = parse_calibration_cache((bundle.folder / "calibration.cache").read_text())
    assert set(scales) == {r["name"] for r in ranges}
    for r in ranges:
        assert scales[r["name"]] == pytest.approx(max(abs(r["low"]), abs(r["high"])) / 127, rel=1e-6)
    assert f"{bundle.psnr_fp32_vs_int8_db:.2f} dB" in (bundle.folder / "README.md").read_text()


def test_untrusted_files_are_refused(stand_ins, tmp_path):
    for case, (path, words) in standins.bad_files(tmp_path, stand_ins["xlsr-clip-exported"]).items():
        with pytest.raises(UserModelError, match=words):
            register_onnx(path)
    with pytest.raises(FileNotFoundError, match="no such ONNX file"):
        register_onnx(tmp_path / "missing.onnx")


def test_overrides_win(stand_ins):
    model = register_onnx(stand_ins["xlsr-255"], Overrides(value_range=1))
    assert model.contract.value_range == 1 and model.contract.confidence_db is None
    with pytest.raises(ValueError, match="range must be 1 or 255"):
        Overrides(value_range=100)
    assert register_onnx(stand_ins["vdsr-pre-upsampled"], Overrides(scale=2)).contract.scale == 2
    with pytest.raises(UserModelError, match="upscales x3 on a probe image; --scale 2 contradicts it"):
        register_onnx(stand_ins["xlsr-nhwc"], Overrides(scale=2))
    with pytest.raises(UserModelError, match="wrong --layout or --color"):
        register_onnx(stand_ins["fsrcnn-y"], Overrides(layout="nhwc"))


def test_fixed_size_model_runs_on_every_engine(registered, data_dir):
    """OpenVINO tiles a fixed-size model to its size too, like ONNX Runtime (same output)."""
    from sr.engines import OpenVinoEngine, openvino_available

    if not openvino_available():
        pytest.skip("openvino is not installed")
    model = registered["xlsr-fixed-48"]
    _, lr = degrade(load_image(data_dir / "Set5" / "bird.png"), 3)
    ort_out = OrtEngine(model.standard_onnx, 3).run(lr)
    engine = OpenVinoEngine(model.standard_onnx, 3)
    assert engine.fixed == (48, 48)
    assert np.abs(engine.run(lr).astype(int) - ort_out.astype(int)).max() <= 1
