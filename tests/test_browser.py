"""One end-to-end test in Debian's Chromium: the default example, the teacher preset, the difference view,
click-to-zoom, and a recalibration with a fresh sample."""
import io
import os
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from test_app import server  # noqa: F401  (the launched app)

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"


def _open(playwright):
    """Debian's Chromium, headless, with no background network traffic (this machine has no internet)."""
    browser = playwright.chromium.launch(executable_path=CHROMIUM, args=[
        "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"])
    return browser, browser.new_page(viewport={"width": 1500, "height": 1400})


def _pixels(locator) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(locator.screenshot())).convert("RGB")).astype(np.float64)


@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="Debian's chromium is not installed (.ci/run installs it)")
def test_example_difference_zoom_and_recalibrate(server):  # noqa: F811
    from playwright.sync_api import expect, sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as playwright:
        browser, page = _open(playwright)
        page.goto(server)
        expect(page.locator("#input-image img")).to_be_visible(timeout=60_000)  # an example is loaded already
        page.screenshot(path=str(ARTIFACTS / "first-screen.png"))
        page.get_by_label("big ReLU teacher vs small Clipped-ReLU student").check()
        expect(page.locator("#model-a input")).to_have_value("teacher", timeout=30_000)
        page.locator("#run").click()
        for index in range(5):
            expect(page.locator(f"#panel-{index} img")).to_be_visible(timeout=240_000)
        metrics = page.locator("#metrics")
        busy = page.locator(".progress-text, .eta-bar, .progress-bar")
        expect(metrics).to_contain_text("INT8 teacher", timeout=60_000)
        expect(busy).to_have_count(0, timeout=120_000)
        difference = page.locator("#difference img")
        expect(difference).to_have_count(1, timeout=60_000)
        difference.scroll_into_view_if_needed()
        expect(difference).to_be_visible(timeout=60_000)
        amplified = _pixels(difference)
        assert amplified[: int(amplified.shape[0] * 0.8)].std() > 2.0, "the amplified INT8 - FP32 difference is blank"
        centre_x = page.get_by_role("spinbutton", name="number input for Zoom centre x")
        before = centre_x.input_value()
        page.locator("#panel-2 img").scroll_into_view_if_needed()
        page.locator("#panel-2 img").click(position={"x": 10, "y": 10})
        expect(centre_x).not_to_have_value(before, timeout=30_000)
        assert float(centre_x.input_value()) < 0.2
        first = metrics.inner_text()
        page.locator("#recalibrate").click()  # a fresh calibration sample (new seed): the INT8 numbers move
        expect(busy.first).to_be_visible(timeout=30_000)
        expect(busy).to_have_count(0, timeout=240_000)
        deadline = time.time() + 120
        text = first
        while time.time() < deadline:
            text = metrics.inner_text()
            if "INT8" in text and text != first and not any(w in text for w in ("processing", "calibration pass")):
                break
            time.sleep(0.5)
        assert "INT8" in text and text != first, "recalibrating with a new sample did not change the metrics"
        expect(page.locator("#coverage")).to_contain_text("Across 2 calibration samples", timeout=30_000)
        page.wait_for_timeout(1500)  # let the slider, difference and zoom events that follow the run finish
        page.screenshot(path=str(ARTIFACTS / "app.png"), full_page=True)
        page.locator("#difference").screenshot(path=str(ARTIFACTS / "difference.png"))
        expect(page.locator("#zoom img")).to_have_count(1)
        browser.close()


@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="Debian's chromium is not installed (.ci/run installs it)")
def test_drop_an_onnx_model_and_download_its_bundle(server, tmp_path):  # noqa: F811
    import zipfile

    from playwright.sync_api import expect, sync_playwright

    import standins

    onnx_file = standins.build_all(tmp_path / "models")["xlsr-nhwc"]
    with sync_playwright() as playwright:
        browser, page = _open(playwright)
        page.goto(server)
        page.get_by_text("Your own ONNX model").click()
        page.locator("#onnx-upload input[type=file]").set_input_files(str(onnx_file))
        expect(page.locator("#contract")).to_contain_text("layout NHWC", timeout=120_000)
        expect(page.locator("#model-a input")).to_have_value(re.compile("^onnx:"), timeout=30_000)
        page.locator("#bundle-button").click()
        link = page.locator("#bundle a").first
        expect(link).to_be_visible(timeout=240_000)
        with page.expect_download(timeout=60_000) as download:
            link.click()
        saved = tmp_path / "bundle.zip"
        download.value.save_as(saved)
        names = set(zipfile.ZipFile(saved).namelist())
        assert {"model.qdq.onnx", "model.npu-int8.onnx", "model.cpu-int8.onnx", "README.md"} <= names
        assert "calibration.cache" not in names  # TensorRT 10 only, asked for by version (the CLI's --trt-version)
        page.locator("#run").click()
        expect(page.locator("#metrics")).to_contain_text("xlsr-nhwc.onnx", timeout=240_000)
        browser.close()
