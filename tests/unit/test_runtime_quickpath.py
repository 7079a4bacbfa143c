"""pclite-runtime's C quick path (service/runtime/quickpath.c), run as containerd's shim runs it: what it answers
itself (start, delete of a released container, delete --force of one gone) and that everything else reaches the
Python runtime with the same arguments. Here the Python runtime is a stand-in script that records its argv."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from service.runtime import launcher
from service.runtime.state import start_time

HANDED_OVER = 99


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """(quick path binary, the file where the fake Python runtime writes the argv it got)."""
    base = tmp_path_factory.mktemp("quick")
    record = base / "handed-over"
    fake = base / "pclite-runtime-py"
    fake.write_text(f"#!/bin/sh\nprintf '%s\\n' \"$0\" \"$@\" > {record}\nexit {HANDED_OVER}\n")
    fake.chmod(0o755)
    binary = base / "pclite-runtime"
    assert launcher.compile_quick_path(str(binary), str(fake)) is None
    return binary, record


def run(quick, *argv, env=None):
    binary, record = quick
    record.unlink(missing_ok=True)
    done = subprocess.run([str(binary), *argv], capture_output=True, text=True, timeout=30,
                          env={**os.environ, **(env or {})})
    handed = record.read_text().splitlines() if record.exists() else None
    return done, handed


def container(root: Path, cid: str = "c1", pid: int | None = None, **files) -> Path:
    directory = root / cid
    directory.mkdir(parents=True)
    pid = pid or os.getpid()
    (directory / "state.json").write_text("{}")
    (directory / "state.lines").write_text(f"id {cid}\nvm_id vm-1\npid {pid}\nstart_time {start_time(pid)}\n"
                                           f"log /var/log/c1.json\n")
    for name, text in files.items():
        (directory / name.replace("_", ".")).write_text(text)
    return directory


STAND_IN = """
import os, sys, time
d = sys.argv[1]
fd = os.open(os.path.join(d, "exec.fifo"), os.O_RDONLY)
os.read(fd, 1)
if sys.argv[2] == "ok":
    open(os.path.join(d, "init.json"), "w").write('{"exec_id": 1, "guest_pid": 7}')
    time.sleep(30)
else:
    with open(os.path.join(d, "init.error.tmp"), "w") as f:  # written whole, then renamed, as write_atomic does
        f.write("the guest could not start /bin/nope: no such file\\n")
    os.rename(os.path.join(d, "init.error.tmp"), os.path.join(d, "init.error"))
"""


def stand_in(directory: Path, outcome: str) -> subprocess.Popen:
    """A process blocked opening exec.fifo for reading, as the init stand-in waits for `start`."""
    os.mkfifo(directory / "exec.fifo")
    proc = subprocess.Popen([sys.executable, "-c", STAND_IN, str(directory), outcome])
    deadline = time.monotonic() + 10
    while Path(f"/proc/{proc.pid}/wchan").read_text() not in ("fifo_open", "wait_for_partner"):
        assert time.monotonic() < deadline, "the stand-in never waited on exec.fifo"
        time.sleep(0.01)
    return proc


def test_start_wakes_the_stand_in_and_waits_for_the_guest_process(quick, tmp_path):
    directory = container(tmp_path / "root", pid=os.getpid())
    proc = stand_in(directory, "ok")
    try:
        (directory / "state.lines").write_text(f"pid {proc.pid}\nstart_time {start_time(proc.pid)}\n")
        log = tmp_path / "log.json"
        done, handed = run(quick, "--root", str(tmp_path / "root"), "--log", str(log), "--log-format", "json",
                           "start", "c1", env={"PCLITE_RUNTIME_LOG": str(tmp_path / "copy.log")})
        assert handed is None and done.returncode == 0, (done, handed)
        line = json.loads(log.read_text().splitlines()[0])
        assert line["level"] == "info" and line["msg"].startswith("start c1: the guest process runs after")
        assert line["time"].endswith("Z")
        timing = (tmp_path / "copy.log").read_text().splitlines()[-1]
        assert "start c1: " in timing and "ms from exec to exit" in timing and "before main()" in timing
    finally:
        proc.kill()
        proc.wait()


def test_start_reports_why_the_guest_process_did_not_start(quick, tmp_path):
    directory = container(tmp_path / "root")
    proc = stand_in(directory, "error")
    (directory / "state.lines").write_text(f"pid {proc.pid}\nstart_time {start_time(proc.pid)}\n")
    log = tmp_path / "log.json"
    done, handed = run(quick, "--root", str(tmp_path / "root"), "--log", str(log), "--log-format", "json",
                       "start", "c1")
    proc.wait()
    assert handed is None and done.returncode == 1
    message = "start c1: the guest could not start /bin/nope: no such file"
    assert json.loads(log.read_text()) | {"time": 0} == {"level": "error", "msg": message, "time": 0}
    assert done.stderr == f"pclite-runtime: {message}\n"


def test_start_of_a_container_not_waiting_goes_to_python(quick, tmp_path):
    root = tmp_path / "root"
    container(root)  # this test process as its "stand-in": alive, but no exec.fifo
    argv = ["--root", str(root), "--log-format=json", "start", "c1"]
    done, handed = run(quick, *argv)
    assert done.returncode == HANDED_OVER and handed[1:] == argv and handed[0].endswith("pclite-runtime-py")
    (root / "c1" / "init.json").write_text("{}")  # running already
    assert run(quick, *argv)[1][1:] == argv
    done, handed = run(quick, "--root", str(root), "start", "nope")  # no such container: Python says so
    assert handed is not None


def test_delete_of_a_released_stopped_container_removes_its_files(quick, tmp_path):
    root = tmp_path / "root"
    gone = subprocess.Popen(["true"])
    gone.wait()
    directory = container(root, pid=os.getpid(), released="vm-1")
    (directory / "state.lines").write_text(f"vm_id vm-1\npid {gone.pid}\nstart_time 12345\n")
    (directory / "execs").mkdir()
    log = tmp_path / "log"
    done, handed = run(quick, "--root", str(root), "--log", str(log), "delete", "c1")
    assert handed is None and done.returncode == 0 and not directory.exists()
    assert "level=info" in log.read_text() and "VM vm-1 was released when its process ended" in log.read_text()


@pytest.mark.parametrize("case", ["not released", "stand-in alive", "exec stand-in", "no state"])
def test_delete_goes_to_python_when_there_is_more_to_do(quick, tmp_path, case):
    root = tmp_path / "root"
    directory = container(root, released="vm-1")  # this test process: alive
    if case != "stand-in alive":
        (directory / "state.lines").write_text("vm_id vm-1\npid 999999999\nstart_time 1\n")
    if case == "not released":
        (directory / "released").unlink()
    if case == "exec stand-in":
        (directory / "execs").mkdir()
        (directory / "execs" / "123.json").write_text("{}")
    if case == "no state":
        (directory / "state.lines").unlink()
    done, handed = run(quick, "--root", str(root), "delete", "--force", "c1")
    assert done.returncode == HANDED_OVER and handed[1:] == ["--root", str(root), "delete", "--force", "c1"]
    assert directory.exists()  # untouched


def test_delete_force_of_a_container_already_gone_answers_at_once(quick, tmp_path):
    done, handed = run(quick, "--root", str(tmp_path), "--log", str(tmp_path / "log"), "--log-format", "json",
                       "delete", "--force", "c1")
    assert handed is None and done.returncode == 0 and not (tmp_path / "log").exists()  # nothing to say
    run(quick, "--root", str(tmp_path), "delete", "--force", "c1", env={"PCLITE_RUNTIME_LOG": str(tmp_path / "copy")})
    assert "delete --force c1: " in (tmp_path / "copy").read_text()  # only the timing line, when asked for
    (tmp_path / "half" / "execs").mkdir(parents=True)  # a create that stopped half-way: cleared as well
    done, handed = run(quick, "--root", str(tmp_path), "delete", "-f", "half")
    assert handed is None and done.returncode == 0 and not (tmp_path / "half").exists()


@pytest.mark.parametrize("argv", [
    ["--version"], ["state", "c1"], ["--root", "/r", "kill", "c1", "TERM"], ["delete", "c1", "extra"],
    ["--unknown-flag", "delete", "--force", "c1"], ["delete", "--force=true", "c1"], ["--root"],
    ["create", "--bundle", "/b", "c1"], ["delete", "--force", "../c1"], [],
])
def test_everything_else_reaches_python_unchanged(quick, argv):
    done, handed = run(quick, *argv)
    assert done.returncode == HANDED_OVER and handed[1:] == argv, (argv, done, handed)


def test_the_python_runtime_alone_without_a_c_compiler(tmp_path, monkeypatch):
    monkeypatch.setattr(launcher.shutil, "which", lambda name, **kw: None)
    path = tmp_path / "pclite-runtime"
    used, why_not = launcher.write(str(path))
    assert why_not == "no C compiler (cc)" and path.read_text().startswith(f"#!{used} -IS")
    done = subprocess.run([str(path), "--root", str(tmp_path), "delete", "--force", "gone"], capture_output=True)
    assert done.returncode == 0


def test_the_installed_pair_answers_end_to_end(tmp_path):
    path = tmp_path / "pclite-runtime"
    launcher.write(str(path))
    done = subprocess.run([str(path), "--root", str(tmp_path), "state", "nope"], capture_output=True, text=True)
    assert done.returncode == 1 and "container nope does not exist" in done.stderr  # Python answered
    done = subprocess.run([str(path), "--version"], capture_output=True, text=True)
    assert done.returncode == 0 and "pclite-runtime version" in done.stdout
