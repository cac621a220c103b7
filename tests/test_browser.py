"""End-to-end tests in Debian's Chromium: the default example, the teacher preset, the difference view,
click-to-zoom, a recalibration with a fresh sample; an uploaded ONNX model, its bundle, and the INT8-ready
search on it. They wait on the page's
own "done" line (#run-status, with the time it finished), never on fixed delays, so a loaded machine only makes
them slower.

With SR_WRITE_SCREENSHOTS=1 the first test also writes the README's screenshot, docs/first-screen.png."""
import io
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "artifacts"
DONE = re.compile(r"^Done at [0-9:]{8} in [0-9.]+ s \(calibration sample \d+ of these settings, seed \d+\)\.$")
SLOW = 300_000  # ms: a first calibration of the teacher on a loaded 2-core machine


def _wait_done(page, previous: str | None = None) -> str:
    """Wait for the page's "done" line (a new one when `previous` is given) and return it."""
    from playwright.sync_api import expect

    status = page.locator("#run-status p")  # the line itself, not the progress overlay drawn over it
    expect(status).to_have_text(DONE, timeout=SLOW)
    if previous is not None:
        expect(status).not_to_have_text(previous.strip(), timeout=SLOW)
        expect(status).to_have_text(DONE, timeout=SLOW)
    return status.inner_text().strip()


def _titles_fit(page) -> None:
    """Every panel's title is shown whole, beside its buttons (not cut off, not under them)."""
    for index in range(5):
        label = page.locator(f"#panel-{index} [data-testid='block-label']")
        right, buttons, scroll, client = label.evaluate(
            "e => [e.getBoundingClientRect().right, e.parentElement.querySelector('.icon-button-wrapper')"
            ".getBoundingClientRect().left, e.scrollWidth, e.clientWidth]")
        assert right <= buttons + 1 and scroll <= client, (index, label.inner_text(), right, buttons)


_BROKEN_WORDS = """th => { const broken = [], walker = document.createTreeWalker(th, NodeFilter.SHOW_TEXT);
  while (walker.nextNode()) { const node = walker.currentNode, words = /\\S+/g; let m;
    while ((m = words.exec(node.data))) { const range = document.createRange();
      range.setStart(node, m.index); range.setEnd(node, m.index + m[0].length);
      if (new Set([...range.getClientRects()].map(r => Math.round(r.top))).size > 1) broken.push(m[0]); } }
  return broken; }"""


def _headers_whole(page, table: str) -> None:
    """No header word of the table is broken across two lines (a word whose text boxes sit on two lines)."""
    headers = page.locator(f"{table} th")
    assert headers.count() > 0, table
    broken = [(headers.nth(i).inner_text(), headers.nth(i).evaluate(_BROKEN_WORDS)) for i in range(headers.count())]
    assert not [b for b in broken if b[1]], broken


def _open(playwright):
    """Debian's Chromium, headless, with no background network traffic (this machine has no internet)."""
    browser = playwright.chromium.launch(executable_path=CHROMIUM, args=[
        "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"])
    return browser, browser.new_page(viewport={"width": 1500, "height": 1400})


def _pixels(locator) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(locator.screenshot())).convert("RGB")).astype(np.float64)


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="Debian's chromium is not installed (.ci/run installs it)")
def test_example_difference_zoom_and_recalibrate(server):
    from playwright.sync_api import expect, sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as playwright:
        browser, page = _open(playwright)
        page.goto(server)
        expect(page.locator("#input-image img")).to_be_visible(timeout=60_000)  # an example is loaded already
        page.set_viewport_size({"width": 1400, "height": 900})  # a laptop's first screen: Run is on it
        run = page.locator("#run").bounding_box()
        assert run is not None and run["y"] + run["height"] <= 900, run
        page.set_viewport_size({"width": 1500, "height": 1400})
        page.locator("#run").click()  # the first screen: the default preset, run
        _wait_done(page)
        _titles_fit(page)
        shot = ARTIFACTS / "first-screen.png"
        bottom = page.locator("#metrics-help").bounding_box()
        page.screenshot(path=str(shot), full_page=True,
                        clip={"x": 0, "y": 0, "width": 1500, "height": bottom["y"] + bottom["height"] + 8})
        if os.environ.get("SR_WRITE_SCREENSHOTS") == "1":
            shutil.copyfile(shot, ROOT / "docs" / "first-screen.png")
        page.set_viewport_size({"width": 800, "height": 1400})  # a narrow page: headers break between words only
        _headers_whole(page, "#metrics")
        page.get_by_role("tab", name="Why is it dull?").click()
        _headers_whole(page, "#ranking")
        page.get_by_role("tab", name="Compare").click()
        page.set_viewport_size({"width": 1500, "height": 1400})
        page.get_by_label("dark calibration set (40% brightness)").check()  # a preset: its settings and its note
        expect(page.get_by_text("Why this comes out dull and dark")).to_be_visible(timeout=30_000)
        expect(page.get_by_role("spinbutton", name="number input for Calibration brightness gain (experiment)")
               ).to_have_value("0.4", timeout=30_000)
        previous = page.locator("#run-status p").inner_text()
        page.locator("#run").click()
        done = _wait_done(page, previous)
        for index in range(5):
            expect(page.locator(f"#panel-{index} img")).to_be_visible()
        metrics = page.locator("#metrics")
        expect(metrics).to_contain_text("INT8 xlsr-relu")
        # the look said in words beside the panels (not a toast over the controls): white came out grey
        expect(page.locator("#coverage")).to_contain_text("highlights are capped")
        expect(page.locator(".toast-body")).to_have_count(0)
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
        again = _wait_done(page, done)
        expect(metrics).not_to_have_text(first, timeout=30_000)  # (the table may render a moment after the line)
        assert "INT8" in metrics.inner_text(), f"no INT8 rows after the new sample ({done} -> {again})"
        expect(page.locator("#coverage")).to_contain_text("Across 2 calibration samples")
        page.screenshot(path=str(ARTIFACTS / "app.png"), full_page=True)
        page.locator("#difference").screenshot(path=str(ARTIFACTS / "difference.png"))
        expect(page.locator("#zoom img")).to_have_count(1)
        browser.close()


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="Debian's chromium is not installed (.ci/run installs it)")
def test_drop_an_onnx_model_and_download_its_bundle(server, tmp_path, stand_ins, families):
    import zipfile

    from playwright.sync_api import expect, sync_playwright

    onnx_file, rlfn = stand_ins["xlsr-nhwc"], families["rlfn"].source  # (the session's files, built once)
    with sync_playwright() as playwright:
        browser, page = _open(playwright)
        page.goto(server)
        page.get_by_text("Your own ONNX model").click()
        page.locator("#onnx-examples").get_by_text("fsrcnn-y.onnx").click()  # a one-click example model
        expect(page.locator("#contract")).to_contain_text("Y (BT.601 luma", timeout=120_000)
        page.locator("#onnx-upload").get_by_label("Clear").click()  # then the user's own file
        page.locator("#onnx-upload input[type=file]").set_input_files(str(onnx_file))
        expect(page.locator("#contract")).to_contain_text("layout NHWC", timeout=120_000)
        expect(page.locator("#model-a input")).to_have_value("xlsr-nhwc.onnx", timeout=30_000)  # its name, not a hash
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
        _wait_done(page)
        expect(page.locator("#metrics")).to_contain_text("xlsr-nhwc.onnx")
        # a model family people ship (RLFN with its ESA attention, x4), made INT8-ready in the page
        page.locator("#onnx-upload").get_by_label("Clear").click()
        page.locator("#onnx-upload input[type=file]").set_input_files(str(rlfn))
        expect(page.locator("#contract")).to_contain_text("rlfn.onnx", timeout=120_000)
        previous = page.locator("#run-status p").inner_text()
        page.locator("#ready-button").click()  # the search int8-ready runs, on the user's model, in the page
        expect(page.locator("#ready-report")).to_contain_text("Chosen:", timeout=SLOW)
        expect(page.locator("#ready-report")).to_contain_text("range methods")
        expect(page.locator("#bundle")).to_contain_text("int8-ready", timeout=60_000)  # the chosen model's zip
        # then the comparison shows what was chosen: model A and the method the bundle was calibrated with
        chosen = re.search(r"Chosen: range methods: ([\w-]+),", page.locator("#ready-report").inner_text())
        _wait_done(page, previous)
        expect(page.locator("#ready-report")).to_contain_text("the comparison above now shows")
        expect(page.locator("#metrics")).to_contain_text("rlfn.onnx")
        if chosen:  # (a range method chosen: the page's method is now that method)
            expect(page.get_by_label("Calibration method")).to_have_value(chosen.group(1))
        browser.close()



@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="Debian's chromium is not installed (.ci/run installs it)")
def test_the_int8_panels_as_qualcomms_npu_computes_them(server):
    """The npu scheme, its INT8 panels run on Qualcomm's Hexagon NPU arithmetic (onnxruntime-qnn's x86 HTP):
    the panels say so, the table names the engine, and the NPU's INT8 differs from FP32 as INT8 does."""
    from playwright.sync_api import expect, sync_playwright

    pytest.importorskip("onnxruntime_qnn")
    with sync_playwright() as playwright:
        browser, page = _open(playwright)
        page.goto(server)
        expect(page.locator("#input-image img")).to_be_visible(timeout=60_000)
        page.get_by_label("npu", exact=True).check()
        page.get_by_label("Qualcomm HTP v73 (simulated)").check()
        page.locator("#run").click()
        _wait_done(page)
        metrics = page.locator("#metrics")
        expect(metrics).to_contain_text("qnn-htp-npu-v73", timeout=30_000)
        expect(page.locator("#panel-2 [data-testid='block-label']")).to_contain_text("on Qualcomm HTP v73")
        rows = [line for line in metrics.inner_text().splitlines() if "qnn-htp" in line]
        assert len(rows) == 2, metrics.inner_text()
        expect(page.locator("#panel-2 img")).to_be_visible()
        browser.close()
