"""The VMM side of the agent: AgentChannel driving the real agent binary (--stdio, on the host), and the control
API server + client over a real Unix socket. No KVM: the byte stream is a pair of pipes instead of virtio-console."""

from __future__ import annotations

import hashlib
import os
import subprocess
import threading
import time

import pytest

from guestbuild.agent.build import build_agent
from hypervisor.agent_channel import AgentChannel, AgentError, AgentUnavailable
from hypervisor.api_server import ApiServer, Response
from hypervisor.client import VmmClient, VmmError, VmmUnavailable
from hypervisor.vmm_api import ApiError


class PipeAgent:
    """The agent as a subprocess; its stdout feeds the channel like the console device's TX does."""

    def __init__(self):
        self.proc = subprocess.Popen([str(build_agent()), "--stdio"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.channel = AgentChannel(self._write)
        self.reader = threading.Thread(target=self._pump, daemon=True)
        self.reader.start()

    def _write(self, data) -> int:
        return os.write(self.proc.stdin.fileno(), data)

    def _pump(self) -> None:
        while chunk := os.read(self.proc.stdout.fileno(), 65536):
            self.channel.feed(chunk)
        self.channel.close()

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self.reader.join(5)


@pytest.fixture
def agent():
    pipe = PipeAgent()
    assert pipe.channel.ready.wait(10), "the agent never sent READY"
    yield pipe.channel
    pipe.close()


def test_ready_carries_version(agent):
    assert agent.version.startswith("pclite-agent/2 ")
    assert agent.ping() < 1.0


def test_exec_exit_code_stdout_stdin(agent):
    assert agent.exec(["sh", "-c", "exit 3"]).exit_code == 3
    result = agent.exec(["cat"], stdin=b"hello\n" * 1000)
    assert result.stdout == b"hello\n" * 1000 and result.exit_code == 0


def test_one_mib_of_stdout_arrives_intact(agent):
    script = 'f=$(mktemp); head -c 1048576 /dev/urandom > "$f"; cat "$f"; sha256sum < "$f" >&2; rm "$f"'
    result = agent.exec(["sh", "-c", script], output_cap=1 << 20)
    assert len(result.stdout) == 1 << 20
    assert hashlib.sha256(result.stdout).hexdigest() == result.stderr.split()[0].decode()


def test_timeout_kills_and_reports(agent):
    started = time.monotonic()
    result = agent.exec(["sleep", "100"], timeout_s=1)
    assert result.timed_out and result.signal == 9 and time.monotonic() - started < 5


def test_concurrent_execs(agent):
    results = {}

    def run(i):
        results[i] = agent.exec(["sh", "-c", f"sleep 0.2; echo {i}"])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert {i: r.stdout for i, r in results.items()} == {i: f"{i}\n".encode() for i in range(8)}


def test_streaming_callback_sees_output_before_exit(agent):
    seen = []
    result = agent.exec(["sh", "-c", "echo a; echo b >&2"], on_output=lambda stream, data: seen.append(stream))
    assert sorted(set(seen)) == [1, 2] and result.exit_code == 0


def test_missing_binary_is_an_agent_error(agent):
    with pytest.raises(AgentError, match="/no/such/binary"):
        agent.exec(["/no/such/binary"])


def test_dead_agent_wakes_waiters_with_a_clear_error():
    pipe = PipeAgent()
    assert pipe.channel.ready.wait(10)
    waiter = threading.Thread(target=lambda: pytest.raises(AgentUnavailable, pipe.channel.exec, ["sleep", "30"]))
    waiter.start()
    time.sleep(0.3)
    pipe.close()
    waiter.join(5)
    assert not waiter.is_alive()
    with pytest.raises(AgentUnavailable, match="stopped"):
        pipe.channel.ping()


def test_not_ready_agent_is_unavailable():
    channel = AgentChannel(lambda data: len(data))
    with pytest.raises(AgentUnavailable, match="not ready"):
        channel.ping()


# ---- API server + client over a real Unix socket


@pytest.fixture
def api(tmp_path):
    def handler(request):
        if request.path == "/status":
            return Response(200, {"state": "running", "agent_ready": True})
        if request.path == "/echo":
            return Response(200, request.json())
        if request.path == "/stream":
            return Response(200, iter([b'{"stdout_b64": "aGk="}\n', b'{"exit": {"exit_code": 0, "signal": null, '
                                       b'"timed_out": false, "stdout_b64": "", "stderr_b64": "", "stdout_truncated": '
                                       b'false, "stderr_truncated": false, "duration_ms": 1}}\n']),
                            "application/x-ndjson")
        raise ApiError(404, f"no route {request.path}")

    path = str(tmp_path / "vmm.sock")
    server = ApiServer(path, handler)
    server.serve_in_background()
    yield path
    server.close()


def test_client_status_and_errors(api):
    client = VmmClient(api)
    assert client.status()["state"] == "running"
    with pytest.raises(VmmError, match="no route /nope") as info:
        client._call("GET", "/nope")
    assert info.value.status == 404


def test_bad_json_body_is_400(api):
    from hypervisor.client import _UnixConnection
    conn = _UnixConnection(api, 5)
    conn.request("POST", "/echo", body=b"{nope", headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    body = response.read()
    conn.close()
    assert response.status == 400 and b"not valid JSON" in body


def test_oversized_body_is_413(api):
    import socket
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(api)
        sock.sendall(b"POST /echo HTTP/1.1\r\nContent-Length: 999999999999\r\n\r\n")
        reply = sock.recv(4096)
    assert reply.startswith(b"HTTP/1.1 413") and b"limit" in reply


def test_chunked_ndjson_stream_reaches_the_client(api):
    conn, response = VmmClient(api)._request("POST", "/stream", {})
    lines = list(response)
    conn.close()
    assert response.getheader("Transfer-Encoding") == "chunked"
    assert len(lines) == 2 and lines[0] == b'{"stdout_b64": "aGk="}\n' and b'"exit"' in lines[1]


def test_gone_vmm_is_unavailable(tmp_path):
    with pytest.raises(VmmUnavailable, match="has stopped or was never started"):
        VmmClient(tmp_path / "missing.sock").status()
