"""Time a VM process from its start to a console line, the way a user would see the boot."""

from __future__ import annotations

import contextlib
import os
import re
import selectors
import subprocess
import time
from dataclasses import dataclass


@dataclass
class TimedBoot:
    seconds: float | None  # None: the line never came
    line: str
    output: str


def time_until_line(cmd, pattern: str, timeout_s: float = 60.0) -> TimedBoot:
    """cmd: an argv, or a callable that starts the VM itself and returns a Popen look-alike whose stdout
    carries the VM's output (e.g. a VMM forked by the fork server: tests/support/pclite.py)."""
    regex = re.compile(pattern.encode())
    start = time.monotonic()
    # Own session: the kill below reaches everything the VM process started.
    proc = cmd() if callable(cmd) else subprocess.Popen(
        cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    buffer = b""
    found = None
    selector = selectors.DefaultSelector()
    selector.register(proc.stdout, selectors.EVENT_READ)
    try:
        while found is None and time.monotonic() - start < timeout_s:
            if not selector.select(timeout=0.5):
                continue
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                break
            buffer += chunk
            complete = buffer[: buffer.rfind(b"\n") + 1]  # only whole lines: a half-printed number must not match
            if match := regex.search(complete):
                found = time.monotonic() - start, match.group(0).decode(errors="replace")
        # let the VM finish powering off; a VM that does not is killed
        try:
            rest, _ = proc.communicate(timeout=10 if found else 1)
            buffer += rest or b""
        except subprocess.TimeoutExpired:
            pass
    finally:
        selector.close()
        _kill_bounded(proc)
    if proc.returncode is None:
        found = None
        buffer += f"\n[harness: {_unkillable(proc.pid)}]\n".encode()
    text = buffer.decode(errors="replace").replace("\r", "")
    if found is None:
        return TimedBoot(None, "", text)
    return TimedBoot(found[0], found[1], text)


def _kill_bounded(proc: subprocess.Popen, grace_s: float = 20.0) -> None:
    """SIGKILL the process group and wait a bounded time: a VMM stuck in the kernel must not hang the test run."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 9)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace_s)
    proc.stdout.close()


def _unkillable(pid: int) -> str:
    """What the kernel says about a process that survived SIGKILL (state, wait channel, kernel stacks)."""
    lines = [f"process {pid} survived SIGKILL for 20 s"]
    for task in sorted(os.listdir(f"/proc/{pid}/task")) if os.path.isdir(f"/proc/{pid}/task") else []:
        base = f"/proc/{pid}/task/{task}"
        for name in ("stat", "wchan", "stack"):
            try:
                with open(f"{base}/{name}") as f:
                    lines.append(f"{task} {name}: {f.read().strip()}")
            except OSError:
                pass
    return "\n".join(lines)
