"""The host bounds what a hostile guest agent can make the VMM keep: a real AgentChannel fed crafted frames (a
scripted fake agent), and the real agent (--stdio) for stdin flow control. PROTOCOL.md; issue 12."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import pytest

from hypervisor import agent_channel as ac
from hypervisor import agent_protocol as P
from hypervisor.agent_channel import AgentChannel, AgentUnavailable, BadExecRequest, MalformedReply
from hypervisor.agent_protocol import MsgType as T
from hypervisor.api_server import Request
from hypervisor.control import Controller
from tests.unit.test_vmm_agent_api import PipeAgent


class FakeGuest:
    """The guest end of a real AgentChannel: records the host's frames; the test answers with any bytes it likes."""

    def __init__(self):
        self.channel = AgentChannel(self._take)
        self._decoder = P.FrameDecoder()
        self.frames: list[P.Frame] = []
        self._seen = threading.Condition()
        self.channel.feed(P.encode_frame(T.READY, 0, b"pclite-agent/2 6.1.0-fake"))

    def _take(self, data) -> int:
        with self._seen:
            self.frames += self._decoder.feed(bytes(data))
            self._seen.notify_all()
        return len(data)

    def wait_for(self, frame_type: int, timeout: float = 5.0) -> P.Frame:
        with self._seen:
            assert self._seen.wait_for(lambda: any(f.type == frame_type for f in self.frames), timeout), \
                f"the host never sent {P.type_name(frame_type)}"
            return next(f for f in self.frames if f.type == frame_type)

    def send(self, frame_type: int, id_: int, payload: bytes = b"") -> None:
        self.channel.feed(P.encode_frame(frame_type, id_, payload))


def in_thread(fn, *args, **kwargs):
    """Run fn in a thread; returns (thread, box): box["result"] or box["error"] once the thread is done."""
    box: dict = {}

    def run():
        try:
            box["result"] = fn(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            box["error"] = exc
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, box


EXIT_OK = P.ExitStatus(0, 0).encode()


def test_buffered_exec_keeps_only_its_cap_whatever_the_guest_sends():
    guest = FakeGuest()
    thread, box = in_thread(guest.channel.exec, ["yes"], output_cap=100_000)
    exec_id = guest.wait_for(T.EXEC).id
    guest.send(T.STARTED, exec_id, P.Started(42).encode())
    chunk = b"y\n" * 32768
    for _ in range(64):  # 4 MiB on each stream, the guest ignoring the cap (and saying nothing truncated)
        guest.send(T.STDOUT, exec_id, chunk)
        guest.send(T.STDERR, exec_id, chunk)
    guest.send(T.EXIT, exec_id, EXIT_OK)
    thread.join(5)
    result = box["result"]
    assert len(result.stdout) == 100_000 and len(result.stderr) == 100_000
    assert result.stdout_truncated and result.stderr_truncated


def test_unlimited_or_oversized_cap_is_refused_for_buffered_exec():
    guest = FakeGuest()
    with pytest.raises(BadExecRequest, match="output_cap 0 .unlimited. is refused for a buffered exec"):
        guest.channel.exec(["true"], output_cap=0)
    with pytest.raises(BadExecRequest, match="output_cap must be"):
        guest.channel.exec(["true"], output_cap=ac.MAX_OUTPUT_CAP + 1)
    assert not guest.frames and not guest.channel.busy  # nothing sent, nothing left pending


def test_vmm_rss_stays_flat_while_the_guest_floods_a_capped_exec(tmp_path):
    """256 MiB of STDOUT for a 1 MiB cap, in a fresh interpreter: its peak RSS grows by a few MiB, not 256."""
    script = tmp_path / "flood.py"
    script.write_text(f"""
import sys
sys.path.insert(0, {str(os.getcwd())!r})
from tests.unit.test_agent_bounds import FakeGuest, in_thread, EXIT_OK
from hypervisor import agent_protocol as P
from hypervisor.agent_protocol import MsgType as T
guest = FakeGuest()
def kib(field):  # /proc, not ru_maxrss: that keeps the size of the pytest process this one was forked from
    return int(next(line for line in open("/proc/self/status") if line.startswith(field)).split()[1])
before = kib("VmRSS:")
thread, box = in_thread(guest.channel.exec, ["cat", "/dev/zero"], output_cap=1 << 20)
exec_id = guest.wait_for(T.EXEC).id
guest.send(T.STARTED, exec_id, P.Started(1).encode())
data = P.encode_frame(T.STDOUT, exec_id, bytes(65536)) * 16
for _ in range(256):
    guest.channel.feed(data)
guest.send(T.EXIT, exec_id, EXIT_OK)
thread.join(10)
after = kib("VmHWM:")
result = box["result"]
print(before, after, len(result.stdout), result.stdout_truncated)
""")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, check=True)
    before_kib, after_kib, kept, truncated = out.stdout.split()
    assert int(kept) == 1 << 20 and truncated == "True"
    assert int(after_kib) - int(before_kib) < 24 << 10, out.stdout  # KiB: the 1 MiB kept + frames in flight


MALFORMED = [
    pytest.param(T.STARTED, b"\x01\x02", id="short-STARTED"),
    pytest.param(T.ERROR, b"\x01", id="short-ERROR"),
    pytest.param(T.ERROR, b"\x02\x00\x00\x00no nul", id="ERROR-without-NUL"),
    pytest.param(T.EXIT, b"\x00" * 7, id="short-EXIT"),
    pytest.param(T.EXIT, bytes([9]) + b"\x00" * 15, id="EXIT-bad-kind"),
    pytest.param(0x99, b"", id="unknown-type"),
    pytest.param(T.DATA, b"x", id="DATA-for-an-exec"),
    pytest.param(T.STDOUT, b"", id="empty-STDOUT"),
    pytest.param(T.STDERR, bytes(P.MAX_OUTPUT_CHUNK + 1), id="oversized-STDERR"),
]


@pytest.mark.parametrize(("frame_type", "payload"), MALFORMED)
def test_malformed_frame_ends_a_streamed_exec_within_a_second(frame_type, payload):
    """Through the real Controller's NDJSON stream: an {"error"} line, then the end; the exec thread is gone."""
    guest = FakeGuest()
    controller = Controller(SimpleNamespace(), guest.channel, lambda n: b"")
    threads_before = threading.active_count()
    body = json.dumps({"argv": ["sleep", "1000"], "stream": True}).encode()
    response = controller(Request("POST", "/exec", {}, body))
    lines = []
    reader, _ = in_thread(lambda: lines.extend(json.loads(line) for line in response.body))
    exec_id = guest.wait_for(T.EXEC).id
    if frame_type not in (T.STARTED, T.ERROR):
        guest.send(T.STARTED, exec_id, P.Started(7).encode())
    started = time.monotonic()
    guest.send(frame_type, exec_id, payload)
    reader.join(1.0)
    assert not reader.is_alive(), "the stream did not end within 1 s"
    assert time.monotonic() - started < 1.0
    assert "error" in lines[-1] and "agent" in lines[-1]["error"], lines
    deadline = time.monotonic() + 1
    while threading.active_count() > threads_before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert threading.active_count() <= threads_before, [t.name for t in threading.enumerate()]
    assert not guest.channel.busy  # the request id is released


def test_malformed_exit_ends_an_interactive_exec_too():
    guest = FakeGuest()
    controller = Controller(SimpleNamespace(), guest.channel, lambda n: b"")
    body = json.dumps({"argv": ["sh"], "interactive": True, "output_cap": 0}).encode()
    response = controller(Request("POST", "/exec", {}, body))
    lines = []
    reader, _ = in_thread(lambda: lines.extend(json.loads(line) for line in response.body if line.strip()))
    exec_id = guest.wait_for(T.EXEC).id
    guest.send(T.STARTED, exec_id, P.Started(7).encode())
    guest.send(T.EXIT, exec_id, b"\x00")
    reader.join(1.0)
    assert not reader.is_alive(), "the interactive stream did not end within 1 s"
    assert "started" in lines[0] and "malformed EXIT" in lines[-1]["error"], lines
    assert exec_id not in controller.live


def test_ping_answered_with_output_or_a_flood_is_an_error():
    guest = FakeGuest()
    thread, box = in_thread(guest.channel.ping, 5.0)
    guest.send(T.STDOUT, guest.wait_for(T.PING).id, b"not an OK")
    thread.join(2)
    assert isinstance(box["error"], MalformedReply) and "STDOUT" in str(box["error"])
    guest.frames.clear()
    thread, box = in_thread(guest.channel.ping, 5.0)
    ping_id = guest.wait_for(T.PING).id
    frame = P.encode_frame(T.OK, ping_id, bytes(P.MAX_PAYLOAD))
    guest.channel.feed(frame * 8)  # 8 MiB of answers in one burst, before the API thread wakes
    thread.join(2)
    assert "result" in box or isinstance(box.get("error"), MalformedReply)


def test_slow_stream_consumer_drops_marked_output_and_never_blocks_the_channel():
    """The consumer stops reading: the vCPU side (feed) keeps going, that exec's output is dropped and counted."""
    guest = FakeGuest()
    lines = ac.StreamLines(limit=2)
    thread, box = in_thread(guest.channel.exec, ["yes"], output_cap=0,
                            on_output=lambda stream, data: lines.put(data))
    exec_id = guest.wait_for(T.EXEC).id
    guest.send(T.STARTED, exec_id, P.Started(1).encode())
    started = time.monotonic()
    for _ in range(256):  # 16 MiB, nobody reading the lines
        guest.send(T.STDOUT, exec_id, bytes(65536))
    assert time.monotonic() - started < 5  # feed never waited for the consumer
    # a ping still gets through while that exec is stuck
    ping_thread, ping_box = in_thread(guest.channel.ping, 2.0)
    guest.send(T.OK, guest.wait_for(T.PING).id, b"ping")
    ping_thread.join(2)
    assert "result" in ping_box
    guest.send(T.EXIT, exec_id, EXIT_OK)
    lines.close()  # the client went away: the blocked exec thread is released
    thread.join(5)
    result = box["result"]
    assert result.stdout_truncated and result.output_dropped >= 8 << 20
    assert result.as_json()["output_dropped"] == result.output_dropped


# ---- the real agent: one exec's stdin backed up starves nothing else

@pytest.fixture
def agent():
    pipe = PipeAgent()
    assert pipe.channel.ready.wait(10)
    yield pipe.channel
    pipe.close()


def test_blocked_stdin_does_not_delay_ping_or_another_exec(agent):
    assert agent.acks_stdin
    ids = []
    blocked, blocked_box = in_thread(agent.exec, ["sh", "-c", "sleep 30"], interactive=True, timeout_s=20,
                                     on_started=lambda exec_id, pid: ids.append(exec_id), on_output=lambda *a: None)
    deadline = time.monotonic() + 5
    while not ids and time.monotonic() < deadline:
        time.sleep(0.01)
    # 8 MiB for a child that never reads: the window (1 MiB) fills, then the host holds the rest
    feeder, feeder_box = in_thread(agent.send_stdin, ids[0], bytes(8 << 20), False, 3.0)
    time.sleep(0.5)
    started = time.monotonic()
    assert agent.ping() < 1.0
    assert agent.exec(["echo", "other"], timeout_s=5).stdout == b"other\n"
    assert time.monotonic() - started < 2.0
    feeder.join(5)
    assert isinstance(feeder_box["error"], AgentUnavailable) and "not reading its stdin" in str(feeder_box["error"])
    agent.signal(ids[0], 9)
    blocked.join(10)
    assert blocked_box["result"].signal == 9


def test_stdin_window_passes_megabytes_to_a_reader(agent):
    blob = os.urandom(3 << 20)
    result = agent.exec(["sha256sum"], stdin=blob, timeout_s=30)
    import hashlib
    assert result.stdout.split()[0].decode() == hashlib.sha256(blob).hexdigest()
    assert not agent.busy
