"""Training and distillation jobs of the app (not the library).

Off unless the operator enables them (`python app.py --allow-training`, or SR_ALLOW_TRAINING=1): a public Space
must not let anonymous users spend its CPU. When on, jobs run one at a time in a background thread, in the order
they were asked for (a waiting job shows its place in the queue); each belongs to the owner token of the browser
that started it (issued and signed by the server, never the client's session hash; only its owner can cancel it);
steps and seconds are capped; a job whose page went away (nobody has read its progress for ABANDONED_SECONDS) is
dropped, or stopped when running. Each owner keeps at most a few finished models in runs/, named without any part
of the owner's token; the folder as a whole is capped, and another owner's model is evicted for it only once its
owner's hold (OWNED_SECONDS) has expired.
"""
from __future__ import annotations

import os
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from sr import store
from sr.tune.distill import DistillConfig, KDMode, distill
from sr.model.models import is_uploaded, model_info
from sr.lab.evaluate import score_written
from sr.tune.qat import QatConfig, quantization_aware_training
from sr.tune.train import TrainConfig, default_training_dirs, default_validation_dir, train
from sr.run.register import register_onnx

MAX_STEPS = 5_000  # about 10 minutes of XLSR on two CPU cores
MAX_RUNS_PER_OWNER = 3
MAX_RUNS = 20
MAX_JOB_SECONDS = 900.0  # a job's wall-time cap: it stops (weights so far kept) after this long
ABANDONED_SECONDS = 30.0  # a job nobody has watched for this long belongs to a page that went away
OWNED_SECONDS = 3600.0  # a finished model is its owner's alone (safe from others' eviction) for this long
QAT_EQUALIZE = 0.5  # the channel-equalization strength QAT starts from (the README's findings)
QAT_TEACHER_BETA = 0.25  # weight of the teacher term in teacher-guided QAT (scripts/kd_qat.py measures it)


@dataclass
class Policy:
    """What the operator allows."""

    enabled: bool = os.environ.get("SR_ALLOW_TRAINING", "") == "1"
    max_steps: int = MAX_STEPS
    max_seconds: float = MAX_JOB_SECONDS


POLICY = Policy()


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
    kd_mode: str = "output"  # sr.tune.distill.KDMode value; used only with the teacher
    base: str | None = None  # for a QAT job ("make it INT8-ready"): the model it fine-tunes
    history: list[dict] = field(default_factory=list)
    status: str = "queued"
    done: bool = False
    stop: threading.Event = field(default_factory=threading.Event)
    error: str | None = None
    result: str | None = None  # the model name to offer once done (a registered ONNX model's name)
    watched: float | None = None  # when its page last read its progress (None: a library caller, never abandoned)

    def abandoned(self) -> bool:
        """True when the page that watched this job has not read its progress for ABANDONED_SECONDS."""
        return self.watched is not None and time.monotonic() - self.watched > ABANDONED_SECONDS

    def should_stop(self) -> bool:
        """Cancelled, or its page went away."""
        return self.stop.is_set() or self.abandoned()

    @property
    def weights(self) -> Path:
        """Where the trained model goes (an ONNX model's QAT result is an .onnx file)."""
        return store.RUNS_DIR / f"{self.name}{model_info(self.base).tuned_suffix if self.base else '.safetensors'}"

    def stream(self, interval: float = 1.0):
        """Yield snapshots until the job ends (the last one included)."""
        while True:
            self.watched = time.monotonic()
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
    kind = (f"kd-{kd_mode}" if kd_mode != "output" else "kd") if use_teacher else "train"
    name = f"xlsr-{final_activation.replace('clipped_relu', 'clip')}-{kind}-{steps}-{_tag()}"
    return _enqueue(owner, lambda: Job(name, owner, steps, final_activation, use_teacher, alpha, kd_mode))


def start_qat(owner: str, model: str, steps: int, use_teacher: bool = False) -> Job:
    """Queue a QAT job ("make it INT8-ready") for `owner`, under the same policy and caps as training; with
    `use_teacher`, teacher-guided (the shipped x3 teacher, weight QAT_TEACHER_BETA).

    Raises:
        PermissionError: training is off on this deployment.
        ValueError: steps out of range, an unknown model, or this owner already has a job queued or running.
    """
    if not POLICY.enabled:
        raise PermissionError("Fine-tuning is off on this deployment (the operator can start the app with "
                              "--allow-training).")
    if not 1 <= steps <= POLICY.max_steps:
        raise ValueError(f"steps must be between 1 and {POLICY.max_steps}, got {steps}")
    info = model_info(model)
    if use_teacher and info.scale != model_info("teacher").scale:
        raise ValueError(f"the teacher upscales x{model_info('teacher').scale}; {_shown_name(model)} is x{info.scale}")
    stem = info.name.replace(":", "-")
    return _enqueue(owner, lambda: Job(f"{stem}-qat-{steps}-{_tag()}", owner, steps, "", bool(use_teacher), 1.0,
                                       base=model))


def _tag() -> str:
    """A model name's unique part: the time and random letters, nothing of its owner."""
    return f"{time.strftime('%H%M%S')}-{secrets.token_hex(3)}"


def _shown_name(model: str) -> str:
    return "your model" if is_uploaded(model) else str(model)


def _enqueue(owner: str, make) -> Job:
    global _worker
    with _lock:
        _drop_abandoned()
        mine = [job for job in [_running, *_queue] if job is not None and job.owner == owner and not job.done]
        if mine:
            raise ValueError(f"you already have a job ({mine[0].name}); wait for it or cancel it")
        if len(_runs()) >= MAX_RUNS and not _evictable(owner):
            raise ValueError(f"the server keeps at most {MAX_RUNS} trained models and all of them belong to "
                             "visitors of the last hour; try again later")
        job = make()
        _RESULTS[job.name] = (owner, time.time())
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


def _drop_abandoned() -> None:
    """Drop the queued jobs whose page went away (call with the lock held)."""
    for job in [job for job in _queue if job.abandoned()]:
        _queue.remove(job)
        job.status, job.done = "dropped: its page was closed before it started", True


def _work() -> None:
    global _running
    while True:
        with _lock:
            _drop_abandoned()
            if not _queue:
                _running = None
                return
            job = _running = _queue.popleft()
        _run(job)
        _prune_runs(job.owner)


def _run(job: Job) -> None:
    fields = dict(arch="xlsr", final_activation=job.final_activation, train_dirs=default_training_dirs(),
                  val_dir=default_validation_dir(), out=str(job.weights), steps=job.steps, batch_size=16, lr_patch=32,
                  val_every=max(1, job.steps // 5), checkpoint_every=10**9, device="cpu",
                  max_seconds=POLICY.max_seconds)

    def on_record(event: dict) -> None:
        with _lock:
            _drop_abandoned()
        job.history.append(event)
        job.status = f"step {event['step']} of {job.steps}, loss {event['loss']:.4f}" + (
            f", validation PSNR {event['val_psnr']:.2f} dB" if "val_psnr" in event else "")

    job.status = "starting"
    try:
        if job.base is not None:
            _run_qat(job, fields, on_record)
        elif job.use_teacher:
            distill(DistillConfig(**fields, teacher="teacher", alpha=job.alpha, kd_mode=job.kd_mode), on_record,
                    job.should_stop)
        else:
            train(TrainConfig(**fields), on_record, job.should_stop)
        ended = ("cancelled; " if job.stop.is_set() else "stopped: its page was closed; " if job.abandoned()
                 else "done; ")
        job.status = ended + f"saved as runs/{job.weights.name}"
    except Exception as error:  # reported in the UI, never raised into the server
        job.error = job.status = f"failed: {type(error).__name__}: {error}"
    finally:
        Path(f"{job.weights}").with_suffix(".ckpt.pt").unlink(missing_ok=True)
        for leftover in store.RUNS_DIR.glob(f"{job.name}.*"):  # QAT's checkpoint and starting-point files
            if leftover != job.weights and not leftover.name.endswith(".qdq.onnx"):
                leftover.unlink(missing_ok=True)
        job.done = True


def _run_qat(job: Job, fields: dict, on_record) -> None:
    """Fine-tune `job.base` for INT8 (tensorrt scheme); an ONNX result is registered so it can be offered."""
    def report(event: dict) -> None:
        on_record(event)
        if "val_psnr" in event and event.get("fp32_val_psnr"):
            job.status += f" (fake-quantized in training; the original in FP32: {event['fp32_val_psnr']:.2f} dB)"

    config = QatConfig(model=job.base, out=str(job.weights), steps=job.steps, train_dirs=fields["train_dirs"],
                       val_dir=fields["val_dir"], val_every=max(50, job.steps // 5), checkpoint_every=10**9, device="cpu",
                       max_seconds=fields["max_seconds"],
                       equalize=QAT_EQUALIZE, teacher="teacher" if job.use_teacher else None,
                       beta=QAT_TEACHER_BETA if job.use_teacher else 0.0)
    quantization_aware_training(config, report, job.should_stop)
    if job.weights.suffix == ".onnx":
        job.result = register_onnx(job.weights).name
    else:  # named as the model lists name trained models (relative to the project), or by its full path
        inside = job.weights.parent == store.PROJECT_ROOT / "runs"
        job.result = str(job.weights.relative_to(store.PROJECT_ROOT)) if inside else str(job.weights)
    if fields["val_dir"]:  # the figure that counts: the written INT8 model on the reference, not the fake quantizers
        words = score_written(job.result, fields["val_dir"]).in_words()
        job.status += f" {words[0].upper()}{words[1:]}."


_RESULTS: dict[str, tuple[str, float]] = {}  # a job's name -> its owner and when it was asked for


def _runs() -> list[Path]:
    """The finished models in runs/, newest first (a QAT result's QDQ files go with it, not counted)."""
    models = [*store.RUNS_DIR.glob("*.safetensors"), *store.RUNS_DIR.glob("*.onnx")]
    return sorted([p for p in models if not p.name.endswith(".qdq.onnx")], key=lambda p: p.stat().st_mtime,
                  reverse=True)


def _held_by_other(path: Path, owner: str) -> bool:
    """True while `path` is another owner's model within its OWNED_SECONDS."""
    holder, since = _RESULTS.get(path.name.split(".")[0], ("", 0.0))
    return holder not in ("", owner) and time.time() - since < OWNED_SECONDS


def _evictable(owner: str) -> list[Path]:
    """The models `owner` may evict to make room, oldest first: its own, and those no longer held by anyone."""
    return [p for p in reversed(_runs()) if not _held_by_other(p, owner)]


def _prune_runs(owner: str) -> None:
    """Keep each owner's newest MAX_RUNS_PER_OWNER models; over MAX_RUNS in all, evict the oldest of those this
    owner may evict (its own, or no longer held). Nobody evicts another owner's model while it is held."""
    mine = [p for p in _runs() if _RESULTS.get(p.name.split(".")[0], ("",))[0] == owner]
    doomed = mine[MAX_RUNS_PER_OWNER:]
    over = len(_runs()) - len(doomed) - MAX_RUNS
    doomed += [p for p in _evictable(owner) if p not in doomed][:max(0, over)]
    for path in doomed:
        for sibling in path.parent.glob(f"{path.stem}.*.qdq.onnx"):  # a QAT result's QDQ model goes with it
            sibling.unlink(missing_ok=True)
        path.unlink(missing_ok=True)
