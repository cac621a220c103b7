"""The app: handler functions without a browser, then a real server through gradio_client."""
import os
import re
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import free_port
import yaml
from PIL import Image

import standins

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


@pytest.fixture
def small_png(tmp_path, photo):
    path = tmp_path / "small.png"
    Image.fromarray(photo).save(path)
    return str(path)


def test_handler_returns_four_images_and_metrics(small_png):
    from ui import comparison, words

    *panels, metrics, coverage, chart, state, history = comparison.run_compare(
        small_png, "xlsr-relu", "xlsr-clip", "minmax", 10, "cpu", "Upscale my image", "nearest", "calib_data/", None,
        progress=lambda *a, **k: None)
    original, fp32_a, int8_a, fp32_b, int8_b = panels
    labels = [update["label"] for update in comparison.panel_labels(state)]
    assert labels[2] == "INT8 xlsr-relu, ReLU output, 22k" and labels[4].startswith("INT8 xlsr-clip, Clipped")
    assert original.shape == fp32_a.shape == int8_a.shape == fp32_b.shape == int8_b.shape == (180, 270, 3)
    assert list(metrics["output"]) == ["FP32 xlsr-relu", "INT8 xlsr-relu", "FP32 xlsr-clip", "INT8 xlsr-clip"]
    assert "cpu" in list(metrics["engine"])[1] and "covers this image" in coverage
    assert len(state["panels"]) == 5
    slider = comparison.run_slider(state, words.PANELS[1], words.PANELS[4])
    assert slider[0] is fp32_a and slider[1] is int8_b
    strip = comparison.run_roi(state, 0.5, 0.5, 32)
    assert strip.shape[0] == 32 * 4 and strip.shape[1] > 5 * 32 * 4
    difference = comparison.run_difference(state, "INT8 A vs FP32 A", "|difference| of luma", 32)
    assert difference.shape[1] == 270 and difference[:180].std() > 0  # amplified, not blank
    with_difference = comparison.run_roi(state, 0.5, 0.5, 32, "INT8 A vs FP32 A", "|difference| of luma", 32)
    assert with_difference.shape[1] > strip.shape[1]
    again = comparison.run_compare(small_png, "xlsr-relu", "xlsr-clip", "minmax", 10, "cpu", "Upscale my image",
                                   "nearest", "calib_data/", None, 1.0, 12345, history, progress=lambda *a, **k: None)
    assert "Across 2 calibration samples" in again[6] and len(again[-1]["runs"]) == 2


def test_the_first_screen_shows_the_reference_int8(small_png, data_dir):
    """Default settings: the INT8 panels are the written QDQ model as ONNX Runtime's CPU kernels run it (what
    `eval --engine ort-int8` scores and the bundle ships), pixel for pixel, on any CPU."""
    from ui import comparison
    from sr.quant.calibrate import CalibrationConfig
    from sr.run.engines import OrtEngine
    from sr.run.quantize import calibrate_model

    *panels, metrics, _, _, state, _ = comparison.run_compare(small_png, progress=lambda *a, **k: None)
    lr = np.asarray(Image.open(small_png).convert("RGB"))
    for index, model in ((2, "xlsr-relu"), (4, "xlsr-clip")):
        int8 = calibrate_model(model, CalibrationConfig(method="entropy", samples=100), "tensorrt")
        assert np.array_equal(panels[index], OrtEngine(int8.qdq_onnx, 3, cpu_only=True).run(lr)), model
    assert all(name.startswith("ort-int8-tensorrt") for name in list(metrics["engine"])[1::2])


def test_dark_calibration_is_flagged(small_png):
    from ui import comparison

    *_, coverage, _, _, _ = comparison.run_compare(small_png, "xlsr-relu", "xlsr-clip", "minmax", 10, "tensorrt",
                                         "Upscale my image", "bicubic", "calib_data/", None, 0.3,
                                         progress=lambda *a, **k: None)
    assert "does not cover this image" in coverage
    model_a, model_b, method, gain, note = comparison.apply_preset("dark calibration set (40% brightness)")
    assert gain["value"] == 0.4 and "Fix" in note


def test_ground_truth_mode_reports_truth_metrics(small_png):
    from ui import comparison

    original, *_, metrics, _, _, _state, _ = comparison.run_compare(small_png, "xlsr-relu", "xlsr-clip", "mse", 10,
                                                                    "tensorrt", "Check against ground truth", "bicubic",
                                                                    "calib_data/", None, progress=lambda *a, **k: None)
    assert "PSNR vs truth (dB)" in metrics.columns and "bicubic" in list(metrics["output"])
    # the truth, not the degraded input
    assert original.shape == (60, 90, 3) and comparison.panel_labels(_state)[0]["label"] == "Truth"


@pytest.mark.parametrize("content, message", [(b"", "empty"), (b"GIF89a garbage", "not an image|corrupt")])
def test_bad_uploads_give_clear_errors(tmp_path, content, message):
    import gradio as gr

    from ui import comparison

    bad = tmp_path / "bad.png"
    bad.write_bytes(content)
    with pytest.raises(gr.Error, match=message):
        comparison.run_compare(str(bad), "xlsr-relu", "xlsr-clip", "minmax", 10, "cpu", "Upscale my image", "bicubic",
                               "calib_data/", None, progress=lambda *a, **k: None)
    with pytest.raises(gr.Error, match="Upload an image first"):
        comparison.run_compare(None, "xlsr-relu", "xlsr-clip", "minmax", 10, "cpu", "Upscale my image", "bicubic",
                               "calib_data/", None)


def test_space_front_matter():
    text = (ROOT / "README.md").read_text()
    assert text.startswith("---\n")
    meta = yaml.safe_load(text.split("---\n")[1])
    assert meta["sdk"] == "gradio" and meta["app_file"] == "app.py"
    import gradio

    assert meta["sdk_version"] == gradio.__version__
    for key in ("title", "python_version", "short_description", "license"):
        assert meta.get(key), key
    assert len(meta["short_description"]) <= 60


def test_gradio_client_compare_and_recalibrate(server, small_png):
    from gradio_client import Client, handle_file

    client = Client(server, verbose=False)
    first = client.predict(handle_file(small_png), api_name="/compare")  # every setting has a default
    *images, metrics, coverage, _chart = first
    assert len(images) == 5 and all(Path(p).suffix == ".png" for p in images)
    assert Image.open(images[2]).size == (270, 180)
    rows = {row[0]: row for row in metrics["data"]}
    assert any(key.startswith("INT8") for key in rows) and "calibration" in coverage
    # Recalibrate: the same models, method and samples, a new calibration sample (seed)
    again = client.predict(handle_file(small_png), "xlsr-relu", "xlsr-clip", "entropy", 100, "tensorrt",
                           "Upscale my image", "bicubic", "calib_data/", 1.0, 4141, api_name="/compare")
    column = metrics["headers"].index("PSNR vs FP32 (dB)")
    before = {row[0]: row[column] for row in metrics["data"] if str(row[0]).startswith("INT8")}
    after = {row[0]: row[column] for row in again[5]["data"] if str(row[0]).startswith("INT8")}
    assert set(before) == set(after) and before != after  # the same outputs, other ranges: other INT8 figures
    fp32 = {row[0]: row[column] for row in again[5]["data"] if str(row[0]).startswith("FP32")}
    assert fp32 == {row[0]: row[column] for row in metrics["data"] if str(row[0]).startswith("FP32")}
    # run again (settings this server has run: the quick lane, in the server's process, which keeps the FP32
    # outputs): a reused FP32 output's time is its first run's, and says so
    for _ in range(2):  # (the first quick run makes the FP32 outputs in this process; the second reuses them)
        third = client.predict(handle_file(small_png), "xlsr-relu", "xlsr-clip", "entropy", 100, "tensorrt",
                               "Upscale my image", "bicubic", "calib_data/", 1.0, 4141, api_name="/compare")
    engine = third[5]["headers"].index("engine")
    assert all("output reused" in row[engine] for row in third[5]["data"] if str(row[0]).startswith("FP32"))


def test_refinements_in_the_compare_tab(small_png):
    """Centred I/O and equalization in the app: the same FP32 function, a refined INT8 model, labelled so."""
    from ui import comparison

    quiet = lambda *a, **k: None  # noqa: E731
    plain = comparison.run_compare(small_png, "xlsr-relu", "xlsr-clip", "mse", 10, "tensorrt", "Upscale my image",
                                   "nearest", "calib_data/", None, progress=quiet)
    refined = comparison.run_compare(small_png, "xlsr-relu", "xlsr-clip", "mse", 10, "tensorrt", "Upscale my image",
                                     "nearest", "calib_data/", None, 1.0, 0, None, ["centred-io", "equalize"],
                                     progress=quiet)
    assert np.abs(plain[1].astype(int) - refined[1].astype(int)).max() <= 1  # FP32 A: the same function
    assert not np.array_equal(plain[2], refined[2])  # INT8 A: a different INT8 model
    labels = [update["label"] for update in comparison.panel_labels(refined[8])]
    assert labels[2].endswith("(refined: centred-io, equalize)"), labels


def test_training_is_off_unless_the_operator_allows_it(monkeypatch):
    import gradio as gr

    from ui import handlers, jobs, server

    monkeypatch.setattr(jobs.POLICY, "enabled", False)
    with pytest.raises(gr.Error, match="Training is off on this deployment"):
        next(handlers.start_training(20, "relu", False, 0.5, owner=server.issue_owner()))


@pytest.fixture
def job_sandbox(tmp_path, photo, monkeypatch):
    """Jobs allowed, two small training images, and runs/ in a temp folder (the model lists read it there)."""
    from ui import jobs
    from sr import store

    from sr.lab import compare
    folder = tmp_path / "train"
    folder.mkdir()
    for index in range(2):
        Image.fromarray(np.roll(photo, 11 * index, axis=0)).resize((120, 120)).save(folder / f"{index}.png")
    monkeypatch.setenv("SR_TRAIN_DIRS", str(folder))
    monkeypatch.setattr(store, "RUNS_DIR", tmp_path / "runs")
    monkeypatch.setattr(compare, "RUNS_DIR", tmp_path / "runs")
    monkeypatch.setattr(jobs.POLICY, "enabled", True)
    return tmp_path


def test_training_jobs_belong_to_their_tab(job_sandbox):
    from ui import jobs
    from sr.lab import compare

    first = jobs.start("tab-one", 20, "clipped_relu", use_teacher=False)
    second = jobs.start("tab-two", 1, "relu", use_teacher=False)  # one step works, and waits for the first
    with pytest.raises(ValueError, match="you already have a job"):
        jobs.start("tab-one", 20, "relu", use_teacher=False)
    assert jobs.cancel("tab-three") == "you have no job running"  # nobody else's job can be cancelled
    statuses = [snapshot.status for snapshot in second.stream(interval=0.1)]
    assert any("in the queue" in status for status in statuses), statuses
    snapshots = list(first.stream(interval=0.1))
    assert snapshots[-1].done and "saved as" in snapshots[-1].status, snapshots[-1].status
    assert "saved as" in statuses[-1] and any(event["step"] == 20 for event in snapshots[-1].history)
    assert any(name.endswith(f"{first.name}.safetensors") for name in compare.available_models())
    with pytest.raises(ValueError, match="steps must be between 1 and"):
        jobs.start("tab-one", jobs.POLICY.max_steps + 1, "relu", use_teacher=False)
    assert "tab-one" not in first.name and "tab-two" not in second.name  # names carry nothing of the owner


def test_finished_models_are_evicted_only_by_their_owner(job_sandbox, monkeypatch):
    """Each owner keeps its newest few models; a crowd of fresh owners can neither evict another visitor's recent
    model nor fill the folder past the cap (they are refused in words); once the hold expires, they can."""
    from ui import jobs

    runs = job_sandbox / "runs"
    runs.mkdir()
    monkeypatch.setattr(jobs, "_RESULTS", {})
    monkeypatch.setattr(jobs, "MAX_RUNS", 5)

    def finished(owner: str, index: int) -> Path:
        path = runs / f"xlsr-relu-train-1-{owner}{index:03d}.safetensors"
        path.write_bytes(b"x")
        jobs._RESULTS[path.stem] = (owner, time.time())
        time.sleep(0.01)
        return path

    victim = finished("victim", 0)
    for index in range(jobs.MAX_RUNS_PER_OWNER + 1):
        finished("busy", index)
    jobs._prune_runs("busy")
    assert len(list(runs.glob("*busy*"))) == jobs.MAX_RUNS_PER_OWNER and victim.exists()
    for index in range(3):  # fresh owners (as forged tokens would be): the folder fills, the victim's model stays
        finished(f"fresh{index}", index)
        jobs._prune_runs(f"fresh{index}")
    assert victim.exists() and len(list(runs.iterdir())) <= jobs.MAX_RUNS + 1
    with pytest.raises(ValueError, match="at most 5 trained models"):
        jobs.start("yet-another", 1, "relu", use_teacher=False)
    jobs._RESULTS[victim.stem] = ("victim", time.time() - jobs.OWNED_SECONDS - 1)  # its hold has expired
    finished("fresh9", 9)
    jobs._prune_runs("fresh9")
    assert not victim.exists() and len(list(runs.iterdir())) == jobs.MAX_RUNS


def _queue_call(url: str, demo, fn, data: list, session: str):
    """A raw queue call, as a browser (or a hostile client) makes it: join, then the open event stream."""
    import requests

    index = next(i for i, block_fn in demo.fns.items() if block_fn.fn is fn)
    joined = requests.post(f"{url}gradio_api/queue/join", json={"data": data, "fn_index": index, "session_hash": session,
                                                               "event_data": None, "trigger_id": None}, timeout=30)
    assert joined.status_code == 200, joined.text
    return requests.get(f"{url}gradio_api/queue/data", params={"session_hash": session}, stream=True, timeout=60)


def _messages(stream, until: str) -> list[dict]:
    import json

    seen = []
    for line in stream.iter_lines():
        if line.startswith(b"data:"):
            seen.append(json.loads(line[5:]))
            if seen[-1].get("msg") in (until, "process_completed"):
                return seen
    return seen


def test_a_forged_owner_cannot_cancel_and_a_closed_page_drops_its_job(job_sandbox, monkeypatch):
    """Through raw queue calls on a real server: a job belongs to the server-issued owner token, not the session
    hash; neither the victim's session hash nor a token with a forged signature can cancel it; when the page
    that watches it goes away, the job stops (its weights so far kept)."""
    from ui import handlers, jobs, layout, server

    monkeypatch.setattr(jobs, "ABANDONED_SECONDS", 10.0)  # (under load a page's updates can be seconds apart)
    demo = layout.build_demo().queue()
    demo.launch(server_port=free_port(), prevent_thread_lock=True, quiet=True)
    try:
        victim = server.issue_owner()
        assert server.issue_owner(victim) == victim and server._verified_owner(victim)
        watching = _queue_call(demo.local_url, demo, handlers.start_training,
                               [3000, "relu", False, 0.5, "output", victim], "victim-session")
        assert _messages(watching, "process_generating")[-1]["msg"] == "process_generating"
        job = jobs._running or jobs._queue[0]
        ident = victim.split(".")[0]
        for forged, session in [(None, "victim-session"), (f"{ident}.{'0' * 32}", "forger"),
                                (f"{ident}.", "forger"), (ident, "forger")]:
            answer = _messages(_queue_call(demo.local_url, demo, handlers.cancel_training, [forged], session),
                               "process_completed")[-1]
            assert not answer["success"] and "no owner token" in str(answer), answer
        answer = _messages(_queue_call(demo.local_url, demo, handlers.cancel_training, [server.issue_owner()],
                                       "forger"), "process_completed")[-1]
        assert answer["output"]["data"] == ["you have no job running"] and not job.stop.is_set()
        deadline = time.time() + 120  # under load the first logged step can take a while: wait for it
        while not job.history and not job.done and time.time() < deadline:
            time.sleep(0.2)
        assert job.history, job.status
        watching.close()  # the victim's page goes away
        deadline = time.time() + 60
        while not job.done and time.time() < deadline:
            time.sleep(0.2)
        assert job.done and job.status.startswith("stopped: its page was closed"), job.status
        assert job.history[-1]["step"] < 3000
    finally:
        demo.close()


def test_make_it_int8_ready_adds_a_fine_tuned_model(job_sandbox, monkeypatch, data_dir):
    """The app's QAT action: off unless allowed, then a real (short) QAT job whose result joins the model lists
    as model A and carries its learned ranges."""
    import gradio as gr

    from ui import handlers, jobs, server
    from sr.run.quantize import learned_ranges

    tmp_path = job_sandbox
    monkeypatch.setattr(jobs.POLICY, "enabled", False)
    with pytest.raises(gr.Error, match="Fine-tuning is off on this deployment"):
        next(handlers.start_qat("xlsr-clip", 5, owner=server.issue_owner()))
    monkeypatch.setattr(jobs.POLICY, "enabled", True)
    monkeypatch.setattr(jobs, "QAT_EQUALIZE", 0.0)
    owner = server.issue_owner()
    updates = list(handlers.start_qat("xlsr-clip", 4, owner=owner))
    status, _, result = updates[-1]
    assert "saved as" in status and result and result.endswith(".safetensors"), status
    assert learned_ranges(result, "tensorrt")
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == sorted([Path(result).name, Path(result).name.replace(
        ".safetensors", ".tensorrt.qdq.onnx")])  # no checkpoint or starting-point file left behind
    model_a, _, uploads = handlers.offer_result(result, [], "xlsr-relu")
    assert model_a["value"] == result and result in model_a["choices"] and uploads == []
    # teacher-guided: the record says so
    *_, (status, _, guided) = list(handlers.start_qat("xlsr-clip", 2, True, owner))
    from sr.run.quantize import qat_record

    config = qat_record(guided).details["config"]
    assert config["teacher"] == "teacher" and config["beta"] == jobs.QAT_TEACHER_BETA, status


def test_uploads_reach_the_lab_untouched(server, tmp_path):
    """Through the real upload path: an RGBA PNG is composited on white (not black), a 16-bit ramp keeps its
    levels (not saturated), and broken files get the lab's own message."""
    from gradio_client import Client, handle_file

    client = Client(server, verbose=False)
    rgba = np.zeros((60, 90, 4), np.uint8)
    rgba[:, :45] = (200, 30, 30, 255)  # left half opaque red, right half fully transparent black
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    original = client.predict(handle_file(str(tmp_path / "rgba.png")), api_name="/compare")[0]
    shown = np.asarray(Image.open(original).convert("RGB"))
    assert shown[:, -60:].min() >= 250 and shown[:, :60, 0].mean() > 150  # transparent -> white, red kept
    ramp = np.tile(np.linspace(0, 65535, 90).astype(np.uint16), (60, 1))
    Image.fromarray(ramp).save(tmp_path / "ramp16.png")
    shown = np.asarray(Image.open(client.predict(handle_file(str(tmp_path / "ramp16.png")), api_name="/compare")[0]))
    assert 100 < shown.mean() < 155 and shown[:, :30].mean() < 80  # levels preserved, not 99.6% white
    Image.new("1", (20000, 20000)).save(tmp_path / "huge.png")  # 400 MP claimed by a small file
    for name, content, message in [("huge.png", (tmp_path / "huge.png").read_bytes(), "too many pixels|more than the limit"),
                                   ("empty.png", b"", "empty"), ("text.png", b"hello, not an image", "not an image"),
                                   ("cut.png", (tmp_path / "rgba.png").read_bytes()[:200], "corrupt or truncated")]:
        (tmp_path / name).write_bytes(content)
        with pytest.raises(Exception, match=message):
            client.predict(handle_file(str(tmp_path / name)), api_name="/compare")


def test_api_page_lists_only_the_public_endpoints(server):
    from gradio_client import Client

    info = Client(server, verbose=False).view_api(return_format="dict", print_info=False)
    assert set(info["named_endpoints"]) == {"/compare", "/diagnose"} and not info["unnamed_endpoints"]
    returns = [r["label"] for ep in info["named_endpoints"].values() for r in ep["returns"]]
    assert not any(label.startswith("value_") for label in returns), returns


def test_onnx_upload_handler(tmp_path):
    import gradio as gr

    from ui import handlers
    path = standins.build_all(tmp_path / "models")["xlsr-255"]
    model_a, model_b, contract, choices = handlers.load_onnx_model(str(path), "auto", "auto", "auto", False, "auto",
                                                                   "xlsr-clip", [])
    assert model_a["value"].startswith("onnx:") and "values in [0, 255]" in contract and choices == [model_a["value"]]
    assert "xlsr-255.onnx (your ONNX model)" in model_a["label"]
    (tmp_path / "bad.onnx").write_bytes(b"not onnx at all")
    with pytest.raises(gr.Error, match="not an ONNX model"):
        handlers.load_onnx_model(str(tmp_path / "bad.onnx"), "auto", "auto", "auto", False, "auto", "xlsr-clip", [])


def test_diagnose_tab_on_an_uploaded_onnx_model(tmp_path, small_png):
    from ui import handlers
    path = standins.build_all(tmp_path / "models")["xlsr-nhwc"]
    model_a, *_ = handlers.load_onnx_model(str(path), "auto", "auto", "auto", False, "auto", "xlsr-clip", [])
    messages = []
    ranking, figure, summary, tensor, report, _ = handlers.run_diagnose(
        small_png, model_a["value"], "xlsr-clip", "model A", "Upscale my image", "entropy", 10, "tensorrt",
        progress=lambda fraction, desc=None: messages.append(desc))
    assert len(ranking) > 5 and summary.startswith("**xlsr-nhwc.onnx**")
    assert any("s left" in (message or "") for message in messages)  # the cost is estimated as it goes


@pytest.mark.parametrize("gain", [0.4, 1.0])
def test_the_offered_fix_raises_psnr_or_none_is_offered_with_the_reason(small_png, gain):
    """The dark preset (calibration at 40% brightness) and the default settings: a fix is preselected only when
    applying it raises PSNR on this image, and applying it gives exactly the figures the summary promised (one
    "before"); otherwise the summary says none helps and why."""
    from ui import handlers

    *_, summary, tensor, report, fix = handlers.run_diagnose(
        small_png, "xlsr-relu", "xlsr-clip", "model A", "Upscale my image", "minmax", 10, "tensorrt", gain, 0,
        progress=lambda *a, **k: None)
    if "**Measured fix:**" in summary:
        before, after, table = handlers.run_fix(small_png, report, tensor["value"], fix["value"], "Upscale my image",
                                                progress=lambda *a, **k: None)
        psnr = list(table.iloc[:, 1])
        assert float(psnr[1]) > float(psnr[0])
        promised = re.search(r"from ([0-9.]+) to ([0-9.]+) dB", summary).groups()
        assert [float(p) for p in promised] == pytest.approx([float(p) for p in psnr], abs=0.006)  # one "before"
    else:
        assert "**No fix is offered:**" in summary
        if gain < 1:
            assert "darker than this image" in summary


def test_an_animation_a_missing_setting_and_undecodable_bytes_get_words(tmp_path):
    """An animation says which frame is used; a missing widget value and undecodable bytes are refused in words
    (no Python repr of a buffer, no address)."""
    from ui import comparison
    from sr.lab.compare import prepare_input
    from sr.data import ImageLoadError, load_image

    frames = [Image.new("RGB", (24, 24), colour) for colour in ("red", "blue", "green")]
    gif = tmp_path / "moving.gif"
    frames[0].save(gif, save_all=True, append_images=frames[1:])
    assert "animation of 3 frames; the first frame is used" in " ".join(prepare_input(str(gif), "upscale", 3).notices)
    with pytest.raises(ValueError, match="must be numbers"):
        comparison._calibration("entropy", None, 1.0, 0)
    with pytest.raises(ValueError, match="samples must be an integer from 10 to 1000, got 5"):
        comparison._calibration("entropy", 5, 1.0, 0)  # a number out of range keeps the library's own words
    with pytest.raises(ImageLoadError) as error:
        load_image(b"not an image at all")
    assert "BytesIO" not in str(error.value) and "0x" not in str(error.value)


def test_the_page_words_a_permission_or_missing_file_error_without_the_servers_path():
    """`_user_errors` turns what a read-only cache or a vanished upload raises into words without the server's
    path. The errors are raised here rather than made (a read-only folder does not stop root, whom tests may run
    as)."""
    import gradio as gr

    from ui import server

    with pytest.raises(gr.Error) as shown:
        with server._user_errors("comparison"):
            raise PermissionError(13, "Permission denied", "/srv/app/cache/int8/abc")
    assert "/srv" not in str(shown.value) and "cannot write its cache folder" in str(shown.value)
    with pytest.raises(gr.Error) as shown:
        with server._user_errors("comparison"):
            raise FileNotFoundError("no such image file: /srv/app/uploads/x.png")
    assert "/srv" not in str(shown.value) and "x.png" in str(shown.value)


def test_bundles_do_not_pile_up(small_png, monkeypatch):
    """Each bundle leaves only its zip, under the cache's bundles/, and old ones go when a new one is made."""
    import os

    from ui import handlers, server
    from sr.store import cache_root

    first = Path(handlers.build_bundle(small_png, "xlsr-clip", "minmax", 10, 1.0, 0, "Upscale my image",
                                       progress=lambda *a, **k: None))
    assert first.is_file() and first.parent.parent == cache_root() / "bundles"
    assert [p.name for p in first.parent.iterdir()] == [first.name]
    os.utime(first.parent, (time.time() - server.BUNDLE_KEEP_SECONDS - 10,) * 2)
    second = Path(handlers.build_bundle(small_png, "xlsr-clip", "minmax", 10, 1.0, 0, "Upscale my image",
                                        progress=lambda *a, **k: None))
    assert second.is_file() and not first.exists()


def test_an_uploaded_models_cost_is_known_before_it_runs(tmp_path):
    """Ten 3x3 convolutions of 256 channels (5.9 million MACs per pixel) are refused in words at upload."""
    import gradio as gr

    from ui import handlers

    heavy = standins.conv_stack(tmp_path / "heavy.onnx", 256, 10)
    with pytest.raises(gr.Error, match="million multiply-accumulates per input pixel"):
        handlers.load_onnx_model(str(heavy), "auto", "auto", "auto", False, "auto", "xlsr-clip", [])


def _uploaded(url: str, path: Path) -> dict:
    """A file uploaded as the page uploads it: its file data for a queue call."""
    import requests

    names = requests.post(f"{url}gradio_api/upload", files=[("files", (path.name, path.read_bytes()))], timeout=60)
    return {"path": names.json()[0], "orig_name": path.name, "meta": {"_type": "gradio.FileData"}}


@pytest.mark.slow
def test_an_uploaded_model_does_not_hold_up_the_shipped_models(server, small_png, tmp_path):
    """On the real server, through the page's own queue calls: a visitor's slow uploaded model (a long first
    calibration) runs in its own lane of the two heavy slots, so another visitor's cached comparison of the
    shipped models answers meanwhile, within 10 s; a second upload-lane request is refused in words instead of
    taking the other slot."""
    import threading

    from gradio_client import Client, handle_file

    from ui import comparison, handlers, layout, words
    from ui.server import HEAVY, HEAVY_SLOTS

    demo = layout.build_demo()  # the server runs this same app: its events are numbered alike
    contract = ["auto", "auto", "auto", False, "auto", "xlsr-clip", []]
    model = standins.conv_stack(tmp_path / "slow.onnx", 32, 4)  # about 8 s of calibration here: long enough
    for visitor in ("heavy-visitor", "second-visitor"):  # (a model is in the lists of the visitors who uploaded it)
        answer = _messages(_queue_call(server, demo, handlers.load_onnx_model, [_uploaded(server, model), *contract],
                                       visitor), "process_completed")[-1]
    slow = answer["output"]["data"][0]["value"]
    client = Client(server, verbose=False)
    shipped = (handle_file(small_png), "xlsr-relu", "xlsr-clip", "minmax", 10)
    client.predict(*shipped, api_name="/compare")  # cached from now on
    image, heavy_answer = _uploaded(server, Path(small_png)), []
    settings = ["tensorrt", "Upscale my image", "bicubic", "calib_data/", None, 1.0, 0, None, [],
                words.REFERENCE_TARGET]
    heavy = threading.Thread(target=lambda: heavy_answer.extend(_messages(_queue_call(
        server, demo, comparison.run_compare, [image, slow, slow, "entropy", 1000, *settings], "heavy-visitor"),
        "process_completed")), daemon=True)
    heavy.start()
    time.sleep(3)
    started = time.perf_counter()
    client.predict(*shipped, api_name="/compare")
    waited = time.perf_counter() - started
    assert heavy.is_alive(), f"the slow model should still be calibrating ({heavy_answer[-1:]})"
    assert waited < 10, f"the cached shipped comparison waited {waited:.1f} s behind an uploaded model"
    second = _messages(_queue_call(server, demo, comparison.run_compare,
                                   [image, slow, "xlsr-clip", "minmax", 10, *settings], "second-visitor"),
                       "process_completed")[-1]
    assert not second["success"] and "uploaded model is being processed" in str(second), second
    heavy.join(timeout=600)  # (read to its end: nothing keeps calibrating under the next tests)
    assert heavy_answer and heavy_answer[-1]["success"], heavy_answer[-1:]
    events = [fn for fn in demo.fns.values() if getattr(fn, "concurrency_id", None) == HEAVY]
    assert events and {fn.concurrency_limit for fn in events} == {HEAVY_SLOTS}


def test_a_model_that_reads_server_files_is_refused_through_the_page(server, tmp_path):
    """The report's hostile upload, through the page's own upload event on the real server: a Constant whose
    tensor points at app.py (and at the cache's contract files) is refused, and the answer carries neither a
    byte of those files nor a server path."""
    from ui import handlers, layout

    demo = layout.build_demo()
    secret = (ROOT / "app.py").read_bytes()[:8]
    for location in (str(ROOT / "app.py"), "app.py", "cache/user/x/contract.json"):
        path = tmp_path / "hostile.onnx"
        path.write_bytes(standins.constant_reading(location).SerializeToString())
        answer = _messages(_queue_call(server, demo, handlers.load_onnx_model,
                                       [_uploaded(server, path), "auto", "auto", "auto", False, "auto", "xlsr-clip", []],
                                       "hostile"), "process_completed")[-1]
        text = str(answer)
        assert not answer["success"] and "external files" in text, text
        assert ",".join(str(b) for b in secret) not in text and secret.decode(errors="ignore") not in text
        assert str(ROOT) not in text and "/tmp" not in text


def _capture(errors: list, function, *args, **kwargs):
    try:
        function(*args, **kwargs)
    except Exception as error:  # noqa: BLE001 (reported by the test)
        errors.append(error)


def test_calibration_uploads_are_kept_small(tmp_path):
    """A session keeps each calibration upload at most KEPT_CALIBRATION_PIXELS (64 of them stay ~100 MB)."""
    from ui import comparison, layout, server

    big = tmp_path / "big.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (1500, 2000, 3), dtype=np.uint8)).save(big)
    kept = comparison._read_calibration_uploads([str(big), str(big)])
    assert len(kept) == 2 and all(k.shape[0] * k.shape[1] <= server.KEPT_CALIBRATION_PIXELS for k in kept)
    assert abs(kept[0].shape[1] / kept[0].shape[0] - 2000 / 1500) < 0.01  # the aspect ratio is kept
    states = [block for block in layout.build_demo().blocks.values() if type(block).__name__ == "State"]
    assert any(getattr(state, "time_to_live", None) == server.SESSION_STATE_SECONDS for state in states)


def test_training_controls_are_disabled_when_training_is_off(monkeypatch):
    """Off (the Space's default): Start and "Fine-tune model A for INT8" are shown disabled with the reason, not
    clickable into an error."""
    from ui import jobs, layout

    monkeypatch.setattr(jobs.POLICY, "enabled", False)
    buttons = [b for b in layout.build_demo().blocks.values() if type(b).__name__ == "Button"]
    guarded = [b for b in buttons if "is off here" in str(b.value)]
    assert len(guarded) == 2 and not any(b.interactive for b in guarded)
    monkeypatch.setattr(jobs.POLICY, "enabled", True)
    buttons = [b for b in layout.build_demo().blocks.values() if type(b).__name__ == "Button"]
    assert not any("is off here" in str(b.value) for b in buttons)


def test_the_calibration_estimate_is_measured_here(small_png):
    """After a first calibration the app's estimate comes from what this machine took, not a constant."""
    from ui import comparison

    comparison._CALIBRATION_RATE["seconds_per_sample_mparam"] = 0.0
    constant = comparison._calibration_estimate("xlsr-relu", "xlsr-clip", 100)
    started = time.perf_counter()
    comparison.run_compare(small_png, "xlsr-relu", "xlsr-clip", "percentile", 20, "tensorrt", "Upscale my image",
                           "nearest", "calib_data/", None, 1.0, 4242,
                           progress=lambda *a, **k: None)  # a seed no other test uses
    took = time.perf_counter() - started
    measured = comparison._calibration_estimate("xlsr-relu", "xlsr-clip", 20)
    assert comparison._CALIBRATION_RATE["seconds_per_sample_mparam"] > 0 and measured != constant / 5
    assert measured <= took  # the calibrations are part of what that run took


def test_an_oversized_request_is_refused(server):
    """A queue call of 40 MB (a data: URL inside the payload would be one) is refused with 413 before it is read
    into Gradio's temp folder; the server keeps serving."""
    import requests

    big = b'{"data": ["data:image/png;base64,' + b"A" * (40 * 2**20) + b'"], "fn_index": 0, "session_hash": "x"}'
    answer = requests.post(f"{server}gradio_api/queue/join", data=big, headers={"content-type": "application/json"},
                           timeout=60)
    assert answer.status_code == 413 and "larger than" in answer.text
    assert requests.get(server, timeout=30).status_code == 200


def test_a_heavy_request_stops_at_its_wall_time_cap(small_png, monkeypatch):
    """A calibration that runs past the cap stops in words between batches; the cache it was filling stays
    whole, so the same request under the normal cap then completes."""
    import gradio as gr

    from ui import comparison, server

    settings = (small_png, "xlsr-relu", "xlsr-clip", "percentile", 20, "tensorrt", "Upscale my image", "nearest",
                "calib_data/", None, 1.0, 4343)  # a seed no other test uses: nothing cached
    monkeypatch.setattr(server, "MAX_REQUEST_SECONDS", 0.0)
    with pytest.raises(gr.Error, match=r"stopped: it ran longer than 0 s"):
        comparison.run_compare(*settings, progress=lambda *a, **k: None)
    monkeypatch.setattr(server, "MAX_REQUEST_SECONDS", 300.0)
    outputs = comparison.run_compare(*settings, progress=lambda *a, **k: None)
    assert outputs[2] is not None and outputs[5] is not None


def test_work_on_uploaded_models_runs_in_a_box_at_a_lower_cpu_priority():
    """Work on an uploaded model runs in a box (a process of its own, sr.box) at nice UPLOADED_NICE, so on a busy
    CPU the shipped models' work gets most of it and nothing it does reaches the server's process; errors come
    back to the caller as raised; the shipped lane runs in the caller's process, unchanged."""
    import operator

    from ui import server
    from sr.run.register import register_onnx

    before = os.getpriority(os.PRIO_PROCESS, 0)
    with server._lane(register_onnx(ROOT / "examples" / "fsrcnn-y.onnx").name) as run:
        assert run(os.getpid) != os.getpid()
        assert run(os.getpriority, os.PRIO_PROCESS, 0) == max(before, server.UPLOADED_NICE)
        with pytest.raises(ZeroDivisionError):
            run(operator.truediv, 1, 0)
    with server._lane("xlsr-relu", "xlsr-clip", kind="quick") as run:  # a comparison that reads the cache
        assert run(os.getpid) == os.getpid()
    with server._lane("xlsr-relu", "xlsr-clip") as run:  # the long lane: boxed too (its priority, its kill)
        assert run(os.getpid) != os.getpid()
    assert os.getpriority(os.PRIO_PROCESS, 0) == before


def test_make_model_a_int8_ready_shows_the_route_and_offers_the_chosen_bundle(monkeypatch):
    """The Compare tab's "Make model A INT8-ready" runs what `python -m sr int8-ready` runs: the table of the
    route, the chosen model's bundle, and (QAT being off on the Space) says so."""
    import zipfile

    from ui import handlers, jobs

    monkeypatch.setattr(jobs.POLICY, "enabled", False)
    report, archive, *_ = handlers.make_ready_for("xlsr-clip", 20, "tensorrt", 30.0, 1, [], "xlsr-relu",
                                                  progress=lambda *a, **k: None)
    assert "| range methods | entropy |" in report and "Chosen: entropy" in report and "target met" in report
    assert "QAT is off on this server" in report
    assert {"model.qdq.onnx", "README.md"} <= set(zipfile.ZipFile(archive).namelist())
    readme = zipfile.ZipFile(archive).read("README.md").decode()
    assert readme.startswith("# INT8 bundle of `xlsr-clip, made INT8-ready`")  # the name the page shows


@pytest.mark.skipif(not __import__("sr.run.npu", fromlist=["x"]).qnn_available(), reason="onnxruntime-qnn is in "
                    "requirements.txt")
def test_the_diagnosis_and_int8_ready_follow_the_target_the_panels_run_on(small_png, monkeypatch):
    """With the INT8 panels on Qualcomm's HTP, the diagnosis also scores the whole INT8 model as the HTP runs it,
    and "Make model A INT8-ready" judges its choice as the HTP runs it (no mixed precision: the HTP runs no float
    tensor); an unknown target is refused in words."""
    import gradio as gr

    from ui import handlers, jobs

    htp = "Qualcomm HTP v73 (simulated)"
    *_, summary, _, report, _ = handlers.run_diagnose(
        small_png, "xlsr-clip", "xlsr-relu", "model A", "Upscale my image", "entropy", 10, "npu", 1.0, 0, None, htp,
        progress=lambda *a, **k: None)
    assert "As qnn-htp-npu-v73 runs it: " in summary and report.target.psnr_vs_fp32_db > 40
    monkeypatch.setattr(jobs.POLICY, "enabled", False)
    shown, *_ = handlers.make_ready_for("xlsr-clip", 20, "npu", 30.0, 1, [], "xlsr-relu", htp,
                                        progress=lambda *a, **k: None)
    assert "target met as qnn-htp-npu-v73 runs it" in shown and "- as qnn-htp-npu-v73 runs it: " in shown
    with pytest.raises(gr.Error, match="Unknown INT8 target"):
        handlers.run_diagnose(small_png, "xlsr-clip", "xlsr-relu", "model A", "Upscale my image", "entropy", 10,
                              "npu", 1.0, 0, None, "an NPU of my own", progress=lambda *a, **k: None)


def test_a_model_with_nothing_quantized_compares_and_says_so(tmp_path, small_png):
    """One Conv (3 -> 27 channels, too small for a TensorRT INT8 kernel) and a PixelShuffle: the tensorrt scheme
    quantizes nothing in it, so the coverage check has nothing to check (it used to fail every compare with
    "IndexError: list index out of range")."""
    import torch

    from ui import comparison
    from sr.run.register import register_onnx

    network = torch.nn.Sequential(torch.nn.Conv2d(3, 27, 3, padding=1), torch.nn.PixelShuffle(3)).eval()
    user = register_onnx(standins._export(network, tmp_path / "one-conv.onnx", torch.rand(1, 3, 24, 24)))
    *panels, metrics, coverage, _, _, _ = comparison.run_compare(
        small_png, user.name, "xlsr-clip", "entropy", 10, "tensorrt", "Upscale my image", "nearest", "calib_data/",
        None, progress=lambda *a, **k: None)
    assert "no activation of it is quantized under the tensorrt scheme" in coverage and len(metrics) == 4


@pytest.mark.skipif(not __import__("sr.run.npu", fromlist=["x"]).qnn_available(), reason="onnxruntime-qnn is in "
                    "requirements.txt")
def test_the_int8_panels_on_a_target_and_the_difference_from_the_reference(small_png):
    """The npu scheme's INT8 panels on Qualcomm's HTP (simulated): the table names the engine, the labels say so,
    and the difference view shows where the NPU's output differs from the reference's (it rounds its own way:
    not blank); on the reference itself that view asks for a target first."""
    import gradio as gr

    from ui import comparison

    *panels, metrics, _, _, state, _ = comparison.run_compare(
        small_png, "xlsr-relu", "xlsr-clip", "entropy", 10, "npu", "Upscale my image", "nearest", "calib_data/", None,
        target="Qualcomm HTP v73 (simulated)", progress=lambda *a, **k: None)
    assert [e for e in metrics["engine"] if "qnn-htp" in e] and "on Qualcomm HTP v73" in state["labels"][2]
    difference = comparison.run_difference(state, "INT8 A: target vs reference", "|difference| of luma", 32)
    assert difference[:180].std() > 0
    *_, plain, _ = comparison.run_compare(small_png, "xlsr-relu", "xlsr-clip", "entropy", 10, "npu", "Upscale my image",
                                          "nearest", "calib_data/", None, progress=lambda *a, **k: None)
    with pytest.raises(gr.Error, match="Choose a target"):
        comparison.run_difference(plain, "INT8 A: target vs reference", "|difference| of luma", 32)


def test_two_diagnoses_of_one_browser_are_both_cancelled_and_leave_no_stop_behind(small_png):
    """A second diagnosis by the same owner no longer replaces the first one's stop (which then could not be
    cancelled): Cancel stops both, and the stop table is empty once they end."""
    import threading

    import gradio as gr

    from ui import handlers, server

    owner = server.issue_owner()
    ident = server._verified_owner(owner)
    outcomes = []

    def diagnose() -> None:
        try:
            handlers.run_diagnose(small_png, "teacher", "xlsr-clip", "model A", "Upscale my image", "minmax", 10,
                                  "tensorrt", 1.0, 0, owner, progress=lambda *a, **k: None)
            outcomes.append("finished")
        except gr.Error as error:
            outcomes.append(str(error))

    threads = [threading.Thread(target=diagnose) for _ in range(2)]
    for thread in threads:
        thread.start()
    deadline = time.time() + 60
    while len(handlers._STOPS.get(ident, ())) < 2 and time.time() < deadline:
        time.sleep(0.05)
    assert len(handlers._STOPS.get(ident, ())) == 2
    handlers.cancel_diagnosis(owner)
    for thread in threads:
        thread.join(300)
    assert len(outcomes) == 2 and all("cancelled" in o for o in outcomes), outcomes
    assert ident not in handlers._STOPS
