"""sr.quant.recipe: one QuantRecipe and one key for every cached INT8 result (the calibration, the automatic method's
choice, the refined models)."""
import dataclasses
import inspect
from pathlib import Path

import pytest

import sr.tune.ptq  # noqa: F401  (a refined recipe's key covers the refinement modules: they must be loaded)
import sr.tune.fakequant
import sr.run.quantize
from sr.quant.calibdata import load_calibration_images
from sr.quant.calibrate import CalibrationConfig
from sr.quant.recipe import Fixes
from sr.tune.ptq import RefineConfig
from sr.run.quantize import calibrate_model
from sr.quant.recipe import QuantRecipe, Refinement, RefineSettings
from sr.store import code_digest_of

ROOT = Path(__file__).resolve().parent.parent


def _variants():
    base = QuantRecipe(CalibrationConfig(method="mse", samples=10))
    yield "method", dataclasses.replace(base, calibration=CalibrationConfig(method="minmax", samples=10))
    yield "samples", dataclasses.replace(base, calibration=CalibrationConfig(method="mse", samples=11))
    yield "gain", dataclasses.replace(base, calibration=CalibrationConfig(method="mse", samples=10, gain=0.5))
    yield "scheme", dataclasses.replace(base, scheme="npu")
    yield "fixes", dataclasses.replace(base, fixes=Fixes(keep_float=["x"]))
    yield "refinements", dataclasses.replace(base, refinements=["equalize"])


def test_every_part_of_the_recipe_is_in_its_key():
    base = QuantRecipe(CalibrationConfig(method="mse", samples=10))
    keys = {"base": base.key("w", "d")}
    for what, recipe in _variants():
        keys[what] = recipe.key("w", "d")
    assert len(set(keys.values())) == len(keys), keys
    assert base.key("w2", "d") != keys["base"] and base.key("w", "d2") != keys["base"]
    refined = QuantRecipe(refinements=["adaround"])
    assert refined.key("w", "d") != dataclasses.replace(refined, refine=RefineSettings(adaround_steps=10)).key("w", "d")
    # the settings of refinements that are not asked for do not split the cache
    assert base.key("w", "d") == dataclasses.replace(base, refine=RefineSettings(patches=3)).key("w", "d")
    # the image folder's name is not the images: only their pixels (the data digest) count
    assert base.key("w", "d") == dataclasses.replace(
        base, calibration=CalibrationConfig(method="mse", samples=10, data="elsewhere/")).key("w", "d")


def test_the_refinement_code_is_in_a_refined_recipes_key_only(monkeypatch):
    plain, refined = QuantRecipe(), QuantRecipe(refinements=["bias-correction"])
    before = plain.key("w", "d"), refined.key("w", "d")
    name = next(n for n, v in vars(sr.tune.fakequant).items() if inspect.isfunction(v) and v.__module__ == "sr.tune.fakequant")
    monkeypatch.setattr(sr.tune.fakequant, name, lambda *a, **k: None)
    assert plain.key("w", "d") == before[0]  # calibrating does not pass through the fake quantizers' code
    assert refined.key("w", "d") != before[1]


def test_refinements_are_ordered_and_checked():
    assert QuantRecipe(refinements=["bias-correction", "centred-io"]).refinements == [Refinement.CENTRED_IO,
                                                                                       Refinement.BIAS_CORRECTION]
    with pytest.raises(ValueError, match="npu-per-tensor"):
        QuantRecipe(scheme="npu-per-tensor", refinements=["adaround"])
    with pytest.raises(ValueError, match="unknown PTQ refinement"):
        QuantRecipe(refinements=["sharpen"])
    with pytest.raises(ValueError, match="patches must be a positive integer"):
        RefineSettings(patches=0)


def test_the_caches_are_named_by_the_one_key(tmp_path):
    """The pipeline's cache entry is named by what makes the model, not by how it was asked for: the same weights
    under another file name, or the same pixels passed as arrays instead of the default folder, find the same entry;
    a changed weight or a changed image makes another."""
    import shutil

    import numpy as np
    import torch

    from sr.model.weights import load_model, resolve_weights, save_weights

    config = CalibrationConfig(method="minmax", samples=10)
    int8 = calibrate_model("xlsr-clip", config, "cpu")
    assert int8.qdq_onnx.parent.name == int8.key
    images = load_calibration_images(None)
    renamed = shutil.copy(resolve_weights("xlsr-clip"), tmp_path / "renamed.safetensors")
    same = [calibrate_model(str(renamed), config, "cpu"), calibrate_model("xlsr-clip", config, "cpu", images=images)]
    assert [s.key for s in same] == [int8.key, int8.key] and all(s.cached for s in same)
    network = load_model("xlsr-clip")
    with torch.no_grad():
        next(network.parameters()).mul_(1.01)
    changed = save_weights(network, tmp_path / "changed.safetensors")
    flipped = [np.ascontiguousarray(images[0][:, ::-1]), *images[1:]]  # the same shapes, other pixels
    others = [calibrate_model(str(changed), config, "cpu"), calibrate_model("xlsr-clip", config, "cpu", images=flipped)]
    assert len({int8.key, *(o.key for o in others)}) == 3
    for other in others:
        assert other.qdq_onnx.parent.name == other.key and other.qdq_onnx.is_file()
    # a refined model's key: the same for the same recipe, another for any other refinement, scheme,
    # calibration or weights
    refine = RefineConfig("xlsr-clip", ["equalize"], config, "cpu")
    assert refine.key("w") == RefineConfig("xlsr-clip", ["equalize"], config, "cpu").key("w")
    others = [RefineConfig("xlsr-clip", ["adaround"], config, "cpu"), RefineConfig("xlsr-clip", ["equalize"], config,
                                                                                   "tensorrt"),
              RefineConfig("xlsr-clip", ["equalize"], CalibrationConfig(method="minmax", samples=11), "cpu")]
    assert len({refine.key("w"), refine.key("v"), *(other.key("w") for other in others)}) == 5


def test_a_key_refuses_code_it_cannot_see():
    with pytest.raises(RuntimeError, match="not imported"):
        code_digest_of("sr.no_such_module")


def test_every_calibration_setting_is_in_the_key():
    changed = {"method": "minmax", "samples": 11, "patch_size": 32, "seed": 5, "percentile": 99.9, "inputs": "raw",
               "gain": 0.5, "contrast": 0.9}
    assert set(changed) | {"data"} == {f.name for f in dataclasses.fields(CalibrationConfig)}  # none forgotten
    base = QuantRecipe(CalibrationConfig()).key("w", "d")
    for name, value in changed.items():
        assert QuantRecipe(CalibrationConfig(**{name: value})).key("w", "d") != base, name


def test_the_automatic_methods_choice_is_keyed_by_its_scoring_code_too(monkeypatch):
    """The automatic method scores its candidates (an engine, PSNR): that code is in its key, not in a fixed
    method's."""
    import sr.metrics

    auto, fixed = QuantRecipe(CalibrationConfig(method="auto")), QuantRecipe(CalibrationConfig(method="mse"))
    before = auto.key("w", "d"), fixed.key("w", "d")
    monkeypatch.setattr(sr.metrics, "psnr_y", lambda *a, **k: 0.0)
    assert auto.key("w", "d") != before[0] and fixed.key("w", "d") == before[1]


def test_the_key_is_the_same_in_another_process():
    import subprocess
    import sys

    code = ("import sr.tune.ptq; from sr.quant.recipe import QuantRecipe; from sr.quant.calibrate import CalibrationConfig; "
            "print(QuantRecipe(CalibrationConfig(method='auto'), refinements=['equalize']).key('w', 'd'))")
    here = QuantRecipe(CalibrationConfig(method="auto"), refinements=["equalize"]).key("w", "d")
    there = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                           env={"PYTHONHASHSEED": "7", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}, cwd=ROOT)
    assert there.stdout.strip() == here, there.stderr[-1000:]
