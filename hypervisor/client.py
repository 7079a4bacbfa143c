"""Host client for one VMM's control API (its Unix socket), over http.client: the calls and their bodies are
hypervisor/vmm_api.py's (VmmCalls), this adds the transport, the exec stream and interactive processes. Blocking;
use a thread from async code. (The OCI runtime has the same calls over a leaner transport:
service/runtime/transport.py.)"""

from __future__ import annotations

import base64
import http.client
import json
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from hypervisor import vmm_api


class VmmError(Exception):
    """The VMM answered with an error, or could not be asked; the message says what to do."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class VmmUnavailable(VmmError):
    """No VMM behind the socket: it has exited (or never started)."""


@dataclass
class ExecResult:
    exit_code: int | None
    signal: int | None
    timed_out: bool
    stdout: bytes
    stderr: bytes
    stdout_truncated: bool
    stderr_truncated: bool
    duration_s: float

    @classmethod
    def from_json(cls, data: dict, stdout: bytes | None = None, stderr: bytes | None = None) -> ExecResult:
        return cls(exit_code=data["exit_code"], signal=data["signal"], timed_out=data["timed_out"],
                   stdout=stdout if stdout is not None else base64.b64decode(data["stdout_b64"]),
                   stderr=stderr if stderr is not None else base64.b64decode(data["stderr_b64"]),
                   stdout_truncated=data["stdout_truncated"], stderr_truncated=data["stderr_truncated"],
                   duration_s=data["duration_ms"] / 1000)


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float):
        super().__init__("localhost", timeout=timeout)
        self.socket_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.socket_path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


class VmmClient(vmm_api.VmmCalls):
    def __init__(self, socket_path: str | Path, timeout: float = 10.0):
        self.socket_path = str(socket_path)
        self.timeout = timeout

    def _request(self, method: str, path: str, body: dict | None = None, timeout: float | None = None):
        conn = _UnixConnection(self.socket_path, timeout or self.timeout)
        try:
            conn.request(method, path, body=json.dumps(body).encode() if body is not None else None,
                         headers={"Content-Type": "application/json", "Connection": "close"})
            return conn, conn.getresponse()
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            conn.close()
            raise VmmUnavailable(f"no VMM at {self.socket_path} ({exc.strerror}): the VM has stopped or was never "
                                 f"started") from None
        except TimeoutError:
            conn.close()
            raise VmmError(f"the VMM at {self.socket_path} did not answer {method} {path} within "
                           f"{timeout or self.timeout:.0f} s") from None
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            raise VmmUnavailable(f"lost the VMM at {self.socket_path} during {method} {path}: {exc}") from None

    def _call(self, method: str, path: str, body: dict | None = None, timeout: float | None = None):
        conn, response = self._request(method, path, body, timeout)
        try:
            data = response.read()
        except (OSError, http.client.HTTPException) as exc:
            raise VmmUnavailable(f"lost the VMM at {self.socket_path} during {method} {path}: {exc}") from None
        finally:
            conn.close()
        if response.status >= 400:
            raise VmmError(vmm_api.error_text(data, response.status, response.reason), response.status)
        if response.getheader("Content-Type", "").startswith("application/json") and data:
            return json.loads(data)
        return data

    def wait_agent_ready(self, timeout_s: float, poll_s: float = 0.05) -> dict:
        deadline = time.monotonic() + timeout_s
        while True:
            status = self.status()
            if status["agent_ready"]:
                return status
            if status["state"] == "stopped":
                raise VmmError(f"the VM stopped before its agent was ready: {status.get('stop_reason')}")
            if time.monotonic() > deadline:
                raise VmmError(f"the guest agent was not ready after {timeout_s:.0f} s (state {status['state']}); "
                               f"see GET /console for the guest's boot log")
            time.sleep(poll_s)

    def exec(self, argv: list[str], *, stdin: bytes | None = None, env: dict[str, str] | None = None,
             cwd: str = "/", timeout_s: float | None = None, output_cap: int = vmm_api.DEFAULT_OUTPUT_CAP,
             on_output: Callable[[int, bytes], None] | None = None) -> ExecResult:
        """Run argv in the guest. With on_output(stream, data) output is streamed (1 stdout, 2 stderr)."""
        request = vmm_api.exec_request(argv, env=env, cwd=cwd, stdin=stdin, timeout_s=timeout_s,
                                       output_cap=output_cap, stream=on_output is not None)
        http_timeout = (timeout_s or 3600.0) + 30.0
        if on_output is None:
            return ExecResult.from_json(self._call(*request, http_timeout))
        conn, response = self._request(*request, http_timeout)
        try:
            if response.status >= 400:
                raise VmmError(vmm_api.error_text(response.read(), response.status, response.reason),
                               response.status)
            out, err = bytearray(), bytearray()
            for line in response:
                event = json.loads(line)
                if "error" in event:
                    raise VmmError(f"the guest agent failed the exec: {event['error']}")
                if "exit" in event:
                    return ExecResult.from_json(event["exit"], bytes(out), bytes(err))
                for key, buf, stream in (("stdout_b64", out, 1), ("stderr_b64", err, 2)):
                    if key in event:
                        data = base64.b64decode(event[key])
                        buf.extend(data)
                        on_output(stream, data)
            raise VmmUnavailable("the VMM closed the exec stream before the command finished (did the VM stop?)")
        finally:
            conn.close()

    def start_process(self, argv: list[str], *, env: dict[str, str] | None = None, cwd: str = "/",
                      timeout_s: float | None = None, **process) -> Process:
        """Start an interactive process (stdin open, output streamed, killed if this client goes away).

        process: tty, root, user {"uid", "gid", "groups"}, rlimits [[resource, soft, hard]], size [rows, cols].
        Raises VmmError when it cannot start (the agent's sentence, e.g. `execve /bin/nope: ...`).
        """
        method, path, body = vmm_api.exec_request(argv, env=env, cwd=cwd, timeout_s=timeout_s, output_cap=0,
                                                  interactive=True, **process)
        conn = _UnixConnection(self.socket_path, self.timeout)
        try:
            conn.request(method, path, body=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
            response = conn.getresponse()
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            raise VmmUnavailable(f"no VMM at {self.socket_path} to start {argv[0]} ({exc}): the VM has stopped") \
                from None
        if response.status >= 400:
            data = response.read()
            conn.close()
            raise VmmError(vmm_api.error_text(data, response.status, response.reason), response.status)
        conn.sock.settimeout(None)  # a container's process may stay silent for as long as it likes
        process_ = Process(self, conn, response)
        first = process_._next_event()
        if "started" not in first:
            conn.close()
            raise VmmError(first.get("error") or f"the VMM did not start {argv[0]}: {first}")
        process_.exec_id, process_.pid = first["started"]["exec_id"], first["started"]["pid"]
        return process_


class Process:
    """An interactive process in the guest: events() yields ("stdout"|"stderr", bytes) then ("exit", ExecResult)."""

    def __init__(self, client: VmmClient, conn, response):
        self.client, self._conn, self._response = client, conn, response
        self.exec_id = self.pid = None

    def _next_event(self) -> dict:
        line = b"\n"
        while line == b"\n":  # blank lines are the VMM's heartbeats
            try:
                line = self._response.readline()
            except (OSError, http.client.HTTPException) as exc:
                raise VmmUnavailable(f"lost the VMM at {self.client.socket_path} while its process ran: {exc}") \
                    from None
        if not line:
            raise VmmUnavailable("the VMM closed the process stream before the process ended (did the VM stop?)")
        return json.loads(line)

    def events(self):
        while True:
            event = self._next_event()
            if "error" in event:
                raise VmmError(f"the guest agent failed the process: {event['error']}")
            if "exit" in event:
                yield "exit", ExecResult.from_json(event["exit"], b"", b"")
                return
            for key, name in (("stdout_b64", "stdout"), ("stderr_b64", "stderr")):
                if key in event:
                    yield name, base64.b64decode(event[key])

    def write(self, data: bytes, eof: bool = False) -> None:
        self.client.stdin(self.exec_id, data, eof)

    def signal(self, signo: int) -> None:
        self.client.signal(self.exec_id, signo)

    def resize(self, rows: int, cols: int) -> None:
        self.client.resize(self.exec_id, rows, cols)

    def close(self) -> None:
        self._conn.close()

