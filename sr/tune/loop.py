"""The one training loop, shared by training from scratch, distillation (`sr.tune.train.fit`) and quantization-aware
fine-tuning (`sr.tune.qat`): steps until the step count or the time budget, the running loss (a NaN stops the run in
words), validation and progress every `val_every` / 50 steps, checkpoints with the patch stream's state for an
exact resume, and torchrun (the ranks vote on stopping, and leave the process group cleanly).

A run is a `LoopState` subclass that says what one step is (`train_step`), what its checkpoint holds besides the
common state (`own_state` / `load_own_state`) and what a validation reports (`validation_line`, `after_validation`,
`progress_extra`).
"""
from __future__ import annotations

import logging
import math
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from ..progress import Progress, logged_progress
from ..store import atomic_path

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class LoopState:
    """What a run carries from one step to the next. `config` needs `steps`, `val_every`, `checkpoint_every`,
    `max_seconds`, `seed`, `resume` and `checkpoint_path`."""

    config: object
    rank: int
    world: int
    device: torch.device
    model: nn.Module  # the module trained (its state is checkpointed)
    trainable: nn.Module  # `model`, or its DistributedDataParallel wrapper
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    sampler: object | None = None  # sr.data.PatchSampler
    validator: object | None = None  # sr.tune.train.Validator, on rank 0
    step: int = 0
    history: list[dict] = field(default_factory=list)
    running_loss: float | None = None
    elapsed_before: float = 0.0  # loop seconds of the runs this one resumes
    started: float = 0.0  # perf_counter() when the loop began
    restored_sampler_states: list[dict] | None = None  # one per rank, from the checkpoint
    loss_digits: int = 4

    def wall_seconds(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.started

    def train_step(self) -> torch.Tensor:
        """One batch: forward, loss, backward, the optimizer and the schedule; returns the loss."""
        raise NotImplementedError

    def own_state(self) -> dict:
        """What the checkpoint holds besides the common state (the model's weights, under the run's own key)."""
        return {"model": self.model.state_dict()}

    def load_own_state(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])

    def validate(self) -> float:
        """The validation PSNR of the model now (the validator puts it in eval mode for the call, and back)."""
        return self.validator(self.model, self.device)

    def validation_line(self, psnr: float) -> str:
        return f"step {self.step}: loss {self.running_loss:.{self.loss_digits}f}, validation PSNR {psnr:.3f} dB"

    def after_validation(self, psnr: float) -> None:
        """Called with each validation's PSNR (QAT keeps its best weights here)."""

    def progress_extra(self) -> dict:
        """Extra fields of every progress event."""
        return {}

    def learning_rate_hint(self) -> str:
        """What to lower when the loss blows up, in words (the setting and its value)."""
        return "lower the learning rate"

    def take_step(self, loss: torch.Tensor) -> None:
        """Backward, the optimizer and the schedule, and the step count."""
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1


def run_loop(run: LoopState, desc: str, on_record: Callable[[dict], None] | None = None,
             should_stop: Callable[[], bool] | None = None, progress: Progress | None = None) -> None:
    """Step `run` until its step count, its time budget or `should_stop()`; validating, reporting and writing
    checkpoints on the way (the final validation and checkpoint are the caller's, with its result).

    Args:
        run: the run.
        desc: what the run is, in words (its progress lines start with it).
        on_record: handed each measurement on rank 0 (`{"step", "steps", "loss", "val_psnr"?}` every 50 steps
            and at each validation): data, for a page that plots it.
        should_stop: polled before every step; True ends the run early.
        progress: told how far the run is (`sr.progress.Progress`; on rank 0, logged by default): the budget's
            share for a run its time budget ends sooner than its step count (int8-ready's QAT), else the steps'.
    """
    config = run.config
    timed = config.max_seconds is not None and config.max_seconds < 3600
    if run.rank != 0:
        progress = None
    elif progress is None:
        progress = logged_progress(f"{desc} (time budget)" if timed else desc)
    run.model.train()
    run.started = time.perf_counter()  # the loop's clock (max_seconds, wall time) starts after data loading
    while run.step < config.steps and not should_end(run, should_stop):
        loss = run.train_step()
        track_loss(run, loss)
        if progress is not None:
            done = (time.perf_counter() - run.started) / config.max_seconds if timed else run.step / config.steps
            progress(min(1.0, done), f"step {run.step} of {config.steps}, loss "
                                     f"{run.running_loss:.{run.loss_digits}f}")
        report(run, on_record)
        if run.step % config.checkpoint_every == 0 and run.step < config.steps:
            checkpoint(run)


def track_loss(run: LoopState, loss: torch.Tensor) -> None:
    """Fold the loss into the running average every 10 steps (a device sync), and at validations and the end."""
    step, config = run.step, run.config
    if run.running_loss is None or step % 10 == 0 or step % config.val_every == 0 or step == config.steps:
        value = float(loss.detach())
        if not math.isfinite(value):
            raise FloatingPointError(f"the loss became {value} at step {step}; {run.learning_rate_hint()}")
        run.running_loss = value if run.running_loss is None else 0.9 * run.running_loss + 0.1 * value


def report(run: LoopState, on_record: Callable[[dict], None] | None) -> None:
    """On rank 0: validate every `val_every` steps and at the end (into the history); report every 50 steps."""
    step, config = run.step, run.config
    if run.rank != 0:
        return
    event = None
    if step % config.val_every == 0 or step == config.steps:
        event = {"step": step, "loss": run.running_loss}
        if run.validator is not None:
            event["val_psnr"] = run.validate()
            run.after_validation(event["val_psnr"])
            log.info("%s", run.validation_line(event["val_psnr"]))
        run.history.append(event)
    elif step % 50 == 0:
        event = {"step": step, "loss": run.running_loss}
    if event is not None and on_record is not None:
        on_record({**event, "steps": config.steps, **run.progress_extra()})


def final_validation(run: LoopState) -> None:
    """On rank 0, a validation at the last step unless the loop just made one."""
    if run.rank == 0 and run.validator is not None and (not run.history or run.history[-1]["step"] != run.step):
        psnr = run.validate()
        run.history.append({"step": run.step, "loss": run.running_loss, "val_psnr": psnr})
        run.after_validation(psnr)


def checkpoint(run: LoopState, wall_seconds: float | None = None) -> None:
    """Write the run's checkpoint (rank 0). Every rank must call it: the ranks' sampler states are gathered."""
    states = gather_states(run.sampler.rng.bit_generator.state, run.world)
    if run.rank == 0:
        state = {**run.own_state(), "optimizer": run.optimizer.state_dict(), "scheduler": run.scheduler.state_dict(),
                 "step": run.step, "history": run.history, "running_loss": run.running_loss, "sampler": states,
                 "wall_seconds": run.wall_seconds() if wall_seconds is None else wall_seconds}
        with atomic_path(Path(run.config.checkpoint_path)) as temp:
            torch.save(state, temp)


def restore(run: LoopState) -> None:
    """Load the run's checkpoint when `config.resume` is set and it exists (the patch stream continues exactly
    where it was, given the same number of processes); then wrap the model for torchrun."""
    path = Path(run.config.checkpoint_path)
    if run.config.resume and path.is_file():
        state = torch.load(path, map_location=run.device, weights_only=True)
        run.load_own_state(state)
        run.optimizer.load_state_dict(state["optimizer"])
        run.scheduler.load_state_dict(state["scheduler"])
        run.step, run.history, run.elapsed_before = state["step"], state["history"], state["wall_seconds"]
        run.running_loss = state.get("running_loss")  # absent in checkpoints written before it was kept
        run.restored_sampler_states = state.get("sampler")
        log.info("resumed from %s at step %d", path, run.step)
    if run.world > 1:
        run.trainable = nn.parallel.DistributedDataParallel(run.model)


def continue_stream(run: LoopState) -> None:
    """The patch sampler's random stream: the checkpoint's, or each rank's own from the seed and step."""
    states = run.restored_sampler_states
    if states is not None and len(states) == run.world:
        run.sampler.rng.bit_generator.state = states[run.rank]  # continue the exact stream of the first run
        return
    if run.step and states is not None:
        log.warning("the checkpoint was written by %d processes, this run has %d: the patch stream restarts, so "
                    "the result will differ from an uninterrupted run", len(states), run.world)
    run.sampler.reseed(run.config.seed, run.rank, run.step)


def resolve_device(name: str) -> torch.device:
    """`auto` (CUDA when present, else the CPU), or the device named."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def distributed_rank() -> tuple[int, int]:
    """(rank, world size), initialising the process group when started by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return (dist.get_rank(), world) if world > 1 else (0, 1)


def should_end(run: LoopState, should_stop: Callable[[], bool] | None) -> bool:
    """Whether the loop ends before this step: on request, or when the time budget is spent. Under torchrun the
    ranks decide together (one all-reduce of their votes): a rank that stopped alone would leave the others
    waiting in the gradient all-reduce for good."""
    reason = None
    if should_stop is not None and should_stop():
        reason = "on request"
    max_seconds = run.config.max_seconds
    if reason is None and max_seconds is not None and time.perf_counter() - run.started > max_seconds:
        reason = f"time budget of {max_seconds:.0f} s reached"
    stop = reason is not None
    if run.world > 1:
        vote = torch.tensor([int(stop)], device=run.device)
        dist.all_reduce(vote, op=dist.ReduceOp.MAX)
        stop = bool(vote.item())
        reason = reason or "another process stopped"
    if stop:
        log.info("stopped at step %d: %s", run.step, reason)
    return stop


def gather_states(value: dict, world: int) -> list[dict]:
    """`value` from every rank, in rank order (a collective under torchrun)."""
    if world == 1:
        return [value]
    gathered: list = [None] * world
    dist.all_gather_object(gathered, value)
    return gathered


def end_distributed(run: LoopState) -> None:
    """Leave the process group cleanly: every rank at the barrier, then the DistributedDataParallel wrapper (its
    reducer owns threads of the group) freed before the group is destroyed. Destroying the group under a live
    wrapper let a rank abort at exit now and then ("terminate called without an active exception", SIGABRT)."""
    import gc

    dist.barrier()
    run.trainable = None
    gc.collect()
    dist.destroy_process_group()


def machine_name(device: torch.device) -> str:
    """What ran a job, for its record: the GPU's name, or the CPU and its thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
