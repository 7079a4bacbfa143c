"""Per-VM log files that a guest cannot grow without bound: each keeps (at least) its last half cap.

The guest writes the console (console.log) and can provoke the VMM's own lines (vmm.log) at any rate, forever. A
CappedLog appends until a write would take the file past `cap` bytes; then the file is cut to its last cap/2 bytes
(one copy per cap/2 written, so appending stays O(1) amortised) behind a one-line marker saying so.
"""

from __future__ import annotations

import os
import threading

DEFAULT_CAP = int(os.environ.get("PCLITE_LOG_MAX_BYTES", 8 << 20))
MIN_CAP = 4096


class CappedLog:
    def __init__(self, path: str | None = None, cap: int = DEFAULT_CAP, *, fd: int | None = None):
        if cap < MIN_CAP:
            raise ValueError(f"a capped log needs a cap of at least {MIN_CAP} bytes, got {cap}")
        # O_APPEND: other descriptors of the same file (a VMM's stdout) keep appending at the end after a cut
        self.fd = fd if fd is not None else os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
        self.cap = cap
        self.marker = f"\n[pclite: earlier output dropped: this log keeps its last {cap // 2}+ bytes]\n".encode()
        self._lock = threading.Lock()
        self._size = os.fstat(self.fd).st_size  # what we know of; re-read from the file before a cut

    def write(self, data) -> int:
        """Append data (bytes-like); returns len(data), as a file's write would (what is dropped counts)."""
        size = len(data)
        keep = self.cap // 2
        with self._lock:
            if size > keep - len(self.marker):
                data = bytes(data[size - keep + len(self.marker):])
            if self._size + len(data) > self.cap:
                self._size = os.fstat(self.fd).st_size  # others (a VMM's stdout) may append to the file too
            length = self._size
            if length + len(data) > self.cap:
                tail = os.pread(self.fd, keep - len(self.marker) - len(data), length - keep + len(self.marker)
                                + len(data)) if keep - len(self.marker) - len(data) > 0 else b""
                os.ftruncate(self.fd, 0)
                os.write(self.fd, self.marker + tail)
                self._size = len(self.marker) + len(tail)
            view = memoryview(data)
            while view:
                view = view[os.write(self.fd, view):]
            self._size += len(data)
        return size

    def close(self) -> None:
        os.close(self.fd)


class _RawLog:
    """The minimal binary file a TextIOWrapper writes through."""

    def __init__(self, log: CappedLog):
        self._log = log
        self.closed = False

    def writable(self) -> bool:
        return True

    def readable(self) -> bool:
        return False

    def seekable(self) -> bool:
        return False

    def write(self, data) -> int:
        return self._log.write(data)

    def flush(self) -> None:
        pass


def cap_stderr(cap: int = DEFAULT_CAP) -> bool:
    """vmm.log: when stderr is a regular file opened for appending (the launcher's vmm.log), what Python writes to
    it (sys.stderr: log lines, tracebacks, messages) goes through a CappedLog. Returns whether it does."""
    import fcntl
    import io
    import stat
    import sys
    try:
        if not stat.S_ISREG(os.fstat(2).st_mode) or not fcntl.fcntl(2, fcntl.F_GETFL) & os.O_APPEND:
            return False
        fd = os.open("/proc/self/fd/2", os.O_RDWR | os.O_APPEND | os.O_CLOEXEC)  # readable: a cut reads the tail
    except OSError:
        return False
    sys.stderr.flush()
    raw = _RawLog(CappedLog(cap=cap, fd=fd))
    sys.stderr = io.TextIOWrapper(raw, encoding="utf-8", errors="backslashreplace", line_buffering=True,
                                  write_through=True)
    return True
