"""SR INT8 Lab: what INT8 post-training quantization does to super-resolution networks, and how to fix it.

The package is layers, each importing only from those before it (docs/layout.md has every module):

    sr/            the basics (data, metrics, store, progress, choices, cost, box, options) and the CLI (`python -m sr`)
    sr/quant/      how any ONNX graph is quantized: the spec, statistics and range searches, recipe, QDQ writer
    sr/model/      the networks: the lab's models and weights, a user's ONNX model, the converters
    sr/run/        making and running INT8 models: the pipeline (`calibrate_model`), the engines and their policy
    sr/tune/       changing weights for INT8: training, distillation, refinements, QAT
    sr/lab/        what the lab measures and ships: evaluate, compare, diagnose, bundle, int8-ready, bench

The calls the CLI and the app are made of, importable from here (loaded on first use):

    >>> import sr
    >>> shown = sr.compare("photo.png", "xlsr-relu", "xlsr-clip", sr.CalibrationConfig(method="entropy"))
    >>> int8 = sr.calibrate_model("xlsr-clip", sr.CalibrationConfig(), "npu")       # a cached INT8 model
    >>> report = sr.evaluate(sr.EvalConfig(model="xlsr-clip", data="Set5", engine="ort-int8"))
    >>> user = sr.register_onnx("mine.onnx")                                        # then use user.name
    >>> ready = sr.make_ready(sr.ReadyConfig(user.name, data="Set5", target_db=0.05))
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_PUBLIC = {  # name -> the module that defines it
    "CalibrationConfig": "sr.quant.calibrate", "Method": "sr.quant.calibrate", "Scheme": "sr.quant.quantspec",
    "QuantRecipe": "sr.quant.recipe", "Fixes": "sr.quant.recipe", "Refinement": "sr.quant.recipe",
    "model_info": "sr.model.models", "shipped_models": "sr.model.weights", "load_model": "sr.model.weights",
    "register_onnx": "sr.run.register", "Overrides": "sr.model.contract",
    "calibrate_model": "sr.run.quantize", "CalibratedModel": "sr.quant.calibrated",
    "engine_for": "sr.run.runtime", "EngineKind": "sr.run.runtime",
    "TrainConfig": "sr.tune.train", "train": "sr.tune.train", "DistillConfig": "sr.tune.distill",
    "distill": "sr.tune.distill", "RefineConfig": "sr.tune.ptq", "refine": "sr.tune.ptq",
    "QatConfig": "sr.tune.qat", "quantization_aware_training": "sr.tune.qat",
    "EvalConfig": "sr.lab.evaluate", "evaluate": "sr.lab.evaluate", "compare": "sr.lab.compare",
    "DiagnoseConfig": "sr.lab.diagnose", "diagnose": "sr.lab.diagnose", "export_bundle": "sr.lab.bundle",
    "ReadyConfig": "sr.lab.ready", "make_ready": "sr.lab.ready", "BenchConfig": "sr.lab.bench",
    "run_bench": "sr.lab.bench", "Cancelled": "sr.progress",
}
__all__ = ["__version__", *_PUBLIC]


def _lazy(names: dict[str, str], owner: str):
    """A module `__getattr__` that imports each of `names` ({name: defining module}) when first asked for."""
    def __getattr__(name: str):
        if name in names:
            return getattr(importlib.import_module(names[name]), name)
        raise AttributeError(f"module {owner!r} has no attribute {name!r}")
    return __getattr__


def _public_of(package: str) -> tuple[list[str], object]:
    """A layer package's `__all__` (its public calls, from `_PUBLIC`) and the `__getattr__` that loads them; a
    call named like one of the package's modules (`sr.lab.compare` is the module) is left to the module."""
    names = {name: module for name, module in _PUBLIC.items()
             if module.startswith(f"{package}.") and f"{package}.{name}" not in _PUBLIC.values()}
    return list(names), _lazy(names, package)


__getattr__ = _lazy(_PUBLIC, "sr")  # the public calls, imported when first asked for (`import sr` stays light)
