"""App latency, measured in one process and printed with where the time goes: the warm comparison behind the
Run button (five panels, metrics, coverage check, range chart) for a 256x256 input at x3, for each preset pair;
a recalibration (a fresh seed: the cache cannot answer it); the first, cold run; and the peak memory of a
4000x3000 upload.

    python scripts/app_latency.py            # run it alone: the machine's cores are the budget
"""
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ui import comparison, words  # noqa: E402
from sr.quant.calibdata import load_calibration_images  # noqa: E402
from sr.lab.compare import compare  # noqa: E402
from sr.lab.coverage import range_coverage  # noqa: E402

PAIRS = {"ReLU vs Clipped ReLU, same XLSR": ("xlsr-relu", "xlsr-clip"),
         "big ReLU teacher vs small Clipped-ReLU student": ("teacher", "xlsr-clip-kd")}


def _quiet(*_args, **_kwargs):
    return None


def warm(path: str, model_a: str, model_b: str, repeats: int = 5) -> None:
    comparison.run_compare(path, model_a, model_b, progress=_quiet)  # calibrations cached, engines loaded
    totals, stages = [], {}
    for _ in range(repeats):
        start = time.perf_counter()
        comparison.run_compare(path, model_a, model_b, progress=_quiet)
        totals.append(time.perf_counter() - start)
        result = compare(path, model_a, model_b)
        for stage, seconds in result.seconds.items():
            stages.setdefault(stage, []).append(seconds)
        start = time.perf_counter()
        words.coverage_note(result, [range_coverage(c, result.lr, max_side=comparison.COVERAGE_SIDE)
                                   for c in result.calibrations])
        stages.setdefault("coverage check", []).append(time.perf_counter() - start)
    parts = ", ".join(f"{stage} {np.median(values):.3f}" for stage, values in stages.items())
    print(f"  warm Run: {np.median(totals):.2f} s (median of {repeats}); library stages (s): {parts}")


def main() -> None:
    image = np.asarray(Image.fromarray(load_calibration_images(None)[0]).resize((256, 256)))
    path = str(Path(tempfile.mkdtemp()) / "input.png")
    Image.fromarray(image).save(path)
    start = time.perf_counter()
    comparison.run_compare(path, "xlsr-relu", "xlsr-clip", seed=int(time.time()) % 100_000 + 1, progress=_quiet)
    print(f"cold Run (fresh calibration seed, XLSR pair): {time.perf_counter() - start:.2f} s")
    for name, (model_a, model_b) in PAIRS.items():
        print(f"256x256 -> 768x768, '{name}'")
        warm(path, model_a, model_b)
    start = time.perf_counter()
    comparison.run_compare(path, "xlsr-relu", "xlsr-clip", seed=comparison.new_seed(), progress=_quiet)
    print(f"Recalibrate (new seed, XLSR pair, entropy, 100 samples): {time.perf_counter() - start:.2f} s")
    big = str(Path(tempfile.mkdtemp()) / "big.png")
    Image.fromarray(np.asarray(Image.fromarray(image).resize((4000, 3000), Image.Resampling.BICUBIC))).save(big)
    # in a fresh process, as a new server would meet it (calibrations cached, nothing else loaded)
    # VmHWM, not ru_maxrss: the latter survives exec, so a child would inherit this process's peak
    code = ("import sys, time; sys.path.insert(0, '.'); from ui.comparison import run_compare; "
            "hwm = lambda: int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1]) / 1024; "
            "before = hwm(); start = time.perf_counter(); "
            f"run_compare({big!r}, 'xlsr-relu', 'xlsr-clip', progress=lambda *a, **k: None); "
            "print(f'{time.perf_counter() - start:.1f} s, peak RSS {hwm():.0f} MB (after imports: {before:.0f} MB)')")
    done = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parent.parent,
                          capture_output=True, text=True, check=True)
    print(f"4000x3000 upload (downscaled to the 1024 px limit), fresh process: {done.stdout.strip().splitlines()[-1]}")


if __name__ == "__main__":
    main()
