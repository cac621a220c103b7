"""INT8 as an NPU runs it: the `npu` scheme follows LiteRT's 8-bit quantization specification (asymmetric INT8
activations, symmetric per-channel weights, INT32 biases at s_input x s_weight, a Concat's inputs on its output's
grid), read back from the written QDQ file; and Qualcomm's own HTP arithmetic (`onnxruntime-qnn`'s x86
`libQnnHtp.so`) runs the lab's models and is checked against the reference like every other engine."""
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from sr.quant.calibrate import CalibrationConfig
from sr.run.conformance import NPU_TOLERANCE, conformance, probe_image
from sr.run.npu import qnn_available
from sr.quant.qdq import spec_of
from sr.run.quantize import calibrate_model
from sr.quant.quantspec import LITERT_FIXED_OUTPUT, activation_qparams, quant_spec, weight_int8
from sr.quant.readback import graph_quantization
from sr.run.runtime import EngineKind, create_engine, reference_engine

ENTROPY = CalibrationConfig(method="entropy", samples=20)


def _concat_graph() -> onnx.ModelProto:
    """x -> Conv -> Relu -> a; x -> Conv -> b; Concat(a, b) -> Conv -> y."""
    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.standard_normal((16, 3, 3, 3)).astype(np.float32), "w0"),
               numpy_helper.from_array(rng.standard_normal((16, 3, 3, 3)).astype(np.float32), "w1"),
               numpy_helper.from_array(rng.standard_normal((3, 32, 3, 3)).astype(np.float32), "w2")]
    nodes = [helper.make_node("Conv", ["x", "w0"], ["c0"], name="c0", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c0"], ["a"], name="relu"),
             helper.make_node("Conv", ["x", "w1"], ["b"], name="c1", pads=[1, 1, 1, 1]),
             helper.make_node("Concat", ["a", "b"], ["cat"], name="cat", axis=1),
             helper.make_node("Conv", ["cat", "w2"], ["y"], name="c2", pads=[1, 1, 1, 1])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 8, 8])], weights)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_litert_ties_a_concats_inputs_to_its_output_and_what_was_tied_to_them():
    model = _concat_graph()
    npu = quant_spec(model, "npu")
    assert {npu.activations[t].group for t in ("c0", "a", "b", "cat")} == {"cat"}  # c0 -> a -> cat, chained
    assert all(a.signed and not a.symmetric and (a.qmin, a.qmax) == (-128, 127) for a in npu.activations.values())
    assert not npu.float_bias
    symmetric = quant_spec(model, "npu-symmetric")
    assert symmetric.activations["b"].group == "b" and symmetric.activations["c0"].group == "a"
    assert all(a.symmetric and (a.qmin, a.qmax) == (-127, 127) for a in symmetric.activations.values())
    assert symmetric.float_bias


@pytest.mark.parametrize("model", ["xlsr-clip", "xlsr-relu"])
def test_the_written_npu_model_follows_the_litert_specification(model):
    """Read back from the file: activations INT8 with a zero point (the [0, 1] input on all 256 levels), the
    Concat's inputs on its output's grid, weights symmetric INT8 per channel, every Conv bias INT32 at exactly
    s_input x s_weight with zero point 0."""
    int8 = calibrate_model(model, ENTROPY, "npu")
    fp32, qdq = onnx.load(str(int8.fp32_onnx)), onnx.load(str(int8.qdq_onnx))
    found = graph_quantization(qdq, fp32)
    arrays = {i.name: numpy_helper.to_array(i) for i in qdq.graph.initializer}
    assert found.activations["input"] == (pytest.approx(1 / 255), -128)  # a pixel is one level
    assert any(zero != 0 for _, zero in found.activations.values())
    concats = [n for n in fp32.graph.node if n.op_type == "Concat"]
    assert concats
    for node in concats:
        assert len({found.activations[t] for t in [*node.input, node.output[0]]}) == 1, node.name
    assert found.weights and all(axis == 0 for axis in found.weights.values())
    fp32_arrays = {i.name: numpy_helper.to_array(i) for i in fp32.graph.initializer}
    dq = {n.output[0]: n for n in qdq.graph.node if n.op_type == "DequantizeLinear"}
    convs = [n for n in qdq.graph.node if n.op_type == "Conv"]
    for conv in convs:
        bias = dq[conv.input[2]]
        assert arrays[bias.input[0]].dtype == np.int32 and not arrays[bias.input[2]].any(), conv.name
        source = next(n for n in qdq.graph.node if n.output[0] == conv.input[0])  # the input's DequantizeLinear
        input_step = float(arrays[source.input[1]])
        weight = fp32_arrays[next(n for n in fp32.graph.node if n.name == conv.name).input[1]]
        expected = (np.float32(input_step) * weight_int8(weight, 0)[1]).astype(np.float32)
        np.testing.assert_array_equal(arrays[bias.input[1]], expected)
        fp32_bias = fp32_arrays[next(n for n in fp32.graph.node if n.name == conv.name).input[2]]
        assert np.abs(arrays[bias.input[0]] * expected - fp32_bias).max() <= expected.max() / 2 + 1e-9


def test_npu_reaches_white_where_the_symmetric_grid_cannot():
    """The issue's case: xlsr-clip's output on a symmetric grid tops out below 1.0 (its mse range is under 1),
    so white cannot come out white; LiteRT's asymmetric grid spends all 256 levels on [low, high] and does."""
    white = np.full((24, 24, 3), 255, np.uint8)
    shown = {}
    for scheme in ("npu", "npu-symmetric"):
        int8 = calibrate_model("xlsr-clip", CalibrationConfig(method="mse", samples=20), scheme)
        spec = spec_of(int8.fp32_onnx, scheme)
        output = onnx.load(str(int8.fp32_onnx)).graph.output[0].name
        r = int8.ranges[spec.activations[output].group]
        step, zero = activation_qparams(spec.activations[output], r.low, r.high)
        shown[scheme] = (spec.activations[output].qmax - zero) * step  # the largest value the grid holds
        if scheme == "npu":
            assert reference_engine("xlsr-clip", int8).run(white).max() == 255
    print(shown)
    assert shown["npu"] >= 254.5 / 255 > shown["npu-symmetric"]


needs_qnn = pytest.mark.skipif(not qnn_available(), reason="onnxruntime-qnn is in requirements.txt")


@needs_qnn
@pytest.mark.parametrize("arch", ["68", "73", "81"])
def test_the_hexagon_npu_runs_the_npu_model_whole_and_agrees_within_its_tolerance(arch):
    """Qualcomm's HTP simulation, CPU fallback off: the LiteRT-spec model runs whole, agrees with the reference
    within NPU_TOLERANCE, and closer than the symmetric model does (the zero point and the INT32 biases are
    what the NPU runs)."""
    verdicts = {}
    for scheme in ("npu", "npu-symmetric"):
        int8 = calibrate_model("xlsr-clip", ENTROPY, scheme)
        engine = create_engine(EngineKind.QNN_HTP, "xlsr-clip", int8, htp_arch=arch)
        assert engine.name == f"qnn-htp-{scheme}-v{arch}" and engine.conformance.passed
        verdicts[scheme] = conformance(engine, reference_engine("xlsr-clip", int8), NPU_TOLERANCE,
                                       probe=probe_image(40, 52, seed=3))
        assert 0 < verdicts[scheme].mean_levels <= NPU_TOLERANCE.mean_levels  # its own rounding: never identical
    assert verdicts["npu"].mean_levels < verdicts["npu-symmetric"].mean_levels
    assert verdicts["npu"].max_levels < verdicts["npu-symmetric"].max_levels


@needs_qnn
def test_a_graph_the_npu_cannot_run_whole_is_refused_in_words():
    int8 = calibrate_model("xlsr-clip", ENTROPY, "tensorrt")  # Q/DQ on Conv inputs only: ReLU, Concat in float
    with pytest.raises(ValueError, match="cannot run all of .*use npu"):
        create_engine(EngineKind.QNN_HTP, "xlsr-clip", int8)
    with pytest.raises(ValueError, match="unknown HTP generation"):
        create_engine(EngineKind.QNN_HTP, "xlsr-clip", calibrate_model("xlsr-clip", ENTROPY, "npu"), htp_arch="99")


@needs_qnn
def test_eval_on_the_npu_from_the_command_line(capfd, data_dir):
    """`eval --engine qnn-htp --scheme npu --json`: the NPU's figures and its agreement, JSON alone on stdout
    (libQnnHtp's banner goes to stderr)."""
    import json

    from sr import cli

    code = cli.main(["eval", "--model", "xlsr-clip", "--data", str(data_dir / "Set5"), "--engine", "qnn-htp",
                     "--scheme", "npu", "--method", "entropy", "--samples", "20", "--htp-arch", "75", "--json"])
    out = capfd.readouterr().out  # file descriptor 1 itself: a native library's print would land here
    assert code == 0
    report = json.loads(out)
    assert report["engine_name"] == "qnn-htp-npu-v75" and report["conformance"]["passed"]
    assert abs(report["fp32_mean"]["psnr_y"] - report["int8_mean"]["psnr_y"]) < 0.5
    assert "LIBNATIVE" not in out


@needs_qnn
def test_the_diagnosis_scores_the_whole_int8_model_as_the_npu_runs_it(capfd, data_dir):
    """`diagnose --engine qnn-htp`: the all-INT8 figures as the HTP runs the model too (its engine checked first),
    said in the paragraph and in the JSON; a scheme the HTP cannot run whole is said, not scored."""
    import json

    from sr import cli
    from sr.lab.diagnose import DiagnoseConfig, diagnose

    common = ["diagnose", "--model", "xlsr-clip", "--data", str(data_dir / "Set5"), "--method", "entropy",
              "--samples", "20", "--max-side", "40", "--top", "2", "--engine", "qnn-htp"]
    assert cli.main([*common, "--scheme", "npu", "--json"]) == 0
    report = json.loads(capfd.readouterr().out)
    target = report["target"]
    assert target["engine"] == "qnn-htp-npu-v73" and target["refused"] is None
    assert abs(target["psnr_y"] - report["int8_psnr_y"]) < 0.3 and target["psnr_vs_fp32_db"] > 40
    assert cli.main([*common, "--scheme", "npu"]) == 0
    assert "As qnn-htp-npu-v73 runs it: " in capfd.readouterr().out
    with pytest.raises(ValueError, match="qnn-htp cannot run the tensorrt scheme whole"):
        DiagnoseConfig("xlsr-clip", ENTROPY, "tensorrt", engine="qnn-htp")  # said before any work
    with pytest.raises(ValueError, match="not an INT8 target"):
        DiagnoseConfig("xlsr-clip", engine="ort")


def test_a_target_that_fails_in_any_way_is_said_not_raised(data_dir, monkeypatch):
    """Whatever a target's engine raises (not installed, no device, a size it cannot compile), the diagnosis it
    comes last in keeps its ranking and says why the target gave no figures."""
    from sr.lab import scorer
    from sr.lab.diagnose import DiagnoseConfig, diagnose

    def no_device(*args, **kwargs):
        raise RuntimeError("no CUDA device is available")

    monkeypatch.setattr(scorer, "create_engine", no_device)
    report = diagnose(DiagnoseConfig("xlsr-clip", ENTROPY, "npu", str(data_dir / "Set5"), top=1, max_side=40,
                                     engine="tensorrt"))
    assert report.ranking and report.target.psnr_y is None and report.target.refused == "no CUDA device is available"
    assert "tensorrt did not run it: no CUDA device is available." in report.paragraph()


@needs_qnn
def test_int8_ready_judges_the_choice_as_the_npu_runs_it(data_dir):
    """`int8-ready --engine qnn-htp`: no mixed-precision route (the HTP runs no float tensor), the chosen model
    scored as the HTP runs it and the target judged on that loss; a target that refuses the model is not met."""
    from sr.lab.ready import ReadyConfig, make_ready

    result = make_ready(ReadyConfig("xlsr-clip", str(data_dir / "Set5"), target_db=0.2, budget_minutes=2,
                                    calibration=ENTROPY, scheme="npu", engine="qnn-htp", qat=False))
    assert "mixed precision" not in [step.route for step in result.steps]
    assert any("mixed precision left out" in note for note in result.steps[0].notes)
    assert result.target.engine == "qnn-htp-npu-v73" and result.target.refused is None
    assert abs(result.target_loss_db - result.loss_db) < 0.1
    assert result.met == (result.target_loss_db <= 0.2) and result.to_json()["target"]["loss_db"] == result.target_loss_db
    with pytest.raises(ValueError, match="litert cannot run the tensorrt scheme whole"):
        ReadyConfig("xlsr-clip", scheme="tensorrt", engine="litert")  # said before the search, not after it


# ---------------------------------------------------------------------------------------------------------------
# The .tflite the lab writes, in LiteRT's own interpreter.

needs_litert = pytest.mark.skipif(not __import__("sr.run.npu", fromlist=["x"]).litert_available(),
                                  reason="ai-edge-litert is in requirements.txt")


def _tflite(model: str, method: str = "entropy"):
    from ai_edge_litert import schema_py_generated as schema

    from sr.run.runtime import tflite_model

    int8 = calibrate_model(model, CalibrationConfig(method=method, samples=20), "npu")
    path = tflite_model(int8)
    return int8, schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(path.read_bytes(), 0)), schema


@needs_litert
@pytest.mark.parametrize("model", ["xlsr-clip", "xlsr-relu", "teacher"])
def test_the_tflite_holds_the_labs_scales_and_integer_ops_only(model):
    """Read back from the flatbuffer: an INT8 image in and out (a pixel is one level), every tensor INT8 but the
    INT32 biases, one CONV_2D per ONNX Conv (the grouped ones too), DEPTH_TO_SPACE with no GATHER, and each
    activation's scale and zero point exactly the QDQ model's."""
    int8, flat, schema = _tflite(model)
    graph = flat.subgraphs[0]
    codes = [flat.operatorCodes[op.opcodeIndex].builtinCode for op in graph.operators]
    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    ops = [names[c] for c in codes]
    fp32 = onnx.load(str(int8.fp32_onnx))
    assert ops.count("CONV_2D") + ops.count("DEPTHWISE_CONV_2D") == sum(n.op_type == "Conv" for n in fp32.graph.node)
    assert "GATHER" not in ops and ops.count("DEPTH_TO_SPACE") == 1
    for index in (graph.inputs[0], graph.outputs[0]):
        tensor = graph.tensors[index]
        assert tensor.type == schema.TensorType.INT8 and list(tensor.shapeSignature) == [1, -1, -1, 3]
        assert tensor.quantization.scale[0] == pytest.approx(1 / 255) and tensor.quantization.zeroPoint[0] == -128
    assert {t.type for t in graph.tensors} == {schema.TensorType.INT8, schema.TensorType.INT32}
    written = graph_quantization(onnx.load(str(int8.qdq_onnx)), fp32).activations
    for tensor in graph.tensors:
        name = tensor.name.decode() if isinstance(tensor.name, bytes) else tensor.name
        if name in written:
            assert (np.float32(tensor.quantization.scale[0]), tensor.quantization.zeroPoint[0]) == \
                (np.float32(written[name][0]), written[name][1]), name


@needs_litert
@pytest.mark.parametrize("model", ["xlsr-clip", "xlsr-relu", "teacher", "xlsr-clip-kd", "xlsr-clip-qat", "xlsr-relu-qat"])
def test_litert_runs_the_tflite_within_two_levels_on_xnnpack_and_its_tolerance_on_the_reference_kernels(model):
    int8 = calibrate_model(model, ENTROPY, "npu")
    probe = probe_image(52, 60, seed=5)
    expected = reference_engine(model, int8).run(probe).astype(np.int16)
    xnnpack = create_engine(EngineKind.LITERT, model, int8)
    difference = np.abs(xnnpack.run(probe).astype(np.int16) - expected)
    if model == "teacher":  # 13 residual ADDs, each rescaling its two inputs in fixed point
        assert difference.mean() <= 1.0 and np.percentile(difference, 99.9) <= 4 and difference.max() <= 6
    else:  # CONV_2D, CONCATENATION, DEPTH_TO_SPACE: XNNPACK requantizes as the reference does, near ties aside
        assert difference.mean() <= 0.05 and np.percentile(difference, 99.9) <= 2 and difference.max() <= 5
    kernels = create_engine(EngineKind.LITERT_REF, model, int8)
    assert 0 < kernels.conformance.mean_levels <= NPU_TOLERANCE.mean_levels  # the reference kernels round ties up
    big = probe_image(600, 40, seed=7)  # taller than one tile: seamless tiles, as the reference runs it
    assert np.abs(xnnpack.run(big).astype(np.int16) - reference_engine(model, int8).run(big)).mean() < 0.6


@needs_litert
def test_what_the_tflite_writer_cannot_express_is_refused_naming_it(tmp_path):
    from sr.run.runtime import tflite_model
    from sr.run.tflite import tflite_bytes
    from sr.run.tflitefile import TfliteUnsupported
    from sr.quant.searches import TensorRange

    with pytest.raises(TfliteUnsupported, match="npu or npu-per-tensor scheme, not tensorrt"):
        tflite_model(calibrate_model("xlsr-clip", ENTROPY, "tensorrt"))
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["x", "w"], ["a"], name="c", pads=[1, 1, 1, 1]),
             helper.make_node("Erf", ["a"], ["s"], name="gate"),
             helper.make_node("Conv", ["s", "w2"], ["y"], name="c2", pads=[1, 1, 1, 1])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "w"),
                               numpy_helper.from_array(rng.standard_normal((3, 8, 3, 3)).astype(np.float32), "w2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    spec = quant_spec(model, "npu")
    ranges = {t: TensorRange(t, -1.0, 1.0, -1.0, 1.0, 0.0, "fixed") for t in spec.activations}
    with pytest.raises(TfliteUnsupported, match="cannot express Erf \\('gate'\\)"):
        tflite_bytes(model, spec, ranges)


@needs_litert
def test_a_reshape_that_would_mix_the_stored_dimensions_is_refused_naming_it():
    """The .tflite stores an NCHW image as NHWC: a Reshape merging C with H (not together in that order) cannot be
    one RESHAPE, and is refused in words naming it; merging H with W (together) is written. (A fixed-size graph
    with baked shapes: its sizes are read at its own size.)"""
    from sr.quant.searches import TensorRange
    from sr.run.tflite import tflite_bytes
    from sr.run.tflitefile import TfliteUnsupported

    rng = np.random.default_rng(0)

    def model(shape: list[int]) -> onnx.ModelProto:
        nodes = [helper.make_node("Conv", ["x", "w"], ["a"], name="c", pads=[1, 1, 1, 1]),
                 helper.make_node("Reshape", ["a", "flat"], ["t"], name="fold"),
                 helper.make_node("Reshape", ["t", "back"], ["b"], name="unfold"),
                 helper.make_node("Conv", ["b", "w2"], ["y"], name="c2", pads=[1, 1, 1, 1])]
        graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 8, 8])],
                                  [numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w"),
                                   numpy_helper.from_array(rng.standard_normal((3, 4, 3, 3)).astype(np.float32), "w2"),
                                   numpy_helper.from_array(np.array(shape, np.int64), "flat"),
                                   numpy_helper.from_array(np.array([1, 4, 8, 8], np.int64), "back")])
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])

    for shape, written in (([1, 4, 64], True), ([1, 32, 8], False)):
        spec = quant_spec(model(shape), "npu")
        ranges = {t: TensorRange(t, -1.0, 1.0, -1.0, 1.0, 0.0, "fixed") for t in spec.activations}
        if written:
            assert tflite_bytes(model(shape), spec, ranges)
        else:
            with pytest.raises(TfliteUnsupported, match="Reshape 'fold'"):
                tflite_bytes(model(shape), spec, ranges)


def _written_against_fp32(model: onnx.ModelProto, image: np.ndarray) -> tuple[np.ndarray, np.ndarray, bytes]:
    """(the .tflite's output, the FP32 graph's, the file) on `image` (NCHW, [0, 1]): the file written with the
    FP32 graph's own min / max on that image as its ranges (LiteRT's fixed grids where it has them)."""
    import onnxruntime as ort
    from ai_edge_litert.interpreter import Interpreter, OpResolverType
    from sr.quant.qdq import tie_fused_ranges
    from sr.quant.quantspec import litert_fixed_outputs
    from sr.quant.searches import TensorRange
    from sr.run.tflite import tflite_bytes

    spec = quant_spec(model, "npu")
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.extend(helper.make_empty_tensor_value_info(t) for t in spec.activations if t != "y")
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    values = dict(zip([o.name for o in session.get_outputs()], session.run(None, {"x": image})))
    values["x"] = image
    fixed = litert_fixed_outputs(model)
    ranges = {t: TensorRange(t, *fixed.get(t, (float(values[t].min()), float(values[t].max()))), 0.0, 0.0, 0.0,
                             "fixed") for t in spec.activations}
    content = tflite_bytes(model, spec, tie_fused_ranges(spec, ranges))
    interpreter = Interpreter(model_content=content, experimental_op_resolver_type=OpResolverType.BUILTIN_REF)
    nhwc = image.transpose(0, 2, 3, 1)
    interpreter.resize_tensor_input(0, list(nhwc.shape))
    interpreter.allocate_tensors()
    (scale, zero), detail = interpreter.get_input_details()[0]["quantization"], interpreter.get_output_details()[0]
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"],
                           np.clip(np.rint(nhwc / scale) + zero, -128, 127).astype(np.int8))
    interpreter.invoke()
    out_scale, out_zero = detail["quantization"]
    written = (interpreter.get_tensor(detail["index"]).astype(np.float32) - out_zero) * out_scale
    return written.transpose(0, 3, 1, 2), values["y"], content


def _tokens(middle: list, inputs=(), size=(8, 8)) -> onnx.ModelProto:
    """Conv (4 channels) -> tokens [1, 4, H x W] -> `middle` (from "t" to "u", [1, 4, H x W]) -> back -> Conv."""
    rng = np.random.default_rng(4)
    nodes = [helper.make_node("Conv", ["x", "w"], ["a"], name="c", pads=[1, 1, 1, 1]),
             helper.make_node("Reshape", ["a", "flat"], ["t"], name="fold"), *middle,
             helper.make_node("Reshape", ["u", "back"], ["b"], name="unfold"),
             helper.make_node("Conv", ["b", "w2"], ["y"], name="c2", pads=[1, 1, 1, 1])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, *size])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, *size])],
                              [numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w"),
                               numpy_helper.from_array(rng.standard_normal((3, 4, 3, 3)).astype(np.float32), "w2"),
                               numpy_helper.from_array(np.array([1, 4, size[0] * size[1]], np.int64), "flat"),
                               numpy_helper.from_array(np.array([1, 4, *size], np.int64), "back"), *inputs])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@needs_litert
@pytest.mark.parametrize("axis", [1, 2])
def test_a_softmax_along_a_dimension_stored_elsewhere_is_written_along_it(axis):
    """Softmax over the channels of [1, H x W, C] tokens (stored last) or over the pixels (stored elsewhere: a
    TRANSPOSE moves that dimension last first): the file computes the graph's function, to INT8's error."""
    middle = [helper.make_node("Transpose", ["t"], ["s"], perm=[0, 2, 1]),
              helper.make_node("Softmax", ["s"], ["p"], axis=axis),
              helper.make_node("Transpose", ["p"], ["u"], perm=[0, 2, 1])]
    image = np.random.default_rng(5).random((1, 3, 8, 8), dtype=np.float32)
    written, fp32, _ = _written_against_fp32(_tokens(middle), image)
    assert np.abs(written - fp32).max() < 0.1 * np.abs(fp32).max()


@needs_litert
def test_divisions_litert_cannot_do_in_int8_are_refused_and_slices_follow_the_size():
    """A Div of two activations is refused naming it (it used to be written as a MUL); a Slice ending at -1 on
    a dimension the image's size decides is written as -1, not as the probe's size less one."""
    from sr.run.tflite import tflite_bytes
    from sr.run.tflitefile import TfliteUnsupported
    from sr.quant.searches import TensorRange

    middle = [helper.make_node("Div", ["t", "t"], ["u"], name="ratio")]
    model = _tokens(middle)
    spec = quant_spec(model, "npu")
    with pytest.raises(TfliteUnsupported, match="Div 'ratio'"):
        tflite_bytes(model, spec, {t: TensorRange(t, -1.0, 1.0, -1.0, 1.0, 0.0, "fixed") for t in spec.activations})
    rng = np.random.default_rng(6)
    nodes = [helper.make_node("Conv", ["x", "w"], ["a"], pads=[1, 1, 1, 1]),
             helper.make_node("Slice", ["a", "zero", "less", "height"], ["s"]),
             helper.make_node("Conv", ["s", "w2"], ["y"], pads=[1, 1, 1, 1])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, "h", "w"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, "H", "w"])],
                              [numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w"),
                               numpy_helper.from_array(rng.standard_normal((3, 4, 3, 3)).astype(np.float32), "w2"),
                               numpy_helper.from_array(np.array([0], np.int64), "zero"),
                               numpy_helper.from_array(np.array([-1], np.int64), "less"),
                               numpy_helper.from_array(np.array([2], np.int64), "height")])
    image = np.random.default_rng(7).random((1, 3, 20, 12), dtype=np.float32)
    written, fp32, _ = _written_against_fp32(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]),
                                             image)
    assert written.shape == fp32.shape == (1, 3, 19, 12)


def test_only_an_l2_normalization_is_taken_for_one():
    """ReduceL2 -> Clip(eps) -> Expand -> Div is one L2 norm; with a Clip that also caps the norm it is not."""
    from sr.graph import GraphIndex, l2norm_units
    from sr.quant.quantspec import constant_arrays

    for top, found in (("", 1), ("one", 0)):
        nodes = [helper.make_node("ReduceL2", ["x"], ["n"], axes=[-1], keepdims=1),
                 helper.make_node("Clip", ["n", "eps", top], ["f"]),
                 helper.make_node("Expand", ["f", "shape"], ["e"]), helper.make_node("Div", ["x", "e"], ["y"])]
        graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8])],
                                  [numpy_helper.from_array(np.array(1e-12, np.float32), "eps"),
                                   numpy_helper.from_array(np.array(1.0, np.float32), "one"),
                                   numpy_helper.from_array(np.array([1, 4, 8], np.int64), "shape")])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        assert len(l2norm_units(GraphIndex(model), constant_arrays(model))) == found


@needs_litert
def test_the_bundle_ships_the_tflite_and_says_what_each_runtime_gave(tmp_path):
    from sr.lab.bundle import export_bundle

    (tmp_path / "calibration.cache").write_text("a stale cache of another model")
    bundle = export_bundle("xlsr-clip", ENTROPY, tmp_path)
    assert "model.tflite" in bundle.files and "calibration.cache" not in bundle.files
    readme = (tmp_path / "README.md").read_text()
    assert "`model.tflite` on LiteRT, XNNPACK:" in readme and "TFLite's reference kernels:" in readme
    if qnn_available():
        assert "qnn-htp-npu-v73" in readme
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(tmp_path / "model.tflite"))
    interpreter.resize_tensor_input(0, [1, 20, 30, 3])
    interpreter.allocate_tensors()
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], np.full((1, 20, 30, 3), 127, np.int8))
    interpreter.invoke()
    out = interpreter.get_tensor(interpreter.get_output_details()[0]["index"])
    assert out.shape == (1, 60, 90, 3) and out.dtype == np.int8 and out[0, 20:40, 30:60].min() >= 120  # white


HTP_FAMILIES = ["fsrcnn", "vdsr", "espcn", "rlfn", "rrdb", "waifu2x"]


@pytest.mark.parametrize("family", HTP_FAMILIES)
def test_the_npu_spec_quantizes_every_tensor_of_the_families_with_litert_constraints(family, families):
    """LiteRT's specification covers each family's ops (LeakyRelu, PRelu, Sigmoid, Tanh, Mul, Sub, MaxPool,
    Resize, Pad, ConvTranspose, reshapes): no float activation is left in the user's graph; pooling, resizing,
    padding and reshapes keep their input's grid; a constant operand is an INT8 weight; Sigmoid and Tanh outputs
    are written on the specification's fixed grids."""
    from sr.quant.quantspec import _GraphFacts

    int8 = calibrate_model(families[family].name, CalibrationConfig(method="minmax", samples=10), "npu")
    fp32 = onnx.load(str(int8.fp32_onnx))
    spec = quant_spec(fp32, "npu")
    facts = _GraphFacts.of(fp32)
    left = [t for n in facts.user_nodes for t in n.output if facts.activation(t) and t not in spec.activations]
    assert left == []
    written = graph_quantization(onnx.load(str(int8.qdq_onnx)), fp32).activations
    for node in facts.user_nodes:
        out = node.output[0]
        if node.op_type in ("MaxPool", "Resize", "Pad", "Reshape", "Transpose", "DepthToSpace") and out in written:
            assert written[out] == written[node.input[0]], node.name
        if node.op_type in LITERT_FIXED_OUTPUT and out in written:
            low, high = LITERT_FIXED_OUTPUT[node.op_type]
            assert np.allclose(written[out], (1 / 256, -128) if low == 0 else (1 / 128, 0)), node.name
        for name in node.input[1:]:
            if node.op_type in ("Mul", "Sub", "PRelu") and facts.arrays.get(name, np.int64(0)).dtype == np.float32:
                assert spec.weights[name].axis is None  # one scale: LiteRT's element-wise operand


@needs_qnn
@pytest.mark.parametrize("family", HTP_FAMILIES)
def test_the_hexagon_npu_runs_every_family_whole_within_its_tolerance(family, families):
    """The families' `npu` models run whole on the HTP (CPU fallback off) and agree with the reference within
    NPU_TOLERANCE; a LeakyRelu reaches it as a PRelu on an INT8 slope and the lab's size wrapper as INT8 moves."""
    int8 = calibrate_model(families[family].name, CalibrationConfig(method="minmax", samples=10), "npu")
    engine = create_engine(EngineKind.QNN_HTP, families[family].name, int8)
    assert engine.conformance.passed, engine.conformance
    verdict = conformance(engine, reference_engine(families[family].name, int8), NPU_TOLERANCE,
                          probe=probe_image(36, 44, seed=5))
    assert verdict.passed, verdict  # (a nearly linear family, vdsr, can agree exactly on a small probe)


def test_the_htp_lowerings_change_no_number(families):
    """LeakyRelu as PRelu on an INT8 slope, and the image quantized at the graph's edge before the lab's pad and
    after its crop: ONNX Runtime's CPU gives the same output for the lowered graph as for the written one."""
    import onnxruntime as ort
    from sr.run.npu import prelu_for_htp, quantized_moves

    int8 = calibrate_model(families["rlfn"].name, CalibrationConfig(method="minmax", samples=10), "npu")
    written = onnx.load(str(int8.qdq_onnx))
    lowered = quantized_moves(prelu_for_htp(written))
    assert "LeakyRelu" not in {n.op_type for n in lowered.graph.node}
    assert sum(n.op_type == "QuantizeLinear" for n in lowered.graph.node) == \
        sum(n.op_type == "QuantizeLinear" for n in written.graph.node) + 2  # one at each edge
    image = np.random.default_rng(1).random((1, 3, 20, 22), dtype=np.float32)  # padded up by the wrapper
    outputs = []
    for model in (written, lowered):
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        outputs.append(session.run(None, {session.get_inputs()[0].name: image})[0])
    assert outputs[0].shape == outputs[1].shape and np.abs(outputs[0] - outputs[1]).max() < 1e-6


@needs_litert
@pytest.mark.parametrize("family", HTP_FAMILIES)
def test_litert_runs_the_families_tflite_with_their_ops(family, families):
    """LEAKY_RELU, PRELU, LOGISTIC, TANH, MUL, a strided CONV_2D, MAX_POOL_2D, RESIZE_BILINEAR to another tensor's
    size and RESIZE_NEAREST_NEIGHBOR by an integer scale (sizes read at run time: SHAPE, STRIDED_SLICE),
    TRANSPOSE_CONV (SAME, or VALID and cropped), edge padding as repeated rows and columns, CONCATENATION and ADD:
    each family's .tflite (its own graph, NHWC or Y as it takes them, the lab's wrapper run in float around it)
    runs in LiteRT, XNNPACK within its tolerance of the reference and the reference kernels within theirs, images
    of any size."""
    from ai_edge_litert import schema_py_generated as schema
    from sr.run.runtime import tflite_model

    name = families[family].name
    int8 = calibrate_model(name, CalibrationConfig(method="minmax", samples=10), "npu")
    flat = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(tflite_model(int8).read_bytes(), 0))
    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    ops = {names[flat.operatorCodes[op.opcodeIndex].builtinCode] for op in flat.subgraphs[0].operators}
    wanted = {"rlfn": {"LEAKY_RELU", "LOGISTIC", "MUL", "MAX_POOL_2D", "RESIZE_BILINEAR", "SHAPE"},
              "rrdb": {"LEAKY_RELU", "MUL", "RESIZE_NEAREST_NEIGHBOR", "CONCATENATION", "ADD"},
              "fsrcnn": {"PRELU", "TRANSPOSE_CONV"}, "espcn": {"TANH", "DEPTH_TO_SPACE"}, "vdsr": {"ADD"},
              "waifu2x": {"LEAKY_RELU", "TRANSPOSE_CONV", "STRIDED_SLICE", "CONCATENATION"}}[family]
    assert wanted <= ops
    for kind in (EngineKind.LITERT, EngineKind.LITERT_REF):
        engine = create_engine(kind, name, int8)
        assert engine.conformance.passed, engine.conformance
        probe = probe_image(45, 71, seed=9)  # odd sizes: the resizes follow the input
        assert engine.run(probe).shape == reference_engine(name, int8).run(probe).shape


@needs_litert
def test_litert_runs_the_attention_family(families):
    """The SwinIR-like stand-in (Restormer's channel attention) in LiteRT, one file for every size: its token
    layouts as stored tensors (Transposes as no op, RESHAPE with sizes read at run time), FULLY_CONNECTED and
    BATCH_MATMUL, the normalized q and k as L2_NORMALIZATION, SOFTMAX, GELU, the LayerNorms as MEAN, SUB,
    L2_NORMALIZATION, MUL and ADD. Both kernels agree with the reference within the NPU tolerance (the file
    decomposes the LayerNorm the reference runs whole), at the probe's size and another."""
    from ai_edge_litert import schema_py_generated as schema
    from sr.run.runtime import tflite_model

    name = families["swinir-light"].name
    int8 = calibrate_model(name, CalibrationConfig(method="minmax", samples=10), "npu")
    flat = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(tflite_model(int8).read_bytes(), 0))
    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    ops = [names[flat.operatorCodes[op.opcodeIndex].builtinCode] for op in flat.subgraphs[0].operators]
    assert {"FULLY_CONNECTED", "BATCH_MATMUL", "SOFTMAX", "GELU", "MEAN", "RESHAPE"} <= set(ops)
    assert ops.count("L2_NORMALIZATION") == 4  # q and k, and one in each LayerNorm
    assert not set(ops) & {"DEQUANTIZE", "GATHER", "CAST"}
    assert all(t.type in (schema.TensorType.INT8, schema.TensorType.INT32) for t in flat.subgraphs[0].tensors)
    for kind in (EngineKind.LITERT, EngineKind.LITERT_REF):
        engine = create_engine(kind, name, int8)
        assert engine.conformance.passed, engine.conformance
        assert engine.conformance.tolerance == NPU_TOLERANCE and engine.per_size is None
        probe = probe_image(30, 38, seed=4)
        assert np.abs(engine.run(probe).astype(np.float32) -
                      reference_engine(name, int8).run(probe).astype(np.float32)).mean() < NPU_TOLERANCE.mean_levels


@needs_litert
def test_a_float_from_the_images_size_is_written_per_size(size_scaled):
    """An attention scaled by 1 / sqrt(H x W) (a float computed from the size): an exact INT8 constant, so a file
    per size (a SizeDependent refusal without one, naming the op); the engine writes one for each size it runs,
    and agrees with the reference within the NPU tolerance."""
    from sr.run.runtime import tflite_model
    from sr.run.tflite import SizeDependent

    int8 = calibrate_model(size_scaled.name, CalibrationConfig(method="minmax", samples=10), "npu")
    with pytest.raises(SizeDependent, match="Div '/block/Div_1' reads .* computed from the image's size"):
        tflite_model(int8)
    assert tflite_model(int8, (30, 38)).read_bytes() != tflite_model(int8, (31, 38)).read_bytes()
    for kind in (EngineKind.LITERT, EngineKind.LITERT_REF):
        engine = create_engine(kind, size_scaled.name, int8)
        assert engine.conformance.passed, engine.conformance
        probe = probe_image(30, 38, seed=4)
        assert np.abs(engine.run(probe).astype(np.float32) - reference_engine(size_scaled.name, int8).run(
            probe).astype(np.float32)).mean() < NPU_TOLERANCE.mean_levels
        assert (30, 38) in engine.sizes


@needs_litert
def test_a_size_dependent_bundle_ships_the_tflite_for_its_images_size(size_scaled, tmp_path):
    """A graph that computes a float from the image's size ships the .tflite written for the first image's size,
    and says so; that file, loaded as a user would, agrees with the reference within the NPU tolerance."""
    from ai_edge_litert.interpreter import Interpreter
    from sr.lab.bundle import export_bundle

    image = probe_image(26, 34, seed=3)
    bundle = export_bundle(size_scaled.name, CalibrationConfig(method="minmax", samples=10), tmp_path, images=[image])
    assert "model.tflite" in bundle.files
    readme = (tmp_path / "README.md").read_text()
    assert "`model.tflite` is written for 26 x 34 inputs (the first image's, or its first tile's)" in readme
    interpreter = Interpreter(model_path=str(tmp_path / "model.tflite"))
    interpreter.resize_tensor_input(0, [1, 26, 34, 3])
    interpreter.allocate_tensors()
    scale, zero = interpreter.get_input_details()[0]["quantization"]
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"],
                           np.clip(np.rint(image / 255.0 / scale) + zero, -128, 127).astype(np.int8)[None])
    interpreter.invoke()
    detail = interpreter.get_output_details()[0]
    out_scale, out_zero = detail["quantization"]
    made = (interpreter.get_tensor(detail["index"])[0].astype(np.float32) - out_zero) * out_scale * 255.0
    int8 = calibrate_model(size_scaled.name, CalibrationConfig(method="minmax", samples=10), "npu")
    wanted = reference_engine(size_scaled.name, int8).run(image).astype(np.float32)
    assert made.shape == wanted.shape == (52, 68, 3)
    assert np.abs(np.clip(np.rint(made), 0, 255) - wanted).mean() <= NPU_TOLERANCE.mean_levels


@needs_qnn
def test_the_hexagon_npu_runs_the_attention_family_whole(families, size_scaled):
    """The SwinIR-like stand-in reaches the HTP whole: its erf GELU as one Gelu, its normalized q and k as
    LpNormalization (HTP's L2Norm), its LayerNorms on INT8 scales and biases (the spec's); and the old
    size-scaled attention with its 1 / sqrt(H x W) folded to an exact INT8 constant for each compiled size; each
    output checked against the reference like every family's, at another size too."""
    for model in (families["swinir-light"], size_scaled):
        int8 = calibrate_model(model.name, CalibrationConfig(method="minmax", samples=10), "npu")
        engine = create_engine(EngineKind.QNN_HTP, model.name, int8)
        assert engine.conformance.passed, engine.conformance
        assert engine.run(probe_image(30, 38, seed=4)).shape == (60, 76, 3)  # another compiled size


def test_npu_quantizes_an_erf_gelu_and_a_normalize_as_one_op_and_a_layernorm_on_int8_parameters(families):
    """LiteRT's GELU and L2_NORMALIZATION and QNN's Gelu and L2Norm are one INT8 op each: the spec quantizes the
    exported GELU's and F.normalize's input and output and none of their inner tensors or constants (the
    normalized output on LiteRT's fixed 1 / 128 grid); a LayerNormalization's scale and bias are INT8 weights per
    tensor, and its input and output INT8 (the second LayerNorm reads the first's parameters through Identity)."""
    from sr.graph import GraphIndex, gelu_units, l2norm_units
    from sr.quant.quantspec import L2_NORM_OUTPUT, constant_arrays

    int8 = calibrate_model(families["swinir-light"].name, CalibrationConfig(method="minmax", samples=10), "npu")
    fp32 = onnx.load(str(int8.fp32_onnx))
    gelu, l2 = gelu_units(GraphIndex(fp32), constant_arrays(fp32)), l2norm_units(GraphIndex(fp32), constant_arrays(fp32))
    assert len(gelu) == 1 and len(l2) == 2
    spec = quant_spec(fp32, "npu")
    for unit in [*gelu, *l2]:
        inner = {o for n in fp32.graph.node if n.name in unit.nodes[:-1] for o in n.output}
        assert {unit.input, unit.output} <= set(spec.activations) and not inner & set(spec.activations)
        assert not {t for n in fp32.graph.node if n.name in unit.nodes for t in n.input} & set(spec.weights)
    for unit in l2:
        scale, zero = activation_qparams(spec.activations[unit.output], *L2_NORM_OUTPUT)
        assert (scale, zero) == (1 / 128, 0)
        assert (int8.ranges[unit.output].low, int8.ranges[unit.output].high) == L2_NORM_OUTPUT
    norms = [n for n in fp32.graph.node if n.op_type == "LayerNormalization"]
    assert len(norms) == 2
    for norm in norms:
        assert {norm.input[0], norm.output[0]} <= set(spec.activations)
        assert [spec.weights[t].axis for t in norm.input[1:]] == [None, None]


def test_the_attention_lowerings_change_no_number(families, size_scaled):
    """GELU's five nodes as one Gelu, F.normalize's four as one LpNormalization, and the size-derived scalar as an
    INT8 constant at a fixed size: ONNX Runtime's CPU gives the written model's output for the lowered one."""
    import onnxruntime as ort
    from sr.run.npu import size_scalars_for_htp, static_input, units_for_htp

    for model, lowerings in ((size_scaled, {"Gelu": 1, "Div": 1}), (families["swinir-light"], {"Gelu": 1,
                                                                                                "LpNormalization": 2})):
        int8 = calibrate_model(model.name, CalibrationConfig(method="minmax", samples=10), "npu")
        written = static_input(onnx.load(str(int8.qdq_onnx)), (24, 20))
        lowered = size_scalars_for_htp(units_for_htp(written))
        kinds = [n.op_type for n in lowered.graph.node]
        assert not {"Erf", "ReduceL2", "Expand"} & set(kinds)
        assert all(kinds.count(kind) == count for kind, count in lowerings.items() if kind != "Div")
        if "Div" in lowerings:
            divisors = [n for n in lowered.graph.node if n.op_type == "Div" and
                        any(t.endswith("_dequantized") for t in n.input)]
            assert len(divisors) == 1 and any(t.endswith("_htp_constant") for t in divisors[0].input)
        image = np.random.default_rng(2).random((1, 3, 24, 20), dtype=np.float32)
        outputs = []
        for graph in (written, lowered):
            session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
            outputs.append(session.run(None, {session.get_inputs()[0].name: image})[0])
        assert np.abs(outputs[0] - outputs[1]).max() < 1e-6


def _pattern(kind: str) -> onnx.ModelProto:
    """Conv -> <kind> -> Conv, 3 channels in and out: the same-scale and fixed-grid ops beside a ReLU or a Concat."""
    rng = np.random.default_rng(3)
    inits = {"w0": rng.standard_normal((8, 3, 3, 3)) * 0.3, "w1": rng.standard_normal((3, 8, 3, 3)) * 0.3,
             "w2": rng.standard_normal((3, 16, 3, 3)) * 0.3, "scales": np.array([1, 1, 2, 2]),
             "pads": np.array([0, 0, 1, 2, 0, 0, 2, 1])}
    middle = {"maxpool-relu": [helper.make_node("MaxPool", ["a"], ["m"], kernel_shape=[2, 2], strides=[2, 2]),
                               helper.make_node("Relu", ["m"], ["b"])],
              "resize-relu": [helper.make_node("Resize", ["a", "", "scales"], ["m"], mode="nearest",
                                               coordinate_transformation_mode="asymmetric", nearest_mode="floor"),
                              helper.make_node("Relu", ["m"], ["b"])],
              "pad-relu": [helper.make_node("Pad", ["a", "pads"], ["m"], mode="constant"),
                           helper.make_node("Relu", ["m"], ["b"])],
              "sigmoid-concat": [helper.make_node("Sigmoid", ["a"], ["s"]),
                                 helper.make_node("Concat", ["s", "a"], ["b"], axis=1)]}[kind]
    last = "w2" if kind == "sigmoid-concat" else "w1"
    nodes = [helper.make_node("Conv", ["x", "w0"], ["a"], pads=[1, 1, 1, 1]), *middle,
             helper.make_node("Conv", ["b", last], ["y"], pads=[1, 1, 1, 1])]
    arrays = [numpy_helper.from_array(v.astype(np.float32 if v.dtype.kind == "f" else
                                               (np.float32 if k == "scales" else np.int64)), k)
              for k, v in inits.items() if k not in ("w1", "w2") or k == last]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, None, None])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], arrays)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@needs_litert
@pytest.mark.parametrize("kind", ["maxpool-relu", "resize-relu", "pad-relu", "sigmoid-concat"])
def test_same_scale_and_fixed_grid_ops_beside_a_relu_or_concat_keep_litert_s_rules(kind, tmp_path):
    """A pooling, resize or pad before a ReLU keeps its input's grid (the ReLU requantizes after it), and a
    Sigmoid's fixed grid is the Concat's it feeds: the .tflite runs on LiteRT's reference kernels within a few
    output steps of the lab's QDQ model (a broken tie gave 108 steps, or a file LiteRT refused)."""
    import onnxruntime as ort
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    from sr.quant.qdq import insert_qdq, tie_fused_ranges
    from sr.quant.quantspec import LITERT_FIXED_OUTPUT
    from sr.quant.searches import TensorRange
    from sr.run.tflite import tflite_bytes

    model = _pattern(kind)
    x = np.random.default_rng(0).random((1, 3, 12, 14), dtype=np.float32)
    spec = quant_spec(model, "npu")
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.extend(helper.make_empty_tensor_value_info(t) for t in spec.activations if t != "y")
    values = dict(zip([o.name for o in probe.graph.output], ort.InferenceSession(
        probe.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})))
    values["x"] = x
    fixed = {"s": LITERT_FIXED_OUTPUT["Sigmoid"]} if kind == "sigmoid-concat" else {}
    ranges = tie_fused_ranges(spec, {t: TensorRange(t, *fixed.get(t, (float(values[t].min()), float(values[t].max()))),
                                                    0.0, 1.0, 0.0, "minmax") for t in spec.activations})
    qdq = ort.InferenceSession(insert_qdq(model, spec, ranges).SerializeToString(), providers=["CPUExecutionProvider"])
    expected = qdq.run(None, {"x": x})[0]
    interpreter = Interpreter(model_content=tflite_bytes(model, spec, ranges),
                              experimental_op_resolver_type=OpResolverType.BUILTIN_REF)
    given, taken = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    image = x[0].transpose(1, 2, 0)[None]
    interpreter.resize_tensor_input(given["index"], list(image.shape), strict=False)
    interpreter.allocate_tensors()
    scale, zero = given["quantization"]
    interpreter.set_tensor(given["index"], np.clip(np.rint(image / scale) + zero, -128, 127).astype(np.int8))
    interpreter.invoke()
    scale, zero = taken["quantization"]
    result = ((interpreter.get_tensor(taken["index"]).astype(np.float32) - zero) * scale).transpose(0, 3, 1, 2)
    assert result.shape == expected.shape
    assert np.abs(result - expected).max() / scale <= 3


@needs_litert
def test_what_would_be_written_wrong_is_refused_instead():
    """auto_pad (no pads attribute), a ConvTranspose's output_shape and a Resize whose size is not another
    tensor's are refused in words, not written as something else."""
    from sr.quant.searches import TensorRange
    from sr.run.tflite import TfliteUnsupported, tflite_bytes

    rng = np.random.default_rng(0)
    weights = {"w": rng.standard_normal((3, 3, 3, 3)).astype(np.float32),
               "wt": rng.standard_normal((3, 3, 4, 4)).astype(np.float32)}
    cases = {"auto_pad": helper.make_node("Conv", ["x", "w"], ["y"], auto_pad="SAME_UPPER"),
             "output_shape": helper.make_node("ConvTranspose", ["x", "wt"], ["y"], strides=[2, 2],
                                              output_shape=[24, 28])}
    for what, node in cases.items():
        graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, None, None])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                                  [numpy_helper.from_array(v, k) for k, v in weights.items() if k in node.input])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        spec = quant_spec(model, "npu")
        ranges = {t: TensorRange(t, -1.0, 1.0, -1.0, 1.0, 0.0, "fixed") for t in spec.activations}
        with pytest.raises(TfliteUnsupported):
            tflite_bytes(model, spec, ranges)
