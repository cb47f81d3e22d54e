"""Hostile clients against ``gapcam serve``: they cannot starve it, trip it, or get a traceback.

Slow bodies and slow heads next to normal uploads, malformed multipart bodies and HTTP heads,
the security headers on every answer, and bad ``gapcam serve`` options. Real servers bind
127.0.0.1 on a free port (slow clients also connect from 127.0.0.2 and 127.0.0.3, still
loopback), for a few seconds each; everything else runs in process.
"""

from __future__ import annotations

import json
import random
import socket
import time
from collections import Counter
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, ClassVar

import anyio
import httpx
import pytest
from conftest import EXAMPLES
from fastapi.testclient import TestClient

from gapcam import cli
from gapcam.localizer import Localizer
from gapcam.web import app as web_app
from gapcam.web.app import CSP, create_app
from gapcam.web.protocol import GuardedH11Protocol
from gapcam.web.serve import is_loopback, loopback_hosts, running
from gapcam.web.upload import Pace, UploadError, read_upload

pytestmark = pytest.mark.timeout(60)

HOST = b"Host: 127.0.0.1\r\n"
UPLOAD_HEAD = (
    b"POST /api/localize HTTP/1.1\r\n" + HOST + b"Content-Type: multipart/form-data; boundary=x\r\n"
)
FILE_PART = b'--x\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n\r\n'


@pytest.fixture(scope="module")
def cat_bytes() -> bytes:
    return (EXAMPLES / "cat.png").read_bytes()


@pytest.fixture(scope="module")
def client(localizer: Localizer) -> TestClient:
    return TestClient(create_app(localizer))


def assert_error(response: httpx.Response, status: int, *fragments: str) -> str:
    """A JSON error answer with the security headers; returns its message."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert_security_headers(response.headers)
    message = response.json()["error"]
    assert "Traceback" not in message
    assert "\n" not in message
    assert len(message) < 300
    for fragment in fragments:
        assert fragment in message, message
    return str(message)


def assert_security_headers(headers: Any) -> None:
    assert headers["content-security-policy"] == CSP
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["x-frame-options"] == "DENY"
    assert headers["referrer-policy"] == "no-referrer"


def multipart(boundary: bytes, data: bytes, name: bytes = b"file") -> bytes:
    return (
        b"--" + boundary + b'\r\nContent-Disposition: form-data; name="' + name + b'"; '
        b'filename="a.png"\r\nContent-Type: image/png\r\n\r\n'
        + data
        + b"\r\n--"
        + boundary
        + b"--\r\n"
    )


def post_raw(client: TestClient, body: bytes, content_type: str, **headers: str) -> httpx.Response:
    return client.post(
        "/api/localize", content=body, headers={"content-type": content_type, **headers}
    )


# --- slow bodies: the pace of one upload ---------------------------------------------------


async def _read(pieces: list[tuple[float, bytes]], pace: Pace) -> tuple[str, float]:
    """read_upload on an upload whose file data comes as (delay, bytes) pieces: its outcome
    and duration."""

    async def body() -> AsyncIterator[bytes]:
        yield FILE_PART
        for delay, data in pieces:
            await anyio.sleep(delay)
            yield data

    headers = {"content-type": "multipart/form-data; boundary=x"}
    started = time.monotonic()
    try:
        upload = await read_upload(headers, body(), field="file", max_bytes=10**6, pace=pace)
    except UploadError as exc:
        return f"{exc.status} {exc.message}", time.monotonic() - started
    return f"200 {len(upload.data)}", time.monotonic() - started


PACE = Pace(grace_s=0.4, min_rate=10_000, idle_s=0.6, total_s=1.5)


@pytest.mark.parametrize(
    ("pieces", "outcome", "seconds"),
    [
        ([(0.0, b"\x89PNG" * 1000 + b"\r\n--x--\r\n")], "200 4000", 0.0),
        ([(0.1, b"-")] * 40, "408 the upload is too slow: under 10 KB/s", 0.4),
        ([(0.0, b"-" * 5000)] + [(0.1, b"-")] * 40, "408 the upload is too slow", 0.9),
        ([(0.0, b"-" * 9000), (5.0, b"-")], "408 the upload stalled: no data for 0.6 s", 0.6),
        ([(0.05, b"-" * 2000)] * 40, "408 the upload took longer than 1.5 s", 1.5),
    ],
    ids=["fast", "trickle", "burst-then-trickle", "stall", "total"],
)
def test_a_slow_body_is_dropped_on_time(
    pieces: list[tuple[float, bytes]], outcome: str, seconds: float
) -> None:
    got, took = anyio.run(_read, pieces, PACE)
    assert got.startswith(outcome)
    assert seconds - 0.05 <= took <= seconds + 0.4
    if got.startswith("408"):
        assert got.endswith("; send the image again on a faster connection")


def test_pace_refuses_limits_that_are_not_positive_and_finite() -> None:
    from gapcam.errors import GapcamError

    for bad in ({"grace_s": 0}, {"min_rate": -1}, {"idle_s": float("nan")}, {"total_s": 1e400}):
        with pytest.raises(GapcamError, match="positive and finite"):
            Pace(**bad)


# --- slow clients next to normal ones, on a real server --------------------------------------


def slow_client(port: int, source: str, byte_every: float, give_up: float) -> tuple[str, float]:
    """An upload from ``source`` whose body comes one byte every ``byte_every`` s; returns how
    it ended (the HTTP status, "closed" or "open" after ``give_up`` s) and when."""
    started = time.monotonic()
    try:
        sock = socket.create_connection(("127.0.0.1", port), 5, source_address=(source, 0))
    except OSError as exc:
        return f"connect failed: {exc}", 0.0
    answer = b""
    with sock:
        sock.sendall(UPLOAD_HEAD + b"Content-Length: 100000\r\n\r\n" + FILE_PART)
        sock.settimeout(byte_every)
        while time.monotonic() - started < give_up:
            try:
                chunk = sock.recv(4096)
            except TimeoutError:
                try:
                    sock.sendall(b"-")
                except OSError:
                    break
                continue
            except OSError:
                break
            answer += chunk
            if not chunk or b"\r\n\r\n" in answer:
                break
    took = time.monotonic() - started
    if answer.startswith(b"HTTP/1.1 "):
        return answer[9:12].decode(), took
    return ("closed" if took < give_up else "open"), took


def can_connect_from(source: str) -> bool:
    try:
        with socket.socket() as probe:
            probe.bind((source, 0))
    except OSError:
        return False
    return True


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_slow_clients_cannot_starve_normal_uploads(
    localizer: Localizer, cat_bytes: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """24 connections from two other loopback addresses send their body a byte every 0.25 s;
    meanwhile uploads from 127.0.0.1 go on one after another. The defaults scaled down: 2
    bodies at once per address, 4 waiting, 1 s grace at 16 KB/s, 8 slots in all."""
    sources = ["127.0.0.2", "127.0.0.3"]
    if not all(can_connect_from(source) for source in sources):
        pytest.skip("this system has no 127.0.0.2/127.0.0.3 (only Linux has all of 127/8)")
    monkeypatch.setattr(web_app, "MAX_WAITING_PER_CLIENT", 4)
    pace = Pace(grace_s=1.0, min_rate=16_000, idle_s=5.0, total_s=30.0)
    app = create_app(localizer, max_pending=8, max_bodies_per_client=2, pace=pace)
    with running(app) as url, ThreadPoolExecutor(max_workers=24) as pool:
        port = int(url.rsplit(":", 1)[1])
        slow = [pool.submit(slow_client, port, source, 0.25, 20.0) for source in sources * 12]
        time.sleep(0.3)  # all of them are in
        normal: list[tuple[int, float]] = []
        with httpx.Client(base_url=url, timeout=30) as http:
            while not all(future.done() for future in slow) or len(normal) < 5:
                started = time.monotonic()
                response = http.post("/api/localize", files={"file": ("cat.png", cat_bytes)})
                normal.append((response.status_code, time.monotonic() - started))
        ends = [future.result() for future in slow]
        service = app.state.service
        assert (service.pending, service.clients) == (0, {})
    outcomes = Counter(outcome for outcome, _ in ends)
    latencies = sorted(seconds for _, seconds in normal)
    figures = {
        "slow_clients": len(ends),
        "slow_outcomes": dict(outcomes),
        "slow_last_end_s": round(max(seconds for _, seconds in ends), 2),
        "normal_uploads": len(normal),
        "normal_statuses": dict(Counter(status for status, _ in normal)),
        "normal_p50_s": round(latencies[len(latencies) // 2], 3),
        "normal_max_s": round(latencies[-1], 3),
    }
    print(f"slow clients: {json.dumps(figures)}")
    assert {status for status, _ in normal} == {200}
    assert set(outcomes) <= {"408", "429", "closed"}, ends
    assert outcomes["429"] >= 1  # more than 2 sending + 4 waiting from one address
    assert outcomes["408"] >= 4  # dropped after the grace: each address's first two at least
    # each address sends 2 bodies at a time, each dropped ~1.25 s after its turn starts
    assert figures["slow_last_end_s"] < 8.0
    assert latencies[-1] < 5.0


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_a_slow_head_is_dropped(localizer: Localizer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(GuardedH11Protocol, "head_timeout_s", 1.0)
    with running(create_app(localizer)) as url:
        port = int(url.rsplit(":", 1)[1])

        def dribble(first: bytes, then: bytes) -> tuple[bytes, float]:
            started = time.monotonic()
            with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                sock.sendall(first)
                sock.settimeout(0.2)
                answer = b""
                for byte in then:
                    try:
                        chunk = sock.recv(65536)
                    except TimeoutError:
                        sock.sendall(bytes([byte]))
                        continue
                    except OSError:
                        break
                    if not chunk:
                        break
                    answer += chunk
                return answer, time.monotonic() - started

        trickle = b"X-Padding: " + b"a" * 50
        answer, took = dribble(b"GET /api/info HTTP/1.1\r\n" + HOST, trickle)
        assert answer.startswith(b"HTTP/1.1 408 ")
        head, _, body = answer.partition(b"\r\n\r\n")
        assert b"content-security-policy: " in head
        assert json.loads(body) == {"error": "the request head did not arrive within 1 s"}
        assert 0.9 <= took < 3.0
        # a kept-alive connection: the first request is answered, the second head dribbles
        answer, took = dribble(b"GET /api/info HTTP/1.1\r\n" + HOST + b"\r\nGET /", trickle)
        assert answer.startswith(b"HTTP/1.1 200 ")
        assert b"HTTP/1.1 408 " in answer
        # the body of a request answered without reading it (405) cannot trickle on for ever
        post = b"POST /api/info HTTP/1.1\r\n" + HOST + b"Content-Length: 1000\r\n\r\n"
        answer, took = dribble(post, b"-" * 50)
        assert answer.startswith(b"HTTP/1.1 405 ")
        assert 0.9 <= took < 3.0
        # a connection that sends nothing is closed without a word
        started = time.monotonic()
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            assert sock.recv(100) == b""
        assert 0.9 <= time.monotonic() - started < 3.0
        assert httpx.get(f"{url}/api/info").status_code == 200


# --- malformed multipart bodies --------------------------------------------------------------


@pytest.mark.parametrize(
    ("content_type", "body", "status", "fragment"),
    [
        ("multipart/form-data; boundary=" + "b" * 257, b"--x--", 400, "Boundary length 257"),
        ("multipart/form-data; boundary=" + "b" * 5000, b"--x--", 400, "malformed multipart"),
        ('multipart/form-data; boundary=""', b"--x--", 400, "without a boundary"),
        ("multipart/form-data; boundary=x", b"garbage\x00\xff" * 100, 400, "malformed multipart"),
        ("multipart/form-data; boundary=x", b"--x\r\nno colon here\r\n\r\n", 400, "malformed"),
        ("multipart/form-data; boundary=x", b"--x\r\n" + b"a: " + b"b" * 9000, 400, "header size"),
        ("multipart/form-data; boundary=x", multipart(b"x", b"abc")[:-12], 422, "ended early"),
        (
            "multipart/form-data; boundary=x",
            multipart(b"x", b"a", b"\x1b]0;T\x07"),
            422,
            "(got ']0;T')",
        ),
        ("multipart/form-data; boundary=x", b"", 422, "no fields"),
        ("multipart/form-data; boundary=x", (b"--x\r\n\r\n\r\n") * 20 + b"--x--", 400, "fields"),
        ("multipart/mixed; boundary=x", multipart(b"x", b"a"), 415, "multipart/form-data"),
        ("\x1b[31m; boundary=x", multipart(b"x", b"a"), 415, "'\\x1b[31m'"),
    ],
    ids=[
        "boundary-257",
        "boundary-5000",
        "boundary-empty",
        "garbage",
        "header-no-colon",
        "header-9kb",
        "truncated",
        "field-name-escapes",
        "empty",
        "twenty-parts",
        "mixed",
        "type-escapes",
    ],
)
def test_malformed_multipart_is_a_4xx_json_error(
    client: TestClient, content_type: str, body: bytes, status: int, fragment: str
) -> None:
    message = assert_error(post_raw(client, body, content_type), status, fragment)
    assert "\x1b" not in message
    assert "\x07" not in message


@pytest.mark.parametrize("declared", ["²", "9" * 5000, "-1", "1e9", " 12 "])
def test_odd_content_lengths_do_not_trip_the_size_check(client: TestClient, declared: str) -> None:
    """As if a proxy let them through (h11 itself refuses them: see the raw-socket test)."""
    response = client.post(
        "/api/localize",
        content=multipart(b"x", b"abc"),
        headers={
            "content-type": "multipart/form-data; boundary=x",
            "content-length": declared.encode("latin-1"),
        },
    )
    assert response.status_code in (400, 413, 422), response.text
    assert_error(response, response.status_code)


def test_mutated_bodies_never_give_a_500(client: TestClient, cat_bytes: bytes) -> None:
    """60 seeded mutations of a valid upload (bytes flipped, cut, repeated, inserted)."""
    valid = multipart(b"boundary123", cat_bytes[:3000])
    rng = random.Random(11)
    statuses = Counter()
    for _ in range(60):
        body = bytearray(valid)
        for _ in range(rng.randint(1, 6)):
            at = rng.randrange(len(body))
            kind = rng.choice(["flip", "cut", "repeat", "insert"])
            if kind == "flip":
                body[at] = rng.randrange(256)
            elif kind == "cut":
                del body[at : at + rng.randint(1, 200)]
            elif kind == "repeat":
                body[at:at] = body[at : at + rng.randint(1, 300)] * rng.randint(2, 5)
            else:
                body[at:at] = rng.choice([b"\r\n", b"--boundary123", b"\r\n\r\n", b":", b'"'])
        response = post_raw(client, bytes(body), "multipart/form-data; boundary=boundary123")
        statuses[response.status_code] += 1
        assert response.status_code in (200, 400, 413, 422), response.text
        if response.status_code != 200:
            assert_error(response, response.status_code)
    assert statuses[400] + statuses[422] >= 20, statuses


# --- protocol errors answered before the app -------------------------------------------------


def raw_exchange(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        answer = b""
        try:
            while chunk := sock.recv(65536):
                answer += chunk
        except ConnectionResetError:
            pass  # the server closed with some of a too-long head unread
        return answer


@pytest.mark.slow
def test_malformed_http_gets_json_with_the_headers(localizer: Localizer) -> None:
    cases = {
        "negative-length": (
            b"POST /api/localize HTTP/1.1\r\n" + HOST + b"Content-Length: -1\r\n",
            400,
        ),
        "two-hosts": (b"GET /api/info HTTP/1.1\r\nHost: a\r\nHost: b\r\n", 400),
        "two-lengths": (
            b"POST /api/info HTTP/1.1\r\n" + HOST + b"Content-Length: 1\r\nContent-Length: 2\r\n",
            400,
        ),
        "5000-digit-length": (
            b"POST /api/localize HTTP/1.1\r\n" + HOST + b"Content-Length: " + b"9" * 5000 + b"\r\n",
            400,
        ),
        "no-colon": (b"GET /api/info HTTP/1.1\r\n" + HOST + b"oops\r\n", 400),
        "non-ascii-path": (b"GET /\xff\x1b[31m HTTP/1.1\r\n" + HOST, 400),
        "not-http": (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(40)), 400),
        "200kb-url": (b"GET /" + b"a" * 200_000 + b" HTTP/1.1\r\n" + HOST, 431),
        "bad-chunk": (
            UPLOAD_HEAD + b"Transfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n",
            400,
        ),
    }
    with running(create_app(localizer)) as url:
        port = int(url.rsplit(":", 1)[1])
        for name, (request, status) in cases.items():
            answer = raw_exchange(port, request if b"chunked" in request else request + b"\r\n")
            head, _, body = answer.partition(b"\r\n\r\n")
            if name == "200kb-url" and not answer:
                continue  # the reset outran the answer: closed, which is fine too
            assert head.startswith(f"HTTP/1.1 {status} ".encode()), (name, answer[:300])
            fields = (line.decode().split(": ", 1) for line in head.split(b"\r\n")[1:])
            headers = {name.lower(): value for name, value in fields}
            assert headers["content-type"] == "application/json", name
            assert_security_headers(headers)
            message = json.loads(body)["error"]
            assert message.startswith("malformed HTTP request: "), message
            assert "bytearray" not in message
            assert all(ch.isprintable() for ch in message)
        assert httpx.get(f"{url}/api/info").status_code == 200  # still serving


# --- the security headers on every answer ----------------------------------------------------


def test_every_answer_carries_the_security_headers(tiny: Any, localizer: Localizer) -> None:
    class Exploding(Localizer):
        def explain(self, *args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("secret internal detail")

    broken = TestClient(create_app(Exploding(tiny)), raise_server_exceptions=False)
    guarded = TestClient(create_app(localizer, allowed_hosts=["127.0.0.1"]))
    small = TestClient(create_app(localizer, max_upload_bytes=10))
    answers = {
        "page": broken.get("/"),
        "docs": broken.get("/docs"),
        "schema": broken.get("/openapi.json"),
        "script": broken.get("/static/app.js"),
        "example": broken.get("/api/examples/cat.png"),
        "404": broken.get("/nothing"),
        "405": broken.delete("/api/info"),
        "404-example": broken.get("/api/examples/x"),
        "422": broken.post("/api/localize", params={"threshold": 5}, files={"file": ("a", b"")}),
        "500": broken.post(
            "/api/localize", files={"file": ("a.png", (EXAMPLES / "cat.png").read_bytes())}
        ),
        "host-400": guarded.get("/api/info", headers={"host": "evil.example"}),
        "413": small.post("/api/localize", files={"file": ("a.png", b"x" * 100)}),
    }
    for response in answers.values():
        assert_security_headers(response.headers)
        if response.status_code >= 400:
            assert_error(response, response.status_code)
    assert "secret" not in answers["500"].text
    statuses = {name: response.status_code for name, response in answers.items()}
    assert statuses == {
        "page": 200,
        "docs": 200,
        "schema": 200,
        "script": 200,
        "example": 200,
        "404": 404,
        "405": 405,
        "404-example": 404,
        "422": 422,
        "500": 500,
        "host-400": 400,
        "413": 413,
    }


def test_docs_is_a_local_page_of_the_api(client: TestClient) -> None:
    page = client.get("/docs")
    assert page.headers["content-type"].startswith("text/html")
    text = page.text
    for operation in ("POST /api/localize", "GET /api/info", "GET /api/colormaps"):
        assert operation in text
    assert "<code>threshold</code> (query, number, 0.0..1.0, default 0.2) box threshold" in text
    assert '<a href="/openapi.json">' in text
    assert "<script" not in text
    assert "http://" not in text
    assert "https://" not in text
    assert client.get("/redoc").status_code == 404


# --- gapcam serve's options ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["--max-upload-mb", "inf"], "--max-upload-mb inf: must be a size in MB"),
        (["--max-upload-mb", "nan"], "--max-upload-mb nan: must be"),
        (["--max-upload-mb", "-1"], "--max-upload-mb -1: must be"),
        (["--max-upload-mb", "0"], "--max-upload-mb 0: must be"),
        (["--max-upload-mb", "1e30"], "--max-upload-mb 1e+30: must be"),
        (["--port", "99999"], "--port 99999: must be from 0 to 65535"),
        (["--port", "-1"], "--port -1: must be from 0 to 65535"),
        (["--port", "65536"], "--port 65536"),
        (["--host", "a" * 70 + ".example"], "not a valid host name"),
        (["--host", "\x1b]0;TITLE\x07\x1b[31m"], "--host \\x1b]0;TITLE\\x07\\x1b[31m: cannot"),
        (["--host", "x\ny"], "--host x\\ny: cannot resolve it"),
    ],
    ids=[
        "mb-inf",
        "mb-nan",
        "mb-negative",
        "mb-zero",
        "mb-1e30",
        "port-99999",
        "port-negative",
        "port-65536",
        "host-long-label",
        "host-escapes",
        "host-newline",
    ],
)
def test_bad_serve_options_are_one_line(
    argv: list[str], fragment: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["serve", *argv]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1
    assert captured.err.startswith("gapcam: error: ")
    assert fragment in captured.err
    assert len(captured.err) < 300
    assert "\x1b" not in captured.err
    assert "\x07" not in captured.err


@pytest.mark.parametrize(
    ("address", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.0.0.2", True),
        ("127.255.255.254", True),
        ("::1", True),
        ("::ffff:127.0.0.2", True),
        ("0.0.0.0", False),
        ("::", False),
        ("10.0.0.1", False),
        ("128.0.0.1", False),
        ("localhost", False),  # a name, not what was bound: the bound address decides
    ],
)
def test_is_loopback(address: str, loopback: bool) -> None:
    assert is_loopback(address) is loopback


class FakeServer:
    """Stands in for uvicorn: keeps the app ``gapcam serve`` built instead of serving it."""

    apps: ClassVar[list[Any]] = []

    def __init__(self, app: Any) -> None:
        self.apps.append(app)

    def run(self, sockets: list[socket.socket]) -> None:
        self.bound = sockets[0].getsockname()


@pytest.mark.parametrize("host", ["127.0.0.2", "localhost", "127.0.0.1"])
def test_serve_on_any_loopback_address_keeps_the_host_check(
    host: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    if not can_connect_from(host):
        pytest.skip(f"this system has no {host}")
    monkeypatch.setattr("gapcam.web.serve.uvicorn_server", FakeServer)
    FakeServer.apps.clear()
    assert cli.main(["serve", "--host", host, "--port", "0"]) == 0
    out, err = capsys.readouterr()
    assert "warning" not in err
    (app,) = FakeServer.apps
    shown = out.split("http://", 1)[1].rsplit(":", 1)[0]
    assert app.state.allowed_hosts == loopback_hosts(shown.strip("[]"))
    assert shown in app.state.allowed_hosts or f"[{shown}]" in app.state.allowed_hosts
    web = TestClient(app)
    assert web.get("/api/info", headers={"host": f"{shown}:8000"}).status_code == 200
    assert_error(web.get("/api/info", headers={"host": "evil.example"}), 400, "not allowed")


def test_loopback_hosts() -> None:
    assert loopback_hosts("127.0.0.2") == ["127.0.0.1", "127.0.0.2", "[::1]", "localhost"]
    assert loopback_hosts("::1") == ["127.0.0.1", "[::1]", "localhost"]


def test_serve_max_upload_mb_is_used_as_given(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr("gapcam.web.serve.uvicorn_server", FakeServer)
    FakeServer.apps.clear()
    assert cli.main(["serve", "--port", "0", "--max-upload-mb", "0.5"]) == 0
    assert FakeServer.apps[0].state.service.max_upload_bytes == 500_000
    assert cli.main(["serve", "--port", "0", "--max-upload-mb", "1000"]) == 0
    assert FakeServer.apps[1].state.service.max_upload_bytes == 1_000_000_000
    capsys.readouterr()
