"""hypervisor/jail.py on this host (root): a forked child enters a jail, the parent checks it from outside."""

from __future__ import annotations

import os
import signal
import socket
import time

import pytest

from hypervisor import jail

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the jail needs root (namespaces, mounts, setuid)")

UID = 61234


def status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def jailed_child(plan: jail.JailPlan, pidns: bool = False, after=None) -> tuple[int, bytes]:
    """Fork a child that enters `plan`, runs `after()` inside, reports b"ok"/the error, then sleeps until killed."""
    r, w = os.pipe()
    with jail.pid_namespace_for_next_child(pidns):
        pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            jail.enter(jail.JailPlan.from_json(plan.to_json()))
            result = after() if after else b"ok"
        except BaseException as exc:  # noqa: BLE001
            result = f"error: {exc}".encode()
        os.write(w, result)
        signal.signal(signal.SIGTERM, lambda *_: os._exit(0))  # pid 1 of a pid ns needs a handler
        while True:
            time.sleep(1)
    os.close(w)
    answer = os.read(r, 4096)
    os.close(r)
    return pid, answer


def stop(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)


@pytest.fixture
def layout(tmp_path):
    data = tmp_path / "data"
    (data / "run").mkdir(parents=True)
    (data / "token").write_text("secret")
    (data / "run" / "vm-other.sock").write_text("")
    vm_dir = data / "vms" / "vm-a"
    (vm_dir / "sock").mkdir(parents=True)
    kernel = tmp_path / "kernel"
    kernel.write_bytes(b"K" * 100)
    root = tmp_path / "jailroot"
    root.mkdir()
    return data, vm_dir, kernel, root


def plan_for(layout, **extra) -> jail.JailPlan:
    data, vm_dir, kernel, root = layout
    return jail.JailPlan(vm_id="vm-a", uid=UID, gid=UID, root=str(root), read_only=(str(kernel),),
                         read_write=(str(vm_dir),), binds=((str(vm_dir / "sock"), str(data / "run")),),
                         owned=(str(vm_dir), str(vm_dir / "sock")), **extra)


def test_jailed_child_has_no_privilege_and_sees_only_its_files(layout):
    data, vm_dir, kernel, root = layout
    sock_path = str(data / "run" / "vm-a.sock")

    def inside() -> bytes:
        seen = []
        for path in (str(data / "token"), str(data / "run" / "vm-other.sock"), "/etc/passwd"):
            seen.append(f"{path}={os.path.exists(path)}")
        seen.append("procs=" + ",".join(sorted(p for p in os.listdir("/proc") if p.isdigit())))
        with open(kernel, "rb") as f:
            seen.append(f"kernel={f.read(1).decode()}")
        try:
            open(kernel, "ab").close()
            seen.append("kernel-writable")
        except OSError:
            pass
        with open(vm_dir / "console.log", "w") as f:
            f.write("hello")
        listener = socket.socket(socket.AF_UNIX)
        listener.bind(sock_path)  # at the host path pclited connects to: lands in the VM's own socket dir
        listener.listen(1)
        fd = os.open("/dev/kvm", os.O_RDWR) if os.path.exists("/dev/kvm") else -1
        seen.append(f"kvm={fd >= 0}")
        return " ".join(seen).encode()

    pid, answer = jailed_child(plan_for(layout), pidns=True, after=inside)
    try:
        assert not answer.startswith(b"error"), answer
        text = answer.decode()
        assert f"{data / 'token'}=False" in text and f"{data / 'run' / 'vm-other.sock'}=False" in text
        assert "/etc/passwd=False" in text and "procs=1 " in text  # its own /proc shows itself alone
        assert "kernel=K" in text and "kernel-writable" not in text
        assert "kvm=True" in text or not os.path.exists("/dev/kvm")
        st = status(pid)
        assert st["Uid"].split() == [str(UID)] * 4 and st["Gid"].split() == [str(UID)] * 4
        assert int(st["CapEff"], 16) == 0 and int(st["CapPrm"], 16) == 0
        assert st["NoNewPrivs"].strip() == "1"
        assert st["NSpid"].split()[-1] == "1"  # pid 1 of its own pid namespace
        for ns in ("mnt", "net", "ipc", "uts", "pid"):
            assert os.readlink(f"/proc/{pid}/ns/{ns}") != os.readlink(f"/proc/self/ns/{ns}"), ns
        assert (vm_dir / "console.log").read_text() == "hello"
        assert (vm_dir / "sock" / "vm-a.sock").exists()  # the host sees the socket in the VM's own directory
        assert not (data / "run" / "vm-a.sock").exists()
        assert os.listdir(root) == []  # the jail's tmpfs never showed on the host
    finally:
        stop(pid)
    # this process keeps its own pid namespace for later children
    assert os.readlink("/proc/self/ns/pid_for_children") == os.readlink("/proc/self/ns/pid")


def test_cgroup_leaf_is_joined_and_removed(layout):
    base = jail.cgroup2_mount()
    assert base, "this host mounts cgroup v2 somewhere (pure v2 or the hybrid's unified)"
    leaf = os.path.join(base, "pclite-test", "vm-a")
    pid, answer = jailed_child(plan_for(layout, cgroup=leaf))
    try:
        assert answer == b"ok", answer
        with open(f"/proc/{pid}/cgroup") as f:
            assert f"0::/{os.path.relpath(leaf, base)}\n" in f.read()
        assert not jail.remove_cgroup(leaf)  # busy while the VMM lives
    finally:
        stop(pid)
    assert jail.remove_cgroup(leaf) and not os.path.exists(leaf)
    os.rmdir(os.path.dirname(leaf))


def test_cgroup_limits_when_controllers_are_delegated(layout):
    parent = os.path.join(jail.cgroup2_mount() or "/nonexistent", "pclite-test2")
    why = jail.cgroup_parent_ready(parent)
    try:
        if why is not None:  # e.g. a cgroup v1/v2 hybrid host: the reason is one line naming what is missing
            assert "controller" in why or "cgroup" in why
            return
        leaf = os.path.join(parent, "vm-a")
        pid, answer = jailed_child(plan_for(layout, cgroup=leaf, memory_max=256 << 20, pids_max=64, cpu_weight=50))
        try:
            assert answer == b"ok", answer
            with open(os.path.join(leaf, "memory.max")) as f:
                assert f.read().strip() == str(256 << 20)
            with open(os.path.join(leaf, "pids.max")) as f:
                assert f.read().strip() == "64"
        finally:
            stop(pid)
        assert jail.remove_cgroup(leaf)
    finally:
        jail.remove_cgroup(parent)


def test_threads_refused_with_one_line(layout):
    import threading
    stop_event = threading.Event()
    thread = threading.Thread(target=stop_event.wait, daemon=True)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        thread.start()
        try:
            jail.enter(plan_for(layout))
            os.write(w, b"entered")
        except jail.JailError as exc:
            os.write(w, str(exc).encode())
        os._exit(0)
    os.close(w)
    answer = os.read(r, 4096).decode()
    os.close(r)
    os.waitpid(pid, 0)
    assert "threads" in answer and "\n" not in answer


def test_bad_plans_refused():
    for text in ('{"vm_id": "x", "uid": 0, "gid": 5, "root": "/r"}', '{"vm_id": "x"}', "nope",
                 '{"vm_id": "x", "uid": 5, "gid": 5, "root": "/r/../etc"}',
                 '{"vm_id": "x", "uid": 5, "gid": 5, "root": "rel"}'):
        with pytest.raises(jail.JailError):
            jail.JailPlan.from_json(text)


def test_features_say_why_when_off():
    features = jail.available_features(None)
    assert set(features) == set(jail.FEATURES)
    assert features["cgroup"] == "no cgroup parent"
    assert features["uid"] is None and features["mountns"] is None  # root here
