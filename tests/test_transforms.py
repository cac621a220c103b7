"""sr.transforms: centred I/O built into a user's graph (function unchanged, the quantized input and output on
the 8-bit grid, or the reason it cannot be), and equalization through the activations that commute with it."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from sr.calibrate import CalibrationConfig
from sr.quantize import calibrate_model, fp32_onnx_path
from sr.centring import CentringImpossible, centre_user_io, user_io
from sr.transforms import centring_reason, equalizable_pairs, prepare


def _run(model: onnx.ModelProto, x: np.ndarray, keep=()) -> list[np.ndarray]:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    copy.graph.output.extend([helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in keep])
    session = ort.InferenceSession(copy.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {model.graph.input[0].name: x})


CENTRABLE = ["fsrcnn", "espcn", "rlfn", "rrdb", "swinir-light", "waifu2x"]


@pytest.mark.parametrize("name", CENTRABLE)
def test_centred_io_keeps_the_function_and_puts_8_bit_images_on_the_int8_grid(families, name):
    model = families[name]
    graph = onnx.load(str(fp32_onnx_path(model.name)))
    centred, tensors = centre_user_io(graph, user_io(graph), model.input_range[1])
    levels = np.random.default_rng(0).integers(0, 256, (1, 3, 30, 34)).astype(np.float32) / 255
    before = _run(graph, levels)[0]
    after, *inside = _run(centred, levels, [tensors[0]])
    assert np.abs(after - before).max() < 1e-5
    if model.contract.color.value == "rgb":  # (a Y model reads the wrapper's float Y, not 8-bit levels)
        scaled = inside[0] * 255 / model.input_range[1]  # the centred input: integer levels -128..127
        assert np.abs(scaled - np.round(scaled)).max() < 1e-3 and scaled.min() >= -128 and scaled.max() <= 127


def test_where_the_offset_cannot_pass_the_reason_names_the_op(families):
    assert "reaches an Add" in centring_reason(families["vdsr"].name)  # the residual reads the input itself
    conv = helper.make_node("Conv", ["x", "w", "b"], ["y"], name="same", auto_pad="SAME_UPPER")
    graph = helper.make_graph([helper.make_node("Identity", ["lr"], ["x"], name="standard/in"), conv,
                               helper.make_node("Identity", ["y"], ["sr"], name="standard/output")], "g",
                              [helper.make_tensor_value_info("lr", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("sr", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [numpy_helper.from_array(np.ones((3, 3, 3, 3), np.float32), "w"),
                               numpy_helper.from_array(np.zeros(3, np.float32), "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(CentringImpossible, match="auto_pad"):
        centre_user_io(model, ("x", "y"), 1.0)
    assert centring_reason("xlsr-clip") is None  # the lab's architectures have it built in


def test_a_centred_user_graph_is_quantized_on_the_8_bit_grid(families, tmp_path):
    """prepare() centres a user's graph and fixes the ranges of its centred tensors; the written tensorrt model
    then reads its input at step 1/255 exactly (an 8-bit image's levels, no rounding)."""
    model = families["rlfn"].name
    structure, fixes = prepare(model, True, 0.0, None, tmp_path / "work", "tensorrt")
    assert structure != model and fixes.fixed_range
    assert all(low == pytest.approx(-127 / 255) and high == pytest.approx(127 / 255)
               for low, high in fixes.fixed_range.values())
    int8 = calibrate_model(structure, CalibrationConfig(method="mse", samples=20), "tensorrt", fixes=fixes)
    qdq = onnx.load(str(int8.qdq_onnx))
    values = {i.name: numpy_helper.to_array(i) for i in qdq.graph.initializer}
    read = {n.input[0]: float(values[n.input[1]]) for n in qdq.graph.node if n.op_type == "QuantizeLinear"}
    for tensor in fixes.fixed_range:
        assert read[tensor] == pytest.approx(1 / 255, rel=1e-6), tensor


def test_equalization_passes_leaky_relu_and_prelu(families):
    for name, activation in (("waifu2x", "LeakyRelu"), ("fsrcnn", "PRelu")):
        graph = onnx.load(str(fp32_onnx_path(families[name].name)))
        producers = {n.output[0]: n for n in graph.graph.node}
        pairs = equalizable_pairs(graph)
        assert pairs, name
        consumer = next(n for n in graph.graph.node if n.output[0] == pairs[0][0])
        assert producers[consumer.input[0]].op_type == activation


def test_the_cli_says_why_centred_io_is_left_out(families, data_dir, capsys):
    from sr import cli

    assert cli.main(["eval", "--onnx", str(families["vdsr"].source),
                     "--data", str(data_dir / "Set5"), "--engine", "ort-int8", "--method", "mse", "--samples", "10",
                     "--refine", "centred-io,bias-correction", "--json"]) == 0
    assert "centred I/O left out: the input reaches an Add" in capsys.readouterr().err
