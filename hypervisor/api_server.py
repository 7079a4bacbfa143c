"""A small HTTP/1.1 server on a Unix socket for the VMM's control API (Firecracker-style).

Hand-rolled on purpose: http.server pulls in email/html/mimetypes (~0.1 s of start-up in the lab) and we need
only JSON requests with Content-Length, plain responses, and chunked streaming. One thread per connection.
The limits, the error body and the Content-Length rule are hypervisor/vmm_api.py's.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import threading
from collections.abc import Callable, Iterator

from hypervisor.vmm_api import MAX_HEADER_BYTES, ApiError, check_content_length, error_body

REASONS = {200: "OK", 204: "No Content", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
           409: "Conflict", 413: "Payload Too Large", 500: "Internal Server Error", 503: "Service Unavailable",
           504: "Gateway Timeout"}


class Request:
    def __init__(self, method: str, path: str, query: dict[str, str], body: bytes):
        self.method, self.path, self.query, self.body = method, path, query, body

    def json(self) -> dict:
        if not self.body:
            return {}
        try:
            value = json.loads(self.body)
        except ValueError as exc:
            raise ApiError(400, f"request body is not valid JSON ({exc})") from None
        if not isinstance(value, dict):
            raise ApiError(400, "request body must be a JSON object")
        return value


class Response:
    """body: bytes, a JSON-able value, or an iterator of bytes (sent chunked, for streaming)."""

    def __init__(self, status: int = 200, body: object = None, content_type: str = "application/json"):
        self.status, self.body, self.content_type = status, body, content_type


Handler = Callable[[Request], Response]


def _parse_query(raw: str) -> dict[str, str]:
    from urllib.parse import parse_qsl
    return dict(parse_qsl(raw, keep_blank_values=True))


def listen_unix(path: str, backlog: int = 64) -> socket.socket:
    """A listening Unix socket at path, mode 0600 from its creation (bound under umask 077: no window in which
    another user could connect). What sits at path already is replaced only if it is a socket (a stale one from a
    dead process; callers refuse a live one first): anything else is refused with OSError, untouched."""
    try:
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise OSError(f"{path} exists and is not a socket: refusing to replace it; remove it or pick another "
                          f"socket path")
        os.unlink(path)
    except FileNotFoundError:
        pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        old = os.umask(0o177)  # process-wide for the bind only: a file another thread makes meanwhile is 0600 too
        try:
            sock.bind(path)
        finally:
            os.umask(old)
        sock.listen(backlog)  # at once: a client may connect as soon as the path exists (restore: = ready)
    except BaseException:
        sock.close()
        raise
    return sock


def unlink_socket(path: str, inode: int | None = None) -> None:
    """Remove path if it is a socket (that inode, when given): never another file put there since."""
    try:
        st = os.lstat(path)
        if stat.S_ISSOCK(st.st_mode) and inode in (None, st.st_ino):
            os.unlink(path)
    except FileNotFoundError:
        pass


class ApiServer:
    def __init__(self, path: str, handler: Handler):
        self.path = path
        self.handler = handler
        self.sock = listen_unix(path)
        self._inode = os.lstat(path).st_ino
        self._closed = False

    def serve_in_background(self) -> None:
        threading.Thread(target=self._accept_loop, name="api-accept", daemon=True).start()

    def close(self) -> None:
        self._closed = True
        try:
            self.sock.close()
        finally:
            unlink_socket(self.path, self._inode)

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), name="api-conn", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            reader = conn.makefile("rb")
            try:
                while self._serve_one(conn, reader):
                    pass
            except (OSError, ValueError):
                pass  # the client went away mid-request

    def _serve_one(self, conn: socket.socket, reader) -> bool:
        line = reader.readline(MAX_HEADER_BYTES)
        if not line:
            return False
        try:
            method, target, version = line.decode("latin-1").split()
        except ValueError:
            self._send(conn, Response(400, error_body("malformed HTTP request line")), keep_alive=False)
            return False
        headers, size = {}, len(line)
        while True:
            header = reader.readline(MAX_HEADER_BYTES)
            size += len(header)
            if header in (b"\r\n", b"\n", b""):
                break
            if size > MAX_HEADER_BYTES:
                self._send(conn, Response(413, error_body("request headers too large")), keep_alive=False)
                return False
            name, _, value = header.decode("latin-1").partition(":")
            name, value = name.strip().lower(), value.strip()
            if name == "content-length" and headers.get(name, value) != value:
                value = "two different values"  # refused below: which one frames the body is ambiguous
            headers[name] = value
        keep_alive = version == "HTTP/1.1" and headers.get("connection", "").lower() != "close"
        try:
            length = check_content_length(headers.get("content-length"))
        except ApiError as exc:
            self._send(conn, Response(exc.status, error_body(str(exc))), keep_alive=False)
            return False
        body = reader.read(length) if length else b""
        path, _, raw_query = target.partition("?")
        try:
            response = self.handler(Request(method, path, _parse_query(raw_query) if raw_query else {}, body))
        except ApiError as exc:
            response = Response(exc.status, error_body(str(exc)))
        except Exception as exc:  # a handler bug must not kill the VMM; say what broke
            response = Response(500, error_body(f"VMM API handler failed: {type(exc).__name__}: {exc}"))
        self._send(conn, response, keep_alive)
        return keep_alive

    @staticmethod
    def _send(conn: socket.socket, response: Response, keep_alive: bool) -> None:
        head = [f"HTTP/1.1 {response.status} {REASONS.get(response.status, 'Status')}",
                f"Content-Type: {response.content_type}",
                f"Connection: {'keep-alive' if keep_alive else 'close'}"]
        body = response.body
        if isinstance(body, Iterator):
            head.append("Transfer-Encoding: chunked")
            conn.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
            for piece in body:
                if piece:
                    conn.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
            conn.sendall(b"0\r\n\r\n")
            return
        if body is None:
            data = b""
        elif isinstance(body, bytes):
            data = body
        else:
            data = json.dumps(body).encode()
        head.append(f"Content-Length: {len(data)}")
        conn.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + data)
