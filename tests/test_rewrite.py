"""sr.quant.rewrite: the graph rewrites that put every Conv on ONNX Runtime's fast INT8 kernel, outputs unchanged."""
from collections import Counter

import onnx
from onnx import numpy_helper

from sr.quant.calibrate import CalibrationConfig
from sr.run.quantize import calibrate_model


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
