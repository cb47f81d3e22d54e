"""Serving the app: bind a socket, run uvicorn (``gapcam serve`` is ``gapcam.cli.serve``).

Also ``running(app)``: the same server on a free loopback port in a background thread, for tests
and notebooks. The socket is bound here, before uvicorn starts, so that a busy port is a clear
one-line error instead of a log message from deep inside uvicorn.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import import_module
from typing import Any

from gapcam.errors import GapcamError
from gapcam.web import REQUIRED_MODULES

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


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


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0: a free one); GapcamError if it fails."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise GapcamError(f"--host {host}: cannot resolve it ({exc.strerror})") from exc
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise GapcamError(
            f"--host {host} --port {port}: cannot listen there ({exc.strerror}); "
            "choose another --port (0 picks a free one)"
        ) from exc
    sock.set_inheritable(True)
    return sock


def uvicorn_server(app: Any, log_level: str = "warning") -> Any:
    import uvicorn

    config = uvicorn.Config(app, log_level=log_level, timeout_keep_alive=5, access_log=False)
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
