"""Quantization-aware fine-tuning: the ONNX interpreter against ONNX Runtime, float biases in the tensorrt
QDQ model, centred I/O, and short real QAT runs whose QDQ model ONNX Runtime scores like the fake quantization."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import standins
from sr.quant.calibrate import CalibrationConfig
from sr.lab.evaluate import EvalConfig, evaluate
from sr.model.export import onnx_bytes
from sr.model.centring import IO_OFFSET
from sr.model.networks import with_io_offset
from sr.model.weights import load_model, read_metadata
from sr.model.onnxtorch import OnnxModule
from sr.tune.fakequant import original_model
from sr.tune.qat import QatConfig, quantization_aware_training
from sr.tune.transforms import io_tensors
from sr.run.quantize import calibrate_model, fp32_onnx_path, learned_ranges
from sr.run.register import register_onnx

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory):
    return standins.build_all(tmp_path_factory.mktemp("standins"))


def _ort(path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def test_interpreter_matches_onnx_runtime(stand_ins, tmp_path):
    """Every stand-in's standard graph (Resize cubic a=-0.5, PRelu, ConvTranspose, Split, Transpose, Tanh, Log...)
    and the shipped models, run by sr.model.onnxtorch and by ONNX Runtime."""
    paths = {name: register_onnx(p).standard_onnx for name, p in stand_ins.items() if "vdsr" not in name}
    paths.update({name: fp32_onnx_path(name) for name in ("xlsr-relu", "teacher")})
    generator = np.random.default_rng(0)
    for name, path in paths.items():
        model = onnx.load(str(path))
        shape = [d.dim_value or 29 for d in model.graph.input[0].type.tensor_type.shape.dim]
        x = generator.random(shape, dtype=np.float32)
        with torch.no_grad():
            ours = OnnxModule(model)(torch.from_numpy(x)).numpy()
        assert np.abs(ours - _ort(path, x)).max() < 1e-4, name


def test_interpreter_refuses_uncovered_ops():
    node = onnx.helper.make_node("Einsum", ["input"], ["output"])
    graph = onnx.helper.make_graph([node], "g", [onnx.helper.make_tensor_value_info("input", 1, [1, 3, 4, 4])],
                                   [onnx.helper.make_tensor_value_info("output", 1, [1, 3, 4, 4])])
    with pytest.raises(ValueError, match="cannot be fine-tuned here yet: Einsum"):
        OnnxModule(onnx.helper.make_model(graph))


def test_tensorrt_qdq_keeps_biases_float_and_cpu_quantizes_them():
    """TensorRT's explicit-quantization parser wants Q/DQ on activations and weights only."""
    config = CalibrationConfig(method="minmax", samples=10)
    trt = onnx.load(str(calibrate_model("xlsr-clip", config, "tensorrt").qdq_onnx))
    inits = {i.name: i for i in trt.graph.initializer}
    dequantized = [inits[n.input[0]].data_type for n in trt.graph.node
                   if n.op_type == "DequantizeLinear" and n.input[0] in inits]
    assert dequantized and set(dequantized) == {onnx.TensorProto.INT8}  # weights only, no INT32 bias
    for conv in (n for n in trt.graph.node if n.op_type == "Conv"):
        assert inits[conv.input[2]].data_type == onnx.TensorProto.FLOAT
        producer = {o: n.op_type for n in trt.graph.node for o in n.output}
        assert producer[conv.input[0]] == producer[conv.input[1]] == "DequantizeLinear"
    cpu = onnx.load(str(calibrate_model("xlsr-clip", config, "cpu").qdq_onnx))
    cpu_inits = {i.name: i.data_type for i in cpu.graph.initializer}
    assert onnx.TensorProto.INT32 in {cpu_inits[n.input[0]] for n in cpu.graph.node
                                      if n.op_type == "DequantizeLinear" and n.input[0] in cpu_inits}


def test_centred_io_is_the_same_function_and_puts_8_bit_images_on_the_int8_grid():
    for name in ("xlsr-clip", "xlsr-relu", "teacher"):
        model = load_model(name)
        centred = with_io_offset(model)
        x = torch.rand(1, 3, 23, 31)
        with torch.no_grad():
            assert (model(x) - centred(x)).abs().max() < 1e-5, name
    graph = onnx.load_from_string(onnx_bytes(with_io_offset(load_model("xlsr-clip"))))
    image_in, image_out = io_tensors(graph)
    ops = {o: n.op_type for n in graph.graph.node for o in n.output}
    assert (ops[image_in], ops[image_out]) == ("Pad", "Clip")
    # every 8-bit level, through the exported graph's own input Pad: the tensor the INT8 input quantizer sees is
    # exactly level/255 - 128/255, i.e. the INT8 values -128..127 at step 1/255
    import onnxruntime as ort

    graph.graph.output.append(onnx.helper.make_tensor_value_info(image_in, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    ramp = np.tile(np.arange(256, dtype=np.float32) / 255, (3, 4, 1))[None]  # 1x3x4x256, every level
    seen = session.run([image_in], {session.get_inputs()[0].name: ramp})[0]
    inner = seen[0, :, seen.shape[2] // 2, seen.shape[3] - 256 - (seen.shape[3] - 256) // 2:][:, :256]
    assert np.array_equal(np.rint(inner * 255), np.tile(np.arange(-128, 128, dtype=np.float32), (3, 1)))
    assert np.abs(inner * 255 - np.rint(inner * 255)).max() < 1e-4
    with pytest.raises(ValueError, match="already has centred I/O"):
        with_io_offset(with_io_offset(load_model("xlsr-clip")))


@pytest.fixture(scope="module")
def qat_run(tmp_path_factory, data_dir):
    out = tmp_path_factory.mktemp("qat") / "clip-qat.safetensors"
    config = QatConfig(model="xlsr-clip", out=str(out), steps=24, calibration=CalibrationConfig(method="mse", samples=20), batch_size=4, val_every=12,
                       checkpoint_every=12, train_dirs=[str(data_dir / "Set14")], val_dir=str(data_dir / "Set5"),
                       keep_best=True)
    return config, quantization_aware_training(config)


def test_qat_writes_a_model_whose_int8_ort_score_matches_the_fake_quantization(qat_run, data_dir):
    config, result = qat_run
    assert result.steps == 24 and result.qdq_onnx.is_file()
    metadata = read_metadata(result.weights)
    assert metadata["config"]["io_offset"] == pytest.approx(IO_OFFSET)
    assert metadata["qat"]["base"] == "xlsr-clip" and metadata["qat"]["scheme"] == "tensorrt"
    assert original_model(str(result.weights)) == "xlsr-clip"  # fine-tuning it again keeps the original as reference
    ranges = learned_ranges(result.weights, "tensorrt")
    assert ranges and learned_ranges(result.weights, "cpu") is None
    int8 = calibrate_model(str(result.weights), CalibrationConfig(samples=20), "tensorrt")
    learned = [r for r in int8.ranges.values() if r.method == "qat"]
    assert {r.name for r in learned} == set(ranges)
    qdq = onnx.load(str(int8.qdq_onnx))
    scales = {i.name: onnx.numpy_helper.to_array(i) for i in qdq.graph.initializer}
    image_in, _ = io_tensors(onnx.load(str(int8.fp32_onnx)))
    assert float(scales[f"{image_in}_scale"]) == pytest.approx(1 / 255, rel=1e-6)  # fixed, not learned away
    report = evaluate(EvalConfig(model=str(result.weights), data=str(data_dir / "Set5"), engine="ort-int8",
                                 calibration=CalibrationConfig(samples=20), scheme="tensorrt"))
    assert abs(report["int8_mean"]["psnr_y"] - result.history[-1]["val_psnr"]) < 0.01
    assert report["fp32_reference"]["model"] == "xlsr-clip"
    assert report["int8_vs_reference_db"] == pytest.approx(
        report["fp32_reference"]["psnr_y"] - report["int8_mean"]["psnr_y"])


def test_qat_model_goes_into_the_deployment_bundle(qat_run, tmp_path):
    """The bundle carries the learned ranges (tensorrt) and a CPU model; the centred model's own Pad stays float
    in the fast CPU rewrite, whose outputs equal the plain QDQ model's."""
    from sr.lab.bundle import export_bundle
    from sr.quant.qdq import write_unrewritten_cpu_model

    _, result = qat_run
    export_bundle(str(result.weights), CalibrationConfig(samples=10), tmp_path / "bundle")
    assert (tmp_path / "bundle").is_dir() and any((tmp_path / "bundle").glob("*.onnx"))
    cpu = calibrate_model(str(result.weights), CalibrationConfig(samples=10), "cpu")
    write_unrewritten_cpu_model(cpu.fp32_onnx, cpu.ranges, tmp_path / "plain.onnx")
    x = np.random.default_rng(1).random((1, 3, 20, 26), dtype=np.float32)
    assert np.array_equal(_ort(cpu.qdq_onnx, x), _ort(tmp_path / "plain.onnx", x))


def test_qat_resume_ends_where_an_uninterrupted_run_ends(qat_run, tmp_path):
    config, result = qat_run
    stopped = QatConfig(**{**vars(config), "out": str(tmp_path / "resumed.safetensors")})
    calls = iter(range(1000))
    quantization_aware_training(stopped, should_stop=lambda: next(calls) >= 12)
    # (keep-best: the best weights so far are in the checkpoint, so the resumed run ends as the uninterrupted one)
    assert torch.load(stopped.checkpoint_path, weights_only=True)["best"]["step"] == 12
    resumed = quantization_aware_training(QatConfig(**{**vars(stopped), "resume": True}))
    assert resumed.steps == 24
    from safetensors.torch import load_file

    a, b = load_file(str(result.weights)), load_file(str(resumed.weights))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert read_metadata(resumed.weights)["qat"]["ranges"] == read_metadata(result.weights)["qat"]["ranges"]


def test_qat_of_a_user_onnx_model(stand_ins, data_dir, tmp_path):
    user = register_onnx(stand_ins["xlsr-nhwc"])
    out = tmp_path / "user-qat.onnx"
    result = quantization_aware_training(QatConfig(
        model=user.name, out=str(out), steps=6, calibration=CalibrationConfig(method="mse", samples=10), batch_size=2, val_every=6, checkpoint_every=6, equalize=0.5,
        train_dirs=[str(data_dir / "Set5")], val_dir=str(data_dir / "Set5")))
    trained = register_onnx(out)
    assert learned_ranges(trained.name, "tensorrt")
    report = evaluate(EvalConfig(model=trained.name, data=str(data_dir / "Set5"), engine="ort-int8",
                                 calibration=CalibrationConfig(samples=10), scheme="tensorrt"))
    assert abs(report["int8_mean"]["psnr_y"] - result.history[-1]["val_psnr"]) < 0.01


@pytest.mark.parametrize("argv, message", [
    (["--model", "xlsr-clip", "--out", "x.onnx"], "--out must end in .safetensors"),
    (["--model", "xlsr-clip", "--out", "x.safetensors", "--scheme", "fp8"], "unknown INT8 scheme 'fp8'"),
    (["--model", "xlsr-clip", "--out", "x.safetensors", "--alpha", "2"], "alpha must be in"),
    (["--model", "nope", "--out", "x.safetensors"], "no model 'nope'"),
])
def test_cli_qat_bad_arguments(argv, message, tmp_path, monkeypatch, capsys):
    from sr import cli

    monkeypatch.chdir(tmp_path)  # (nothing may be written: each is refused before any work)
    code = cli.main(["qat", *argv])
    err = capsys.readouterr().err
    assert code == 2 and message in err, err
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_qat_under_torchrun(data_dir, tmp_path):
    """Two processes (gloo on the CPU, as NCCL would be on GPUs): one result, each rank's patch stream kept."""
    import os

    from conftest import free_port

    port = free_port()
    out = tmp_path / "ddp.safetensors"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(port), "-m", "sr", "qat", "--model", "xlsr-clip", "--out", str(out), "--steps", "4",
               "--batch-size", "2", "--samples", "10", "--val-every", "4", "--train-dirs", str(data_dir / "Set5"),
               "--val-dir", "", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("wrote ") == 1 and read_metadata(out)["qat"]["steps"] == 4
    checkpoint = torch.load(f"{out}.ckpt.pt", weights_only=True)
    assert len(checkpoint["sampler"]) == 2 and checkpoint["sampler"][0] != checkpoint["sampler"][1]


def test_a_users_onnx_model_can_be_the_teacher(tmp_path, data_dir):
    """Teacher-guided QAT with the teacher given as an ONNX file: it runs through `ModelInfo.frozen_module` (the
    interpreter), which computes what the PyTorch teacher does."""
    from sr.model.models import model_info
    from sr.model.weights import load_model

    onnx_teacher = str(fp32_onnx_path("teacher"))
    x = torch.rand(1, 3, 24, 20)
    with torch.no_grad():
        assert torch.allclose(model_info(onnx_teacher).frozen_module()(x), load_model("teacher")(x), atol=1e-4)
    from safetensors.torch import load_file

    def run(name, **teacher):
        return quantization_aware_training(QatConfig(
            model="xlsr-clip", out=str(tmp_path / name), steps=2, batch_size=2, val_every=2, checkpoint_every=2,
            calibration=CalibrationConfig(method="mse", samples=10), train_dirs=[str(data_dir / "Set5")],
            val_dir=None, **teacher))

    guided, plain = run("guided.safetensors", teacher=onnx_teacher, beta=0.25), run("plain.safetensors")
    assert guided.steps == 2 and guided.qdq_onnx.is_file()
    assert read_metadata(guided.weights)["qat"]["config"]["teacher"] == onnx_teacher
    a, b = load_file(str(guided.weights)), load_file(str(plain.weights))
    assert any(not torch.equal(a[k], b[k]) for k in a)  # the teacher's term changed the training


def test_an_interrupted_qat_without_a_checkpoint_leaves_nothing_behind(data_dir, tmp_path):
    """Ctrl-C before the first checkpoint: the centred-I/O starting point QAT wrote beside its output (mode 0600,
    `<out>.centred.safetensors`) is removed with it; nothing is left that a resume could use."""
    config = QatConfig(model="xlsr-clip", out=str(tmp_path / "stopped.safetensors"), steps=24,
                       calibration=CalibrationConfig(method="mse", samples=20), batch_size=4, val_every=12,
                       train_dirs=[str(data_dir / "Set5")], val_dir="")

    def interrupt() -> bool:
        assert list(tmp_path.glob("stopped.safetensors.centred.*"))  # the starting point exists while it runs
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        quantization_aware_training(config, should_stop=interrupt)
    assert list(tmp_path.iterdir()) == []


def test_the_cli_qat_ends_on_the_written_model_scored_on_the_reference(tmp_path, data_dir, capsys):
    """`qat`'s last figure is the file it wrote, run by the reference, against the original FP32 model, not the
    fake quantizers' validation figure (both are printed, each named)."""
    import re

    from sr import cli

    out = tmp_path / "q.safetensors"
    code = cli.main(["qat", "--model", "xlsr-clip", "--out", str(out), "--steps", "4", "--batch-size", "2",
                     "--samples", "10", "--val-every", "4", "--train-dirs", str(data_dir / "Set5"),
                     "--val-dir", str(data_dir / "Set5"), "--device", "cpu"])
    printed = capsys.readouterr().out
    assert code == 0 and "INT8 (fake-quantized)" in printed, printed
    said = re.search(r"the written INT8 model, scored on the reference \(ONNX Runtime, CPU\): ([\d.]+) dB, "
                     r"(-?[\d.]+) dB below the original FP32", printed)
    assert said, printed
    report = evaluate(EvalConfig(model=str(out), data=str(data_dir / "Set5"), engine="ort-int8"))
    assert float(said.group(1)) == pytest.approx(report["int8_mean"]["psnr_y"], abs=0.006)
    assert float(said.group(2)) == pytest.approx(report["fp32_reference"]["psnr_y"] - report["int8_mean"]["psnr_y"],
                                                 abs=0.0006)


def test_upcycled_qat_uses_the_one_definition_of_upcycled_distillation(tmp_path, data_dir, monkeypatch):
    """QAT's `upcycled` teacher term is `sr.tune.distill.upcycled_terms` (the one distillation uses), in L1: its four
    terms are computed at each step and the run trains."""
    from sr.tune import distill, qat

    calls = []
    real = distill.upcycled_terms

    def counted(*args, **kwargs):
        terms = real(*args, **kwargs)
        calls.append(len(terms))
        return terms

    monkeypatch.setattr(qat, "upcycled_terms", counted)
    result = quantization_aware_training(QatConfig(
        model="xlsr-clip", out=str(tmp_path / "up.safetensors"), steps=2, batch_size=2, val_every=2,
        checkpoint_every=2, calibration=CalibrationConfig(method="mse", samples=10), train_dirs=[str(data_dir / "Set5")],
        val_dir=None, teacher="teacher", beta=0.25, kd_mode="upcycled"))
    assert result.steps == 2 and calls == [4, 4]
    with pytest.raises(ValueError, match="output and upcycled modes, not feature"):
        QatConfig(model="xlsr-clip", out=str(tmp_path / "f.safetensors"), teacher="teacher", beta=0.25,
                  kd_mode="feature")
