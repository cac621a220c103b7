"""A user's ONNX model registered: run on probe images to learn its contract (the only run of an untrusted graph
before the lab has made its standard graph), then handed to the model layer (`sr.model.usermodel.register_graph`),
which checks it, writes the standard graph and keeps it. The probe's runs share one time limit and are stopped when
it passes (`ProbeTimedOut`); the session is a quiet one on a copy of the file in an empty folder, so an external
data reference finds nothing to read. Importing the run layer hands this probe to the model layer
(`sr.model.usermodel.set_probe`), which registers a user's file named by its path with it.
"""
from __future__ import annotations

import os
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import onnx

from ..cost import CostLimits
from ..model.checks import UserModelError, clean_message
from ..model.contract import Overrides, Runner
from ..model.probe import PROBE_SECONDS, ProbeTimedOut
from ..model.usermodel import UserModel, register_graph, set_probe
from .sessions import ort_session


def register_onnx(path: str | os.PathLike, overrides: Overrides = Overrides(),
                  cache_dir: str | os.PathLike | None = None, limits: CostLimits | None = None,
                  probe_seconds: float = PROBE_SECONDS) -> UserModel:
    """Check a user's ONNX file, detect its contract, write its standard graph (cached by file hash and
    overrides) and register it.

    Example:
        >>> model = register_onnx("fsrcnn.onnx", Overrides(scale=3))
        >>> evaluate(EvalConfig(model=model.name, data="path/to/Set5"))

    Returns:
        the UserModel; `model.name` works wherever a shipped model name does.

    Args:
        limits: refuse a graph over these costs, or whose cost cannot be counted, before it runs (a server's
            policy; none by default).
        probe_seconds: the time every probe run together may take.

    Raises:
        FileNotFoundError, UserModelError: see `sr.model.checks.check_file` and `sr.model.contract.detect_contract`.
        sr.cost.Uncountable, sr.cost.TooCostly: `limits` given, and the graph is uncountable or over them.
    """
    return register_graph(path, overrides, cache_dir, limits, runner=lambda model: probe_runner(model, probe_seconds))


def probe_runner(model: onnx.ModelProto, seconds: float = PROBE_SECONDS) -> Runner:
    """What runs a checked user's graph on probe inputs: one CPU session, every run stopped once `seconds` have
    passed since this call (each run given at least a second)."""
    with tempfile.TemporaryDirectory(prefix="sr-probe-") as empty:  # any file reference resolves to an empty folder
        (Path(empty) / "model.onnx").write_bytes(model.SerializeToString())
        # the size probes fail on purpose: no error lines in the server's log
        session = ort_session(Path(empty) / "model.onnx", log_level=4)
    name, deadline = session.get_inputs()[0].name, time.monotonic() + seconds

    def run(x: np.ndarray) -> np.ndarray:
        return _run_with_timeout(session, {name: x}, max(1.0, deadline - time.monotonic()))

    return run


def _run_with_timeout(session, feed: dict, seconds: float) -> np.ndarray:
    import onnxruntime as ort

    options = ort.RunOptions()
    timer = threading.Timer(seconds, lambda: setattr(options, "terminate", True))
    timer.start()
    try:
        return session.run(None, feed, options)[0]
    except Exception as error:
        if options.terminate:
            raise ProbeTimedOut(f"the model took longer than {seconds:.0f} s on a small probe image; stopped") from None
        raise UserModelError("the model failed on a probe image (is the layout or the colour set right?): "
                             f"{clean_message(error)}") from None
    finally:
        timer.cancel()


set_probe(probe_runner)  # a user's file named by its path (model_info, a teacher) is probed here too
