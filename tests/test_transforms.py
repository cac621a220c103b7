"""sr.tune.transforms: a model prepared with centred I/O is quantized on the 8-bit grid, and equalization passes the
activations that commute with it (the graph surgery of centring is tests/test_centring.py)."""
import onnx
import pytest
from onnx import numpy_helper

from sr.quant.calibrate import CalibrationConfig
from sr.run.quantize import calibrate_model, fp32_onnx_path
from sr.tune.transforms import equalizable_pairs, prepare


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


def test_the_cli_says_why_centred_io_is_left_out(families, data_dir, capsys, tmp_path):
    import shutil

    from sr import cli

    shutil.copy(data_dir / "Set5" / "bird.png", tmp_path / "bird.png")  # (one image is enough to be told)
    assert cli.main(["eval", "--onnx", str(families["vdsr"].source),
                     "--data", str(tmp_path), "--engine", "ort-int8", "--method", "mse", "--samples", "10",
                     "--refine", "centred-io,bias-correction", "--json"]) == 0
    assert "centred I/O left out: the input reaches an Add" in capsys.readouterr().err
