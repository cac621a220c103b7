import contextlib
import os
import time
import sys
import subprocess
import socket
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("SR_DATA", ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not (DATA / "Set5").is_dir():
        pytest.skip(f"the shared SR data sets are not at {DATA}")
    return DATA


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory):
    """Tests write their calibration cache to a temp folder, never to the user's cache/."""
    cache = tmp_path_factory.mktemp("cache")
    os.environ["SR_CACHE_DIR"] = str(cache)  # read at call time by sr.run.quantize.cache_root, and by subprocesses
    return cache


@pytest.fixture
def photo() -> np.ndarray:
    """A deterministic 60x90 RGB test image with edges and gradients."""
    y, x = np.mgrid[0:60, 0:90]
    image = np.stack([(x * 3) % 256, (y * 4) % 256, ((x + y) * 2) % 256], axis=2)
    image[20:40, 30:60] = 255
    return image.astype(np.uint8)


@pytest.fixture(scope="session")
def stand_ins(tmp_path_factory, isolated_cache):
    """Every stand-in of tests/standins.py as an ONNX file: name -> path (built once per run)."""
    import standins

    return standins.build_all(tmp_path_factory.mktemp("standins"))


@pytest.fixture(scope="session")
def registered(stand_ins):
    """Every stand-in registered with the lab: name -> UserModel."""
    from sr.model.contract import Overrides
    from sr.run.register import register_onnx

    return {name: register_onnx(path, Overrides(scale=3) if "vdsr" in name else Overrides())
            for name, path in stand_ins.items()}


@pytest.fixture(scope="session")
def families(tmp_path_factory, data_dir):
    """Every model-family stand-in of tests/standins.py, trained briefly, registered: name -> UserModel."""
    import standins
    from sr.run.register import register_onnx

    folder = tmp_path_factory.mktemp("families")
    # enough steps to leave the random start (the families table trains 300); the two slow ones fewer
    steps = {"fsrcnn": 150, "rrdb": 50, "waifu2x": 50}
    return {name: register_onnx(standins.family(name, folder, str(data_dir / "T91"), steps=steps.get(name, 100)))
            for name in standins.FAMILY_NAMES}


@pytest.fixture(scope="session")
def size_scaled(tmp_path_factory, data_dir):
    """The SwinIR-like stand-in with a float computed from the image's size (its old 1 / sqrt(H x W) attention),
    registered: the UserModel."""
    import standins
    from sr.run.register import register_onnx

    path = tmp_path_factory.mktemp("size-scaled") / "size-scaled.onnx"
    return register_onnx(standins.size_scaled_attention(path, str(data_dir / "T91")))


def free_port() -> int:
    """A port no one listens on now (the OS picks it); a fixed one collides with parallel runs."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def running_app(folder: Path, env: dict | None = None, preexec_fn=None):
    """`python app.py` on a free port with `env` added, until the block ends: yields (its URL, the process). Its
    log goes to a file in `folder` (a pipe nobody reads would fill and stop it)."""
    port = free_port()
    log = open(folder / "server.log", "w")
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1", **(env or {})}
    process = subprocess.Popen([sys.executable, "app.py", "--host", "127.0.0.1", "--port", str(port)], cwd=ROOT,
                               env=env, stdout=log, stderr=subprocess.STDOUT, text=True, preexec_fn=preexec_fn)
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                break
        except OSError:
            if process.poll() is not None:
                raise RuntimeError(Path(log.name).read_text())
            time.sleep(0.5)
    time.sleep(1)
    try:
        yield f"http://127.0.0.1:{port}/", process
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """The app, launched once per run as `python app.py` (the browser and server-level tests share it)."""
    with running_app(tmp_path_factory.mktemp("server")) as (url, _):
        yield url
