"""One reference INT8: every engine other than ONNX Runtime on the CPU is checked against it on a probe, and one
that disagrees is refused in words (CLI included); the fixed OpenVINO path agrees on this machine's CPU."""
import numpy as np
import onnx
import pytest

from sr import cli
from sr.quant.calibrate import CalibrationConfig
from sr.run.conformance import INT8_TOLERANCE, conformance, probe_image
from sr.run.engines import OpenVinoEngine, OrtEngine, openvino_available, unsigned_activations
from sr.run.quantize import calibrate_model
from sr.run.runtime import EngineKind, best_int8_engine, cpu_name, create_engine, reference_engine

needs_openvino = pytest.mark.skipif(not openvino_available(), reason="openvino is not installed")


def test_unsigned_activations_are_the_same_grid(tmp_path):
    """Signed activation pairs re-expressed as UINT8 with zero point + 128: ONNX Runtime gives the same bits."""
    int8 = calibrate_model("xlsr-relu", CalibrationConfig(method="entropy", samples=20), "tensorrt")
    model = onnx.load(str(int8.qdq_onnx))
    moved = unsigned_activations(model)
    assert moved == sum(n.op_type == "QuantizeLinear" for n in model.graph.node)  # every activation pair, no weight
    onnx.save(model, str(tmp_path / "u8.onnx"))
    lr = probe_image(40, 56)
    assert np.array_equal(OrtEngine(tmp_path / "u8.onnx", 3).run(lr), OrtEngine(int8.qdq_onnx, 3).run(lr))


@needs_openvino
@pytest.mark.parametrize("scheme", ["tensorrt", "npu", "cpu"])
def test_openvino_int8_conforms_on_this_cpu(scheme):
    """The signed-INT8 path was 13-16 dB off on AMD Zen 4; through the unsigned twin it agrees (and the check
    would refuse it otherwise)."""
    int8 = calibrate_model("xlsr-clip", CalibrationConfig(method="entropy", samples=20), scheme)
    engine = create_engine(EngineKind.OPENVINO_INT8, "xlsr-clip", int8)
    verdict = engine.conformance
    assert verdict.passed, f"{cpu_name()}: {verdict.summary()}"
    assert verdict.psnr_db > 40 and verdict.reference.startswith("ort-int8")


@needs_openvino
def test_openvino_fp32_and_bf16_conform():
    assert create_engine(EngineKind.OPENVINO, "xlsr-relu").conformance.max_levels <= 1
    assert create_engine(EngineKind.OPENVINO_BF16, "xlsr-relu").conformance.passed


class _Off:
    """An engine whose kernels are wrong: the reference's output, darkened by 20 levels."""

    def __init__(self, engine):
        self.engine, self.name, self.fixed = engine, "broken", None

    def run(self, lr):
        return np.clip(self.engine.run(lr).astype(int) - 20, 0, 255).astype(np.uint8)


def test_a_wrong_engine_is_refused_with_its_figures():
    int8 = calibrate_model("xlsr-relu", CalibrationConfig(method="entropy", samples=20), "tensorrt")
    reference = reference_engine("xlsr-relu", int8)
    verdict = conformance(_Off(reference), reference, INT8_TOLERANCE)
    assert not verdict.passed and verdict.mean_levels > 15
    assert "does not agree with the reference (ort-int8-tensorrt)" in verdict.summary()
    assert conformance(reference, reference, INT8_TOLERANCE).max_levels == 0


@needs_openvino
def test_explicit_engine_that_fails_is_refused_by_the_cli(monkeypatch, capsys, data_dir):
    """`--engine openvino-int8` on a CPU where OpenVINO is wrong: exit 3 and the conformance figures, no table.
    (A wrong kernel cannot be ordered on a given CPU, so OpenVINO's output is darkened here.)"""
    original = OpenVinoEngine.run
    monkeypatch.setattr(OpenVinoEngine, "run", lambda self, lr: np.clip(original(self, lr).astype(int) - 30, 0, 255)
                        .astype(np.uint8))
    monkeypatch.setattr("sr.run.conformance._VERDICTS", __import__("sr.store", fromlist=["Memo"]).Memo(256))
    code = cli.main(["eval", "--model", "xlsr-clip", "--engine", "openvino-int8", "--method", "entropy",
                     "--samples", "20", "--data", str(data_dir / "Set5")])
    err = capsys.readouterr().err
    assert code == 3 and "conformance probe" in err and "does not agree" in err and "--engine ort-int8" in err


@needs_openvino
def test_best_engine_falls_back_to_the_reference(monkeypatch):
    int8 = calibrate_model("xlsr-clip", CalibrationConfig(method="entropy", samples=20), "npu")
    monkeypatch.setattr("sr.run.conformance._VERDICTS", __import__("sr.store", fromlist=["Memo"]).Memo(256))
    original = OpenVinoEngine.run
    monkeypatch.setattr(OpenVinoEngine, "run", lambda self, lr: 255 - original(self, lr))
    engine, refused = best_int8_engine(int8)
    assert engine.name == "ort-int8-npu" and [v.engine for v in refused] == ["openvino-int8-npu"]


def test_one_engine_policy_by_purpose():
    """`engine_for`: figures on the reference (ONNX Runtime's CPU kernels on the QDQ file the bundle ships), FP32
    in the model's own runtime when asked, the fastest engine that agrees for speed, and a kind asked for by name
    checked against the reference."""
    from sr.run.runtime import Purpose, engine_for, int8_candidates

    int8 = calibrate_model("xlsr-clip", CalibrationConfig(method="entropy", samples=20), "tensorrt")
    measured = engine_for("xlsr-clip", int8)
    assert (measured.path, measured.provider) == (int8.qdq_onnx, "CPUExecutionProvider")
    assert engine_for("xlsr-clip").path.suffix == ".onnx" and engine_for("xlsr-clip").provider == "CPUExecutionProvider"
    assert engine_for("xlsr-clip", purpose=Purpose.NATIVE).name == "torch-fp32"
    assert engine_for("xlsr-clip", int8, purpose="native").path == int8.qdq_onnx  # INT8 is measured as shipped
    fast, conforming = engine_for("xlsr-clip", int8, purpose="speed"), []
    for kind in int8_candidates(int8)[:-1]:  # the engine chosen for speed is the first that agrees, or the reference
        try:
            conforming.append(create_engine(kind, "xlsr-clip", int8).name)
        except Exception:
            continue
    assert fast.name == (conforming[0] if conforming else "ort-int8-tensorrt")
    with pytest.raises(ValueError, match="unknown engine purpose"):
        engine_for("xlsr-clip", purpose="fastest")
