"""Probing a user's model: the natural photo it is fed, the time a probe may take (`ProbeTimedOut` past it), and the
input sizes it accepts (a square that runs, the multiple its sides must be, its smallest side), found by probe runs
(the run layer runs the graph: `sr.run.register.probe_runner`)."""
from __future__ import annotations

import numpy as np

from .checks import UserModelError

PROBE_SECONDS = 30.0


class ProbeTimedOut(UserModelError):
    """The model ran past the probe's time limit."""


def _probe_image(height: int, width: int) -> np.ndarray:
    """A natural photo crop (scikit-image's, no download), float32 HxWx3 in [0, 1]."""
    from PIL import Image
    from skimage import data as skdata

    photo = Image.fromarray(np.asarray(skdata.astronaut())[100:420, 100:420])
    return np.asarray(photo.resize((width, height), Image.Resampling.BICUBIC), np.float32) / 255.0


PROBE_SIZE = (48, 40)  # the probe's (height, width) for a model that takes it
SQUARES = (64, 128, 256)  # the sides tried first (multiples of every multiple below)
MULTIPLES = (2, 4, 8, 16, 32, 64)  # the multiples tried when odd sides fail
SMALLEST = 8  # the smallest side the lab feeds a model (a tile's, a tiny image's): a model failing below it has a minimum


def _accepted_sizes(run) -> tuple[tuple[int, int], int, int]:
    """((height, width) to probe the contract on, the multiple the sides must be, the smallest side) of a model
    with a free input size, by probing: a square that runs; one pixel more (then each multiple, when that fails);
    then the smallest side, by bisection over the multiples.

    Raises:
        UserModelError: the model runs at no size tried (in the words of its failure on the probe size).
    """
    side = next((s for s in SQUARES if _runs(run, s, s)), None)
    if side is None:
        run(*PROBE_SIZE)  # its own words, whatever they are
        raise UserModelError(f"the model runs on a {PROBE_SIZE[1]}x{PROBE_SIZE[0]} probe image but on none of "
                             f"{', '.join(f'{s}x{s}' for s in SQUARES)}: which input sizes does it take?")
    multiple = 1 if _runs(run, side + 1, side + 1) else next(
        (m for m in MULTIPLES if _runs(run, side + m, side + m)), None)
    if multiple is None:
        raise UserModelError(f"the model runs on a {side}x{side} image but not on one pixel more, nor on sides a "
                             f"multiple of any of {', '.join(map(str, MULTIPLES))} above it: which input sizes does "
                             "it take?")
    low, high = -(-SMALLEST // multiple), side // multiple  # in multiples: `high` runs
    if _runs(run, low * multiple, low * multiple):
        min_size = 1
    else:
        while high - low > 1:
            middle = (low + high) // 2
            low, high = (low, middle) if _runs(run, middle * multiple, middle * multiple) else (middle, high)
        min_size = high * multiple
    fits = all(s % multiple == 0 and s >= min_size for s in PROBE_SIZE)
    return (PROBE_SIZE if fits else (side, side)), multiple, min_size


def _runs(run, height: int, width: int) -> bool:
    try:
        run(height, width)
        return True
    except ProbeTimedOut:
        raise
    except UserModelError:
        return False
