"""sr.compare: input sizing for the comparison (too small, too large, 16-bit grey, the modes in words)."""
import numpy as np
import pytest
from PIL import Image


def test_tiny_huge_and_odd_images(tmp_path):

    from sr.compare import prepare_input

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
