"""uvicorn's HTTP/1.1 protocol (h11) with two guards the app cannot add itself.

uvicorn parses the request head before the app sees anything. Left alone it answers a head it
cannot parse (a bad or negative Content-Length, two Host headers, a request line or header that
is not HTTP, a head over ``MAX_HEAD_BYTES``) with a text/plain 400 and no security headers, and
it waits for a head however slowly it comes (its keep-alive timer restarts with every byte).
``GuardedH11Protocol`` answers those heads as the app answers errors, JSON ``{"error": ...}``
with the security headers (and h11's status: 431 for a head too large), and gives every request
head ``HEAD_TIMEOUT_S`` from the connection's start or the previous answer: a head still
incomplete then gets a JSON 408 and the connection is closed, and so is a connection still
sending the body of a request answered without reading it (a 404, a 405). Once the head is in,
the body of a request being served is the app's to pace (``upload.Pace``).

What stays outside gapcam's control: bytes that are not HTTP at all still get a 400 (now JSON),
a client that opens connections and sends nothing is closed after ``HEAD_TIMEOUT_S`` in silence,
and uvicorn logs one warning line per malformed request.
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from gapcam.console import safe_text
from gapcam.web.app import SECURITY_HEADERS

HEAD_TIMEOUT_S = 10.0
#: the longest request head (request line and headers) h11 buffers: its own default
MAX_HEAD_BYTES = 16 * 1024
REASONS = {400: b"Bad Request", 408: b"Request Timeout", 431: b"Request Header Fields Too Large"}


def error_head_and_body(status: int, message: str) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """The headers and JSON body of an error answer sent from here, outside the app."""
    body = json.dumps({"error": message}).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
        *SECURITY_HEADERS,
    ]
    return headers, body


class GuardedH11Protocol(H11Protocol):
    """``H11Protocol`` with JSON answers to malformed heads and a deadline for each head."""

    head_timeout_s = HEAD_TIMEOUT_S
    _head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        self._arm_head_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm_head_timer()  # the next head on this connection gets the same deadline

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        # uvicorn calls this while it handles h11's RemoteProtocolError: name what h11 saw
        error = sys.exc_info()[1]
        status, detail = 400, "the request line or a header is not valid HTTP/1.1"
        if isinstance(error, h11.RemoteProtocolError):
            status = error.error_status_hint if error.error_status_hint in REASONS else 400
            detail = safe_text(str(error).split(": bytearray(", 1)[0], 120)  # not raw bytes
        if status == 431:
            detail = f"the request head is over {MAX_HEAD_BYTES // 1024} KiB"
        headers, body = error_head_and_body(status, f"malformed HTTP request: {detail}")
        event = h11.Response(status_code=status, headers=headers, reason=REASONS[status])
        self.transport.write(self.conn.send(event) or b"")
        self.transport.write(self.conn.send(h11.Data(data=body)) or b"")
        self.transport.write(self.conn.send(h11.EndOfMessage()) or b"")
        self.transport.close()

    def _arm_head_timer(self) -> None:
        self._cancel_head_timer()
        if not self.transport.is_closing():
            self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing():
            return
        if self.conn.their_state is not h11.IDLE:
            if self.conn.our_state is h11.SEND_RESPONSE:
                return  # a request is being served: its body has its own pace (upload.Pace)
            self.transport.close()  # answered, and still sending a body nobody reads
            return
        if self.conn.trailing_data[0]:  # part of a head came: say why the answer is no
            headers, body = error_head_and_body(
                408, f"the request head did not arrive within {self.head_timeout_s:g} s"
            )
            lines = [b"HTTP/1.1 408 Request Timeout"] + [b"%s: %s" % pair for pair in headers]
            self.transport.write(b"\r\n".join(lines) + b"\r\n\r\n" + body)
        self.transport.close()
