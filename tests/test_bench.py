"""sr.lab.bench's heartbeat: a long step is not silent (the report: `bench --json` said nothing for 4 minutes, then
13.5, while one calibrator ran in a child process)."""
import logging
import time


def test_a_long_step_keeps_saying_what_it_is_doing(caplog):
    from sr.lab.bench import _Heartbeat

    caplog.set_level(logging.INFO, logger="sr.lab.bench")
    with _Heartbeat(every=0.2) as beat:
        beat("ModelOpt's calibrator", force=True)
        time.sleep(1.2)  # one step, no call to the heartbeat meanwhile
    lines = [r.getMessage() for r in caplog.records if r.name == "sr.lab.bench"]
    assert lines[0].endswith("ModelOpt's calibrator")
    stills = [line for line in lines if line.endswith("still ModelOpt's calibrator")]
    assert len(stills) >= 3, lines
    count = len(lines)
    time.sleep(0.5)  # closed: the thread is gone, nothing more is said
    assert len([r for r in caplog.records if r.name == "sr.lab.bench"]) == count
