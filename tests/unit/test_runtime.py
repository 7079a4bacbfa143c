"""pclite-runtime on the host, driven the way containerd's shim drives it (stdio pipes, --pid-file, --console-socket,
--log in JSON), against a stand-in pclited and VMM: the VMM's real Controller with the real agent (`--stdio`), whose
processes run chrooted into the bundle's rootfs on this host. The test process is a child subreaper, as the shim is,
so it reaps the stand-ins and sees their exit status. Guest-side truth (a real VM): tests/guest/test_oci.py."""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import time
from pathlib import Path

import pytest

from guestbuild.initramfs.builder import busybox_path
from hypervisor.api_server import ApiServer, Response
from hypervisor.control import Controller
from hypervisor.vmm_api import ApiError
from tests.unit.test_vmm_agent_api import PipeAgent

RUNTIME: list[str] = []  # the pair `make venv` installs: the C quick path in front of the Python runtime


@pytest.fixture(scope="module", autouse=True)
def _installed_runtime(tmp_path_factory):
    from service.runtime import launcher
    path = tmp_path_factory.mktemp("bin") / "pclite-runtime"
    launcher.write(str(path))
    RUNTIME[:] = [str(path)]
pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not busybox_path().exists(),
                                reason="needs root (chroot into the bundle's rootfs) and busybox-static")


@pytest.fixture(scope="module", autouse=True)
def subreaper():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER, as containerd's shim is
    yield
    libc.prctl(36, 0, 0, 0, 0)  # the rest of the session's orphans go to init again
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0]:  # and no orphan adopted meanwhile stays a zombie
            pass


class Fakes:
    """A pclited on a Unix socket that hands out one VMM; the VMM relays to the real agent, with the guest's
    /rootfs mapped to the bundle's rootfs on this host."""

    def __init__(self, tmp, rootfs=None):
        self.tmp, self.rootfs = tmp, rootfs
        self.calls: list[tuple[str, str]] = []
        self.pipe = PipeAgent()
        assert self.pipe.channel.ready.wait(10)
        self.controller = Controller(None, self.pipe.channel, lambda n: b"")
        self.vmm = ApiServer(str(tmp / "vmm.sock"), self._vmm)
        self.pclited = ApiServer(str(tmp / "pclited.sock"), self._pclited)
        for server in (self.vmm, self.pclited):
            server.serve_in_background()

    def _pclited(self, request):
        self.calls.append((request.method, request.path))
        if (request.method, request.path) == ("POST", "/v1/vms"):
            flavor = request.json()["flavor"]
            if flavor != "default":
                raise ApiError(404, f"flavor {flavor} does not exist")
            return Response(201, {"id": "vm-0123456789ab", "api_socket": self.vmm.path})
        if request.method == "POST" and request.path.endswith("/rootfs"):
            if getattr(self, "refuse_rootfs", False):
                raise ApiError(409, "VM vm-0123456789ab's VMM is gone: delete it and claim another")
            spec = request.json()
            self.rootfs = spec["path"]  # the bundle's rootfs: the stand-in guest's /rootfs
            self.attached = spec
            return Response(200, {"mountpoint": "/rootfs", "mounts": len(spec["mounts"]),
                                  "hostname": spec.get("hostname")})
        if request.method == "DELETE":
            return Response(200, {"state": "stopped"})
        raise ApiError(404, f"no route {request.path}")

    def _vmm(self, request):
        self.calls.append((request.method, request.path))
        if request.path in ("/mounts", "/hostname", "/actions"):
            return Response(204)
        if request.path == "/exec":
            spec = request.json()
            assert spec["root"] == "/rootfs"
            spec["root"] = self.rootfs
            request.body = json.dumps(spec).encode()
        return self.controller(request)

    def released(self) -> bool:
        return ("DELETE", "/v1/vms/vm-0123456789ab?wait=true") in self.calls or any(
            m == "DELETE" for m, _ in self.calls)

    def close(self):
        self.vmm.close()
        self.pclited.close()
        self.pipe.close()


@pytest.fixture
def env(tmp_path):
    rootfs = tmp_path / "bundle" / "rootfs"
    (rootfs / "bin").mkdir(parents=True)
    shutil.copy(busybox_path(), rootfs / "bin" / "busybox")
    for applet in ("sh", "echo", "sleep", "cat", "stty", "true"):
        (rootfs / "bin" / applet).symlink_to("busybox")
    fakes = Fakes(tmp_path, rootfs)
    yield fakes
    fakes.close()


class Runtime:
    def __init__(self, fakes, tmp):
        self.fakes, self.tmp = fakes, tmp
        self.root, self.log = tmp / "state", tmp / "log.json"
        self.env = {**os.environ, "PCLITE_SERVER": f"unix:{fakes.pclited.path}", "PCLITE_TOKEN": "t"}

    def run(self, *args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, check=True):
        proc = subprocess.run([*RUNTIME, "--root", str(self.root), "--log", str(self.log), "--log-format", "json",
                               *args], stdin=stdin, stdout=stdout, stderr=stderr, env=self.env, timeout=60,
                              check=False)
        if check:
            assert proc.returncode == 0, (args, proc.returncode, self.errors())
        return proc

    def bundle(self, args, terminal=False, **extra) -> str:
        bundle = self.tmp / "bundle"
        config = {"ociVersion": "1.0.2", "root": {"path": "rootfs"}, "hostname": "box",
                  "process": {"args": args, "env": ["PATH=/bin"], "cwd": "/", "terminal": terminal,
                              "user": {"uid": 0, "gid": 0}},
                  "mounts": [{"destination": "/proc", "type": "proc", "source": "proc"},
                             {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid"]},
                             {"destination": "/etc/hosts", "type": "bind", "source": "/etc/hosts",
                              "options": ["rbind"]}], **extra}
        (bundle / "config.json").write_text(json.dumps(config))
        return str(bundle)

    def create(self, cid, args, **kwargs):
        """create with stdio pipes, as the shim does; returns (stand-in pid, its stdout and stderr readers)."""
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        pid_file = self.tmp / f"{cid}.pid"
        self.run("create", "--bundle", self.bundle(args, **kwargs), "--pid-file", str(pid_file), cid,
                 stdout=out_w, stderr=err_w)
        os.close(out_w)
        os.close(err_w)
        return int(pid_file.read_text()), out_r, err_r

    def errors(self) -> list[str]:
        if not self.log.exists():
            return []
        return [json.loads(line)["msg"] for line in self.log.read_text().splitlines()
                if json.loads(line)["level"] == "error"]

    def state(self, cid) -> dict:
        return json.loads(self.run("state", cid).stdout)


@pytest.fixture
def rt(env, tmp_path):
    return Runtime(env, tmp_path)


def read_all(fd) -> bytes:
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    os.close(fd)
    return b"".join(chunks)


def reap(pid, timeout=20):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got, status = os.waitpid(pid, os.WNOHANG)
        if got:
            return status
        time.sleep(0.02)
    raise AssertionError(f"stand-in {pid} did not exit")


def test_create_start_relays_output_and_mirrors_the_exit_code(rt, env):
    pid, out, err = rt.create("c1", ["sh", "-c", "echo out; echo err >&2; exit 3"])
    assert rt.state("c1")["status"] == "created" and rt.state("c1")["pid"] == pid
    # the container's mounts and host name go with the rootfs: pclited makes them in the same trip to the VMM
    assert [m["target"] for m in env.attached["mounts"]] == ["/rootfs/proc", "/rootfs/dev"]
    assert env.attached["hostname"] == "box"
    assert ("POST", "/mounts") not in env.calls and ("PUT", "/hostname") not in env.calls
    assert any("/etc/hosts" in line and "bind" in line for line in rt.log.read_text().splitlines())  # skipped
    rt.run("start", "c1")
    assert read_all(out) == b"out\n" and read_all(err) == b"err\n"
    status = reap(pid)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 3
    assert rt.state("c1")["status"] == "stopped"
    assert env.released() and (rt.root / "c1" / "released").exists()  # by the stand-in, as the process ended
    rt.run("delete", "c1")
    assert not (rt.root / "c1").exists() and rt.errors() == []
    assert "delete c1: VM vm-0123456789ab was released when its process ended" in rt.log.read_text()


def test_kill_forwards_the_signal_and_the_stand_in_dies_of_it(rt):
    pid, out, err = rt.create("c2", ["sleep", "30"])
    rt.run("start", "c2")
    assert rt.state("c2")["status"] == "running"
    assert json.loads(rt.run("ps", "--format", "json", "c2").stdout) == [pid]
    refused = rt.run("delete", "c2", check=False)
    assert refused.returncode == 1 and "not stopped: running" in rt.errors()[-1]
    rt.run("kill", "c2", "SIGTERM")
    status = reap(pid)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGTERM
    gone = rt.run("kill", "c2", "9", check=False)
    assert gone.returncode == 1 and "container not running" in rt.errors()[-1]
    rt.run("delete", "c2")


def test_exec_runs_a_second_process_and_pause_resume(rt, env):
    pid, out, err = rt.create("c3", ["sleep", "30"])
    rt.run("start", "c3")
    spec = rt.tmp / "process.json"
    spec.write_text(json.dumps({"args": ["sh", "-c", "read x; echo got $x; exit 4"], "env": ["PATH=/bin"],
                                "cwd": "/"}))
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    os.write(in_w, b"line\n")
    os.close(in_w)
    rt.run("exec", "--process", str(spec), "--detach", "--pid-file", str(rt.tmp / "e.pid"), "c3", stdin=in_r,
           stdout=out_w)
    os.close(out_w)
    exec_pid = int((rt.tmp / "e.pid").read_text())
    assert read_all(out_r) == b"got line\n"
    status = reap(exec_pid)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 4
    rt.run("pause", "c3")
    assert rt.state("c3")["status"] == "paused" and ("PUT", "/actions") in env.calls
    rt.run("resume", "c3")
    rt.run("kill", "--all", "c3", "KILL")
    assert os.WTERMSIG(reap(pid)) == signal.SIGKILL
    rt.run("delete", "c3")


def test_terminal_through_the_console_socket(rt):
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(rt.tmp / "console.sock"))
    listener.listen(1)
    pid_file = rt.tmp / "c4.pid"
    bundle = rt.bundle(["sh", "-c", "test -t 0 && test -t 1 && echo TTY; stty size; read x; echo got $x"],
                       terminal=True)
    config = json.loads((rt.tmp / "bundle" / "config.json").read_text())
    config["process"]["consoleSize"] = {"height": 24, "width": 81}
    (rt.tmp / "bundle" / "config.json").write_text(json.dumps(config))
    rt.run("create", "--bundle", bundle, "--pid-file", str(pid_file), "--console-socket",
           str(rt.tmp / "console.sock"), "c4")
    conn, _ = listener.accept()
    _, ancillary, _, _ = conn.recvmsg(1024, socket.CMSG_SPACE(4))
    master = struct.unpack("i", ancillary[0][2][:4])[0]
    rt.run("start", "c4")
    seen = b""
    while b"24 81\r\n" not in seen:
        seen += os.read(master, 4096)
    os.write(master, b"hello\r")
    while b"got hello" not in seen:
        seen += os.read(master, 4096)
    assert seen == b"TTY\r\n24 81\r\nhello\r\ngot hello\r\n"  # the guest terminal echoes and maps CR
    assert os.WEXITSTATUS(reap(int(pid_file.read_text()))) == 0
    rt.run("delete", "c4")


def test_a_process_that_cannot_start_fails_start_with_the_agents_reason(rt, env):
    pid, out, err = rt.create("c5", ["/no/such/program"])
    failed = rt.run("start", "c5", check=False)
    assert failed.returncode == 1 and "execve /no/such/program" in rt.errors()[-1]
    assert b"execve /no/such/program" in failed.stderr
    assert os.WEXITSTATUS(reap(pid)) == 127
    rt.run("delete", "c5")
    assert env.released()


@pytest.mark.parametrize("case", ["no-rootfs", "unknown-flavor", "pclited-down", "bad-process"])
def test_bad_input_fails_create_with_one_line_and_leaks_nothing(rt, env, case):
    args = ["true"]
    extra = {}
    if case == "no-rootfs":
        shutil.rmtree(rt.tmp / "bundle" / "rootfs")
    elif case == "unknown-flavor":
        extra["annotations"] = {"pclite.flavor": "nope"}
    elif case == "pclited-down":
        rt.env["PCLITE_SERVER"] = f"unix:{rt.tmp}/nothing-here.sock"
    elif case == "bad-process":
        args = []
    proc = rt.run("create", "--bundle", rt.bundle(args, **extra), "--pid-file", str(rt.tmp / "p"), "c6",
                  check=False)
    expected = {"no-rootfs": "has no rootfs", "unknown-flavor": "flavor nope does not exist",
                "pclited-down": "pclited is not reachable", "bad-process": "process.args"}[case]
    assert proc.returncode == 1 and len(rt.errors()) == 1 and expected in rt.errors()[0], rt.errors()
    assert proc.stderr.decode().count("\n") == 1 and expected in proc.stderr.decode()
    assert not (rt.root / "c6").exists() and not (rt.tmp / "p").exists()
    assert not any(m == "POST" and p == "/v1/vms" for m, p in env.calls) or case == "unknown-flavor"
    assert not env.released()


def test_a_failed_attach_kills_the_stand_in_and_releases_the_vm(rt, env):
    env.refuse_rootfs = True
    proc = rt.run("create", "--bundle", rt.bundle(["true"]), "--pid-file", str(rt.tmp / "p"), "c7", check=False)
    assert proc.returncode == 1 and "VMM is gone" in proc.stderr.decode(), proc
    assert not (rt.root / "c7").exists() and not (rt.tmp / "p").exists() and env.released()
    left = []  # the stand-in is a fork of create: same command line
    for entry in os.listdir("/proc"):
        with contextlib.suppress(OSError):
            args = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0") if entry.isdigit() else []
            if b"create" in args and b"c7" in args:
                left.append(entry)
    assert not left, "the stand-in outlived the failed create"


def test_usage_errors_and_features(rt):
    assert rt.run("frobnicate", "x", check=False).returncode == 2
    assert rt.run("kill", "--bogus", "x", check=False).returncode == 2
    missing = rt.run("state", "nope", check=False)
    assert missing.returncode == 1 and "does not exist" in rt.errors()[-1]
    features = json.loads(rt.run("features").stdout)
    assert features["ociVersionMax"] and "rbind" in features["mountOptions"]
