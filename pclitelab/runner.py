"""Run one command inside the lab VM and return its exit code, streaming its output."""

from __future__ import annotations

import contextlib
import fcntl
import os
import selectors
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from guestbuild.cache import cache_root
from pclitelab.assets import lab_assets

# Environment passed into the lab: the rest of the host's environment means nothing inside.
PASSED_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "CI", "PYTHONUNBUFFERED", "PYTHONDONTWRITEBYTECODE", "PYTHONPATH")
PASSED_PREFIXES = ("PCLITE_",)


MONITOR_SOCKET = "monitor.sock"
BACKTRACE_GRACE_S = 15.0


class LabError(Exception):
    """The lab itself failed (not the command run in it)."""


class LabFault(LabError):
    """The lab itself broke down (nested KVM under TCG), not the command in it: a fresh lab may do better."""


class LabKernelPanic(LabFault):
    """The lab's own kernel panicked."""


class LabStalled(LabFault):
    """The lab stopped making progress as its caller measures it (e.g. no test finished for longer than any test
    may take): seen as both lab CPUs spinning in the kernel with interrupts off, which nothing inside can report."""


PANIC_LINE = b"Kernel panic - not syncing"


@dataclass
class LabRequest:
    command: list[str]
    workdir: Path = field(default_factory=Path.cwd)
    mem_mib: int = 4096
    cpus: int = 2
    timeout_s: float = 3600.0
    forwards: list[tuple[int, int]] = field(default_factory=list)  # (host port on 127.0.0.1, guest port)
    extra_shares: list[Path] = field(default_factory=list)  # writable inside the lab at the same path
    stalled: Callable[[], str | None] | None = None  # polled each second: a reason ends the lab (LabStalled)
    env: dict[str, str] = field(default_factory=dict)  # more environment for the command


def _command_script(request: LabRequest, results: Path) -> str:
    env = {name: os.environ[name] for name in os.environ
           if name in PASSED_ENV or name.startswith(PASSED_PREFIXES)}
    env.update(request.env)
    env["PCLITE_IN_LAB"] = "1"
    env["TERM"] = "dumb"  # the lab console is a serial tty: no colour codes in the streamed output
    env["PCLITE_LAB_RESULTS"] = str(results)
    lines = ["# written by pclite-lab: the command to run inside the lab"]
    lines += [f"export {name}={shlex.quote(value)}" for name, value in sorted(env.items())]
    lines += [f"cd {shlex.quote(str(request.workdir))} || exit 125", "exec " + shlex.join(request.command)]
    return "\n".join(lines) + "\n"


def qemu_command(request: LabRequest, results: Path, shares: list[tuple[str, Path]]) -> list[str]:
    assets = lab_assets()
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        raise LabError("qemu-system-x86_64 is not installed: run `make deps` as root (Debian package qemu-system-x86)")
    cmd = [qemu, "-accel", "tcg,thread=multi", "-cpu", "max", "-smp", str(request.cpus), "-m", str(request.mem_mib),
           "-nodefaults", "-no-user-config", "-nographic", "-no-reboot", "-serial", "stdio",
           "-bios", "qboot.rom", "-kernel", str(assets.kernel), "-initrd", str(assets.initrd),
           # A stuck lab must end with a stack trace, not sit out the timeout: hung tasks panic, and at timeout
           # (see _stream) magic SysRq keys print every CPU's backtrace and the blocked tasks. Soft lockups only
           # warn: under TCG an IPI to a CPU running a nested guest can take 20+ s to land, then all goes on.
           # i8042.nopnp: the SysRq keys need the PS/2 keyboard, which qboot (no ACPI) does not announce.
           # Stray NMIs only warn too: the nested SVM of TCG delivers "NMI for unknown reason" now and then.
           "-append", "console=ttyS0 quiet loglevel=3 panic=-1 tsc=reliable hung_task_panic=1 "
                      "hung_task_timeout_secs=300 sysrq_always_enabled=1 i8042.nopnp panic_print=0x40",
           "-monitor", f"unix:{results / MONITOR_SOCKET},server=on,wait=off",
           "-virtfs", "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap",
           "-virtfs", f"local,path={results},mount_tag=results,security_model=none,multidevs=remap"]
    for tag, path in shares:
        cmd += ["-virtfs", f"local,path={path},mount_tag={tag},security_model=none,multidevs=remap"]
    if request.forwards:
        fwd = ",".join(f"hostfwd=tcp:127.0.0.1:{host}-:{guest}" for host, guest in request.forwards)
        # restrict=on: the lab never reaches a network; only the forwarded loopback ports exist
        cmd += ["-netdev", f"user,id=net0,restrict=on,{fwd}", "-device", "virtio-net-pci,netdev=net0"]
    return cmd


def run_in_lab(request: LabRequest, out=None) -> int:
    """Run request.command in a fresh lab VM; returns its exit code. Raises LabError when the lab fails."""
    out = out or sys.stdout.buffer
    workdir = request.workdir.resolve()
    shares = []
    for index, path in enumerate([workdir, cache_root(), *request.extra_shares]):
        path = Path(path).resolve()
        path.mkdir(parents=True, exist_ok=True)
        if not any(path == p or path.is_relative_to(p) for _, p in shares):
            shares.append((f"share{index}", path))
    with _one_lab_at_a_time(), tempfile.TemporaryDirectory(prefix="pclite-lab-") as tmp:
        results = Path(tmp)
        (results / "cmd.sh").write_text(_command_script(request, results))
        (results / "lab.env").write_text(
            f"LAB_SHARES={shlex.quote(' '.join(f'{tag}={path}' for tag, path in shares))}\n"
            f"LAB_RESULTS={shlex.quote(str(results))}\nLAB_NET={1 if request.forwards else 0}\n")
        cmd = qemu_command(request, results, shares)
        started = time.monotonic()
        tail, panicked = _stream(cmd, request.timeout_s, out, monitor=results / MONITOR_SOCKET,
                                 stalled=request.stalled)
        exit_file = results / "exit-code"
        if not exit_file.exists():
            if panicked:
                raise LabKernelPanic(f"the lab's kernel panicked after {time.monotonic() - started:.0f}s (its "
                                     f"backtrace is above): a fault of the lab's nested KVM, not of the command")
            last = b"\n".join(tail.splitlines()[-15:]).decode(errors="replace")
            raise LabError(f"the lab VM stopped after {time.monotonic() - started:.0f}s before the command finished; "
                           f"its last console lines:\n{last}")
        return int(exit_file.read_text().strip() or "1")


@contextlib.contextmanager
def _one_lab_at_a_time():
    """Two labs on one host starve each other's emulated CPUs (timings swing several-fold, lab kernels have
    locked up): a second lab waits for the first."""
    lock_path = cache_root() / "lab" / "session.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "unknown"
            print(f"pclite-lab: another lab session is running ({holder}); waiting for it to finish",
                  file=sys.stderr, flush=True)
            fcntl.flock(lock, fcntl.LOCK_EX)
        lock.seek(0)
        lock.truncate()
        lock.write(f"pid {os.getpid()}, started {time.strftime('%H:%M:%S')}")
        lock.flush()
        yield


def _die_with_parent() -> None:
    """In the QEMU child: SIGKILL when the thread that started it goes, so a killed runner leaves no lab behind."""
    import ctypes
    ctypes.CDLL(None, use_errno=True).prctl(1, 9)  # PR_SET_PDEATHSIG, SIGKILL


def _ask_for_backtraces(monitor: Path) -> None:
    """SysRq through the lab's PS/2 keyboard: w = blocked tasks, l = every CPU's backtrace."""
    try:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(2)
            sock.connect(str(monitor))
            sock.sendall(b"sendkey alt-sysrq-w\nsendkey alt-sysrq-l\n")
            time.sleep(0.5)
    except OSError:
        pass  # the backtrace is a courtesy; the timeout error is reported either way


def _stream(cmd: list[str], timeout_s: float, out, monitor: Path | None = None,
            stalled: Callable[[], str | None] | None = None) -> tuple[bytes, bool]:
    """Pipe QEMU's serial console to `out` (CRLF → LF) until it exits; past the timeout, ask the lab kernel for
    its backtraces (SysRq) and give it a few seconds to print them, then kill it. Returns (the last 4 KiB of the
    console, whether the lab's kernel panicked on its own)."""
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            preexec_fn=_die_with_parent)
    selector = selectors.DefaultSelector()
    selector.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout_s if timeout_s > 0 else float("inf")  # 0: a service, no limit
    tail = b""
    pending = b""
    timed_out = panicked = False
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 and not timed_out and monitor is not None:
                timed_out = True
                out.write(b"\npclite-lab: timeout; asking the lab kernel for backtraces (SysRq w, l)\n")
                _ask_for_backtraces(monitor)
                deadline = time.monotonic() + BACKTRACE_GRACE_S
                continue
            if remaining <= 0:
                proc.kill()
                raise LabError(f"the lab did not finish within {timeout_s:.0f}s (--timeout); it was stopped")
            if stalled is not None and not timed_out and (reason := stalled()):
                out.write(f"\npclite-lab: the lab is stuck: {reason}; stopping it\n".encode())
                if monitor is not None:
                    _ask_for_backtraces(monitor)
                    time.sleep(2)
                raise LabStalled(f"the lab stopped making progress ({reason}): a fault of the lab's nested KVM, "
                                 f"not of the command")
            if not selector.select(timeout=min(remaining, 1.0)):
                continue
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                if timed_out:
                    raise LabError(f"the lab did not finish within {timeout_s:.0f}s (--timeout); it was stopped "
                                   f"(backtraces above)")
                break
            chunk = (pending + chunk).replace(b"\r\n", b"\n")
            pending = b""
            if chunk.endswith(b"\r"):
                chunk, pending = chunk[:-1], b"\r"
            out.write(chunk.replace(b"\r", b""))
            out.flush()
            panicked = panicked or (not timed_out and PANIC_LINE in tail[-64:] + chunk)
            tail = (tail + chunk)[-4096:]
    finally:
        selector.close()
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    return tail, panicked
