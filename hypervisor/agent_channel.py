"""The host end of the guest agent's byte stream (virtio-console): frames out, replies routed to their callers.

Frames from the guest arrive on the vCPU thread (a console TX kick); they are decoded there and handed to the
waiting API thread through a per-request queue, so the vCPU thread never blocks on a slow client.
The wire format is guestboot/agent/PROTOCOL.md.
"""

from __future__ import annotations

import itertools
import threading
import time
from _queue import Empty, SimpleQueue  # what `queue` re-exports, without its heapq/threading imports
from collections import namedtuple
from collections.abc import Callable

from guestboot.agent import protocol as P
from guestboot.agent.protocol import MsgType as T
from hypervisor.lazylog import LazyLogger

log = LazyLogger("pclite.agent")

STDIN_CHUNK = 256 << 10
EXEC_GRACE_S = 10.0  # the agent enforces the exec timeout; the host waits this much longer before giving up
INTERACTIVE_PATIENCE_S = 1e8  # "forever" that SimpleQueue.get still accepts as a timeout
_CLOSED = object()


class AgentError(Exception):
    """The agent refused or failed a request; the message is the agent's own sentence."""

    def __init__(self, message: str, errno: int = 0):
        super().__init__(message)
        self.errno = errno


class AgentUnavailable(AgentError):
    """No agent to talk to: not ready yet, gone, or not answering in time."""


# collections' namedtuple, not a dataclass: this module is on the VMM's start-up path (see guestboot/plan.py)
class ExecOutcome(namedtuple("ExecOutcome", "exit_code signal timed_out stdout stderr stdout_truncated "
                                            "stderr_truncated duration_s pid", defaults=(None,))):
    __slots__ = ()

    def as_json(self) -> dict:
        import base64
        return {"exit_code": self.exit_code, "signal": self.signal, "timed_out": self.timed_out,
                "stdout_b64": base64.b64encode(self.stdout).decode(),
                "stderr_b64": base64.b64encode(self.stderr).decode(),
                "stdout_truncated": self.stdout_truncated, "stderr_truncated": self.stderr_truncated,
                "duration_ms": round(self.duration_s * 1000, 3), "pid": self.pid}


class AgentChannel:
    def __init__(self, send_bytes: Callable[[bytes], int], on_ready: Callable[[str], None] | None = None):
        self._send_bytes = send_bytes  # returns how many bytes were taken (0 while the guest is not reading)
        self._on_ready = on_ready
        self._decoder = P.FrameDecoder()
        self._pending: dict[int, SimpleQueue] = {}
        self._pending_lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._ids = itertools.count(1)
        self.ready = threading.Event()
        self.version: str | None = None
        self.closed = False
        self.protocol_error: str | None = None

    # ---- guest -> host (vCPU thread)

    def feed(self, data: bytes) -> None:
        try:
            frames = self._decoder.feed(data)
        except P.ProtocolError as exc:
            self.protocol_error = f"agent sent a malformed frame ({exc}); the channel is closed"
            log.warning(self.protocol_error)
            self.close()
            return
        for frame in frames:
            if frame.type == T.READY:
                self.version = frame.payload.decode(errors="replace")
                self.ready.set()
                if self._on_ready:
                    self._on_ready(self.version)
                continue
            with self._pending_lock:
                waiter = self._pending.get(frame.id)
            if waiter is not None:
                waiter.put(frame)
            else:
                log.debug("agent frame type %#x for unknown request %d dropped", frame.type, frame.id)

    def close(self) -> None:
        """The VM stopped (or the stream broke): wake every waiter."""
        self.closed = True
        with self._pending_lock:
            for waiter in self._pending.values():
                waiter.put(_CLOSED)

    # ---- host -> guest (API threads)

    def _send(self, frame_type: int, request_id: int, payload: bytes = b"", deadline: float | None = None) -> None:
        data = memoryview(P.encode_frame(frame_type, request_id, payload))
        with self._send_lock:  # one frame at a time: frames must never interleave on the stream
            while data:
                if self.closed:
                    raise AgentUnavailable(self._closed_reason())
                taken = self._send_bytes(data)
                data = data[taken:]
                if data:
                    if deadline is not None and time.monotonic() > deadline:
                        raise AgentUnavailable("the guest agent stopped reading its channel (send timed out)")
                    time.sleep(0.002)  # the guest has not posted receive buffers yet

    def _closed_reason(self) -> str:
        return self.protocol_error or "the VM has stopped: its agent is gone"

    def _open(self) -> tuple[int, SimpleQueue]:
        if self.closed:
            raise AgentUnavailable(self._closed_reason())
        if not self.ready.is_set():
            raise AgentUnavailable("the guest agent is not ready yet: wait for agent_ready in GET /status")
        request_id = next(self._ids)
        waiter: SimpleQueue = SimpleQueue()
        with self._pending_lock:
            self._pending[request_id] = waiter
        return request_id, waiter

    def _done(self, request_id: int) -> None:
        with self._pending_lock:
            self._pending.pop(request_id, None)

    def _next(self, waiter: SimpleQueue, deadline: float, what: str):
        try:
            frame = waiter.get(timeout=max(0.0, deadline - time.monotonic()))
        except Empty:
            raise AgentUnavailable(f"the guest agent did not answer {what} in time") from None
        if frame is _CLOSED:
            raise AgentUnavailable(self._closed_reason())
        if frame.type == T.ERROR:
            error = P.ErrorReply.decode(frame.payload)
            raise AgentError(error.message, error.errno)
        return frame

    def request(self, frame_type: int, payload: bytes = b"", timeout_s: float = 10.0) -> bytes:
        """One request, one reply (OK or DATA); returns the reply payload."""
        request_id, waiter = self._open()
        deadline = time.monotonic() + timeout_s
        try:
            self._send(frame_type, request_id, payload, deadline)
            return self._next(waiter, deadline, P.type_name(frame_type)).payload
        finally:
            self._done(request_id)

    def request_all(self, requests: list[tuple[int, bytes]], timeout_s: float = 10.0) -> list[bytes]:
        """Several (type, payload) requests sent back to back, then all replies awaited: one round trip."""
        return self.await_replies(self.send_requests(requests, timeout_s), timeout_s)

    def send_requests(self, requests: list[tuple[int, bytes]], timeout_s: float = 10.0) -> list:
        """Send requests without waiting: the agent handles them before anything sent later (stream order).
        Returns tickets for await_replies(), which must be called (it releases the request ids)."""
        tickets: list = []
        deadline = time.monotonic() + timeout_s
        try:
            for frame_type, payload in requests:
                tickets.append((frame_type, *self._open()))
                self._send(frame_type, tickets[-1][1], payload, deadline)
        except BaseException:
            for _, request_id, _ in tickets:
                self._done(request_id)
            raise
        return tickets

    def await_replies(self, tickets: list, timeout_s: float = 10.0) -> list[bytes]:
        deadline = time.monotonic() + timeout_s
        try:
            return [self._next(waiter, deadline, P.type_name(frame_type)).payload for frame_type, _, waiter in tickets]
        finally:
            for _, request_id, _ in tickets:
                self._done(request_id)

    # ---- snapshots (hypervisor/snapshot.py, hypervisor/restore.py)

    @property
    def busy(self) -> bool:
        """A request is awaiting its reply, or a frame from the guest is half-received."""
        with self._pending_lock:
            return bool(self._pending) or self._decoder.pending > 0

    def adopt(self, version: str | None) -> None:
        """A restored guest's agent: it announced itself before the snapshot and is waiting for requests."""
        self.version = version
        self.ready.set()

    def ping(self, timeout_s: float = 5.0) -> float:
        started = time.monotonic()
        self.request(T.PING, b"ping", timeout_s)
        return time.monotonic() - started

    def exec(self, argv: list[str], *, env: dict[str, str] | None = None, cwd: str = "/",
             stdin: bytes | None = None, timeout_s: float | None = None, output_cap: int = 1 << 20,
             on_output: Callable[[int, bytes], None] | None = None,
             on_started: Callable[[int, int], None] | None = None, interactive: bool = False,
             **process) -> ExecOutcome:
        """Run argv in the guest. on_output(stream, data) streams output (stream 1 stdout, 2 stderr).

        interactive: stdin stays open for send_stdin(exec id) (`stdin` is ignored) and, without a timeout, the host
        waits as long as the process lives; on_started(exec id, guest pid) says when it runs. `process`: the
        ExecRequest process fields (tty, root, user, rlimits, size).
        """
        request_id, waiter = self._open()
        timeout_ms = int(timeout_s * 1000) if timeout_s else 0
        # With no exec timeout the host still needs a bound on a silent agent; output resets it. A container's
        # process (interactive) may rightly stay silent for days: only a stopped VM ends the wait then.
        patience = (timeout_s or (INTERACTIVE_PATIENCE_S if interactive else 3600.0)) + EXEC_GRACE_S
        deadline = time.monotonic() + patience
        started = time.monotonic()
        out, err = bytearray(), bytearray()
        pid = None
        try:
            env_list = [f"{k}={v}" for k, v in (env or {}).items()]
            payload = P.ExecRequest(tuple(argv), cwd, tuple(env_list), timeout_ms, output_cap,
                                    interactive or stdin is not None, **process)
            self._send(T.EXEC, request_id, payload.encode(), deadline)
            if stdin is not None and not interactive:
                view = memoryview(stdin)
                for offset in range(0, len(view), STDIN_CHUNK):
                    self._send(T.STDIN, request_id, bytes(view[offset:offset + STDIN_CHUNK]), deadline)
                self._send(T.STDIN, request_id, b"", deadline)
            while True:
                try:
                    frame = self._next(waiter, deadline, "exec")
                except AgentUnavailable:
                    raise
                except AgentError:
                    if pid is None:
                        raise  # the process could not start
                    continue  # after STARTED, an ERROR answers a SIGNAL or RESIZE for this exec id
                if frame.type == T.STARTED:
                    pid = P.Started.decode(frame.payload).pid
                    if on_started:
                        on_started(request_id, pid)
                elif frame.type in (T.STDOUT, T.STDERR):
                    if not interactive:  # a container's output is only streamed: it may never end
                        (out if frame.type == T.STDOUT else err).extend(frame.payload)
                    if on_output:
                        on_output(1 if frame.type == T.STDOUT else 2, frame.payload)
                elif frame.type == T.EXIT:
                    status = P.ExitStatus.decode(frame.payload)
                    return ExecOutcome(
                        exit_code=status.code if status.kind == 0 else None,
                        signal=status.code if status.kind == 1 else None, timed_out=bool(status.timed_out),
                        stdout=bytes(out), stderr=bytes(err), stdout_truncated=bool(status.stdout_truncated),
                        stderr_truncated=bool(status.stderr_truncated),
                        duration_s=status.duration_us / 1e6 if status.duration_us else time.monotonic() - started,
                        pid=pid)
        finally:
            self._done(request_id)

    def send_stdin(self, exec_id: int, data: bytes, eof: bool = False) -> None:
        """Stdin for an interactive exec, in pieces the channel takes; eof closes it after the data."""
        deadline = time.monotonic() + 30
        view = memoryview(data)
        for offset in range(0, len(view), STDIN_CHUNK):
            self._send(T.STDIN, exec_id, bytes(view[offset:offset + STDIN_CHUNK]), deadline)
        if eof:
            self._send(T.STDIN, exec_id, b"", deadline)

    def resize(self, exec_id: int, rows: int, cols: int) -> None:
        """The terminal size of an exec started with tty; the agent's reply goes to the exec's waiter."""
        self._send(T.RESIZE, exec_id, P.ResizeRequest(rows, cols).encode(), time.monotonic() + 5)

    def signal(self, exec_id: int, signo: int) -> None:
        """Signal a running exec's process group. The agent's OK goes to the exec's own waiter, which skips it."""
        self._send(T.SIGNAL, exec_id, P.SignalRequest(signo).encode(), time.monotonic() + 5)
