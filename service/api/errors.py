"""RFC 7807 problem details for every error, with a detail that says what was wrong and what to do."""

from __future__ import annotations

import logging
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.api.paths import match_path
from service.services.errors import ServiceError

log = logging.getLogger("pclited")
PROBLEM_TYPE = "urn:pclite:problem:"
PROBLEM_MEDIA_TYPE = "application/problem+json"


def problem(status: int, detail: str, slug: str | None = None, title: str | None = None,
            headers: dict[str, str] | None = None) -> JSONResponse:
    phrase = HTTPStatus(status).phrase
    slug = slug or phrase.lower().replace(" ", "-").replace("'", "")
    body = {"type": PROBLEM_TYPE + slug, "title": title or phrase, "status": status, "detail": detail}
    return JSONResponse(body, status_code=status, headers=headers, media_type=PROBLEM_MEDIA_TYPE)


def _where(loc) -> str:
    parts = [str(p) for p in loc if p not in ("body",)] or ["body"]
    return ".".join(parts)


def describe_validation(exc: RequestValidationError) -> str:
    messages = []
    for error in exc.errors()[:10]:
        if error.get("type") == "json_invalid":
            messages.append(f"the body is not valid JSON ({error.get('ctx', {}).get('error', 'parse error')})")
            continue
        if error.get("type") == "missing" and tuple(error.get("loc", ())) == ("body",):
            messages.append("a JSON body is required")
            continue
        if tuple(error.get("loc", ())) == ("body",) and isinstance(error.get("input"), bytes | str):
            messages.append("the body must be a JSON object, sent with Content-Type: application/json")
            continue
        where = _where(error.get("loc", ()))
        got = error.get("input")
        shown = "" if isinstance(got, dict | list) or got is None else f" (got {str(got)[:60]!r})"
        messages.append(f"{where}: {error.get('msg', 'invalid')}{shown}")
    return "; ".join(messages) + ". Fix these fields and retry (schemas: GET /openapi.json)."


def allowed_methods(request: Request, fallback: str) -> str:
    """Every method the API has on this path (Starlette's own Allow names only the first route's: one route per
    method here)."""
    found = match_path(request.app, request.url.path)
    if not found:
        return fallback
    methods = found[1] | ({"HEAD"} if "GET" in found[1] else set())
    return ", ".join(sorted(methods))


def install(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def _service(_request: Request, exc: ServiceError):
        return problem(exc.status, exc.detail, exc.slug, exc.title, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_request: Request, exc: RequestValidationError):
        return problem(422, describe_validation(exc), "invalid")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404 and detail == "Not Found":
            detail = f"no such endpoint {request.url.path}: the API is described at /openapi.json"
        headers = getattr(exc, "headers", None)
        if exc.status_code == 405:
            allowed = allowed_methods(request, (headers or {}).get("Allow", ""))
            detail = f"{request.method} is not allowed on {request.url.path} (allowed: {allowed})"
            headers = {**(headers or {}), "Allow": allowed}
        return problem(exc.status_code, detail, headers=headers)

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception):
        log.exception("unhandled error in %s %s", request.method, request.url.path)
        return problem(500, f"internal error ({type(exc).__name__}): this is a pclited bug; its log has the "
                            "traceback", "internal")
