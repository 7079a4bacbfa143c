"""The C quick path (quickpath.c) and the Python runtime decide `start` and `delete` alike: both run over the same
state directories and arguments, and wherever the quick path answers itself (not handing over to Python), its exit
code, error lines and the state directory after must be what the Python runtime gives. The rules themselves live in
service/runtime/quick_commands.py (start_rule, delete_rule)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from service.runtime import launcher
from service.runtime.state import start_time
from tests.unit.test_runtime_quickpath import HANDED_OVER, stand_in

PYTHON_RUNTIME = "import sys; sys.path.insert(0, sys.argv.pop(1)); from service.runtime.main import main; " \
                 "sys.exit(main())"
# A release through pclited fails at once and the same way in every run: nothing listens on port 1.
ENV = {"PCLITE_SERVER": "http://127.0.0.1:1", "PCLITE_TOKEN": "t", "PCLITE_RUNTIME_LOG": ""}


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """The compiled quick path, handing over to a script that only records that it was called."""
    base = tmp_path_factory.mktemp("rules")
    fake = base / "python-runtime"
    fake.write_text(f"#!/bin/sh\nexit {HANDED_OVER}\n")
    fake.chmod(0o755)
    binary = base / "pclite-runtime"
    assert launcher.compile_quick_path(str(binary), str(fake)) is None
    return binary


def _dead_pid() -> int:
    gone = subprocess.Popen(["true"])
    gone.wait()
    return gone.pid


class Fixture:
    """Builds a state directory for container c1 under root; stand-in processes it starts are ended by close()."""

    def __init__(self, root: Path):
        self.root, self.dir, self.procs = root, root / "c1", []

    def container(self, alive: bool = False, lines: bool = True, **files: str) -> None:
        self.dir.mkdir(parents=True)
        (self.dir / "state.json").write_text('{"id": "c1", "vm_id": "vm-1"}')
        if alive:
            proc = subprocess.Popen(["sleep", "60"])
            self.procs.append(proc)
            pid, started = proc.pid, start_time(proc.pid)
        else:
            pid, started = _dead_pid(), 12345
        if lines:
            self.lines(pid, started)
        for name, text in files.items():
            path = self.dir / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)

    def lines(self, pid: int, started: int) -> None:
        (self.dir / "state.lines").write_text(f"id c1\nvm_id vm-1\nserver {ENV['PCLITE_SERVER']}\npid {pid}\n"
                                              f"start_time {started}\n")

    def waiting(self, outcome: str) -> None:
        """A created container whose stand-in waits on exec.fifo, then reports outcome ("ok" or "error")."""
        self.container()
        proc = stand_in(self.dir, outcome)
        self.procs.append(proc)
        self.lines(proc.pid, start_time(proc.pid))

    def close(self) -> None:
        for proc in self.procs:
            proc.kill()
            proc.wait()


# (case, command, the state directory, whether the quick path answers it itself, the exit code)
CASES = [
    ("delete --force of nothing", ["delete", "--force"], lambda f: None, True, 0),
    ("delete of nothing", ["delete"], lambda f: None, False, 1),
    ("delete --force of a half-made directory", ["delete", "-f"], lambda f: (f.dir / "execs").mkdir(parents=True),
     True, 0),
    ("delete of a half-made directory", ["delete"], lambda f: f.dir.mkdir(parents=True), False, 1),
    ("delete of a released, stopped one", ["delete"], lambda f: f.container(released="vm-1"), True, 0),
    ("delete --force of a released, stopped one", ["delete", "--force"], lambda f: f.container(released="vm-1"),
     True, 0),
    ("delete of a released one with a gone exec record", ["delete"],
     lambda f: f.container(released="vm-1", **{"execs/123.json": '{"start_time": 1}'}), False, 0),
    ("delete of a released one whose stand-in runs", ["delete"],
     lambda f: f.container(alive=True, released="vm-1"), False, 1),
    ("delete --force of a released one whose stand-in runs", ["delete", "--force"],
     lambda f: f.container(alive=True, released="vm-1"), False, 0),
    ("delete of a stopped, unreleased one", ["delete"], lambda f: f.container(), False, 1),
    ("delete --force of a stopped, unreleased one", ["delete", "--force"], lambda f: f.container(), False, 0),
    ("delete of one without state.lines", ["delete"], lambda f: f.container(lines=False, released="vm-1"), False, 1),
    ("start of nothing", ["start"], lambda f: None, False, 1),
    ("start of a stopped one", ["start"], lambda f: f.container(), False, 1),
    ("start of a paused one", ["start"], lambda f: f.container(alive=True, paused=""), False, 1),
    ("start of a running one", ["start"], lambda f: f.container(alive=True, **{"init.json": "{}"}), False, 1),
    ("start of one whose stand-in is not waiting", ["start"], lambda f: f.container(alive=True), False, 1),
    ("start of a created one", ["start"], lambda f: f.waiting("ok"), True, 0),
    ("start of one whose process cannot start", ["start"], lambda f: f.waiting("error"), True, 1),
]


def outcome(argv: list[str], root: Path, log: Path) -> tuple:
    """(exit code, the error lines logged, the files left under root)."""
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, env={**os.environ, **ENV})
    errors = [line["msg"] for line in map(json.loads, log.read_text().splitlines()) if line["level"] == "error"] \
        if log.exists() else []
    log.unlink(missing_ok=True)
    left = sorted(str(path.relative_to(root)) for path in root.rglob("*")) if root.exists() else []
    return done.returncode, errors, left


def run_case(tmp_path: Path, runtime: list[str], command: list[str], setup) -> tuple:
    root, log = tmp_path / "root", tmp_path / "log.json"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir()
    fixture = Fixture(root)
    try:
        setup(fixture)
        return outcome([*runtime, "--root", str(root), "--log", str(log), "--log-format", "json", *command, "c1"],
                       root, log)
    finally:
        fixture.close()


@pytest.mark.parametrize(("command", "setup", "quick_answers", "code"), [case[1:] for case in CASES],
                         ids=[case[0] for case in CASES])
def test_the_quick_path_and_python_decide_alike(quick, tmp_path, command, setup, quick_answers, code):
    python = run_case(tmp_path, [sys.executable, "-c", PYTHON_RUNTIME, launcher.ROOT], command, setup)
    assert python[0] == code and bool(python[1]) == (code != 0), python  # a refusal says why, in one line
    fast = run_case(tmp_path, [str(quick)], command, setup)
    if not quick_answers:
        assert fast == (HANDED_OVER, [], fast[2]), "the quick path should have handed this over"
        return
    assert fast[0] != HANDED_OVER, "the quick path handed over what it answers"
    assert fast == python
