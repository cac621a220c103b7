"""App targets, measured in one run: warm comparison for a 256x256 input at x3 for each preset pair, and an
entropy recalibration with 100 samples (a fresh seed, so the cache cannot answer).

    python scripts/app_latency.py
"""
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sr.calibrate import CalibrationConfig, load_calibration_images  # noqa: E402
from sr.compare import compare  # noqa: E402
from sr.quantize import calibrate_model  # noqa: E402

PAIRS = {"ReLU vs Clipped ReLU, same XLSR": ("xlsr-relu", "xlsr-clip"),
         "big ReLU teacher vs small Clipped-ReLU student": ("teacher", "xlsr-clip-kd")}


def main():
    image = np.asarray(Image.fromarray(load_calibration_images(None)[0]).resize((256, 256)))
    for name, (model_a, model_b) in PAIRS.items():
        compare(image, model_a, model_b)  # warm: calibrations cached, engines loaded
        times = []
        for _ in range(3):
            start = time.perf_counter()
            compare(image, model_a, model_b)
            times.append(time.perf_counter() - start)
        print(f"warm comparison, 256x256 -> 768x768, '{name}': {np.median(times):.2f} s")
    seed = int(np.random.default_rng().integers(1, 1 << 30))
    start = time.perf_counter()
    calibrate_model("xlsr-clip", CalibrationConfig(method="entropy", samples=100, seed=seed), "tensorrt")
    print(f"entropy recalibration, 100 samples, xlsr-clip: {time.perf_counter() - start:.2f} s")


if __name__ == "__main__":
    main()
