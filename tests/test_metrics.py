import math

import numpy as np
import pytest
from skimage.color import deltaE_ciede2000, rgb2lab
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from sr.metrics import brightness_ratio, delta_e, psnr_y, rgb_to_y, ssim_y


@pytest.fixture
def pair():
    rng = np.random.default_rng(1)
    a = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-20, 21, a.shape), 0, 255).astype(np.uint8)
    return a, b


def test_psnr_matches_scikit_image_on_y(pair):
    a, b = pair
    ya, yb = rgb_to_y(a)[3:-3, 3:-3], rgb_to_y(b)[3:-3, 3:-3]
    assert psnr_y(a, b, shave=3) == pytest.approx(peak_signal_noise_ratio(yb, ya, data_range=255), abs=1e-9)
    assert rgb_to_y(np.array([[[255, 255, 255]]]))[0, 0] == pytest.approx(235.0)


def test_ssim_matches_scikit_image(pair):
    a, b = pair
    expected = structural_similarity(rgb_to_y(a), rgb_to_y(b), data_range=255, gaussian_weights=True, sigma=1.5,
                                     use_sample_covariance=False)
    assert ssim_y(a, b) == pytest.approx(expected)
    assert ssim_y(a, a) == pytest.approx(1.0)


def test_identical_images_give_inf(pair):
    assert math.isinf(psnr_y(pair[0], pair[0]))


def test_dullness_measures(pair):
    a, _ = pair
    darker = (a * 0.8).astype(np.uint8)
    assert brightness_ratio(darker, a) == pytest.approx(darker.mean() / a.mean())
    assert brightness_ratio(a, a) == 1.0
    assert delta_e(a, a) == 0.0
    assert delta_e(darker, a) == pytest.approx(np.mean(deltaE_ciede2000(rgb2lab(darker), rgb2lab(a))))


def test_shape_errors(pair):
    with pytest.raises(ValueError, match="differ in shape"):
        psnr_y(pair[0], pair[0][:10])
    with pytest.raises(ValueError, match="too small to shave"):
        psnr_y(pair[0][:4, :4], pair[0][:4, :4], shave=3)
