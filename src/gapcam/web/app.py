"""The FastAPI application: one page, a JSON API, one shared Localizer.

    GET  /                      the page (static/index.html; app.js and style.css under /static/)
    GET  /api/info              model, limits, examples
    GET  /api/colormaps         colour lookup tables, so the page colours maps itself
    GET  /api/examples/{name}   the shipped example photos (a fixed allow-list, read at start)
    POST /api/localize          multipart field ``file`` -> predictions, CAMs, boxes
    GET  /openapi.json          the schema the page reads to find the endpoint and its field
    GET  /docs                  the same as a plain page (apidoc.py; no CDN, no script)

Every error is JSON ``{"error": "..."}`` with a 4xx status, or a 500 whose details are only logged.
Every answer, errors and the 500 included, carries the security headers (CSP and friends): the
``SecurityHeaders`` middleware wraps the whole application, Starlette's error handling inside it.
Model calls hold one lock: ``inference_state`` toggles shared module flags, so two forward passes
on one model must not overlap. Decoding and encoding run in a bounded pool of worker threads.

Uploads in flight are bounded twice, which bounds the memory they hold and keeps slow clients
from starving the rest. At most ``max_pending`` (64) are in flight in all, from the start of
their body to their answer (more get 503). The bodies of at most ``max_bodies_per_client`` (8)
uploads of one client address arrive at once; up to 64 more from that address wait for a turn
before any slot is taken or any of their body read (for at most ``Pace.total_s``; beyond that,
429), so a script posting 60 photos at once is served in turns. And a body that trickles in
(``upload.Pace``) is answered 408 and its connection closed after a 5 s grace. So an address
that opens many connections sending a byte now and then holds at most 8 of the 64 slots, each
for about 5 s at a time, and everyone else is served. (Behind a reverse proxy every client has
the proxy's address: give it a larger ``max_bodies_per_client``.)
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gapcam import __version__, images, overlay
from gapcam.errors import GapcamError, ImageError
from gapcam.localizer import Localizer
from gapcam.web import apidoc, payload, schemas
from gapcam.web.upload import Pace, UploadError, read_upload

if TYPE_CHECKING:
    from importlib.abc import Traversable

log = logging.getLogger("gapcam.web")

STATIC = Path(__file__).parent / "static"
PAGE_FILES = {"index.html": "text/html", "app.js": "text/javascript", "style.css": "text/css"}
EXAMPLE_NAMES = ("cat.png", "coffee.jpg")
EXAMPLE_TYPES = {".png": "image/png", ".jpg": "image/jpeg"}
COLORMAPS = ("jet", "turbo", "viridis", "inferno", "magma", "plasma", "cividis", "gray")
UPLOAD_FIELD = "file"
TOP_K = 5
DEFAULT_MAX_PIXELS = 25_000_000
#: uploads of one client address that may wait for a turn to send their body
MAX_WAITING_PER_CLIENT = 64
CSP = (
    "default-src 'self'; img-src 'self' data: blob:; script-src 'self'; style-src 'self'; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; "
    "form-action 'none'"
)
SECURITY_HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
]
ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": schemas.ErrorBody, "description": text}
    for code, text in {
        400: "malformed request",
        408: "upload too slow (under the minimum rate, stalled, or over the time limit)",
        413: "upload over the size limit",
        415: "not a multipart upload",
        422: "not an image, corrupt, over the pixel limit, or bad parameters",
        429: "too many uploads in flight from this client address; retry",
        503: "too many uploads in flight; retry",
    }.items()
}
UPLOAD_SCHEMA = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": [UPLOAD_FIELD],
                "properties": {
                    UPLOAD_FIELD: {
                        "type": "string",
                        "format": "binary",
                        "description": "the image (any format Pillow reads); decoded in memory",
                    }
                },
            }
        }
    },
}


def default_examples_dir() -> Traversable:
    """The example photos shipped inside the package (``gapcam/web/examples/``, in the wheel
    as package data), wherever the server is started from."""
    return resources.files("gapcam.web") / "examples"


@dataclass
class _Turns:
    """One client address's turns to send an upload body, and how many of its uploads are
    sending one or waiting to."""

    turns: anyio.Semaphore
    users: int = 0


class _Service:
    """The shared state: one Localizer, its lock, the worker pool and the limits."""

    def __init__(self, localizer: Localizer, **limits: Any) -> None:
        self.localizer = localizer
        self.max_upload_bytes: int = limits["max_upload_bytes"]
        self.max_pixels: int = limits["max_pixels"]
        self.max_pending: int = limits["max_pending"]
        self.max_bodies_per_client: int = limits["max_bodies_per_client"]
        self.pace: Pace = limits["pace"]
        self.lock = threading.Lock()
        self.workers = anyio.CapacityLimiter(limits["workers"])
        self.pending = 0  # these two are touched only on the event loop
        self.clients: dict[str, _Turns] = {}

    @asynccontextmanager
    async def slot(self, client: str) -> AsyncIterator[Callable[[], None]]:
        """One of the ``max_pending`` upload slots (else UploadError 503), taken in a turn of
        ``client`` (an address) to send a body: the bodies of at most ``max_bodies_per_client``
        uploads of one address arrive at once, up to ``MAX_WAITING_PER_CLIENT`` more wait for
        a turn for at most ``pace.total_s`` (else UploadError 429). Yields the function that
        ends the turn, to call once the body is in; the slot is held to the end."""
        mine = self.clients.setdefault(client, _Turns(anyio.Semaphore(self.max_bodies_per_client)))
        if mine.users >= self.max_bodies_per_client + MAX_WAITING_PER_CLIENT:
            raise UploadError(
                429,
                f"too many uploads from your address at once ({self.max_bodies_per_client} "
                f"sending and {MAX_WAITING_PER_CLIENT} waiting); retry shortly",
            )
        mine.users += 1
        acquired = left = False

        def end_turn() -> None:
            nonlocal left
            if not left:
                left = True
                if acquired:
                    mine.turns.release()
                mine.users -= 1
                if not mine.users:
                    del self.clients[client]

        try:
            with anyio.move_on_after(self.pace.total_s):
                await mine.turns.acquire()
                acquired = True
            if not acquired:
                raise UploadError(
                    429,
                    f"your address's other uploads held the server for {self.pace.total_s:g} s; "
                    "retry shortly",
                )
            if self.pending >= self.max_pending:
                raise UploadError(503, "server busy: too many uploads in progress; retry shortly")
            self.pending += 1
            try:
                yield end_turn
            finally:
                self.pending -= 1
        finally:
            end_turn()

    def localize(self, upload: Any, query: dict[str, Any]) -> dict[str, Any]:
        started = time.perf_counter()
        loaded = images.load_image(upload.data, name=upload.name, max_pixels=self.max_pixels)
        with self.lock:
            result = self.localizer.explain([loaded], top_k=TOP_K, predictions=TOP_K)[0]
        body = payload.build(
            result,
            threshold=query["threshold"],
            min_area=self.localizer.min_area,
            map_side=query["map_size"],
            preview_side=query["preview"],
        )
        body["elapsed_ms"] = round((time.perf_counter() - started) * 1000.0, 1)
        return body


def create_app(
    localizer: Localizer,
    *,
    max_upload_bytes: int = 20_000_000,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    examples_dir: Path | Traversable | None = None,
    allowed_hosts: list[str] | None = None,
    workers: int = 2,
    max_pending: int = 64,
    max_bodies_per_client: int = 8,
    pace: Pace | None = None,
) -> FastAPI:
    """The web application around one shared ``localizer``.

    ``allowed_hosts``: Host header values to accept (None: any); ``gapcam serve`` passes the
    loopback names when it binds to loopback, which stops DNS-rebinding pages from using it.
    ``pace``: how slowly an upload body may arrive (default ``Pace()``: see upload.py).
    """
    counts = (max_upload_bytes, max_pixels, workers, max_pending, max_bodies_per_client)
    if min(counts) < 1:
        raise GapcamError(
            "create_app: max_upload_bytes, max_pixels, workers, max_pending and "
            "max_bodies_per_client must be positive"
        )
    service = _Service(
        localizer,
        max_upload_bytes=max_upload_bytes,
        max_pixels=max_pixels,
        max_pending=max_pending,
        max_bodies_per_client=max_bodies_per_client,
        pace=pace or Pace(),
        workers=workers,
    )
    app = _App(
        title="gapcam",
        version=__version__,
        description="Class activation maps and boxes for one uploaded image. Errors are "
        '`{"error": "..."}` with a 4xx status.',
        docs_url=None,
        redoc_url=None,
    )
    app.state.service = service
    app.state.allowed_hosts = allowed_hosts
    _add_error_handlers(app)
    _add_page_routes(app, _read_examples(examples_dir or default_examples_dir()))
    _add_api_routes(app, service)
    return app


class _App(FastAPI):
    """FastAPI with ``SecurityHeaders`` outside all of its middleware, Starlette's handling of
    unexpected errors included, so that no answer of the app goes out without the headers."""

    def build_middleware_stack(self) -> ASGIApp:
        return SecurityHeaders(super().build_middleware_stack(), self.state.allowed_hosts)


def _read_examples(folder: Path | Traversable) -> dict[str, bytes]:
    found = {}
    for name in EXAMPLE_NAMES:
        path = folder / name
        if path.is_file():
            found[name] = path.read_bytes()
    return found


def _add_page_routes(app: FastAPI, examples: dict[str, bytes]) -> None:
    page = {name: (STATIC / name).read_bytes() for name in PAGE_FILES}

    def static(name: str) -> Response:
        return Response(
            page[name], media_type=PAGE_FILES[name], headers={"Cache-Control": "no-cache"}
        )

    @app.get("/", include_in_schema=False)
    def index() -> Response:
        return static("index.html")

    @app.get("/docs", include_in_schema=False)
    def docs() -> Response:
        return Response(
            apidoc.page(app.openapi()),
            media_type="text/html",
            headers={"Cache-Control": "no-cache"},
        )

    @app.get("/static/{name}", include_in_schema=False)
    def static_file(name: str) -> Response:
        if name not in page or name == "index.html":
            raise HTTPException(404, f"no static file {name[:60]!r}")
        return static(name)

    @app.get(
        "/api/examples/{name}",
        operation_id="example",
        responses={404: {"model": schemas.ErrorBody, "description": "not an example"}},
    )
    def example(name: str) -> Response:
        """One of the shipped example photos (a fixed list; see /api/info)."""
        if name not in examples:
            known = ", ".join(examples) or "none in this installation"
            raise HTTPException(404, f"unknown example {name[:60]!r}; available: {known}")
        return Response(examples[name], media_type=EXAMPLE_TYPES[Path(name).suffix])

    app.state.examples = examples


def _add_api_routes(app: FastAPI, service: _Service) -> None:
    model = service.localizer.gap_model

    @app.get("/api/info", operation_id="info", response_model=schemas.InfoBody)
    def info() -> dict[str, Any]:
        """The model, the limits and the example photos."""
        return {
            "version": __version__,
            "model": model.name,
            "num_classes": model.num_classes,
            "input_size": list(service.localizer.preprocess.size),  # with --input-size/--preset
            "threshold": service.localizer.threshold,
            "max_upload_bytes": service.max_upload_bytes,
            "max_pixels": service.max_pixels,
            "examples": [
                {"name": name, "url": f"/api/examples/{name}"} for name in app.state.examples
            ],
        }

    luts = {
        "default": "jet",
        "colormaps": [
            {"name": name, "lut": overlay.colormap_lut(name).ravel().tolist()} for name in COLORMAPS
        ],
    }

    @app.get("/api/colormaps", operation_id="colormaps", response_model=schemas.ColormapsBody)
    def colormaps() -> dict[str, Any]:
        """256-entry RGB lookup tables of the colormaps the page offers."""
        return luts

    @app.post(
        "/api/localize",
        operation_id="localize",
        response_model=schemas.LocalizeBody,
        responses=ERRORS,
        openapi_extra={"requestBody": UPLOAD_SCHEMA},
    )
    async def localize(
        request: Request,
        threshold: float = Query(
            service.localizer.threshold, ge=0.0, le=1.0, description="box threshold"
        ),
        map_size: int = Query(256, ge=8, le=1024, description="max side of the map PNGs"),
        preview: int = Query(
            0, ge=0, le=2048, description="max side of a JPEG preview of the image; 0: none"
        ),
    ) -> dict[str, Any]:
        """Top-5 classes of one image with the CAM and boxes of each, from one forward pass."""
        client = request.client.host if request.client else "unknown"
        async with service.slot(client) as end_turn:
            try:
                upload = await read_upload(
                    dict(request.headers),
                    request.stream(),
                    field=UPLOAD_FIELD,
                    max_bytes=service.max_upload_bytes,
                    pace=service.pace,
                )
            except ClientDisconnect as exc:
                raise UploadError(400, "the client disconnected during the upload") from exc
            end_turn()  # the body is in: the address's next upload may send its own
            query = {"threshold": threshold, "map_size": map_size, "preview": preview}
            return await anyio.to_thread.run_sync(
                service.localize, upload, query, limiter=service.workers
            )


def for_uploader(message: str) -> str:
    """A library message in the words of someone who uploads: the limits it names as keywords
    (``max_pixels=``) are the server's settings (``gapcam serve --max-pixels``)."""
    return message.replace("max_pixels=", "the server's --max-pixels")


def _error(status: int, message: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(UploadError)
    async def upload_error(request: Request, exc: UploadError) -> JSONResponse:
        headers = {"Retry-After": "1"} if exc.status in (429, 503) else None
        if exc.status in (408, 413):
            headers = {"Connection": "close"}  # the rest of the body is not read
        return _error(exc.status, exc.message, headers)

    @app.exception_handler(GapcamError)
    async def gapcam_error(request: Request, exc: GapcamError) -> JSONResponse:
        if isinstance(exc, ImageError):
            return _error(422, for_uploader(str(exc)))
        log.error("%s %s failed: %s", request.method, request.url.path, exc)
        return _error(500, str(exc))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail), exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for item in exc.errors():
            where = ".".join(str(p) for p in item.get("loc", ())[1:]) or "request"
            parts.append(f"{where}: {item.get('msg', 'invalid')} (got {item.get('input')!r})")
        return _error(422, "; ".join(parts)[:500])

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        return _error(500, "internal error while handling the request; see the server log")


class SecurityHeaders:
    """Pure ASGI middleware around the whole app: CSP and friends on every answer, a JSON 400
    for a Host header outside ``allowed_hosts`` (when given), and a JSON 500 should anything
    inside fail without answering."""

    def __init__(self, app: ASGIApp, allowed_hosts: list[str] | None = None) -> None:
        self.app = app
        self.allowed_hosts = set(allowed_hosts or ())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = complete = False

        async def send_with_headers(message: Message) -> None:
            nonlocal started, complete
            if message["type"] == "http.response.start":
                started = True
                message["headers"] = [*message.get("headers", []), *SECURITY_HEADERS]
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                complete = True
            await send(message)

        if self.allowed_hosts:
            host = dict(scope["headers"]).get(b"host", b"").decode("latin-1")
            name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
            if name.lower() not in self.allowed_hosts:
                shown = host[:60] or "none"
                message = (
                    f"Host {shown!r} is not allowed here; open the address `gapcam serve` printed"
                )
                await _error(400, message)(scope, receive, send_with_headers)
                return
        try:
            await self.app(scope, receive, send_with_headers)
        except Exception as exc:
            # Starlette's ServerErrorMiddleware has answered through `unexpected` (which logged
            # the traceback) and re-raised for the server to log it again: once is enough
            if complete:
                return
            if started:
                raise  # half an answer is out: the server closes the connection
            log.error("%s %s failed", scope.get("method"), scope.get("path"), exc_info=exc)
            response = _error(500, "internal error while handling the request; see the server log")
            await response(scope, receive, send_with_headers)
