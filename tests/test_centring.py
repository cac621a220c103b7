"""sr.model.centring: centred I/O built into a user's graph (the function unchanged, the quantized input and output on
the 8-bit grid), or the reason it cannot be in words; and which ops only move values."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from sr.model.centring import CentringImpossible, centre_user_io, moves_values, user_io
from sr.run.quantize import fp32_onnx_path
from sr.tune.transforms import centring_reason


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


def test_ops_that_only_move_values():
    assert moves_values(helper.make_node("Transpose", ["a"], ["b"], perm=[0, 2, 3, 1]))
    assert moves_values(helper.make_node("Pad", ["a", "p"], ["b"], mode="reflect"))
    assert not moves_values(helper.make_node("Pad", ["a", "p"], ["b"]))  # constant padding adds zeros
    assert not moves_values(helper.make_node("Relu", ["a"], ["b"]))
