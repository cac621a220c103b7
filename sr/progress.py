"""How long work talks to its caller: the one progress protocol and the one cancellation.

- `Progress`: `progress(fraction, message)`, the fraction done in [0, 1] and what is being done in words. Every
  long call of the library takes one (`progress=`): calibration, comparison, diagnosis, refinements, bundles,
  int8-ready, evaluation, training and QAT (which also hand their measurements, step by step, to `on_record`:
  data, not progress). The CLI adapts it once (`logged_progress`: log lines, never silent for long, quiet for
  short work); the page adapts it once (`ui.server`'s lane hands gradio's bar to it).
- `Cancelled`: work a caller asked to stop (its `should_stop` returned True) raises it, whether it ran in this
  process (the diagnosis between two tensors) or in a box of its own (`sr.box`, killed at once). A budget that
  ends a search early is not a cancellation (`sr.tune.ptq.RefineStopped` is a result of the search, reported in
  words).
"""
from __future__ import annotations

import logging
import time
from typing import Callable

Progress = Callable[[float, str], None]  # progress(fraction done in [0, 1], what is being done)
ShouldStop = Callable[[], bool]  # polled by long work between its steps: True asks it to stop


class Cancelled(Exception):
    """The caller asked the work to stop; the message says how far it got."""


def logged_progress(what: str, every: float = 5.0,
                    logger: logging.Logger | None = None) -> Progress:
    """A progress callback for work nobody watches through one: it logs (INFO) what is being done, how far it is
    and an estimate of the time left, at most every `every` seconds and never for work that ends sooner, so
    that a long command is never silent and a short one stays quiet."""
    logger = logger or logging.getLogger("sr")
    started = time.perf_counter()
    last = [started]

    def report(fraction: float, message: str = "") -> None:
        now = time.perf_counter()
        if now - last[0] < every:
            return
        last[0] = now
        fraction = min(max(float(fraction or 0.0), 0.0), 1.0)
        left = (f", about {(now - started) * (1 - fraction) / fraction:.0f} s left" if fraction >= 0.02 else "")
        logger.info("%s: %s%s%.0f%% done%s", what, message, ", " if message else "", 100 * fraction, left)

    return report


__all__ = ["Progress", "ShouldStop", "Cancelled", "logged_progress"]
