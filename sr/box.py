"""A box for work that runs a graph nobody vetted: a child process with a hard memory limit (RLIMIT_DATA: the
heap and every private mapping, what an ONNX Runtime arena or a numpy array takes), a wall-clock deadline enforced
by killing the process (not by asking it to stop), and a lower CPU priority. Whatever the graph does, the caller's
process and its other requests are untouched: a box that runs out of memory, past its deadline, or dies, is
reported as `BoxLimit` in words, and the temp files it was writing are removed (the cache's entries are published
by rename, so a killed writer leaves nothing half-written under a real name).

Children are forked from a forkserver (a clean single-threaded process started once, with the library already
imported), so a box starts in tens of milliseconds and never inherits a web server's threads or locks.

Example:
    >>> from sr.box import Limits, run_boxed
    >>> result = run_boxed(compare, image, "onnx:1a2b", "xlsr-clip", config, box=Limits(2 << 30, 120),
    ...                    progress=lambda fraction, message: print(fraction, message))
"""
from __future__ import annotations

import enum
import multiprocessing
import os
import pickle
import resource
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable

from .progress import Cancelled
from .store import remove_temps_of

# the modules a box's work comes from: imported once by the forkserver, so no box imports them again
PRELOAD = ("sr.lab.compare", "sr.lab.diagnose", "sr.lab.fixes", "sr.lab.coverage", "sr.lab.bundle", "sr.lab.ready",
           "sr.tune.ptq", "sr.model.usermodel", "sr.run.quantize")
POLL_SECONDS = 0.1  # how often the caller checks its deadline and its stop request while it waits for the box


@dataclass(frozen=True)
class Limits:
    """What one box may use.

    Attributes:
        memory_bytes: its data segment (heap and private mappings) at most; an allocation past it fails.
        seconds: wall-clock time from its start; then it is killed.
        nice: the CPU priority it runs at (higher: it gets only the CPU others leave).
    """

    memory_bytes: int
    seconds: float
    nice: int = 10


class Exceeded(enum.Enum):
    """Which limit a box went over."""

    MEMORY = "memory"
    TIME = "time"
    DIED = "died"  # killed by a signal we did not send (the kernel's OOM killer, a crash in native code)


class BoxLimit(Exception):
    """The boxed work went over a limit and was stopped; `exceeded` says which, `limits` what they were."""

    def __init__(self, exceeded: Exceeded, limits: Limits, detail: str = ""):
        self.exceeded, self.limits, self.detail = exceeded, limits, detail
        self.words = {Exceeded.MEMORY: f"needed more than {limits.memory_bytes / 2**30:.1f} GB of memory",
                      Exceeded.TIME: f"ran longer than {limits.seconds:.0f} s",
                      Exceeded.DIED: f"stopped its worker process ({detail})"}[exceeded]
        super().__init__(f"the work {self.words} and was stopped")


_CONTEXT: list = []
_CONTEXT_LOCK = threading.Lock()


def _context():
    """The forkserver context, made once (its server starts with the first box)."""
    with _CONTEXT_LOCK:
        if not _CONTEXT:
            context = multiprocessing.get_context("forkserver")
            main = sys.modules["__main__"]
            # a script's main module (python app.py) is imported by every child unless the server imports it once
            script = getattr(main, "__spec__", None) is None and getattr(main, "__file__", None)
            context.set_forkserver_preload([*PRELOAD, *(["__main__"] if script else [])])
            _CONTEXT.append(context)
        return _CONTEXT[0]


def _out_of_memory(error: BaseException) -> bool:
    """Whether an exception is a failed allocation: numpy's MemoryError, or ONNX Runtime's and torch's, which
    arrive as their runtime errors (the one place that reads an error's words: neither has a type for it)."""
    if isinstance(error, MemoryError):
        return True
    text = str(error)
    return "Failed to allocate memory" in text or "can't allocate memory" in text or "bad_alloc" in text


def _child(conn, limits: Limits, work: Callable, args: tuple, kwargs: dict, relays: bool) -> None:
    """The box itself: set the limits, run the work, send back its result or its exception."""
    hard = resource.getrlimit(resource.RLIMIT_DATA)[1]  # a box can only lower what its parent was given
    memory = limits.memory_bytes if hard == resource.RLIM_INFINITY else min(limits.memory_bytes, hard)
    resource.setrlimit(resource.RLIMIT_DATA, (memory, memory))
    try:
        os.nice(limits.nice)
    except OSError:
        pass
    if relays:
        kwargs = {**kwargs, "progress": lambda fraction, message="": conn.send(("progress", (fraction, message)))}
    try:
        reply = ("result", work(*args, **kwargs))
    except BaseException as error:  # noqa: BLE001 (every exception goes back to the caller)
        reply = ("memory", None) if _out_of_memory(error) else ("error", error)
    try:
        conn.send(reply)
    except (pickle.PicklingError, TypeError, AttributeError) as unpicklable:  # an exception that cannot travel
        conn.send(("error", RuntimeError(f"{type(reply[1]).__name__}: {reply[1]} ({unpicklable})")))
    except MemoryError:
        conn.send(("memory", None))
    conn.close()


def run_boxed(work: Callable, *args, box: Limits, progress: Callable[[float, str], None] | None = None,
              should_stop: Callable[[], bool] | None = None, **kwargs):
    """`work(*args, **kwargs)` in a box; its return value (pickled back).

    Args:
        work: a module-level function (it travels by name).
        box: the box's memory, time and priority.
        progress: given to `work` as its `progress=` keyword, called here with what it reports (it may raise to
            stop the work: the box is killed and the exception propagates).
        should_stop: polled while waiting; True kills the box and raises `sr.progress.Cancelled`.

    Raises:
        BoxLimit: over a limit (the box was killed, or its allocation failed).
        Cancelled: `should_stop` asked (the box is killed at once).
        whatever `work` raised, as it raised it.
    """
    context = _context()
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(target=_child, args=(sender, box, work, args, kwargs, progress is not None),
                              daemon=True, name="sr-box")
    process.start()
    sender.close()
    deadline, answered = time.monotonic() + box.seconds, False
    try:
        kind, payload = _wait(process, receiver, box, deadline, progress, should_stop)
        answered = True
    finally:
        receiver.close()
        if process.is_alive() and not answered:
            process.kill()
        process.join()
        if not answered:  # killed or dead mid-write: its temp files go with it
            remove_temps_of(process.pid)
    if kind == "error":
        raise payload
    return payload


def _wait(process, receiver, limits: Limits, deadline: float, progress, should_stop):
    """The caller's side of a box: relay its progress until it answers ("result" or "error", and what), dies,
    overruns or is stopped."""
    while True:
        if receiver.poll(POLL_SECONDS):
            try:
                kind, payload = receiver.recv()
            except (EOFError, OSError):  # it died mid-message
                break
            if kind == "progress":
                if progress is not None:
                    progress(*payload)
                continue
            if kind == "memory":
                raise BoxLimit(Exceeded.MEMORY, limits)
            return kind, payload
        if not process.is_alive() and not receiver.poll(0):
            break
        if should_stop is not None and should_stop():
            raise Cancelled("stopped at once: the work ran in a box of its own, which was killed")
        if time.monotonic() > deadline:
            raise BoxLimit(Exceeded.TIME, limits)
    process.join(5)
    code = process.exitcode
    if code is not None and code < 0 and -code == signal.SIGKILL:  # the kernel's OOM killer sends SIGKILL
        raise BoxLimit(Exceeded.MEMORY, limits)
    name = signal.Signals(-code).name if code is not None and code < 0 else f"exit code {code}"
    raise BoxLimit(Exceeded.DIED, limits, name)
