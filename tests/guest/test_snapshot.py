"""Snapshot a booted template VM and run copy-on-write clones of it (issue 7's done-list).

The template boots once (128 MiB, 1 vCPU) and is snapshotted at agent-ready; clones are restored from the
snapshot through the VMM fork server (a fork, no interpreter start), one also through the plain CLI.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import threading
import time

import pytest

from hypervisor.client import VmmClient, VmmError
from hypervisor.forkserver import spawn
from hypervisor.launch import vmm_command
from hypervisor.snapshot import VERSION, state_document
from tests.guest.test_agent import BootedVm

CLONES = 20
MEM_MIB = 128
READY_TIMEOUT_S = 120
IDENTITY = "hostname; head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo; date +%s"


class Lab:
    def __init__(self, root):
        self.root = root
        self.template = BootedVm(_mkdir(root / "template"), vcpus=1, mem_mib=MEM_MIB)
        self.snap = root / "snap"
        taken = subprocess.run(vmm_command(["snapshot", "--api-sock", self.template.sock, "--out", str(self.snap)]),
                               capture_output=True, text=True, timeout=300)
        assert taken.returncode == 0, taken.stderr
        self.summary = json.loads(taken.stdout)
        self.server_sock = str(root / "fork.sock")
        self.server = subprocess.Popen(vmm_command(["forkserver", "--socket", self.server_sock]),
                                       stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 60
        while not os.path.exists(self.server_sock):
            assert self.server.poll() is None and time.monotonic() < deadline, "the fork server did not start"
            time.sleep(0.02)

    def clone(self, name: str, snap=None):
        """Start a clone through the fork server; returns (ForkedVmm, socket path, log path)."""
        sock, log = self.root / f"{name}.sock", self.root / f"{name}.log"
        with open(log, "wb") as out, open(os.devnull, "rb") as devnull:
            vmm = spawn(self.server_sock, ["restore", "--from", str(snap or self.snap), "--api-sock", str(sock),
                                           "--console", str(log.with_suffix(".console")), "--hostname", name],
                        devnull.fileno(), out.fileno(), out.fileno())
        return vmm, sock, log

    def close(self) -> None:
        self.template.stop()
        self.server.terminate()
        self.server.wait(30)


def _mkdir(path):
    path.mkdir(parents=True, exist_ok=True)
    return path


def last_words(log) -> str:
    console = log.with_suffix(".console")
    return (f"VMM: {log.read_text(errors='replace')[-1500:]}\nguest console: "
            f"{console.read_text(errors='replace')[-1500:] if console.exists() else ''}")


def wait_ready(vmm, sock, log) -> VmmClient:
    """A restored VMM serves its API only once the agent is ready with its new identity."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while not sock.exists():
        assert vmm.poll() is None, f"clone exited {vmm.returncode}: {last_words(log)}"
        assert time.monotonic() < deadline, f"clone not ready: {last_words(log)}"
        time.sleep(0.02)
    client = VmmClient(sock, timeout=60)
    while True:
        try:
            status = client.status()
            break
        except VmmError:  # bound, not listening yet
            assert vmm.poll() is None and time.monotonic() < deadline, last_words(log)
            time.sleep(0.01)
    assert status["agent_ready"] and status["state"] == "running", status
    return client


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    lab = Lab(tmp_path_factory.mktemp("snapshot"))
    yield lab
    lab.close()


@pytest.fixture(scope="module")
def clones(lab):
    started = [lab.clone(f"clone-{index:02d}") for index in range(CLONES)]  # all restoring at once
    try:
        yield [(f"clone-{index:02d}", vmm, wait_ready(vmm, sock, log))
               for index, (vmm, sock, log) in enumerate(started)]
    finally:
        for vmm, _, _ in started:
            with contextlib.suppress(ProcessLookupError):
                os.kill(vmm.pid, 9)


def identities(clients, logs=None) -> dict:
    """{name: (hostname, random hex, guest unix time)}, every clone asked at the same time."""
    results, errors = {}, []

    def ask(name, client):
        try:
            result = client.exec(["sh", "-c", IDENTITY], timeout_s=60)
            assert result.exit_code == 0, result.stderr
            hostname, entropy, clock = result.stdout.decode().split()
            results[name] = (hostname, entropy, int(clock))
        except Exception as exc:  # reported below, with the clone's name and its VMM's last words
            log = logs / f"{name}.log" if logs else None
            errors.append(f"{name}: {exc!r}" + (f"; {last_words(log)}" if log and log.exists() else ""))

    threads = [threading.Thread(target=ask, args=item) for item in clients]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors, errors
    return results


def test_snapshot_is_written_and_the_template_carries_on(lab):
    memory = lab.snap / "memory"
    assert (lab.snap / "state.json").exists() and memory.stat().st_size == MEM_MIB << 20
    assert memory.stat().st_blocks * 512 <= MEM_MIB << 20  # untouched RAM stays a hole
    assert lab.summary["resumed"] and lab.summary["memory_written"] > 0
    assert lab.template.client.exec(["echo", "alive"]).stdout == b"alive\n"
    print(f"snapshot: paused {lab.summary['paused_ms']:.0f} ms, wrote {lab.summary['memory_written'] >> 20} MiB "
          f"of {MEM_MIB} MiB")


def test_twenty_clones_at_once_each_with_its_own_identity(lab, clones):
    found = identities([(name, client) for name, _, client in clones], lab.root)
    assert {name: found[name][0] for name, _, _ in clones} == {name: name for name, _, _ in clones}
    entropy = [value[1] for value in found.values()]
    assert len(entropy) == CLONES and len(set(entropy)) == CLONES and all(len(e) == 32 for e in entropy)
    template_entropy = identities([("template", lab.template.client)])["template"][1]
    assert template_entropy not in entropy
    assert all(abs(clock - time.time()) < 60 for _, _, clock in found.values())  # SET_CLOCK reached each clone


def test_restore_cli_starts_a_clone_in_a_fresh_process(lab):
    sock, log = lab.root / "cli.sock", lab.root / "cli.log"
    with open(log, "wb") as err:
        proc = subprocess.Popen(vmm_command(["restore", "--from", str(lab.snap), "--api-sock", str(sock),
                                             "--console", "none", "--hostname", "cli-clone", "--timeline"]),
                                stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
    try:
        client = wait_ready(proc, sock, log)
        assert client.exec(["hostname"]).stdout == b"cli-clone\n"
        marks = client.status()["timeline_ms"]
        assert marks["vm_created"] < marks["restored"] < marks["agent_ready"] and "kernel_loaded" not in marks
        client.action("shutdown")
        assert proc.wait(60) == 0, log.read_text()
        assert not sock.exists()
    finally:
        if proc.poll() is None:
            proc.kill()


def _variant(lab, name: str, edit=None, version=VERSION, memory_bytes=None):
    """A copy of the snapshot with one thing wrong (memory linked, not copied, unless resized)."""
    target = _mkdir(lab.root / name)
    state = json.loads((lab.snap / "state.json").read_text())["state"]
    if edit:
        edit(state)
    (target / "state.json").write_bytes(state_document(state, version))
    if memory_bytes is None:
        os.link(lab.snap / "memory", target / "memory")
    else:
        with open(target / "memory", "wb") as f:
            f.truncate(memory_bytes)
    return target


def test_corrupted_or_mismatched_snapshots_are_refused(lab):
    def other_host(state):
        state["host"]["cpuid_sha256"] = "0" * 64

    corrupted = _mkdir(lab.root / "corrupted")
    shutil.copy(lab.snap / "state.json", corrupted / "state.json")
    raw = bytearray((corrupted / "state.json").read_bytes())
    raw[raw.index(b'"regs":"') + 10] ^= 0x01  # one flipped bit in a register
    (corrupted / "state.json").write_bytes(raw)
    os.link(lab.snap / "memory", corrupted / "memory")
    cases = {
        corrupted: "is corrupted",
        _variant(lab, "version", version=99): "format version 99",
        _variant(lab, "otherhost", edit=other_host): "different CPU features",
        _variant(lab, "truncated", memory_bytes=1 << 20): "was truncated or replaced",
    }
    started = {path: lab.clone(f"refused-{path.name}", snap=path) for path in cases}
    for path, expected in cases.items():
        vmm, sock, log = started[path]
        assert vmm.wait(60) == 1, log.read_text()
        message = log.read_text().strip()
        assert expected in message and message.startswith("pclite: error:") and "\n" not in message, message
        assert "take a new snapshot" in message or "restore it on the host" in message, message
        assert not sock.exists()


def test_a_two_vcpu_clone_runs_work_on_both_vcpus(lab):
    root = _mkdir(lab.root / "smp")
    template = BootedVm(_mkdir(root / "template"), vcpus=2, mem_mib=MEM_MIB)
    try:
        template.client.snapshot(root / "snap")
    finally:
        template.stop()
    vmm, sock, log = lab.clone("smp-clone", snap=root / "snap")
    try:
        client = wait_ready(vmm, sock, log)
        # Per-CPU busy time before and after two busy loops: both vCPUs (the AP too) must have run them.
        script = ("cpus() { awk '/^cpu[0-9]/ {print $2 + $4}' /proc/stat | tr '\\n' ' '; echo; }; nproc; cpus; "
                  "for n in 1 2; do (i=0; while [ $i -lt 3000 ]; do i=$((i+1)); done) & done; wait; cpus")
        lines = client.exec(["sh", "-c", script], timeout_s=120).stdout.decode().splitlines()
        before, after = ([int(v) for v in line.split()] for line in lines[1:3])
        assert lines[0] == "2" and all(b > a for a, b in zip(before, after, strict=True)), lines
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(vmm.pid, 9)


def test_killing_the_template_leaves_the_clones_working(lab, clones):
    lab.template.proc.kill()
    lab.template.proc.wait(30)
    found = identities([(name, client) for name, _, client in clones], lab.root)
    assert sorted(host for host, _, _ in found.values()) == sorted(name for name, _, _ in clones)
