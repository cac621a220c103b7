import math

import numpy as np
import pytest
from skimage.color import deltaE_ciede2000, rgb2lab
from skimage.metrics import peak_signal_noise_ratio

from sr.data import bicubic_resize, degrade, list_images, load_image
from sr.metrics import brightness_ratio, delta_e, edge_mask, edge_psnr_y, psnr_y, rgb_to_y, ssim_y


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


def _gray(level: int) -> np.ndarray:
    return np.full((32, 32, 3), level, np.uint8)


def test_psnr_of_a_constant_offset_by_hand():
    # gray RGB g has Y = 16 + (65.481 + 128.553 + 24.966) g / 255 = 16 + 219 g / 255, so a gray step of 3
    # is a Y step of 219 * 3 / 255 everywhere and PSNR = 20 log10(255 / step)
    step_y = 219.0 * 3 / 255.0
    assert psnr_y(_gray(103), _gray(100), shave=3) == pytest.approx(20 * math.log10(255.0 / step_y), abs=1e-9)


def test_ssim_of_two_constant_images_by_hand():
    """Wang et al. 2004, eq. 13: SSIM = (2 mx my + C1)(2 sxy + C2) / ((mx^2 + my^2 + C1)(sx^2 + sy^2 + C2)) with
    C1 = (0.01 L)^2, C2 = (0.03 L)^2, L = 255. For two constant images every local mean is the constant and
    every local (co)variance is 0 whatever the window, so SSIM = (2 mx my + C1) / (mx^2 + my^2 + C1)."""
    c1 = (0.01 * 255) ** 2
    mx, my = 16 + 219 * 100 / 255, 16 + 219 * 150 / 255  # Y of gray 100 and gray 150
    expected = (2 * mx * my + c1) / (mx**2 + my**2 + c1)
    assert expected < 0.95  # far enough from 1 that a wrong C1, range or Y conversion shows
    assert ssim_y(_gray(100), _gray(150)) == pytest.approx(expected, abs=1e-9)
    assert ssim_y(_gray(100), _gray(150), shave=3) == pytest.approx(expected, abs=1e-9)


def test_ssim_of_identical_images_is_one(pair):
    assert ssim_y(pair[0], pair[0]) == pytest.approx(1.0)


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


# Bicubic x3, Y-PSNR with 3 px shaved, as published (e.g. Kim et al., VDSR, CVPR 2016, Table 3; Lim et al., EDSR,
# CVPRW 2017): Set5 30.39 dB, Set14 27.55 dB. Those numbers come from MATLAB (imresize, and rgb2ycbcr on uint8
# images, which returns Y rounded to uint8). Measured here: Set5 30.403, Set14 27.631 dB. The residual:
# - float Y instead of MATLAB's uint8-rounded Y: rounding Y moves us to 30.385 / 27.625 dB (-0.02 / -0.01 dB);
# - Set14's bridge.png is grayscale: the usual MATLAB evaluation scripts (e.g. LapSRN's compute_difference.m)
#   call rgb2ycbcr only on three-channel images, so they score its gray levels directly, while we expand it
#   to RGB and score Y = 16 + 219 g / 255, whose range is 219/255 as wide: that adds 20 log10(255 / 219) =
#   1.32 dB to that image and 0.094 dB to the Set14 mean;
# - PIL's bicubic (8-bit fixed-point weights, its own border handling) vs MATLAB's imresize: the rest, about
#   0.01 (Set5) and 0.02 dB (Set14).
PUBLISHED_BICUBIC_X3 = [("Set5", 30.39), ("Set14", 27.55)]


@pytest.mark.parametrize("name, published_db", PUBLISHED_BICUBIC_X3)
def test_bicubic_x3_matches_the_literature(data_dir, name, published_db):
    scores = []
    for path in list_images(data_dir / name):
        hr, lr = degrade(load_image(path), 3)  # as sr/lab/evaluate.py does
        scores.append(psnr_y(bicubic_resize(lr, hr.shape[1], hr.shape[0]), hr, shave=3))
    assert float(np.mean(scores)) == pytest.approx(published_db, abs=0.1)


def test_ssim_in_strips_equals_one_call(monkeypatch):
    """Large images run SSIM strip by strip (bounded memory); the mean must be the whole-image one."""
    import sr.metrics as metrics
    from skimage.metrics import structural_similarity

    rng = np.random.default_rng(4)
    a = rng.integers(0, 256, (157, 83, 3), dtype=np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-25, 26, a.shape), 0, 255).astype(np.uint8)
    ya, yb = rgb_to_y(a)[3:-3, 3:-3], rgb_to_y(b)[3:-3, 3:-3]
    whole = structural_similarity(ya, yb, data_range=255.0, gaussian_weights=True, sigma=1.5,
                                  use_sample_covariance=False)
    monkeypatch.setattr(metrics, "SSIM_STRIP_PIXELS", 77 * 25)  # strips of 25 rows
    assert ssim_y(a, b, shave=3) == pytest.approx(whole, abs=1e-12)


def test_edge_psnr_on_a_step_edge():
    """A vertical step between columns 31 and 32: Sobel responds on those two columns only (3% of the pixels,
    so the 90th percentile is 0 and the mask is exactly them), dilated by 2 px to columns 29..34. An error of 10
    grey levels on columns 28..35 (Y differs by 10 * 219 / 255) covers the whole edge region; an error on
    column 5 is outside it and changes only the plain PSNR."""
    reference = np.full((40, 64, 3), 50, np.uint8)
    reference[:, 32:] = 200
    output = reference.copy()
    output[:, 28:36] += 10
    mask = edge_mask(rgb_to_y(reference))
    assert mask.all(axis=0).tolist() == [29 <= column <= 34 for column in range(64)]
    expected = 20 * math.log10(255 / (10 * 219 / 255))
    assert edge_psnr_y(output, reference) == pytest.approx(expected, abs=1e-9)
    output[:, 5] += 30
    assert edge_psnr_y(output, reference) == pytest.approx(expected, abs=1e-9)
    assert psnr_y(output, reference) > expected  # the flat pixels dilute the plain PSNR
    assert edge_psnr_y(reference, reference) == math.inf
    assert math.isnan(edge_psnr_y(_gray(9), _gray(9)))  # no gradient, no edge region
    assert edge_psnr_y(output, reference, shave=3) == pytest.approx(expected, abs=1e-9)
