"""The real guest agent, built with gcc and run on the host as `pclite-agent --stdio`, driven with the Python codec.

--stdio mode leaves the host alone: SHUTDOWN and SET_CLOCK are refused, the hostname test runs in `unshare --uts`.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import gzip
import hashlib
import os
import queue
import shutil
import signal
import stat
import struct
import subprocess
import tempfile
import termios
import threading
import time
from dataclasses import dataclass, field

import pytest

from guestbuild.agent import build as agent_build
from guestbuild.agent.build import build_agent
from guestbuild.cache import BuildError
from guestbuild.initramfs.builder import _is_static_elf, build_initramfs
from hypervisor import agent_protocol as p

RECV_TIMEOUT = 15.0


@pytest.fixture(scope="session")
def agent_binary():
    return build_agent()


@dataclass
class ExecResult:
    pid: int | None = None
    stdout: bytes = b""
    stderr: bytes = b""
    exit: p.ExitStatus | None = None
    error: p.ErrorReply | None = None
    chunks: list[int] = field(default_factory=list)  # payload sizes of STDOUT/STDERR frames


class AgentSession:
    """One `pclite-agent --stdio` process; a thread decodes its stdout into frames, routed here by id."""

    def __init__(self, binary, prefix: tuple[str, ...] = ()) -> None:
        self.stderr_file = tempfile.TemporaryFile()  # noqa: SIM115 (lives as long as the session)
        self.proc = subprocess.Popen([*prefix, str(binary), "--stdio"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.stderr_file)
        self._frames: queue.Queue = queue.Queue()
        self._stash: dict[int, collections.deque] = collections.defaultdict(collections.deque)
        self.stdin_acked: dict[int, int] = collections.defaultdict(int)  # exec id -> STDIN_ACK total
        self._send_lock = threading.Lock()
        self.decode_error: Exception | None = None
        threading.Thread(target=self._reader, daemon=True).start()
        ready = self.recv_any()
        assert ready.type == p.MsgType.READY and ready.id == 0, ready
        self.ready = p.decode_payload(ready)

    def _reader(self) -> None:
        decoder = p.FrameDecoder()
        fd = self.proc.stdout.fileno()
        try:
            while data := os.read(fd, 1 << 16):
                for frame in decoder.feed(data):
                    self._frames.put(frame)
        except p.ProtocolError as exc:
            self.decode_error = exc
        self._frames.put(None)

    def stderr_text(self) -> str:
        self.stderr_file.seek(0)
        return self.stderr_file.read().decode(errors="replace")

    def send(self, *frames: p.Frame) -> None:
        with self._send_lock:
            self.proc.stdin.write(b"".join(f.encode() for f in frames))
            self.proc.stdin.flush()

    def send_raw(self, data: bytes) -> None:
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def recv_any(self, timeout: float = RECV_TIMEOUT) -> p.Frame | None:
        """The next frame in stream order (stashed ones first), or None at end of stream."""
        for pending in self._stash.values():
            if pending:
                return pending.popleft()
        return self._pull(timeout)

    def _pull(self, timeout: float) -> p.Frame | None:
        try:
            frame = self._frames.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no frame from the agent within {timeout}s; its stderr: {self.stderr_text()!r}") \
                from None
        if frame is None:
            self._frames.put(None)  # stay at end of stream
        return frame

    def recv(self, id_: int, timeout: float = RECV_TIMEOUT) -> p.Frame:
        """The next frame with this id; frames for other ids are kept for later."""
        if self._stash[id_]:
            return self._stash[id_].popleft()
        deadline = time.monotonic() + timeout
        while True:
            frame = self._pull(max(0.01, deadline - time.monotonic()))
            assert frame is not None, f"agent closed its stdout; stderr: {self.stderr_text()!r}"
            if frame.type == p.MsgType.STDIN_ACK:  # flow control, counted apart (PROTOCOL.md)
                self.stdin_acked[frame.id] += p.decode_payload(frame).consumed
                continue
            if frame.id == id_:
                return frame
            self._stash[frame.id].append(frame)

    def request(self, frame: p.Frame, timeout: float = RECV_TIMEOUT) -> p.Frame:
        self.send(frame)
        return self.recv(frame.id, timeout)

    def ok(self, frame: p.Frame) -> bytes:
        reply = self.request(frame)
        assert reply.type == p.MsgType.OK, p.decode_payload(reply)
        return reply.payload

    def error(self, frame: p.Frame) -> p.ErrorReply:
        reply = self.request(frame)
        assert reply.type == p.MsgType.ERROR, reply
        return p.decode_payload(reply)

    def collect(self, id_: int, timeout: float = RECV_TIMEOUT) -> ExecResult:
        """Frames of one exec until its EXIT or ERROR."""
        result = ExecResult()
        out, err = bytearray(), bytearray()
        while True:
            frame = self.recv(id_, timeout)
            if frame.type == p.MsgType.STARTED:
                assert result.pid is None, "two STARTED frames"
                result.pid = p.decode_payload(frame).pid
            elif frame.type in (p.MsgType.STDOUT, p.MsgType.STDERR):
                assert result.pid is not None, "output before STARTED"
                (out if frame.type == p.MsgType.STDOUT else err).extend(frame.payload)
                result.chunks.append(len(frame.payload))
            elif frame.type == p.MsgType.EXIT:
                result.exit = p.decode_payload(frame)
                break
            elif frame.type == p.MsgType.ERROR:
                result.error = p.decode_payload(frame)
                break
            else:
                raise AssertionError(f"unexpected frame for exec {id_}: {frame}")
        result.stdout, result.stderr = bytes(out), bytes(err)
        return result

    def run(self, id_: int, argv, timeout: float = RECV_TIMEOUT, **kwargs) -> ExecResult:
        self.send(p.ExecRequest(tuple(argv), **kwargs).frame(id_))
        return self.collect(id_, timeout)

    def close(self) -> int:
        if self.proc.stdin and not self.proc.stdin.closed:
            with contextlib.suppress(BrokenPipeError):
                self.proc.stdin.close()
        try:
            return self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError("the agent did not exit within 10 s of end of input") from None


@pytest.fixture
def agent(agent_binary):
    session = AgentSession(agent_binary)
    yield session
    if session.proc.poll() is None:
        session.close()
    assert session.decode_error is None, session.decode_error


def _exited(result: ExecResult, code: int = 0) -> bool:
    return (result.error is None and result.exit is not None and result.exit.kind == p.ExitKind.EXITED
            and result.exit.code == code)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


# ---- start-up and simple requests ----

def test_ready_names_protocol_version_and_kernel_release(agent):
    assert agent.ready == p.Ready("pclite-agent/2", os.uname().release)


def test_ping_echoes_payload_of_any_size(agent):
    for id_, payload in enumerate([b"", b"hello", os.urandom(70_000), os.urandom(p.MAX_PAYLOAD)], start=1):
        assert agent.ok(p.ping(id_, payload)) == payload


def test_unknown_request_type_is_enosys(agent):
    reply = agent.error(p.Frame(0x42, 77, b"whatever"))
    assert reply.errno == errno.ENOSYS and "unknown request type 66" in reply.message


def test_oversized_frame_is_error_id_0_and_exit_2(agent):
    agent.send_raw(p.HEADER.pack(p.MAX_PAYLOAD + 1, 5, p.MsgType.PING, 0))
    frame = agent.recv_any()
    assert frame.type == p.MsgType.ERROR and frame.id == 0
    reply = p.decode_payload(frame)
    assert reply.errno == errno.EPROTO and str(p.MAX_PAYLOAD + 1) in reply.message
    assert agent.proc.wait(timeout=10) == 2


def test_malformed_requests_get_einval_and_the_agent_carries_on(agent, tmp_path):
    # every payload length up to the fixed fields alone (no strings): zeros, so argc is 0 and paths are missing
    malformed = [(t, bytes(n)) for t, longest in ((p.MsgType.EXEC, 16), (p.MsgType.SIGNAL, 3),
                                                  (p.MsgType.WRITE_FILE, 8), (p.MsgType.READ_FILE, 12))
                 for n in range(longest + 1)]
    malformed += [
        (p.MsgType.EXEC, struct.pack("<IIIHH", 0, 0, 0, 2, 0) + b"/\0true\0"),  # argc 2, one string
        (p.MsgType.EXEC, struct.pack("<IIIHH", 0, 0, 0, 0, 0) + b"/\0"),  # argc 0
        (p.MsgType.WRITE_FILE, struct.pack("<II", 0o644, 0) + str(tmp_path / "f").encode()),  # path without NUL
    ]
    for id_, (type_, payload) in enumerate(malformed, start=1):
        reply = agent.error(p.Frame(type_, id_, payload))
        assert reply.errno == errno.EINVAL, (type_, payload, reply)
    random_junk = [p.Frame(t, 5000 + i, os.urandom(i * 7)) for i, t in enumerate([0, 99, 0x80, 0x87, 0xFFFF] * 4)]
    agent.send(*random_junk)
    for frame in random_junk:
        assert p.decode_payload(agent.recv(frame.id)).errno == errno.ENOSYS
    assert agent.ok(p.ping(9999, b"alive")) == b"alive"
    assert not (tmp_path / "f").exists()


def test_shutdown_and_set_clock_are_refused_in_stdio_mode(agent):
    for frame in (p.ShutdownRequest(p.ShutdownHow.REBOOT).frame(1), p.SetClockRequest(0, 0).frame(2)):
        reply = agent.error(frame)
        assert reply.errno == errno.EPERM and "not allowed in --stdio mode" in reply.message
    assert agent.ok(p.ping(3, b"still here")) == b"still here"


def test_reseed(agent):
    reply = agent.request(p.reseed(1, os.urandom(32)))
    if os.geteuid() == 0:
        assert reply.type == p.MsgType.OK, p.decode_payload(reply)
    else:
        assert reply.type == p.MsgType.ERROR and p.decode_payload(reply).errno == errno.EPERM


# ---- exec ----

def test_uname_r_matches_ready(agent):
    result = agent.run(1, ["uname", "-r"])
    assert _exited(result, 0), result
    assert result.stdout.decode() == os.uname().release + "\n" and result.stderr == b""
    assert result.pid and result.exit.duration_us > 0


def test_exit_status_and_stderr(agent):
    result = agent.run(1, ["sh", "-c", "echo oops >&2; exit 3"])
    assert _exited(result, 3), result
    assert result.stderr == b"oops\n" and result.stdout == b""


def test_killed_by_own_signal_is_reported_signaled(agent):
    result = agent.run(1, ["sh", "-c", "kill -9 $$"])
    assert result.exit.kind == p.ExitKind.SIGNALED and result.exit.code == 9 and not result.exit.timed_out


def test_one_mib_of_stdout_arrives_intact_in_bounded_chunks(agent, tmp_path):
    blob = os.urandom(1 << 20)
    (tmp_path / "blob").write_bytes(blob)
    result = agent.run(1, ["cat", str(tmp_path / "blob")])
    assert _exited(result), result
    assert hashlib.sha256(result.stdout).hexdigest() == hashlib.sha256(blob).hexdigest()
    assert max(result.chunks) <= p.MAX_OUTPUT_CHUNK


def test_stdin_is_echoed_back_through_cat(agent):
    blob = os.urandom((1 << 20) + 12345)
    agent.send(p.ExecRequest(("cat",), stdin=True).frame(9))
    for offset in range(0, len(blob), 50_000):
        agent.send(p.stdin(9, blob[offset:offset + 50_000]))
    agent.send(p.stdin(9, b""))  # close: cat sees end of file and exits
    result = agent.collect(9)
    assert _exited(result), result
    assert hashlib.sha256(result.stdout).hexdigest() == hashlib.sha256(blob).hexdigest()
    assert agent.stdin_acked[9] == len(blob)  # every byte given back to the host's window, before EXIT


def test_stdin_is_dev_null_without_stdin_follows(agent):
    agent.send(p.ExecRequest(("cat",)).frame(1), p.stdin(1, b"dropped"))
    result = agent.collect(1)
    assert _exited(result) and result.stdout == b""


def test_timeout_kills_and_reports_timed_out(agent):
    started = time.monotonic()
    result = agent.run(1, ["sleep", "100"], timeout_ms=1000)
    elapsed = time.monotonic() - started
    assert result.exit.timed_out and result.exit.kind == p.ExitKind.SIGNALED and result.exit.code == signal.SIGKILL
    assert 0.9 < elapsed < 10 and 900_000 <= result.exit.duration_us < 10_000_000
    assert not _pid_alive(result.pid)


def test_timeout_kills_the_whole_process_group(agent):
    result = agent.run(1, ["sh", "-c", "sleep 100 & echo $!; wait"], timeout_ms=500)
    assert result.exit.timed_out
    grandchild = int(result.stdout)
    deadline = time.monotonic() + 5
    while _pid_alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _pid_alive(grandchild)


def test_background_grandchild_holding_stdout_delays_exit(agent):
    started = time.monotonic()
    result = agent.run(1, ["sh", "-c", "(sleep 1; echo late) & echo early"])
    assert _exited(result) and result.stdout == b"early\nlate\n"
    assert time.monotonic() - started >= 0.9 and not result.exit.timed_out


def test_eight_concurrent_execs(agent):
    started = time.monotonic()
    for id_ in range(1, 9):
        agent.send(p.ExecRequest(("sh", "-c", f"sleep 1; echo exec{id_}; exit {id_}")).frame(id_))
    results = {id_: agent.collect(id_) for id_ in range(1, 9)}
    assert time.monotonic() - started < 4, "the execs did not run concurrently"
    for id_, result in results.items():
        assert _exited(result, id_) and result.stdout == f"exec{id_}\n".encode(), (id_, result)
    assert len({r.pid for r in results.values()}) == 8


def test_output_cap_truncates_each_stream(agent):
    script = "head -c 100000 /dev/zero; head -c 700 /dev/zero | tr '\\0' e >&2"
    result = agent.run(1, ["sh", "-c", script], output_cap=1000)
    assert _exited(result), result
    assert result.stdout == bytes(1000) and result.exit.stdout_truncated
    assert result.stderr == b"e" * 700 and not result.exit.stderr_truncated
    uncapped = agent.run(2, ["head", "-c", "100000", "/dev/zero"])
    assert len(uncapped.stdout) == 100000 and not uncapped.exit.stdout_truncated


def test_signal_to_running_exec_reports_signaled(agent):
    agent.send(p.ExecRequest(("sleep", "100")).frame(4))
    started = agent.recv(4)
    assert started.type == p.MsgType.STARTED
    assert agent.ok(p.SignalRequest(signal.SIGTERM).frame(4)) == b""
    result = agent.collect(4)
    assert result.exit.kind == p.ExitKind.SIGNALED and result.exit.code == signal.SIGTERM
    assert not result.exit.timed_out


def test_signal_to_unknown_exec_is_esrch(agent):
    reply = agent.error(p.SignalRequest(signal.SIGTERM).frame(1234))
    assert reply.errno == errno.ESRCH and "1234" in reply.message


def test_missing_binary_is_one_error_frame_naming_path_and_errno(agent):
    result = agent.run(1, ["/bin/nope-pclite"])
    assert result.exit is None and result.pid is None
    assert result.error == p.ErrorReply(errno.ENOENT, "execve /bin/nope-pclite: No such file or directory")
    # no EXIT (nor anything else) follows for that id
    assert agent.ok(p.ping(2, b"after")) == b"after"
    assert not agent._stash[1]


def test_missing_binary_on_path_and_bad_cwd(agent):
    result = agent.run(1, ["no-such-program-pclite"])
    assert result.error.errno == errno.ENOENT and "execve no-such-program-pclite" in result.error.message
    result = agent.run(2, ["true"], cwd="/nonexistent-pclite")
    assert result.error.errno == errno.ENOENT and result.error.message.startswith("chdir /nonexistent-pclite")


def test_env_cwd_and_default_env(agent, tmp_path):
    result = agent.run(1, ["/usr/bin/env"])
    assert sorted(result.stdout.decode().splitlines()) == sorted(p.DEFAULT_ENV)
    result = agent.run(2, ["sh", "-c", 'echo "$GREETING"; pwd'], cwd=str(tmp_path),
                       env=("GREETING=hi there", "PATH=/usr/bin:/bin"))
    assert result.stdout.decode().splitlines() == ["hi there", str(tmp_path)]


def test_duplicate_exec_id_is_eexist(agent):
    agent.send(p.ExecRequest(("sleep", "100")).frame(1))
    assert agent.recv(1).type == p.MsgType.STARTED
    reply = agent.request(p.ExecRequest(("true",)).frame(1))
    assert reply.type == p.MsgType.ERROR and p.decode_payload(reply).errno == errno.EEXIST
    agent.ok(p.SignalRequest(signal.SIGKILL).frame(1))
    assert agent.collect(1).exit.code == signal.SIGKILL


def test_sixty_fifth_exec_is_eagain(agent):
    for id_ in range(1, p.MAX_EXECS + 1):
        agent.send(p.ExecRequest(("sleep", "100")).frame(id_))
    for id_ in range(1, p.MAX_EXECS + 1):
        assert agent.recv(id_).type == p.MsgType.STARTED
    reply = agent.request(p.ExecRequest(("true",)).frame(1000))
    assert reply.type == p.MsgType.ERROR and p.decode_payload(reply).errno == errno.EAGAIN
    for id_ in range(1, p.MAX_EXECS + 1):
        agent.ok(p.SignalRequest(signal.SIGKILL).frame(id_))
        assert agent.collect(id_).exit.signaled
    assert _exited(agent.run(1000, ["true"]))


def test_end_of_input_kills_running_execs_and_exits_0(agent):
    agent.send(p.ExecRequest(("sleep", "100")).frame(1))
    pid = p.decode_payload(agent.recv(1)).pid
    assert _pid_alive(pid)
    assert agent.close() == 0
    assert not _pid_alive(pid)


# ---- files and hostname ----

def test_write_file_then_read_file_round_trip(agent, tmp_path):
    target = tmp_path / "a" / "b" / "file.bin"
    blob = os.urandom(300_000)
    agent.ok(p.WriteFileRequest(str(target), blob, mode=0o600, mkdirs=True).frame(1))
    assert target.read_bytes() == blob and stat.S_IMODE(target.stat().st_mode) == 0o600
    agent.ok(p.WriteFileRequest(str(target), b"tail", append=True, mode=0o640).frame(2))
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    whole = agent.request(p.ReadFileRequest(str(target)).frame(3))
    assert whole.type == p.MsgType.DATA and whole.payload == blob + b"tail"
    part = agent.request(p.ReadFileRequest(str(target), offset=1000, max_len=10).frame(4))
    assert part.payload == blob[1000:1010]
    past_end = agent.request(p.ReadFileRequest(str(target), offset=len(blob) + 2, max_len=100).frame(5))
    assert past_end.payload == b"il"


def test_file_errors_name_the_path(agent, tmp_path):
    missing = tmp_path / "missing"
    reply = agent.error(p.ReadFileRequest(str(missing)).frame(1))
    assert reply == p.ErrorReply(errno.ENOENT, f"open {missing}: No such file or directory")
    reply = agent.error(p.WriteFileRequest(str(tmp_path / "no" / "dir" / "f"), b"x").frame(2))
    assert reply.errno == errno.ENOENT and str(tmp_path / "no" / "dir" / "f") in reply.message
    too_big = p.Frame(p.MsgType.READ_FILE, 3, struct.pack("<QI", 0, p.MAX_READ_LEN + 1) + bytes(tmp_path) + b"\0")
    assert agent.error(too_big).errno == errno.EINVAL


def test_set_hostname_inside_uts_namespace(agent_binary):
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("unshare (util-linux) is not installed: cannot give the agent its own UTS namespace")
    prefix = (unshare, "--uts") if os.geteuid() == 0 else (unshare, "--user", "--map-root-user", "--uts")
    host_name = os.uname().nodename
    session = AgentSession(agent_binary, prefix)
    try:
        session.ok(p.set_hostname(1, "pclite-test-guest"))
        result = session.run(2, ["uname", "-n"])
        assert result.stdout == b"pclite-test-guest\n"
    finally:
        session.close()
    assert os.uname().nodename == host_name


# ---- device mode (what the guest runs), on a pseudo-terminal ----

def test_device_mode_puts_the_tty_in_raw_mode(agent_binary):
    """The guest's /dev/hvc0 is a TTY: without raw mode, \\n, ^C, ^D, ^S would be mangled or echoed back."""
    master, slave = os.openpty()
    proc = subprocess.Popen([str(agent_binary), "--device", os.ttyname(slave)], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        decoder = p.FrameDecoder()
        frames: list[p.Frame] = []

        def read_frames(count: int) -> None:
            deadline = time.monotonic() + RECV_TIMEOUT
            while len(frames) < count and time.monotonic() < deadline:
                frames.extend(decoder.feed(os.read(master, 4096)))

        read_frames(1)
        assert frames[0].type == p.MsgType.READY, frames
        attrs = termios.tcgetattr(slave)
        assert not attrs[3] & (termios.ECHO | termios.ICANON | termios.ISIG)  # lflag
        assert not attrs[1] & termios.OPOST and not attrs[0] & (termios.ICRNL | termios.IXON)  # oflag, iflag
        payload = bytes(range(256)) * 4
        os.write(master, p.ping(5, payload).encode())
        read_frames(2)
        assert frames[1] == p.Frame(p.MsgType.OK, 5, payload)
    finally:
        os.close(slave)
        os.close(master)  # a hung-up tty is end of input: the agent exits 0
        rc = proc.wait(timeout=10)
    assert rc == 0, proc.stderr.read()


# ---- the build and the initramfs ----

def test_build_is_cached_static_and_keyed_on_sources(tmp_path, monkeypatch):
    monkeypatch.setenv("PCLITE_CACHE", str(tmp_path / "cache"))
    first = build_agent()
    assert first.is_relative_to(tmp_path / "cache" / "agent") and os.access(first, os.X_OK)
    assert _is_static_elf(first.read_bytes())
    mtime = first.stat().st_mtime_ns
    assert build_agent() == first and first.stat().st_mtime_ns == mtime  # a hit: nothing recompiled
    assert not list((tmp_path / "cache" / "agent").glob("*.partial"))
    sources = agent_build.agent_sources()
    assert {s.name for s in sources} >= {"agent.c", "agent.h"}
    assert agent_build.agent_key(sources, "gcc 12") != agent_build.agent_key(sources, "gcc 13")


def test_missing_gcc_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PCLITE_CACHE", str(tmp_path))
    monkeypatch.setattr(agent_build, "CC", "gcc-not-installed-pclite")
    with pytest.raises(BuildError, match=r"needs gcc-not-installed-pclite.*install gcc and libc6-dev \(`make deps`"):
        build_agent()


def test_compile_error_is_reported_with_compiler_output(tmp_path, monkeypatch):
    broken = tmp_path / "src"
    broken.mkdir()
    (broken / "agent.c").write_text("int main(void) { return undeclared; }\n")
    monkeypatch.setenv("PCLITE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(agent_build, "SOURCE_DIR", broken)
    with pytest.raises(BuildError, match="(?s)compiling the guest agent failed.*undeclared"):
        build_agent()
    assert not list((tmp_path / "cache" / "agent").glob("*/pclite-agent"))


def test_default_initramfs_carries_the_agent_and_extra_files_still_work(tmp_path, monkeypatch):
    monkeypatch.setenv("PCLITE_CACHE", str(tmp_path / "cache"))
    extra = tmp_path / "tool"
    extra.write_bytes(b"#!/bin/sh\necho tool\n")
    for image, want_tool in ((build_initramfs(), False), (build_initramfs(extra_files={"/usr/bin/tool": extra}), True)):
        root = tmp_path / f"root-{want_tool}"
        root.mkdir()
        cpio = gzip.decompress(image.read_bytes())
        subprocess.run(["cpio", "-idm", "--quiet", "--no-absolute-filenames"], input=cpio, cwd=root, check=True)
        assert (root / "sbin/pclite-agent").read_bytes() == build_agent().read_bytes()
        assert os.access(root / "sbin/pclite-agent", os.X_OK)
        assert (root / "usr/bin/tool").exists() == want_tool
    assert build_initramfs(agent=False) != build_initramfs()
