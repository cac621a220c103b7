"""sr.lab.bundle: the deployment bundle of a user's model (its own graph, its names, every scheme), measured as the app
and the CLI measure it, and its TensorRT calibration cache in TensorRT's own line format."""
import json
from pathlib import Path

import numpy as np
import pytest

from sr.lab.bundle import export_bundle, parse_calibration_cache
from sr.quant.calibrate import CalibrationConfig
from sr.data import degrade, list_images, load_image
from sr.lab.evaluate import EvalConfig, evaluate
from sr.metrics import psnr_y

ROOT = Path(__file__).resolve().parent.parent


def test_bundle_round_trip(registered, data_dir, tmp_path):
    """The bundle's INT8 model is the one eval scores, and its TensorRT 10 cache lists exactly the tensors that
    model quantizes, under the user's names, with TensorRT 10's header."""
    import onnx

    from sr.quant.readback import graph_quantization

    model = registered["xlsr-255"].name
    config = CalibrationConfig(method="mse", samples=20)
    images = [degrade(load_image(p), 3) for p in list_images(data_dir / "Set5")[:2]]
    bundle = export_bundle(model, config, tmp_path / "bundle", images=[lr for _, lr in images], trt_version="10.3")
    assert set(bundle.files) == {"README.md", "calibration.cache", "model.cpu-int8.onnx", "model.fp32.onnx",
                                 "model.npu-int8.onnx", "model.qdq.onnx", "ranges.json"}
    report = evaluate(EvalConfig(model=model, data=str(data_dir / "Set5"), engine="ort-int8", calibration=config))
    shown = {row["name"]: row["psnr_y"] for row in report["images"]}
    import onnxruntime as ort

    session = ort.InferenceSession(str(bundle.folder / "model.qdq.onnx"), providers=["CPUExecutionProvider"])
    for path, (hr, lr) in zip(list_images(data_dir / "Set5")[:2], images):  # the user's contract: [0, 255] NCHW
        x = lr.transpose(2, 0, 1)[None].astype(np.float32)
        out = session.run(None, {"lr": x})[0][0].transpose(1, 2, 0)
        assert psnr_y(np.clip(np.rint(out), 0, 255).astype(np.uint8), hr, 3) == pytest.approx(shown[path.name], abs=0.01)
    text = (bundle.folder / "calibration.cache").read_text()
    assert text.splitlines()[0] == "TRT-100300-EntropyCalibration2"
    # read as TensorRT reads it (`name: <IEEE float32 bits, big-endian, 8 hex digits>`), not with the lab's parser
    scales = {name: float(np.array([int(bits, 16)], np.uint32).view(np.float32)[0])
              for name, _, bits in (line.rpartition(": ") for line in text.strip().splitlines()[1:])}
    assert scales == pytest.approx(parse_calibration_cache(text), rel=0)
    written = graph_quantization(onnx.load(str(bundle.folder / "model.qdq.onnx")),
                                 onnx.load(str(bundle.folder / "model.fp32.onnx"))).activations
    assert set(scales) == set(written) and scales
    for name, (scale, _) in written.items():
        assert scales[name] == pytest.approx(scale, rel=1e-6)
    ranges = json.loads((bundle.folder / "ranges.json").read_text())["tensors"]
    assert {r["name"] for r in ranges} == set(written)
    assert f"{bundle.psnr_fp32_vs_int8_db:.2f} dB" in (bundle.folder / "README.md").read_text()
    with pytest.raises(ValueError, match="TensorRT 11 removed implicit INT8 calibration"):
        export_bundle(model, config, tmp_path / "other", trt_version="11.0")


def test_the_bundle_holds_the_users_own_graph(registered, stand_ins, data_dir, tmp_path):
    """A Y-only NCHW model's bundle: its own input and output names and one channel, no wrapper node, and its
    INT8 models run on what the user feeds their model (Y in [0, 1])."""
    import onnx
    import onnxruntime as ort

    model = registered["fsrcnn-y"]
    bundle = export_bundle(model.name, CalibrationConfig(method="minmax", samples=20), tmp_path / "b")
    original = onnx.load(str(stand_ins["fsrcnn-y"]))
    y = np.random.default_rng(0).random((1, 1, 20, 24), dtype=np.float32)
    fp32 = ort.InferenceSession(str(stand_ins["fsrcnn-y"]), providers=["CPUExecutionProvider"]).run(None, {"lr": y})[0]
    for name in ("model.qdq.onnx", "model.npu-int8.onnx", "model.cpu-int8.onnx", "model.fp32.onnx"):
        graph = onnx.load(str(bundle.folder / name)).graph
        assert [i.name for i in graph.input] == [i.name for i in original.graph.input], name
        assert [o.name for o in graph.output] == [o.name for o in original.graph.output], name
        assert not any(n.name.startswith(("standard/", "user/")) for n in graph.node), name
        out = ort.InferenceSession(str(bundle.folder / name), providers=["CPUExecutionProvider"]).run(None, {"lr": y})[0]
        assert out.shape == fp32.shape and np.abs(out - fp32).mean() < 0.02, name
    assert "calibration.cache" not in bundle.files


def test_calibration_cache_lines_are_tensorrts_format():
    """A range of +-1 is the scale 1/127, written as TensorRT's cache stores it: the float32's bits, big-endian,
    in hex (0x3c010204, worked out by hand from IEEE 754: exponent 120, mantissa 0x010204)."""
    from sr.lab.bundle import calibration_cache_text
    from sr.quant.searches import TensorRange

    text = calibration_cache_text({"x": TensorRange("x", -1.0, 0.5, -1.0, 0.5, 0.0, "minmax")}, "minmax", "10.3")
    assert text.splitlines() == ["TRT-100300-MinMaxCalibration", "x: 3c010204"]
