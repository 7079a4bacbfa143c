"""Time a VM process from its start to a console line, the way a user would see the boot."""

from __future__ import annotations

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


def time_until_line(cmd: list[str], pattern: str, timeout_s: float = 60.0) -> TimedBoot:
    regex = re.compile(pattern.encode())
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
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
            proc.kill()
            proc.communicate()
    finally:
        selector.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = buffer.decode(errors="replace").replace("\r", "")
    if found is None:
        return TimedBoot(None, "", text)
    return TimedBoot(found[0], found[1], text)
