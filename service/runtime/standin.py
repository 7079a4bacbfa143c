"""The stand-in: the host process containerd's shim sees as the container's process (its pid is in --pid-file).

It starts the real process in the VM through the VMM's interactive exec, relays stdio both ways (the shim's pipes,
or a terminal whose master went to the shim's console socket), forwards the signals it gets (SIGWINCH becomes a
terminal resize), and finally exits the way the guest process did: same exit code, or killed by the same signal.
One thread and one poll loop: signals arrive through a wakeup pipe.
"""

import _signal
import errno
import os
import select
import time

from service.runtime.transport import Unreachable, Vmm, WireError

FORWARDED = (_signal.SIGHUP, _signal.SIGINT, _signal.SIGQUIT, _signal.SIGUSR1, _signal.SIGUSR2, _signal.SIGTERM,
             _signal.SIGWINCH)
PARENT_GONE_WAIT_S = 5.0
PID_FILE_GRACE_S = 0.2
LOST_VM_EXIT = 255


class Relay:
    def __init__(self, vmm: Vmm, body: dict, log, stdin_fd: int, out_fd: int, err_fd: int, tty: bool):
        self.vmm, self.body, self.log = vmm, body, log
        self.stdin_fd, self.out_fd, self.err_fd, self.tty = stdin_fd, out_fd, err_fd, tty
        self.exec_id: int | None = None
        self.guest_pid: int | None = None
        self._sock = None

    def prepare(self) -> None:
        """For the init process, while containerd has yet to call `start`: connect to the VMM now, and take the
        copy-on-write faults of this forked process now (a gc pass writes to every object's header), not after."""
        try:
            self._sock = self.vmm.connect()
        except WireError:
            self._sock = None  # start() tries again, and says what is wrong
        import gc
        gc.collect()

    def start(self) -> None:
        """Start the guest process (raises WireError with the agent's reason when it cannot)."""
        self._wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        _signal.set_wakeup_fd(wake_w)
        for signo in FORWARDED:  # a Python-level handler, so the signal number reaches the wakeup pipe
            _signal.signal(signo, lambda *_: None)
        if self.tty and "size" not in self.body:
            size = window_size(self.stdin_fd)
            if size:
                self.body["size"] = list(size)
        sock, self._sock = self._sock, None
        self.stream = self.vmm.start(self.body, sock)
        first = self.stream.next_lines() or [{"error": "the VMM closed the stream before the process started"}]
        if "started" not in first[0]:
            self.stream.close()
            raise WireError(f"the guest could not start {self.body['argv'][0]}: {first[0].get('error', first[0])}")
        self.exec_id, self.guest_pid = first[0]["started"]["exec_id"], first[0]["started"]["pid"]
        self._pending = first[1:]

    def run(self) -> dict:
        """Relay until the guest process exits; returns its exit record ({"exit_code", "signal", ...})."""
        stream_fd = self.stream.sock.fileno()
        stdin_open = self.stdin_fd >= 0
        poller = select.poll()
        poller.register(stream_fd, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        if stdin_open:
            poller.register(self.stdin_fd, select.POLLIN)
        lines = self._pending
        while True:
            for line in lines or ():
                if "exit" in line:
                    return line["exit"]
                if "error" in line:
                    raise WireError(f"the guest agent lost the process: {line['error']}")
                self._output(line)
            for fd, _ in _poll(poller):
                if fd == self._wake_r:
                    self._signals()
                elif fd == self.stdin_fd and stdin_open:
                    stdin_open = self._stdin()
                    if not stdin_open:
                        poller.unregister(self.stdin_fd)
            lines = self.stream.take_lines() if _readable(stream_fd) else []
            if lines is None:
                raise Unreachable("the VMM closed the process stream (did the VM stop?)")

    def _output(self, line: dict) -> None:
        from binascii import a2b_base64
        for key, fd in (("stdout_b64", self.out_fd), ("stderr_b64", self.err_fd)):
            if key in line and fd >= 0:
                _write_all(fd, a2b_base64(line[key]))

    def _stdin(self) -> bool:
        """Forward what stdin has; False once it is closed (its end is forwarded too, except for a terminal)."""
        try:
            data = os.read(self.stdin_fd, 65536)
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EINTR):
                return True
            data = b""  # EIO: the terminal's master is gone
        try:
            self.vmm.stdin(self.exec_id, data, eof=not data and not self.tty)
        except WireError as exc:
            if exc.status != 404:  # 404: the process has exited meanwhile
                self.log.warning(f"stdin of guest process {self.guest_pid}: {exc}")
            return False
        return bool(data)

    def _signals(self) -> None:
        try:
            got = os.read(self._wake_r, 64)
        except BlockingIOError:
            return
        for signo in got:
            try:
                if signo == _signal.SIGWINCH:
                    size = window_size(self.stdin_fd) if self.tty else None
                    if size:
                        self.vmm.resize(self.exec_id, *size)
                else:
                    self.vmm.signal(self.exec_id, signo)
            except WireError as exc:
                if exc.status != 404:
                    self.log.warning(f"forwarding signal {signo} to guest process {self.guest_pid}: {exc}")


def _poll(poller) -> list:
    while True:
        try:
            return poller.poll()
        except InterruptedError:
            continue


def _readable(fd: int) -> bool:
    return bool(select.select([fd], [], [], 0)[0])


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view):]
        except InterruptedError:
            continue
        except BlockingIOError:
            select.select([], [fd], [])
        except OSError:
            return  # nobody reads this stream any more (EPIPE): the output is dropped, as for any process


def window_size(fd: int) -> tuple[int, int] | None:
    try:
        import fcntl  # terminal-only imports: not paid by the usual pipes
        import struct
        import termios
        rows, cols = struct.unpack("HHHH", fcntl.ioctl(fd, termios.TIOCGWINSZ, bytes(8)))[:2]
    except OSError:
        return None
    return (rows, cols) if rows and cols else None


def make_raw(fd: int) -> None:
    """No echo, no line editing, no signal keys, no CR/LF changes: the guest's own terminal does all of that."""
    import termios
    attrs = termios.tcgetattr(fd)
    attrs[0] &= ~(termios.IGNBRK | termios.BRKINT | termios.PARMRK | termios.ISTRIP | termios.INLCR
                  | termios.IGNCR | termios.ICRNL | termios.IXON)
    attrs[1] &= ~termios.OPOST
    attrs[2] = (attrs[2] & ~(termios.CSIZE | termios.PARENB)) | termios.CS8
    attrs[3] &= ~(termios.ECHO | termios.ECHONL | termios.ICANON | termios.ISIG | termios.IEXTEN)
    attrs[6][termios.VMIN], attrs[6][termios.VTIME] = 1, 0
    termios.tcsetattr(fd, termios.TCSANOW, attrs)


def take_terminal(slave: int) -> None:
    """Become a session leader whose controlling terminal is `slave` (so SIGWINCH reaches us), on stdio."""
    os.setsid()
    import fcntl
    import termios
    fcntl.ioctl(slave, termios.TIOCSCTTY, 0)
    for fd in (0, 1, 2):
        os.dup2(slave, fd)
    if slave > 2:
        os.close(slave)


def finish(result: dict, log) -> None:
    """Exit as the guest process did: its code, or death by its signal (no core file of our own)."""
    signo = result.get("signal")
    if signo:
        import resource
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        _signal.set_wakeup_fd(-1)
        if signo not in (_signal.SIGKILL, _signal.SIGSTOP):  # those two have no handler to reset
            _signal.signal(signo, _signal.SIG_DFL)
            _signal.pthread_sigmask(_signal.SIG_UNBLOCK, [signo])
        os.kill(os.getpid(), signo)
        time.sleep(0.1)
        os._exit(128 + signo)  # a signal whose default action is not to terminate (SIGWINCH, SIGCHLD...)
    code = result.get("exit_code")
    os._exit(code if isinstance(code, int) else LOST_VM_EXIT)


def wait_parent_gone(parent: int) -> None:
    """An `exec` stand-in must not exit before the shim has read its pid file: containerd 1.6 drops the exit of a
    pid it does not know yet. The runtime writes the file, then exits; give the shim a moment after that."""
    deadline = time.monotonic() + PARENT_GONE_WAIT_S
    while os.getppid() == parent and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(PID_FILE_GRACE_S)
