"""A small synchronous client for pclited's REST API (/v1), turning every failure into one readable CliError.

It speaks HTTP/1.1 through the standard library's http.client (one kept-alive connection per invocation), not a
third-party HTTP library: pclitectl starts often and briefly, and importing one costs more than a request takes.
"""

from __future__ import annotations

import http.client
import os
import re
import socket
from typing import Any
from urllib.parse import quote, unquote, urlencode, urlsplit

from hypervisor.vmm_api import error_text
from service.cli.config import Settings, config_path
from service.cli.errors import CliError, NotFound
from service.cli.pkginfo import client_version

CONNECT_TIMEOUT_S = 5.0

LIST_HINTS = {
    "vm": "`pclitectl get vms` lists them",
    "flavor": "`pclitectl get flavors` lists them; `pclitectl apply -f FILE` creates one",
    "pool": "`pclitectl get pools` lists them (one per flavor)",
}

def _one_line(text: Any) -> str:
    return re.sub(r"\s+", " ", str(text)).strip()


class Response:
    """One complete HTTP response: status, headers (case-insensitive), body bytes, and the request it answers."""

    def __init__(self, method: str, path: str, status_code: int, reason_phrase: str, headers, content: bytes):
        self.method, self.path = method, path
        self.status_code, self.reason_phrase = status_code, reason_phrase
        self.headers = headers  # http.client.HTTPMessage: .get() and [] ignore case
        self.content = content

    @property
    def text(self) -> str:
        """The body decoded by the Content-Type's charset (UTF-8 when none or unknown), bad bytes replaced."""
        charset = self.headers.get_content_charset() if self.headers is not None else None
        if charset:
            import codecs

            try:
                codecs.lookup(charset)
            except LookupError:
                charset = None
        return self.content.decode(charset or "utf-8", errors="replace")

    def json(self) -> Any:
        import json

        return json.loads(self.content)


def _problem_text(resp: Response) -> str:
    """The server's reason (hypervisor/vmm_api.py's one decoder of error answers)."""
    return error_text(resp.content, resp.status_code, resp.reason_phrase)


def _connect_reason(exc: Exception) -> str:
    text = _one_line(re.sub(r"\[Errno -?\d+\]\s*", "", str(exc))).rstrip(".") or type(exc).__name__
    return text[:1].lower() + text[1:]


def _transport_reason(exc: Exception) -> str:
    """Why an exchange on an open connection failed, in the words pclitectl has always used."""
    if isinstance(exc, http.client.RemoteDisconnected):
        return "server disconnected without sending a response"
    if isinstance(exc, http.client.IncompleteRead):
        received = len(exc.partial)
        expected = f" (received {received} bytes, expected {received + exc.expected})" if exc.expected else ""
        return f"peer closed connection without sending complete message body{expected}"
    if isinstance(exc, http.client.BadStatusLine):
        return f"illegal status line: {exc.line.strip()!r}"
    return _connect_reason(exc)


class _Timeout(Exception):
    pass


class _ConnectFailed(Exception):
    def __init__(self, cause: BaseException):
        super().__init__(str(cause))
        self.cause = cause


def _ssl_context():
    """Verification as before: $SSL_CERT_FILE, else $SSL_CERT_DIR, else certifi's bundle, else the system's."""
    import ssl

    if os.environ.get("SSL_CERT_FILE"):
        return ssl.create_default_context(cafile=os.environ["SSL_CERT_FILE"])
    if os.environ.get("SSL_CERT_DIR"):
        return ssl.create_default_context(capath=os.environ["SSL_CERT_DIR"])
    try:
        import certifi
    except ImportError:
        return ssl.create_default_context()
    return ssl.create_default_context(cafile=certifi.where())


def _env_proxy(scheme: str) -> str | None:
    """The proxy the environment names for `scheme` (lower-case variables first, as urllib reads them)."""
    for name in (f"{scheme}_proxy", "all_proxy"):
        value = os.environ.get(name)
        if value is None and not (name == "http_proxy" and "REQUEST_METHOD" in os.environ):
            value = os.environ.get(name.upper())
        if value:
            return value
    return None


def _bypasses_proxy(scheme: str, host: str) -> bool:
    """NO_PROXY as curl and httpx read it: `*`, exact hosts/IPs, domain suffixes (`.example.com` or `example.com`)."""
    value = os.environ.get("no_proxy")
    if value is None:
        value = os.environ.get("NO_PROXY") or ""
    host = host.lower().strip("[]")
    for entry in (e.strip().lower() for e in value.split(",")):
        if not entry:
            continue
        if entry == "*":
            return True
        if "://" in entry:
            entry_scheme, _, entry = entry.partition("://")
            if entry_scheme not in ("all", scheme):
                continue
        entry = entry.strip("[]")
        if entry == host:
            return True
        if entry.startswith("*"):
            entry = entry[1:]
        if entry.startswith("."):
            if host.endswith(entry):
                return True
        elif host.endswith("." + entry):
            return True
    return False


def _create_connection(address: tuple[str, int], timeout: float | None, source_address=None) -> socket.socket:
    """socket.create_connection, with an ASCII host passed as bytes: a str would load the IDNA codec, ~2 ms."""
    host, port = address
    if host.isascii():
        host = host.encode()
    return socket.create_connection((host, port), timeout, source_address)


class Client:
    def __init__(self, settings: Settings, *, timeout_s: float = 30.0):
        self.settings = settings
        self.server = settings.server
        self._headers = {"User-Agent": f"pclitectl/{client_version()}", "Accept": "application/json"}
        if settings.token:
            self._headers["Authorization"] = f"Bearer {settings.token}"
        self._timeout_s = timeout_s
        url = urlsplit(settings.server)
        self._scheme = url.scheme
        self._host = url.hostname or ""
        try:
            port = url.port
        except ValueError as exc:
            raise CliError(f"server URL {settings.server!r} (from {settings.server_source}) is not valid: "
                           f"{_connect_reason(exc)}") from None
        self._port = port or (443 if url.scheme == "https" else 80)
        self._authority = url.netloc.rpartition("@")[2]
        self._base_path = url.path.rstrip("/")
        self._proxy = self._proxy_for()
        self._conn: http.client.HTTPConnection | None = None

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- transport ---------------------------------------------------------------------------------------------

    def _proxy_for(self):
        proxy = _env_proxy(self._scheme)
        if not proxy or _bypasses_proxy(self._scheme, self._host):
            return None
        if "://" not in proxy:
            proxy = f"http://{proxy}"
        url = urlsplit(proxy)
        if url.scheme != "http" or not url.hostname:
            raise CliError(f"the proxy {proxy!r} from the environment is not supported by pclitectl (only "
                           f"http:// proxies) — set NO_PROXY={self._host} to reach pclited directly")
        headers = {}
        if url.username is not None:
            import base64

            credentials = f"{unquote(url.username)}:{unquote(url.password or '')}".encode()
            headers["Proxy-Authorization"] = "Basic " + base64.b64encode(credentials).decode()
        return url.hostname, url.port or 80, headers

    def _new_connection(self) -> http.client.HTTPConnection:
        if not self._host:
            raise _ConnectFailed(socket.gaierror(socket.EAI_NONAME, "Name or service not known"))
        host, port = self._host, self._port
        if self._proxy is not None:
            host, port = self._proxy[0], self._proxy[1]
        if self._scheme == "https":
            conn = http.client.HTTPSConnection(host, port, timeout=CONNECT_TIMEOUT_S, context=_ssl_context())
            if self._proxy is not None:
                conn.set_tunnel(self._host, self._port, headers=self._proxy[2])
        else:
            conn = http.client.HTTPConnection(host, port, timeout=CONNECT_TIMEOUT_S)
            conn._create_connection = _create_connection
        try:
            conn.connect()
        except TimeoutError:
            conn.close()
            raise _Timeout from None
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            raise _ConnectFailed(exc) from None
        return conn

    def _reusable(self) -> bool:
        """Whether the kept-alive connection is still open: a server that closed it left it readable (EOF)."""
        conn = self._conn
        if conn is None or conn.sock is None:
            return False
        import select

        try:
            readable, _, _ = select.select([conn.sock], [], [], 0)
        except (OSError, ValueError):
            return False
        return not readable

    def _target(self, path: str, params: dict | None) -> str:
        # Percent-encode what may not appear in a request line (spaces, `?`, `#`, non-ASCII), keeping valid %XX.
        target = quote(re.sub(r"%(?![0-9A-Fa-f]{2})", "%25", self._base_path + path), safe="/:@!$&'()*+,;=%~")
        if params:
            target += "?" + urlencode(params)
        if self._proxy is not None and self._scheme == "http":
            target = f"http://{self._authority}{target}"
        return target

    def _exchange(self, method: str, target: str, body: bytes | None, headers: dict[str, str],
                  read_timeout: float | None) -> Response:
        reused = self._reusable()
        if not reused:
            self.close()
            self._conn = self._new_connection()
        while True:
            conn = self._conn
            try:
                conn.sock.settimeout(read_timeout)
                conn.request(method, target, body=body, headers=headers)
                raw = conn.getresponse()
                content = raw.read()
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                self.close()
                if reused and method in ("GET", "HEAD"):  # the server dropped the idle connection: once more
                    reused = False
                    self._conn = self._new_connection()
                    continue
                raise
            except BaseException:
                self.close()
                raise
            if raw.will_close:
                self.close()
            path = target.split("?", 1)[0]
            if "://" in path:
                path = "/" + path.split("://", 1)[1].partition("/")[2]
            return Response(method, path, raw.status, raw.reason, raw.msg, content)

    def request(self, method: str, path: str, *, what: tuple[str, str] | None = None,
                timeout_s: float | None = None, params: dict | None = None, json: Any = None,
                headers: dict[str, str] | None = None, no_read_timeout: bool = False) -> Response:
        read_timeout = None if no_read_timeout else (timeout_s if timeout_s is not None else self._timeout_s)
        send_headers = dict(self._headers)
        if self._proxy is not None and self._scheme == "http":
            send_headers.update(self._proxy[2])
        if headers:
            send_headers.update(headers)
        body = None
        if json is not None:
            import json as jsonlib

            body = jsonlib.dumps(json, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()
            send_headers["Content-Type"] = "application/json"
        try:
            resp = self._exchange(method, self._target(path, params), body, send_headers, read_timeout)
        except _ConnectFailed as exc:
            raise CliError(f"cannot reach pclited at {self.server}: {_connect_reason(exc.cause)} — is it running? "
                           f"(`make run`)") from None
        except _Timeout:
            raise CliError(f"cannot reach pclited at {self.server}: no answer to connect within 5s — is it running? "
                           f"(`make run`)") from None
        except TimeoutError:
            limit = timeout_s if timeout_s is not None else self._timeout_s
            raise CliError(f"pclited at {self.server} did not answer {method} {path} within {limit:g}s — "
                           f"is it overloaded or stuck? check its log") from None
        except (OSError, http.client.HTTPException) as exc:
            raise CliError(f"talking to pclited at {self.server} failed: {_transport_reason(exc)} — is it running? "
                           f"(`make run`)") from None
        if resp.status_code >= 400:
            error = self._error(resp, method, path, what)
            error.status = resp.status_code
            raise error
        return resp

    def _error(self, resp: Response, method: str, path: str, what: tuple[str, str] | None) -> CliError:
        status, reason = resp.status_code, _problem_text(resp)
        if status == 401:
            if not self.settings.token:
                return CliError(f"pclited at {self.server} needs a token and none is set — pass --token, set "
                                f"PCLITE_TOKEN, or put `token:` in {config_path()} (pclited writes it on first start)")
            return CliError(f"pclited at {self.server} rejected the token from {self.settings.token_source} "
                            f"({reason}) — pass the right --token or PCLITE_TOKEN, or fix `token:` in "
                            f"{config_path()} (pclited writes it on first start)")
        if status == 404 and what is not None:
            kind, name = what
            return NotFound(f'{kind} "{name}" not found — {LIST_HINTS.get(kind, "check the name")}')
        if status == 404 and "no such endpoint" in reason:
            return CliError(f"pclited at {self.server} has no {method} {path} — is it the same version as "
                            f"pclitectl? (`pclitectl version`)")
        if status == 503 and resp.headers.get("Retry-After"):
            return CliError(f"{reason} — retry in {resp.headers['Retry-After']}s")
        if status >= 500:
            return CliError(f"pclited at {self.server} failed on {method} {path} ({status}): {reason} — see its log")
        return CliError(f"{reason} ({status})")

    def get_json(self, path: str, *, what: tuple[str, str] | None = None, **kwargs: Any) -> Any:
        return self._json(self.request("GET", path, what=what, **kwargs))

    def _json(self, resp: Response) -> Any:
        if resp.status_code == 204 or not resp.content:
            return None
        try:
            return resp.json()
        except ValueError:
            raise CliError(f"pclited at {self.server} sent a non-JSON answer to {resp.method} "
                           f"{resp.path}: {_one_line(resp.text[:120])!r} — is --server pointing at "
                           f"pclited?") from None

    # -- flavors -----------------------------------------------------------------------------------------------

    def list_flavors(self) -> list[dict]:
        return self.get_json("/v1/flavors")

    def get_flavor(self, name: str) -> dict:
        return self.get_json(f"/v1/flavors/{name}", what=("flavor", name))

    def create_flavor(self, body: dict, *, dry_run: bool = False) -> dict:
        params = {"dry_run": "true"} if dry_run else None
        return self._json(self.request("POST", "/v1/flavors", json=body, params=params))

    def patch_flavor(self, name: str, body: dict, *, dry_run: bool = False) -> dict:
        params = {"dry_run": "true"} if dry_run else None
        return self._json(self.request("PATCH", f"/v1/flavors/{name}", json=body, what=("flavor", name),
                                       params=params))

    def delete_flavor(self, name: str) -> None:
        self.request("DELETE", f"/v1/flavors/{name}", what=("flavor", name))

    # -- pools -------------------------------------------------------------------------------------------------

    def list_pools(self) -> list[dict]:
        return self.get_json("/v1/pools")

    def get_pool(self, flavor: str) -> dict:
        return self.get_json(f"/v1/pools/{flavor}", what=("pool", flavor))

    def scale_pool(self, flavor: str, target: int) -> dict:
        return self._json(self.request("PATCH", f"/v1/pools/{flavor}", json={"target": target},
                                       what=("pool", flavor)))

    # -- VMs ---------------------------------------------------------------------------------------------------

    def list_vms(self, *, flavor: str | None = None, state: str | None = None,
                 selector: str | None = None) -> list[dict]:
        params = {k: v for k, v in (("flavor", flavor), ("state", state), ("labelSelector", selector)) if v}
        return self.get_json("/v1/vms", params=params)

    def watch_vms(self, *, flavor: str | None = None, state: str | None = None, selector: str | None = None):
        """The watch stream (GET /v1/vms?watch=true): yields its events, {type, object, resourceVersion}."""
        import json as jsonlib

        params = {k: v for k, v in (("flavor", flavor), ("state", state), ("labelSelector", selector)) if v}
        headers = dict(self._headers)
        if self._proxy is not None and self._scheme == "http":
            headers.update(self._proxy[2])
        self.close()  # the stream has a connection of its own
        try:
            conn = self._new_connection()
        except (_ConnectFailed, _Timeout):
            raise CliError(f"cannot reach pclited at {self.server} — is it running? (`make run`)") from None
        try:
            conn.sock.settimeout(None)
            conn.request("GET", self._target("/v1/vms", params | {"watch": "true"}), headers=headers)
            raw = conn.getresponse()
            if raw.status >= 400:
                content = raw.read()
                resp = Response("GET", "/v1/vms", raw.status, raw.reason, raw.msg, content)
                error = self._error(resp, "GET", "/v1/vms", None)
                error.status = raw.status
                raise error
            for line in raw:
                if line.strip():
                    yield jsonlib.loads(line)
        except (OSError, http.client.HTTPException) as exc:
            raise CliError(f"the watch on pclited at {self.server} broke: {_transport_reason(exc)}") from None
        finally:
            conn.close()

    def get_vm(self, vm_id: str) -> dict:
        return self.get_json(f"/v1/vms/{vm_id}", what=("vm", vm_id))

    def claim_vm(self, flavor: str, *, wait: bool = True, timeout_s: float = 300.0) -> dict:
        resp = self.request("POST", "/v1/vms", json={"flavor": flavor, "wait": wait}, timeout_s=timeout_s,
                            what=("flavor", flavor))
        return self._json(resp)

    def delete_vm(self, vm_id: str, *, wait: bool = False) -> dict | None:
        params = {"wait": "true"} if wait else None
        return self._json(self.request("DELETE", f"/v1/vms/{vm_id}", params=params, what=("vm", vm_id),
                                       timeout_s=60.0 if wait else None))

    def exec_vm(self, vm_id: str, body: dict, *, timeout_s: float | None) -> dict:
        return self._json(self.request("POST", f"/v1/vms/{vm_id}/exec", json=body, what=("vm", vm_id),
                                       timeout_s=timeout_s, no_read_timeout=timeout_s is None))

    def console(self, vm_id: str) -> bytes:
        """The console's tail as pclited serves it (its default window: the last 64 KiB), as raw bytes."""
        return self.request("GET", f"/v1/vms/{vm_id}/console", what=("vm", vm_id)).content

    def events(self, vm_id: str) -> list[dict]:
        return self.get_json(f"/v1/vms/{vm_id}/events", what=("vm", vm_id))

    # -- server ------------------------------------------------------------------------------------------------

    def version(self) -> dict:
        return self.get_json("/v1/version")

    def metrics(self) -> str:
        return self.request("GET", "/metrics", headers={"Accept": "text/plain"}).text
