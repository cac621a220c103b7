"""Diagnostics on a model with a planted out-of-range branch, the fixes, and the JSON schema."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sr.diagnose import FIXES, apply_fix, diagnose
from sr.models import load_model, save_weights

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


def test_ranking_puts_the_planted_tensor_first(planted):
    path, images = planted
    report = diagnose(path, "entropy", 20, "tensorrt", data=images)
    assert report.ranking[0].tensor in PLANTED, [r.tensor for r in report.ranking[:3]]
    assert report.ranking[0].psnr_drop_db > 0.5 and report.int8_psnr_y < report.fp32_psnr_y - 0.5
    assert report.ranking[0].clipped_fraction > 0


@pytest.mark.parametrize("fix, tensor", [("range from minmax", None), ("range from mse", None)])
def test_fixes_recover_psnr(planted, fix, tensor):
    path, images = planted
    report = diagnose(path, "entropy", 20, "tensorrt", data=images)
    image = np.asarray(Image.open(Path(images) / "butterfly.png").convert("RGB"))
    outcome = apply_fix(report, tensor or report.ranking[0].tensor, fix, image, "Check against ground truth")
    before, after = (row["PSNR vs truth (dB)"] for row in outcome.rows)
    assert after > before + 0.3, outcome.rows
    with pytest.raises(ValueError, match="unknown fix"):
        apply_fix(report, report.ranking[0].tensor, "magic", image, "Check against ground truth")
    assert set(FIXES) >= {"range from minmax", "range from mse", "keep in float (no QDQ)"}


def test_diagnose_json_schema(data_dir):
    done = subprocess.run([sys.executable, "-m", "sr", "diagnose", "--model", "xlsr-clip", "--method", "entropy",
                           "--samples", "10", "--scheme", "tensorrt", "--data", str(data_dir / "Set5"),
                           "--json", "--top", "3"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert set(report) == {"model", "method", "scheme", "fp32_psnr_y", "int8_psnr_y", "ranking"}
    assert len(report["ranking"]) == 3
    assert set(report["ranking"][0]) == {"tensor", "op", "psnr_drop_db", "recovery_db", "sqnr_db", "clipped_fraction"}


def test_keep_in_float_removes_the_tensors_qdq(planted):
    import onnx

    path, images = planted
    report = diagnose(path, "entropy", 20, "tensorrt", data=images)
    image = np.asarray(Image.open(Path(images) / "butterfly.png").convert("RGB"))
    outcome = apply_fix(report, "/Concat_output_0", "keep in float (no QDQ)", image, "Check against ground truth")
    graph = onnx.load(str(outcome.calibrated.qdq_onnx)).graph
    quantized_inputs = {node.input[0] for node in graph.node if node.op_type == "QuantizeLinear"}
    assert "/Concat_output_0" not in quantized_inputs
    assert len(quantized_inputs) >= 10  # the rest of the network stays INT8
