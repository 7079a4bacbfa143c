"""pclite-runtime under the real containerd + runc v2 shim on this host (`ctr run --runc-binary`), with the stand-in
pclited and VMM of test_runtime.py: the shim's contract (pid file, exit statuses, exec, kill, delete, the console
socket for -t) without booting a VM. The same flow with real VMs is tests/guest/test_oci.py."""

from __future__ import annotations

import os
import pty
import shutil
import subprocess
import time

import pytest

from tests.support.containerd import (
    IMAGE,
    Containerd,
    busybox_image_tar,
    missing_tools,
    runtime_binary,
    runtime_processes,
)
from tests.support.servers import short_tmpdir
from tests.unit.test_runtime import Fakes

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or bool(missing_tools()),
                                reason=f"needs root and {', '.join(missing_tools()) or 'containerd'}")


@pytest.fixture(scope="module")
def ctrd():
    workdir = short_tmpdir("ctrd-")
    fakes = Fakes(workdir)
    containerd = Containerd(workdir / "containerd", {"PCLITE_SERVER": f"unix:{fakes.pclited.path}",
                                                     "PCLITE_TOKEN": "t"})
    containerd.dir.mkdir()
    containerd.start()
    containerd.import_image(busybox_image_tar(workdir / "image.tar"))
    containerd.fakes = fakes
    containerd.runtime = runtime_binary(workdir)
    yield containerd
    containerd.stop()
    fakes.close()
    shutil.rmtree(workdir, ignore_errors=True)


def run(ctrd, *args, **kwargs):
    return ctrd.ctr("run", "--runc-binary", ctrd.runtime, "--snapshotter", "native", *args, check=False, **kwargs)


def test_output_and_exit_statuses(ctrd):
    out = run(ctrd, "--rm", IMAGE, "h1", "sh", "-c", "echo out; echo err >&2")
    assert (out.returncode, out.stdout, out.stderr) == (0, b"out\n", b"err\n"), out
    assert run(ctrd, "--rm", IMAGE, "h2", "sh", "-c", "exit 7").returncode == 7
    assert run(ctrd, "--rm", IMAGE, "h3", "sh", "-c", "kill -KILL $$").returncode == 137
    # (no stdin test here: ctr never closes a non-terminal container's stdin, with runc either)


def test_exec_kill_delete(ctrd):
    assert run(ctrd, "-d", IMAGE, "h5", "sleep", "100").returncode == 0
    execd = ctrd.ctr("task", "exec", "--exec-id", "e1", "h5", "sh", "-c", "echo exec; exit 5", check=False)
    assert (execd.returncode, execd.stdout) == (5, b"exec\n"), execd
    ctrd.ctr("task", "kill", "h5")
    deadline = time.monotonic() + 20
    while b"STOPPED" not in ctrd.ctr("task", "ls").stdout:
        assert time.monotonic() < deadline, "the task never stopped"
        time.sleep(0.1)
    ctrd.ctr("task", "delete", "h5")
    ctrd.ctr("containers", "delete", "h5")
    assert not os.path.exists("/run/containerd/runc/default/h5") and not runtime_processes()


def test_terminal(ctrd):
    master, slave = pty.openpty()
    proc = subprocess.Popen(["ctr", "--address", ctrd.sock, "run", "--runc-binary", ctrd.runtime, "--snapshotter",
                             "native", "--rm", "-t", IMAGE, "h6", "sh", "-c",
                             "test -t 0 && echo TTY; read x; echo got $x"],
                            stdin=slave, stdout=slave, stderr=slave, env=ctrd.env, start_new_session=True)
    os.close(slave)
    seen = b""
    deadline = time.monotonic() + 30
    while b"TTY" not in seen and time.monotonic() < deadline:
        seen += os.read(master, 4096)
    os.write(master, b"typed\r")
    while b"got typed" not in seen and time.monotonic() < deadline:
        seen += os.read(master, 4096)
    assert proc.wait(30) == 0 and b"got typed" in seen, seen
    os.close(master)


def test_failures_reach_ctr_in_one_line(ctrd):
    # containerd hands the runtime's one line (from its --log JSON) back to the client: ctr prints it
    flavor = run(ctrd, "--rm", "--annotation", "pclite.flavor=nope", IMAGE, "h7", "true")
    assert flavor.returncode != 0 and b"flavor nope does not exist" in flavor.stderr, flavor
    assert flavor.stderr.count(b"\n") == 1 and b"OCI runtime create failed" in flavor.stderr
    missing = run(ctrd, "--rm", IMAGE, "h8", "/no/such/program")
    assert missing.returncode != 0 and b"execve /no/such/program" in missing.stderr, missing
    for cid in ("h7", "h8"):
        ctrd.ctr("containers", "delete", cid, check=False)
        assert not os.path.exists(f"/run/containerd/runc/default/{cid}")
    assert not runtime_processes()
