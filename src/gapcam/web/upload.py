"""Read one image upload (multipart/form-data) into memory, enforcing limits while reading.

Nothing touches the disk: the body is streamed through python-multipart's parser and only the
bytes of the one file field are kept. A declared Content-Length over the limit is refused before
any of the body is read; a body that grows past the limit is refused as soon as it does. The
client's file name is reduced to a short display label; it is never used as a path.

A slow body cannot hold its upload slot for long (``Pace``): after a short grace the body must
keep an average of at least ``min_rate`` bytes a second since its start, no gap between two
pieces may last longer than ``idle_s``, and the whole body must arrive within ``total_s``. A body
that misses any of these is answered 408 and its connection closed.
"""

from __future__ import annotations

import time
import unicodedata
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass

import anyio

from gapcam.console import safe_text
from gapcam.errors import GapcamError

try:
    from python_multipart.multipart import MultipartParser, parse_options_header
except ImportError:  # python-multipart < 0.0.13 ships the module as ``multipart``
    from multipart.multipart import (  # type: ignore[no-redef]
        MultipartParser,
        parse_options_header,
    )

#: Room for the multipart framing (boundaries, part headers, small extra fields).
FRAMING_BYTES = 64 * 1024
MAX_PARTS = 8
MAX_FIELD_BYTES = 4096
MAX_NAME_CHARS = 120


class UploadError(Exception):
    """A request whose body cannot be accepted; carries the HTTP status to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class Pace:
    """How slowly a body may arrive: ``grace_s`` seconds free, then at least ``min_rate`` bytes
    a second on average since the start; never a gap over ``idle_s``; all of it in ``total_s``.

    The defaults drop a trickling body after 5 s; 16 KB/s is 128 kbit/s, which the slowest
    mobile links still reach. The 60 s for the whole body is what it was before the rate: a
    20 MB upload needs about 333 KB/s, a 3 MB photo 50 KB/s."""

    grace_s: float = 5.0
    min_rate: float = 16_000.0
    idle_s: float = 10.0
    total_s: float = 60.0

    def __post_init__(self) -> None:
        if not all(0 < value < float("inf") for value in vars(self).values()):
            raise GapcamError(f"{self}: every limit must be positive and finite")

    def deadline(self, started: float, received: int, last: float) -> tuple[float, str]:
        """The monotonic time by which the next piece must arrive, and why it is then."""
        limits = [
            (started + self.total_s, f"the upload took longer than {self.total_s:g} s"),
            (last + self.idle_s, f"the upload stalled: no data for {self.idle_s:g} s"),
            (
                started + self.grace_s + received / self.min_rate,
                f"the upload is too slow: under {self.min_rate / 1000:g} KB/s",
            ),
        ]
        return min(limits)


@dataclass(frozen=True)
class Upload:
    name: str
    content_type: str
    data: bytes


def display_name(raw: str | None) -> str:
    """A safe label for a client file name: last path component, no control characters."""
    text = (raw or "").replace("\\", "/").rsplit("/", 1)[-1]
    text = "".join(ch for ch in text if unicodedata.category(ch)[0] != "C").strip()
    if len(text) > MAX_NAME_CHARS:
        text = text[: MAX_NAME_CHARS - 1] + "…"
    return text or "upload"


def too_large(max_bytes: int) -> UploadError:
    return UploadError(
        413,
        f"upload is larger than the limit of {_megabytes(max_bytes)}; "
        "send a smaller image or restart the server with a larger --max-upload-mb",
    )


def _megabytes(count: int) -> str:
    return f"{count / 1_000_000:g} MB"


class _Collector:
    """python-multipart callbacks that keep only the wanted field, within limits."""

    def __init__(self, field: str, max_bytes: int) -> None:
        self.field = field
        self.max_bytes = max_bytes
        self.parts = 0
        self.others: list[str] = []
        self.found: Upload | None = None
        self.ended = False
        self._header_name = b""
        self._header_value = b""
        self._headers: dict[bytes, bytes] = {}
        self._wanted = False
        self._size = 0
        self._data = bytearray()

    def callbacks(self) -> dict[str, object]:
        return {
            "on_part_begin": self.on_part_begin,
            "on_header_field": self.on_header_field,
            "on_header_value": self.on_header_value,
            "on_header_end": self.on_header_end,
            "on_headers_finished": self.on_headers_finished,
            "on_part_data": self.on_part_data,
            "on_part_end": self.on_part_end,
            "on_end": self.on_end,
        }

    def on_part_begin(self) -> None:
        self.parts += 1
        if self.parts > MAX_PARTS:
            raise UploadError(400, f"too many form fields (more than {MAX_PARTS})")
        self._headers, self._wanted, self._size = {}, False, 0
        self._data = bytearray()

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def on_header_end(self) -> None:
        if len(self._header_value) > MAX_FIELD_BYTES:
            raise UploadError(400, "a multipart header is too long")
        self._headers[self._header_name.lower()] = self._header_value
        self._header_name, self._header_value = b"", b""

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        name = options.get(b"name", b"").decode("utf-8", "replace")
        if name == self.field:
            if self.found is not None:
                raise UploadError(400, f"more than one '{self.field}' field; send one image")
            self._wanted = True
        else:
            self.others.append(display_name(name)[:40])

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        self._size += end - start
        if self._wanted:
            if self._size > self.max_bytes:
                raise too_large(self.max_bytes)
            self._data += data[start:end]
        elif self._size > MAX_FIELD_BYTES:
            raise UploadError(400, f"form field is too large; send the image as '{self.field}'")

    def on_part_end(self) -> None:
        if self._wanted:
            _, options = parse_options_header(self._headers.get(b"content-disposition", b""))
            raw_name = options.get(b"filename", b"").decode("utf-8", "replace")
            content_type = self._headers.get(b"content-type", b"").decode("latin-1")
            self.found = Upload(display_name(raw_name), content_type[:100], bytes(self._data))
            self._wanted, self._data = False, bytearray()

    def on_end(self) -> None:
        self.ended = True


async def read_upload(
    headers: dict[str, str],
    stream: AsyncIterator[bytes],
    *,
    field: str,
    max_bytes: int,
    pace: Pace,
) -> Upload:
    """The file sent as multipart field ``field``; raises ``UploadError`` (with a status)."""
    kind, params = parse_options_header(headers.get("content-type", ""))
    if kind != b"multipart/form-data":
        shown = kind.decode("latin-1")[:60] or "none"
        raise UploadError(
            415,
            f"Content-Type {shown!r} is not multipart/form-data; send the image as the form "
            f"field '{field}' (e.g. curl -F {field}=@photo.jpg URL)",
        )
    boundary = params.get(b"boundary")
    if not boundary:
        raise UploadError(400, "multipart/form-data without a boundary parameter")
    limit = max_bytes + FRAMING_BYTES
    declared = headers.get("content-length", "")
    if declared.isascii() and declared.isdigit() and (len(declared) > 18 or int(declared) > limit):
        raise too_large(max_bytes)
    collector = _Collector(field, max_bytes)
    received = 0
    try:
        parser = MultipartParser(boundary, collector.callbacks())  # type: ignore[arg-type]
        async with aclosing(_paced(stream, pace)) as pieces:
            async for chunk in pieces:
                received += len(chunk)
                if received > limit:
                    raise too_large(max_bytes)
                parser.write(chunk)
    except ValueError as exc:  # python-multipart's errors (FormParserError) are ValueErrors
        raise UploadError(400, f"malformed multipart body ({safe_text(exc, 120)})") from exc
    if collector.found is None:
        got = ", ".join(repr(n) for n in collector.others) or "no fields"
        ended = "" if collector.ended else " (the body ended early)"
        raise UploadError(
            422, f"no '{field}' field in the form (got {got}){ended}; send the image as '{field}'"
        )
    return collector.found


async def _paced(stream: AsyncIterable[bytes], pace: Pace) -> AsyncGenerator[bytes, None]:
    """The pieces of ``stream`` as they come, or UploadError 408 when one comes too late."""
    pieces = stream.__aiter__()
    started = last = time.monotonic()
    received = 0
    while True:
        deadline, reason = pace.deadline(started, received, last)
        with anyio.move_on_after(deadline - time.monotonic()) as scope:
            try:
                chunk = await pieces.__anext__()
            except StopAsyncIteration:
                return
        if scope.cancelled_caught:
            raise UploadError(408, f"{reason}; send the image again on a faster connection")
        last = time.monotonic()
        received += len(chunk)
        yield chunk
