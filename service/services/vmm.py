"""The Launcher: a VM's VMM process — its command line, starting it (fork server or fresh process), watching it,
its exit reasons, stopping it. Finding VMMs in /proc is procfs.py, their priority priority.py.

Everything here blocks; the async services call it through `work.blocking()`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

from hypervisor.client import VmmClient, VmmError
from service.core.config import Settings
from service.models import CLONE, VM, Flavor
from service.services.jail import JailService
from service.services.priority import can_raise_priority, set_nice
from service.services.procfs import is_vmm, scan_vmms

log = logging.getLogger("pclited")
BASE_CMDLINE = "console=ttyS0 quiet panic=-1 reboot=t pclite.mode=agent"
VMM_LOG = "vmm.log"
FORKSERVER_SOCKET = "forkserver/srv.sock"  # a subdirectory: the run dir's *.sock are the VMs' own
FORKSERVER_START_S = 30.0  # its imports take ~1 s in the lab; a fresh process is the fallback meanwhile


class LaunchError(Exception):
    pass


VMM_ERRORS = (VmmError, LaunchError, OSError)  # what a call to a VMM's API may raise


class Launcher:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.base_nice = os.getpriority(os.PRIO_PROCESS, 0)  # pclited's own: what a claimed VM gets back
        self.refill_nice = min(19, self.base_nice + settings.refill_nice) if settings.refill_nice else 0
        if self.refill_nice and not can_raise_priority(self.base_nice):
            log.warning("refill_nice=%d is off: pclited could not give a claimed VM its priority back (needs root, "
                        "CAP_SYS_NICE or RLIMIT_NICE down to nice %d, e.g. systemd LimitNICE=+%d); set refill_nice: 0 "
                        "to silence this", settings.refill_nice, self.base_nice, self.base_nice)
            self.refill_nice = 0
        self.children: dict[str, subprocess.Popen] = {}  # VMMs this pclited started: reaped here
        self._defaults: tuple[str, str] | None = None
        self._lock = threading.Lock()
        self._forkserver: subprocess.Popen | None = None
        self._forkserver_lock = threading.Lock()
        self.jails = JailService(settings)

    # --- starting -------------------------------------------------------------------------------------------
    def default_artifacts(self) -> tuple[str, str]:
        with self._lock:
            if self._defaults is None:
                from guestbuild.initramfs.builder import build_initramfs
                from guestbuild.kernel import cached_kernel
                kernel = cached_kernel()
                if kernel is None:
                    raise LaunchError("the built-in guest kernel is not built: run `make kernel` "
                                      "(or give the flavor a kernel path)")
                image = kernel.vmlinux if kernel.vmlinux.exists() else kernel.bzimage
                self._defaults = (str(image), str(build_initramfs()))
            return self._defaults

    def boot_spec(self, flavor: Flavor, api_socket: str, console_path: str, detach: bool, *,
                  mem_mib: int | None = None, vcpus: int | None = None):
        """The RunSpec that cold-boots the flavor (pool VMs and template VMs alike); mem_mib/vcpus: a VM row's own
        size, else the flavor's."""
        from hypervisor.runspec import RunSpec
        kernel, initrd = self.boot_files(flavor)
        return RunSpec("run", kernel=kernel, initrd=initrd, cmdline=f"{BASE_CMDLINE} {flavor.cmdline_extra}".strip(),
                       mem_mib=flavor.mem_mib if mem_mib is None else mem_mib,
                       vcpus=flavor.vcpus if vcpus is None else vcpus, api_sock=api_socket, console=console_path,
                       timeline=True, detach=detach)

    def boot_files(self, flavor: Flavor) -> tuple[str, str]:
        kernel, initrd = flavor.kernel, flavor.initrd
        if kernel is None or initrd is None:
            default_kernel, default_initrd = self.default_artifacts()
            kernel, initrd = kernel or default_kernel, initrd or default_initrd
        return kernel, initrd

    def vm_spec(self, vm: VM, flavor: Flavor):
        """The RunSpec of a VM row: a clone of its template, else a cold boot of its own size (its row's, which is
        the flavor's of its generation)."""
        # Detached, a VMM outlives a pclited restart and is adopted; otherwise it stops when pclited exits.
        detach = self.settings.vmm_detach
        if vm.source == CLONE:  # the clone's own host name: the VM id (the template's is everybody's)
            from hypervisor.runspec import RunSpec
            return RunSpec("restore", snapshot=str(self.settings.templates_dir / vm.template), api_sock=vm.api_socket,
                           console=vm.console_path, hostname=vm.id, timeline=True, detach=detach)
        return self.boot_spec(flavor, vm.api_socket, vm.console_path, detach, mem_mib=vm.mem_mib, vcpus=vm.vcpus)

    def forkserver(self) -> str | None:
        """The VMM fork server's socket, starting the server when needed; None when disabled or not up (yet).

        A forked VMM skips the interpreter start and the VMM's imports (~1 s of a boot in the lab). The server
        stops when pclited exits; the VMMs it forked do not (they are --detach'ed into their own sessions)."""
        if not self.settings.vmm_forkserver:
            return None
        path = self.settings.run_dir / FORKSERVER_SOCKET
        with self._forkserver_lock:
            if self._forkserver is None or self._forkserver.poll() is not None:
                from hypervisor.launch import vmm_command
                path.parent.mkdir(parents=True, exist_ok=True)
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                with open(path.parent / "forkserver.log", "ab") as out:
                    pidns = ["--pidns", "1"] if self.jails.on("pidns") else []
                    self._forkserver = subprocess.Popen(vmm_command(["forkserver", "--socket", str(path), *pidns]),
                                                        stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                                        start_new_session=True, close_fds=True)
                deadline = time.monotonic() + FORKSERVER_START_S
                while not path.exists() and self._forkserver.poll() is None and time.monotonic() < deadline:
                    time.sleep(0.02)
            return str(path) if path.exists() else None

    def close(self) -> None:
        if self._forkserver is not None and self._forkserver.poll() is None:
            self._forkserver.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._forkserver.wait(5)

    def spawn(self, vm: VM, flavor: Flavor):
        """Start the VM's VMM (forked by the fork server when it is up, else a fresh process); returns a
        Popen-like object (pid, poll)."""
        vm_dir = Path(vm.console_path).parent
        proc = self.start_process(self.vm_spec(vm, flavor), vm_dir, vm_dir / VMM_LOG, vm.mem_mib)
        self.children[vm.id] = proc
        niced = bool(vm.pooled and self.refill_nice and set_nice(proc.pid, self.refill_nice))
        log.info("started VMM pid %d for %s (%s)%s", proc.pid, vm.id, vm.source,
                 f" at nice {self.refill_nice}" if niced else "")
        return proc

    def start_process(self, spec, cwd: Path, log_path: Path, mem_mib: int | None = None):
        """A VMM process for the RunSpec `spec` (forked by the fork server when it is up, else a fresh process with
        the spec's command line), its output appended to log_path, jailed when the jail is on (cwd: the VM's own
        directory; mem_mib: a clone's guest RAM, which its spec does not say)."""
        cwd.mkdir(parents=True, exist_ok=True)
        Path(spec.api_sock).parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(spec.api_sock)
        jail = self.jails.plan(spec, cwd, mem_mib)
        server = self.forkserver()
        with open(log_path, "ab") as out:
            if server:
                from hypervisor.forkserver import ForkServerError, spawn
                try:  # the forked VMM gets its own session too
                    with open(os.devnull, "rb") as devnull:
                        return spawn(server, spec, devnull.fileno(), out.fileno(), out.fileno(), cwd=str(cwd),
                                     jail=jail)
                except ForkServerError as exc:
                    log.warning("VMM fork server: %s; starting a fresh VMM process instead", exc)
            # The lean interpreter start (skips site); `hypervisor` and `--api-sock` stay argv elements for the
            # /proc scans (scan_vmms, is_vmm).
            from hypervisor.jail import pid_namespace_for_next_child
            from hypervisor.launch import vmm_command
            # Not PCLITE_JAIL: that is pclited's own setting, which the VMM inherits.
            env = {**os.environ, "PCLITE_JAIL_PLAN": jail} if jail else None
            # A pid namespace only for a detached VMM: one that watches its parent needs to see it.
            with pid_namespace_for_next_child(bool(jail) and self.jails.on("pidns") and spec.detach):
                # Own session: a Ctrl-C or SIGTERM aimed at pclited's process group must not reach the VMMs.
                return subprocess.Popen(vmm_command(spec.to_argv()), stdin=subprocess.DEVNULL, stdout=out,
                                        stderr=out, cwd=cwd, start_new_session=True, close_fds=True, env=env)

    def foreground(self, vm: VM) -> None:
        """A claimed VM runs someone's work: back to normal priority (it may have booted as a niced refill, of this
        pclited or of one before a restart)."""
        if vm.pid and not set_nice(vm.pid, self.base_nice):
            log.warning("could not renice VMM pid %s of %s to %d: it keeps running at low priority", vm.pid, vm.id,
                        self.base_nice)

    # --- watching -------------------------------------------------------------------------------------------
    def watch(self, vm_id: str, proc) -> None:
        """Poll (and reap) proc as vm_id's VMM: one started by start_process (spawn does this itself)."""
        self.children[vm_id] = proc

    def forget(self, vm_id: str) -> None:
        self.children.pop(vm_id, None)

    def exit_status(self, vm: VM) -> tuple[bool, int | None]:
        """(alive, exit code if known). A VMM we started is polled (and reaped); an adopted one is looked up."""
        child = self.children.get(vm.id)
        if child is not None and vm.pid in (None, child.pid):
            code = child.poll()
            if getattr(child, "lost", False):  # its fork server died first: look at the process itself
                self.children.pop(vm.id, None)
                return is_vmm(vm.pid, vm.api_socket), None
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
        return scan_vmms(self.settings.run_dir)

    def describe_exit(self, vm: VM, code: int | None) -> str:
        if code is None:
            what = f"VMM pid {vm.pid} is gone"
        elif code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = f"signal {-code}"
            what = f"VMM killed by signal {-code} ({name})"
            if -code == signal.SIGSYS:  # the reason starts with the word `seccomp`: clients match on it
                what = f"seccomp: {what}: it made a syscall outside its allow-list (hypervisor/seccomp_filter.py)"
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
            with contextlib.suppress(*VMM_ERRORS):
                VmmClient(vm.api_socket, timeout=min(timeout_s, 2.0)).action("shutdown")
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
        if os.path.dirname(socket_path) == str(self.settings.run_dir):  # a pool VM's: its cgroup leaf goes too
            self.jails.release(self.settings.vm_dir / Path(socket_path).stem, wait_s=0.5)

    def cleanup(self, vm: VM) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(vm.api_socket)
        self.jails.release(Path(vm.console_path).parent)
        # A container's rootfs image (services/rootfs.py) is as large as its rootfs: it goes with the VM.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(Path(vm.console_path).parent / "rootfs.ext4")

    def client(self, vm: VM, timeout: float = 10.0):
        return VmmClient(vm.api_socket, timeout=timeout)
