"""Which published path template a request path falls under (for 405 Allow and HTTP metrics). Below both
errors and openapi: it reads only app.openapi(), so neither imports the other through it."""

from __future__ import annotations

import re

from fastapi import FastAPI


def _templates(app: FastAPI) -> list[tuple[re.Pattern, str, set[str]]]:
    cached = getattr(app.state, "path_templates", None)
    if cached is None:
        cached = []
        for template, operations in app.openapi().get("paths", {}).items():
            pattern = re.compile("^" + re.sub(r"\\\{[^/]+?\\\}", "[^/]+", re.escape(template)) + "$")
            cached.append((pattern, template, {method.upper() for method in operations}))
        app.state.path_templates = cached
    return cached


def match_path(app: FastAPI, path: str) -> tuple[str, set[str]] | None:
    """The published path template a request path falls under, and every method the spec has on it."""
    for pattern, template, methods in _templates(app):
        if pattern.match(path):
            return template, methods
    return None
