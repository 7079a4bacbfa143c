"""VMM processes: the command line, spawning, finding them again in /proc, stopping them, their exit reasons.

Everything here blocks; the async services call it through `blocking()`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from service.core.config import Settings
from service.models import VM, Flavor

log = logging.getLogger("pclited")
BASE_CMDLINE = "console=ttyS0 quiet panic=-1 reboot=t pclite.mode=agent"
VMM_LOG = "vmm.log"


class LaunchError(Exception):
    pass


async def blocking(fn, *args, **kwargs):
    """Run fn in a daemon thread: a VMM call stuck in a socket must not hold pclited's exit (to_thread would)."""
    loop = asyncio.get_running_loop()
    future = loop.create_future()

    def settle(ok: bool, value) -> None:
        if not future.done():
            (future.set_result if ok else future.set_exception)(value)

    def run() -> None:
        try:
            result = fn(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting task
            loop.call_soon_threadsafe(settle, False, exc)
        else:
            loop.call_soon_threadsafe(settle, True, result)

    threading.Thread(target=run, daemon=True, name=f"pclited-{getattr(fn, '__name__', 'call')}").start()
    return await future


def new_vm_id() -> str:
    return "vm-" + secrets.token_hex(6)


def client_module():
    """hypervisor.client, imported on first use (it pulls in the VMM side)."""
    try:
        from hypervisor import client
    except ImportError as exc:
        raise LaunchError(f"hypervisor.client is not available ({exc})") from exc
    return client


def vmm_errors() -> tuple[type[BaseException], ...]:
    try:
        client = client_module()
    except LaunchError:
        return (LaunchError, OSError)
    return (client.VmmError, LaunchError, OSError)


def boot_phases(timeline_ms: dict | None) -> dict | None:
    """Per-phase milliseconds from the VMM's timeline (keys appear as reached)."""
    t = timeline_ms or {}

    def span(start: str, end: str) -> float | None:
        if isinstance(t.get(start), int | float) and isinstance(t.get(end), int | float):
            return round(t[end] - t[start], 3)
        return None

    phases = {"vmm_setup": span("process_start", "first_kvm_run"), "kernel": span("first_kvm_run", "init_reached"),
              "init_to_agent": span("init_reached", "agent_ready"), "total": span("process_start", "agent_ready")}
    return phases if any(v is not None for v in phases.values()) else None


def proc_cmdline(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    return [a.decode(errors="replace") for a in raw.split(b"\0")[:-1]] if raw else None


def is_vmm(pid: int | None, socket_path: str) -> bool:
    """Alive and really that VM's VMM: the pid alone could have been reused by now."""
    if not pid:
        return False
    args = proc_cmdline(pid)  # a zombie has an empty cmdline
    return bool(args) and "hypervisor" in args and socket_path in args


class Launcher:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.children: dict[str, subprocess.Popen] = {}  # VMMs this pclited started: reaped here
        self._defaults: tuple[str, str] | None = None
        self._lock = threading.Lock()

    # --- starting -------------------------------------------------------------------------------------------
    def default_artifacts(self) -> tuple[str, str]:
        with self._lock:
            if self._defaults is None:
                from guestboot.initramfs.builder import build_initramfs
                from guestboot.kernel import cached_kernel
                kernel = cached_kernel()
                if kernel is None:
                    raise LaunchError("the built-in guest kernel is not built: run `make kernel` "
                                      "(or give the flavor a kernel path)")
                image = kernel.vmlinux if kernel.vmlinux.exists() else kernel.bzimage
                self._defaults = (str(image), str(build_initramfs()))
            return self._defaults

    def command(self, vm: VM, flavor: Flavor) -> list[str]:
        kernel, initrd = flavor.kernel, flavor.initrd
        if kernel is None or initrd is None:
            default_kernel, default_initrd = self.default_artifacts()
            kernel, initrd = kernel or default_kernel, initrd or default_initrd
        cmdline = f"{BASE_CMDLINE} {flavor.cmdline_extra}".strip()
        args = ["run", "--kernel", kernel, "--initrd", initrd, "--cmdline", cmdline, "--mem", str(vm.mem_mib),
                "--vcpus", str(vm.vcpus), "--api-sock", vm.api_socket, "--console", vm.console_path, "--timeline"]
        # Detached, a VMM outlives a pclited restart and is adopted; otherwise it stops when pclited exits.
        args += ["--detach"] if self.settings.vmm_detach else []
        try:
            from hypervisor.launch import vmm_command  # the lean interpreter start (skips site)
        except ImportError:
            return [sys.executable, "-m", "hypervisor", *args]
        return vmm_command(args)

    def spawn(self, vm: VM, flavor: Flavor) -> subprocess.Popen:
        argv = self.command(vm, flavor)
        vm_dir = Path(vm.console_path).parent
        vm_dir.mkdir(parents=True, exist_ok=True)
        Path(vm.api_socket).parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(vm.api_socket)
        with open(vm_dir / VMM_LOG, "ab") as out:
            # Own session: a Ctrl-C or SIGTERM aimed at pclited's process group must not reach the VMMs.
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, cwd=vm_dir,
                                    start_new_session=True, close_fds=True)
        self.children[vm.id] = proc
        log.info("started VMM pid %d for %s", proc.pid, vm.id)
        return proc

    # --- watching -------------------------------------------------------------------------------------------
    def exit_status(self, vm: VM) -> tuple[bool, int | None]:
        """(alive, exit code if known). A VMM we started is polled (and reaped); an adopted one is looked up."""
        child = self.children.get(vm.id)
        if child is not None and vm.pid in (None, child.pid):
            code = child.poll()
            if code is None:
                return True, None
            self.children.pop(vm.id, None)
            return False, code
        return is_vmm(vm.pid, vm.api_socket), None

    def reap(self, live_ids: set[str]) -> None:
        """Forget (and reap) children whose VM is no longer live, so no zombie lingers."""
        for vm_id, child in list(self.children.items()):
            if vm_id not in live_ids and child.poll() is not None:
                self.children.pop(vm_id, None)

    def scan(self) -> dict[str, int]:
        """{socket path: pid} of every VMM process whose socket is in our run dir (ours, or orphans)."""
        prefix = str(self.settings.run_dir) + "/"
        found: dict[str, int] = {}
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            args = proc_cmdline(int(entry.name))
            if not args or "hypervisor" not in args or "--api-sock" not in args:
                continue
            index = args.index("--api-sock")
            if index + 1 < len(args) and args[index + 1].startswith(prefix):
                found[args[index + 1]] = int(entry.name)
        return found

    def describe_exit(self, vm: VM, code: int | None) -> str:
        if code is None:
            what = f"VMM pid {vm.pid} is gone"
        elif code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = f"signal {-code}"
            what = f"VMM killed by signal {-code} ({name})"
        else:
            what = f"VMM exited with code {code}"
        detail = self.log_reason(vm)
        return f"{what}: {detail}" if detail else what

    def _log_lines(self, vm: VM) -> list[str]:
        path = Path(vm.console_path).parent / VMM_LOG
        try:
            with open(path, "rb") as f:
                f.seek(max(0, os.path.getsize(path) - 16384))
                return [ln.strip() for ln in f.read().decode(errors="replace").splitlines() if ln.strip()]
        except OSError:
            return []

    def logged_exit_code(self, vm: VM) -> int | None:
        """The exit code from the VMM's --timeline line, for a VMM that is not our child (adopted)."""
        for line in reversed(self._log_lines(vm)):
            if line.startswith("{") and '"exit_code"' in line:
                with contextlib.suppress(ValueError, AttributeError):
                    code = json.loads(line).get("exit_code")
                    return code if isinstance(code, int) else None
        return None

    def log_reason(self, vm: VM) -> str | None:
        """The VMM's own words: its last error line, else its first 'pclite:' line."""
        lines = [ln for ln in self._log_lines(vm) if not ln.startswith("{")]  # not the --timeline JSON
        for line in reversed(lines):
            if "error" in line.lower():
                return line[:500]
        for line in lines:
            if line.startswith("pclite:"):
                return line[:500]
        return lines[-1][:500] if lines else None

    # --- stopping -------------------------------------------------------------------------------------------
    def wait_gone(self, vm: VM, timeout_s: float) -> tuple[bool, int | None]:
        deadline = time.monotonic() + timeout_s
        while True:
            alive, code = self.exit_status(vm)
            if not alive or time.monotonic() >= deadline:
                return not alive, code
            time.sleep(0.02)

    def stop(self, vm: VM, timeout_s: float) -> int | None:
        """Ask the VMM to shut down, then SIGTERM, then SIGKILL. Returns the exit code when known."""
        alive, code = self.exit_status(vm)
        if alive:
            asked = False
            with contextlib.suppress(*vmm_errors()):
                client_module().VmmClient(vm.api_socket, timeout=min(timeout_s, 2.0)).action("shutdown")
                asked = True
            # Not asked (no socket yet, or no answer): no point waiting for a shutdown, go to signals.
            gone, code = self.wait_gone(vm, timeout_s if asked else 0.0)
            for sig in (signal.SIGTERM, signal.SIGKILL):
                if gone:
                    break
                if is_vmm(vm.pid, vm.api_socket):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(vm.pid, sig)
                gone, code = self.wait_gone(vm, 2.0)
            if not gone:
                log.error("VMM pid %s of %s would not die", vm.pid, vm.id)
        self.cleanup(vm)
        return code

    def kill_orphan(self, pid: int, socket_path: str) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if not is_vmm(pid, socket_path):
                break
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
            deadline = time.monotonic() + 2.0
            while is_vmm(pid, socket_path) and time.monotonic() < deadline:
                time.sleep(0.02)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(socket_path)

    def cleanup(self, vm: VM) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(vm.api_socket)

    def client(self, vm: VM, timeout: float = 10.0):
        return client_module().VmmClient(vm.api_socket, timeout=timeout)
