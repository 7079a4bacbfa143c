"""pclite VMM: one microVM per process.

  python -m hypervisor run --kernel PATH [--initrd PATH] [--cmdline STR] [--mem MiB] [--vcpus N]
                           [--console -|FILE|none] [--boot auto|pvh|bzimage|unpack] [--timeline]
                           [--api-sock PATH [--detach]]
  python -m hypervisor exec --api-sock PATH [--timeout S] [--cwd DIR] -- CMD ARGS...
  python -m hypervisor forkserver --socket PATH     (pre-imported; forks a VMM per request)
  python -m hypervisor snapshot --api-sock PATH --out DIR [--paused]
  python -m hypervisor restore --from DIR [--api-sock PATH [--detach]] [--console -|FILE|none] [--hostname NAME]
                               [--timeline]

run: one VM in the foreground; exits 0 when the guest powers off or reboots, nonzero when it fails.
--boot: auto (PVH for an ELF with the note, else its 64-bit entry; a bzImage via its 64-bit entry),
pvh, bzimage (64-bit entry at +0x200), unpack (decompress a bzImage on the host, then PVH).
--api-sock: serve the control API (GET /status, POST /exec, PUT /actions, GET /console) on that Unix
socket; the VMM then stops when its parent process exits, unless --detach.
exec: run CMD in the guest through its agent; prints its stdout/stderr and exits with its exit code
(stdin is passed when it is not a terminal).
snapshot: pause the VM behind --api-sock, write its state and RAM to DIR, resume it (unless --paused).
restore: run a clone of the snapshot in DIR (no kernel is loaded; RAM is DIR/memory, copy-on-write); the agent
is ready at once, with fresh entropy, the current time and its own host name (--hostname, else a random one).
A snapshot from another format version, a corrupted one, or one from a different host is refused (exit 1).
"""

from hypervisor.timeline import Timeline

TIMELINE = Timeline()  # first thing: everything after process start is VMM cost

import os  # noqa: E402
import sys  # noqa: E402

from hypervisor.cli_args import REQUIRED, UsageError, parse_options  # noqa: E402

RUN_OPTIONS = {
    "--kernel": (str, REQUIRED), "--initrd": (str, None), "--cmdline": (str, "console=ttyS0 panic=-1"),
    "--mem": (int, 256), "--vcpus": (int, 1), "--console": (str, "-"), "--boot": (str, "auto"),
    "--timeline": (bool, False), "--api-sock": (str, None), "--detach": (bool, False),
}
SNAPSHOT_OPTIONS = {"--api-sock": (str, REQUIRED), "--out": (str, REQUIRED), "--paused": (bool, False)}
RESTORE_OPTIONS = {"--from": (str, REQUIRED), "--api-sock": (str, None), "--console": (str, "-"),
                   "--hostname": (str, None), "--detach": (bool, False), "--timeline": (bool, False)}
EXEC_OPTIONS = {"--api-sock": (str, REQUIRED), "--timeout": (float, None), "--cwd": (str, "/")}
PARENT_POLL_S = 0.5


def _console_sink(target: str):
    if target == "none":
        return None
    fd = sys.stdout.fileno() if target == "-" else os.open(target, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    return lambda data: os.write(fd, data)


def cmd_run(argv: list[str]) -> int:
    opts = parse_options(argv, RUN_OPTIONS, __doc__)
    if opts["boot"] not in ("auto", "pvh", "bzimage", "unpack"):
        raise UsageError(f"--boot must be auto, pvh, bzimage or unpack, got {opts['boot']!r}")
    # Start loading the kernel and initrd into guest RAM before importing the rest of the VMM: the reads (0.2-1 s
    # over 9p in the lab) then overlap those imports and the KVM set-up. Same as Machine.boot_images() for the
    # config below; bad options are still reported first, by Machine().
    _jail_self()  # before any thread of this process: the images load inside the jail
    from hypervisor.boot_images import BootImages, take_prepared
    spec = _boot_spec(opts)
    images = take_prepared(*spec) or BootImages(*spec)  # prepared: loaded by a warm VMM before this request
    from hypervisor.vm import KvmError, LoaderError, Machine, MachineConfig, VmConfigError
    TIMELINE.mark("vmm_ready")
    from hypervisor.agent_channel import AgentChannel
    agent = AgentChannel(lambda data: machine.console.push_input(data), lambda _: TIMELINE.mark("agent_ready"))
    config = MachineConfig(kernel=opts["kernel"], initrd=opts["initrd"], cmdline=opts["cmdline"],
                           mem_mib=opts["mem"], vcpus=opts["vcpus"], boot=opts["boot"],
                           console_sink=_console_sink(opts["console"]), agent_sink=agent.feed)
    try:
        machine = Machine(config, TIMELINE)  # validates the config
        server = _serve_api(opts, machine, agent) if opts["api_sock"] else None
    except (VmConfigError, OSError) as exc:
        print(f"pclite: error: {exc}", file=sys.stderr)
        return 1
    try:
        machine.build(images)
        machine.start()
        code = machine.wait()
    except (VmConfigError, LoaderError, KvmError, OSError) as exc:
        print(f"pclite: error: {exc}", file=sys.stderr)
        machine.close()
        if server:
            server.close()
        return 1
    except KeyboardInterrupt:
        machine.stop("interrupted (Ctrl-C)", 130)
        code = 130
    return _finish(opts, machine, agent, server, code, machine.plan.kernel_format)


def _finish(opts: dict, machine, agent, server, code: int, boot: str) -> int:
    """After the VM stopped: close the agent channel and API, report why, the --timeline line, release KVM."""
    agent.close()
    if server:
        server.close()
    print(f"pclite: VM stopped: {machine.stop_reason}", file=sys.stderr)
    if opts["timeline"]:
        import json
        print(json.dumps({"timeline_ms": TIMELINE.as_ms(), "exits": machine.exit_counts(), "boot": boot,
                          "exit_code": code, "reason": machine.stop_reason}), file=sys.stderr)
    machine.close()
    return code


def _serve_api(opts: dict, machine, agent):
    import _signal  # not `signal` (enum): the API server starts before the VM boots
    import threading

    from hypervisor.api_server import ApiServer
    from hypervisor.control import Controller
    path = opts["api_sock"]
    if _socket_in_use(path):
        raise OSError(f"--api-sock {path} is in use by a running VMM: pick another path or stop that VM")
    server = ApiServer(path, Controller(machine, agent, lambda n: bytes(machine.serial.tail[-n:] if n else b"")))
    server.serve_in_background()
    _signal.signal(_signal.SIGTERM, lambda *_: machine.stop("stopped by SIGTERM", 143))
    if not opts["detach"]:
        parent = os.getppid()
        if parent == 0:  # pid 1 of its own pid namespace (jail): the parent is out of sight, let the kernel watch
            import ctypes  # the fork server forked us from its only thread, so its death is the parent's
            ctypes.CDLL(None).prctl(1, _signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG (after the uid change)
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


def cmd_snapshot(argv: list[str]) -> int:
    opts = parse_options(argv, SNAPSHOT_OPTIONS, __doc__)
    import json

    from hypervisor.client import VmmClient, VmmError
    try:  # an absolute path: the VMM's working directory is not ours
        summary = VmmClient(opts["api_sock"]).snapshot(os.path.abspath(opts["out"]), resume=not opts["paused"])
    except VmmError as exc:
        print(f"pclite: error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(summary))
    return 0


def cmd_restore(argv: list[str]) -> int:
    opts = parse_options(argv, RESTORE_OPTIONS, __doc__)
    from hypervisor.kvm import KvmError
    from hypervisor.restore import restore
    from hypervisor.snapshot import SnapshotError
    from hypervisor.vm import Machine  # noqa: F401 - imported before vmm_ready, as `run` does
    _jail_self()
    TIMELINE.mark("vmm_ready")
    if opts["api_sock"] and _socket_in_use(opts["api_sock"]):
        print(f"pclite: error: --api-sock {opts['api_sock']} is in use by a running VMM: pick another path",
              file=sys.stderr)
        return 1
    try:
        machine, agent = restore(opts["from"], _console_sink(opts["console"]), TIMELINE, opts["hostname"])
    except (SnapshotError, KvmError, OSError) as exc:
        print(f"pclite: error: {exc}", file=sys.stderr)
        return 1
    except (KeyError, TypeError, ValueError) as exc:
        print(f"pclite: error: snapshot {opts['from']} has a malformed state ({type(exc).__name__}: {exc}): take "
              f"a new snapshot with this pclite", file=sys.stderr)
        return 1
    # Served only now: the first GET /status already says agent_ready, and the clone has its own identity.
    try:
        server = _serve_api(opts, machine, agent) if opts["api_sock"] else None
        TIMELINE.mark("api_served")
    except OSError as exc:
        print(f"pclite: error: {exc}", file=sys.stderr)
        machine.stop("the control API could not start", 1)
        machine.close()
        return 1
    try:
        code = machine.wait()
    except KeyboardInterrupt:
        machine.stop("interrupted (Ctrl-C)", 130)
        code = 130
    return _finish(opts, machine, agent, server, code, "restore")


def _jail_self() -> None:
    """Enter the jail pclited planned for this VMM (PCLITE_JAIL, JSON: hypervisor/jail.py), if any; a jail that
    cannot be set up stops the VMM (exit 1, one line) rather than run it unjailed."""
    text = os.environ.pop("PCLITE_JAIL", None)
    if not text:
        return
    from hypervisor import jail
    from hypervisor.boot_images import wait_prepared
    wait_prepared()  # a warm VMM's load ahead: its thread must be done before the process may unshare
    try:
        jail.enter(jail.JailPlan.from_json(text))
    except jail.JailError as exc:
        print(f"pclite: error: {exc}", file=sys.stderr)
        sys.exit(1)
    TIMELINE.mark("jailed")


def cmd_exec(argv: list[str]) -> int:
    split = argv.index("--") if "--" in argv else len(argv)
    opts = parse_options(argv[:split], EXEC_OPTIONS, __doc__)
    command = argv[split + 1:]
    if not command:
        raise UsageError(f"nothing to run: give the command after --\n{__doc__}")
    from hypervisor.client import VmmClient, VmmError
    stdin = None if sys.stdin is None or sys.stdin.isatty() else sys.stdin.buffer.read()
    try:
        result = VmmClient(opts["api_sock"]).exec(command, stdin=stdin, cwd=opts["cwd"], timeout_s=opts["timeout"],
                                                  output_cap=0)
    except VmmError as exc:
        print(f"pclite: error: {exc}", file=sys.stderr)
        return 125
    sys.stdout.buffer.write(result.stdout)
    sys.stdout.flush()
    sys.stderr.buffer.write(result.stderr)
    if result.timed_out:
        print(f"pclite: {command[0]} timed out after {opts['timeout']} s and was killed", file=sys.stderr)
        return 124
    if result.signal is not None:
        print(f"pclite: {command[0]} was killed by signal {result.signal}", file=sys.stderr)
        return 128 + result.signal
    return result.exit_code


def prepare_run(argv: list[str]) -> bool:
    """For a warm VMM (hypervisor/forkserver.py): start loading the images `run argv` would, so that a request with
    the same images finds them in RAM. False when argv is not a valid `run`."""
    try:
        opts = parse_options(argv[1:], RUN_OPTIONS, __doc__)
    except (UsageError, SystemExit):
        return False
    if argv[:1] != ["run"] or opts["boot"] not in ("auto", "pvh", "bzimage", "unpack"):
        return False
    from hypervisor.boot_images import prepare
    prepare(*_boot_spec(opts))
    return True


def _boot_spec(opts: dict) -> tuple:
    """What `run` loads (BootImages' arguments): the same tuple for a request and for loading ahead of one."""
    from hypervisor.boot_images import kernel_cmdline
    return (opts["kernel"], opts["initrd"], kernel_cmdline(opts["cmdline"]), opts["mem"] << 20, opts["vcpus"],
            opts["boot"])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv[:1] == ["run"]:
            return cmd_run(argv[1:])
        if argv[:1] == ["exec"]:
            return cmd_exec(argv[1:])
        if argv[:1] == ["snapshot"]:
            return cmd_snapshot(argv[1:])
        if argv[:1] == ["restore"]:
            return cmd_restore(argv[1:])
        if argv[:1] == ["forkserver"]:
            from hypervisor.forkserver import serve
            return serve(argv[1:])
        raise UsageError(__doc__)
    except UsageError as exc:
        print(f"pclite: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
