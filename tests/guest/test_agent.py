"""A booted VM's agent over virtio-console, driven through the VMM control socket (issue 4's done-list)."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import threading
import time

import pytest

from hypervisor.client import VmmClient, VmmError
from hypervisor.launch import vmm_command
from tests.support.artifacts import guest_artifacts

AGENT_CMDLINE = "console=ttyS0 quiet panic=-1 reboot=t pclite.mode=agent"
VCPUS = 2


class BootedVm:
    def __init__(self, tmp_path, vcpus: int = VCPUS, mem_mib: int = 256):
        art = guest_artifacts()
        self.sock = str(tmp_path / "vmm.sock")
        self.console = tmp_path / "console.log"
        self.proc = subprocess.Popen(
            vmm_command(["run", "--kernel", str(art.bzimage), "--initrd", str(art.initrd),
             "--cmdline", AGENT_CMDLINE, "--mem", str(mem_mib), "--vcpus", str(vcpus), "--api-sock", self.sock,
             "--console", str(self.console), "--timeline"]),
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
        self.client = VmmClient(self.sock)
        deadline = time.monotonic() + 20
        while not (tmp_path / "vmm.sock").exists():
            assert self.proc.poll() is None, f"VMM exited early: {self.proc.stderr.read().decode()}"
            assert time.monotonic() < deadline, "VMM never created its API socket"
            time.sleep(0.05)
        try:
            self.status = self.client.wait_agent_ready(120)
        except VmmError as exc:
            self.stop()
            raise AssertionError(f"{exc}\nconsole:\n{self.console.read_text(errors='replace')[-3000:]}") from None

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.kill()
        _, err = self.proc.communicate(timeout=30)
        return err.decode(errors="replace")


@pytest.fixture(scope="module")
def vm(tmp_path_factory):
    booted = BootedVm(tmp_path_factory.mktemp("agent-vm"))
    yield booted
    booted.stop()


def test_status_shows_agent_ready_in_the_timeline(vm):
    status = vm.client.status()
    assert status["state"] == "running" and status["agent_ready"]
    marks = status["timeline_ms"]
    assert marks["first_kvm_run"] < marks["init_reached"] < marks["agent_ready"]
    assert status["agent_version"].startswith("pclite-agent/2 6.1.")
    assert {d["device"] for d in status["devices"]} >= {"rng", "console"}
    print(f"agent ready at {marks['agent_ready']:.0f} ms (init at {marks['init_reached']:.0f} ms)")


def test_uname_and_cpu_count(vm):
    result = vm.client.exec(["uname", "-r"])
    assert result.exit_code == 0 and result.stdout.decode().startswith("6.1.")
    cpus = vm.client.exec(["grep", "-c", "^processor", "/proc/cpuinfo"])
    assert int(cpus.stdout) == VCPUS


def test_exit_code(vm):
    assert vm.client.exec(["sh", "-c", "exit 3"]).exit_code == 3


def test_one_mib_of_stdout_intact(vm):
    script = 'head -c 1048576 /dev/urandom > /tmp/blob; cat /tmp/blob; sha256sum < /tmp/blob >&2'
    result = vm.client.exec(["sh", "-c", script], output_cap=1 << 20, timeout_s=120)
    assert len(result.stdout) == 1 << 20 and not result.stdout_truncated
    assert hashlib.sha256(result.stdout).hexdigest() == result.stderr.split()[0].decode()


def test_stdin_echoed_through_cat(vm):
    data = bytes(range(256)) * 512
    assert vm.client.exec(["cat"], stdin=data).stdout == data


def test_timeout_kills_sleep(vm):
    started = time.monotonic()
    result = vm.client.exec(["sleep", "100"], timeout_s=1)
    assert result.timed_out and result.signal == 9
    assert time.monotonic() - started < 15


def test_eight_concurrent_execs(vm):
    results = {}

    def run(index):
        results[index] = vm.client.exec(["sh", "-c", f"sleep 0.5; echo {index}"], timeout_s=60)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(90)
    assert {i: r.stdout for i, r in results.items()} == {i: f"{i}\n".encode() for i in range(8)}


def test_streamed_output(vm):
    pieces = []
    result = vm.client.exec(["sh", "-c", "echo one; sleep 0.3; echo two >&2"],
                            on_output=lambda stream, data: pieces.append((stream, data)))
    assert result.exit_code == 0 and result.stdout == b"one\n" and result.stderr == b"two\n"
    assert (1, b"one\n") in pieces and (2, b"two\n") in pieces


def test_exec_cli_prints_output_and_propagates_exit_code(vm):
    run = subprocess.run([sys.executable, "-m", "hypervisor", "exec", "--api-sock", vm.sock, "--",
                          "sh", "-c", "cat; echo err >&2; exit 7"], input=b"from stdin\n", capture_output=True,
                         timeout=60)
    assert run.returncode == 7 and run.stdout == b"from stdin\n" and run.stderr == b"err\n"


def test_console_tail_and_missing_binary(vm):
    assert b"pclite" in vm.client.console(4096) or vm.client.console(4096) == b""
    with pytest.raises(VmmError, match="nope"):
        vm.client.exec(["/bin/nope"])


def test_shutdown_action_stops_the_vmm(tmp_path):
    booted = BootedVm(tmp_path, vcpus=1, mem_mib=128)
    booted.client.action("shutdown")
    booted.proc.wait(timeout=30)
    stderr = booted.stop()
    assert booted.proc.returncode == 0, stderr
    assert not (tmp_path / "vmm.sock").exists()
    assert '"agent_ready"' in stderr
