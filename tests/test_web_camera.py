"""Camera mode of the page of ``gapcam serve``, in Chromium with a fake camera.

The camera is Chromium's fake capture device fed from a Y4M clip made here: ``examples/cat.png``
moving over a plain background along a closed path, with the frame's number written as a
barcode along the bottom edge. Each frame the page sends is read back from the request (its
barcode), so the test knows which frame each answer belongs to, where the cat was in it, and
how many camera frames passed between two requests.

Needs ``/usr/bin/chromium`` (see test_web_browser.py). Screenshots stay in the test's pytest tmp
dir; their paths are printed.
"""

from __future__ import annotations

import io
import itertools
import json
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from test_web_browser import CANVAS_DIGEST, CAT_CLASSES, chromium

from gapcam.localizer import Localizer
from gapcam.web.app import create_app
from gapcam.web.serve import running

ROOT = Path(__file__).resolve().parents[1]
WAIT_MS = 30_000
#: the clip: FRAMES frames at FPS, WIDTH x HEIGHT, the cat (451 x 300) inside it above the
#: barcode strip of BAR_HEIGHT rows (BITS cells of the frame number, most significant first)
WIDTH, HEIGHT, FPS, FRAMES = 640, 448, 30, 60
CAT_W, CAT_H = 451, 300
BITS, BAR_HEIGHT = 8, 24
#: the cat's path: x over 0..189 and y over 0..100, one full loop per clip
TRAVEL_X, TRAVEL_Y = WIDTH - CAT_W, 100
#: the box of the top class's map must overlap the cat's true place this much (IoU) in every
#: answer. Measured on this clip: 0.68 to 0.89 (the box leaves out some of the photo's own
#: background around the cat, as on cat.png alone: [36, 0, 410, 300] of 451 x 300).
MIN_IOU = 0.6
ANSWERS = 10
INSECURE_HOST = "camera.test"  # resolved to 127.0.0.1 by the browser: http, not loopback

pytestmark = pytest.mark.slow  # a real server and a real browser


def cat_place(frame: int) -> tuple[int, int, int, int]:
    """Where the cat is in ``frame``: (x0, y0, x1, y1), pixel edges."""
    phase = 2 * math.pi * frame / FRAMES
    x = round(TRAVEL_X * (1 - math.cos(phase)) / 2)
    y = round(TRAVEL_Y * (1 - math.cos(2 * phase)) / 2)
    return x, y, x + CAT_W, y + CAT_H


def clip_frame(cat: np.ndarray, frame: int) -> np.ndarray:
    rgb = np.empty((HEIGHT, WIDTH, 3), np.uint8)
    rgb[...] = (96, 128, 104)  # a plain grey-green wall
    rgb[:, :, 0] += (np.arange(WIDTH) // 8).astype(np.uint8)[None, :]  # and a gentle gradient
    x0, y0, x1, y1 = cat_place(frame)
    rgb[y0:y1, x0:x1] = cat
    cell = WIDTH // BITS
    for bit in range(BITS):
        on = (frame >> (BITS - 1 - bit)) & 1
        rgb[HEIGHT - BAR_HEIGHT :, bit * cell : (bit + 1) * cell] = 255 if on else 0
    return rgb


def yuv420(rgb: np.ndarray) -> bytes:
    """RGB -> Y4M's C420jpeg planes (full-range BT.601, chroma averaged over 2 x 2)."""
    r, g, b = (rgb[..., i].astype(np.float32) for i in range(3))
    y = 0.299 * r + 0.587 * g + 0.114 * b
    u = -0.168736 * r - 0.331264 * g + 0.5 * b + 128
    v = 0.5 * r - 0.418688 * g - 0.081312 * b + 128

    def half(c: np.ndarray) -> np.ndarray:
        return c.reshape(c.shape[0] // 2, 2, c.shape[1] // 2, 2).mean(axis=(1, 3))

    def byte(c: np.ndarray) -> bytes:
        return np.clip(c + 0.5, 0, 255).astype(np.uint8).tobytes()

    return byte(y) + byte(half(u)) + byte(half(v))


def write_clip(path: Path) -> None:
    cat = np.asarray(Image.open(ROOT / "examples" / "cat.png").convert("RGB"))
    assert cat.shape == (CAT_H, CAT_W, 3)
    with path.open("wb") as out:
        out.write(f"YUV4MPEG2 W{WIDTH} H{HEIGHT} F{FPS}:1 Ip A1:1 C420jpeg\n".encode())
        for frame in range(FRAMES):
            out.write(b"FRAME\n" + yuv420(clip_frame(cat, frame)))


def frame_number(jpeg: bytes) -> int:
    """The frame number in the barcode of a frame the page sent (downscaled, JPEG)."""
    with Image.open(io.BytesIO(jpeg)) as image:
        gray = np.asarray(image.convert("L"), dtype=np.float32)
    height, width = gray.shape
    strip = gray[height - round(BAR_HEIGHT * height / HEIGHT) + 2 : height - 2]
    cell = width / BITS
    bits = [
        strip[:, int(cell * (i + 0.25)) : int(cell * (i + 0.75))].mean() > 128 for i in range(BITS)
    ]
    return int("".join("1" if bit else "0" for bit in bits), 2)


def sent_frame(body: bytes) -> bytes:
    """The JPEG inside a multipart body the page posted."""
    start = body.index(b"\xff\xd8\xff")
    end = body.rindex(b"\xff\xd9") + 2
    return body[start:end]


def iou(a: list[int] | tuple[int, ...], b: list[int] | tuple[int, ...]) -> float:
    inter_w = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    inter_h = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = inter_w * inter_h
    area = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / area


@dataclass
class Traffic:
    """The requests to /api/localize as the server sees them (an ASGI wrapper around the app):
    the frame number in each one's body, when each arrived, how many were in flight at once."""

    app: Any
    in_flight: int = 0
    most_in_flight: int = 0
    frames: list[int] = field(default_factory=list)  # in the order they were answered
    arrived: list[float] = field(default_factory=list)  # time.monotonic() of the same
    answered: list[float] = field(default_factory=list)  # ... and when each one's answer went

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] != "/api/localize":
            await self.app(scope, receive, send)
            return
        arrived = time.monotonic()
        chunks: list[bytes] = []

        async def tee() -> Any:
            message = await receive()
            if message["type"] == "http.request":
                chunks.append(message.get("body", b""))
            return message

        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await self.app(scope, tee, send)
        finally:
            self.in_flight -= 1
        self.answered.append(time.monotonic())
        self.frames.append(frame_number(sent_frame(b"".join(chunks))))
        self.arrived.append(arrived)


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("camera") / "cat-walk.y4m"
    write_clip(path)
    return path


@pytest.fixture(scope="module")
def browser(clip: Path) -> Iterator[Any]:
    args = [
        "--use-fake-device-for-media-stream",
        "--use-fake-ui-for-media-stream",  # grants the camera without asking
        f"--use-file-for-fake-video-capture={clip}",
        f"--host-resolver-rules=MAP {INSECURE_HOST} 127.0.0.1",
    ]
    with chromium(args) as launched:
        yield launched


@pytest.fixture(scope="module")
def base_url(localizer: Localizer) -> Iterator[str]:
    with running(create_app(localizer)) as url:
        yield url


@pytest.fixture
def traffic(localizer: Localizer) -> Iterator[tuple[str, Traffic]]:
    """A server of its own whose /api/localize requests are recorded (``Traffic``)."""
    recorder = Traffic(create_app(localizer))
    with running(recorder) as url:
        yield url, recorder


@pytest.fixture
def open_page(browser: Any) -> Iterator[Any]:
    """A function that opens the page at a URL (with an optional init script) and waits for it
    to be ready; afterwards, no errors may have been logged."""
    contexts: list[Any] = []
    problems: list[str] = []

    def open_at(url: str, init_script: str | None = None, expected: tuple[str, ...] = ()) -> Any:
        """``expected``: parts of console errors to allow (the browser logs each 4xx/5xx)."""
        context = browser.new_context(viewport={"width": 1280, "height": 820})
        contexts.append(context)
        if init_script:
            context.add_init_script(init_script)
        page = context.new_page()
        page.set_default_timeout(WAIT_MS)

        def console(message: Any) -> None:
            if message.type == "error" and not any(e in message.text for e in expected):
                problems.append(message.text)

        page.on("console", console)
        page.on("pageerror", lambda e: problems.append(str(e)))
        page.goto(url)
        page.wait_for_selector("body[data-ready=true]")
        return page

    yield open_at
    for context in contexts:
        context.close()
    assert problems == [], f"the page logged errors (CSP violations show up here): {problems}"


def screenshot(page: Any, tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    page.screenshot(path=str(path), full_page=True)
    print(f"screenshot: {path}")
    return path


READ_VIEW = f"""() => {{
  const canvas = document.getElementById("camera-canvas");
  return {{
    answers: Number(canvas.dataset.answers),
    top: Number(canvas.dataset.class),
    box: document.getElementById("camera-box").dataset.box,
    fps: Number(document.getElementById("camera-fps").dataset.fps),
    fpsText: document.getElementById("camera-fps").textContent,
    classes: [...document.querySelectorAll("#camera-classes li")].map((li) => li.dataset.index),
    digest: ({CANVAS_DIGEST.replace('"canvas"', '"camera-canvas"')})(),
  }};
}}"""


@pytest.mark.timeout(180)
def test_camera_overlay_follows_the_cat_one_frame_at_a_time(
    open_page: Any, traffic: tuple[str, Traffic], tmp_path: Path
) -> None:
    url, seen = traffic
    page = open_page(url)
    assert page.is_hidden("#camera-view")
    page.click("#mode-camera")
    assert page.is_visible("#camera-view")
    assert page.is_hidden("#view")
    assert page.is_hidden("#camera-message")
    page.click("#camera-toggle")

    views: dict[int, dict[str, Any]] = {}  # answer number -> what the page showed for it
    started = time.monotonic()
    while len(views) < ANSWERS:
        page.wait_for_function(
            f"() => Number(document.getElementById('camera-canvas').dataset.answers) > "
            f"{max(views, default=0)}"
        )
        view = page.evaluate(READ_VIEW)
        views[view["answers"]] = view
    elapsed = time.monotonic() - started
    screenshot(page, tmp_path, "web-camera.png")
    assert page.text_content("#camera-toggle") == "Stop camera"
    page.click("#camera-toggle")
    page.wait_for_selector("#camera-canvas[data-state=off]")
    stopped_at = len(seen.frames) + seen.in_flight
    answers_at_stop = page.get_attribute("#camera-canvas", "data-answers")
    page.wait_for_timeout(1000)
    assert page.get_attribute("#camera-canvas", "data-answers") == answers_at_stop

    # frames are never queued: one request at a time, none after Stop (but one in flight)
    assert seen.most_in_flight == 1
    assert len(seen.frames) == stopped_at
    last = max(views)

    # each capture is the newest frame: the frame numbers advance with the clock (30 camera
    # frames a second), skipping the frames that came while the previous answer was computed,
    # instead of walking through the frames one by one
    frames = seen.frames[:last]
    gaps = [(b - a) % FRAMES for a, b in itertools.pairwise(frames)]
    expected = (seen.arrived[last - 1] - seen.arrived[0]) * FPS
    print(f"frames sent: {frames}; gaps {gaps}; in the time of {expected:.0f} camera frames")
    assert all(gap >= 1 for gap in gaps), gaps  # never the same frame twice, never older
    assert abs(sum(gaps) - expected) <= 0.25 * expected + 3, (gaps, expected)

    # every answer is drawn: the top class is a cat and its box is where the cat was in the
    # frame that answer came from; the overlay changes as the cat moves
    ious = []
    for number, view in sorted(views.items()):
        assert view["top"] in CAT_CLASSES, view
        assert view["classes"][0] == str(view["top"])
        assert len(view["classes"]) == 5
        box = [int(v) for v in view["box"].split(",")]
        ious.append(iou(box, cat_place(seen.frames[number - 1])))
    print(f"IoU of each answer's box with the cat: {[round(v, 2) for v in ious]}")
    assert min(ious) >= MIN_IOU
    assert len({view["box"] for view in views.values()}) >= 3
    assert len({view["digest"] for view in views.values()}) >= 3

    # the rate shown is the rate achieved: the page's count of answers a second agrees with the
    # server's (over the same answers: all came within the page's 5 s window)
    fps = views[last]["fps"]
    answered = (last - 1) / (seen.answered[last - 1] - seen.answered[0])
    print(f"achieved: {fps:.1f} frames/s shown, {answered:.1f} answered; {elapsed:.1f} s")
    assert abs(fps - answered) <= 0.2 * answered
    shown = views[last]["fpsText"]
    assert shown.endswith(" frames/s analysed")
    assert abs(float(shown.split()[0]) - fps) <= 0.051


def wait_for_answers(page: Any, more_than: int) -> int:
    page.wait_for_function(
        "n => Number(document.getElementById('camera-canvas').dataset.answers) > n", arg=more_than
    )
    return int(page.get_attribute("#camera-canvas", "data-answers"))


@pytest.mark.timeout(120)
def test_camera_waits_out_a_busy_server_and_stops_on_a_refusal(
    open_page: Any, base_url: str
) -> None:
    page = open_page(base_url, expected=("status of 503", "status of 422"))
    dialogs: list[str] = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    answers: dict[str, Any] = {"busy": 0, "refuse": None, "busy_sent": 0}

    def server(route: Any) -> None:
        if answers["busy"] > 0:  # what the server answers when all upload slots are taken
            answers["busy"] -= 1
            answers["busy_sent"] += 1
            route.fulfill(
                status=503,
                headers={"Retry-After": "1"},
                content_type="application/json",
                body=json.dumps({"error": "server busy: too many uploads in progress"}),
            )
        elif answers["refuse"]:
            route.fulfill(status=422, content_type="application/json", body=answers["refuse"])
        else:
            route.continue_()

    page.route("**/api/localize?*", server)
    page.click("#mode-camera")
    page.click("#camera-toggle")
    wait_for_answers(page, 0)

    # busy twice: the page waits as Retry-After says, without an error, and goes on
    answers["busy"] = 2
    page.wait_for_function(
        "() => document.getElementById('camera-status').textContent.includes('Server busy')"
    )
    started = time.monotonic()
    wait_for_answers(page, int(page.get_attribute("#camera-canvas", "data-answers")))
    assert answers["busy_sent"] == 2
    assert time.monotonic() - started >= 1.0  # at least one more Retry-After of 1 s
    assert page.is_hidden("#camera-message")
    assert page.get_attribute("#camera-canvas", "data-state") == "running"

    # a refusal stops the camera with the server's message, shown as text
    error = "<img src=x id=injected onerror=alert(1)> is not an image"
    answers["refuse"] = json.dumps({"error": error})
    page.wait_for_selector("#camera-message:not([hidden])")
    assert page.text_content("#camera-message") == f"The server refused a frame: {error}"
    assert page.locator("#injected").count() == 0
    assert dialogs == []
    assert page.get_attribute("#camera-canvas", "data-state") == "error"
    assert page.text_content("#camera-toggle") == "Start camera"
    assert page.evaluate("() => document.getElementById('camera-video').srcObject") is None

    # and it starts again, counting its answers from 0 (not the last run's)
    answers["refuse"] = None
    page.click("#camera-toggle")
    assert page.get_attribute("#camera-canvas", "data-answers") == "0"
    wait_for_answers(page, 0)
    assert page.is_hidden("#camera-message")
    page.click("#mode-image")  # leaving the camera mode stops the camera
    page.wait_for_selector("#camera-canvas[data-state=off]", state="attached")
    assert page.evaluate("() => document.getElementById('camera-video').srcObject") is None
    assert page.evaluate("() => location.hash") == ""


@pytest.mark.timeout(60)
def test_camera_on_an_insecure_origin_says_why_it_is_unavailable(
    open_page: Any, base_url: str, tmp_path: Path
) -> None:
    # the same server, reached as http://camera.test:PORT: not https, not localhost
    url = base_url.replace("127.0.0.1", INSECURE_HOST)
    page = open_page(f"{url}/#camera")  # the fragment opens the camera mode
    assert page.evaluate("() => [window.isSecureContext, typeof navigator.mediaDevices]") == [
        False,
        "undefined",
    ]
    page.wait_for_selector("#camera-message:not([hidden])")
    message = page.text_content("#camera-message")
    assert "localhost or over https" in message
    assert url in message  # the page names its own origin
    assert page.is_disabled("#camera-toggle")
    screenshot(page, tmp_path, "web-camera-insecure.png")


@pytest.mark.timeout(60)
def test_camera_missing_from_the_browser_is_said(open_page: Any, base_url: str) -> None:
    hide = (
        "Object.defineProperty(Navigator.prototype, 'mediaDevices', "
        "{ get: () => undefined, configurable: true });"
    )
    page = open_page(base_url, init_script=hide)
    page.click("#mode-camera")
    page.wait_for_selector("#camera-message:not([hidden])")
    assert "navigator.mediaDevices is missing" in page.text_content("#camera-message")
    assert page.is_disabled("#camera-toggle")


@pytest.mark.timeout(60)
def test_camera_permission_denied_is_said_and_start_can_be_retried(
    open_page: Any, base_url: str
) -> None:
    deny = (
        "navigator.mediaDevices.getUserMedia = () => Promise.reject("
        "new DOMException('Permission denied', 'NotAllowedError'));"
    )
    page = open_page(base_url, init_script=deny)
    page.click("#mode-camera")
    assert page.is_hidden("#camera-message")
    page.click("#camera-toggle")
    page.wait_for_selector("#camera-message:not([hidden])")
    assert "permission was denied" in page.text_content("#camera-message")
    assert page.get_attribute("#camera-canvas", "data-state") == "error"
    assert page.is_enabled("#camera-toggle")
    assert page.text_content("#camera-toggle") == "Start camera"
    # back to images: the image page works as before
    page.click("#mode-image")
    assert page.is_visible("#drop")
    assert page.is_hidden("#camera-view")
    page.click("#examples button:text('cat.png')")
    page.wait_for_selector("#canvas[data-state=ready]")
    assert int(page.get_attribute("#canvas", "data-class")) in CAT_CLASSES
