"""The one place a VM is assembled from a RunSpec (hypervisor/runspec.py), for a cold boot and for a snapshot
restore (Firecracker's builder.rs role), and run to its end. The CLI (`python -m hypervisor run|restore`), the fork
server's children and pclited's template VMs (which start the CLI) all come through here.

  run(spec, timeline)      the whole life of one VM in this process: build, serve the API, wait; the exit code
  boot(spec, timeline)     a cold-booted machine, started: (machine, agent channel)
  restore(spec, timeline)  a clone of spec.snapshot, started: (machine, agent channel)
  prepare(spec)            for a warm VMM: start loading a `run` spec's images ahead (boot_images.prepare)

The timeline is passed in (the caller owns it: a fork server's child starts it at the request's time). Only os and
sys are imported here: `run` starts loading the images before the rest of the VMM is imported (see
hypervisor/boot_images.py).
"""

from __future__ import annotations

import os
import sys

PARENT_POLL_S = 0.5


def console_sink(target: str):
    """"-": this process's stdout, "none": discarded, else appended to that file (its tail kept: CappedLog)."""
    if target == "none":
        return None
    if target == "-":
        fd = sys.stdout.fileno()
    elif _regular_or_new(target):
        from hypervisor.capped_log import CappedLog  # the guest may print forever: the file keeps its tail
        return CappedLog(target).write
    else:  # a FIFO or a terminal: nothing accumulates on the host to cap
        fd = os.open(target, os.O_WRONLY | os.O_APPEND)
    return lambda data: os.write(fd, data)


def _regular_or_new(path: str) -> bool:
    import stat
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except FileNotFoundError:
        return True


def _rootfs(spec) -> tuple[str | None, bool]:
    drive = spec.drive("rootfs")
    return (drive.path, drive.read_only) if drive else (None, False)


class BuiltVm:
    """A started VM: its machine, its agent channel and its control API server (None without spec.api_sock)."""

    def __init__(self, machine, agent, server=None):
        self.machine, self.agent, self.server = machine, agent, server

    def close(self) -> None:
        """After the machine stopped (or failed): the agent channel, the API and KVM released."""
        self.agent.close()
        if self.server is not None:
            self.server.close()
        self.machine.close()


def boot(spec, timeline, images=None, serve=None) -> BuiltVm:
    """Build and start the cold boot `spec` describes. `images`: its images already loading (boot_images); else
    started here. `serve(machine, agent)`: starts the control API once the config is valid, before the build (a
    client may connect while the guest boots). Raises VmConfigError/LoaderError/KvmError/OSError, nothing left
    running."""
    from hypervisor.boot_images import images_for
    images = images or images_for(spec)
    from hypervisor.agent_channel import AgentChannel
    from hypervisor.vm import Machine, MachineConfig
    agent = AgentChannel(lambda data: machine.console.push_input(data), lambda _: timeline.mark("agent_ready"))
    rootfs, read_only = _rootfs(spec)
    config = MachineConfig(kernel=spec.kernel, initrd=spec.initrd, cmdline=spec.cmdline, mem_mib=spec.mem_mib,
                           vcpus=spec.vcpus, boot=spec.boot, console_sink=console_sink(spec.console),
                           agent_sink=agent.feed, rootfs=rootfs, rootfs_read_only=read_only)
    machine = Machine(config, timeline)  # validates the config
    vm = BuiltVm(machine, agent)
    try:
        vm.server = serve(machine, agent) if serve else None
        machine.build(images)
        filter_syscalls()  # before the first KVM_RUN: everything the VM needs exists now
        machine.start()
    except BaseException:
        vm.close()
        raise
    return vm


def restore(spec, timeline, serve=None, kvm=None) -> BuiltVm:
    """Restore spec.snapshot into this process, started, its agent ready and the clone's identity queued; then
    `serve(machine, agent)` (the first GET /status already says agent_ready). Raises SnapshotError/KvmError/OSError
    (malformed state: KeyError/TypeError/ValueError), nothing left running."""
    from hypervisor.restore import restore as restore_snapshot
    machine, agent = restore_snapshot(spec, console_sink(spec.console), timeline, kvm)
    vm = BuiltVm(machine, agent)
    try:
        if serve:
            vm.server = serve(machine, agent)
        # After the API socket is bound (the filter forbids bind): until it is served nothing but the template's
        # own guest, which ran no one's code yet, has reached this VMM.
        filter_syscalls()
    except BaseException:
        machine.stop("the control API could not start", 1)
        vm.close()
        raise
    return vm


def prepare(spec) -> None:
    """Start loading a `run` spec's images into fresh guest RAM, for a later run() of an equal spec."""
    if spec.command == "run":
        from hypervisor.boot_images import prepare as prepare_images
        prepare_images(spec)


def run(spec, timeline) -> int:
    """One VM from `spec` in this process, to its end: the guest's exit code (0: powered off); errors are one
    `pclite: error:` line on stderr and exit code 1."""
    from hypervisor.capped_log import cap_stderr
    cap_stderr()  # vmm.log keeps its tail, whatever the guest provokes (fresh and forked VMMs alike)
    _jail_self(spec, timeline)  # before any thread of this process: the images load inside the jail
    images = None
    if spec.command == "run":
        # Start loading the kernel and initrd into guest RAM before importing the rest of the VMM: the reads
        # (0.2-1 s over 9p in the lab) then overlap those imports and the KVM set-up.
        from hypervisor.boot_images import images_for, take_prepared
        images = take_prepared(spec) or images_for(spec)  # prepared: loaded by a warm VMM before this request
    from hypervisor.vm import KvmError, LoaderError, VmConfigError
    if images is None:  # not on a boot's path: snapshot imports json (and so re)
        from hypervisor.restore import SnapshotError
    else:
        SnapshotError = LoaderError  # noqa: N806 - a boot raises no SnapshotError
    timeline.mark("vmm_ready")
    if spec.api_sock and _socket_in_use(spec.api_sock):
        return _error(f"--api-sock {spec.api_sock} is in use by a running VMM: pick another path or stop that VM")
    serve = (lambda machine, agent: _serve_api(spec, machine, agent)) if spec.api_sock else None
    try:
        if images is not None:
            vm = boot(spec, timeline, images, serve)
        else:
            vm = restore(spec, timeline, serve)
            timeline.mark("api_served")
    except (VmConfigError, LoaderError, SnapshotError, KvmError, OSError) as exc:
        return _error(exc)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
        if images is not None:
            raise
        return _error(f"snapshot {spec.snapshot} has a malformed state ({type(exc).__name__}: {exc}): take a new "
                      f"snapshot with this pclite")
    try:
        code = vm.machine.wait()
    except KeyboardInterrupt:
        vm.machine.stop("interrupted (Ctrl-C)", 130)
        code = 130
    return _finish(spec, timeline, vm, code)


_SECCOMP = [False]  # set by _jail_self from the plan: install the seccomp filter at filter_syscalls()


def filter_syscalls() -> None:
    """The jail's last step, when its plan asks for it: the seccomp allow-list (hypervisor/seccomp_filter.py) on
    every thread; anything else the VMM then calls kills it (SIGSYS: pclited records `seccomp`). Raises OSError
    (SeccompUnavailable) when it cannot be installed: a VMM pclited was told is filtered does not run unfiltered."""
    if _SECCOMP[0]:
        _SECCOMP[0] = False
        from hypervisor.seccomp_filter import install
        install()


def _jail_self(spec, timeline) -> None:
    """Enter the jail pclited planned for this VMM (PCLITE_JAIL_PLAN, JSON: hypervisor/jail.py), if any; a jail that
    cannot be set up stops the VMM (exit 1, one line) rather than run it unjailed."""
    text = os.environ.pop("PCLITE_JAIL_PLAN", None)
    if not text:
        return
    from hypervisor import jail
    from hypervisor.boot_images import wait_prepared
    wait_prepared()  # a warm VMM's load ahead: its thread must be done before the process may unshare
    try:
        plan = jail.JailPlan.from_json(text)
        if plan.seccomp:  # libseccomp's bindings live outside what the jail shows: imported now
            from hypervisor.seccomp_filter import SeccompUnavailable, bindings
            try:
                bindings()
            except SeccompUnavailable as exc:
                raise jail.JailError(str(exc)) from None
        jail.enter(plan)
    except jail.JailError as exc:
        print(f"pclite: error: {exc}", file=sys.stderr)
        sys.exit(1)
    _SECCOMP[0] = plan.seccomp
    if not spec.detach and os.getppid() == 0:  # pid 1 of its own pid namespace: the kernel watches the parent
        # PR_SET_PDEATHSIG(SIGTERM): the fork server forked us from its only thread, so that thread's death is the
        # parent's. Set after the uid change (which clears it) and before the seccomp filter (no prctl there).
        import ctypes
        ctypes.CDLL(None).prctl(1, 15, 0, 0, 0)
    timeline.mark("jailed")


def _error(exc) -> int:
    print(f"pclite: error: {exc}", file=sys.stderr)
    return 1


def _finish(spec, timeline, vm: BuiltVm, code: int) -> int:
    """After the VM stopped: report why and the --timeline line, then close the agent channel and API, release KVM."""
    machine = vm.machine
    print(f"pclite: VM stopped: {machine.stop_reason}", file=sys.stderr)
    if spec.timeline:
        import json
        boot = machine.plan.kernel_format if spec.command == "run" else "restore"
        print(json.dumps({"timeline_ms": timeline.as_ms(), "exits": machine.exit_counts(), "boot": boot,
                          "exit_code": code, "reason": machine.stop_reason}), file=sys.stderr)
    vm.close()
    return code


def _serve_api(spec, machine, agent):
    import _signal  # not `signal` (enum): the API server starts before the VM boots
    import threading

    from hypervisor.api_server import ApiServer
    from hypervisor.control import Controller
    path = spec.api_sock
    if _socket_in_use(path):
        raise OSError(f"--api-sock {path} is in use by a running VMM: pick another path or stop that VM")
    server = ApiServer(path, Controller(machine, agent, lambda n: bytes(machine.serial.tail[-n:] if n else b"")))
    server.serve_in_background()
    _signal.signal(_signal.SIGTERM, lambda *_: machine.stop("stopped by SIGTERM", 143))
    if not spec.detach:
        parent = os.getppid()
        if parent == 0:  # pid 1 of its own pid namespace: PR_SET_PDEATHSIG watches (_jail_self)
            return server

        def watch_parent() -> None:
            # getppid polling rather than PR_SET_PDEATHSIG: that fires when the parent *thread* exits,
            # and a service starts VMMs from short-lived worker threads.
            while not machine.wait_stopped(PARENT_POLL_S):
                if os.getppid() != parent:
                    machine.stop(f"parent process {parent} exited (start with --detach to outlive it)", 1)
                    return
        threading.Thread(target=watch_parent, name="parent-watch", daemon=True).start()
    return server


def _socket_in_use(path: str) -> bool:
    import socket
    if not os.path.exists(path):
        return False
    with socket.socket(socket.AF_UNIX) as probe:
        try:
            probe.connect(path)
            return True
        except OSError:
            return False
