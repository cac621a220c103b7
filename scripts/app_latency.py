"""App targets, measured in one run: warm 4-panel result for a 256x256 input at x3, and an entropy
recalibration with 100 samples (a fresh seed, so the cache cannot answer).

    python scripts/app_latency.py
"""
import time

import numpy as np

from sr.calibrate import CalibrationConfig
from sr.compare import PRESETS, compare
from sr.quantize import calibrate_model


def main():
    rng = np.random.default_rng(0)
    from sr.calibrate import load_calibration_images
    from PIL import Image

    image = np.asarray(Image.fromarray(load_calibration_images(None)[0]).resize((256, 256)))
    for preset, (model_a, model_b) in PRESETS.items():
        compare(image, model_a, model_b)  # warm: calibrations cached, engines loaded
        times = []
        for _ in range(3):
            start = time.perf_counter()
            compare(image, model_a, model_b)
            times.append(time.perf_counter() - start)
        print(f"warm 4-panel, 256x256 -> 768x768, preset '{preset}': {np.median(times):.2f} s")
    seed = int(rng.integers(1, 1 << 30))
    start = time.perf_counter()
    calibrate_model("xlsr-clip", CalibrationConfig(method="entropy", samples=100, seed=seed), "tensorrt")
    print(f"entropy recalibration, 100 samples, xlsr-clip: {time.perf_counter() - start:.2f} s")


if __name__ == "__main__":
    main()
