"""The page ``serve`` shows at ``/``, driven in a real headless Chromium through Playwright: an image chosen,
the top classes and the Grad-CAM overlay rendered; an exported model's page says why it has no overlay.

Debian's ``chromium`` package is the browser (Playwright's own download needs the internet); without it the
tests are skipped, except under CI (``CI`` set), where a missing browser fails them.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from conftest import SERVE_CLASSES as CLASSES
from conftest import Server

from transferkit.serving import Predictor

pytestmark = pytest.mark.browser

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        if os.environ.get("CI"):
            pytest.fail("CI must run the browser tests: install Debian's chromium (apt-get install chromium)")
        pytest.skip("no chromium on this machine (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        yield browser
        browser.close()


def _screenshot_dir(tmp_path: Path) -> Path:
    # TRANSFERKIT_SCREENSHOTS=DIR keeps the screenshots where a person can look at them
    out = Path(os.environ.get("TRANSFERKIT_SCREENSHOTS") or tmp_path)
    out.mkdir(parents=True, exist_ok=True)
    return out


def test_an_image_chosen_on_the_page_shows_its_top_classes_and_a_gradcam_overlay(
    serve_models, browser, tmp_path
):
    image = next(serve_models["images"].glob("*.png"))
    with Server(Predictor.load(serve_models["ckpt"])) as server:
        page = browser.new_page(viewport={"width": 1100, "height": 760})
        page.goto(server.url + "/")
        page.wait_for_function("document.getElementById('model-line').textContent.includes('checkpoint')")
        page.set_input_files("#file", str(image))
        page.wait_for_selector("#result", state="visible", timeout=60_000)
        page.wait_for_function("document.getElementById('cam').naturalWidth > 0", timeout=60_000)
        rows = page.locator("#scores tr")
        names = [rows.nth(i).locator(".name").inner_text() for i in range(rows.count())]
        verdict = page.inner_text("#verdict")
        status = page.inner_text("#status")
        caption = page.inner_text("#cam-caption")
        page.screenshot(path=str(_screenshot_dir(tmp_path) / "serve-page-checkpoint.png"), full_page=True)
        page.close()
    assert sorted(names) == sorted(CLASSES)  # every class of the 4, ranked
    assert verdict.split("\n")[0] in ("functional", "defective") and "class " in verdict
    assert status == image.name and "Grad-CAM" in caption


def test_the_page_of_an_exported_model_says_it_cannot_give_a_gradcam_overlay(serve_models, browser, tmp_path):
    image = next(serve_models["images"].glob("*.jpg"))
    with Server(Predictor.load(serve_models["int8"])) as server:
        page = browser.new_page(viewport={"width": 1100, "height": 760})
        page.goto(server.url + "/")
        page.wait_for_function("document.getElementById('model-line').textContent.includes('onnx int8')")
        page.set_input_files("#file", str(image))
        page.wait_for_selector("#result", state="visible", timeout=60_000)
        note = page.inner_text("#note")
        cam_hidden = page.locator("#cam-figure").is_hidden()
        page.screenshot(path=str(_screenshot_dir(tmp_path) / "serve-page-int8.png"), full_page=True)
        # a file that is not an image: the page shows the server's reason
        bad = tmp_path / "notes.png"
        bad.write_bytes(b"not a picture at all")
        page.set_input_files("#file", str(bad))
        page.wait_for_function("document.getElementById('status').className === 'error'", timeout=30_000)
        refusal = page.inner_text("#status")
        page.close()
    assert "No Grad-CAM overlay" in note and "serve the checkpoint" in note and cam_hidden
    assert refusal.startswith("refused (400)") and "not an image" in refusal
