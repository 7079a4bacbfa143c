"""The host end of the guest agent's byte stream (virtio-console): frames out, replies routed to their callers.

Frames from the guest arrive on the vCPU thread (a console TX kick); they are decoded there and handed to the
waiting API thread through a per-request queue, so the vCPU thread never blocks on a slow client.
The wire format is guestbuild/agent/PROTOCOL.md.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from _queue import Empty, SimpleQueue  # what `queue` re-exports, without its heapq/threading imports
from collections import namedtuple
from collections.abc import Callable

from hypervisor import agent_protocol as P
from hypervisor.agent_protocol import MsgType as T
from hypervisor.lazylog import LazyLogger

log = LazyLogger("pclite.agent")

STDIN_CHUNK = 256 << 10
STDIN_WINDOW = 1 << 20  # stdin bytes of one exec in flight to a version-2 agent (PROTOCOL.md, STDIN_ACK)
# The most exec output the VMM keeps for one buffered exec (per stream), whatever the guest sends.
MAX_OUTPUT_CAP = int(os.environ.get("PCLITE_VMM_MAX_OUTPUT_CAP", 64 << 20))
STREAM_QUEUE_BYTES = 4 << 20  # frames of one streamed exec waiting for its consumer; beyond: dropped, counted
STREAM_LINES = 32             # lines of one streamed exec waiting for its HTTP client; beyond: put() blocks
_FRAME_COST = 64              # what a queued frame costs beyond its payload, for the queue bounds
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


class MalformedReply(AgentError):
    """The agent sent a frame that breaks the protocol for this request: the request ends with this error."""


class BadExecRequest(ValueError):
    """An exec the VMM refuses before sending it (a 400 for the API)."""


class _Broken(str):
    """Queued in place of a frame: the request's stream broke (malformed or flooding frames)."""


class _Waiter:
    """The frames for one request id, from the vCPU thread (offer) to the request's thread (get).

    Bounded: an exec keeps at most `cap` bytes per output stream (0 = no cap: a streamed exec), and at most `limit`
    bytes wait in the queue; stream output beyond that is dropped and counted, any other frame beyond it breaks the
    request. The vCPU thread never blocks here.
    """
    __slots__ = ("queue", "lock", "queued", "limit", "cap", "kept", "truncated", "dropped", "broken")

    def __init__(self, limit: int = STREAM_QUEUE_BYTES, cap: int = 0):
        self.queue: SimpleQueue = SimpleQueue()
        self.lock = threading.Lock()
        self.queued = 0
        self.limit = limit
        self.cap = cap
        self.kept = [0, 0]          # stdout, stderr bytes let through
        self.truncated = [False, False]
        self.dropped = 0            # output bytes dropped because the consumer lagged
        self.broken: str | None = None

    def offer(self, frame) -> None:
        if self.broken is not None:
            return
        size = len(frame.payload)
        if frame.type in (T.STDOUT, T.STDERR):
            if not 1 <= size <= P.MAX_OUTPUT_CHUNK:
                return self.fail(f"the agent sent a {size}-byte {P.type_name(frame.type)} frame for request "
                                 f"{frame.id} (1..{P.MAX_OUTPUT_CHUNK} allowed)")
            stream = frame.type - T.STDOUT
            if self.cap:
                room = self.cap - self.kept[stream]
                if size > room:
                    self.truncated[stream] = True
                    if room <= 0:
                        return
                    frame = frame._replace(payload=frame.payload[:room])
                    size = room
                self.kept[stream] += size
            with self.lock:
                if self.queued + size + _FRAME_COST > self.limit:
                    self.dropped += size
                    self.truncated[stream] = True
                    return
                self.queued += size + _FRAME_COST
        else:
            with self.lock:
                if self.queued + size + _FRAME_COST > self.limit:
                    return self.fail(f"the agent flooded request {frame.id} with {P.type_name(frame.type)} frames")
                self.queued += size + _FRAME_COST
        self.queue.put(frame)

    def fail(self, why: str) -> None:
        if self.broken is None:
            self.broken = why
            log.warning("%s", why)
            self.queue.put(_Broken(why))

    def consumed(self, frame) -> None:
        """The request's thread is done with a frame (after handing it on: that is the backpressure)."""
        with self.lock:
            self.queued -= len(frame.payload) + _FRAME_COST


class StreamLines:
    """The lines of one streamed exec, from its exec thread (put) to its HTTP response (get). At most `limit` lines
    wait: put() blocks beyond that, so a slow client slows the exec thread, whose _Waiter then drops (and counts)
    that exec's output; the VMM keeps reading the shared channel for the others. close() (the client went away)
    discards what waits and turns put() into a no-op, so the exec thread never stays blocked."""

    def __init__(self, limit: int = STREAM_LINES):
        from collections import deque
        self._items: deque = deque()
        self._limit = limit
        self._cond = threading.Condition()
        self._closed = False

    def put(self, item) -> None:
        with self._cond:
            while len(self._items) >= self._limit and not self._closed:
                self._cond.wait()
            if not self._closed:
                self._items.append(item)
                self._cond.notify_all()

    def get(self, timeout: float | None = None):
        with self._cond:
            if not self._cond.wait_for(lambda: self._items, timeout):
                raise Empty
            item = self._items.popleft()
            self._cond.notify_all()
            return item

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._items.clear()
            self._cond.notify_all()


# collections' namedtuple, not a dataclass: this module is on the VMM's start-up path (see guestboot/plan.py)
class ExecOutcome(namedtuple("ExecOutcome", "exit_code signal timed_out stdout stderr stdout_truncated "
                                            "stderr_truncated duration_s pid output_dropped", defaults=(None, 0))):
    __slots__ = ()

    def as_json(self) -> dict:
        import base64
        return {"exit_code": self.exit_code, "signal": self.signal, "timed_out": self.timed_out,
                "stdout_b64": base64.b64encode(self.stdout).decode(),
                "stderr_b64": base64.b64encode(self.stderr).decode(),
                "stdout_truncated": self.stdout_truncated, "stderr_truncated": self.stderr_truncated,
                "duration_ms": round(self.duration_s * 1000, 3), "pid": self.pid,
                "output_dropped": self.output_dropped}


class AgentChannel:
    def __init__(self, send_bytes: Callable[[bytes], int], on_ready: Callable[[str], None] | None = None,
                 max_output_cap: int = MAX_OUTPUT_CAP):
        self._send_bytes = send_bytes  # returns how many bytes were taken (0 while the guest is not reading)
        self._on_ready = on_ready
        self.max_output_cap = max_output_cap
        self._decoder = P.FrameDecoder()
        self._pending: dict[int, _Waiter] = {}
        self._stdin_in_flight: dict[int, int] = {}  # exec id -> stdin bytes sent and not acknowledged yet
        self._stdin_flow = threading.Condition()
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
            log.warning("%s", self.protocol_error)
            self.close()
            return
        for frame in frames:
            if frame.type == T.READY:
                self.version = frame.payload.decode(errors="replace")
                self.ready.set()
                if self._on_ready:
                    self._on_ready(self.version)
                continue
            if frame.type == T.STDIN_ACK:
                self._stdin_acked(frame)
                continue
            with self._pending_lock:
                waiter = self._pending.get(frame.id)
            if waiter is not None:
                waiter.offer(frame)
            else:
                log.debug("agent frame type %#x for unknown request %d dropped", frame.type, frame.id)

    def _stdin_acked(self, frame) -> None:
        try:
            consumed = P.StdinAck.decode(frame.payload).consumed
        except P.ProtocolError:
            consumed = 1 << 32  # a malformed ack: count the window as free rather than stall this exec forever
        with self._stdin_flow:
            if frame.id in self._stdin_in_flight:
                self._stdin_in_flight[frame.id] = max(0, self._stdin_in_flight[frame.id] - consumed)
                self._stdin_flow.notify_all()

    def close(self) -> None:
        """The VM stopped (or the stream broke): wake every waiter."""
        self.closed = True
        with self._pending_lock:
            for waiter in self._pending.values():
                waiter.queue.put(_CLOSED)
        with self._stdin_flow:
            self._stdin_flow.notify_all()

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

    def _open(self, waiter: _Waiter | None = None) -> tuple[int, _Waiter]:
        if self.closed:
            raise AgentUnavailable(self._closed_reason())
        if not self.ready.is_set():
            raise AgentUnavailable("the guest agent is not ready yet: wait for agent_ready in GET /status")
        request_id = next(self._ids)
        waiter = waiter or _Waiter()
        with self._pending_lock:
            self._pending[request_id] = waiter
        return request_id, waiter

    def _done(self, request_id: int) -> None:
        with self._pending_lock:
            self._pending.pop(request_id, None)
        with self._stdin_flow:
            self._stdin_in_flight.pop(request_id, None)

    def _next(self, waiter: _Waiter, deadline: float, what: str):
        try:
            frame = waiter.queue.get(timeout=max(0.0, deadline - time.monotonic()))
        except Empty:
            raise AgentUnavailable(f"the guest agent did not answer {what} in time") from None
        if frame is _CLOSED:
            raise AgentUnavailable(self._closed_reason())
        if isinstance(frame, _Broken):
            raise MalformedReply(str(frame))
        if frame.type == T.ERROR:
            waiter.consumed(frame)
            error = _decode(P.ErrorReply, frame)
            raise AgentError(error.message, error.errno)
        return frame

    def request(self, frame_type: int, payload: bytes = b"", timeout_s: float = 10.0) -> bytes:
        """One request, one reply (OK or DATA); returns the reply payload."""
        request_id, waiter = self._open()
        deadline = time.monotonic() + timeout_s
        try:
            self._send(frame_type, request_id, payload, deadline)
            return _reply(self._next(waiter, deadline, P.type_name(frame_type)))
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
            return [_reply(self._next(waiter, deadline, P.type_name(frame_type))) for frame_type, _, waiter in tickets]
        finally:
            for _, request_id, _ in tickets:
                self._done(request_id)

    # ---- snapshots (hypervisor/snapshot.py, hypervisor/restore.py)

    @property
    def busy(self) -> bool:
        """A request is awaiting its reply, or a frame from the guest is half-received."""
        with self._pending_lock:
            return bool(self._pending) or self._decoder.pending > 0

    @property
    def acks_stdin(self) -> bool:
        """Version 2 agents acknowledge stdin (STDIN_ACK); a restored version 1 agent does not."""
        return not (self.version or "").startswith("pclite-agent/1 ")

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

        Without on_output (and not interactive) the output is buffered: at most output_cap bytes per stream are
        kept, whatever the guest sends (0 = unlimited is refused); streamed output is not kept. Output beyond the
        cap, or dropped because on_output lagged too far behind the guest, marks the stream truncated.
        interactive: stdin stays open for send_stdin(exec id) (`stdin` is ignored) and, without a timeout, the host
        waits as long as the process lives; on_started(exec id, guest pid) says when it runs. `process`: the
        ExecRequest process fields (tty, root, user, rlimits, size).
        """
        buffered = on_output is None and not interactive
        if not isinstance(output_cap, int) or output_cap < 0 or output_cap > self.max_output_cap:
            raise BadExecRequest(f"output_cap must be 1..{self.max_output_cap} bytes, got {output_cap!r}")
        if buffered and output_cap == 0:
            raise BadExecRequest(f"output_cap 0 (unlimited) is refused for a buffered exec: give a cap of 1.."
                                 f"{self.max_output_cap} bytes, or stream the output")
        limit = 2 * output_cap + STREAM_QUEUE_BYTES if buffered else STREAM_QUEUE_BYTES
        request_id, waiter = self._open(_Waiter(limit, output_cap))
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
                self._send_stdin(request_id, stdin, True, deadline)
            while True:
                try:
                    frame = self._next(waiter, deadline, "exec")
                except (AgentUnavailable, MalformedReply):
                    raise
                except AgentError:
                    if pid is None:
                        raise  # the process could not start
                    continue  # after STARTED, an ERROR answers a SIGNAL or RESIZE for this exec id
                kind = frame.type
                if kind in (T.STDOUT, T.STDERR):
                    if buffered:
                        (out if kind == T.STDOUT else err).extend(frame.payload)
                    elif on_output:
                        on_output(1 if kind == T.STDOUT else 2, frame.payload)
                    waiter.consumed(frame)  # after on_output: a slow consumer leaves the frames queued
                    continue
                waiter.consumed(frame)
                if kind == T.STARTED and pid is None:
                    pid = _decode(P.Started, frame).pid
                    if on_started:
                        on_started(request_id, pid)
                elif kind == T.OK and pid is not None:
                    continue  # answers a SIGNAL or RESIZE for this exec id
                elif kind == T.EXIT:
                    status = _decode(P.ExitStatus, frame)
                    return ExecOutcome(
                        exit_code=status.code if status.kind == 0 else None,
                        signal=status.code if status.kind == 1 else None, timed_out=bool(status.timed_out),
                        stdout=bytes(out), stderr=bytes(err),
                        stdout_truncated=bool(status.stdout_truncated) or waiter.truncated[0],
                        stderr_truncated=bool(status.stderr_truncated) or waiter.truncated[1],
                        duration_s=status.duration_us / 1e6 if status.duration_us else time.monotonic() - started,
                        pid=pid, output_dropped=waiter.dropped)
                else:
                    raise MalformedReply(f"the agent sent an unexpected {P.type_name(kind)} frame for exec "
                                         f"{request_id}" + (" before STARTED" if pid is None else ""))
        finally:
            self._done(request_id)

    def _send_stdin(self, exec_id: int, data: bytes, eof: bool, deadline: float) -> None:
        """STDIN frames; to a version 2 agent at most STDIN_WINDOW unacknowledged bytes per exec (PROTOCOL.md)."""
        view = memoryview(data)
        with self._pending_lock:
            acks = self.acks_stdin and exec_id in self._pending  # else the agent drops it: nothing to account
        for offset in range(0, len(view), STDIN_CHUNK):
            chunk = bytes(view[offset:offset + STDIN_CHUNK])
            if acks:
                self._reserve_stdin(exec_id, len(chunk), deadline)
            self._send(T.STDIN, exec_id, chunk, deadline)
        if eof:
            self._send(T.STDIN, exec_id, b"", deadline)

    def _reserve_stdin(self, exec_id: int, size: int, deadline: float) -> None:
        def room() -> bool:
            return (self.closed or exec_id not in self._pending
                    or self._stdin_in_flight.get(exec_id, 0) + size <= STDIN_WINDOW)
        with self._stdin_flow:
            if not self._stdin_flow.wait_for(room, max(0.0, deadline - time.monotonic())):
                raise AgentUnavailable(f"exec {exec_id} is not reading its stdin: "
                                       f"{self._stdin_in_flight.get(exec_id, 0)} bytes wait in the guest")
            if exec_id in self._pending:  # else the exec ended: the agent drops the data, nothing to account
                self._stdin_in_flight[exec_id] = self._stdin_in_flight.get(exec_id, 0) + size

    def send_stdin(self, exec_id: int, data: bytes, eof: bool = False, timeout_s: float = 30.0) -> None:
        """Stdin for an interactive exec, in pieces the channel takes; eof closes it after the data."""
        self._send_stdin(exec_id, data, eof, time.monotonic() + timeout_s)

    def resize(self, exec_id: int, rows: int, cols: int) -> None:
        """The terminal size of an exec started with tty; the agent's reply goes to the exec's waiter."""
        self._send(T.RESIZE, exec_id, P.ResizeRequest(rows, cols).encode(), time.monotonic() + 5)

    def signal(self, exec_id: int, signo: int) -> None:
        """Signal a running exec's process group. The agent's OK goes to the exec's own waiter, which skips it."""
        self._send(T.SIGNAL, exec_id, P.SignalRequest(signo).encode(), time.monotonic() + 5)


def _decode(cls, frame):
    """A typed payload; a malformed one ends the request with an error naming it."""
    try:
        return cls.decode(frame.payload)
    except P.ProtocolError as exc:
        raise MalformedReply(f"the agent sent a malformed {P.type_name(frame.type)} frame for request "
                             f"{frame.id}: {exc}") from None


def _reply(frame) -> bytes:
    if frame.type not in (T.OK, T.DATA):
        raise MalformedReply(f"the agent answered request {frame.id} with a {P.type_name(frame.type)} frame")
    return frame.payload
