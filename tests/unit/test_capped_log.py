"""Per-VM logs a guest cannot grow: a real CappedLog file, the VMM's stderr (vmm.log) capped in a real child
process, and rate-limited log lines for device-error floods."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest

from hypervisor import lazylog
from hypervisor.capped_log import CappedLog


def test_console_log_keeps_its_tail_at_the_cap(tmp_path):
    path = tmp_path / "console.log"
    log = CappedLog(str(path), cap=16 << 10)
    for i in range(40_000):  # ~700 KB in console-sized writes, the last line known
        line = f"guest line {i}\n".encode()
        assert log.write(line) == len(line)
        if i % 97 == 0:
            assert os.path.getsize(path) <= 16 << 10
    text = path.read_bytes()
    assert text.endswith(b"guest line 39999\n") and b"guest line 100\n" not in text
    assert b"[pclite: earlier output dropped" in text
    assert 8 << 10 <= len(text) <= 16 << 10  # at least the last half cap is kept
    log.close()


def test_one_huge_write_keeps_its_own_tail(tmp_path):
    path = tmp_path / "console.log"
    log = CappedLog(str(path), cap=8192)
    log.write(b"a" * 100_000 + b"THE END")
    assert os.path.getsize(path) <= 8192 and path.read_bytes().endswith(b"THE END")


def test_existing_big_file_is_cut_on_first_write(tmp_path):
    path = tmp_path / "console.log"
    path.write_bytes(b"x" * 100_000)
    CappedLog(str(path), cap=8192).write(b"new\n")
    assert os.path.getsize(path) <= 8192 and path.read_bytes().endswith(b"new\n")


def test_tiny_cap_is_refused(tmp_path):
    with pytest.raises(ValueError, match="at least 4096 bytes"):
        CappedLog(str(tmp_path / "x"), cap=100)


def test_vmm_stderr_appended_to_a_file_is_capped(tmp_path):
    """As the launcher starts a VMM: stderr (and stdout) appended to vmm.log; a flood of log lines stays capped."""
    script = ("import logging, sys\n"
              "from hypervisor.capped_log import cap_stderr\n"
              "assert cap_stderr(16384)\n"
              "for i in range(5000):\n"
              "    logging.getLogger('pclite.test').warning('device error %d', i)\n")
    path = tmp_path / "vmm.log"
    with open(path, "ab") as out:
        subprocess.run([sys.executable, "-c", script], stdout=out, stderr=out, check=True, timeout=60)
    assert os.path.getsize(path) <= 16384
    assert path.read_bytes().endswith(b"device error 4999\n")


def test_stderr_not_a_file_is_left_alone():
    out = subprocess.run([sys.executable, "-c", "from hypervisor.capped_log import cap_stderr; print(cap_stderr())"],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"  # a pipe: nothing to cap


def test_device_error_flood_is_rate_limited(caplog, monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(lazylog.time, "monotonic", lambda: clock[0])
    log = lazylog.LazyLogger("pclite.test.flood")
    with caplog.at_level(logging.INFO, logger="pclite.test.flood"):
        for i in range(100_000):
            log.warning("virtio %s: %s; device needs reset", "blk", f"bad descriptor {i}")
        log.info("another template")
        assert len(caplog.records) == lazylog.BURST + 1
        clock[0] += lazylog.WINDOW_S
        log.warning("virtio %s: %s; device needs reset", "blk", "again")
    messages = [r.getMessage() for r in caplog.records]
    assert messages[-2].startswith(f"{100_000 - lazylog.BURST} more lines like") and "again" in messages[-1]
    assert caplog.records[0].filename == "test_capped_log.py"  # the caller's line, not the limiter's
