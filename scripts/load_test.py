"""A bounded load test of the app on loopback: it starts `app.py`, then N concurrent gradio_client clients
(default 8) each send their own image with their own calibration method, a fixed number of times, while one
more client recalibrates (a fresh seed). Prints p50/p95 latency, errors and the server's peak RSS, and checks
that every answer belongs to its request (each image has its own colour; the "Original" panel must carry it).
Two hostile cases, each optional:
- `--heavy`: one more visitor uploads a slow model (under the upload cost cap) and compares with it in a loop
  the whole time; the p50/p95 printed are the ordinary clients' (the uploaded model has its own lane and box).
- `--sessions N`: first, N sessions each store the maximum calibration upload (64 images of 4 MP, kept
  downscaled) in their state, through the page's own upload event; the server's RSS is printed after.
- `--hostile`: the public Space's report, all at once while the ordinary clients run: a visitor uploads each of
  the report's hostile models (`tests/standins.py` HOSTILE: the 3 KB model that built a 48000x48000 tensor, a
  12288x12288 MatMul, convolutions in a Loop, a x16 Resize, sizes read from the input's values), another runs
  the teacher preset at 1000 samples, another a diagnosis of the teacher, another sends a 40-megapixel 16-bit
  PNG, another floods 30 comparisons at once; it prints how each was answered.

    python scripts/load_test.py --clients 8 --requests 3 --heavy --sessions 20 --hostile
"""
from __future__ import annotations

import argparse
import json
import os
import resource
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
    # the server in a memory limit of its own (RLIMIT_DATA, as tests/test_hostile.py runs it), below the machine's
    limit = int(float(os.environ.get("SR_LOAD_TEST_SERVER_GB", "12")) * 2**30)
    process = subprocess.Popen([sys.executable, "app.py", "--port", str(port)], cwd=ROOT, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_DATA, (limit, limit)))
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


_INDEXES: dict[str, int] = {}
_INDEXES_LOCK = threading.Lock()


def fn_index(handler: str) -> int:
    """The index of the page's event whose handler is `handler` (the server runs this same app.py, so its events
    are numbered as a copy built here numbers them; built once: Gradio's Blocks context is not thread-safe)."""
    with _INDEXES_LOCK:
        if not _INDEXES:
            sys.path.insert(0, str(ROOT))
            from ui import layout

            _INDEXES.update((getattr(fn.fn, "__name__", ""), i) for i, fn in reversed(layout.build_demo().fns.items()))
    return _INDEXES[handler]


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


def hostile_visitors(url: str, folder: Path, answers: dict) -> list[threading.Thread]:
    """The report's hostile visitors, each in a thread of its own; `answers` collects how each was answered."""
    sys.path.insert(0, str(ROOT / "tests"))
    import standins

    image = upload(url, [Path(folder / "client-0.png")])[0]
    deep = folder / "deep.png"
    Image.fromarray(np.zeros((5000, 8000), np.uint16)).save(deep)  # 16 bits a sample (mode I;16)
    settings = ["Upscale my image", "bicubic", "calib_data/", None, 1.0]
    reference = "reference (ONNX Runtime, CPU)"

    def uploads():
        for name, (build, _) in standins.HOSTILE.items():
            path = folder / f"{name.replace(' ', '-')}.onnx"
            path.write_bytes(build().SerializeToString())
            started = time.perf_counter()
            answer = queue_call(url, fn_index("load_onnx_model"), [upload(url, [path])[0], "auto", "auto", "auto",
                                                                   False, "auto", "xlsr-clip", []], f"hostile-{name}")
            answers[f"upload {name}"] = (answer, time.perf_counter() - started)

    def one(name: str, handler: str, data: list):
        started = time.perf_counter()
        answers[name] = (queue_call(url, fn_index(handler), data, name), time.perf_counter() - started)

    def flood():
        """30 comparisons joined at once by one client, read from its one event stream (as a page does)."""
        import requests

        started, done, index = time.perf_counter(), [], fn_index("run_compare")
        for _ in range(30):
            requests.post(f"{url}gradio_api/queue/join", timeout=60, json={
                "data": [image, "xlsr-relu", "xlsr-clip", "minmax", 10, "tensorrt", *settings, 0, None, [], reference],
                "fn_index": index, "session_hash": "flood", "event_data": None, "trigger_id": None}).raise_for_status()
        with requests.get(f"{url}gradio_api/queue/data", params={"session_hash": "flood"}, stream=True,
                          timeout=600) as stream:
            for line in stream.iter_lines():
                if line.startswith(b"data:") and json.loads(line[5:]).get("msg") == "process_completed":
                    done.append(json.loads(line[5:]))
                    if len(done) == 30:
                        break
        answers["flood of 30"] = (done, time.perf_counter() - started)

    work = [threading.Thread(target=uploads),
            threading.Thread(target=one, args=("teacher preset, 1000 samples", "run_compare", [
                image, "teacher", "xlsr-clip-kd", "entropy", 1000, "tensorrt", *settings, 91, None, [], reference])),
            threading.Thread(target=one, args=("teacher diagnosis", "run_diagnose", [
                image, "teacher", "xlsr-clip", "model A", "Upscale my image", "entropy", 100, "tensorrt", 1.0, 92,
                None])),
            threading.Thread(target=one, args=("40 MP 16-bit PNG", "run_compare", [
                upload(url, [deep])[0], "xlsr-relu", "xlsr-clip", "minmax", 10, "tensorrt", *settings, 0, None, [],
                reference])),
            threading.Thread(target=flood)]
    for thread in work:
        thread.start()
    return work


def _said(answer: dict) -> str:
    return "answered" if answer.get("success") else str(answer.get("output", {}).get("error", answer))[:110]


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
    parser.add_argument("--hostile", action="store_true", help="the public Space report's hostile visitors too")
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
    hostile, hostile_answers = [], {}
    if args.hostile:
        hostile = hostile_visitors(url, folder, hostile_answers)
        time.sleep(3)  # the long jobs are under way, the flood queued

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
    for thread in hostile:
        thread.join(timeout=900)
    stop.set()
    rss = peak_rss_mb(server.pid)
    server.terminate()
    server.wait(timeout=30)
    print(f"{args.clients} clients x {args.requests} requests + 1 recalibration in {wall:.1f} s: "
          f"{len(latencies)} answered, {len(errors)} errors, {len(mismatches)} answers for the wrong request")
    if latencies:
        print(f"latency p50 {np.percentile(latencies, 50):.1f} s, p95 {np.percentile(latencies, 95):.1f} s "
              "(four lanes: cached comparisons, short and long jobs on the shipped models, uploaded models)")
    if args.heavy:
        print(f"meanwhile the heavy visitor's comparisons answered: {len(heavy_answers)}")
    for name, (answer, seconds) in hostile_answers.items():
        if isinstance(answer, list):
            refused = [a for a in answer if not a.get("success")]
            print(f"hostile: {name}: {len(answer) - len(refused)} answered, {len(refused)} refused in "
                  f"{seconds:.0f} s ({_said(refused[0]) if refused else ''})")
        else:
            print(f"hostile: {name}: {_said(answer)} ({seconds:.1f} s)")
    print(f"server peak RSS {rss:.0f} MB")
    for error in errors[:5]:
        print(error)
    if errors or mismatches:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
