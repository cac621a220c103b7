"""Training and distillation jobs of the app (not the library): one at a time, in a background thread, cancellable."""
from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field

from sr import store
from sr.distill import DistillConfig, distill
from sr.train import TrainConfig, train

ROOT = store.PROJECT_ROOT


def training_dirs() -> list[str]:
    """Training folders: $SR_TRAIN_DIRS (os.pathsep-separated) or the shared T91 + BSD200."""
    if os.environ.get("SR_TRAIN_DIRS"):
        return os.environ["SR_TRAIN_DIRS"].split(os.pathsep)
    return [str(ROOT.parent / "shared" / "data" / name) for name in ("T91", "BSD200")]


@dataclass
class Snapshot:
    status: str
    history: list[dict]
    done: bool


@dataclass
class Job:
    name: str
    steps: int
    history: list[dict] = field(default_factory=list)
    status: str = "starting"
    done: bool = False
    stop: threading.Event = field(default_factory=threading.Event)
    error: str | None = None

    def stream(self, interval: float = 1.0):
        """Yield snapshots until the job ends (the last one included)."""
        while True:
            finished = self.done
            yield Snapshot(self.status, list(self.history), finished)
            if finished:
                return
            time.sleep(interval)


_lock = threading.Lock()
_current: Job | None = None


def start(steps: int, final_activation: str, use_teacher: bool, alpha: float = 0.5) -> Job:
    """Start a job unless one is running (RuntimeError). The result goes to runs/<name>.safetensors."""
    global _current
    if not 10 <= steps <= 100_000:
        raise RuntimeError(f"steps must be between 10 and 100000, got {steps}")
    with _lock:
        if _current is not None and not _current.done:
            raise RuntimeError(f"a job is already running ({_current.name}); wait for it or cancel it")
        kind = "kd" if use_teacher else "train"
        name = f"xlsr-{final_activation.replace('clipped_relu', 'clip')}-{kind}-{steps}-{time.strftime('%H%M%S')}"
        job = _current = Job(name, steps)
    fields = dict(arch="xlsr", final_activation=final_activation, train_dirs=training_dirs(), val_dir=None,
                  out=str(store.RUNS_DIR / f"{name}.safetensors"), steps=steps, batch_size=16, lr_patch=32,
                  val_every=max(10, steps // 5), checkpoint_every=10**9, device="cpu")
    validation = ROOT.parent / "shared" / "data" / "Set5"
    if validation.is_dir():
        fields["val_dir"] = str(validation)

    def on_progress(event: dict) -> None:
        job.history.append(event)
        job.status = f"step {event['step']} of {steps}, loss {event['loss']:.4f}" + (
            f", validation PSNR {event['val_psnr']:.2f} dB" if "val_psnr" in event else "")

    def work() -> None:
        try:
            if use_teacher:
                distill(DistillConfig(**fields, teacher="teacher", alpha=alpha), on_progress, job.stop.is_set)
            else:
                train(TrainConfig(**fields), on_progress, job.stop.is_set)
            job.status = ("cancelled; " if job.stop.is_set() else "done; ") + f"saved as runs/{name}.safetensors"
        except Exception as error:  # reported in the UI, never raised into the server
            job.error = job.status = f"failed: {type(error).__name__}: {error}"
        finally:
            job.done = True

    threading.Thread(target=work, name=name, daemon=True).start()
    return job


def cancel() -> str:
    with _lock:
        if _current is None or _current.done:
            return "no job is running"
        _current.stop.set()
        return f"cancelling {_current.name} (its weights so far are kept)"
