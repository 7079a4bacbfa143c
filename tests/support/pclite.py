"""Command lines for pclite's own VMM (a fresh process, or forked by the fork server), and its --timeline JSON."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

from hypervisor.launch import vmm_command


def vmm_args(kernel: Path, initrd: Path, cmdline: str, *, mem_mib: int = 256, vcpus: int = 1,
             boot: str = "auto") -> list[str]:
    return ["run", "--kernel", str(kernel), "--initrd", str(initrd), "--cmdline", cmdline,
            "--mem", str(mem_mib), "--vcpus", str(vcpus), "--boot", boot, "--timeline"]


def vmm_run(kernel: Path, initrd: Path, cmdline: str, **options) -> list[str]:
    return vmm_command(vmm_args(kernel, initrd, cmdline, **options))


def timeline_of(output: str) -> dict:
    for line in reversed(output.splitlines()):
        if line.startswith('{"timeline_ms"'):
            return json.loads(line)
    raise AssertionError(f"no --timeline JSON in the VMM output:\n{output[-2000:]}")


class ForkedProcess:
    """A VMM forked by the fork server, with the bits of subprocess.Popen that time_until_line uses."""

    def __init__(self, server: str, args: list[str]):
        from hypervisor.forkserver import spawn
        read_end, write_end = os.pipe()
        devnull = os.open(os.devnull, os.O_RDONLY)
        try:
            self._vm = spawn(server, args, devnull, write_end, write_end)
        finally:
            os.close(write_end)
            os.close(devnull)
        self.pid = self._vm.pid
        self.stdout = os.fdopen(read_end, "rb", buffering=0)

    @property
    def returncode(self):
        return self._vm.returncode

    def poll(self):
        return self._vm.poll()

    def wait(self, timeout=None):
        code = self._vm.wait(timeout)
        if code is None:
            raise subprocess.TimeoutExpired("forked VMM", timeout)
        return code

    def communicate(self, timeout=None):
        deadline = time.monotonic() + (timeout or 3600)
        rest = b""
        while chunk := _read_with_deadline(self.stdout.fileno(), deadline):
            rest += chunk
        return rest, self.wait(max(0.0, deadline - time.monotonic()))


def _read_with_deadline(fd: int, deadline: float) -> bytes:
    import select
    if not select.select([fd], [], [], max(0.0, deadline - time.monotonic()))[0]:
        raise subprocess.TimeoutExpired("forked VMM", None)
    return os.read(fd, 65536)


class ForkServer:
    """`python -m hypervisor forkserver` for the duration of a with-block; .run(args) -> a ForkedProcess starter.
    warm=False: no VMM forked ahead of requests (each request pays the fork and KVM_CREATE_VM)."""

    def __init__(self, directory: Path, warm: bool = True, pidns: bool = False):
        """pidns: each VMM is pid 1 of its own pid namespace (as pclited's jail has it)."""
        name = f"forkserver{'' if warm else '-cold'}{'-pidns' if pidns else ''}.sock"
        self.path = str(directory / name)
        self.proc = subprocess.Popen(vmm_command(["forkserver", "--socket", self.path, "--warm", str(int(warm)),
                                                  "--pidns", str(int(pidns))]), stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while not os.path.exists(self.path):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the VMM fork server did not start")
            time.sleep(0.02)

    def starter(self, args: list[str]):
        return lambda: ForkedProcess(self.path, args)

    def __enter__(self):
        return self

    def __exit__(self, *_):
        self.proc.terminate()
        self.proc.wait(10)
