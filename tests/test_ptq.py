"""Post-training refinements: channel equalization keeps the function, AdaRound leaves weights on their INT8 grid
with the writer's step, bias correction moves the quantized Conv outputs' means onto FP32's, and the refined
model, evaluated through the CLI, loses less than plain calibration against the original FP32 model."""
import inspect
import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

import standins
from sr.quant.calibrate import CalibrationConfig
from sr.model.models import with_values
from sr.model.onnxtorch import OnnxModule
from sr.tune.ptq import RefineConfig, _conv_nodes, adaround, correct_biases, refine
from sr.tune.fakequant import fake_quantized
from sr.run.quantize import fp32_onnx_path
from sr.quant.recipe import Fixes
from sr.tune.transforms import calibration_batch, equalizable_pairs, equalize_channels
from sr.run.register import register_onnx

ROOT = Path(__file__).resolve().parent.parent


def _values(model):
    return {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}


def test_equalization_keeps_the_function(tmp_path):
    models = {"xlsr-clip": onnx.load(str(fp32_onnx_path("xlsr-clip"))),
              "fsrcnn-y": onnx.load(str(register_onnx(standins.build_all(tmp_path)["fsrcnn-y"]).standard_onnx))}
    pairs = equalizable_pairs(models["xlsr-clip"])
    assert ("/fuse/Conv_output_0", [("/gblocks/gblocks.2/mix/Conv_output_0", 0), ("/skip/Conv_output_0", 32)]) in pairs
    x = torch.rand(4, 3, 24, 24)
    for name, model in models.items():
        changed = equalize_channels(model, x, strength=1.0)
        assert changed, name  # FSRCNN's pairs pass a PReLU: a positive per-channel scale commutes with it too
        after = with_values(model, {**_values(model), **changed})
        with torch.no_grad():
            assert (OnnxModule(model)(x) - OnnxModule(after)(x)).abs().max() < 1e-5, name


@pytest.fixture(scope="module")
def student():
    calibration = CalibrationConfig(method="mse", samples=20)
    model, _ = fake_quantized("xlsr-clip", calibration, "tensorrt", Fixes())
    model.eval().requires_grad_(False)
    return model, OnnxModule(model.fp32).eval().requires_grad_(False), calibration_batch(calibration, 3, 8, 32)


def test_adaround_weights_sit_on_the_writers_grid(student):
    model, reference, x = student
    before = {name: p.detach().clone() for name, p in model.network.named_onnx_parameters().items()}
    adaround(model, reference, x, steps=20)
    for _, name, _ in _conv_nodes(model):
        weight, original = model.network.named_onnx_parameters()[name].detach(), before[name]
        scale = original.abs().amax(dim=(1, 2, 3), keepdim=True) / 127
        assert torch.allclose(weight.abs().amax(dim=(1, 2, 3), keepdim=True), original.abs().amax(dim=(1, 2, 3), keepdim=True))
        steps = weight / scale
        assert torch.allclose(steps, steps.round(), atol=1e-3)
        assert (steps - original / scale).abs().max() <= 1.0 + 1e-3  # rounded up or down, never further


def test_bias_correction_removes_the_mean_shift(student):
    model, reference, x = student
    node = next(_conv_nodes(model))[0]

    def shift():
        with torch.no_grad():
            _, got = model(x, keep={node.output[0]})
            _, want = reference(x, keep={node.output[0]})
        return (got[node.output[0]] - want[node.output[0]]).mean(dim=(0, 2, 3)).abs().max()

    correct_biases(model, reference, x)
    assert shift() < 1e-5  # the first Conv's inputs do not depend on any correction


def test_refined_model_loses_less_through_the_cli(data_dir, tmp_path, capsys):
    from sr import cli

    def run(*extra):
        code = cli.main(["eval", "--model", "xlsr-clip", "--engine", "ort-int8", "--method", "mse", "--samples", "20",
                         "--data", str(data_dir / "Set5"), "--json", *extra])
        out, err = capsys.readouterr()
        assert code == 0, err
        return json.loads(out)

    plain = run()
    refined = run("--refine", "bias-correction,centred-io,equalize")
    assert refined["fp32_reference"]["model"] == "xlsr-clip"
    assert refined["fp32_reference"]["what"] == "the FP32 model the refinements started from"
    plain_loss = plain["fp32_mean"]["psnr_y"] - plain["int8_mean"]["psnr_y"]
    assert refined["int8_vs_reference_db"] < plain_loss - 0.03
    assert np.isclose(refined["fp32_reference"]["psnr_y"], plain["fp32_mean"]["psnr_y"])


def test_bad_refinement_is_refused():
    with pytest.raises(ValueError, match="unknown PTQ refinement 'magic'"):
        RefineConfig("xlsr-clip", ["magic"])


@pytest.mark.parametrize("scheme, zero_point", [("tensorrt", 0), ("cpu", 128)])
def test_centred_io_is_exact_under_every_scheme(scheme, zero_point, tmp_path):
    """The centred input and output land on the 8-bit grid (step 1/255) in both integer types: UINT8 with
    +-127/255 used to give step 254/255^2 and zero point 128 (one level in 256 exact)."""
    import onnx

    from sr.quant.calibrate import CalibrationConfig
    from sr.run.quantize import calibrate_model
    from sr.quant.qdq import spec_of
    from sr.quant.readback import graph_quantization
    from sr.tune.transforms import io_tensors, prepare

    structure, fixes = prepare("xlsr-clip", True, 0.0, None, tmp_path / "m", scheme)
    int8 = calibrate_model(structure, CalibrationConfig(method="minmax", samples=10), scheme, fixes=fixes)
    fp32 = onnx.load(str(int8.fp32_onnx))
    written = graph_quantization(onnx.load(str(int8.qdq_onnx)), fp32).activations
    quantized_io = [t for t in io_tensors(fp32) if t in written]
    assert quantized_io and set(quantized_io) <= set(spec_of(fp32, scheme).activations)
    for tensor in quantized_io:
        scale, zero = written[tensor]
        assert scale == pytest.approx(1 / 255, rel=1e-6) and zero == zero_point, (tensor, scale, zero)


def test_adaround_refuses_per_tensor_weights():
    from sr.tune.ptq import RefineConfig

    with pytest.raises(ValueError, match="per-channel weight steps"):
        RefineConfig("xlsr-clip", ["adaround"], scheme="npu-per-tensor")


def test_the_refined_models_key_covers_the_images_and_every_module_it_passes_through(tmp_path, monkeypatch, photo):
    """A refined model is cached by its key: new images in the same folder, or a change to the interpreter, the
    pipeline or the model files, make a new one (the key used to hold the folder's name and three modules' code,
    so a refined model survived a fix in sr.model.onnxtorch)."""
    from PIL import Image

    import sr.model.models
    import sr.model.onnxtorch
    import sr.run.quantize

    folder = tmp_path / "calibration"
    folder.mkdir()
    Image.fromarray(photo).save(folder / "a.png")
    config = RefineConfig("xlsr-clip", ["bias-correction"], CalibrationConfig(method="mse", data=str(folder)))
    first = config.key("weights")
    Image.fromarray(255 - photo).save(folder / "a.png")
    os.utime(folder / "a.png", (1, 1))  # a different file, whatever the clock's resolution
    second = config.key("weights")
    assert second != first
    for module in (sr.model.onnxtorch, sr.run.quantize, sr.model.models):
        name = next(n for n, v in vars(module).items() if inspect.isfunction(v) and v.__module__ == module.__name__)
        with monkeypatch.context() as patch:
            patch.setattr(module, name, lambda *a, **k: None)
            assert config.key("weights") != second, module.__name__
    assert config.key("weights") == second


def test_adaround_fits_its_time_or_says_so_before_it_starts(student, tmp_path):
    """AdaRound, the one long refinement, times one pass and refuses up front when its estimate is over the time
    left (int8-ready's budget used to run 50% over on the teacher); when the time runs out part way it stops at the
    next Conv. (How close its estimate comes is measured in the closing note, not timed here.)"""
    from sr.tune.ptq import RefineStopped

    model, reference, x = student
    convs = len(list(_conv_nodes(model)))
    with pytest.raises(RefineStopped, match=r"would take at least \d+ s here"):
        adaround(model, reference, x, steps=20, seconds_left=lambda: 1e-3)
    with pytest.raises(RefineStopped, match=r"equalize, bias-correction would take at least \d+ s here"):
        refine(RefineConfig("xlsr-clip", ["equalize", "bias-correction"], CalibrationConfig(method="mse", samples=20)),
               seconds_left=lambda: 1e-3)  # the whole list, estimated before any of it runs (a heavy model's case)
    calls = iter([60.0, -1.0, -1.0])  # the estimate fits; the time runs out before the second Conv
    with pytest.raises(RefineStopped, match=f"stopped at Conv 2 of {convs}: the rest would take about"):
        adaround(model, reference, x, steps=20, seconds_left=lambda: next(calls))
