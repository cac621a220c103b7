"""Models that take only some input sizes on every path: a user's export with a fixed 1x3x48x48 or 1x3x96x96
input (x3), one that runs only on sides that are a multiple of 4 (a PixelUnshuffle branch), and one that needs
at least 25 pixels a side (a reflection pad of 24): calibration statistics at sizes they accept, Compare and
Recalibrate, the coverage check, the diagnosis and mixed precision, int8-ready and the bundle, in the library,
the CLI and the page's handler. Each of these fed the fixed-size models the image or 128-pixel blocks and failed
with "Got invalid dimensions ... Expected: 48" (or 96, where an 85-pixel calibration image was used whole); the
other two registered (the probe's 48x40 suits them) and then failed on the first odd side or small patch."""
import json

import numpy as np
import pytest
import torch

import standins
from sr.quant.calibrate import CalibrationConfig
from sr.data import degrade, load_image
from sr.model.weights import load_model
from sr.run.quantize import calibrate_model
from sr.run.register import register_onnx

QUICK = CalibrationConfig(method="entropy", samples=20)


@pytest.fixture(scope="module", params=[48, 96, "multiple-of-4", "min-25"])
def fixed(request, tmp_path_factory, isolated_cache):
    kind, folder = request.param, tmp_path_factory.mktemp("fixed")
    if isinstance(kind, str):  # the sizes are found by probing, and the wrapper pads to them
        user = register_onnx(standins.sized(kind, folder))
        c = user.contract
        assert (c.fixed_size, c.multiple_of, c.min_size) == ((None, 4, 1) if kind == "multiple-of-4" else (None, 1, 25))
        return user
    path = standins._export(load_model("xlsr-clip"), folder / f"xlsr-fixed-{kind}.onnx",
                            torch.rand(1, 3, kind, kind), dynamic=False)
    user = register_onnx(path)
    assert user.contract.fixed_size == (kind, kind)
    return user


@pytest.fixture(scope="module")
def bird(data_dir):
    return degrade(load_image(data_dir / "Set5" / "bird.png"), 3)  # (truth, lr)


def test_statistics_compare_recalibrate_and_coverage(fixed, bird):
    from sr.lab.compare import compare
    from sr.lab.coverage import range_coverage

    truth, lr = bird
    first = compare(truth, fixed.name, fixed.name, QUICK, "tensorrt", "ground-truth")
    again = compare(truth, fixed.name, fixed.name, CalibrationConfig(method="entropy", samples=20, seed=7),
                    "tensorrt", "ground-truth")  # Recalibrate: a new sample
    for result in (first, again):
        assert result.int8_a.shape == result.truth.shape
        int8 = [r for r in result.metrics if r.kind.value == "int8"]
        assert int8 and all(25 < r.psnr_vs_fp32_db < 80 for r in int8)
    coverage = range_coverage(first.calibrations[0], lr[:100, :130])
    assert coverage and all(0 <= c.outside_fraction <= 1 for c in coverage)


def test_the_diagnosis_and_mixed_precision(fixed, bird):
    from sr.lab.diagnose import DiagnoseConfig, diagnose
    from sr.lab.scorer import Scorer

    truth, lr = bird
    report = diagnose(DiagnoseConfig(fixed.name, QUICK, "tensorrt", max_side=100), images=[truth])
    assert report.ranking and np.isfinite(report.int8_psnr_vs_fp32_db)
    scorer = Scorer(calibrate_model(fixed.name, QUICK, "npu"), [(lr[:70, :90], truth[:210, :270])])
    assert scorer.score(dropped=scorer.points[:1])[1] > 20


def test_int8_ready_and_the_bundle_from_the_command_line(fixed, data_dir, tmp_path, capsys):
    from sr import cli

    code = cli.main(["int8-ready", "--model", fixed.name, "--data", str(data_dir / "Set5"), "--target-db", "-100",
                     "--samples", "20", "--max-float", "1", "--max-images", "1", "--budget-minutes", "0.5", "--no-qat",
                     "--out", str(tmp_path / "bundle"), "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 1 and [s["route"] for s in report["route"]][0] == "range methods"
    assert (tmp_path / "bundle" / "model.qdq.onnx").is_file()
    assert cli.main(["eval", "--model", fixed.name, "--data", str(data_dir / "Set5"), "--engine", "ort-int8",
                     "--samples", "20", "--method", "entropy", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["fp32_mean"]["psnr_y"] - shown["int8_mean"]["psnr_y"] < 1.0


def test_the_pages_compare_handler(fixed, tmp_path):
    from ui import comparison, words
    from PIL import Image

    photo = (np.random.default_rng(0).random((70, 110, 3)) * 255).astype(np.uint8)
    Image.fromarray(photo).save(tmp_path / "p.png")
    *panels, metrics, coverage, _, state, _ = comparison.run_compare(
        str(tmp_path / "p.png"), fixed.name, "xlsr-clip", "entropy", 10, "tensorrt", "Upscale my image", "nearest",
        "calib_data/", None, progress=lambda *a, **k: None)
    assert panels[2].shape == (210, 330, 3) and len(metrics) == 4 and coverage
    said = words.contract_text(fixed)  # the sizes it takes, in the page's words
    c = fixed.contract
    assert (f"fixed input {c.fixed_size[1]}x{c.fixed_size[0]}" if c.fixed_size else
            "multiple of 4" if c.multiple_of == 4 else "at least 25 px a side") in said, said


class _BakedBatch(torch.nn.Module):
    """A fixed 48x48 x3 network whose export carries a constant batch-1 shape (a Reshape to [1, 12, 48, 48]), as a
    TensorFlow-exported ESPCN does."""

    def __init__(self):
        super().__init__()
        self.head = torch.nn.Conv2d(3, 12, 3, padding=1)
        self.tail = torch.nn.Conv2d(12, 27, 3, padding=1)

    def forward(self, x):
        features = torch.relu(self.head(x)).reshape(1, 12, 48, 48)
        return torch.nn.functional.pixel_shuffle(self.tail(features), 3)


def test_a_constant_batch_1_reshape_through_every_refinement_and_qat(tmp_path, data_dir):
    """Equalization, bias correction and AdaRound batch patches, and so does QAT: the baked batch-1 shape used to
    fail with "shape '[1, 12, 48, 48]' is invalid for input of size ..." in the ONNX interpreter."""
    import onnx

    from sr.lab.evaluate import EvalConfig, evaluate
    from sr.tune.ptq import RefineConfig, refine
    from sr.quant.recipe import Refinement
    from sr.tune.qat import QatConfig, quantization_aware_training

    torch.manual_seed(0)
    path = standins._export(_BakedBatch().eval(), tmp_path / "baked.onnx", torch.rand(1, 3, 48, 48), dynamic=False)
    shapes = [n for n in onnx.load(str(path)).graph.node if n.op_type == "Reshape"]
    assert shapes  # the export keeps the constant shape
    user = register_onnx(path)
    refined = refine(RefineConfig(user.name, [Refinement.EQUALIZE, Refinement.ADAROUND, Refinement.BIAS_CORRECTION],
                                  QUICK, "tensorrt"))
    shown = evaluate(EvalConfig(model=str(refined), data=str(data_dir / "Set5"), engine="ort-int8", calibration=QUICK))
    assert np.isfinite(shown["int8_vs_reference_db"])
    result = quantization_aware_training(QatConfig(model=user.name, out=str(tmp_path / "baked-qat.onnx"), steps=4,
                                                   batch_size=4, lr_patch=48, train_dirs=[str(data_dir / "Set5")],
                                                   val_dir="", checkpoint_every=10**6, calibration=QUICK))
    assert result.weights.is_file() and result.qdq_onnx.is_file()


def test_qat_trains_on_patches_of_any_size(fixed, data_dir, tmp_path):
    """QAT's 18 px patches: a fixed-size model trains on patches of its size, the padded ones on 18 px (neither a
    multiple of 4 nor 25 px), through the wrapper's padding in the ONNX interpreter."""
    from sr.tune.qat import QatConfig, quantization_aware_training

    result = quantization_aware_training(QatConfig(model=fixed.name, out=str(tmp_path / "sized-qat.onnx"), steps=2,
                                                   batch_size=2, lr_patch=18, train_dirs=[str(data_dir / "Set5")],
                                                   val_dir="", checkpoint_every=10**6, calibration=QUICK))
    assert result.weights.is_file() and result.qdq_onnx.is_file() and result.steps == 2
