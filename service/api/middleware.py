"""Pure ASGI guard in front of the app: bearer-token auth, then request-body size caps (413)."""

from __future__ import annotations

import re

from starlette.datastructures import Headers

from service.api.errors import problem
from service.auth import PUBLIC_PATHS, check_authorization

BODY_LIMIT = 1 << 20
# 16 MiB of stdin is ~21.4 MiB once base64-encoded in JSON.
EXEC_BODY_LIMIT = (16 << 20) * 4 // 3 + (1 << 20)
EXEC_PATH = re.compile(r"^/v1/vms/[^/]+/exec$")
ROOTFS_PATH = re.compile(r"^/v1/vms/[^/]+/rootfs$")
TAR_TYPES = ("application/x-tar", "application/octet-stream")  # a rootfs tar: streamed, capped by the rootfs quota


def media_type(headers: Headers) -> str:
    return headers.get("content-type", "").split(";")[0].strip().lower()


class Guard:
    def __init__(self, app, token: str, token_hint: str) -> None:
        self.app = app
        self.token = token
        self.token_hint = token_hint

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        path = scope["path"]
        if path not in PUBLIC_PATHS:
            wrong = check_authorization(headers.get("authorization"), self.token, self.token_hint)
            if wrong:
                response = problem(401, wrong, "unauthorized", headers={"WWW-Authenticate": "Bearer"})
                return await response(scope, receive, send)
        if ROOTFS_PATH.match(path) and media_type(headers) in TAR_TYPES:
            return await self.app(scope, receive, send)
        limit = EXEC_BODY_LIMIT if EXEC_PATH.match(path) else BODY_LIMIT

        def too_big():
            return problem(413, f"request body larger than {limit} bytes, the limit for {path}: send less"
                                + (" (exec stdin is capped at 16 MiB)" if limit == EXEC_BODY_LIMIT else ""),
                           "body-too-large")

        declared = headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                return await problem(400, "Content-Length must be a number")(scope, receive, send)
            if int(declared) > limit:
                return await too_big()(scope, receive, send)
        if scope["method"] not in ("POST", "PUT", "PATCH", "DELETE"):
            return await self.app(scope, receive, send)
        # Read the whole body under the cap (a chunked body has no Content-Length to trust), then replay it.
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return await too_big()(scope, receive, send)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)
