"""The JSON API of ``gapcam serve``: answers, limits, errors, schema, concurrency.

Most cases use FastAPI's in-process TestClient; the early-413, 503 and load tests run a real
uvicorn server on a free loopback port. Everything uses the embedded model, offline.
"""

from __future__ import annotations

import base64
import fnmatch
import io
import json
import socket
import struct
import sys
import tempfile
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from conftest import EXAMPLES, SHAPES, write_shapes_run
from fastapi.testclient import TestClient
from PIL import Image

from gapcam import cli, overlay
from gapcam.boxes import boxes_from_map
from gapcam.cli.options import localizer_options
from gapcam.localizer import Localizer
from gapcam.web.app import EXAMPLE_NAMES, create_app, default_examples_dir
from gapcam.web.serve import running
from gapcam.web.upload import display_name

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[1]
CAT_CLASSES = range(281, 286)  # ImageNet: tabby, tiger cat, Persian, Siamese, Egyptian cat
ESPRESSO = 967


@pytest.fixture(scope="module")
def cat_bytes() -> bytes:
    return (EXAMPLES / "cat.png").read_bytes()


@pytest.fixture(scope="module")
def coffee_bytes() -> bytes:
    return (EXAMPLES / "coffee.jpg").read_bytes()


@pytest.fixture(scope="module")
def client(localizer: Localizer) -> TestClient:
    return TestClient(create_app(localizer))


def post(client: TestClient, data: bytes, name: str = "cat.png", **params: Any) -> httpx.Response:
    return client.post("/api/localize", params=params, files={"file": (name, data, "image/png")})


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` pixels but holds no pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def decode_data_url(url: str) -> Image.Image:
    header, encoded = url.split(",", 1)
    assert header in ("data:image/png;base64", "data:image/jpeg;base64")
    return Image.open(io.BytesIO(base64.b64decode(encoded)))


def assert_json_error(response: httpx.Response, status: int, *fragments: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    message = response.json()["error"]
    assert list(response.json()) == ["error"]
    assert "Traceback" not in message
    for fragment in fragments:
        assert fragment in message


def test_cat_gives_five_classes_maps_and_boxes(client: TestClient, cat_bytes: bytes) -> None:
    body = post(client, cat_bytes).json()
    assert (body["input"], body["width"], body["height"]) == ("cat.png", 451, 300)
    assert body["predictions"][0]["index"] in CAT_CLASSES
    assert [m["index"] for m in body["maps"]] == [p["index"] for p in body["predictions"]]
    assert len(body["maps"]) == 5
    probabilities = [p["probability"] for p in body["predictions"]]
    assert probabilities == sorted(probabilities, reverse=True)
    x0, y0, x1, y1 = body["maps"][0]["boxes"][0]["xyxy"]
    assert 0 <= x0 < x1 <= 451
    assert 0 <= y0 < y1 <= 300
    assert body["preview"] is None
    assert body["threshold"] == 0.2
    for entry in body["maps"]:
        image = decode_data_url(entry["map_png"])
        assert image.mode == "L"
        assert image.size == (body["map_width"], body["map_height"]) == (256, 170)


def test_maps_and_boxes_match_the_library(
    client: TestClient, localizer: Localizer, cat_bytes: bytes
) -> None:
    result = localizer(cat_bytes, top_k=5)
    body = post(client, cat_bytes, threshold=0.45, map_size=512).json()
    assert (body["map_width"], body["map_height"]) == (451, 300)  # not downscaled: exact
    for j, entry in enumerate(body["maps"]):
        expected = boxes_from_map(result.normalized[j], 0.45, localizer.min_area)
        assert [b["xyxy"] for b in entry["boxes"]] == [b.as_list() for b in expected]
        gray = np.asarray(decode_data_url(entry["map_png"]), dtype=np.float32) / 255.0
        assert np.abs(gray - result.normalized[j]).max() <= 0.5 / 255 + 1e-6


def test_threshold_changes_the_box(client: TestClient, cat_bytes: bytes) -> None:
    low = post(client, cat_bytes, threshold=0.1).json()["maps"][0]["boxes"][0]
    high = post(client, cat_bytes, threshold=0.9).json()["maps"][0]["boxes"][0]
    assert high["area"] < low["area"]


def test_preview_is_the_decoded_image_scaled(client: TestClient, cat_bytes: bytes) -> None:
    body = post(client, cat_bytes, preview=100).json()
    preview = decode_data_url(body["preview"])
    assert (preview.format, preview.size) == ("JPEG", (100, 67))


def test_file_name_is_only_echoed(client: TestClient, cat_bytes: bytes) -> None:
    body = post(client, cat_bytes, name="../../etc/<img src=x onerror=alert(1)>.png").json()
    assert body["input"] == "<img src=x onerror=alert(1)>.png"


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        ("C:\\photos\\cat.png", "cat.png"),
        ("a\x00b\x07c\u202e.png", "abc.png"),
        ("", "upload"),
        ("../", "upload"),
        ("x" * 500, "x" * 119 + "…"),
    ],
)
def test_display_name(raw: str, shown: str) -> None:
    assert display_name(raw) == shown


def test_nothing_is_written_to_disk(
    client: TestClient, cat_bytes: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the upload path must not create files")

    for name in ("SpooledTemporaryFile", "NamedTemporaryFile", "TemporaryFile", "mkstemp"):
        monkeypatch.setattr(tempfile, name, refuse)
    assert post(client, cat_bytes).status_code == 200


@pytest.mark.parametrize(
    ("name", "data", "fragment"),
    [
        ("notes.txt", b"just some text, not an image\n", "not an image file"),
        ("empty.png", b"", "empty"),
        ("noise.png", b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4, "cat.png"),
    ],
    ids=["text-file", "empty-file", "corrupt-png"],
)
def test_bad_files_get_a_422_message(
    client: TestClient, name: str, data: bytes, fragment: str
) -> None:
    expected = name if fragment == "cat.png" else fragment
    assert_json_error(post(client, data, name=name), 422, expected)


def test_truncated_image_is_corrupt(client: TestClient, cat_bytes: bytes) -> None:
    assert_json_error(post(client, cat_bytes[:5000], name="half.png"), 422, "half.png", "corrupt")


def test_pixel_limit_is_checked_before_decoding(client: TestClient) -> None:
    response = post(client, png_header(6000, 5000), name="huge.png")
    assert_json_error(response, 422, "huge.png", "6000x5000", "25,000,000")
    # the uploader reads the limit as the server's setting, not as a Python keyword
    assert "raise the server's --max-pixels" in response.json()["error"]
    assert "max_pixels=" not in response.json()["error"]


def test_oversize_upload_is_413(localizer: Localizer, cat_bytes: bytes) -> None:
    small = TestClient(create_app(localizer, max_upload_bytes=100_000))
    assert_json_error(post(small, cat_bytes), 413, "0.1 MB")
    assert post(small, png_header(10, 10)).status_code == 422  # small files still get through


@pytest.mark.parametrize(
    ("request_kwargs", "status", "fragment"),
    [
        ({"files": {"image": ("a.png", b"x")}}, 422, "no 'file' field in the form (got 'image')"),
        ({"content": b"\x89PNG", "headers": {"content-type": "image/png"}}, 415, "multipart"),
        (
            {"content": b"--x--", "headers": {"content-type": "multipart/form-data"}},
            400,
            "boundary",
        ),
        ({"files": [("file", ("a.png", b"1")), ("file", ("b.png", b"2"))]}, 400, "more than one"),
        ({"files": {"file": ("a.png", b"x")}, "params": {"threshold": 2}}, 422, "threshold"),
        ({"files": {"file": ("a.png", b"x")}, "params": {"map_size": "big"}}, 422, "map_size"),
    ],
    ids=["wrong-field", "raw-body", "no-boundary", "two-files", "threshold", "map-size"],
)
def test_bad_requests_get_json_errors(
    client: TestClient, request_kwargs: dict[str, Any], status: int, fragment: str
) -> None:
    assert_json_error(client.post("/api/localize", **request_kwargs), status, fragment)


def test_unknown_paths_and_methods_are_json(client: TestClient) -> None:
    assert_json_error(client.get("/api/nothing"), 404)
    assert_json_error(client.get("/api/localize"), 405)
    assert_json_error(client.get("/static/pyproject.toml"), 404)
    assert_json_error(client.get("/api/examples/..%2F..%2Fpyproject.toml"), 404)
    assert_json_error(client.get("/api/examples/secret.png"), 404, "cat.png, coffee.jpg")


def test_unexpected_failures_are_a_500_without_details(tiny: Any, cat_bytes: bytes) -> None:
    class Exploding(Localizer):
        def explain(self, *args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("secret internal detail")

    broken = TestClient(create_app(Exploding(tiny)), raise_server_exceptions=False)
    response = post(broken, cat_bytes)
    assert_json_error(response, 500, "see the server log")
    assert "secret" not in response.text


def test_openapi_schema_documents_localize(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    operation = schema["paths"]["/api/localize"]["post"]
    assert operation["operationId"] == "localize"
    form = operation["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert form["required"] == ["file"]
    assert form["properties"]["file"]["format"] == "binary"
    assert {p["name"] for p in operation["parameters"]} == {"threshold", "map_size", "preview"}
    ok = operation["responses"]["200"]["content"]["application/json"]["schema"]
    assert ok["$ref"].endswith("/LocalizeBody")
    for status in ("413", "415", "422"):
        ref = operation["responses"][status]["content"]["application/json"]["schema"]["$ref"]
        assert ref.endswith("/ErrorBody")
    operations = {op["operationId"] for path in schema["paths"].values() for op in path.values()}
    assert {"info", "colormaps", "example", "localize"} <= operations


def test_page_static_files_and_headers(client: TestClient) -> None:
    page = client.get("/")
    assert page.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert page.headers["x-content-type-options"] == "nosniff"
    assert 'src="/static/app.js"' in page.text
    script = client.get("/static/app.js").text
    assert "innerHTML" not in script
    assert "/openapi.json" in script
    assert client.get("/static/style.css").headers["content-type"].startswith("text/css")


def test_info_examples_and_colormaps(client: TestClient, cat_bytes: bytes) -> None:
    info = client.get("/api/info").json()
    assert info["model"] == "efficientnet_lite0"
    assert info["max_upload_bytes"] == 20_000_000
    assert [e["name"] for e in info["examples"]] == ["cat.png", "coffee.jpg"]
    example = client.get(info["examples"][0]["url"])
    assert example.content == cat_bytes
    assert example.headers["content-type"] == "image/png"
    maps = client.get("/api/colormaps").json()
    jet = next(c for c in maps["colormaps"] if c["name"] == "jet")
    assert jet["lut"] == overlay.colormap_lut("jet").ravel().tolist()


def test_examples_ship_inside_the_package(
    localizer: Localizer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    cat_bytes: bytes,
    coffee_bytes: bytes,
) -> None:
    """`pip install 'gapcam[web]'` then `gapcam serve` from any folder: the example photos are
    package data (found with importlib.resources), not a checkout's or the current folder's."""
    monkeypatch.chdir(tmp_path)
    packaged = resources.files("gapcam.web") / "examples"
    assert str(default_examples_dir()) == str(packaged)
    assert "CC0" in packaged.joinpath("LICENSES.txt").read_text(encoding="utf-8")
    app = TestClient(create_app(localizer))
    assert [e["name"] for e in app.get("/api/info").json()["examples"]] == list(EXAMPLE_NAMES)
    assert app.get("/api/examples/cat.png").content == cat_bytes
    assert app.get("/api/examples/coffee.jpg").content == coffee_bytes
    # every shipped file is matched by the wheel's package-data globs
    tomllib = pytest.importorskip("tomllib")
    with (ROOT / "pyproject.toml").open("rb") as file:
        globs = tomllib.load(file)["tool"]["setuptools"]["package-data"]["gapcam.web"]
    for entry in packaged.iterdir():
        assert any(fnmatch.fnmatch(f"examples/{entry.name}", glob) for glob in globs), entry.name


def test_host_header_is_checked_when_asked(localizer: Localizer) -> None:
    guarded = TestClient(create_app(localizer, allowed_hosts=["127.0.0.1", "[::1]"]))
    assert guarded.get("/api/info", headers={"host": "127.0.0.1:8000"}).status_code == 200
    assert guarded.get("/api/info", headers={"host": "[::1]:8000"}).status_code == 200
    refused = guarded.get("/api/info", headers={"host": "evil.example"})
    assert_json_error(refused, 400, "'evil.example' is not allowed")


def test_serve_without_the_extra_names_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "uvicorn", None)
    assert cli.main(["serve"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "pip install 'gapcam[web]'" in err
    assert "uvicorn" in err


def test_serve_on_a_busy_port_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        assert cli.main(["serve", "--port", str(port)]) == 2
    assert f"--port {port}: cannot listen there" in capsys.readouterr().err


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_shapes_run(tmp_path_factory.mktemp("serve"))


def serve_localizer(*options: str) -> Localizer:
    """The Localizer `gapcam serve OPTIONS` builds."""
    args = cli.build_parser().parse_args(["serve", *options])
    return Localizer.from_options(localizer_options(args))


def test_serve_with_a_checkpoint_answers_with_its_class_names(
    run_folder: Path, cat_bytes: bytes
) -> None:
    client = TestClient(create_app(serve_localizer("--checkpoint", str(run_folder))))
    info = client.get("/api/info").json()
    assert info["model"] == "efficientnet_lite0+shapes-run"
    assert info["num_classes"] == 3
    response = post(client, cat_bytes)
    assert response.status_code == 200, response.text
    body = response.json()
    assert sorted(p["name"] for p in body["predictions"]) == SHAPES  # top-5 of 3 classes: all
    assert [m["name"] for m in body["maps"]] == [p["name"] for p in body["predictions"]]
    assert body["model"] == "efficientnet_lite0+shapes-run"


def test_serve_refuses_a_checkpoint_with_a_model(
    run_folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["serve", "--checkpoint", str(run_folder), "--model", "resnet50", "--port", "0"]
    assert cli.main(args) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1
    assert "--checkpoint and --model/--weights" in captured.err


def test_serve_view_options_reach_the_localizer(run_folder: Path, cat_bytes: bytes) -> None:
    localizer = serve_localizer(
        "--checkpoint", str(run_folder), "--preset", "fine", "--hflip", "--backend", "eager"
    )
    assert (localizer.input_size, localizer.hflip, localizer.scales) == (288, True, (1.0,))
    assert (localizer.backend_used[0], localizer.precision) == ("eager", "float32")
    client = TestClient(create_app(localizer))
    assert client.get("/api/info").json()["input_size"] == [288, 288]
    body = post(client, cat_bytes).json()
    assert body["maps"][0]["feature_size"] == [9, 9]  # 288 / 32: the forward pass used it
    best = serve_localizer("--preset", "best", "--input-size", "256", "--precision", "bfloat16")
    assert (best.input_size, best.hflip, best.precision) == (256, True, "bfloat16")
    assert best.gap_model.output_stride == 16  # Lite0's best: dilated, mirrored, at 288 unless told


# --- a real server on loopback ---------------------------------------------------------------


@pytest.fixture(scope="module")
def server(localizer: Localizer) -> Any:
    app = create_app(localizer, max_upload_bytes=2_000_000)
    with running(app) as url:
        yield url, app


def test_declared_oversize_is_refused_before_the_body(server: Any) -> None:
    url, _ = server
    port = int(url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(
            b"POST /api/localize HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: multipart/form-data; boundary=x\r\n"
            b"Content-Length: 900000000\r\n\r\n"
        )  # and no body at all: the answer must not wait for 900 MB
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            chunk = sock.recv(4096)
            if not chunk:
                break
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413")
    assert "2 MB" in json.loads(body)["error"]


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_load_concurrent_requests_are_all_right(
    server: Any, cat_bytes: bytes, coffee_bytes: bytes, tmp_path: Path
) -> None:
    url, app = server
    jobs = [("cat.png", cat_bytes, 200)] * 25 + [("coffee.jpg", coffee_bytes, 200)] * 25
    jobs += [("broken.png", cat_bytes[:4000], 422)] * 10
    barrier = threading.Barrier(len(jobs), timeout=60)

    def one(job: tuple[str, bytes, int]) -> tuple[str, int, httpx.Response, float]:
        name, data, status = job
        with httpx.Client(base_url=url, timeout=120) as http:
            barrier.wait()
            started = time.perf_counter()
            response = http.post("/api/localize", files={"file": (name, data)})
            return name, status, response, time.perf_counter() - started

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        answers = list(pool.map(one, jobs, timeout=200))
    wall = time.perf_counter() - started
    wrong = []
    for name, status, response, _ in answers:
        if response.status_code != status:
            wrong.append(f"{name}: HTTP {response.status_code} {response.text[:200]}")
        elif status == 200:
            top = response.json()["predictions"][0]["index"]
            if (name == "cat.png" and top not in CAT_CLASSES) or (
                name == "coffee.jpg" and top != ESPRESSO
            ):
                wrong.append(f"{name}: top class {top}")
        elif "corrupt" not in response.json()["error"]:
            wrong.append(f"{name}: {response.text[:200]}")
    latencies = sorted(a[3] for a in answers)
    report = {
        "requests": len(jobs),
        "concurrency": len(jobs),
        "wall_s": round(wall, 2),
        "p50_s": round(latencies[len(latencies) // 2], 2),
        "max_s": round(latencies[-1], 2),
        "wrong": wrong,
    }
    saved = tmp_path / "web-load-test.json"  # in pytest's tmp dir (it keeps the last 3 runs)
    saved.write_text(json.dumps(report, indent=2) + "\n")
    print(f"load test: {report} ({saved})")
    assert wrong == []
    with httpx.Client(base_url=url, timeout=30) as http:  # still up, still right
        assert http.get("/api/info").status_code == 200
        after = http.post("/api/localize", files={"file": ("cat.png", cat_bytes)})
        assert after.json()["predictions"][0]["index"] in CAT_CLASSES
    assert app.state.service.pending == 0


def test_too_many_uploads_in_flight_get_503(tiny: Any, cat_bytes: bytes) -> None:
    entered, release = threading.Event(), threading.Event()

    class Slow(Localizer):
        def explain(self, *args: Any, **kwargs: Any) -> Any:
            entered.set()
            release.wait(timeout=30)
            return super().explain(*args, **kwargs)

    app = create_app(Slow(tiny), max_pending=1)
    with running(app) as url, ThreadPoolExecutor(max_workers=1) as pool:
        first = pool.submit(
            httpx.post, f"{url}/api/localize", files={"file": ("a.png", cat_bytes)}, timeout=30
        )
        assert entered.wait(timeout=20)
        second = httpx.post(f"{url}/api/localize", files={"file": ("b.png", cat_bytes)}, timeout=30)
        release.set()
        assert_json_error(second, 503, "busy")
        assert second.headers["retry-after"] == "1"
        assert first.result(timeout=30).status_code == 200
