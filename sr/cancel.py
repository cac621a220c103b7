"""The one cancellation: work a caller asked to stop (its `should_stop` returned True) raises `Cancelled`, whether
it ran in this process (the diagnosis between two tensors) or in a box of its own (`sr.box`, killed at once). The
CLI and the page catch this one type and say what was done before the stop; a budget that ends a search early is
not a cancellation (`sr.tune.ptq.RefineStopped` is a result of the search, reported in words)."""
from __future__ import annotations

from typing import Callable

ShouldStop = Callable[[], bool]  # polled by long work between its steps: True asks it to stop


class Cancelled(Exception):
    """The caller asked the work to stop; the message says how far it got."""


__all__ = ["Cancelled", "ShouldStop"]
