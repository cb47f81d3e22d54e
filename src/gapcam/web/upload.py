"""Read one image upload (multipart/form-data) into memory, enforcing limits while reading.

Nothing touches the disk: the body is streamed through python-multipart's parser and only the
bytes of the one file field are kept. A declared Content-Length over the limit is refused before
any of the body is read; a body that grows past the limit is refused as soon as it does. The
client's file name is reduced to a short display label; it is never used as a path.
"""

from __future__ import annotations

import unicodedata
from collections.abc import AsyncIterator
from dataclasses import dataclass

import anyio

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
    timeout_s: float,
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
    if declared.isdigit() and int(declared) > limit:
        raise too_large(max_bytes)
    collector = _Collector(field, max_bytes)
    parser = MultipartParser(boundary, collector.callbacks())  # type: ignore[arg-type]
    received = 0
    try:
        with anyio.fail_after(timeout_s):
            async for chunk in stream:
                received += len(chunk)
                if received > limit:
                    raise too_large(max_bytes)
                parser.write(chunk)
    except TimeoutError as exc:
        raise UploadError(408, f"upload took longer than {timeout_s:g} s; try again") from exc
    except ValueError as exc:  # python-multipart's parse errors are ValueErrors
        raise UploadError(400, f"malformed multipart body ({exc})") from exc
    if collector.found is None:
        got = ", ".join(repr(n) for n in collector.others) or "no fields"
        ended = "" if collector.ended else " (the body ended early)"
        raise UploadError(
            422, f"no '{field}' field in the form (got {got}){ended}; send the image as '{field}'"
        )
    return collector.found
