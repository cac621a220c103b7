"""The box every uploaded model runs in (sr.box): a real child process, a real memory limit, a real kill."""
import os
import time

import pytest

import boxwork
from sr.box import BoxLimit, Exceeded, Limits, run_boxed
from sr.progress import Cancelled

GB = 2**30


def test_the_work_runs_in_another_process_and_its_result_comes_back():
    assert run_boxed(boxwork.add, 2, b=3, box=Limits(GB, 30)) == 5
    assert run_boxed(os.getpid, box=Limits(GB, 30)) != os.getpid()
    assert run_boxed(os.getpriority, os.PRIO_PROCESS, 0, box=Limits(GB, 30, nice=7)) >= 7


def test_a_graph_that_allocates_past_the_limit_is_stopped_in_words():
    """The report's hostile graph, run by ONNX Runtime in a 1 GB box: its 9.2 GB allocation fails there, this
    process is untouched."""
    with pytest.raises(BoxLimit) as stopped:
        run_boxed(boxwork.allocate_in_onnxruntime, box=Limits(GB, 60))
    assert stopped.value.exceeded is Exceeded.MEMORY and "more than 1.0 GB of memory" in str(stopped.value)
    assert run_boxed(boxwork.allocate_in_onnxruntime, 320, box=Limits(GB, 60)) == (1, 3, 96, 96)  # 0.4 MB fits


def test_the_deadline_is_a_kill_not_a_request():
    """Work that never reports progress is killed at its deadline (not when it next asks)."""
    started = time.monotonic()
    with pytest.raises(BoxLimit) as stopped:
        run_boxed(boxwork.silent_sleep, 300, box=Limits(GB, 2))
    assert stopped.value.exceeded is Exceeded.TIME and "longer than 2 s" in str(stopped.value)
    assert time.monotonic() - started < 10


def test_a_killed_box_leaves_no_temp_file(tmp_path, monkeypatch):
    monkeypatch.setenv("SR_CACHE_DIR", str(tmp_path))
    with pytest.raises(BoxLimit):
        run_boxed(boxwork.write_then_hang, str(tmp_path / "entries"), box=Limits(GB, 3))
    assert (tmp_path / "entries").is_dir() and list((tmp_path / "entries").iterdir()) == []


def test_progress_errors_and_stopping():
    seen = []
    assert run_boxed(boxwork.counts, 3, box=Limits(GB, 30), progress=lambda f, m: seen.append(m)) == 3
    assert seen == ["step 1", "step 2", "step 3"]
    with pytest.raises(ValueError, match="the work's own words"):
        run_boxed(boxwork.raises, box=Limits(GB, 30))
    asked = time.monotonic() + 1
    started = time.monotonic()
    with pytest.raises(Cancelled, match="stopped at once"):
        run_boxed(boxwork.silent_sleep, 300, box=Limits(GB, 120), should_stop=lambda: time.monotonic() > asked)
    assert time.monotonic() - started < 10
