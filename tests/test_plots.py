"""sr.lab.plots: the difference images (what each colour means, the scale bar) and the range and histogram figures,
drawn from a real calibration."""
import numpy as np
import pytest

from sr.quant.calibrate import CalibrationConfig, Method
from sr.quant.searches import threshold
from sr.lab.plots import MAX_TENSORS, difference_image, histogram_figure, range_chart
from sr.run.quantize import calibrate_model


def _pair():
    reference = np.full((20, 30, 3), 100, np.uint8)
    output = reference.copy()
    output[5:10, 5:10, 0] += 10  # 10 levels more red in one square
    output[12:18, 20:26] -= 20  # darker in another
    return output, reference


def test_channel_differences_are_levels_times_the_gain():
    output, reference = _pair()
    picture = difference_image(output, reference, gain=8.0, kind="channels", bar_height=28)
    assert picture.shape == (48, 30, 3) and picture.dtype == np.uint8
    assert picture[7, 7, 0] == int(10 / (255 / 8) * 255) and picture[7, 7, 1] == 0  # 10 levels of 31.9
    assert picture[15, 22].tolist() == [160, 160, 160]  # 20 levels in every channel
    assert picture[0, 0].tolist() == [0, 0, 0]  # no difference: black
    assert difference_image(output, reference, kind="channels", bar_height=0).shape == (20, 30, 3)


def test_luma_is_a_heat_map_and_the_shift_is_signed():
    output, reference = _pair()
    heat = difference_image(output, reference, gain=8.0, kind="luma", bar_height=0).astype(int)
    assert heat[15, 22].sum() > heat[7, 7].sum() > heat[0, 0].sum()  # more difference, hotter
    shift = difference_image(output, reference, gain=8.0, kind="brightness-shift", bar_height=0).astype(int)
    darker, brighter, same = shift[15, 22], shift[7, 7], shift[0, 0]
    assert darker[2] > darker[0] and brighter[0] > brighter[2]  # blue where darker, red where brighter
    assert abs(same[0] - same[2]) < 10  # no difference: the middle of the scale


@pytest.mark.parametrize("kwargs, words", [({"gain": 0.0}, "gain must be in"), ({"gain": 5000.0}, "gain must be in")])
def test_bad_difference_settings_are_refused_in_words(kwargs, words):
    output, reference = _pair()
    with pytest.raises(ValueError, match=words):
        difference_image(output, reference, **kwargs)
    with pytest.raises(ValueError, match="differ in shape"):
        difference_image(output[:10], reference)


def test_range_chart_and_histogram_from_a_real_calibration():
    import matplotlib.pyplot as plt

    calibrated = calibrate_model("xlsr-clip", CalibrationConfig(method="entropy", samples=10), "tensorrt")
    figure = range_chart(calibrated, max_tensors=5)
    axis = figure.axes[0]
    assert len(axis.get_yticks()) == min(5, len(calibrated.ranges)) <= MAX_TENSORS
    assert "most clipped of" in axis.get_title()
    stats = calibrated.stats[0]
    chosen = calibrated.ranges[stats.name].high
    histogram = histogram_figure(stats, chosen, (Method.ENTROPY,))
    lines = [line.get_xdata()[0] for line in histogram.axes[0].get_lines()]
    assert lines == pytest.approx([chosen, threshold(stats, Method.ENTROPY), stats.amax])
    plt.close("all")
