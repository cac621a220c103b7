"""sr.progress: the one progress protocol as the CLI shows it (logged), and the one cancellation."""
import logging

from sr import progress


def test_logged_progress_is_quiet_for_short_work_and_says_the_time_left(caplog, monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(progress.time, "perf_counter", lambda: clock[0])
    report = progress.logged_progress("calibrating x", every=5.0)
    with caplog.at_level(logging.INFO, logger="sr"):
        clock[0] += 2
        report(0.5, "pass 1 of 2")  # under 5 s in: nothing
        clock[0] += 4
        report(0.25, "pass 1 of 2")
    lines = [r.getMessage() for r in caplog.records if r.name == "sr"]
    assert lines == ["calibrating x: pass 1 of 2, 25% done, about 18 s left"]
