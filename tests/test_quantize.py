"""Real ONNX Runtime: export, QDQ models of both schemes, the cache, INT8 quality."""
from collections import Counter

import numpy as np
import onnx
import pytest

from sr.calibrate import CalibrationConfig
from sr.data import degrade, load_image
from sr.engines import OrtEngine, TorchEngine, tensorrt_available
from sr.export import max_abs_difference
from sr.metrics import psnr_y
from sr.models import load_model
from sr.quantize import Scheme, calibrate_model, fp32_onnx_path


@pytest.fixture(scope="module")
def butterfly(data_dir):
    return degrade(load_image(data_dir / "Set5" / "butterfly.png"), 3)


def test_export_matches_torch():
    path = fp32_onnx_path("xlsr-clip")
    assert max_abs_difference(load_model("xlsr-clip"), path) <= 1e-4
    assert onnx.load(str(path)).opset_import[0].version >= 17


@pytest.mark.parametrize("scheme, within_db", [("tensorrt", 0.6), ("cpu", 0.6)])
def test_int8_is_close_to_fp32(butterfly, scheme, within_db):
    hr, lr = butterfly
    int8 = calibrate_model("xlsr-clip", CalibrationConfig(method="mse", samples=50), scheme)
    ops = Counter(node.op_type for node in onnx.load(str(int8.qdq_onnx)).graph.node)
    assert ops["QuantizeLinear"] >= 12 and ops["Conv"] == 11
    fp32 = TorchEngine(load_model("xlsr-clip")).run(lr)
    out = OrtEngine(int8.qdq_onnx, 3).run(lr)
    assert out.shape == fp32.shape == hr.shape
    assert psnr_y(out, fp32, 3) > 35.0  # INT8 stays close to its own FP32 output
    assert psnr_y(fp32, hr, 3) - psnr_y(out, hr, 3) < within_db


def test_entropy_hurts_more_than_mse(butterfly):
    hr, lr = butterfly
    scores = {}
    for method in ("entropy", "mse"):
        int8 = calibrate_model("xlsr-relu", CalibrationConfig(method=method, samples=50), "tensorrt")
        scores[method] = psnr_y(OrtEngine(int8.qdq_onnx, 3).run(lr), hr, 3)
    assert scores["entropy"] < scores["mse"] - 0.2


def test_cache_hit_and_corrupt_rebuild():
    config = CalibrationConfig(method="minmax", samples=10, seed=777)  # a key no other test uses
    first = calibrate_model("xlsr-relu", config, "cpu")
    again = calibrate_model("xlsr-relu", config, "cpu")
    assert not first.cached and again.cached and again.qdq_onnx == first.qdq_onnx
    assert again.ranges["output"].high == pytest.approx(first.ranges["output"].high)
    first.qdq_onnx.write_bytes(b"garbage")
    rebuilt = calibrate_model("xlsr-relu", config, "cpu")
    assert not rebuilt.cached and onnx.load(str(rebuilt.qdq_onnx)).graph.node
    other = calibrate_model("xlsr-relu", CalibrationConfig(method="minmax", samples=10, seed=778), "cpu")
    assert other.key != first.key


def test_tiles_have_no_seams(photo):
    engine = TorchEngine(load_model("teacher"))
    from sr.engines import tiled
    import torch

    whole = tiled(engine._run_array, photo, 3, tile=10_000)
    assert np.array_equal(tiled(engine._run_array, photo, 3, tile=24, overlap=32), whole)


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown INT8 scheme 'fp16'"):
        calibrate_model("xlsr-relu", CalibrationConfig(samples=10), "fp16")
    with pytest.raises(FileNotFoundError, match="no model 'nope'"):
        calibrate_model("nope", CalibrationConfig(samples=10), "cpu")
    assert Scheme.TENSORRT.symmetric and not Scheme.CPU.symmetric


@pytest.mark.skipif(not tensorrt_available(), reason="needs an NVIDIA GPU and TensorRT")
def test_tensorrt_matches_onnxruntime(butterfly):
    from sr.engines import TensorRTEngine

    _, lr = butterfly
    int8 = calibrate_model("xlsr-clip", CalibrationConfig(method="entropy", samples=50), "tensorrt")
    assert psnr_y(TensorRTEngine(int8.qdq_onnx, 3).run(lr), OrtEngine(int8.qdq_onnx, 3).run(lr), 3) > 40.0
