"""The FastAPI application: one page, a JSON API, one shared Localizer.

    GET  /                      the page (static/index.html; app.js and style.css under /static/)
    GET  /api/info              model, limits, examples
    GET  /api/colormaps         colour lookup tables, so the page colours maps itself
    GET  /api/examples/{name}   the shipped example photos (a fixed allow-list, read at start)
    POST /api/localize          multipart field ``file`` -> predictions, CAMs, boxes
    GET  /openapi.json, /docs   the schema the page reads to find the endpoint and its field

Every error is JSON ``{"error": "..."}`` with a 4xx status, or a 500 whose details are only logged.
Model calls hold one lock: ``inference_state`` toggles shared module flags, so two forward passes
on one model must not overlap. Decoding and encoding run in a bounded pool of worker threads, and
at most ``max_pending`` uploads are in flight (more get 503), which bounds the memory they hold.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
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
from gapcam.web import payload, schemas
from gapcam.web.upload import UploadError, read_upload

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
CSP = (
    "default-src 'self'; img-src 'self' data: blob:; script-src 'self'; style-src 'self'; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; "
    "form-action 'none'"
)
ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": schemas.ErrorBody, "description": text}
    for code, text in {
        400: "malformed request",
        408: "upload too slow",
        413: "upload over the size limit",
        415: "not a multipart upload",
        422: "not an image, corrupt, over the pixel limit, or bad parameters",
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


class _Service:
    """The shared state: one Localizer, its lock, the worker pool and the limits."""

    def __init__(self, localizer: Localizer, **limits: Any) -> None:
        self.localizer = localizer
        self.max_upload_bytes: int = limits["max_upload_bytes"]
        self.max_pixels: int = limits["max_pixels"]
        self.max_pending: int = limits["max_pending"]
        self.read_timeout: float = limits["read_timeout"]
        self.lock = threading.Lock()
        self.workers = anyio.CapacityLimiter(limits["workers"])
        self.pending = 0  # touched only on the event loop

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
    read_timeout: float = 60.0,
) -> FastAPI:
    """The web application around one shared ``localizer``.

    ``allowed_hosts``: Host header values to accept (None: any); ``gapcam serve`` passes the
    loopback names when it binds to loopback, which stops DNS-rebinding pages from using it.
    """
    if max_upload_bytes < 1 or max_pixels < 1 or workers < 1 or max_pending < 1:
        raise GapcamError("create_app: limits, workers and max_pending must be positive")
    service = _Service(
        localizer,
        max_upload_bytes=max_upload_bytes,
        max_pixels=max_pixels,
        max_pending=max_pending,
        read_timeout=read_timeout,
        workers=workers,
    )
    app = FastAPI(
        title="gapcam",
        version=__version__,
        description="Class activation maps and boxes for one uploaded image. Errors are "
        '`{"error": "..."}` with a 4xx status.',
        redoc_url=None,
    )
    app.state.service = service
    _add_error_handlers(app)
    _add_page_routes(app, _read_examples(examples_dir or default_examples_dir()))
    _add_api_routes(app, service)
    app.add_middleware(SecurityHeaders, allowed_hosts=allowed_hosts)
    return app


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
        if service.pending >= service.max_pending:
            raise UploadError(503, "server busy: too many uploads in progress; retry shortly")
        service.pending += 1
        try:
            try:
                upload = await read_upload(
                    dict(request.headers),
                    request.stream(),
                    field=UPLOAD_FIELD,
                    max_bytes=service.max_upload_bytes,
                    timeout_s=service.read_timeout,
                )
            except ClientDisconnect as exc:
                raise UploadError(400, "the client disconnected during the upload") from exc
            query = {"threshold": threshold, "map_size": map_size, "preview": preview}
            return await anyio.to_thread.run_sync(
                service.localize, upload, query, limiter=service.workers
            )
        finally:
            service.pending -= 1


def _error(status: int, message: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(UploadError)
    async def upload_error(request: Request, exc: UploadError) -> JSONResponse:
        headers = {"Retry-After": "1"} if exc.status == 503 else None
        if exc.status == 413:
            headers = {"Connection": "close"}  # the rest of the body is not read
        return _error(exc.status, exc.message, headers)

    @app.exception_handler(GapcamError)
    async def gapcam_error(request: Request, exc: GapcamError) -> JSONResponse:
        if isinstance(exc, ImageError):
            return _error(422, str(exc))
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
    """Pure ASGI middleware: CSP and friends on every answer (the /docs page keeps its own),
    and a JSON 400 for a Host header outside ``allowed_hosts`` (when given)."""

    def __init__(self, app: ASGIApp, allowed_hosts: list[str] | None = None) -> None:
        self.app = app
        self.allowed_hosts = set(allowed_hosts or ())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        strict = not scope["path"].startswith("/docs")
        if self.allowed_hosts:
            host = dict(scope["headers"]).get(b"host", b"").decode("latin-1")
            name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
            if name not in self.allowed_hosts:
                shown = host[:60] or "none"
                await self.app_error(scope, receive, send, f"Host {shown!r} is not allowed here")
                return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers.append((b"x-content-type-options", b"nosniff"))
                headers.append((b"referrer-policy", b"no-referrer"))
                headers.append((b"x-frame-options", b"DENY"))
                if strict:
                    headers.append((b"content-security-policy", CSP.encode()))
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, send_with_headers)

    async def app_error(self, scope: Scope, receive: Receive, send: Send, message: str) -> None:
        response = _error(400, f"{message}; open the address `gapcam serve` printed")
        await response(scope, receive, send)
