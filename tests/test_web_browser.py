"""The page of ``gapcam serve`` in a real browser: Playwright driving Debian's Chromium.

Needs ``/usr/bin/chromium`` (``apt-get install chromium``). Without it the test fails when the
``CI`` environment variable is set and is skipped otherwise. Screenshots stay in the test's
pytest tmp dir (pytest keeps the last three runs); their paths are printed (``pytest -s``, or the
captured output of a failed test).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from gapcam.localizer import Localizer
from gapcam.web.app import create_app
from gapcam.web.serve import running

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--headless",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
CAT_CLASSES = range(281, 286)  # ImageNet: tabby, tiger cat, Persian, Siamese, Egyptian cat
WAIT_MS = 30_000

pytestmark = pytest.mark.slow  # a real server and a real browser

# A digest of the canvas pixels, to see that the picture changed.
CANVAS_DIGEST = """() => {
  const c = document.getElementById("canvas");
  const d = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
  let h = 2166136261;
  for (let i = 0; i < d.length; i += 7) h = Math.imul(h ^ d[i], 16777619) >>> 0;
  return `${c.width}x${c.height}:${h}`;
}"""


def _unavailable(reason: str) -> None:
    message = f"browser test: {reason}"
    if os.environ.get("CI"):
        pytest.fail(f"{message} (CI must install it: apt-get install -y chromium)")
    pytest.skip(message)


@contextmanager
def chromium(extra_args: Sequence[str] = ()) -> Iterator[Any]:
    """Debian's Chromium through Playwright, with ``CHROMIUM_ARGS`` and ``extra_args``."""
    if not CHROMIUM.exists():
        _unavailable(f"{CHROMIUM} not found")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("the playwright package is not installed (pip install 'gapcam[test]')")
    with sync_playwright() as playwright:
        args = [*CHROMIUM_ARGS, *extra_args]
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=args)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with chromium() as launched:
        yield launched


@pytest.fixture(scope="module")
def base_url(localizer: Localizer) -> Iterator[str]:
    with running(create_app(localizer)) as url:
        yield url


@pytest.fixture
def page(browser: Any, base_url: str) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1280, "height": 820}, accept_downloads=True)
    page = context.new_page()
    page.set_default_timeout(WAIT_MS)
    problems: list[str] = []

    def console(message: Any) -> None:
        # the browser logs every 4xx answer; the expected 422s of the error test are fine
        if message.type == "error" and "status of 422" not in message.text:
            problems.append(message.text)

    page.on("console", console)
    page.on("pageerror", lambda e: problems.append(str(e)))
    page.goto(base_url)
    page.wait_for_selector("body[data-ready=true]")
    yield page
    context.close()
    assert problems == [], f"the page logged errors (CSP violations show up here): {problems}"


def screenshot(page: Any, tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    page.screenshot(path=str(path), full_page=True)
    print(f"screenshot: {path}")
    return path


def box(page: Any) -> list[int]:
    text = page.get_attribute("#box", "data-box")
    return [int(v) for v in text.split(",")] if text else []


@pytest.mark.timeout(120)
def test_upload_switch_class_move_threshold_download(page: Any, tmp_path: Path) -> None:
    page.set_input_files("#file-input", str(ROOT / "examples" / "cat.png"))
    page.wait_for_selector("#canvas[data-state=ready]")
    buttons = page.locator("#classes button")
    assert buttons.count() == 5
    top = int(buttons.nth(0).get_attribute("data-index"))
    assert top in CAT_CLASSES, buttons.nth(0).inner_text()
    assert buttons.nth(0).get_attribute("aria-pressed") == "true"
    assert page.text_content("#file-name") == "cat.png"

    # the page's box (from the 8-bit map) agrees with the API's box at the same threshold
    server_box = page.evaluate("() => state.result.maps[0].boxes[0].xyxy")
    first_box = box(page)
    assert all(abs(a - b) <= 2 for a, b in zip(first_box, server_box, strict=True))

    # another class: the picture changes without a new request
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    before = page.evaluate(CANVAS_DIGEST)
    second = buttons.nth(1).get_attribute("data-index")
    buttons.nth(1).click()
    page.wait_for_selector(f"#canvas[data-class='{second}']")
    assert page.evaluate(CANVAS_DIGEST) != before
    assert buttons.nth(1).get_attribute("aria-pressed") == "true"

    # back to the top class; move the threshold slider with the keyboard: the box shrinks
    buttons.nth(0).click()
    page.wait_for_selector(f"#canvas[data-class='{top}']")
    before = page.evaluate(CANVAS_DIGEST)
    page.focus("#threshold")
    for _ in range(40):
        page.keyboard.press("ArrowRight")
    assert page.text_content("#threshold-value") == "0.60"
    moved = box(page)
    assert moved
    assert moved != first_box
    assert (moved[2] - moved[0]) * (moved[3] - moved[1]) < (first_box[2] - first_box[0]) * (
        first_box[3] - first_box[1]
    )
    assert page.evaluate(CANVAS_DIGEST) != before

    # opacity and colormap redraw too
    before = page.evaluate(CANVAS_DIGEST)
    page.select_option("#colormap", "viridis")
    assert page.evaluate(CANVAS_DIGEST) != before
    assert requests == []  # all of that happened on the client
    screenshot(page, tmp_path, "web-page.png")

    # downloads: the overlay as PNG (caption band + image) and the result as JSON
    with page.expect_download() as download:
        page.click("#download-png")
    png = tmp_path / "overlay.png"
    download.value.save_as(png)
    assert download.value.suggested_filename.startswith("cat-cam-")
    with Image.open(png) as overlay:
        assert overlay.size[0] == 451  # the caption band adds to the height only
    with page.expect_download() as download:
        page.click("#download-json")
    saved = tmp_path / "result.json"
    download.value.save_as(saved)
    result = json.loads(saved.read_text())
    assert result["view"]["box"] == moved
    assert result["view"]["threshold"] == 0.6
    assert "map_png" not in result["maps"][0]


@pytest.mark.timeout(120)
def test_bad_uploads_show_escaped_errors(page: Any, tmp_path: Path) -> None:
    cat = (ROOT / "examples" / "cat.png").read_bytes()
    name = "<img src=x id=injected onerror=alert(1)>.png"  # no "/" or quotes: sent as is
    dialogs: list[str] = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    page.set_input_files(
        "#file-input", {"name": name, "mimeType": "image/png", "buffer": cat[:3000]}
    )
    page.wait_for_selector("#error:not([hidden])")
    message = page.text_content("#error")
    assert name in message
    assert "corrupt" in message
    assert page.locator("#injected").count() == 0
    assert dialogs == []
    assert page.get_attribute("#canvas", "data-state") == "error"
    screenshot(page, tmp_path, "web-error.png")

    page.set_input_files(
        "#file-input", {"name": "notes.txt", "mimeType": "text/plain", "buffer": b"hello"}
    )
    page.wait_for_function(
        "() => document.getElementById('error').textContent.includes('notes.txt')"
    )
    assert "not an image" in page.text_content("#error")

    # an example photo from the page's own list works after the errors
    page.click("#examples button:text('coffee.jpg')")
    page.wait_for_selector("#canvas[data-state=ready]")
    assert page.is_hidden("#error")
    assert page.text_content("#classes button .name") == "espresso"
