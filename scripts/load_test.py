"""A bounded load test of the app on loopback: it starts `app.py`, then N concurrent gradio_client clients
(default 8) each send their own image with their own calibration method, a fixed number of times, while one
more client recalibrates (a fresh seed). Prints p50/p95 latency, errors and the server's peak RSS, and checks
that every answer belongs to its request (each image has its own colour; the "Original" panel must carry it).

    python scripts/load_test.py --clients 8 --requests 3
"""
from __future__ import annotations

import argparse
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


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


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
    args = parser.parse_args()
    from gradio_client import Client, handle_file

    port = free_port()
    server = start_server(port)
    url = f"http://127.0.0.1:{port}/"
    images = client_images(args.clients, Path(tempfile.mkdtemp()))
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
    rss = peak_rss_mb(server.pid)
    server.terminate()
    server.wait(timeout=30)
    print(f"{args.clients} clients x {args.requests} requests + 1 recalibration in {wall:.1f} s: "
          f"{len(latencies)} answered, {len(errors)} errors, {len(mismatches)} answers for the wrong request")
    if latencies:
        print(f"latency p50 {np.percentile(latencies, 50):.1f} s, p95 {np.percentile(latencies, 95):.1f} s "
              "(two heavy slots: uploaded models and shipped models each take turns in their own)")
    print(f"server peak RSS {rss:.0f} MB")
    for error in errors[:5]:
        print(error)
    if errors or mismatches:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
