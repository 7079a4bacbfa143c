"""The lab's host-side pieces: KVM detection, module ordering, the command handed to the lab VM."""

import shlex
from pathlib import Path

from guestboot.lab import assets
from guestboot.lab.detect import host_kvm_status
from guestboot.lab.runner import LabRequest, _command_script


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

    from guestboot.lab.runner import _stream
    out = io.BytesIO()
    tail, panicked = _stream(["sh", "-c", "printf 'booting\\r\\n[  72.6] Kernel panic - not syncing: corrupted "
                              "stack end\\r\\n'"], 30, out)
    assert panicked and b"corrupted stack end\n" in out.getvalue() and b"\r" not in out.getvalue()
    tail, panicked = _stream(["sh", "-c", "echo all good"], 30, io.BytesIO())
    assert not panicked and tail == b"all good\n"


def test_guest_tests_run_again_once_when_the_lab_kernel_panics(monkeypatch, capsys):
    from types import SimpleNamespace

    from guestboot.lab import cli
    from guestboot.lab.runner import LabKernelPanic
    outcomes = [LabKernelPanic("the lab's kernel panicked after 72s"), 0]

    def fake_lab(request):
        outcome = outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome
    monkeypatch.setattr(cli, "run_in_lab", fake_lab)
    args = SimpleNamespace(mem=1024, cpus=1, timeout=10, forward=[])
    assert cli._run_lab(args, ["pytest"], attempts=2) == 0
    assert "running it again in a fresh lab (attempt 2 of 2)" in capsys.readouterr().err
    outcomes[:] = [LabKernelPanic("panicked"), LabKernelPanic("panicked again")]
    assert cli._run_lab(args, ["pytest"], attempts=2) == 125
    assert "gave up after 2 lab(s)" in capsys.readouterr().err
    outcomes[:] = [LabKernelPanic("panicked")]
    assert cli._run_lab(args, ["bench"]) == 125  # `run` (benchmarks, services): never silently twice
