"""The runtime's commands. Each either finishes its job or raises RuntimeFailure with the one line to show, having
undone what it started (a claimed VM is released, a half-made state directory removed)."""

import _signal
import errno
import os
import sys
import time

from service.runtime.arguments import Usage, container_of, one, signal_number, switch
from service.runtime.peers import pclited as pclited_client
from service.runtime.state import Container, Log, RuntimeFailure, remove_tree, start_time, write_atomic
from service.runtime.transport import Pclited, Vmm, WireError

FLAVOR_ANNOTATION = "pclite.flavor"

TYPE_CHECKING = False
if TYPE_CHECKING:
    from service.runtime.standin import Relay


def now_iso() -> str:
    now = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1e9):09d}Z"


def print_json(data) -> None:
    from service.runtime.jsonlite import dumps
    sys.stdout.write(dumps(data, indent=2) + "\n")
    sys.stdout.flush()


# ---- create

def cmd_create(root: str, opts: dict, positional: list[str], log: Log) -> int:
    from service.runtime import oci  # only the commands that read specs pay for it
    container = container_of(root, positional)
    bundle = os.path.abspath(one(opts, "bundle", "b") or os.getcwd())
    try:
        config = oci.load_json(os.path.join(bundle, "config.json"), "the bundle's config")
        rootfs = oci.rootfs_path(bundle, config)
        process = oci.guest_process(config.get("process") or {})
        mounts, skipped = oci.guest_mounts(config)
    except oci.SpecError as exc:
        raise RuntimeFailure(f"create {container.id}: {exc}") from None
    console = one(opts, "console-socket")
    if process.get("tty") and not console:
        raise Usage("process.terminal is true: a terminal needs --console-socket")
    annotations = config.get("annotations") or {}
    pclited = pclited_client()
    try:
        os.makedirs(container.dir, 0o711)
    except FileExistsError:
        raise RuntimeFailure(f"container {container.id} already exists: delete it first, or pick another id") from None
    vm, pid = None, None
    steps = Steps()
    try:
        vm = pclited.claim(annotations.get(FLAVOR_ANNOTATION) or "default")
        steps.done("claim")
        state = {"id": container.id, "bundle": bundle, "rootfs": rootfs, "created": now_iso(),
                 "annotations": annotations, "vm_id": vm["id"], "api_socket": vm["api_socket"],
                 "server": pclited.server, "log": log.path, "log_format": log.fmt}
        container.save(state)  # from here on `delete --force` can release the VM, whatever happens to this process
        # The stand-in first: it sets itself up (and connects to the VMM) while pclited attaches the rootfs.
        os.mkfifo(container.path("exec.fifo"), 0o600)
        vmm = Vmm(vm["api_socket"])
        pid = _spawn(container, log, console, process.get("size"), lambda: _init_standin(container, vmm, process, log))
        state.update(pid=pid, start_time=start_time(pid))
        container.save(state)  # and `delete --force` kills the stand-in
        steps.done("stand-in")
        hostname = config.get("hostname") or None
        attached = pclited.attach_rootfs(vm["id"], rootfs, bool((config.get("root") or {}).get("readonly")), mounts,
                                         hostname) or {}
        image = "cached image" if attached.get("cached") else "mke2fs"
        steps.done("rootfs", f"{image} {attached.get('build_ms', 0):.0f} ms, swap and mount "
                             f"{attached.get('attach_ms', 0):.0f} ms")
        if mounts and attached.get("mounts") != len(mounts):  # a tar upload: pclited mounted the rootfs alone
            vmm.mounts(mounts)
        if hostname and attached.get("hostname") != hostname:
            vmm.set_hostname(hostname)
        steps.done("mounts")
        for why in skipped:
            log.warning(f"container {container.id}: mount skipped: {why}")
    except (WireError, OSError, RuntimeFailure) as exc:
        _undo_create(container, pclited, vm, pid, log)
        hint = " (pick an existing flavor with the pclite.flavor annotation: `pclitectl get flavors`)" \
            if isinstance(exc, WireError) and exc.status == 404 and vm is None else ""
        raise RuntimeFailure(f"create {container.id}: {exc}{hint}") from None
    _write_pid_file(opts, pid)
    log.info(f"create {container.id}: VM {vm['id']} ready in {steps}")
    return 0


class Steps:
    """Durations of a command's steps, for its info line in the log."""

    def __init__(self):
        self.last = self.first = time.monotonic()
        self.parts: list[str] = []

    def done(self, what: str, detail: str = "") -> None:
        now = time.monotonic()
        self.parts.append(f"{what} {(now - self.last) * 1000:.0f} ms" + (f" ({detail})" if detail else ""))
        self.last = now

    def __str__(self) -> str:
        return f"{(self.last - self.first) * 1000:.0f} ms: " + ", ".join(self.parts)


def _undo_create(container: Container, pclited: Pclited, vm: dict | None, pid: int | None, log: Log) -> None:
    if pid is not None:  # our child, waiting for a `start` that will not come
        try:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
    if vm is not None:
        try:
            pclited.release(vm["id"])
        except WireError as exc:
            log.warning(f"container {container.id}: could not release VM {vm['id']} ({exc}): delete it with "
                        f"`pclitectl delete vm {vm['id']}`")
    remove_tree(container.dir)


def _init_standin(container: Container, vmm: Vmm, process: dict, log: Log) -> None:
    """The init stand-in, after the fork: wait for `start`, then run the container's process and mirror it."""
    from service.runtime import standin
    relay = standin.Relay(vmm, process, log, 0, 1, 2, bool(process.get("tty")))
    relay.prepare()  # while containerd is on its way to `start`
    fd = os.open(container.path("exec.fifo"), os.O_RDONLY | os.O_CLOEXEC)  # blocks until `start` opens it
    go = os.read(fd, 1)
    os.close(fd)
    if not go:
        os._exit(standin.LOST_VM_EXIT)
    try:
        relay.start()
    except WireError as exc:
        write_atomic(container.path("init.error"), str(exc))
        os._exit(127)
    write_atomic(container.path("init.json"), f'{{"exec_id": {relay.exec_id}, "guest_pid": {relay.guest_pid}}}')
    _relay_and_exit(relay, log, container.id, ended=lambda: _release_stopped(container, log))


def _release_stopped(container: Container, log: Log) -> None:
    """The container stops with its init process: release the VM now, so that the `delete` containerd sends next
    only removes files, which the quick path (quickpath.c) does without starting Python. `released` says so; when
    the release fails, `delete` releases the VM as before."""
    try:
        state = container.load_lean()
        vm_id = state["vm_id"]
    except (RuntimeFailure, KeyError) as exc:
        log.warning(f"container {container.id}: its state is unreadable ({exc}); `delete` releases the VM")
        return
    try:
        pclited_client(state.get("server")).release(vm_id)
    except RuntimeFailure as exc:  # the client config
        log.warning(f"container {container.id}: {exc}; `delete` releases the VM")
        return
    except WireError as exc:
        if exc.status != 404:  # 404: pclited no longer knows it
            log.warning(f"container {container.id}: could not release VM {vm_id} ({exc}); `delete` tries again")
            return
    write_atomic(container.path("released"), vm_id)


def _relay_and_exit(relay: "Relay", log: Log, cid: str, parent: int | None = None, ended=None) -> None:
    from service.runtime import standin
    try:
        result = relay.run()
    except WireError as exc:
        log.error(f"container {cid}: {exc}")
        result = {"exit_code": standin.LOST_VM_EXIT}
    if parent is not None:
        standin.wait_parent_gone(parent)
    if ended is not None:
        ended()
    standin.finish(result, log)


def _spawn(container: Container, log: Log, console: str | None, size, body) -> int:
    """Fork a stand-in running body(); returns its pid once it is set up (its own session, stdio in place)."""
    from service.runtime import standin  # only the commands that start processes pay for its imports
    master = slave = None
    if console:
        master, slave = os.openpty()
        standin.make_raw(slave)
        if size:
            import fcntl
            import struct
            import termios
            fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", size[0], size[1], 0, 0))
    ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:  # the stand-in
        try:
            _signal.signal(_signal.SIGINT, _signal.SIG_DFL)  # not KeyboardInterrupt: killed by it, as runc's would be
            os.close(ready_r)
            if master is not None:
                os.close(master)
                standin.take_terminal(slave)
            else:
                os.setsid()
            os.write(ready_w, b"ready")
            os.close(ready_w)
            body()
        except BaseException as exc:  # noqa: BLE001 - nothing may escape into the parent's code path
            if not isinstance(exc, SystemExit):
                log.error(f"container {container.id}: stand-in process failed: {type(exc).__name__}: {exc}")
        os._exit(standin.LOST_VM_EXIT)
    os.close(ready_w)
    ack = os.read(ready_r, 16)
    os.close(ready_r)
    if slave is not None:
        os.close(slave)
    if ack != b"ready":
        raise RuntimeFailure(f"the stand-in process for {container.id} died while starting: see the log")
    if master is not None:
        try:
            _send_console(console, master)
        finally:
            os.close(master)
    return pid


def _send_console(path: str, master: int) -> None:
    """Hand the terminal's master to the shim, as runc does: one message on --console-socket with SCM_RIGHTS."""
    import socket
    import struct
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(path)
        sock.sendmsg([b"/dev/ptmx"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", master))])


def _write_pid_file(opts: dict, pid: int) -> None:
    path = one(opts, "pid-file")
    if path:
        write_atomic(path, str(pid))


# ---- inspecting and signalling

def cmd_state(root: str, opts: dict, positional: list[str], log: Log) -> int:
    container = container_of(root, positional)
    print_json(container.oci_state(container.load()))
    return 0


def cmd_ps(root: str, opts: dict, positional: list[str], log: Log) -> int:
    container = container_of(root, positional)
    state = container.load()
    pids = ([state["pid"]] if container.status(state) != "stopped" else []) + sorted(container.execs())
    if (one(opts, "format", "f") or "table") == "json":
        print_json(pids)
    else:
        print("PID\n" + "".join(f"{pid}\n" for pid in pids), end="")
    return 0


def cmd_kill(root: str, opts: dict, positional: list[str], log: Log) -> int:
    container = container_of(root, positional)
    signo = signal_number(positional[1] if len(positional) > 1 else "TERM")
    state = container.load()
    status = container.status(state)
    if status == "stopped":
        raise RuntimeFailure(f"cannot kill container {container.id}: container not running")
    if status == "created":  # the guest process does not exist yet: the stand-in itself is the process
        os.kill(state["pid"], signo)
        return 0
    targets = [container.read_json("init.json")["exec_id"]]
    if switch(opts, "all", "a"):
        targets += [record["exec_id"] for record in container.execs().values()]
    vmm = Vmm(state["api_socket"])
    for exec_id in targets:
        try:
            vmm.signal(exec_id, signo)
        except WireError as exc:
            if exc.status != 404:  # 404: that process has just exited
                raise RuntimeFailure(f"kill {container.id}: {exc}") from None
    return 0


def cmd_pause(root: str, opts: dict, positional: list[str], log: Log, action: str = "pause") -> int:
    container = container_of(root, positional)
    state = container.load()
    status = container.status(state)
    if status not in (("running", "created") if action == "pause" else ("paused",)):
        raise RuntimeFailure(f"cannot {action} container {container.id}: it is {status}")
    try:
        Vmm(state["api_socket"]).action(action)
    except WireError as exc:
        raise RuntimeFailure(f"{action} {container.id}: {exc}") from None
    if action == "pause":
        write_atomic(container.path("paused"), "")
    else:
        os.unlink(container.path("paused"))
    return 0


def cmd_resume(root: str, opts: dict, positional: list[str], log: Log) -> int:
    return cmd_pause(root, opts, positional, log, "resume")


def cmd_update(root: str, opts: dict, positional: list[str], log: Log) -> int:
    container = container_of(root, positional)
    container.load()
    log.info(f"update {container.id}: resources come from the VM's flavor; the update is not applied")
    return 0


def cmd_features(root: str, opts: dict, positional: list[str], log: Log) -> int:
    from service.runtime import oci
    print_json({"ociVersionMin": "1.0.0", "ociVersionMax": "1.1.0", "hooks": [],
                "mountOptions": sorted(oci.MS_FLAGS), "linux": {
                    "namespaces": [], "capabilities": [], "cgroup": {"v1": False, "v2": False, "systemd": False},
                    "seccomp": {"enabled": False}, "apparmor": {"enabled": False}, "selinux": {"enabled": False}},
                "annotations": {"io.github.pclite.runtime": "microvm", FLAVOR_ANNOTATION: "the VM flavor to claim"}})
    return 0


# ---- exec

def cmd_exec(root: str, opts: dict, positional: list[str], log: Log) -> int:
    from service.runtime import oci
    container = container_of(root, positional)
    state = container.load()
    status = container.status(state)
    if status != "running":
        raise RuntimeFailure(f"cannot exec in container {container.id}: it is {status}")
    try:
        if one(opts, "process", "p"):
            process = oci.guest_process(oci.load_json(one(opts, "process", "p"), "the process spec"))
        else:
            env = [f"PATH={oci.DEFAULT_PATH}", *opts.get("env", []), *opts.get("e", [])]
            process = oci.guest_process({"args": positional[1:], "env": env, "cwd": one(opts, "cwd") or "/",
                                         "terminal": switch(opts, "tty", "t")})
    except oci.SpecError as exc:
        raise RuntimeFailure(f"exec in {container.id}: {exc}") from None
    console = one(opts, "console-socket")
    if process.get("tty") and not console:
        raise Usage("a terminal needs --console-socket (the shim's; pclite-runtime makes no terminal of its own)")
    vmm = Vmm(state["api_socket"])
    from service.runtime import standin
    if not (switch(opts, "detach", "d")):  # in the foreground: this process relays, then mirrors the exit
        relay = standin.Relay(vmm, process, log, 0, 1, 2, bool(process.get("tty")))
        try:
            relay.start()
        except WireError as exc:
            raise RuntimeFailure(f"exec in {container.id}: {exc}") from None
        _relay_and_exit(relay, log, container.id)
    os.makedirs(container.path("execs"), exist_ok=True)
    status_r, status_w = os.pipe2(os.O_CLOEXEC)
    parent = os.getpid()

    def body() -> None:
        os.close(status_r)
        relay = standin.Relay(vmm, process, log, 0, 1, 2, bool(process.get("tty")))
        try:
            relay.start()
        except WireError as exc:
            os.write(status_w, str(exc).encode()[:4000])
            os._exit(127)
        record = f'{{"exec_id": {relay.exec_id}, "guest_pid": {relay.guest_pid}, ' \
                 f'"start_time": {start_time(os.getpid())}}}'
        write_atomic(container.path(f"execs/{os.getpid()}.json"), record)
        os.write(status_w, b"ok")
        os.close(status_w)
        _relay_and_exit(relay, log, container.id, parent)

    pid = _spawn(container, log, console, process.get("size"), body)
    os.close(status_w)
    outcome = _read_all(status_r)
    if outcome != b"ok":
        raise RuntimeFailure(f"exec in {container.id}: {outcome.decode(errors='replace') or 'the stand-in died'}")
    _write_pid_file(opts, pid)
    return 0


def _read_all(fd: int) -> bytes:
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 4096)
        except OSError as exc:
            if exc.errno == errno.EINTR:
                continue
            raise
        if not chunk:
            break
        chunks.append(chunk)
    os.close(fd)
    return b"".join(chunks)
