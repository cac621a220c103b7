"""Making and running INT8 models: the pipeline from a model, a calibration and a scheme to its cached INT8 model
(`quantize`, with the automatic method, scored on the engines), the TFLite writer (`tflite`, its convolutions in
`tfliteconv`, the file it builds in `tflitefile`), ONNX Runtime's sessions and the observing mode (`sessions`: the
one place the layers below are handed what runs a graph), the engines with their tiling (`engines`) and
conformance check (`conformance`), INT8 as an NPU runs it (`npu`: Qualcomm's HTP, LiteRT), and the engine policy
(`runtime`), and a user's ONNX file registered (`register`: the probe that learns its contract, handed to the
model layer when this package is imported). Imports the top-level modules, `sr.quant` and `sr.model`."""
from .. import _public_of
from . import register  # noqa: F401  (hands the model layer the probe that registers a user's file by its path)

__all__, __getattr__ = _public_of(__name__)  # its public calls, each imported when first asked for
