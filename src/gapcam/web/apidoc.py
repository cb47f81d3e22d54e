"""``/docs``: the API's operations as one plain HTML page, written from the OpenAPI schema.

FastAPI's own /docs (Swagger UI) loads its scripts and styles from a CDN, so it is blank offline
and needs a looser Content-Security-Policy; the fastapi package does not ship those files. This
page has no script at all: each operation with its parameters and answers, and a link to
``/openapi.json`` for tools. Every value taken from the schema is HTML-escaped.
"""

from __future__ import annotations

from html import escape
from typing import Any

HTTP_METHODS = ("get", "post", "put", "patch", "delete")


def page(schema: dict[str, Any]) -> str:
    """The HTML page for an OpenAPI ``schema`` (as ``FastAPI.openapi()`` returns it)."""
    info = schema.get("info", {})
    title = f"{info.get('title', 'API')} {info.get('version', '')}".strip()
    parts = [
        '<!doctype html>\n<html lang="en">\n<head>\n<meta charset="utf-8">',
        f"<title>{escape(title)}: API</title>\n</head>\n<body>",
        f"<h1>{escape(title)}: JSON API</h1>",
        f"<p>{escape(info.get('description', ''))}</p>",
        '<p>The machine-readable schema: <a href="/openapi.json">/openapi.json</a>. '
        'The page: <a href="/">/</a>.</p>',
    ]
    for path, operations in schema.get("paths", {}).items():
        for method in HTTP_METHODS:
            if method in operations:
                parts.append(_operation(method, path, operations[method]))
    parts.append("</body>\n</html>\n")
    return "\n".join(parts)


def _operation(method: str, path: str, operation: dict[str, Any]) -> str:
    lines = [
        f"<h2><code>{method.upper()} {escape(path)}</code></h2>",
        f"<p>{escape(operation.get('description') or operation.get('summary') or '')}</p>",
    ]
    parameters = operation.get("parameters", [])
    body = operation.get("requestBody", {}).get("content", {})
    if parameters or body:
        lines.append("<ul>")
        for parameter in parameters:
            lines.append(f"<li>{_parameter(parameter)}</li>")
        for media, content in body.items():
            for name, field in content.get("schema", {}).get("properties", {}).items():
                about = f"({media} field) {field.get('description', '')}".rstrip()
                lines.append(f"<li><code>{escape(name)}</code> {escape(about)}</li>")
        lines.append("</ul>")
    answers = ", ".join(
        f"{status} {answer.get('description', '')}"
        for status, answer in operation.get("responses", {}).items()
    )
    lines.append(f"<p>Answers: {escape(answers)}</p>")
    return "\n".join(lines)


def _parameter(parameter: dict[str, Any]) -> str:
    schema = parameter.get("schema", {})
    facts = [parameter.get("in", ""), schema.get("type", "")]
    if "minimum" in schema or "maximum" in schema:
        facts.append(f"{schema.get('minimum', '')}..{schema.get('maximum', '')}")
    if "default" in schema:
        facts.append(f"default {schema['default']}")
    about = parameter.get("description") or schema.get("description") or ""
    text = f" ({', '.join(str(f) for f in facts if f != '')}) {about}".rstrip()
    return f"<code>{escape(parameter.get('name', ''))}</code>{escape(text)}"
