"""What a graph costs, counted before it runs and fail-closed (sr.cost): every model users bring is counted, the
public Space's hostile models are refused in words before anything runs."""
import time

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import standins
from sr.cost import CostLimits, TooCostly, Uncountable, check_cost, graph_cost
from sr.model.checks import UserModelError
from sr.run.register import register_onnx

SPACE = CostLimits(2e6, 4096, 4)  # the app's defaults


def test_a_conv_stack_is_counted_exactly(tmp_path):
    """3 -> 32 -> 32 -> 32 -> 27 channels of 3x3 convolutions and a pixel shuffle: 9 x (3x32 + 2x32x32 + 32x27)
    multiply-accumulates a pixel, x3 out, the widest tensor 32 values a pixel."""
    cost = graph_cost(onnx.load(str(standins.conv_stack(tmp_path / "stack.onnx", 32, 4))))
    assert cost.macs_per_pixel == 9 * (3 * 32 + 2 * 32 * 32 + 32 * 27)
    assert cost.output_scale == pytest.approx(3.0) and cost.largest_tensor_per_pixel == 32


def test_every_model_users_bring_is_counted(stand_ins, families):
    """Every stand-in and every family of the README's table (waifu2x's pads and SwinIR's windows computed from
    the input's shape included) is countable and within the Space's limits."""
    paths = {**stand_ins, **{f"family {name}": model.source for name, model in families.items()}}
    for name, path in paths.items():
        cost = check_cost(onnx.load(str(path)), SPACE)
        assert 0 < cost.macs_per_pixel < 1e6 and cost.output_scale in (1.0, 2.0, 3.0, 4.0), (name, cost)


def test_matmul_and_einsum_count_alike():
    """A 1x1 convolution written as MatMul, as Einsum and as Conv: the same multiply-accumulates."""
    weight = np.ones((8, 3), np.float32)

    def model(node, extra=()):
        graph = helper.make_graph([*extra, node, helper.make_node("Resize", ["mixed_nchw", "", "x1"], ["sr"], mode="nearest")],
                                  "g", [helper.make_tensor_value_info("lr", TensorProto.FLOAT, [1, 3, "h", "w"])],
                                  [helper.make_tensor_value_info("sr", TensorProto.FLOAT, None)],
                                  [onnx.numpy_helper.from_array(weight, "w"),
                                   onnx.numpy_helper.from_array(weight.reshape(8, 3, 1, 1), "w4"),
                                   helper.make_tensor("x1", TensorProto.FLOAT, [4], [1, 1, 1, 1])])
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])

    conv = graph_cost(model(helper.make_node("Conv", ["lr", "w4"], ["mixed_nchw"])))
    einsum = graph_cost(model(helper.make_node("Einsum", ["w", "lr"], ["mixed_nchw"], equation="oc,nchw->nohw")))
    matmul = graph_cost(model(helper.make_node("Transpose", ["mixed"], ["mixed_nchw"], perm=[0, 3, 1, 2]),
                              [helper.make_node("Transpose", ["lr"], ["last"], perm=[0, 2, 3, 1]),
                               helper.make_node("Transpose", ["w"], ["wt"], perm=[1, 0]),
                               helper.make_node("MatMul", ["last", "wt"], ["mixed"])]))
    assert conv.macs_per_pixel == einsum.macs_per_pixel == matmul.macs_per_pixel == 24


@pytest.mark.parametrize("name", sorted(standins.HOSTILE))
def test_hostile_models_are_refused_before_anything_runs(name, tmp_path, isolated_cache):
    """The report's models (a 48000x48000 tensor made at run time, a 12288x12288 MatMul, convolutions in a Loop,
    a x16 Resize, sizes read from the input's values) are refused by the upload's check, in words, in well under
    a second: nothing was run (their cost shows only when they run: 9 GB, 113-840 s), nothing cached."""
    build, words = standins.HOSTILE[name]
    path = tmp_path / "hostile.onnx"
    path.write_bytes(build().SerializeToString())
    before = set((isolated_cache / "user").glob("*")) if (isolated_cache / "user").is_dir() else set()
    started = time.perf_counter()
    with pytest.raises((Uncountable, TooCostly), match=words):
        register_onnx(path, limits=SPACE)
    assert time.perf_counter() - started < 5
    after = set((isolated_cache / "user").glob("*")) if (isolated_cache / "user").is_dir() else set()
    assert after == before


def test_an_uncountable_models_cost_reads_unknown_without_limits():
    """The limits are a server's policy: without them (the CLI) an uncountable graph is not refused, and the
    cost the model type reports is 0.0 (unknown)."""
    from sr.model.usermodel import macs_per_pixel

    model = standins.resize_from_values(channels=4)
    with pytest.raises(Uncountable):
        graph_cost(model)
    assert macs_per_pixel(model) == 0.0


def test_nan_or_infinite_weights_are_refused_in_words(tmp_path):
    path = tmp_path / "nan.onnx"
    path.write_bytes(standins.non_finite_weights().SerializeToString())
    with pytest.raises(UserModelError, match="2 NaN or infinite value"):
        register_onnx(path)


def test_an_upload_never_evicts_a_held_model_or_the_labs_own_entries(tmp_path, monkeypatch):
    """Uploaded models share half the cache's cap: when it is full of models used within the hour, the next
    upload is refused in words and the held ones stay; once one has been unused for an hour, it makes room. The
    lab's own entries (calibrations) are never touched by an upload."""
    import os

    from sr.model.usermodel import HOLD_SECONDS, lookup

    monkeypatch.setenv("SR_CACHE_DIR", str(tmp_path / "cache"))
    made = [register_onnx(standins.conv_stack(tmp_path / f"m{i}.onnx", 24 + i, 8)) for i in range(2)]
    held = sum(f.stat().st_size for m in made for f in m.standard_onnx.parent.rglob("*") if f.is_file())
    monkeypatch.setenv("SR_CACHE_MAX_MB", str(2 * held * 1.05 / 2**20))  # uploads' half: room for these two only
    shipped = tmp_path / "cache" / "int8" / "shipped-entry"
    shipped.mkdir(parents=True)
    (shipped / "model.qdq.onnx").write_bytes(b"x" * 4 * held)  # the lab's own: over the cap by itself
    with pytest.raises(UserModelError, match="full of models other visitors are using"):
        register_onnx(standins.conv_stack(tmp_path / "third.onnx", 23, 8))
    assert all(lookup(model.name) is not None for model in made) and shipped.is_dir()
    old = made[0].standard_onnx.parent
    os.utime(old, (time.time() - HOLD_SECONDS - 60,) * 2)
    third = register_onnx(standins.conv_stack(tmp_path / "third.onnx", 23, 8))
    assert not old.exists() and lookup(made[1].name) is not None and lookup(third.name) is not None
    assert shipped.is_dir()
