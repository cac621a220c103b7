"""Real ONNX Runtime: export, QDQ models of both schemes, the cache, INT8 quality."""
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest

from sr.quant.calibrate import CalibrationConfig
from sr.data import degrade, load_image
from sr.run.engines import OrtEngine, TorchEngine, tensorrt_available, tiled
from sr.metrics import psnr_y
from sr.model.weights import load_model
from sr.run.quantize import calibrate_model

from sr.quant.quantspec import Scheme
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def butterfly(data_dir):
    return degrade(load_image(data_dir / "Set5" / "butterfly.png"), 3)


@pytest.mark.parametrize("scheme, within_db, activation_pairs", [("tensorrt", 0.6, 10), ("npu", 0.6, 20),
                                                                 ("cpu", 0.6, 12)])
def test_int8_is_close_to_fp32(butterfly, scheme, within_db, activation_pairs):
    """tensorrt: one pair per distinct Conv input (the input feeds two Convs); npu: every tensor of the graph."""
    hr, lr = butterfly
    int8 = calibrate_model("xlsr-clip", CalibrationConfig(method="mse", samples=50), scheme)
    ops = Counter(node.op_type for node in onnx.load(str(int8.qdq_onnx)).graph.node)
    assert ops["QuantizeLinear"] >= activation_pairs and ops["Conv"] == 11
    fp32 = TorchEngine(load_model("xlsr-clip")).run(lr)
    out = OrtEngine(int8.qdq_onnx, 3).run(lr)
    assert out.shape == fp32.shape == hr.shape
    assert psnr_y(out, fp32, 3) > 35.0  # INT8 stays close to its own FP32 output
    assert psnr_y(fp32, hr, 3) - psnr_y(out, hr, 3) < within_db


def test_entropy_zeros_clips_post_relu_tensors_harder(butterfly):
    """Counting the zero spike (entropy-zeros) gives post-ReLU tensors a smaller threshold than ModelOpt's
    entropy; both are real INT8 models that run."""
    _, lr = butterfly
    literal = calibrate_model("xlsr-relu", CalibrationConfig(method="entropy-zeros", samples=50), "tensorrt")
    published = calibrate_model("xlsr-relu", CalibrationConfig(method="entropy", samples=50), "tensorrt")
    relus = [name for name in literal.ranges if "relu" in name.lower()]
    assert all(literal.ranges[t].high <= published.ranges[t].high for t in relus)
    assert any(literal.ranges[t].high < 0.8 * published.ranges[t].high for t in relus)
    assert OrtEngine(literal.qdq_onnx, 3).run(lr).shape == OrtEngine(published.qdq_onnx, 3).run(lr).shape


def test_cache_hit_and_corrupt_rebuild():
    config = CalibrationConfig(method="minmax", samples=10, seed=777)  # a key no other test uses
    first = calibrate_model("xlsr-relu", config, "cpu")
    again = calibrate_model("xlsr-relu", config, "cpu")
    assert not first.cached and again.cached and again.qdq_onnx == first.qdq_onnx
    assert again.ranges["output"].high == pytest.approx(first.ranges["output"].high)
    first.qdq_onnx.write_bytes(b"garbage")
    rebuilt = calibrate_model("xlsr-relu", config, "cpu")
    assert not rebuilt.cached and onnx.load(str(rebuilt.qdq_onnx)).graph.node
    other = calibrate_model("xlsr-relu", CalibrationConfig(method="minmax", samples=10, seed=778), "cpu")
    assert other.key != first.key


def test_tiles_have_no_seams(photo):
    engine = TorchEngine(load_model("teacher"))
    whole = tiled(engine._run_array, photo, 3, tile=10_000)
    assert np.array_equal(tiled(engine._run_array, photo, 3, tile=24, overlap=32), whole)


def test_int8_tiles_have_no_seams(photo):
    """INT8 too: every quantization parameter is per tensor and fixed, so a tile's centre sees exactly the values
    the whole image gives it."""
    int8 = calibrate_model("xlsr-clip", CalibrationConfig(method="minmax", samples=10), "cpu")
    engine = OrtEngine(int8.qdq_onnx, 3)
    whole = tiled(engine._run_array, photo, 3, tile=10_000)
    assert np.array_equal(tiled(engine._run_array, photo, 3, tile=20, overlap=8), whole)


def test_a_changed_threshold_function_means_a_fresh_calibration(monkeypatch):
    """The cache key holds the code: replacing a threshold search at run time must not return the old ranges."""
    from sr.quant import searches

    config = CalibrationConfig(method="entropy", samples=10, seed=4242)
    first = calibrate_model("xlsr-clip", config, "tensorrt")
    assert calibrate_model("xlsr-clip", config, "tensorrt").cached
    monkeypatch.setattr(searches, "entropy_threshold_bins", lambda histogram, **_: 1024.0)
    changed = calibrate_model("xlsr-clip", config, "tensorrt")
    assert not changed.cached and changed.key != first.key
    stats = {s.name: s for s in changed.stats}
    tensor = "/gblocks/gblocks.0/relu/Relu_output_0"
    assert changed.ranges[tensor].high == pytest.approx(stats[tensor].amax / 2)


def test_concurrent_calibrations_share_one_entry(tmp_path):
    """Four threads ask for the same calibration: all succeed, one entry is built, nothing is left behind."""
    from concurrent.futures import ThreadPoolExecutor

    config = CalibrationConfig(method="minmax", samples=10, seed=99)
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: calibrate_model("xlsr-relu", config, "cpu", cache_dir=tmp_path), range(4)))
    assert len({r.key for r in results}) == 1 and sum(not r.cached for r in results) == 1
    entries = [p for p in (tmp_path / "int8").iterdir() if p.is_dir()]
    assert [p.name for p in entries] == [results[0].key]


def test_concurrent_calibrations_from_two_processes(tmp_path):
    import subprocess
    import sys

    code = ("import sys; from sr.quant.calibrate import CalibrationConfig; from sr.run.quantize import calibrate_model; "
            "m = calibrate_model('xlsr-relu', CalibrationConfig(method='minmax', samples=10, seed=98), 'cpu', "
            "cache_dir=sys.argv[1]); print(m.key, m.cached)")
    root = Path(__file__).resolve().parent.parent
    processes = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], cwd=root, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=300) for p in processes]
    assert all(p.returncode == 0 for p in processes), [err[-2000:] for _, err in outputs]
    keys = {out.split()[0] for out, _ in outputs}
    assert len(keys) == 1 and sorted(out.split()[1] for out, _ in outputs) == ["False", "True"]


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown INT8 scheme 'fp16'"):
        calibrate_model("xlsr-relu", CalibrationConfig(samples=10), "fp16")
    with pytest.raises(FileNotFoundError, match="no model 'nope'"):
        calibrate_model("nope", CalibrationConfig(samples=10), "cpu")
    assert Scheme.TENSORRT.symmetric and Scheme.NPU_SYMMETRIC.symmetric and not Scheme.NPU.symmetric \
        and not Scheme.CPU.symmetric and Scheme.NPU.int32_bias and not Scheme.NPU_SYMMETRIC.int32_bias


@pytest.mark.gpu
@pytest.mark.skipif(not tensorrt_available(), reason="needs an NVIDIA GPU and TensorRT")
def test_tensorrt_matches_onnxruntime(butterfly):
    from sr.run.engines import TensorRTEngine

    _, lr = butterfly
    int8 = calibrate_model("xlsr-clip", CalibrationConfig(method="entropy", samples=50), "tensorrt")
    assert psnr_y(TensorRTEngine(int8.qdq_onnx, 3).run(lr), OrtEngine(int8.qdq_onnx, 3).run(lr), 3) > 40.0


def test_tensorrt_plan_key_covers_model_gpu_version_and_profile(tmp_path):
    from sr.run import engines

    model = tmp_path / "m.onnx"
    model.write_bytes(b"model")
    key = engines.tensorrt_plan_key(model, "H100", "10.9")
    assert key != engines.tensorrt_plan_key(model, "H200", "10.9") != engines.tensorrt_plan_key(model, "H100", "11.0")
    original = engines.tensorrt_profile_shapes()
    engines.TILE += 64
    try:
        assert engines.tensorrt_profile_shapes() != original and engines.tensorrt_plan_key(model, "H100", "10.9") != key
    finally:
        engines.TILE -= 64


def test_cache_is_capped_least_recently_used_first(tmp_path, monkeypatch):
    """Three entries under a total cap that holds all but about half of one: the least recently used entry
    goes, a used one stays."""
    import os
    import time

    from sr.store import cache_root

    def cache_bytes():
        return sum(p.stat().st_size for p in cache_root(tmp_path).rglob("*") if p.is_file())

    configs = [CalibrationConfig(method="minmax", samples=10, seed=seed) for seed in (501, 502, 503)]
    first = calibrate_model("xlsr-relu", configs[0], "cpu", cache_dir=tmp_path)
    second = calibrate_model("xlsr-relu", configs[1], "cpu", cache_dir=tmp_path)
    entry_bytes = sum(p.stat().st_size for p in first.qdq_onnx.parent.iterdir())
    stats_bytes = max(p.stat().st_size for p in (cache_root(tmp_path) / "stats").iterdir() if p.suffix == ".npz")
    os.utime(first.qdq_onnx.parent, (time.time() - 100, time.time() - 100))
    os.utime(second.qdq_onnx.parent, (time.time() - 200, time.time() - 200))
    assert calibrate_model("xlsr-relu", configs[0], "cpu", cache_dir=tmp_path).cached  # a read marks it used
    cap = cache_bytes() + entry_bytes + stats_bytes - entry_bytes / 2
    monkeypatch.setenv("SR_CACHE_MAX_MB", str(cap / 2**20))
    third = calibrate_model("xlsr-relu", configs[2], "cpu", cache_dir=tmp_path)
    alive = {p.name for p in (tmp_path / "int8").iterdir() if p.is_dir()}
    assert alive == {first.key, third.key}, (alive, second.key)
    assert cache_bytes() <= cap


def test_uploads_make_room_among_uploads_and_the_lab_among_everything(tmp_path, monkeypatch, stand_ins):
    """Under a small cap: a new upload evicts an old, unheld upload, never the lab's own calibration (issue 34:
    the shipped calibrations are never evicted by uploads); the lab's own writes still keep one total cap over
    every kind of entry (an old calibration goes when a new one is written), and an evicted upload is reported
    as gone."""
    import os
    import time

    from sr.store import cache_root
    from sr.model.usermodel import HOLD_SECONDS, lookup
    from sr.run.register import register_onnx

    first = register_onnx(stand_ins["fsrcnn-y"], cache_dir=tmp_path)
    old = calibrate_model("xlsr-relu", CalibrationConfig(method="minmax", samples=10, seed=601), "tensorrt",
                          cache_dir=tmp_path)
    probe = register_onnx(stand_ins["xlsr-nhwc"], cache_dir=tmp_path / "probe")  # its size, in another cache
    size = sum(p.stat().st_size for p in probe.standard_onnx.parent.rglob("*") if p.is_file())
    small = sum(p.stat().st_size for p in first.standard_onnx.parent.rglob("*") if p.is_file())
    monkeypatch.setenv("SR_CACHE_MAX_MB", str(2 * (size + small / 2) / 2**20))  # uploads' half: not both
    for folder in cache_root(tmp_path).iterdir():  # everything so far unused for longer than the hold
        for entry in folder.iterdir():
            os.utime(entry, (time.time() - HOLD_SECONDS - 60,) * 2)
    newest = register_onnx(stand_ins["xlsr-nhwc"], cache_dir=tmp_path)
    assert newest.standard_onnx.is_file() and old.qdq_onnx.is_file()  # the lab's calibration stays
    assert not first.standard_onnx.is_file() and lookup(first.name, tmp_path) is None
    calibrate_model("xlsr-relu", CalibrationConfig(method="minmax", samples=10, seed=602), "tensorrt",
                    cache_dir=tmp_path)
    assert not old.qdq_onnx.is_file()  # the one total cap, kept by the lab's own writes


def test_the_automatic_method_never_destroys_a_y_only_model_and_the_others_warn(capsys, data_dir):
    """The CLI's default (auto) on the example FSRCNN (Y only): on Set5, images it never saw, the INT8 model stays
    within 1 dB of FP32 and as bright, and the report says what was chosen among which scores; entropy, which
    used to be the default, turns it dark, and eval's JSON says so in words."""
    import json

    from sr import cli
    from sr.lab.compare import compare

    base = ["eval", "--onnx", str(ROOT / "examples" / "fsrcnn-y.onnx"), "--data", str(data_dir / "Set5"),
            "--engine", "ort-int8", "--json"]
    assert cli.main(base) == 0
    auto = json.loads(capsys.readouterr().out)
    loss = auto["fp32_mean"]["psnr_y"] - auto["int8_mean"]["psnr_y"]
    assert loss <= 1.0 and auto["brightness_ratio"] >= 0.98 and not auto["warnings"], auto["warnings"]
    choice = auto["auto"]
    assert auto["method"] == choice["method"] != "entropy" and set(choice["candidates"]) >= {"entropy", "minmax"}
    assert choice["method"] == max(choice["candidates"], key=lambda m: choice["candidates"][m]["psnr_vs_fp32_db"])
    assert cli.main(base + ["--method", "entropy"]) == 0
    entropy = json.loads(capsys.readouterr().out)
    assert entropy["brightness_ratio"] < 0.9 and any("darker than FP32" in w for w in entropy["warnings"])
    assert any("signal energy" in w for w in entropy["warnings"]) and entropy["auto"] is None
    lost = entropy["fp32_mean"]["psnr_y"] - entropy["int8_mean"]["psnr_y"]  # the loss itself is said in words too
    assert lost > 1.0 and any(f"scores {lost:.2f} dB below FP32 (PSNR-Y) on these images" in w
                              for w in entropy["warnings"]), entropy["warnings"]
    shown = compare(np.full((40, 40, 3), 128, np.uint8), "xlsr-relu", "xlsr-clip",
                    CalibrationConfig(method="auto", samples=20))
    assert sum("the automatic method chose" in note for note in shown.notices) == 2


def test_the_known_input_range_follows_the_input_through_a_transpose(registered):
    """An NHWC model's first Conv reads the Transpose of its input, and that is the tensor quantized: it gets the
    input's known range too (entropy, left to choose it, took +-0.063 for an ESPCN-like Y input up to 0.92 and
    lost 19.6 dB)."""
    model = registered["xlsr-nhwc"].name
    int8 = calibrate_model(model, CalibrationConfig(method="entropy", samples=10), "tensorrt")
    moved = [t for t in int8.fixes.fixed_range if "Transpose" in t]
    assert moved and all(int8.fixes.fixed_range[t] == (0.0, 1.0) for t in moved)
    assert all(int8.ranges[t].high == pytest.approx(1.0) for t in moved if t in int8.ranges)


def test_warnings_are_data_with_their_words():
    """A calibration's warnings carry their kind and figures (what a caller branches on), and their words (what
    the CLI, the page and the bundle print): a darker output, a brighter one and a large loss, each once."""
    from sr.quant.calibrated import WarningKind

    int8 = calibrate_model("xlsr-clip", CalibrationConfig(method="minmax", samples=10), "npu")
    assert int8.warnings(1.0, "these images", 0.1) == []
    darker, loss = int8.warnings(0.9, "these images", 2.5)
    assert darker.kind is WarningKind.DARKER and darker.figures == {"brightness": 0.9}
    assert str(darker) == "the INT8 output is darker than FP32 on these images (brightness ratio 0.900): its ranges clip the image"
    assert loss.kind is WarningKind.LOSS and loss.figures["loss_db"] == 2.5 and "2.50 dB below FP32" in str(loss)
    assert [w.kind for w in int8.warnings(1.05)] == [WarningKind.BRIGHTER]
