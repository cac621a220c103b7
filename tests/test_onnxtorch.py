"""sr.model.onnxtorch: each op variant a user's exporter writes, run as torch, against ONNX Runtime on the same graph."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from sr.model.onnxtorch import OnnxModule


def _model(nodes, initializers=(), out_shape=None, opset: int = 18) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 5, 7])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)], list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _agrees(model: onnx.ModelProto, atol: float = 1e-5) -> None:
    x = np.random.default_rng(0).random((1, 3, 5, 7), dtype=np.float32)
    expected = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    with torch.no_grad():
        got = OnnxModule(model)(torch.from_numpy(x)).numpy()
    assert got.shape == expected.shape and np.abs(got - expected).max() <= atol, np.abs(got - expected).max()


def _ints(name, values):
    return numpy_helper.from_array(np.array(values, np.int64), name)


def _floats(name, values):
    return numpy_helper.from_array(np.array(values, np.float32), name)


TRANSFORMS = ["half_pixel", "pytorch_half_pixel", "align_corners", "asymmetric", "tf_half_pixel_for_nn"]


@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("nearest_mode", ["round_prefer_floor", "round_prefer_ceil", "floor", "ceil"])
@pytest.mark.parametrize("sizes", [None, [1, 3, 8, 10]])  # scales x2 x3, or sizes that are no integer factor
def test_resize_nearest(transform, nearest_mode, sizes):
    extra = [_ints("sizes", sizes)] if sizes else [_floats("scales", [1, 1, 2, 3])]
    node = helper.make_node("Resize", ["x", "", "" if sizes else "scales", "sizes" if sizes else ""], ["y"],
                            mode="nearest", coordinate_transformation_mode=transform, nearest_mode=nearest_mode)
    _agrees(_model([node], extra))


@pytest.mark.parametrize("transform", ["half_pixel", "align_corners", "asymmetric", "tf_half_pixel_for_nn"])
def test_resize_linear(transform):
    node = helper.make_node("Resize", ["x", "", "scales"], ["y"], mode="linear", coordinate_transformation_mode=transform)
    _agrees(_model([node], [_floats("scales", [1, 1, 2, 2])]))


def _pad_with_axes():
    return _model([helper.make_node("Pad", ["x", "pads", "", "axes"], ["y"], mode="edge")],  # axes: opset 18
                  [_ints("pads", [1, 2, 0, 3]), _ints("axes", [2, 3])])


def _split(uneven: bool):
    if uneven:  # num_outputs (opset 18): 7 columns -> 3, 3, 1
        split = helper.make_node("Split", ["x"], ["p", "q", "r"], axis=3, num_outputs=3)
        return _model([split, helper.make_node("Concat", ["r", "p", "q"], ["y"], axis=3)])
    split = helper.make_node("Split", ["x", "sizes"], ["p", "q"], axis=3)  # 7 columns -> 2, 5
    return _model([split, helper.make_node("Concat", ["q", "p"], ["y"], axis=3)], [_ints("sizes", [2, 5])])


def _constants():
    half = helper.make_node("Constant", [], ["half"], value_float=0.5)
    shape = helper.make_node("Constant", [], ["shape"], value_ints=[1, 3, 35])
    return _model([half, shape, helper.make_node("Mul", ["x", "half"], ["m"]),
                   helper.make_node("Reshape", ["m", "shape"], ["y"])])


def _transpose():  # no perm: the axes reversed, then reversed back with Mul in between
    return _model([helper.make_node("Transpose", ["x"], ["t"]), helper.make_node("Sigmoid", ["t"], ["s"]),
                   helper.make_node("Transpose", ["s"], ["y"])])


def _slice_steps():
    return _model([helper.make_node("Slice", ["x", "starts", "ends", "axes", "steps"], ["y"])],
                  [_ints("starts", [0, 1]), _ints("ends", [5, 7]), _ints("axes", [2, 3]), _ints("steps", [2, 3])])


@pytest.mark.parametrize("make", [_pad_with_axes, lambda: _split(True), lambda: _split(False), _constants, _transpose,
                                  _slice_steps], ids=["pad-axes", "split-uneven", "split-sizes", "constant-values",
                                                      "transpose-no-perm", "slice-steps"])
def test_other_op_variants(make):
    _agrees(make(), atol=1e-6)


@pytest.mark.parametrize("starts, ends, steps", [([-1], [-100], [-1]), ([5], [0], [-2]), ([-2], [-9223372036854775807], [-1]),
                                                 ([100], [1], [-3])])
def test_negative_slice_steps(starts, ends, steps):  # torch's replicate padding exports one (the pads reversed)
    node = helper.make_node("Slice", ["x", "starts", "ends", "axes", "steps"], ["y"])
    _agrees(_model([node], [_ints("starts", starts), _ints("ends", ends), _ints("axes", [3]),
                            _ints("steps", steps)]), atol=0.0)


def test_a_slice_step_of_zero_is_refused_when_the_module_is_built():
    node = helper.make_node("Slice", ["x", "starts", "ends", "axes", "steps"], ["y"])
    model = _model([node], [_ints("starts", [0]), _ints("ends", [3]), _ints("axes", [3]), _ints("steps", [0])])
    with pytest.raises(ValueError, match="step of 0"):
        OnnxModule(model)


def _pools():  # max with uneven pads and ceil mode, average without the pads counted: shapes back by Resize
    maximum = helper.make_node("MaxPool", ["x"], ["m"], kernel_shape=[3, 3], strides=[2, 2], pads=[0, 0, 1, 1],
                               ceil_mode=1)
    average = helper.make_node("AveragePool", ["m"], ["a"], kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    return _model([maximum, average, helper.make_node("GlobalAveragePool", ["a"], ["g"]),
                   helper.make_node("Mul", ["a", "g"], ["y"])])


def _attention():  # SwinIR-like: LayerNorm over channels (last axis), Q K^T, Softmax, GELU (as Erf and opset 20)
    nodes = [helper.make_node("Transpose", ["x"], ["t"], perm=[0, 2, 3, 1]),  # 1 5 7 3
             helper.make_node("Reshape", ["t", "tokens"], ["s"]),  # 1 35 3
             helper.make_node("LayerNormalization", ["s", "gamma", "beta"], ["n"], axis=-1, epsilon=1e-5),
             helper.make_node("MatMul", ["n", "wq"], ["q"]),
             helper.make_node("Transpose", ["q"], ["qt"], perm=[0, 2, 1]),
             helper.make_node("MatMul", ["q", "qt"], ["scores"]),
             helper.make_node("Softmax", ["scores"], ["p"], axis=-1),
             helper.make_node("MatMul", ["p", "n"], ["o"]),
             helper.make_node("Div", ["o", "root2"], ["half"]), helper.make_node("Erf", ["half"], ["e"]),
             helper.make_node("Add", ["e", "one"], ["e1"]), helper.make_node("Mul", ["o", "e1"], ["g2"]),
             helper.make_node("Gelu", ["g2"], ["g"], approximate="tanh"),
             helper.make_node("ReduceMean", ["g", "last"], ["mean"], keepdims=1),
             helper.make_node("Sub", ["g", "mean"], ["c"]), helper.make_node("Pow", ["c", "two"], ["sq"]),
             helper.make_node("Sqrt", ["sq"], ["r"]), helper.make_node("Neg", ["r"], ["y"])]
    rng = np.random.default_rng(1)
    return _model(nodes, [_ints("tokens", [1, 35, 3]), _floats("gamma", rng.random(3) + 0.5),
                          _floats("beta", rng.random(3)), _floats("wq", rng.normal(size=(3, 3))),
                          _floats("root2", [2 ** 0.5]), _floats("one", [1.0]), _ints("last", [-1]),
                          _floats("two", [2.0])], opset=20)


def _l2_normalize():  # F.normalize as exported: ReduceL2 (axes an attribute; from opset 18 an input), Clip, Expand, Div
    def model(opset: int) -> onnx.ModelProto:
        axes = {"axes": [-1]} if opset < 18 else {}
        nodes = [helper.make_node("ReduceL2", ["x"] if opset < 18 else ["x", "last"], ["norm"], keepdims=1, **axes),
                 helper.make_node("Clip", ["norm", "eps"], ["floor"]),
                 helper.make_node("Expand", ["floor", "shape"], ["wide"]),
                 helper.make_node("Div", ["x", "wide"], ["y"])]
        return _model(nodes, [_floats("eps", [1e-12]), _ints("shape", [1, 3, 5, 7]), _ints("last", [-1])], opset=opset)
    return model(17), model(18)


def _shape_ops():  # an exporter's int64 shape arithmetic: Shape, Gather, Cast, Unsqueeze, Squeeze, Tile, Expand,
    # ConstantOfShape
    nodes = [helper.make_node("Shape", ["x"], ["shape"]),
             helper.make_node("Gather", ["shape", "axis"], ["width"], axis=0),
             helper.make_node("Cast", ["width"], ["wf"], to=TensorProto.FLOAT),
             helper.make_node("Unsqueeze", ["wf", "zero"], ["w1"]),
             helper.make_node("Squeeze", ["w1", "zero"], ["w0"]),
             helper.make_node("Div", ["x", "w0"], ["scaled"]),
             helper.make_node("Tile", ["scaled", "repeats"], ["tiled"]),
             helper.make_node("Expand", ["bias", "shape"], ["b"]),
             helper.make_node("Add", ["tiled", "b2"], ["t2"]),
             helper.make_node("Flatten", ["t2"], ["flat"], axis=1),
             helper.make_node("Reshape", ["flat", "back"], ["r"]),
             helper.make_node("Abs", ["r"], ["a"]),
             helper.make_node("ConstantOfShape", ["ones_shape"], ["ones"],
                              value=numpy_helper.from_array(np.array([1.0], np.float32))),
             helper.make_node("Mul", ["a", "ones"], ["a1"]), helper.make_node("Concat", ["a1", "b"], ["y"], axis=1)]
    return _model(nodes, [_ints("axis", [3]), _ints("zero", [0]), _ints("repeats", [1, 2, 1, 1]),
                          _floats("bias", np.zeros((1, 1, 1, 1)) + 0.25), _floats("b2", [0.5]),
                          _ints("back", [1, 6, 5, 7]), _ints("ones_shape", [1, 1, 1, 7])])


@pytest.mark.parametrize("make", [_pools, _attention, _shape_ops], ids=["pools", "attention", "shape-ops"])
def test_ops_of_modern_and_exported_graphs(make):
    _agrees(make(), atol=1e-5)


def test_an_exported_l2_normalization_runs_as_onnx_runtime_runs_it():
    for model in _l2_normalize():
        _agrees(model, atol=1e-5)
    x = torch.zeros(1, 3, 5, 7, requires_grad=True)  # a row that is all zero (a flat patch, fake-quantized)
    OnnxModule(_l2_normalize()[0])(x).sum().backward()
    assert torch.isfinite(x.grad).all()


def test_the_constants_move_with_the_module():
    """`.to()` / `.double()` carry a graph's Constant-node values along with its parameters (a teacher or reference
    moved to the GPU keeps working)."""
    add = helper.make_node("Add", ["x", "c"], ["y"])
    const = helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(np.ones((1,), np.float32)))
    graph = helper.make_graph([const, add], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    module = OnnxModule(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])).double()
    assert module.constants["c"].dtype == torch.float64
    assert module(torch.zeros(1, dtype=torch.float64)).dtype == torch.float64
