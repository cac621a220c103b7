"""Work for the box tests (module-level: a box's work travels by name)."""
import os
import time

import numpy as np


def add(a, b):
    return a + b


def silent_sleep(seconds: float):
    """Sleeps without ever reporting progress: only a kill can stop it early."""
    time.sleep(seconds)
    return "woke"


def allocate_in_onnxruntime(side: int = 48000):
    """Runs the report's hostile graph in ONNX Runtime: a side x side float tensor (9.2 GB at 48000)."""
    import onnxruntime as ort
    import standins

    session = ort.InferenceSession(standins.huge_at_run_time(side // 32).SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    return session.run(None, {"lr": np.zeros((1, 3, 32, 32), np.float32)})[0].shape


def write_then_hang(folder: str):
    """Leaves a temp file as the store names them (a writer killed mid-write), then hangs."""
    from sr.store import atomic_path

    with atomic_path(os.path.join(folder, "entry.bin")) as temp:
        temp.write_bytes(b"half")
        time.sleep(600)


def counts(steps: int, progress):
    for step in range(steps):
        progress(step / steps, f"step {step + 1}")
    return steps


def raises():
    raise ValueError("the work's own words")
