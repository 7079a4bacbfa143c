"""A VMM fork server: one process that has already paid for the interpreter and the VMM's imports, and forks a
fresh VMM per request (the zygote pattern), so a new VM starts at `fork()` instead of at `python` start-up.

  python -m hypervisor forkserver --socket PATH      (start it with hypervisor.launch.vmm_command)

Each request is one connection: a JSON line {"spec": RUNSPEC, "cwd": DIR, "t0": MONOTONIC} (RUNSPEC: a
hypervisor/runspec.py RunSpec's as_dict(), a `run` or a `restore`) with three file descriptors attached
(SCM_RIGHTS) that become the VMM's stdin/stdout/stderr. A request that is not exactly that (not an object,
unknown fields, wrong types, over MAX_REQUEST bytes, not 3 fds) gets {"error": "..."}; the server carries on, and
every fd it received is closed whatever the outcome. The server answers
{"pid": N} at once and {"exit_code": N} when that VMM exits; the connection then closes. The forked VMM is a
normal VMM process (own session, own threads); its boot timeline starts at t0, the caller's request time, so
the figures include the fork and the hand-over. The server itself stays single-threaded: forking a process that
has other threads can leave their locks held in the child.

With --warm 1 (the default) the server keeps one VMM forked ahead ("warm"): it has already opened /dev/kvm and
made an empty VM with its irqchip and PIT, and waits on a socketpair. A request goes to it (JSON + the fds) and
the next warm VMM is forked once the server is idle again, so neither the fork nor KVM_CREATE_VM (~50 ms of a
clone in the lab) is on the request's path. A warm VMM that died is replaced; without one, the server forks.
After a `run` request the next warm VMM also starts loading that request's kernel and initrd into fresh guest RAM
(hypervisor/builder.py: prepare); a `run` whose spec has the same images_key() takes them, any other request frees
them. Pools boot the same kernel again and again, and the copy is the slowest step left.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time

from hypervisor.cli_args import REQUIRED, UsageError, parse_options

OPTIONS = {"--socket": (str, REQUIRED), "--warm": (int, 1), "--pidns": (int, 0)}
MAX_REQUEST = 64 << 10
PARENT_POLL_S = 1.0
WARM_AFTER_S = 0.2  # idle time before forking the next warm VMM: not while the one just handed out starts
WARM_RETRY_S = 5.0  # after a warm VMM died before it was used (e.g. no /dev/kvm): fall back to plain forks


class ForkServerError(Exception):
    """The fork server is not there or refused the request; the message says what to do."""


def _preload() -> None:
    """Everything a `run` imports, so the forked children import nothing (the point of the server): also what
    the first exec and query string import lazily (a first import costs tens of ms in the lab)."""
    import base64  # noqa: F401
    import urllib.parse  # noqa: F401

    import hypervisor.agent_channel  # noqa: F401
    import hypervisor.api_server  # noqa: F401
    import hypervisor.boot_images  # noqa: F401
    import hypervisor.builder  # noqa: F401
    import hypervisor.control  # noqa: F401
    import hypervisor.jail  # noqa: F401
    import hypervisor.vm  # noqa: F401
    from hypervisor import agent_protocol, cpuid, kvm_snapshot_structs, restore  # noqa: F401 - restore: snapshot clones
    from hypervisor.virtio import console, mmio, rng  # noqa: F401


def serve(argv: list[str]) -> int:
    import _signal
    import select

    opts = parse_options(argv, OPTIONS, __doc__)
    _preload()
    _freeze_heap()
    path = opts["socket"]
    if os.path.exists(path):
        os.unlink(path)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # Listening right after bind (not renamed into place: /proc/net/unix, which pclited scans, keeps the name a
    # socket was bound to); spawn() retries the instant in between.
    listener.bind(path)
    listener.listen(64)
    os.chmod(path, 0o600)
    inode = os.stat(path).st_ino  # a successor may bind the same path before we are gone: never unlink theirs
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    _signal.set_wakeup_fd(wake_w)
    _signal.signal(_signal.SIGCHLD, lambda *_: None)  # a handler, not SIG_IGN: we want the exit codes
    _signal.signal(_signal.SIGTERM, _signal.default_int_handler)  # stop like Ctrl-C: the socket is removed
    children: dict[int, socket.socket] = {}
    global _PIDNS
    _PIDNS = opts["pidns"] > 0
    warm = _Warm(opts["warm"] > 0)
    parent = os.getppid()  # the server lives as long as whoever started it (pclited, a test, the bench)
    print(f"pclite forkserver: ready on {path} (pid {os.getpid()})", file=sys.stderr, flush=True)
    try:
        while True:
            try:
                ready, _, _ = select.select([listener, wake_r], [], [], warm.timeout(PARENT_POLL_S))
            except InterruptedError:
                continue
            if os.getppid() != parent:
                print("pclite forkserver: my parent exited; stopping (forked VMMs keep running)", file=sys.stderr)
                return 0
            if wake_r in ready:
                while True:
                    try:
                        if not os.read(wake_r, 512):
                            break
                    except BlockingIOError:
                        break
                warm.reaped(_reap(children))
            if listener in ready:
                conn, _ = listener.accept()
                pid = _handle(conn, listener, warm)
                if pid:
                    children[pid] = conn
                warm.reaped(_reap(children))  # a child may have exited before we recorded it
            elif not ready:
                warm.refill()
    except KeyboardInterrupt:
        return 0
    finally:
        warm.close()
        listener.close()
        with contextlib.suppress(OSError):
            if os.stat(path).st_ino == inode:
                os.unlink(path)


class _Warm:
    """The one VMM forked ahead of requests, with its KVM VM made (see the module's docstring)."""

    def __init__(self, enabled: bool):
        self.enabled, self.pid, self.conn = enabled, 0, None
        self.due = time.monotonic() if enabled else None  # when to fork the next one; None: not wanted now
        self.last_run = None  # the last request's RunSpec when it was a `run`: the next one is likely alike

    def timeout(self, idle: float) -> float:
        return idle if self.due is None or self.pid else max(0.0, min(idle, self.due - time.monotonic()))

    def refill(self) -> None:
        if self.enabled and not self.pid and self.due is not None and time.monotonic() >= self.due:
            self.due = None
            try:
                self.pid, self.conn = _fork_warm(self.last_run)
            except OSError as exc:  # e.g. out of memory or pids: plain forks until it works again
                print(f"pclite forkserver: cannot fork a warm VMM ({exc}); retrying in {WARM_RETRY_S:.0f} s",
                      file=sys.stderr, flush=True)
                self.due = time.monotonic() + WARM_RETRY_S

    def take(self) -> tuple[int, socket.socket | None]:
        """(pid, its request socket), or (0, None) without a warm VMM; the next is due once the server idles."""
        pid, conn, self.pid, self.conn = self.pid, self.conn, 0, None
        if self.enabled:
            self.due = time.monotonic() + WARM_AFTER_S
        return pid, conn

    def reaped(self, pids: list[int]) -> None:
        if self.pid and self.pid in pids:  # died unused: say why once, retry later
            print(f"pclite forkserver: warm VMM {self.pid} exited before use; retrying in {WARM_RETRY_S:.0f} s",
                  file=sys.stderr, flush=True)
            self.conn.close()
            self.pid, self.conn, self.due = 0, None, time.monotonic() + WARM_RETRY_S

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()  # the warm VMM reads EOF and exits


def _reap(children: dict) -> list[int]:
    """Collect exited children (answering their callers); returns their pids."""
    reaped = []
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return reaped
        if pid == 0:
            return reaped
        reaped.append(pid)
        conn = children.pop(pid, None)
        if conn is not None:
            _reply(conn, {"exit_code": os.waitstatus_to_exitcode(status)})  # the caller may be gone: fine
            conn.close()


class _Request:
    """A validated fork request: the VM's RunSpec, the VMM's working directory, when it was asked for, and the
    jail plan the VMM enters (JSON, hypervisor/jail.py; None: not jailed)."""

    def __init__(self, spec, cwd: str | None, t0: float, jail: str | None = None):
        self.spec, self.cwd, self.t0, self.jail = spec, cwd, t0, jail

    def encode(self) -> bytes:
        return json.dumps({"spec": self.spec.as_dict(), "cwd": self.cwd, "t0": self.t0, "jail": self.jail}).encode()


def parse_request(data: bytes) -> _Request:
    """The request in `data`, or ValueError saying what is wrong with it."""
    import math

    from hypervisor.runspec import RunSpec
    if len(data) > MAX_REQUEST:
        raise ValueError(f"over {MAX_REQUEST} bytes")
    try:
        request = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise ValueError(f"not JSON ({exc})") from None
    if not isinstance(request, dict):
        raise ValueError(f"want a JSON object, got {type(request).__name__}")
    unknown = sorted(set(request) - {"spec", "cwd", "t0", "jail"})
    if unknown:
        raise ValueError(f"unknown field(s) {', '.join(map(repr, unknown))}")
    cwd, t0 = request.get("cwd"), request.get("t0", time.monotonic())
    if cwd is not None and not (isinstance(cwd, str) and cwd and "\0" not in cwd):
        raise ValueError("cwd must be a directory path")
    if isinstance(t0, bool) or not isinstance(t0, int | float) or not math.isfinite(t0):
        raise ValueError("t0 must be a number (time.monotonic() of the request)")
    jail = request.get("jail")
    if jail is not None and not isinstance(jail, str):
        raise ValueError("jail must be a JSON string (hypervisor/jail.py)")
    try:
        spec = RunSpec.from_json(request.get("spec"))
    except UsageError as exc:
        raise ValueError(str(exc)) from None
    return _Request(spec, cwd, float(t0), jail)


def _handle(conn: socket.socket, listener: socket.socket, warm: _Warm) -> int:
    fds: list[int] = []
    try:
        conn.settimeout(5)
        data, fds, _, _ = socket.recv_fds(conn, MAX_REQUEST + 1, 3)
        if len(fds) != 3:
            raise ValueError("want a JSON line with the spec and exactly 3 file descriptors (stdin, stdout, stderr)")
        request = parse_request(data)
    except Exception as exc:  # noqa: BLE001 - whatever a request holds, it is refused and the server carries on
        _close_all(fds)  # refused: nothing it sent stays open here
        _reply(conn, {"error": f"bad fork request: {exc}"})
        conn.close()
        return 0
    try:
        if _preload_images(request.spec):
            _freeze_heap()  # only then: freezing on every request would keep each one's cyclic garbage forever
        warm.last_run = request.spec if request.spec.command == "run" else None
        pid, warm_conn = warm.take()
        if warm_conn is not None:
            try:
                socket.send_fds(warm_conn, [request.encode()], fds)
            except OSError:  # it died meanwhile: fork one
                pid = 0
            warm_conn.close()
        if not pid:
            pid = _fork()
            if pid == 0:  # the new VMM: never back into the server's loop
                try:
                    listener.close()
                    _become_vmm(conn, fds, request)
                except BaseException as exc:  # noqa: BLE001 - e.g. a cwd that is gone
                    print(f"pclite: error: cannot start the VMM: {exc}", file=sys.stderr, flush=True)
                    os._exit(1)
                _run_vmm(request)
    except Exception as exc:  # noqa: BLE001 - e.g. fork() out of memory or pids: this request fails, not the server
        _reply(conn, {"error": f"cannot start the VMM: {exc}"})
        conn.close()
        return 0
    finally:
        _close_all(fds)
    conn.settimeout(None)
    _reply(conn, {"pid": pid})
    return pid


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def _run_vmm(request: _Request) -> None:
    """In a forked child: build and run the request's VM, then exit (never back into the server's loop). The
    timeline starts at the request's time: the figures include the fork and the hand-over."""
    code = 1
    try:
        from hypervisor.builder import run
        from hypervisor.timeline import Timeline
        code = run(request.spec, Timeline(origin=request.t0))
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException as exc:  # noqa: BLE001
        print(f"pclite: VMM failed: {exc!r}", file=sys.stderr)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _fork_warm(last_run=None) -> tuple[int, socket.socket | None]:
    server_end, vmm_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    pid = _fork()
    if pid == 0:
        code = 0
        try:
            server_end.close()
            request = _wait_as_warm(vmm_end, last_run)
            if request is not None:
                _run_vmm(request)
        except BaseException as exc:  # noqa: BLE001
            print(f"pclite forkserver: warm VMM failed: {exc!r}", file=sys.stderr)
            code = 1
        os._exit(code)
    vmm_end.close()
    return pid, server_end


def _wait_as_warm(conn: socket.socket, last_run=None) -> _Request | None:
    """In the warm child: detach from the server, make the KVM VM and, after a `run` request, start loading that
    request's kernel and initrd into fresh guest RAM (a `run` with the same images takes them: copying them is the
    slowest step left, ~0.3-0.9 s in the lab), then wait for a request (None: the server went away). The
    request's fds become stdio, as in _become_vmm."""
    _leave_server()
    keep = conn.fileno()
    os.closerange(3, keep)  # the server's listener, wake pipe and callers' connections
    os.closerange(keep + 1, 1 << 16)
    from hypervisor.vm import prepare_ahead
    try:
        prepare_ahead()
    except OSError as exc:  # no usable /dev/kvm: the VMM reports it in its own words when it builds
        print(f"pclite forkserver: warm VMM could not prepare KVM ({exc}); it will retry per request",
              file=sys.stderr, flush=True)
    if last_run is not None:
        from hypervisor.builder import prepare
        prepare(last_run)
    data, fds, _, _ = socket.recv_fds(conn, MAX_REQUEST + 1, 3)
    if not data or len(fds) != 3:
        _close_all(fds)
        return None
    request = parse_request(data)  # validated by the server already: this only decodes it
    conn.close()
    if last_run is not None and request.spec.command != "run":  # a clone: the images loaded ahead are not for it
        from hypervisor.boot_images import discard_prepared
        discard_prepared()
    _adopt_request(fds, request)
    return request


_PIDNS = False  # --pidns 1: every VMM is pid 1 of its own pid namespace (pclited's jail)


def _fork() -> int:
    from hypervisor.jail import pid_namespace_for_next_child
    with pid_namespace_for_next_child(_PIDNS):
        return os.fork()


def _freeze_heap() -> None:
    """Move every object the server holds out of the collector's reach: a child's garbage collections then do not
    write to (and so copy) the server's pages, which keeps each clone's private memory down."""
    import gc
    gc.freeze()


def _preload_images(spec) -> bool:
    """Keep the kernel and initrd a `run` spec names in the server's memory: its children copy them from there.
    Same for a snapshot to restore: its state verified and parsed, and this host's identity to check it against.
    True when something new was kept."""
    from hypervisor.image_file import preload
    kept = False
    if spec.command == "restore":
        from hypervisor.snapshot import preload_snapshot
        return preload_snapshot(spec.snapshot)
    for path in (spec.kernel, spec.initrd):
        if path:
            with contextlib.suppress(OSError):  # a bad path is the child's to report, in its own words
                kept = preload(path) or kept
    return kept


def _leave_server() -> None:
    """In a forked child: the server's signal set-up undone, and a session of its own."""
    import _signal
    _signal.set_wakeup_fd(-1)
    _signal.signal(_signal.SIGCHLD, _signal.SIG_DFL)
    _signal.signal(_signal.SIGTERM, _signal.SIG_DFL)
    os.setsid()


def _become_vmm(conn: socket.socket, fds: list[int], request: _Request) -> None:
    conn.close()
    _leave_server()
    _adopt_request(fds, request)
    os.closerange(3, 1 << 16)  # the server's listener, wake pipe and other callers' connections


def _adopt_request(fds: list[int], request: _Request) -> None:
    """stdio from `fds` (if given) and the request's cwd."""
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    fds.clear()  # now stdio: not to be closed again by whoever received them
    if request.cwd:
        os.chdir(request.cwd)
    if request.jail:  # entered by the VMM itself before its first thread (hypervisor/builder.py)
        os.environ["PCLITE_JAIL_PLAN"] = request.jail


def _reply(conn: socket.socket, message: dict) -> None:
    with contextlib.suppress(OSError):
        conn.sendall(json.dumps(message).encode() + b"\n")


class ForkedVmm:
    """A VMM started by the fork server: a small Popen look-alike (pid, poll, wait, returncode).

    `lost` turns true when the fork server went away before the VMM: its exit code is then unknowable here and
    the caller must look at the process itself (it keeps running: it is in its own session).
    """

    def __init__(self, conn: socket.socket, pid: int, pending: bytes = b""):
        import threading
        self.conn, self.pid, self.returncode, self.lost = conn, pid, None, False
        self._buffer = pending
        self._lock = threading.Lock()  # pclited polls from several threads

    def wait(self, timeout: float | None = None) -> int | None:
        with self._lock:
            if self.returncode is None and not self.lost:
                line, self._buffer = _read_line(self.conn, self._buffer, timeout)
                if line is None:
                    return None
                if line:
                    self.returncode = json.loads(line)["exit_code"]
                else:
                    self.lost = True
                self.conn.close()
            return self.returncode

    def poll(self) -> int | None:
        return self.wait(0) if self.returncode is None else self.returncode


def _read_line(conn: socket.socket, buffer: bytes, timeout: float | None) -> tuple[bytes | None, bytes]:
    """(one reply line, what is left): line None when none arrived within timeout, b"" when the server closed."""
    import select
    deadline = None if timeout is None else time.monotonic() + timeout
    while b"\n" not in buffer:
        remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
        if not select.select([conn], [], [], remaining)[0]:
            return None, buffer
        chunk = conn.recv(4096)
        if not chunk:
            return b"", buffer
        buffer += chunk
    line, _, rest = buffer.partition(b"\n")
    return line, rest


def spawn(server: str, spec, stdin: int, stdout: int, stderr: int, cwd: str | None = None,
          jail: str | None = None) -> ForkedVmm:
    """Ask the fork server at `server` for a VMM running the VM `spec`: a hypervisor.runspec.RunSpec, or the CLI
    options of one (["run", "--kernel", ...]: parsed here, UsageError if they are wrong; the wire carries the spec).
    jail: the JSON plan (hypervisor/jail.py) the VMM enters before it runs anything."""
    if isinstance(spec, list):
        from hypervisor.runspec import RunSpec
        spec = RunSpec.from_argv([str(arg) for arg in spec])
    request = {"spec": spec.as_dict(), "cwd": cwd or os.getcwd(), "t0": time.monotonic(), "jail": jail}
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        _connect(conn, server)
        socket.send_fds(conn, [json.dumps(request).encode()], [stdin, stdout, stderr])
        first = b""
        while b"\n" not in first:  # the pid line; the exit line may follow in the same read
            chunk = conn.recv(4096) if select_readable(conn, 30) else b""
            if not chunk:
                break
            first += chunk
    except OSError as exc:
        conn.close()
        raise ForkServerError(f"no VMM fork server at {server} ({exc}): start one with "
                              f"`python -m hypervisor forkserver --socket {server}`") from None
    line, _, rest = first.partition(b"\n")
    reply = json.loads(line or b"{}")
    if "pid" not in reply:
        conn.close()
        raise ForkServerError(reply.get("error", "the fork server closed the connection without a pid"))
    return ForkedVmm(conn, reply["pid"], rest)


def _connect(conn: socket.socket, path: str, patience_s: float = 1.0) -> None:
    """connect(), retrying ECONNREFUSED for a moment: a server between bind() and listen() refuses."""
    deadline = time.monotonic() + patience_s
    while True:
        try:
            return conn.connect(path)
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def select_readable(conn: socket.socket, timeout: float) -> bool:
    import select
    return bool(select.select([conn], [], [], timeout)[0])


def main(argv: list[str]) -> int:
    return serve(argv)
