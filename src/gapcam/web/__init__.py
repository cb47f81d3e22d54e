"""The web front end of gapcam (``gapcam serve``): one static page and a JSON API.

Needs the ``web`` extra (``pip install 'gapcam[web]'``). Importing this package imports nothing
heavy; ``gapcam.web.app.create_app`` builds the FastAPI application and ``gapcam.web.serve``
runs it. Modules:

    app.py      create_app: routes, error handlers, security headers, upload slots per client
    upload.py   reads one multipart upload into memory, enforcing its size limit and pace
    payload.py  a Result -> the JSON answer (maps as small grayscale PNG data URLs)
    schemas.py  the pydantic models that document the API in its OpenAPI schema
    apidoc.py   the /docs page: the OpenAPI schema as plain HTML, no CDN, no script
    serve.py    binds the socket and runs uvicorn (``gapcam serve``), or a background server
    protocol.py uvicorn's HTTP protocol with a deadline per request head and JSON protocol errors
    static/     index.html, app.js, style.css: plain files, no build step
"""

from __future__ import annotations

#: The third-party modules the web extra provides, as (import name, distribution name).
REQUIRED_MODULES = (
    ("fastapi", "fastapi"),
    ("uvicorn", "uvicorn"),
    ("python_multipart", "python-multipart"),
)
