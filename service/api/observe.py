"""HTTP request metrics by route template (/v1/vms/{vm_id}, never the raw path: ids would explode the series)."""

from __future__ import annotations

import time

from service.api.paths import match_path

UNMATCHED = "unmatched"
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})  # others: "other"


def route_template(app, scope) -> str:
    route = scope.get("route")
    if route is not None and getattr(route, "path", None):
        return route.path
    found = match_path(app, scope["path"])
    return found[0] if found else UNMATCHED


class RequestMetrics:
    """Outermost ASGI layer: counts every answer, the Guard's 401/413 included."""

    def __init__(self, app, fastapi_app, metrics) -> None:
        self.app = app
        self.fastapi_app = fastapi_app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        status = 500

        async def send_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            self.metrics.observe_request(route_template(self.fastapi_app, scope),
                                         scope["method"] if scope["method"] in METHODS else "other", status,
                                         time.perf_counter() - started)
