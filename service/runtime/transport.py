"""The runtime's two peers, over a minimal HTTP/1.1 client: pclited (claim, rootfs, release) and the VM's own VMM
control socket (mounts, host name, interactive processes: hypervisor/vmm_api.py's VmmCalls, so its requests are the
contract's, only the transport is this one).

Hand-rolled rather than http.client, which imports the email package: ~0.5 s per runtime start in the lab, and
containerd starts the runtime four times for a `ctr run --rm`. For the same reason it uses _socket (socket.py
imports enum), and service.runtime.jsonlite (only when a body needs it) rather than json, which imports re.
"""

import _socket
import os

from hypervisor import vmm_api

CHUNK = 65536


class WireError(Exception):
    """A peer refused, failed or is unreachable; the message says which and what to do."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class Unreachable(WireError):
    pass


def _connect(address: str, timeout: float | None) -> _socket.socket:
    """address: "unix:/path" or "http://host:port"."""
    if address.startswith("unix:"):
        sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        target: object = address[5:]
    else:
        hostport = address.split("://", 1)[-1].split("/", 1)[0]
        host, _, port = hostport.rpartition(":")
        sock = _socket.socket(_socket.AF_INET6 if host.startswith("[") else _socket.AF_INET, _socket.SOCK_STREAM)
        target = (host.strip("[]") or "127.0.0.1", int(port or 80))
    sock.settimeout(timeout)
    try:
        sock.connect(target)
    except OSError:
        sock.close()
        raise
    return sock


class Response:
    """A response whose body is read on demand: read_all(), or lines() for an NDJSON stream."""

    def __init__(self, sock: _socket.socket):
        self.sock = sock
        self._buf = b""
        head = self._read_until(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or not parts[1].isdigit():
            raise WireError(f"malformed HTTP status line {lines[0]!r}")
        self.status = int(parts[1])
        self.headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            self.headers[name.strip().lower()] = value.strip()
        self.chunked = self.headers.get("transfer-encoding", "").lower() == "chunked"
        self._left = int(self.headers.get("content-length", "-1"))  # -1: until the peer closes
        self._done = False
        self._body = b""  # decoded body bytes not yet split into lines (take_lines)

    def _fill(self) -> bool:
        data = self.sock.recv(CHUNK)
        self._buf += data
        return bool(data)

    def _read_until(self, marker: bytes) -> bytes:
        while marker not in self._buf:
            if not self._fill():
                raise ConnectionError("the peer closed the connection mid-response")
        head, _, self._buf = self._buf.partition(marker)
        return head

    def _read_exact(self, n: int) -> bytes:
        while len(self._buf) < n:
            if not self._fill():
                raise ConnectionError("the peer closed the connection mid-response")
        data, self._buf = self._buf[:n], self._buf[n:]
        return data

    def read_some(self) -> bytes:
        """The next piece of the body, b"" at its end."""
        if self._done:
            return b""
        if self.chunked:
            size = int(self._read_until(b"\r\n").split(b";")[0], 16)
            data = self._read_exact(size + 2)[:-2]
            self._done = size == 0
            return data
        if self._left == 0:
            self._done = True
            return b""
        if not self._buf and not self._fill():
            self._done = True
            return b""
        take = len(self._buf) if self._left < 0 else min(self._left, len(self._buf))
        data, self._buf = self._buf[:take], self._buf[take:]
        if self._left > 0:
            self._left -= take
        return data

    def read_all(self) -> bytes:
        out = []
        while piece := self.read_some():
            out.append(piece)
        return b"".join(out)

    def take_lines(self, receive: bool = True) -> list[dict] | None:
        """The NDJSON lines completed by one recv() (none when receive is False: only what is buffered), blank
        heartbeat lines skipped; None once the stream has ended. Never blocks when the socket is readable."""
        if receive and not self._done and not self._fill():
            self._done = True
        while not self._done or self._buf:
            if not self.chunked:
                self._body += self._buf
                self._buf = b""
                break
            end = self._buf.find(b"\r\n")
            if end < 0:
                break
            size = int(self._buf[:end].split(b";")[0], 16)
            if len(self._buf) < end + size + 4:
                break
            self._body += self._buf[end + 2:end + 2 + size]
            self._buf = self._buf[end + size + 4:]
            if size == 0:
                self._done = True
                break
        *complete, self._body = self._body.split(b"\n")
        from service.runtime.jsonlite import loads
        lines = [loads(line) for line in complete if line.strip()]
        return None if self._done and not lines else lines

    def next_lines(self) -> list[dict] | None:
        """Block until at least one line (or the end: None)."""
        lines = self.take_lines(receive=False)
        while lines == []:
            lines = self.take_lines()
        return lines

    def close(self) -> None:
        self.sock.close()


def request(address: str, method: str, path: str, body: object = None, *, token: str | None = None,
            timeout: float | None = 30.0, raw: bytes | None = None, content_type: str = "application/json",
            stream: bool = False, parse: bool = True, body_fd: int | None = None, sock: _socket.socket | None = None):
    """One request on a fresh connection (or sock, one opened beforehand). JSON in and out (parse=False: the answer
    is not read as JSON); stream=True returns the open Response; body_fd: the body is what that fd gives until its
    end, sent chunked."""
    data = raw if raw is not None else b""
    if body is not None:
        from service.runtime.jsonlite import dumps
        data = dumps(body).encode()
    host = "localhost" if address.startswith("unix:") else address.split("://", 1)[-1].split("/", 1)[0]
    length = "Transfer-Encoding: chunked" if body_fd is not None else f"Content-Length: {len(data)}"
    head = [f"{method} {path} HTTP/1.1", f"Host: {host}", "Connection: close", length]
    if data or body_fd is not None:
        head.append(f"Content-Type: {content_type}")
    if token:
        head.append(f"Authorization: Bearer {token}")
    sock = sock or _connect(address, timeout)
    try:
        sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + data)
        try:
            while body_fd is not None:
                piece = os.read(body_fd, CHUNK)
                sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
                if not piece:
                    break
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered before the end of the body (an error): its answer is read below
        response = Response(sock)
        if stream and response.status < 400:
            return response
        payload = response.read_all()
    except BaseException:
        sock.close()
        raise
    sock.close()
    if response.status >= 400:
        raise WireError(_problem_text(payload, response.status), response.status)
    if not parse or not payload:
        return None
    if not response.headers.get("content-type", "").endswith("json"):
        return payload
    from service.runtime.jsonlite import loads
    return loads(payload)


def _problem_text(payload: bytes, status: int) -> str:
    from service.runtime.jsonlite import loads
    return vmm_api.error_text(payload, status, loads=loads)


# ---- pclited

def pclited_settings() -> tuple[str, str | None]:
    """(server, token): PCLITE_SERVER/PCLITE_TOKEN, else pclitectl's config file, else the local default."""
    server, token = os.environ.get("PCLITE_SERVER"), os.environ.get("PCLITE_TOKEN")
    if not server or not token:
        base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
        path = os.environ.get("PCLITE_CONFIG") or os.path.join(base, "pclite", "config")
        try:
            with open(path) as f:
                for line in f:
                    key, _, value = line.partition(":")
                    value = value.strip().strip("'\"")
                    if key.strip() == "server" and not server:
                        server = value
                    elif key.strip() == "token" and not token:
                        token = value
        except OSError:
            pass
    server = (server or "http://127.0.0.1:8080").rstrip("/")
    if "://" not in server and not server.startswith("unix:"):
        server = "http://" + server
    return server, token


class Pclited:
    def __init__(self, server: str | None = None, token: str | None = None):
        default_server, default_token = pclited_settings()
        self.server, self.token = server or default_server, token or default_token

    def call(self, method: str, path: str, body: object = None, timeout: float = 120.0, **kwargs):
        try:
            return request(self.server, method, path, body, token=self.token, timeout=timeout, **kwargs)
        except WireError as exc:
            raise WireError(f"pclited ({self.server}) answered {method} {path} with: {exc}", exc.status) from None
        except OSError as exc:
            raise Unreachable(f"pclited is not reachable at {self.server} ({exc.strerror or exc}): start it (`make "
                              f"run`, or `systemctl start pclited`), or point PCLITE_SERVER/PCLITE_TOKEN at it") \
                from None

    def claim(self, flavor: str) -> dict:
        return self.call("POST", "/v1/vms", {"flavor": flavor, "wait": True})

    def attach_rootfs(self, vm_id: str, path: str, read_only: bool, mounts: list[dict] | None = None,
                      hostname: str | None = None) -> dict:
        """By path when pclited sees this host's files (PCLITE_ROOTFS_UPLOAD=path), as a tar stream when it does not
        (=tar); auto (the default): the path, then the tar stream if pclited cannot see the directory. By path,
        pclited also makes the mounts and sets the host name (the answer's "mounts" and "hostname" say so)."""
        how = os.environ.get("PCLITE_ROOTFS_UPLOAD", "auto")
        if how != "tar":
            body = {"path": path, "read_only": read_only, "mounts": mounts or []}
            if hostname:
                body["hostname"] = hostname
            try:
                return self.call("POST", f"/v1/vms/{vm_id}/rootfs", body, timeout=600)
            except WireError as exc:
                # 403: pclited takes no path (rootfs_path_roots unset) or not this one; 422: it cannot see it.
                if how == "path" or not (exc.status == 403 or exc.status == 422 and "pclited host" in str(exc)):
                    raise
        return self.upload_rootfs(vm_id, path, read_only)

    def upload_rootfs(self, vm_id: str, path: str, read_only: bool) -> dict:
        """`tar -C path -c .` streamed as the body (GNU tar keeps owners, modes, links and device nodes)."""
        read_fd, write_fd = os.pipe()
        try:
            pid = os.posix_spawnp("tar", ["tar", "-C", path, "--numeric-owner", "-c", "."], dict(os.environ),
                                  file_actions=[(os.POSIX_SPAWN_DUP2, write_fd, 1), (os.POSIX_SPAWN_CLOSE, read_fd)])
        except OSError as exc:
            os.close(read_fd)
            os.close(write_fd)
            raise WireError(f"cannot run tar to send the rootfs {path} to pclited ({exc.strerror}): install tar") \
                from None
        os.close(write_fd)
        try:
            mode = "true" if read_only else "false"
            result = self.call("POST", f"/v1/vms/{vm_id}/rootfs?read_only={mode}", timeout=600, body_fd=read_fd,
                               content_type="application/x-tar")
        finally:
            os.close(read_fd)
            _, status = os.waitpid(pid, 0)
        if os.waitstatus_to_exitcode(status) not in (0, 1):  # 1: a file changed while it was read
            raise WireError(f"tar of the rootfs {path} failed (exit {os.waitstatus_to_exitcode(status)}): is it "
                            f"readable?")
        return result

    def release(self, vm_id: str) -> None:
        """The VM stops in the background: pclited owns it (and its rootfs image) from here on."""
        self.call("DELETE", f"/v1/vms/{vm_id}", timeout=60, parse=False)


# ---- the VM's VMM

class Vmm(vmm_api.VmmCalls):
    def __init__(self, socket_path: str):
        self.address = "unix:" + socket_path

    def _call(self, method: str, path: str, body: object = None, timeout: float | None = None):
        return self.call(method, path, body, 30.0 if timeout is None else timeout)

    def call(self, method: str, path: str, body: object = None, timeout: float = 30.0, **kwargs):
        try:
            return request(self.address, method, path, body, timeout=timeout, **kwargs)
        except WireError as exc:
            raise WireError(f"the VM's VMM refused {method} {path}: {exc}", exc.status) from None
        except OSError as exc:
            raise Unreachable(f"the VM's VMM ({self.address[5:]}) is gone ({exc.strerror or exc}): the VM has "
                              f"stopped; delete the container") from None

    def connect(self) -> _socket.socket:
        """A connection for a later start() (so that start skips connecting)."""
        try:
            return _connect(self.address, 30.0)
        except OSError as exc:
            raise Unreachable(f"the VM's VMM ({self.address[5:]}) is gone ({exc.strerror or exc}): the VM has "
                              f"stopped") from None

    def start(self, process: dict, sock: _socket.socket | None = None) -> Response:
        """Start an interactive process (process: vmm_api.exec_request's keywords, e.g. oci.guest_process's body);
        returns the open NDJSON stream (its first line is {"started"})."""
        method, path, body = vmm_api.exec_request(**{"output_cap": 0, **process}, interactive=True)
        try:
            return request(self.address, method, path, body, timeout=30.0, stream=True, sock=sock)
        except WireError as exc:
            raise WireError(f"the guest could not start {process['argv'][0]}: {exc}", exc.status) from None
        except OSError as exc:
            raise Unreachable(f"the VM's VMM ({self.address[5:]}) is gone ({exc.strerror or exc}): the VM has "
                              f"stopped") from None
