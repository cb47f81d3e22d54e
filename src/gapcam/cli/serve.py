"""``gapcam serve``: build the Localizer and the app, bind, run uvicorn."""

from __future__ import annotations

import argparse
import math
import sys
from typing import Any

from gapcam.cli import options
from gapcam.console import safe_text
from gapcam.errors import GapcamError

#: uploads are held in memory while they are decoded: a larger limit is a mistake, not a setting
MAX_UPLOAD_MB = 1000.0

EXAMPLES = """examples:
  gapcam serve
  gapcam serve --port 8080 --model resnet50
  gapcam serve --checkpoint shapes-run/ --preset fine
  gapcam serve --host 0.0.0.0   # reachable from other machines: explicit only
"""


def add(commands: Any) -> None:
    p = commands.add_parser(
        "serve",
        help="a web page (and JSON API) to explore CAMs; needs gapcam[web]",
        description="Serve one page: upload an image, see the top-5 classes, switch between "
        "their CAMs, move the opacity and box-threshold sliders, download the overlay and JSON. "
        "The same features are a JSON API (POST /api/localize, schema at /openapi.json).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EXAMPLES,
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    p.add_argument("--port", type=int, default=8000, help="port, 0 = any free (default: 8000)")
    options.add_model(p)
    options.add_views(p)
    options.add_backend(p, "eager")
    options.add_precision(p)
    p.add_argument(
        "--max-upload-mb",
        type=float,
        default=20.0,
        help=f"upload size limit, at most {MAX_UPLOAD_MB:g} (default: 20)",
    )
    p.add_argument(
        "--max-pixels",
        type=options.positive,
        default=25_000_000,
        help="refuse images with more pixels, before decoding (default: 25,000,000)",
    )
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """The body of ``gapcam serve``; returns the exit code."""
    from gapcam.web.serve import (
        bind,
        check_port,
        is_loopback,
        loopback_hosts,
        missing_extra,
        uvicorn_server,
    )

    problem = missing_extra()
    if problem:
        print(f"gapcam: error: {problem}", file=sys.stderr)
        return 2
    from gapcam.localizer import Localizer
    from gapcam.web.app import create_app

    max_upload_bytes = upload_bytes(args.max_upload_mb)
    check_port(args.port)
    # bad --checkpoint/--model/--preset combinations stop here, before the port is taken
    localizer = Localizer.from_options(options.localizer_options(args))
    sock = bind(args.host, args.port)
    try:
        host, port = sock.getsockname()[:2]
        loopback = is_loopback(host)  # what was bound, whatever name --host gave
        app = create_app(
            localizer,
            max_upload_bytes=max_upload_bytes,
            max_pixels=args.max_pixels,
            allowed_hosts=loopback_hosts(host) if loopback else None,
        )
        shown = f"[{host}]" if ":" in host else host
        print(
            f"gapcam: serving {localizer.gap_model.name} on http://{shown}:{port}/ (Ctrl+C stops)"
        )
        if note := localizer.backend_used[1]:
            print(f"gapcam: note: {options.flag_message(note, args.flags)}", file=sys.stderr)
        if not loopback:
            print(
                f"gapcam: warning: --host {safe_text(args.host, 80)} accepts connections from "
                "other machines; anyone who can reach it can use this server",
                file=sys.stderr,
            )
        uvicorn_server(app).run(sockets=[sock])
    finally:
        sock.close()
    return 0


def upload_bytes(megabytes: float) -> int:
    """``--max-upload-mb`` in bytes; GapcamError unless it is a size from 1 byte to the cap."""
    if not (math.isfinite(megabytes) and 1e-6 <= megabytes <= MAX_UPLOAD_MB):
        raise GapcamError(
            f"--max-upload-mb {megabytes:g}: must be a size in MB from 0.000001 (one byte) to "
            f"{MAX_UPLOAD_MB:g}; uploads are held in memory while they are decoded"
        )
    return round(megabytes * 1_000_000)
