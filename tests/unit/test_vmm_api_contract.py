"""hypervisor/vmm_api.py is the one VMM API contract: the server routes exactly its routes, both clients (VmmClient,
the OCI runtime's transport) send only its requests with its field names, exec is validated by its one validator
(in the VMM and in pclited's schema), error answers have one decoder; and the API server's framing and socket rules
(issue 12): a bad Content-Length is refused, the socket is 0600 from its creation, only a socket is replaced."""

from __future__ import annotations

import inspect
import json
import os
import socket
import stat
import threading

import pytest

from hypervisor import client as vmm_client
from hypervisor import vmm_api
from hypervisor.agent_channel import AgentChannel
from hypervisor.api_server import ApiServer, Response, listen_unix
from hypervisor.control import Controller
from hypervisor.vmm_api import ApiError
from service.runtime import transport

EXIT = {"exit_code": 0, "signal": None, "timed_out": False, "stdout_b64": "", "stderr_b64": "",
        "stdout_truncated": False, "stderr_truncated": False, "duration_ms": 1}
VALIDATORS = {"exec": vmm_api.check_exec, "actions": vmm_api.check_action, "snapshot": vmm_api.check_snapshot,
              "drive": vmm_api.check_drive, "mounts": vmm_api.check_mounts, "hostname": vmm_api.check_hostname,
              "exec_stdin": vmm_api.check_stdin, "exec_signal": vmm_api.check_signal,
              "exec_resize": vmm_api.check_resize}


class Recorder:
    """A VMM stand-in on a real Unix socket that answers every contract route and records what it was sent."""

    def __init__(self, path: str):
        self.seen: list[tuple[str, str, dict]] = []
        self.server = ApiServer(path, self)
        self.server.serve_in_background()

    def __call__(self, request) -> Response:
        body = request.json()
        self.seen.append((request.method, request.path, body))
        if request.path == "/exec" and (body.get("interactive") or body.get("stream")):
            lines = [{"started": {"exec_id": 7, "pid": 42}}] if body.get("interactive") else []
            return Response(200, iter([json.dumps(line).encode() + b"\n" for line in [*lines, {"exit": EXIT}]]),
                            "application/x-ndjson")
        if request.path == "/exec":
            return Response(200, EXIT)
        if request.path == "/console":
            return Response(200, b"boot log", "text/plain")
        if request.path == "/agent/ping":
            return Response(200, {"rtt_ms": 1.5})
        return Response(200, {"state": "running", "agent_ready": True})

    def take(self) -> list[tuple[str, str, dict]]:
        seen, self.seen = self.seen, []
        return seen


@pytest.fixture
def recorder(tmp_path):
    rec = Recorder(str(tmp_path / "vmm.sock"))
    yield rec
    rec.server.close()


def _common_calls(c) -> None:
    """Every VmmCalls call, the same on any transport."""
    c.status()
    assert c.ping() == 0.0015
    c.action("pause")
    assert c.console(100) == b"boot log"
    c.snapshot("/run/snap", resume=False)
    c.swap_drive("/var/img.ext4", read_only=True, wait_s=1)
    c.mount("proc", "/rootfs/proc", "proc")
    c.mounts([{"source": "none", "target": "/rootfs/dev", "fstype": "tmpfs", "flags": 2, "data": "", "mkdir": True}])
    c.set_hostname("c1")
    c.stdin(7, b"hi", eof=True)
    c.signal(7, 15)
    c.resize(7, 24, 80)


def _assert_contract(seen) -> None:
    by_route = {route: name for name, route in vmm_api.ROUTES.items()}
    for method, path, body in seen:
        name = by_route.get((method, path.partition("?")[0]))
        assert name is not None, f"{method} {path} is not a contract route"
        assert set(body) <= set(vmm_api.FIELDS[name]), (name, set(body) - set(vmm_api.FIELDS[name]))
        if name in VALIDATORS:
            VALIDATORS[name](dict(body))  # what a client sends, the contract accepts


def test_the_server_routes_exactly_the_contract_routes():
    controller = Controller(None, AgentChannel(lambda data: len(data)), lambda n: b"")
    assert set(controller.routes) == set(vmm_api.ROUTES.values())
    for name, route in vmm_api.ROUTES.items():
        assert controller.routes[route].__name__ == name


def test_both_clients_send_the_contract_requests_and_the_same_ones(recorder):
    pclited_side = vmm_client.VmmClient(recorder.server.path)
    _common_calls(pclited_side)
    from_vmm_client = recorder.take()
    runtime_side = transport.Vmm(recorder.server.path)
    _common_calls(runtime_side)
    from_runtime = recorder.take()
    assert from_vmm_client == from_runtime and len(from_runtime) == 12
    _assert_contract(from_runtime)
    assert {(m, p.partition("?")[0]) for m, p, _ in from_runtime} == set(vmm_api.ROUTES.values()) - {
        vmm_api.ROUTES["exec"]}

    out = []
    assert pclited_side.exec(["cat"], stdin=b"x", timeout_s=5).exit_code == 0
    assert pclited_side.exec(["cat"], on_output=lambda *a: out.append(a)).exit_code == 0
    process = pclited_side.start_process(["sh"], root="/rootfs", tty=True, size=[24, 80],
                                         user={"uid": 1, "gid": 1, "groups": []}, rlimits=[[7, 64, 64]])
    assert (process.exec_id, process.pid) == (7, 42)
    process.write(b"more")
    process.signal(2)
    process.resize(30, 100)
    process.close()
    oci_body = {"argv": ["sh"], "env": {"A": "1"}, "cwd": "/", "root": "/rootfs",
                "user": {"uid": 0, "gid": 0, "groups": []}, "tty": True, "size": [24, 80]}
    stream = runtime_side.start(dict(oci_body))
    assert stream.next_lines()[0] == {"started": {"exec_id": 7, "pid": 42}}
    stream.close()
    seen = recorder.take()
    _assert_contract(seen)
    exec_bodies = [body for _, path, body in seen if path == "/exec"]
    assert [b.get("interactive", False) for b in exec_bodies] == [False, False, True, True]
    assert exec_bodies[1]["stream"] is True and exec_bodies[0]["stdin_b64"] == "eA=="
    assert exec_bodies[3] == vmm_api.exec_request(**oci_body, output_cap=0, interactive=True)[2]


def test_no_client_spells_a_route_of_its_own():
    """The paths live in the contract only: a client module that writes one down has its own copy of a request."""
    for module in (vmm_client, transport):
        source = inspect.getsource(module)
        for _, path in vmm_api.ROUTES.values():
            assert f'"{path}' not in source and f"'{path}" not in source, (module.__name__, path)


@pytest.mark.parametrize("body, message", [
    ({"argv": []}, "argv must be a list of 1..4096"),
    ({"argv": ["echo", ""]}, "non-empty strings"),
    ({"argv": ["a\0b"]}, "without NUL"),
    ({"argv": ["x"] * 4097}, "argv must be a list of 1..4096"),
    ({"argv": ["cat"], "stdin_b64": "!!"}, "stdin_b64 is not valid base64"),
    ({"argv": ["cat"], "stdin_b64": "QUFB" * ((16 << 20) // 3 + 1)}, "the limit is 16777216"),
    ({"argv": ["sh"], "timeout_s": -1}, "timeout_s must be a positive number"),
    ({"argv": ["sh"], "timeout_s": 86401}, "up to 86400"),
    ({"argv": ["sh"], "cwd": "/a\0"}, "cwd must be a path"),
    ({"argv": ["sh"], "argvv": []}, "takes no field 'argvv'"),
])
def test_exec_is_refused_alike_by_the_vmm_and_by_pclited(body, message):
    from pydantic import ValidationError

    from service.schemas import ExecRequest
    controller = Controller(None, AgentChannel(lambda data: len(data)), lambda n: b"")
    from hypervisor.api_server import Request
    with pytest.raises(ApiError, match=message) as vmm_refusal:
        controller.exec(Request("POST", "/exec", {}, json.dumps(body).encode()))
    assert vmm_refusal.value.status == 400
    with pytest.raises(ValidationError) as pclited_refusal:
        ExecRequest.model_validate(body)
    if "argvv" in body:
        assert "Extra inputs are not permitted" in str(pclited_refusal.value)  # pydantic's own: an unknown field
    else:  # the same sentence: one validator, and the pydantic fields carry no limits of their own
        assert f"Value error, {vmm_refusal.value}" in str(pclited_refusal.value)


def test_pclited_exec_schema_documents_the_contract_limits():
    from service.schemas import MAX_EXEC_STDIN, ExecRequest
    schema = ExecRequest.model_json_schema()["properties"]
    assert schema["argv"]["maxItems"] == vmm_api.MAX_ARGS and schema["cwd"]["maxLength"] == vmm_api.MAX_PATH
    assert schema["timeout_s"]["maximum"] == vmm_api.MAX_TIMEOUT_S and MAX_EXEC_STDIN == vmm_api.MAX_EXEC_STDIN
    assert set(schema) <= set(vmm_api.EXEC_FIELDS)
    assert all(not field.metadata for field in ExecRequest.model_fields.values())  # no second set of limits


@pytest.mark.parametrize("payload, text", [
    (b'{"error": "no interactive exec 3 is running"}', "no interactive exec 3 is running"),
    (b'{"type": "about:blank", "title": "Conflict", "status": 409, "detail": "VM vm-1 is\\n ready"}',
     "Conflict: VM vm-1 is ready"),
    (b'{"detail": [{"loc": ["body", "argv"], "msg": "too short"}, {"msg": "bad"}]}', "argv: too short; bad"),
    (b'{"title": "Not Found", "detail": "Not Found"}', "Not Found"),
    (b"<html>\n bad gateway</html>", "HTTP 502: <html> bad gateway</html>"),
    (b"", "Bad Gateway"),
])
def test_one_decoder_reads_every_error_answer(payload, text):
    from service.cli import client as cli_client
    from service.runtime.jsonlite import loads
    assert vmm_api.error_text(payload, 502, "Bad Gateway") == text
    assert vmm_api.error_text(payload, 502, "Bad Gateway", loads=loads) == text
    assert cli_client._problem_text(cli_client.Response("GET", "/", 502, "Bad Gateway", None, payload)) == text
    if payload:
        assert transport._problem_text(payload, 502) == text


def test_both_clients_decode_the_vmms_error_answer(tmp_path):
    def handler(request):
        raise ApiError(409, "the guest agent refused: mount /rootfs/proc: no such device")
    server = ApiServer(str(tmp_path / "vmm.sock"), handler)
    server.serve_in_background()
    try:
        with pytest.raises(vmm_client.VmmError) as one:
            vmm_client.VmmClient(server.path).set_hostname("c1")
        with pytest.raises(transport.WireError) as other:
            transport.Vmm(server.path).set_hostname("c1")
    finally:
        server.close()
    assert one.value.status == other.value.status == 409
    assert str(one.value) == "the guest agent refused: mount /rootfs/proc: no such device"
    assert str(other.value) == f"the VM's VMM refused PUT /hostname: {one.value}"


# ---- the API server: framing and its socket (issue 12)

def _raw(path: str, request: bytes) -> bytes:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(5)
        sock.connect(path)
        sock.sendall(request)
        reply = b""
        while chunk := sock.recv(65536):  # the server closes after a refusal: nothing is left waiting
            reply += chunk
    return reply


@pytest.mark.parametrize("header, status, words", [
    (b"Content-Length: -1\r\n", 400, b"bad Content-Length '-1'"),
    (b"Content-Length: abc\r\n", 400, b"bad Content-Length"),
    (b"Content-Length: +2\r\n", 400, b"bad Content-Length"),
    (b"Content-Length: 1_0\r\n", 400, b"bad Content-Length"),
    (b"Content-Length: 2\r\nContent-Length: 3\r\n", 400, b"bad Content-Length"),
    (b"Content-Length: 67108865\r\n", 413, b"over the 67108864 byte limit"),
])
def test_a_bad_content_length_is_refused_and_the_server_goes_on(tmp_path, header, status, words):
    seen = []
    server = ApiServer(str(tmp_path / "vmm.sock"), lambda request: seen.append(request) or Response(200, {}))
    server.serve_in_background()
    threads = threading.active_count()
    try:
        reply = _raw(server.path, b"PUT /hostname HTTP/1.1\r\n" + header + b"\r\n{}")
        head, _, body = reply.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 %d" % status) and words in body, reply
        assert json.loads(body)["error"] and not seen  # one sentence, and no handler ran
        assert _raw(server.path, b"GET /status HTTP/1.1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n") \
            .startswith(b"HTTP/1.1 200") and len(seen) == 1
    finally:
        server.close()
    for _ in range(100):  # the refused connection's thread has ended
        if threading.active_count() <= threads:
            break
        threading.Event().wait(0.01)
    assert threading.active_count() <= threads


def test_the_socket_is_0600_from_its_creation_whatever_the_umask(tmp_path, monkeypatch):
    modes = []

    class Watched(socket.socket):  # the mode between bind and listen: a chmod after listen would be too late
        def listen(self, *args):
            modes.append(stat.S_IMODE(os.lstat(self.getsockname()).st_mode))
            return super().listen(*args)
    monkeypatch.setattr(socket, "socket", Watched)
    old = os.umask(0)
    try:
        server = ApiServer(str(tmp_path / "vmm.sock"), lambda request: Response(200, {}))
        assert os.umask(0) == 0  # and put back as it was
    finally:
        os.umask(old)
    try:
        assert modes == [0o600] and stat.S_IMODE(os.lstat(server.path).st_mode) == 0o600
    finally:
        server.close()
    assert not os.path.exists(server.path)


def test_only_a_socket_is_replaced_at_a_socket_path(tmp_path):
    path = tmp_path / "vmm.sock"
    path.write_text("not a socket")
    with pytest.raises(OSError, match=f"^{path} exists and is not a socket: refusing to replace it"):
        ApiServer(str(path), lambda request: Response(200, {}))
    assert path.read_text() == "not a socket"
    path.unlink()
    stale = listen_unix(str(path))
    stale.close()  # a dead VMM's socket file stays behind
    server = ApiServer(str(path), lambda request: Response(200, {}))  # replaced
    server.serve_in_background()
    try:
        assert _raw(str(path), b"GET /x HTTP/1.1\r\nConnection: close\r\n\r\n").startswith(b"HTTP/1.1 200")
    finally:
        os.unlink(path)
        path.write_text("put here since")  # close() removes its own socket only
        server.close()
    assert path.read_text() == "put here since"


def test_the_vmm_refuses_an_api_socket_path_held_by_another_file(tmp_path):
    import subprocess
    import sys
    kernel, held = tmp_path / "kernel", tmp_path / "api.sock"
    kernel.write_bytes(bytes(8192))
    held.write_text("keep")
    done = subprocess.run([sys.executable, "-m", "hypervisor", "run", "--kernel", str(kernel), "--mem", "64",
                           "--api-sock", str(held)], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 1 and held.read_text() == "keep"
    assert done.stderr.strip().splitlines() == [f"pclite: error: {held} exists and is not a socket: refusing to "
                                                f"replace it; remove it or pick another socket path"]
