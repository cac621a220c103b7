"""sr.lab.compare: input sizing for the comparison (too small, too large, 16-bit grey, the modes in words); what a
dark calibration does to the highlights, in words."""
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def test_tiny_huge_and_odd_images(tmp_path):

    from sr.lab.compare import prepare_input

    with pytest.raises(ValueError, match="too small"):
        prepare_input(np.zeros((3, 3, 3), np.uint8), "upscale", 3)
    big = prepare_input(np.zeros((1500, 2100, 3), np.uint8), "upscale", 3)
    assert max(big.lr.shape) == 1024 and "downscaled" in big.notices[0]
    gray16 = tmp_path / "g16.png"
    Image.fromarray(np.full((40, 40), 40000, np.uint16)).save(gray16)
    assert prepare_input(str(gray16), "upscale", 3).lr.shape == (40, 40, 3)
    with pytest.raises(ValueError, match="unknown input mode 'Upscale'; choose one of: upscale, ground-truth"):
        prepare_input(str(gray16), "Upscale", 3)
    rgba = prepare_input(np.zeros((20, 20, 4), np.uint8), "upscale", 3)
    assert rgba.lr.shape == (20, 20, 3) and rgba.lr.min() == 255  # transparent -> white


def test_a_dark_calibration_says_the_highlights_are_capped_and_a_matched_one_does_not():
    """The dark preset's look in words: white comes out grey (the brightest 1% far below FP32's), said with the
    levels measured on the image shown; a calibration that matches the image says nothing of the kind."""
    from sr.quant.calibrate import CalibrationConfig
    from sr.lab.compare import compare, highlight_level

    image = str(Path(__file__).resolve().parent.parent / "calib_data" / "skimage-astronaut-0.png")
    dark = compare(image, "xlsr-relu", "xlsr-clip", CalibrationConfig(method="minmax", samples=100, gain=0.4))
    capped = [n for n in dark.notices if "highlights are capped" in n]
    assert len(capped) == 2, dark.notices
    top_fp32, top_int8 = highlight_level(dark.fp32_a), highlight_level(dark.int8_a)
    assert top_fp32 - top_int8 > 100 and f"level {top_int8:.0f} of 255 in INT8 against {top_fp32:.0f}" in capped[0]
    matched = compare(image, "xlsr-relu", "xlsr-clip", CalibrationConfig(method="minmax", samples=100))
    assert not [n for n in matched.notices if "highlights" in n], matched.notices
