"""Fast INT8 on the CPU: the rewritten ORT model against the plain one, OpenVINO against ONNX Runtime, tiling."""
from collections import Counter

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from sr.calibrate import CalibrationConfig
from sr.data import degrade, load_image
from sr.engines import OpenVinoEngine, OrtEngine, openvino_available, tiled
from sr.metrics import psnr_y
from sr.quantize import Scheme, calibrate_model, write_qdq_model


@pytest.fixture(scope="module")
def baboon(data_dir):
    hr, lr = degrade(load_image(data_dir / "Set14" / "baboon.png"), 3)
    return hr[:240, :300], lr[:80, :100]


@pytest.mark.parametrize("model", ["xlsr-relu", "xlsr-clip", "teacher"])
def test_rewritten_int8_model_is_bit_identical(model, baboon, tmp_path):
    """Dense block-diagonal convs, zero-padded channels and a Slice change no output level."""
    _, lr = baboon
    fast = calibrate_model(model, CalibrationConfig(method="entropy", samples=20), "cpu")
    plain = write_qdq_model(fast.fp32_onnx, fast.ranges, Scheme.CPU, tmp_path / "plain.onnx", fast=False)
    difference = np.abs(OrtEngine(fast.qdq_onnx, 3).run(lr).astype(int) - OrtEngine(plain, 3).run(lr).astype(int))
    assert difference.max() == 0, f"{(difference > 0).sum()} values differ, by up to {difference.max()} levels"


def test_rewrite_puts_every_conv_on_the_fast_kernel():
    """Every Conv of the cpu-scheme XLSR model: group 1, input and output channels multiples of 4."""
    fast = calibrate_model("xlsr-clip", CalibrationConfig(method="minmax", samples=10), "cpu")
    graph = onnx.load(str(fast.qdq_onnx)).graph
    weights = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    convs = [node for node in graph.node if node.op_type == "Conv"]
    assert len(convs) == 11
    for node in convs:
        assert all(attr.i == 1 for attr in node.attribute if attr.name == "group"), node.name
        quantized = weights[producers[node.input[1]].input[0]]  # Conv <- DequantizeLinear <- INT8 weights
        assert quantized.shape[0] % 4 == 0 and quantized.shape[1] % 4 == 0, (node.name, quantized.shape)
    assert Counter(node.op_type for node in graph.node)["Slice"] == 1


@pytest.mark.skipif(not openvino_available(), reason="openvino is not installed")
@pytest.mark.parametrize("scheme", ["cpu", "tensorrt"])
def test_openvino_int8_matches_onnxruntime(scheme, baboon):
    """Same QDQ file, two runtimes: the same PSNR within 0.01 dB, pixels a few levels apart at most (OpenVINO
    fuses Q/DQ into its INT8 kernels and requantizes with its own rounding)."""
    hr, lr = baboon
    int8 = calibrate_model("xlsr-clip", CalibrationConfig(method="entropy", samples=20), scheme)
    ort_out, ov_out = OrtEngine(int8.qdq_onnx, 3).run(lr), OpenVinoEngine(int8.qdq_onnx, 3).run(lr)
    assert abs(psnr_y(ort_out, hr, 3) - psnr_y(ov_out, hr, 3)) < 0.01
    assert np.abs(ort_out.astype(int) - ov_out.astype(int)).max() <= 8
    fp32 = OpenVinoEngine(int8.fp32_onnx, 3).run(lr).astype(int) - OrtEngine(int8.fp32_onnx, 3).run(lr).astype(int)
    assert np.abs(fp32).max() <= 1  # FP32 is FP32 (no BF16 unless asked)


def test_small_inputs_run_in_one_tile():
    calls = []

    def run_array(array):
        calls.append(array.shape)
        return np.zeros((1, 3, array.shape[2] * 3, array.shape[3] * 3), np.float32)

    tiled(run_array, np.zeros((240, 320, 3), np.uint8), 3)
    assert calls == [(1, 3, 240, 320)]
    calls.clear()
    tiled(run_array, np.zeros((720, 1280, 3), np.uint8), 3)
    assert len(calls) == 6  # 512-pixel tiles


def test_onnxruntime_providers_prefer_the_gpu_where_present(tmp_path):
    """The provider chain is a pure function of what is installed: checked for a GPU install without one."""
    from sr.engines import ort_providers

    qdq = calibrate_model("xlsr-clip", CalibrationConfig(method="minmax", samples=10), "tensorrt")
    gpu = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    chain = ort_providers(qdq.qdq_onnx, gpu)
    assert chain[0][0] == "TensorrtExecutionProvider" and chain[1:] == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert ort_providers(qdq.fp32_onnx, gpu) == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert ort_providers(qdq.qdq_onnx, ["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    assert OrtEngine(qdq.qdq_onnx, 3).provider == "CPUExecutionProvider"  # this machine


@pytest.mark.skipif("CUDAExecutionProvider" not in __import__("onnxruntime").get_available_providers(),
                    reason="needs onnxruntime-gpu and an NVIDIA GPU")
def test_gpu_provider_runs_the_qdq_model(baboon):
    hr, lr = baboon
    int8 = calibrate_model("xlsr-clip", CalibrationConfig(method="entropy", samples=20), "tensorrt")
    import onnxruntime as ort

    engine = OrtEngine(int8.qdq_onnx, 3)
    assert engine.provider != "CPUExecutionProvider"
    cpu = ort.InferenceSession(str(int8.qdq_onnx), providers=["CPUExecutionProvider"])
    on_cpu = tiled(lambda array: cpu.run(None, {"input": array})[0], lr, 3)
    assert abs(psnr_y(engine.run(lr), hr, 3) - psnr_y(on_cpu, hr, 3)) < 0.1
