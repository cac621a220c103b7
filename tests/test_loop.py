"""sr.tune.loop, the one training loop of train, distill and QAT, on a run of its own: a one-parameter model fitted
to the patches' mean, so each behaviour shows in a few steps."""
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from sr.data import PatchSampler
from sr.tune.loop import LoopState, checkpoint, continue_stream, final_validation, restore, run_loop


@dataclass
class _Config:
    out: str
    steps: int = 12
    val_every: int = 4
    checkpoint_every: int = 4
    max_seconds: float | None = None
    seed: int = 0
    resume: bool = False

    @property
    def checkpoint_path(self) -> Path:
        return Path(f"{self.out}.ckpt.pt")


@dataclass(kw_only=True)
class _Run(LoopState):
    poison_at: int | None = None  # the step whose loss is NaN

    def train_step(self) -> torch.Tensor:
        lr, _ = self.sampler.batch(2)
        loss = ((self.model.weight.sum() - lr.mean()) ** 2)
        if self.step == self.poison_at:
            loss = loss * float("nan")
        self.take_step(loss)
        return loss.detach()


class _Validator:
    def __call__(self, model, device):
        return float(-abs(model.weight.detach().sum()))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("loop-images")
    rng = np.random.default_rng(0)
    for index in range(2):
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), np.uint8)).save(folder / f"{index}.png")
    return str(folder)


def _run(images, tmp_path, **settings) -> _Run:
    config = _Config(out=str(tmp_path / "model"), **{k: v for k, v in settings.items() if k != "poison_at"})
    torch.manual_seed(0)
    model = nn.Linear(1, 1, bias=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    run = _Run(config=config, rank=0, world=1, device=torch.device("cpu"), model=model, trainable=model,
               optimizer=optimizer, scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0),
               sampler=PatchSampler([images], 2, 8, seed=0), validator=_Validator(),
               poison_at=settings.get("poison_at"))
    restore(run)
    continue_stream(run)
    return run


def test_the_loop_steps_validates_reports_and_checkpoints(images, tmp_path):
    run, events = _run(images, tmp_path), []
    run_loop(run, "test", on_record=events.append)
    final_validation(run)
    assert run.step == 12 and [h["step"] for h in run.history] == [4, 8, 12]  # no second validation at the end
    assert all("val_psnr" in h for h in run.history) and [e["step"] for e in events] == [4, 8, 12]
    assert Path(run.config.checkpoint_path).is_file()  # written at steps 4 and 8


def test_a_resumed_run_ends_where_the_uninterrupted_one_does(images, tmp_path):
    whole = _run(images, tmp_path / "whole")
    (tmp_path / "whole").mkdir()
    run_loop(whole, "whole")
    (tmp_path / "parts").mkdir()
    first = _run(images, tmp_path / "parts", steps=12)
    run_loop(first, "first", should_stop=lambda: first.step == 8)  # stopped on request after the step-8 checkpoint
    assert first.step == 8
    second = _run(images, tmp_path / "parts", resume=True)
    assert second.step == 8 and len(second.history) == 2
    run_loop(second, "second")
    assert torch.equal(second.model.weight, whole.model.weight)


def test_a_nan_loss_stops_the_run_in_words(images, tmp_path):
    run = _run(images, tmp_path, poison_at=3)  # (the loss is read every val_every steps: here at step 4)
    with pytest.raises(FloatingPointError, match="the loss became nan at step 4; lower the learning rate"):
        run_loop(run, "nan")


def test_the_time_budget_ends_the_loop(images, tmp_path):
    run = _run(images, tmp_path, steps=10_000, max_seconds=0.0)
    run_loop(run, "budget")
    assert run.step <= 1
    checkpoint(run)  # what the caller then saves: the step it reached
    assert torch.load(run.config.checkpoint_path, weights_only=True)["step"] == run.step
