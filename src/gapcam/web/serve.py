"""Serving the app: bind a socket, run uvicorn (``gapcam serve`` is ``gapcam.cli.serve``).

Also ``running(app)``: the same server on a free loopback port in a background thread, for tests
and notebooks. The socket is bound here, before uvicorn starts, so that a busy port is a clear
one-line error instead of a log message from deep inside uvicorn.

uvicorn runs with ``protocol.GuardedH11Protocol`` (JSON answers to malformed request heads, a
deadline for each head), heads of at most 16 KiB, and idle keep-alive connections closed after
5 s. It sets no ``limit_concurrency``: uvicorn counts idle and half-open connections against it
and answers everyone else 503, which would let a client that opens connections starve the rest;
the app bounds uploads itself (per client and in all, ``app.py``).
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import import_module
from typing import Any

from gapcam.console import safe_text
from gapcam.errors import GapcamError
from gapcam.web import REQUIRED_MODULES

KEEP_ALIVE_S = 5


def missing_extra() -> str | None:
    """None when the web extra is installed, else a one-line message naming it."""
    missing = []
    for module, distribution in REQUIRED_MODULES:
        try:
            import_module(module)
        except ImportError:
            missing.append(distribution)
    if not missing:
        return None
    return (
        f"gapcam serve needs the web extra (missing: {', '.join(missing)}); "
        "install it with: pip install 'gapcam[web]'"
    )


def is_loopback(address: str) -> bool:
    """Whether ``address`` (an IP, as ``getsockname`` gives it) is a loopback address: any of
    127.0.0.0/8, ::1, or one of those mapped into IPv6 (::ffff:127.0.0.2)."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    mapped = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None
    return (mapped or ip).is_loopback


def loopback_hosts(address: str) -> list[str]:
    """The Host header names a server bound to loopback ``address`` accepts (port aside)."""
    shown = f"[{address}]" if ":" in address else address
    return sorted({"127.0.0.1", "localhost", "[::1]", shown})


def check_port(port: int) -> None:
    if not 0 <= port <= 65535:
        raise GapcamError(f"--port {port}: must be from 0 to 65535 (0 picks a free one)")


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0: a free one); GapcamError if it fails."""
    check_port(port)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise GapcamError(
            f"--host {safe_text(host, 80)}: cannot resolve it ({exc.strerror})"
        ) from exc
    except (UnicodeError, ValueError) as exc:  # e.g. a name label over 63 characters
        raise GapcamError(f"--host {safe_text(host, 80)}: not a valid host name ({exc})") from exc
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise GapcamError(
            f"--host {safe_text(host, 80)} --port {port}: cannot listen there ({exc.strerror}); "
            "choose another --port (0 picks a free one)"
        ) from exc
    sock.set_inheritable(True)
    return sock


def uvicorn_server(app: Any, log_level: str = "warning") -> Any:
    import uvicorn

    from gapcam.web.protocol import MAX_HEAD_BYTES, GuardedH11Protocol

    # python-multipart logs a warning for each malformed body; the client's 400 says it already
    logging.getLogger("python_multipart").setLevel(logging.ERROR)
    config = uvicorn.Config(
        app,
        http=GuardedH11Protocol,
        h11_max_incomplete_event_size=MAX_HEAD_BYTES,
        timeout_keep_alive=KEEP_ALIVE_S,
        log_level=log_level,
        access_log=False,
    )
    return uvicorn.Server(config)


@contextmanager
def running(app: Any, host: str = "127.0.0.1", start_timeout: float = 30.0) -> Iterator[str]:
    """Serve ``app`` on a free port of ``host`` in a thread; yields the base URL."""
    sock = bind(host, 0)
    server = uvicorn_server(app)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + start_timeout
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise GapcamError(f"the test server did not start within {start_timeout:g} s")
            time.sleep(0.02)
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
