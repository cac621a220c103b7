"""sr.model.export: torch -> ONNX, checked against torch."""
import onnx

from sr.model.export import max_abs_difference
from sr.model.weights import load_model
from sr.run.quantize import fp32_onnx_path
from sr.run.sessions import run_once


def test_export_matches_torch():
    path = fp32_onnx_path("xlsr-clip")
    assert max_abs_difference(load_model("xlsr-clip"), path, run_once) <= 1e-4
    assert onnx.load(str(path)).opset_import[0].version >= 17
