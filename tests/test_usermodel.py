"""Bring your own model: stand-ins built here (tests/standins.py) go through detection, eval, calibration,
diagnosis and the deployment bundle; untrusted files are refused with clear messages."""
import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
import standins

from sr.lab.bundle import export_bundle
from sr.quant.calibrate import CalibrationConfig
from sr.data import degrade, load_image
from sr.lab.diagnose import DiagnoseConfig, diagnose
from sr.run.engines import OrtEngine
from sr.lab.evaluate import EvalConfig, evaluate
from sr.run.quantize import calibrate_model
from sr.model.checks import UserModelError
from sr.model.contract import Overrides
from sr.run.register import register_onnx

ROOT = Path(__file__).resolve().parent.parent
EXPECTED = {  # stand-in -> (layout, colour, range, pre-upsampled, fixed size, ops no scheme quantizes)
    "fsrcnn-y": ("nchw", "y", 1, False, None, ()),  # PReLU: INT8 under LiteRT's specification
    "vdsr-pre-upsampled": ("nchw", "rgb", 1, True, None, ()),
    "xlsr-nhwc": ("nhwc", "rgb", 1, False, None, ()),
    "xlsr-255": ("nchw", "rgb", 255, False, None, ("Div",)),
    "xlsr-fixed-48": ("nchw", "rgb", 1, False, (48, 48), ()),
    "xlsr-tanh": ("nchw", "rgb", 1, False, None, ("Div", "Log")),
    "xlsr-clip-exported": ("nchw", "rgb", 1, False, None, ()),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_contract_is_detected(registered, name):
    contract, model = registered[name].contract, registered[name]
    layout, color, value_range, pre, fixed, float_ops = EXPECTED[name]
    assert (contract.layout.value, contract.color.value, contract.value_range, contract.pre_upsampled,
            contract.fixed_size, contract.scale) == (layout, color, value_range, pre, fixed, 3)
    assert model.float_ops == float_ops
    assert contract.confidence_db > 3.0  # the chosen range reading is clearly the better fit


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_stand_in_evaluates_in_fp32_and_int8(registered, name, data_dir):
    report = evaluate(EvalConfig(model=registered[name].name, data=str(data_dir / "Set5"), engine="ort-int8",
                                 calibration=CalibrationConfig(method="minmax", samples=20)))
    assert report["fp32_mean"]["psnr_y"] > report["bicubic"]["psnr_y"] - 1.0  # a working upscaler
    assert report["fp32_mean"]["psnr_y"] - report["int8_mean"]["psnr_y"] < 1.0
    assert 0.98 < report["brightness_ratio"] < 1.02


def test_a_shipped_model_exported_to_onnx_gives_the_card_numbers(registered, data_dir):
    card = {"xlsr-clip": 32.762}
    report = evaluate(EvalConfig(model=registered["xlsr-clip-exported"].name, data=str(data_dir / "Set5"),
                                 engine="ort"))
    assert report["mean"]["psnr_y"] == pytest.approx(card["xlsr-clip"], abs=0.01)


def test_cli_eval_with_onnx(stand_ins, data_dir, tmp_path, capsys):
    from sr import cli

    code = cli.main(["eval", "--onnx", str(stand_ins["xlsr-nhwc"]), "--data", str(data_dir / "Set5"), "--engine",
                     "ort-int8", "--samples", "10", "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err[-2000:]
    assert "nhwc, rgb, values in [0, 1], x3" in err
    report = json.loads(out)
    assert report["int8_mean"]["psnr_y"] > 30


def test_diagnosis_on_a_user_model(registered, data_dir):
    report = diagnose(DiagnoseConfig(registered["fsrcnn-y"].name, CalibrationConfig(method="entropy", samples=20),
                                     data=str(data_dir / "Set5"), top=3, max_side=48))
    assert report.ranking and report.has_truth


def test_untrusted_files_are_refused(stand_ins, tmp_path):
    for case, (path, words) in standins.bad_files(tmp_path, stand_ins["xlsr-clip-exported"]).items():
        with pytest.raises(UserModelError, match=words):
            register_onnx(path)
    with pytest.raises(FileNotFoundError, match="no such ONNX file"):
        register_onnx(tmp_path / "missing.onnx")


def test_overrides_win(stand_ins):
    model = register_onnx(stand_ins["xlsr-255"], Overrides(value_range=1))
    assert model.contract.value_range == 1 and model.contract.confidence_db is None
    with pytest.raises(ValueError, match="range must be 1 or 255"):
        Overrides(value_range=100)
    assert register_onnx(stand_ins["vdsr-pre-upsampled"], Overrides(scale=2)).contract.scale == 2
    with pytest.raises(UserModelError, match=r"upscales x3 on a probe image; the scale given \(x2\) contradicts it"):
        register_onnx(stand_ins["xlsr-nhwc"], Overrides(scale=2))
    with pytest.raises(UserModelError, match="is the layout or the colour set right"):
        register_onnx(stand_ins["fsrcnn-y"], Overrides(layout="nhwc"))


def test_fixed_size_model_runs_on_every_engine(registered, data_dir):
    """OpenVINO tiles a fixed-size model to its size too, like ONNX Runtime (same output)."""
    from sr.run.engines import OpenVinoEngine, openvino_available

    if not openvino_available():
        pytest.skip("openvino is not installed")
    model = registered["xlsr-fixed-48"]
    _, lr = degrade(load_image(data_dir / "Set5" / "bird.png"), 3)
    ort_out = OrtEngine(model.standard_onnx, 3).run(lr)
    engine = OpenVinoEngine(model.standard_onnx, 3)
    assert engine.fixed == (48, 48)
    assert np.abs(engine.run(lr).astype(int) - ort_out.astype(int)).max() <= 1


def test_a_y_only_models_int8_panel_keeps_its_chroma(registered, data_dir):
    """Only the user's graph is quantized: the lab's RGB -> Y conversion and bicubic Cb/Cr stay in float, so the
    INT8 panel's chroma is FP32's (the Cb/Cr path quantized to +-0.28 used to turn it solid green)."""
    from sr.lab.compare import compare
    from sr.model.contract import YCBCR, YCBCR_OFFSET

    model = registered["fsrcnn-y"].name
    hr = load_image(data_dir / "Set5" / "butterfly.png")
    for scheme in ("tensorrt", "npu", "cpu"):
        # minmax: entropy still clips this stand-in's PReLU outputs to +-0.06 (dark luma; a calibration matter,
        # not the wrapper's)
        result = compare(hr, model, model, CalibrationConfig(method="minmax", samples=20), scheme,
                         mode="ground-truth")
        chroma = [np.tensordot(image.astype(np.float64) / 255.0, YCBCR[1:].T, axes=1) * 255.0 + YCBCR_OFFSET[1:] * 255
                  for image in (result.fp32_a, result.int8_a)]
        difference = np.abs(chroma[0] - chroma[1])
        assert np.percentile(difference, 99.9) <= 1.0 and difference.mean() < 0.25, (scheme, difference.mean())


def test_a_model_cannot_read_server_files(tmp_path):
    """External data anywhere (a Constant's tensor, an If branch's initializer) is refused before anything runs;
    no message carries a byte of the file or a server path."""
    from onnx import TensorProto, helper

    secret = (ROOT / "app.py").read_bytes()[:8]
    hostile = tmp_path / "hostile.onnx"
    hostile.write_bytes(standins.constant_reading(str(ROOT / "app.py")).SerializeToString())
    with pytest.raises(UserModelError, match="external files") as refused:
        register_onnx(hostile)
    message = str(refused.value)
    assert str(ROOT) not in message and str(tmp_path) not in message
    assert ",".join(str(b) for b in secret) not in message and secret.decode(errors="ignore") not in message
    relative = tmp_path / "relative.onnx"
    relative.write_bytes(standins.constant_reading("app.py").SerializeToString())
    with pytest.raises(UserModelError, match="external files"):
        register_onnx(relative)
    inner = standins.constant_reading("app.py").graph
    branch = helper.make_graph([helper.make_node("Identity", ["stolen"], ["out"])], "then", [],
                               [helper.make_tensor_value_info("out", TensorProto.UINT8, [8])],
                               [inner.node[0].attribute[0].t])
    nested = helper.make_graph([helper.make_node("Constant", [], ["cond"], value=helper.make_tensor(
                                    "c", TensorProto.BOOL, [], [True])),
                                helper.make_node("If", ["cond"], ["picked"], then_branch=branch, else_branch=branch),
                                helper.make_node("Identity", ["lr"], ["sr"])], "g", list(inner.input),
                               list(inner.output))
    path = tmp_path / "nested.onnx"
    path.write_bytes(helper.make_model(nested, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString())
    with pytest.raises(UserModelError, match="external files"):
        register_onnx(path)
    with pytest.raises(FileNotFoundError) as missing:
        register_onnx(tmp_path / "nope.onnx")
    assert str(tmp_path) not in str(missing.value)


def test_runtime_messages_are_cleaned():
    from sr.model.checks import clean_message

    raw = "[ShapeInferenceError] /home/app/cache/user/abc/contract.json: requested shape:{34,34,34,83,82,32,73,78}\n x"
    cleaned = clean_message(raw)
    assert "/home" not in cleaned and "34,34,34" not in cleaned and "\n" not in cleaned


def _branching_model() -> onnx.ModelProto:
    """x3 RGB: an unnamed Conv, an If whose branches read the outer tensor `feat` (by name), a pixel shuffle."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(3)
    weights = [numpy_helper.from_array(rng.normal(0, 0.2, (8, 3, 3, 3)).astype(np.float32), "w1"),
               numpy_helper.from_array(rng.normal(0, 0.1, (27, 8, 3, 3)).astype(np.float32), "w2")]
    relu = helper.make_graph([helper.make_node("Relu", ["feat"], ["branch"])], "then", [],
                             [helper.make_tensor_value_info("branch", TensorProto.FLOAT, None)])
    same = helper.make_graph([helper.make_node("Identity", ["feat"], ["branch_else"])], "else", [],
                             [helper.make_tensor_value_info("branch_else", TensorProto.FLOAT, None)])
    nodes = [helper.make_node("Conv", ["lr", "w1"], ["feat"], pads=[1, 1, 1, 1]),  # no name, like many exporters
             helper.make_node("Constant", [], ["cond"], value=helper.make_tensor("c", TensorProto.BOOL, [], [True])),
             helper.make_node("If", ["cond"], ["picked"], then_branch=relu, else_branch=same),
             helper.make_node("Conv", ["picked", "w2"], ["wide"], pads=[1, 1, 1, 1]),
             helper.make_node("DepthToSpace", ["wide"], ["sr"], blocksize=3, mode="CRD")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("lr", TensorProto.FLOAT, [1, 3, "h", "w"])],
                              [helper.make_tensor_value_info("sr", TensorProto.FLOAT, [1, 3, "H", "W"])], weights)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_subgraphs_reading_outer_tensors_and_unnamed_nodes(tmp_path):
    """An If branch that names an outer tensor keeps reading it through the lab's renaming (it used to be refused:
    "must be topologically sorted"), unnamed nodes get unique names, and the bundle's FP32 model is the user's
    graph again, with the user's output."""
    import onnxruntime as ort

    from sr.run.quantize import fp32_onnx_path

    path = tmp_path / "branching.onnx"
    path.write_bytes(_branching_model().SerializeToString())
    user = register_onnx(path)
    standard = onnx.load(fp32_onnx_path(user.name))
    names = [node.name for node in standard.graph.node]
    assert len(set(names)) == len(names) and "user/Conv_0" in names
    branches = next(node for node in standard.graph.node if node.op_type == "If").attribute
    assert {t for branch in branches for node in branch.g.node for t in node.input} == {"user/feat"}  # renamed too
    image = np.random.default_rng(0).random((1, 3, 10, 12), dtype=np.float32)
    expected = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"lr": image})[0]
    got = OrtEngine(fp32_onnx_path(user.name), 3).run((image[0].transpose(1, 2, 0) * 255).round().astype(np.uint8))
    shown = np.clip(expected[0].transpose(1, 2, 0), 0, 1) * 255
    assert got.shape == (30, 36, 3) and np.abs(got - shown).max() <= 1  # the lab runs the user's branch
    bundle = export_bundle(user.name, CalibrationConfig(method="minmax", samples=10), tmp_path / "bundle")
    session = ort.InferenceSession(str(bundle.folder / "model.fp32.onnx"), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["sr"]
    shipped = onnx.load(str(bundle.folder / "model.fp32.onnx")).graph
    every = [*(i.name for i in shipped.initializer), *(v.name for v in [*shipped.input, *shipped.output])]
    for node in [*shipped.node, *(n for node in shipped.node for a in node.attribute if a.HasField("g") for n in a.g.node)]:
        every += [node.name, *node.input, *node.output]
    assert every and not [name for name in every if name.startswith("user/")]  # the lab's prefix is gone everywhere
    assert np.allclose(session.run(None, {"lr": image})[0], expected, atol=1e-5)
    int8 = ort.InferenceSession(str(bundle.folder / "model.qdq.onnx"), providers=["CPUExecutionProvider"])
    assert np.abs(int8.run(None, {"lr": image})[0] - expected).mean() < 0.05


def test_integer_shape_subgraphs_are_not_calibrated(tmp_path, data_dir):
    """A model whose padding comes out of an int64 shape subgraph (as waifu2x exports) calibrates and evaluates
    under every scheme: only its float tensors get ranges (the int64 ones used to crash the histogram pass)."""
    user = register_onnx(standins.shape_padded(tmp_path / "waifu2x-like.onnx"))
    assert user.contract.scale == 2
    for scheme in ("tensorrt", "npu", "cpu"):
        int8 = calibrate_model(user.name, CalibrationConfig(method="entropy", samples=10), scheme)
        assert not any(name.startswith(("user/shape", "user/height", "user/nothing", "user/zeros8", "user/pads"))
                       for name in int8.ranges), sorted(int8.ranges)
        assert "user/padded" in int8.ranges
    report = evaluate(EvalConfig(model=user.name, data=str(data_dir / "Set5"), engine="ort-int8",
                                 calibration=CalibrationConfig(method="auto", samples=20)))
    assert report["fp32_mean"]["psnr_y"] - report["int8_mean"]["psnr_y"] < 1.0


def test_another_process_reads_back_the_model_as_registered(stand_ins):
    """After a restart, or in a torchrun worker, `lookup` gives the same model as `register_onnx` made: the ops
    left in float and the parameters counted on the user's own graph (it used to give none, and the wrapped
    graph's count)."""
    from sr.model import usermodel

    made = register_onnx(stand_ins["xlsr-tanh"])
    usermodel._REGISTRY.items.clear()  # a fresh process: nothing in memory, the cache folder only
    read = usermodel.lookup(made.name)
    assert read is not None and read.float_ops == made.float_ops and read.parameters == made.parameters
    assert read.contract == made.contract and read.macs_per_pixel == made.macs_per_pixel
    assert made.float_ops  # (its Div and Log: no scheme quantizes them)


def test_a_raw_file_named_by_its_path_is_probed_by_the_run_layer(stand_ins, tmp_path, monkeypatch):
    """The model layer runs nothing: a user's file named by its path (`model_info`, a teacher) is probed by the
    runner the run layer handed it when imported (`set_probe`), giving the model `register_onnx` gives; without
    one, the model layer asks for the registration in words instead of running the file itself."""
    from sr.model import usermodel
    from sr.model.checks import UserModelError
    from sr.model.models import model_info

    path = tmp_path / "never-seen.onnx"
    model = onnx.load(str(stand_ins["xlsr-nhwc"]))
    model.doc_string = "a copy nobody registered"  # another hash: not in the cache
    onnx.save(model, str(path))
    monkeypatch.setattr(usermodel, "_PROBE", [])
    with pytest.raises(UserModelError, match="register it first"):
        usermodel.register_graph(path)
    monkeypatch.undo()
    assert model_info(path).name == register_onnx(path).name


def test_a_family_stand_in_is_the_same_model_whatever_ran_before_it(tmp_path, data_dir):
    """The families' tables and the session's `families` fixture train each stand-in in a process where other work
    drew random numbers first: the stand-in's weights must not depend on that (they did: its initial weights were
    drawn before the training seeded the generator)."""
    import numpy as np
    import standins
    import torch

    weights = []
    for draws in (0, 1000):
        torch.rand(draws)  # whatever ran before
        path = standins.family("espcn", tmp_path / str(draws), str(data_dir / "T91"), steps=2)
        weights.append([onnx.numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer])
    assert len(weights[0]) == len(weights[1]) and all(np.array_equal(a, b) for a, b in zip(*weights))


def test_a_raw_file_by_its_path_registers_in_a_process_that_imported_sr_alone(stand_ins, tmp_path):
    """`sr.model_info("mine.onnx")` in a script that imported only `sr`: the model layer loads the run layer's
    probe by name, as the file was always registered on first use."""
    import subprocess
    import sys

    path = tmp_path / "alone.onnx"
    model = onnx.load(str(stand_ins["fsrcnn-y"]))
    model.doc_string = "registered in a fresh process"
    onnx.save(model, str(path))
    code = f"import sr; print(sr.model_info({str(path)!r}).name)"
    done = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parent.parent,
                          capture_output=True, text=True, env={**os.environ, "SR_CACHE_DIR": str(tmp_path / "cache")})
    assert done.returncode == 0 and done.stdout.startswith("onnx:"), done.stderr[-2000:]
