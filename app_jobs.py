"""Training and distillation jobs of the app (not the library).

Off unless the operator enables them (`python app.py --allow-training`, or SR_ALLOW_TRAINING=1): a public Space
must not let anonymous users spend its CPU. When on, jobs run one at a time in a background thread, in the order
they were asked for (a waiting job shows its place in the queue); each belongs to the browser tab that started
it (only that tab can cancel it); steps are capped; each owner keeps at most a few finished models in runs/ and
the folder as a whole is capped, oldest first.
"""
from __future__ import annotations

import os
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from sr import store
from sr.distill import DistillConfig, KDMode, distill
from sr.train import TrainConfig, train

MAX_STEPS = 5_000  # about 10 minutes of XLSR on two CPU cores
MAX_RUNS_PER_OWNER = 3
MAX_RUNS = 20


@dataclass
class Policy:
    """What the operator allows."""

    enabled: bool = os.environ.get("SR_ALLOW_TRAINING", "") == "1"
    max_steps: int = MAX_STEPS


POLICY = Policy()


def training_dirs() -> list[str]:
    """Training folders: $SR_TRAIN_DIRS (os.pathsep-separated) or the shared T91 + BSD200."""
    if os.environ.get("SR_TRAIN_DIRS"):
        return os.environ["SR_TRAIN_DIRS"].split(os.pathsep)
    return [str(store.PROJECT_ROOT.parent / "shared" / "data" / name) for name in ("T91", "BSD200")]


@dataclass
class Snapshot:
    """What the owner's page shows: a status line, the loss/validation history, and whether it is over."""

    status: str
    history: list[dict]
    done: bool


@dataclass
class Job:
    """One training or distillation run, owned by a browser session."""

    name: str
    owner: str
    steps: int
    final_activation: str
    use_teacher: bool
    alpha: float
    kd_mode: str = "output"  # sr.distill.KDMode value; used only with the teacher
    history: list[dict] = field(default_factory=list)
    status: str = "queued"
    done: bool = False
    stop: threading.Event = field(default_factory=threading.Event)
    error: str | None = None

    @property
    def weights(self) -> Path:
        """Where the trained model goes."""
        return store.RUNS_DIR / f"{self.name}.safetensors"

    def stream(self, interval: float = 1.0):
        """Yield snapshots until the job ends (the last one included)."""
        while True:
            finished = self.done
            status = self.status
            if not finished and status == "queued":
                status = f"waiting: number {queue_position(self)} in the queue"
            yield Snapshot(status, list(self.history), finished)
            if finished:
                return
            time.sleep(interval)


_lock = threading.Lock()
_queue: deque[Job] = deque()
_running: Job | None = None
_worker: threading.Thread | None = None


def queue_position(job: Job) -> int:
    """1 for the next job to run, 0 when it is running or done."""
    with _lock:
        return next((index + 1 for index, queued in enumerate(_queue) if queued is job), 0)


def start(owner: str, steps: int, final_activation: str, use_teacher: bool, alpha: float = 0.5,
          kd_mode: str = "output") -> Job:
    """Queue a job for `owner`.

    Raises:
        PermissionError: training is off on this deployment.
        ValueError: steps out of range, an unknown activation or distillation mode, or this owner already has a
            job queued or running.
    """
    if not POLICY.enabled:
        raise PermissionError("Training is off on this deployment (the operator can start the app with "
                              "--allow-training).")
    if not 1 <= steps <= POLICY.max_steps:
        raise ValueError(f"steps must be between 1 and {POLICY.max_steps}, got {steps}")
    TrainConfig(final_activation=final_activation)  # validates the activation before anything is queued
    kd_mode = KDMode.parse(kd_mode).value
    global _worker
    with _lock:
        mine = [job for job in [_running, *_queue] if job is not None and job.owner == owner and not job.done]
        if mine:
            raise ValueError(f"you already have a job ({mine[0].name}); wait for it or cancel it")
        kind = (f"kd-{kd_mode}" if kd_mode != "output" else "kd") if use_teacher else "train"
        name = (f"xlsr-{final_activation.replace('clipped_relu', 'clip')}-{kind}-{steps}-"
                f"{owner[:8]}-{time.strftime('%H%M%S')}")
        job = Job(name, owner, steps, final_activation, use_teacher, alpha, kd_mode)
        _queue.append(job)
        if _worker is None or not _worker.is_alive():
            _worker = threading.Thread(target=_work, name="training-jobs", daemon=True)
            _worker.start()
    return job


def cancel(owner: str) -> str:
    """Cancel `owner`'s queued or running job (nobody else's)."""
    with _lock:
        for job in [_running, *_queue]:
            if job is not None and job.owner == owner and not job.done:
                job.stop.set()
                if job in _queue:
                    _queue.remove(job)
                    job.status, job.done = "cancelled before it started", True
                return f"cancelling {job.name} (its weights so far are kept)"
    return "you have no job running"


def _work() -> None:
    global _running
    while True:
        with _lock:
            if not _queue:
                _running = None
                return
            job = _running = _queue.popleft()
        _run(job)
        _prune_runs(job.owner)


def _run(job: Job) -> None:
    fields = dict(arch="xlsr", final_activation=job.final_activation, train_dirs=training_dirs(), val_dir=None,
                  out=str(job.weights), steps=job.steps, batch_size=16, lr_patch=32,
                  val_every=max(1, job.steps // 5), checkpoint_every=10**9, device="cpu")
    validation = store.PROJECT_ROOT.parent / "shared" / "data" / "Set5"
    if validation.is_dir():
        fields["val_dir"] = str(validation)

    def on_progress(event: dict) -> None:
        job.history.append(event)
        job.status = f"step {event['step']} of {job.steps}, loss {event['loss']:.4f}" + (
            f", validation PSNR {event['val_psnr']:.2f} dB" if "val_psnr" in event else "")

    job.status = "starting"
    try:
        if job.use_teacher:
            distill(DistillConfig(**fields, teacher="teacher", alpha=job.alpha, kd_mode=job.kd_mode), on_progress,
                    job.stop.is_set)
        else:
            train(TrainConfig(**fields), on_progress, job.stop.is_set)
        job.status = ("cancelled; " if job.stop.is_set() else "done; ") + f"saved as runs/{job.weights.name}"
    except Exception as error:  # reported in the UI, never raised into the server
        job.error = job.status = f"failed: {type(error).__name__}: {error}"
    finally:
        Path(f"{job.weights}").with_suffix(".ckpt.pt").unlink(missing_ok=True)
        job.done = True


def _prune_runs(owner: str) -> None:
    """Keep each owner's newest MAX_RUNS_PER_OWNER models and the newest MAX_RUNS overall."""
    runs = sorted(store.RUNS_DIR.glob("*.safetensors"), key=lambda p: p.stat().st_mtime, reverse=True)
    tag = f"-{owner[:8]}-"
    mine = [p for p in runs if tag in p.name]
    for path in mine[MAX_RUNS_PER_OWNER:] + runs[MAX_RUNS:]:
        path.unlink(missing_ok=True)
