import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import free_port
import torch
from PIL import Image

from sr.tune.distill import DistillConfig, KDMode, distill
from sr.model.networks import FinalActivation, build_model
from sr.model.weights import load_model, read_metadata, save_weights
from sr.tune.train import TrainConfig, charbonnier, train

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def tiny_data(tmp_path, photo):
    folder = tmp_path / "images"
    folder.mkdir()
    for index in range(3):
        Image.fromarray(np.roll(photo, 7 * index, axis=1)).save(folder / f"{index}.png")
    return folder


def _config(folder, out, **kwargs):
    fields = dict(arch="xlsr", scale=2, train_dirs=[str(folder)], val_dir=str(folder), out=str(out), steps=60,
                  batch_size=8, lr_patch=12, max_lr=3e-3, val_every=30, checkpoint_every=30, device="cpu")
    fields.update(kwargs)
    return fields


def test_training_lowers_the_loss(tiny_data, tmp_path):
    losses = []
    result = train(TrainConfig(**_config(tiny_data, tmp_path / "m.safetensors")),
                   on_record=lambda event: losses.append(event["loss"]))
    assert result.steps == 60 and losses[-1] < losses[0]
    assert [h["step"] for h in result.history] == [30, 60] and all("val_psnr" in h for h in result.history)
    metadata = read_metadata(result.weights)
    assert metadata["steps"] == 60 and metadata["train"]["lr_patch"] == 12


def test_resume_continues_from_checkpoint(tiny_data, tmp_path):
    out = tmp_path / "r.safetensors"
    stop_after = iter(range(100))
    first = train(TrainConfig(**_config(tiny_data, out)), should_stop=lambda: next(stop_after) >= 30)
    assert first.steps == 30
    second = train(TrainConfig(**_config(tiny_data, out, resume=True)))
    assert second.steps == 60 and second.history[0]["step"] == 30


class _Crash(Exception):
    pass


def _interrupt_after(steps: int, crash: bool):
    calls = iter(range(10_000))

    def should_stop() -> bool:
        if next(calls) < steps:
            return False
        if crash:
            raise _Crash  # dies like a killed job: no final checkpoint, steps after the last one are lost
        return True

    return should_stop


@pytest.mark.parametrize("crash", [False, True], ids=["stopped", "crashed"])
def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tiny_data, tmp_path, crash):
    """Interrupted after step 25 (stopped: checkpoint at 25; crashed: the loop's checkpoint at 20) and resumed,
    a run must end bit for bit where the same run ends without the interruption: the checkpoint carries the
    model, Adam, the one-cycle schedule, the patch sampler's random state and the running loss. torch.equal,
    not allclose: on CPU with the same thread count, the same batches and states give the same operations in
    the same order, so any difference is a state the checkpoint lost (the sampler stream used to restart)."""
    fields = dict(steps=50, checkpoint_every=20, val_every=25, val_dir=None)
    whole = train(TrainConfig(**_config(tiny_data, tmp_path / "whole.safetensors", **fields)))
    out = tmp_path / "parts.safetensors"
    if crash:
        with pytest.raises(_Crash):
            train(TrainConfig(**_config(tiny_data, out, **fields)), should_stop=_interrupt_after(25, crash))
    else:
        train(TrainConfig(**_config(tiny_data, out, **fields)), should_stop=_interrupt_after(25, crash))
    assert torch.load(Path(f"{out}").with_suffix(".ckpt.pt"), weights_only=True)["step"] == (20 if crash else 25)
    resumed = train(TrainConfig(**_config(tiny_data, out, resume=True, **fields)))
    assert resumed.steps == 50
    expected, actual = load_model(whole.weights).state_dict(), load_model(resumed.weights).state_dict()
    assert expected.keys() == actual.keys()
    different = [name for name in expected if not torch.equal(expected[name], actual[name])]
    assert not different, f"resumed weights differ from the uninterrupted run in {different}"
    assert resumed.history == whole.history  # the running loss was carried over too


def test_distillation_uses_the_teacher(tiny_data, tmp_path):
    torch.manual_seed(0)
    bright, dark = build_model("teacher", scale=2, num_blocks=1), build_model("teacher", scale=2, num_blocks=1)
    with torch.no_grad():
        bright.tail.bias.fill_(1.0)  # outputs ~1 everywhere
        dark.tail.weight.zero_()
        dark.tail.bias.fill_(-1.0)  # outputs 0 (ReLU)
    students = {}
    for name, teacher in (("bright", bright), ("dark", dark)):
        save_weights(teacher, tmp_path / f"{name}.safetensors")
        result = distill(DistillConfig(**_config(tiny_data, tmp_path / f"s-{name}.safetensors", steps=40,
                                                 val_dir=None), teacher=str(tmp_path / f"{name}.safetensors"),
                                       alpha=0.0))
        students[name] = load_model(result.weights)(torch.rand(1, 3, 16, 16)).mean().item()
    assert students["bright"] > students["dark"] + 0.2  # pure distillation follows the teacher, not the data
    assert "bright.safetensors" in read_metadata(tmp_path / "s-bright.safetensors")["distilled_from"]


@pytest.fixture
def tiny_teacher(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "tiny-teacher.safetensors"
    save_weights(build_model("teacher", scale=2, num_blocks=1, channels=16), path)
    return path


@pytest.mark.parametrize("mode", [m.value for m in KDMode])
def test_each_distillation_mode_trains_and_is_recorded(mode, tiny_data, tiny_teacher, tmp_path):
    losses = []
    out = tmp_path / f"{mode}.safetensors"
    result = distill(DistillConfig(**_config(tiny_data, out, steps=12, val_every=6, max_lr=1e-3),
                                   teacher=str(tiny_teacher), kd_mode=mode),
                     on_record=lambda event: losses.append(event["loss"]))
    assert result.steps == 12 and losses and all(np.isfinite(losses))
    metadata = read_metadata(out)
    assert metadata["kd_mode"] == mode and metadata["train"]["kd_mode"] == mode
    assert "tiny-teacher" in metadata["distilled_from"]
    student = load_model(out)  # the feature mode's adapter is not in the student's file
    assert set(student.state_dict()) == set(build_model("xlsr", scale=2).state_dict())
    checkpoint = torch.load(out.with_suffix(".ckpt.pt"), weights_only=True)
    assert (set(checkpoint["distiller"]) == {"fitted", "adapter.weight", "adapter.bias"}) == (mode == "feature")


def test_feature_distillation_resumes_exactly(tiny_data, tiny_teacher, tmp_path):
    """The adapter (and its least-squares start) is in the checkpoint: a resumed feature-KD run ends bit for bit
    where the uninterrupted one does."""
    fields = dict(steps=16, checkpoint_every=8, val_every=8, val_dir=None)
    kd = dict(teacher=str(tiny_teacher), kd_mode="feature")
    whole = distill(DistillConfig(**_config(tiny_data, tmp_path / "whole.safetensors", **fields), **kd))
    out = tmp_path / "parts.safetensors"
    distill(DistillConfig(**_config(tiny_data, out, **fields), **kd), should_stop=_interrupt_after(8, False))
    resumed = distill(DistillConfig(**_config(tiny_data, out, resume=True, **fields), **kd))
    expected, actual = load_model(whole.weights).state_dict(), load_model(resumed.weights).state_dict()
    assert all(torch.equal(expected[name], actual[name]) for name in expected)


def test_training_on_degraded_inputs(tiny_data, tiny_teacher, tmp_path):
    clean = train(TrainConfig(**_config(tiny_data, tmp_path / "c.safetensors", steps=4, val_every=4)))
    strong = distill(DistillConfig(**_config(tiny_data, tmp_path / "s.safetensors", steps=4, val_every=4,
                                             degradation="strong"), teacher=str(tiny_teacher), kd_mode="upcycled"))
    assert read_metadata(strong.weights)["train"]["degradation"] == "strong"
    assert strong.history[-1]["val_psnr"] < clean.history[-1]["val_psnr"]  # validated on degraded inputs too


def test_config_errors(tmp_path):
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        TrainConfig(steps=0)
    with pytest.raises(ValueError, match="unknown final activation 'tanh'; choose one of: relu, clipped_relu, linear"):
        TrainConfig(final_activation="tanh", train_dirs=[str(tmp_path / "nowhere")])  # fails before any I/O
    assert TrainConfig(final_activation=FinalActivation.CLIPPED_RELU).final_activation == "clipped_relu"
    with pytest.raises(ValueError, match="alpha must be in"):
        DistillConfig(alpha=2.0)
    with pytest.raises(ValueError, match="unknown distillation mode 'logits'; choose one of: output, upcycled, feature"):
        DistillConfig(kd_mode="logits")
    with pytest.raises(ValueError, match="unknown degradation 'blurry'"):
        TrainConfig(degradation="blurry")
    assert TrainConfig(degradation="blur=1,noise=8,jpeg=40").degradation == "strong"
    with pytest.raises(FileNotFoundError, match="no such image folder"):
        train(TrainConfig(**_config(tmp_path / "nowhere", tmp_path / "x.safetensors")))
    assert charbonnier(torch.zeros(3), torch.zeros(3)).item() == pytest.approx(1e-3)


@pytest.mark.slow
def test_one_rank_stopping_stops_all_ranks(tiny_data, tmp_path):
    """Under torchrun a stop decided by one rank alone (a cancel, its own clock past --max-seconds) is agreed by
    all: the run ends, its weights saved, instead of the other rank waiting in the gradient all-reduce for good."""
    script = tmp_path / "ddp_run.py"
    script.write_text(DDP_SCRIPT)
    out = tmp_path / "stopped.safetensors"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
               "127.0.0.1", "--master_port", str(free_port()), str(script), str(tiny_data), str(out), "rank1-stops"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    try:
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("the ranks deadlocked when one of them stopped alone")
    assert done.returncode == 0, done.stderr[-3000:]
    assert read_metadata(out)["steps"] == 5


DDP_SCRIPT = """
import os
import sys
from sr.tune.train import TrainConfig, train

folder, out, mode = sys.argv[1:4]
config = TrainConfig(arch="xlsr", scale=2, train_dirs=[folder], val_dir=None, out=out, steps=20, batch_size=4,
                     lr_patch=12, checkpoint_every=10, val_every=10, device="cpu", resume=mode == "resume")
calls = iter(range(1000))

def crash_after_12():
    call = next(calls)
    if mode == "crash" and call >= 12:
        raise SystemExit(3)  # every rank dies at the same step; the checkpoint of step 10 survives
    return mode == "rank1-stops" and os.environ["RANK"] == "1" and call >= 5  # only one rank wants to stop

train(config, should_stop=crash_after_12)
"""


@pytest.mark.slow
def test_two_process_resume_gives_the_same_weights(tiny_data, tmp_path):
    """Under torchrun (gloo on the CPU, the CLI's train command) each rank draws its own patch stream; the checkpoint
    keeps all of them (gathered to rank 0), and a run that crashed resumes to the uninterrupted run's weights."""
    script = tmp_path / "ddp_run.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}

    def torchrun(out, mode):
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                   "127.0.0.1", "--master_port", str(free_port()), str(script), str(tiny_data), str(out), mode]
        return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)

    # the uninterrupted run, through the CLI under torchrun: the same run as the script's (validating on rank 0,
    # which changes no weight)
    whole = tmp_path / "whole.safetensors"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
               "127.0.0.1", "--master_port", str(free_port()),
               "-m", "sr", "train", "--arch", "xlsr", "--scale", "2", "--train-dirs", str(tiny_data),
               "--val-dir", str(tiny_data), "--steps", "20", "--batch-size", "4", "--lr-patch", "12",
               "--val-every", "10", "--checkpoint-every", "10", "--device", "cpu", "--out", str(whole)]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert read_metadata(whole)["steps"] == 20
    assert [h["step"] for h in read_metadata(whole)["history"] if "val_psnr" in h] == [10, 20]  # rank 0 validates
    checkpoint = torch.load(whole.with_suffix(".ckpt.pt"), weights_only=True)
    assert len(checkpoint["sampler"]) == 2  # each rank's patch stream, for an exact resume
    assert checkpoint["sampler"][0] != checkpoint["sampler"][1]
    parts = tmp_path / "parts.safetensors"
    assert torchrun(parts, "crash").returncode != 0 and not parts.exists()
    done = torchrun(parts, "resume")
    assert done.returncode == 0, done.stderr[-3000:]
    expected = load_model(tmp_path / "whole.safetensors").state_dict()
    actual = load_model(parts).state_dict()
    assert all(torch.equal(expected[name], actual[name]) for name in expected)


@pytest.mark.parametrize("steps", [1, 2, 3, 10, 11, 20])
def test_short_schedules_run(steps, tiny_data, tmp_path):
    """Any step count from 1 works (10 steps used to divide by zero inside OneCycleLR)."""
    result = train(TrainConfig(**_config(tiny_data, tmp_path / "s.safetensors", steps=steps, val_dir=None)))
    assert result.steps == steps


def test_default_training_folders_come_from_the_project_and_missing_ones_say_what_to_give(tmp_path, monkeypatch):
    """The defaults do not depend on the working directory; $SR_TRAIN_DIRS wins; a missing folder is named with
    where training images can come from (it used to say only "no such image folder: ../shared/data/T91")."""
    from sr.tune.train import SHARED_DATA, default_training_dirs

    monkeypatch.delenv("SR_TRAIN_DIRS", raising=False)
    monkeypatch.chdir(tmp_path)
    assert default_training_dirs() == [str(SHARED_DATA / "T91"), str(SHARED_DATA / "BSD200")]
    assert SHARED_DATA.is_absolute() and (SHARED_DATA / "T91").is_dir()  # found from here, another folder
    monkeypatch.setenv("SR_TRAIN_DIRS", os.pathsep.join(["/a", "/b"]))
    assert TrainConfig(out=str(tmp_path / "x.safetensors")).train_dirs == ["/a", "/b"]
    with pytest.raises(FileNotFoundError, match=r"no such image folder: /a \(training needs .*--train-dirs, or SR_TRAIN_DIRS"):
        train(TrainConfig(out=str(tmp_path / "x.safetensors"), steps=1, val_dir=None))
