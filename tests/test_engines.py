"""Fast INT8 on the CPU: the rewritten ORT model against the plain one, OpenVINO against ONNX Runtime, tiling."""

import numpy as np
import pytest

from sr.quant.calibrate import CalibrationConfig
from sr.data import degrade, load_image
from sr.run.engines import OpenVinoEngine, OrtEngine, openvino_available, tiled
from sr.metrics import psnr_y
from sr.run.quantize import calibrate_model
from sr.quant.qdq import write_unrewritten_cpu_model


@pytest.fixture(scope="module")
def baboon(data_dir):
    hr, lr = degrade(load_image(data_dir / "Set14" / "baboon.png"), 3)
    return hr[:240, :300], lr[:80, :100]


@pytest.mark.parametrize("model", ["xlsr-relu", "xlsr-clip", "teacher"])
def test_rewritten_int8_model_is_bit_identical(model, baboon, tmp_path):
    """Dense block-diagonal convs, zero-padded channels and a Slice change no output level."""
    _, lr = baboon
    fast = calibrate_model(model, CalibrationConfig(method="entropy", samples=20), "cpu")
    plain = write_unrewritten_cpu_model(fast.fp32_onnx, fast.ranges, tmp_path / "plain.onnx")
    difference = np.abs(OrtEngine(fast.qdq_onnx, 3).run(lr).astype(int) - OrtEngine(plain, 3).run(lr).astype(int))
    assert difference.max() == 0, f"{(difference > 0).sum()} values differ, by up to {difference.max()} levels"


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
    from sr.run.sessions import ort_providers

    qdq = calibrate_model("xlsr-clip", CalibrationConfig(method="minmax", samples=10), "tensorrt")
    gpu = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    chain = ort_providers(qdq.qdq_onnx, gpu)
    assert chain[0][0] == "TensorrtExecutionProvider" and chain[1:] == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert ort_providers(qdq.fp32_onnx, gpu) == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert ort_providers(qdq.qdq_onnx, ["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    assert OrtEngine(qdq.qdq_onnx, 3).provider == "CPUExecutionProvider"  # this machine


@pytest.mark.gpu
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


def _wide_model(path, dilation: int, pooled: bool = False):
    """x3 RGB ONNX model that looks 2 * dilation + 4 LR pixels away (two dilated 3x3 convs and a dilated 5x5);
    `pooled`: times a global average (a model that sees the whole image)."""
    import torch
    from torch import nn

    class Wide(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 8, 3, padding=dilation, dilation=dilation)
            self.b = nn.Conv2d(8, 8, 3, padding=dilation, dilation=dilation)
            self.c = nn.Conv2d(8, 27, 5, padding=4, dilation=2)

        def forward(self, x):
            y = self.b(torch.relu(self.a(x)))
            if pooled:
                y = y * torch.sigmoid(y.mean(dim=(2, 3), keepdim=True))
            return nn.functional.pixel_shuffle(self.c(torch.relu(y)), 3)

    torch.manual_seed(0)
    torch.onnx.export(Wide().eval(), (torch.rand(1, 3, 16, 16),), str(path), opset_version=17, input_names=["lr"],
                      output_names=["sr"], dynamic_axes={"lr": {2: "h", 3: "w"}, "sr": {2: "H", 3: "W"}}, dynamo=False)
    return path


@pytest.mark.parametrize("engine_kind", ["ort", "openvino"])
def test_tiles_overlap_by_the_models_measured_receptive_field(engine_kind, tmp_path, photo):
    """A model that looks 44 pixels away (more than the old fixed 32-pixel overlap) is measured, and its tiles are
    seamless: the stitched image equals the whole-image run exactly. A model with a global average is found to
    look beyond any radius and runs whole."""
    from sr.run.engines import receptive_radius

    if engine_kind == "openvino" and not openvino_available():
        pytest.skip("OpenVINO is not installed")
    make = OrtEngine if engine_kind == "ort" else OpenVinoEngine
    engine = make(_wide_model(tmp_path / "wide.onnx", 20), 3)
    assert receptive_radius(engine._run_array, 3) == 44
    lr = np.tile(photo, (10, 8, 1))[:600, :700]
    whole = tiled(engine._run_array, lr, 3, tile=10_000)
    assert np.array_equal(engine.run(lr), whole) and engine._radius == 44
    assert not np.array_equal(tiled(engine._run_array, lr, 3), whole)  # what the fixed 32 pixels gave
    pooled = make(_wide_model(tmp_path / "pooled.onnx", 2, pooled=True), 3)
    assert receptive_radius(pooled._run_array, 3) is None
    assert np.array_equal(pooled.run(lr), tiled(pooled._run_array, lr, 3, tile=10_000))


def test_openvino_drops_the_requests_of_evicted_shapes(tmp_path):
    """Compiled models evicted from the per-shape cache are freed, their per-thread infer requests with them
    (they used to stay alive in every thread that had used them: memory grew with shapes x threads)."""
    import gc
    import threading
    import weakref

    if not openvino_available():
        pytest.skip("OpenVINO is not installed")
    engine = OpenVinoEngine(_wide_model(tmp_path / "small.onnx", 1), 3)
    first = []

    def work(offset: int):
        for size in range(8, 20):
            engine._run_array(np.zeros((1, 3, size, size + offset), np.float32))
            if size == 8 and offset == 0:
                first.append(weakref.ref(engine.compiled[(1, 3, 8, 8)][0]))

    threads = [threading.Thread(target=work, args=(offset,)) for offset in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    work(0)  # this thread too (it stays alive)
    gc.collect()
    assert len(engine.compiled) <= 8 and first and first[0]() is None


def test_a_fixed_size_model_gets_a_tensorrt_profile_of_its_size():
    """TensorRT's profile for a model that takes one size is that size (the 8..576 range broke such models); its
    plan is keyed apart. (The engine itself needs a GPU with TensorRT: tested only where there is one.)"""
    from sr.run.engines import tensorrt_plan_key, tensorrt_profile_shapes

    assert tensorrt_profile_shapes((64, 96)) == ((1, 3, 64, 96),) * 3
    assert tensorrt_profile_shapes()[0] == (1, 3, 8, 8)
    model = str(__file__)
    assert tensorrt_plan_key(model, "H100", "10.9", (64, 96)) != tensorrt_plan_key(model, "H100", "10.9")
