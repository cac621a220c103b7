"""One end-to-end test in Debian's Chromium: upload through the page's file input, run, recalibrate."""
import os
import shutil
import time
from pathlib import Path

import pytest
from PIL import Image

from test_app import server  # noqa: F401  (the launched app)

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"


@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="Debian's chromium is not installed (.ci/run installs it)")
def test_upload_run_and_recalibrate(server, tmp_path, photo):  # noqa: F811
    from playwright.sync_api import expect, sync_playwright

    upload = tmp_path / "upload.png"
    Image.fromarray(photo).save(upload)
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        page = browser.new_page(viewport={"width": 1500, "height": 1400})
        page.goto(server)
        page.locator("#input-image input[type=file]").set_input_files(str(upload))
        page.get_by_label("ReLU vs Clipped ReLU, same XLSR").check()
        page.locator("#run").click()
        for index in range(5):
            expect(page.locator(f"#panel-{index} img")).to_be_visible(timeout=120_000)
        metrics = page.locator("#metrics")
        busy = page.locator(".progress-text, .eta-bar, .progress-bar")
        expect(metrics).to_contain_text("INT8", timeout=60_000)
        expect(busy).to_have_count(0, timeout=120_000)
        first = metrics.inner_text()
        expect(page.locator("#coverage")).to_contain_text("calibration", timeout=30_000)
        page.locator("#recalibrate").click()  # a fresh calibration sample (new seed): the INT8 numbers move
        expect(busy.first).to_be_visible(timeout=30_000)
        expect(busy).to_have_count(0, timeout=120_000)
        deadline = time.time() + 120
        while time.time() < deadline:  # the table passes through a "processing" state before the new numbers
            text = metrics.inner_text()
            busy = any(word in text for word in ("processing", "calibration pass", "%"))
            if "INT8" in text and text != first and not busy:
                break
            time.sleep(0.5)
        assert "INT8" in text and text != first, "recalibrating with a new sample did not change the metrics"
        page.wait_for_timeout(1500)  # let the slider and zoom events that follow the run finish
        page.screenshot(path=str(ARTIFACTS / "app.png"), full_page=True)
        browser.close()
