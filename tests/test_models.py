import json

import pytest
import torch

from sr.model.networks import XLSR, FinalActivation, build_model, count_parameters
from sr.model.weights import load_model, read_metadata, save_weights, shipped_models


@pytest.mark.parametrize("arch", ["xlsr", "teacher"])
@pytest.mark.parametrize("scale", [2, 3, 4])
def test_output_shapes(arch, scale):
    model = build_model(arch, scale=scale, num_blocks=2) if arch == "teacher" else build_model(arch, scale=scale)
    assert model(torch.rand(2, 3, 9, 11)).shape == (2, 3, 9 * scale, 11 * scale)


def test_xlsr_size_and_final_activations():
    assert 21_000 <= count_parameters(XLSR()) <= 23_000
    x = torch.randn(1, 3, 16, 16) * 4
    torch.manual_seed(0)
    outputs = {}
    for activation in ("relu", "clipped_relu", "linear"):
        torch.manual_seed(0)
        outputs[activation] = build_model("xlsr", final_activation=activation)(x)
    assert outputs["relu"].min() >= 0 and outputs["linear"].min() < 0
    assert outputs["clipped_relu"].min() >= 0 and outputs["clipped_relu"].max() <= 1
    assert torch.allclose(outputs["clipped_relu"], outputs["linear"].clamp(0, 1))
    assert 300_000 <= count_parameters(build_model("teacher")) <= 1_500_000


def test_bad_configs():
    with pytest.raises(ValueError, match="unknown architecture 'edsr'; choose one of: xlsr, teacher"):
        build_model("edsr")
    with pytest.raises(ValueError, match="scale must be one of"):
        build_model("xlsr", scale=5)
    with pytest.raises(ValueError, match="unknown final activation 'tanh'; choose one of: relu, clipped_relu, linear"):
        build_model("xlsr", final_activation="tanh")
    assert FinalActivation.parse("clipped_relu") is FinalActivation.parse(FinalActivation.CLIPPED_RELU)


def test_weight_file_describes_itself(tmp_path):
    model = build_model("xlsr", scale=2, final_activation="clipped_relu")
    path = save_weights(model, tmp_path / "m.safetensors", extra={"steps": 7})
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]  # no temp file left behind
    metadata = read_metadata(path)
    assert metadata["arch"] == "xlsr" and metadata["steps"] == 7
    assert metadata["config"]["final_activation"] == "clipped_relu"
    loaded = load_model(path)
    x = torch.rand(1, 3, 8, 8)
    assert torch.equal(loaded(x), model.eval()(x))


def test_wrong_model_files(tmp_path):
    (tmp_path / "junk.safetensors").write_bytes(b"definitely not safetensors")
    with pytest.raises(ValueError, match="not a safetensors weight file"):
        load_model(tmp_path / "junk.safetensors")
    with pytest.raises(FileNotFoundError, match="not a shipped model"):
        load_model("no-such-model")
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(1)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(ValueError, match="no 'arch'/'config' metadata"):
        load_model(tmp_path / "foreign.safetensors")


def test_shipped_weights_are_complete():
    assert set(shipped_models()) >= {"teacher", "xlsr-relu", "xlsr-clip", "xlsr-relu-kd", "xlsr-clip-kd"}
    for name in ("xlsr-relu-kd", "xlsr-clip-kd"):
        assert "teacher" in json.dumps(read_metadata(name)["distilled_from"])
