"""A bounded load test of the app on loopback: it starts `app.py`, then N concurrent gradio_client clients
(default 8) each send their own image with their own calibration method, a fixed number of times, while one
more client recalibrates (a fresh seed). Prints p50/p95 latency, errors and the server's peak RSS, and checks
that every answer belongs to its request (each image has its own colour; the "Original" panel must carry it).
Two hostile cases, each optional:
- `--heavy`: one more visitor uploads a slow model (under the upload cost cap) and compares with it in a loop
  the whole time; the p50/p95 printed are the ordinary clients' (the uploaded model has its own lane).
- `--sessions N`: first, N sessions each store the maximum calibration upload (64 images of 4 MP, kept
  downscaled) in their state, through the page's own upload event; the server's RSS is printed after.

    python scripts/load_test.py --clients 8 --requests 3 --heavy --sessions 20
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
SERVER: subprocess.Popen | None = None
METHODS = ["entropy", "minmax", "percentile", "mse", "entropy-zeros"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(port: int) -> subprocess.Popen:
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"}
    process = subprocess.Popen([sys.executable, "app.py", "--port", str(port)], cwd=ROOT, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return process
        except OSError:
            time.sleep(0.5)
    process.kill()
    raise SystemExit("the app did not start")


def peak_rss_mb(pid: int, field: str = "VmHWM") -> float:
    """The server's peak (VmHWM) or current (VmRSS) resident memory, its children's not counted."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def fn_index(handler: str) -> int:
    """The index of the page's event whose handler is `handler` (the server runs this same app.py, so its events
    are numbered as a copy built here numbers them)."""
    sys.path.insert(0, str(ROOT))
    import app

    return next(i for i, fn in app.build_demo().fns.items() if getattr(fn.fn, "__name__", "") == handler)


def queue_call(url: str, index: int, data: list, session: str, timeout: float = 600) -> dict:
    """One raw queue call as the page makes it: join, then read the event stream to its end."""
    import requests

    joined = requests.post(f"{url}gradio_api/queue/join", json={"data": data, "fn_index": index, "session_hash": session,
                                                               "event_data": None, "trigger_id": None}, timeout=60)
    joined.raise_for_status()
    with requests.get(f"{url}gradio_api/queue/data", params={"session_hash": session}, stream=True,
                      timeout=timeout) as stream:
        for line in stream.iter_lines():
            if line.startswith(b"data:"):
                message = json.loads(line[5:])
                if message.get("msg") == "process_completed":
                    return message
    raise RuntimeError("the event stream ended without an answer")


def upload(url: str, paths: list[Path]) -> list[dict]:
    """Upload files as the page does; their server-side file data."""
    import requests

    files = [("files", (p.name, p.read_bytes(), "image/png")) for p in paths]
    names = requests.post(f"{url}gradio_api/upload", files=files, timeout=300).json()
    return [{"path": name, "orig_name": p.name, "meta": {"_type": "gradio.FileData"}} for name, p in zip(names, paths)]


def fill_sessions(url: str, count: int, folder: Path) -> float:
    """`count` sessions each holding 64 calibration uploads of 4 MP; the server's RSS after (MB)."""
    photo = np.linspace(0, 255, 2000 * 2000 * 3).reshape(2000, 2000, 3).astype(np.uint8)
    paths = []
    for index in range(64):
        paths.append(folder / f"calib-{index}.png")
        Image.fromarray(np.roll(photo, 37 * index, axis=1)).save(paths[-1], compress_level=1)
    files = upload(url, paths)
    index = fn_index("load_calibration_uploads")
    for session in range(count):
        answer = queue_call(url, index, [files], f"holder-{session}")
        if not answer.get("success"):
            raise RuntimeError(f"session {session}: {answer}")
    return peak_rss_mb(SERVER.pid, "VmRSS")


def heavy_visitor(url: str, folder: Path, stop: threading.Event, answered: list) -> None:
    """Upload a slow model (2.0 M MACs per pixel is the cap; this one needs about 1.8) and compare with it, fresh
    calibration seeds, until `stop`."""
    sys.path.insert(0, str(ROOT / "tests"))
    from standins import conv_stack  # the tests' slow-model maker

    model = conv_stack(folder / "heavy.onnx", 64, 49)
    file = upload(url, [model])[0]
    session = "heavy-visitor"
    answer = queue_call(url, fn_index("load_onnx_model"), [file, "auto", "auto", "auto", False, "auto",
                                                               "xlsr-clip", []], session)
    name = answer["output"]["data"][0]["value"]
    image = upload(url, [Path(folder / "client-0.png")])[0]
    seed = 1
    while not stop.is_set():
        seed += 1
        try:
            queue_call(url, fn_index("run_compare"), [image, name, name, "entropy", 100, "tensorrt", "Upscale my image",
                                                      "bicubic", "calib_data/", None, 1.0, seed, None, [],
                                                      "reference (ONNX Runtime, CPU)"], session)
        except Exception:  # the server stopping under it, once the ordinary clients are done
            if stop.is_set():
                return
            raise
        answered.append(seed)


def client_images(count: int, folder: Path) -> list[tuple[str, np.ndarray]]:
    """One 96x128 image per client, each with its own mean colour and some texture."""
    rng = np.random.default_rng(0)
    made = []
    for index in range(count):
        colour = np.array([40 + 25 * index % 200, 200 - 20 * index % 180, 60 + 35 * index % 190])
        image = np.clip(colour + rng.normal(0, 12, (96, 128, 3)), 0, 255).astype(np.uint8)
        path = folder / f"client-{index}.png"
        Image.fromarray(image).save(path)
        made.append((str(path), image.reshape(-1, 3).mean(axis=0)))
    return made


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=3, help="requests per client")
    parser.add_argument("--heavy", action="store_true", help="one more visitor compares with a slow uploaded model")
    parser.add_argument("--sessions", type=int, default=0, help="sessions holding the maximum calibration upload")
    args = parser.parse_args()
    from gradio_client import Client, handle_file

    global SERVER
    port = free_port()
    server = SERVER = start_server(port)
    url = f"http://127.0.0.1:{port}/"
    folder = Path(tempfile.mkdtemp())
    images = client_images(args.clients, folder)
    if args.sessions:
        started = time.perf_counter()
        held = fill_sessions(url, args.sessions, folder)
        print(f"{args.sessions} sessions each holding 64 calibration uploads of 4 MP: server RSS {held:.0f} MB "
              f"(peak {peak_rss_mb(server.pid):.0f} MB), {time.perf_counter() - started:.0f} s to upload")
    stop, heavy_answers = threading.Event(), []
    if args.heavy:
        heavy = threading.Thread(target=heavy_visitor, args=(url, folder, stop, heavy_answers), daemon=True)
        heavy.start()
        time.sleep(20)  # its upload and first calibration are under way
    latencies, errors, mismatches, lock = [], [], [], threading.Lock()

    def one_client(index: int, recalibrate: bool = False) -> None:
        client = Client(url, verbose=False)
        path, colour = images[index % len(images)]
        method = METHODS[index % len(METHODS)]
        for request in range(args.requests if not recalibrate else 1):
            seed = int(time.time() * 1000) % 1_000_000 + 1 if recalibrate else 0
            start = time.perf_counter()
            try:
                result = client.predict(handle_file(path), "xlsr-relu", "xlsr-clip", method, 100, "tensorrt",
                                        "Upscale my image", "bicubic", "calib_data/", 1.0, seed, api_name="/compare")
                shown = np.asarray(Image.open(result[0]).convert("RGB")).reshape(-1, 3).mean(axis=0)
                with lock:
                    latencies.append(time.perf_counter() - start)
                    if np.abs(shown - colour).max() > 3:
                        mismatches.append((index, request))
            except Exception as error:  # counted and printed, the test goes on
                with lock:
                    errors.append(f"client {index}: {type(error).__name__}: {error}")

    threads = [threading.Thread(target=one_client, args=(i,)) for i in range(args.clients)]
    threads.append(threading.Thread(target=one_client, args=(0, True)))
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    stop.set()
    rss = peak_rss_mb(server.pid)
    server.terminate()
    server.wait(timeout=30)
    print(f"{args.clients} clients x {args.requests} requests + 1 recalibration in {wall:.1f} s: "
          f"{len(latencies)} answered, {len(errors)} errors, {len(mismatches)} answers for the wrong request")
    if latencies:
        print(f"latency p50 {np.percentile(latencies, 50):.1f} s, p95 {np.percentile(latencies, 95):.1f} s "
              "(two heavy slots: uploaded models and shipped models each take turns in their own)")
    if args.heavy:
        print(f"meanwhile the heavy visitor's comparisons answered: {len(heavy_answers)}")
    print(f"server peak RSS {rss:.0f} MB")
    for error in errors[:5]:
        print(error)
    if errors or mismatches:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
