"""The lab's host-side pieces: KVM detection, module ordering, the command handed to the lab VM."""

import shlex
import time
from pathlib import Path

from pclitelab import assets
from pclitelab.detect import host_kvm_status
from pclitelab.runner import LabRequest, _command_script


def test_kvm_pvm_host_cannot_boot_linux(tmp_path):
    (tmp_path / "kvm_pvm").mkdir()
    (tmp_path / "kvm").mkdir()
    ok, reason = host_kvm_status(sys_module=tmp_path, dev_kvm=Path("/dev/null"))
    assert not ok and "kvm_pvm" in reason and "lab" in reason


def test_no_dev_kvm_cannot_boot_linux(tmp_path):
    ok, reason = host_kvm_status(sys_module=tmp_path, dev_kvm=tmp_path / "kvm")
    assert not ok and reason.startswith("no /dev/kvm")


def test_kvm_amd_can_boot_linux(tmp_path):
    (tmp_path / "kvm_amd").mkdir()
    ok, reason = host_kvm_status(sys_module=tmp_path, dev_kvm=Path("/dev/null"))
    assert ok and "kvm_amd" in reason


def test_this_host_is_detected_consistently():
    ok, reason = host_kvm_status()
    assert ok == (not Path("/sys/module/kvm_pvm").exists() and Path("/dev/kvm").exists()), reason


def test_module_order_puts_dependencies_first(tmp_path):
    def module(name, depends):
        path = tmp_path / f"{name}.ko"
        path.write_bytes(b"\x7fELF junk\0depends=" + depends.encode() + b"\0vermagic=6.1\0")
    module("kvm-amd", "kvm,ccp")
    module("kvm", "irqbypass")
    module("irqbypass", "")
    module("ccp", "")
    order = [p.name for p in assets.module_load_order(tmp_path, ["kvm-amd"])]
    assert order == ["irqbypass.ko", "kvm.ko", "ccp.ko", "kvm-amd.ko"]


def test_command_script_quotes_and_passes_only_known_env(tmp_path, monkeypatch):
    monkeypatch.setenv("PCLITE_FOO", "a b'c")
    monkeypatch.setenv("SECRET_TOKEN", "x")
    script = _command_script(LabRequest(command=["echo", "it's", "$HOME"], workdir=tmp_path), tmp_path / "r")
    assert "export PCLITE_FOO=" + shlex.quote("a b'c") in script
    assert "SECRET_TOKEN" not in script
    assert "PCLITE_IN_LAB=1" in script
    assert script.rstrip().endswith("exec " + shlex.join(["echo", "it's", "$HOME"]))


def test_console_stream_tells_a_lab_kernel_panic_from_a_normal_end():
    import io

    from pclitelab.runner import _stream
    out = io.BytesIO()
    tail, panicked = _stream(["sh", "-c", "printf 'booting\\r\\n[  72.6] Kernel panic - not syncing: corrupted "
                              "stack end\\r\\n'"], 30, out)
    assert panicked and b"corrupted stack end\n" in out.getvalue() and b"\r" not in out.getvalue()
    tail, panicked = _stream(["sh", "-c", "echo all good"], 30, io.BytesIO())
    assert not panicked and tail == b"all good\n"


def test_guest_tests_go_on_in_a_fresh_lab_after_a_lab_kernel_panic(monkeypatch, capsys, tmp_path):
    from types import SimpleNamespace

    from pclitelab import cli
    from pclitelab.runner import LabKernelPanic, LabStalled
    monkeypatch.setenv("PCLITE_CACHE", str(tmp_path))
    labs = []

    def fake_lab(request):
        """Each lab: finish the tests in its plan, then panic or return the code."""
        progress = Path(request.env[cli.PROGRESS_ENV])
        labs.append(request.command)
        finishes, end = plan.pop(0)
        with open(progress, "a") as log:
            log.writelines(f"{outcome} {node}\n" for outcome, node in finishes)
        if end == "panic":
            raise LabKernelPanic("the lab's kernel panicked after 72s")
        if end == "stall":
            raise LabStalled("the lab stopped making progress (no test finished for 780 s)")
        return end
    monkeypatch.setattr(cli, "run_in_lab", fake_lab)
    args = SimpleNamespace(mem=1024, cpus=1, timeout=10, forward=[])

    plan = [([("passed", "t.py::a"), ("failed", "t.py::b")], "panic"), ([("passed", "t.py::c")], 0)]
    assert cli._run_tests_in_lab(args, ["pytest"]) == 1  # b failed in the first lab: never retried away
    assert labs[1] == ["pytest", "--deselect=t.py::a", "--deselect=t.py::b"]
    err = capsys.readouterr().err
    assert "2 finished test(s) keep their outcome (1 failed); the others run in a fresh lab (lab 2 of at most" in err
    assert "failed there: t.py::b" in err

    labs.clear()
    plan = [([("passed", "t.py::a")], "stall"), ([("passed", "t.py::b")], 0)]  # a stuck lab: the same
    assert cli._run_tests_in_lab(args, ["pytest"]) == 0 and labs[1] == ["pytest", "--deselect=t.py::a"]
    assert "the lab stopped making progress" in capsys.readouterr().err

    plan = [([("passed", "t.py::a")], "panic"), ([], 5)]  # the panic came after the last test
    assert cli._run_tests_in_lab(args, ["pytest"]) == 0

    plan = [([("passed", f"t.py::{n}")], "panic") for n in range(cli.GUEST_TEST_LABS)]
    assert cli._run_tests_in_lab(args, ["pytest"]) == 125
    assert f"gave up after {cli.GUEST_TEST_LABS} lab(s) ({cli.GUEST_TEST_LABS} labs)" in capsys.readouterr().err

    plan = [([("passed", "t.py::a")], "panic"), ([], "panic"), ([], "panic"), ([], 0)]
    assert cli._run_tests_in_lab(args, ["pytest"]) == 125
    assert "gave up after 3 lab(s) (two labs in a row finished no test)" in capsys.readouterr().err
    assert not list((tmp_path / "lab").glob("progress-*"))  # cleaned up


def test_a_test_session_records_what_finished_and_skips_what_is_deselected(tmp_path):
    import os
    import subprocess
    import sys
    progress = tmp_path / "finished"
    here = "tests/unit/test_lab.py"
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          f"{here}::test_no_dev_kvm_cannot_boot_linux", f"{here}::test_kvm_amd_can_boot_linux",
                          f"--deselect={here}::test_kvm_amd_can_boot_linux"],
                         env={**os.environ, "PCLITE_TEST_PROGRESS": str(progress)},
                         capture_output=True, text=True, cwd=Path(__file__).parents[2])
    assert run.returncode == 0, run.stdout + run.stderr
    assert progress.read_text() == f"passed {here}::test_no_dev_kvm_cannot_boot_linux\n"


def test_only_test_sessions_run_again(monkeypatch):
    from types import SimpleNamespace

    from pclitelab import cli
    from pclitelab.runner import LabKernelPanic

    def fake_lab(request):
        raise LabKernelPanic("panicked")
    monkeypatch.setattr(cli, "run_in_lab", fake_lab)
    args = SimpleNamespace(mem=1024, cpus=1, timeout=10, forward=[])
    assert cli._run_lab(args, ["bench"]) == 125  # `run` (benchmarks, services): never silently twice


def test_a_lab_that_stops_making_progress_is_stopped(tmp_path):
    import io

    import pytest

    from pclitelab.cli import stall_watch
    from pclitelab.runner import LabStalled, _stream
    progress = tmp_path / "finished"
    watch = stall_watch(progress, limit_s=0.3)
    assert watch() is None
    time.sleep(0.4)
    assert "no test finished for" in watch()
    progress.write_text("passed t.py::a\n")  # a test finished: the clock starts again
    assert watch() is None
    started = time.monotonic()
    out = io.BytesIO()
    with pytest.raises(LabStalled, match="stopped making progress"):
        _stream(["sleep", "30"], 60, out, stalled=stall_watch(progress, limit_s=0.5))
    assert time.monotonic() - started < 10 and b"the lab is stuck" in out.getvalue()
