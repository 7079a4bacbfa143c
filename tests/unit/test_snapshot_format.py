"""Snapshot format on the host: a real (never run) VM's state and RAM written, verified, refused when wrong, and
restored into a second VM with the same KVM, vCPU and device state. Needs /dev/kvm (any KVM: nothing boots)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from hypervisor import snapshot as S
from hypervisor.agent_channel import AgentChannel
from hypervisor.launch import vmm_command
from hypervisor.memory import GuestMemory
from hypervisor.restore import apply_state, machine_config
from hypervisor.vm import Machine, MachineConfig

pytestmark = pytest.mark.kvm
MARK_GPA = 0x300000


@pytest.fixture
def template(images, tmp_path):
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(images.elf())
    machine = Machine(MachineConfig(kernel=str(kernel), mem_mib=64, vcpus=2)).build()
    machine.memory.write(MARK_GPA, b"written by the template")
    machine.serial.write(7, 1, 0x5A)  # scratch register: device state that must come back
    machine.console.push_input(b"queued for the guest")  # no driver yet: stays pending in the device
    agent = AgentChannel(lambda data: len(data))
    agent.version = "pclite-agent/1 6.1.0-test"
    yield machine, agent
    machine.close()


def write_snapshot(machine, agent, out_dir) -> dict:
    """take_snapshot() minus the pause (these vCPUs never ran, so there is nothing to pause)."""
    os.makedirs(out_dir, exist_ok=True)
    state = S.capture(machine, agent)
    layout, _ = S.write_memory(machine.memory, os.path.join(out_dir, S.MEMORY_FILE))
    state["memory"] = {"file": S.MEMORY_FILE, "bytes": machine.memory.size, "regions": layout,
                       "sha256": S.memory_digest(os.path.join(out_dir, S.MEMORY_FILE))}
    rewrite(out_dir, state)
    return state


def rewrite(out_dir, state, version=S.VERSION) -> None:
    with open(os.path.join(out_dir, S.STATE_FILE), "wb") as out:
        out.write(S.state_document(state, version))


def restored(snapshot_dir, spec=None):
    state = S.load_snapshot(snapshot_dir)
    memory = GuestMemory.from_file(os.path.join(snapshot_dir, "memory"),
                                   [tuple(r) for r in state["memory"]["regions"]])
    machine = Machine(machine_config(state["config"], None, None, spec)).build_restored(memory)
    return machine, apply_state(machine, state)


def test_round_trip_restores_vcpus_chips_devices_and_ram(template, tmp_path):
    machine, agent = template
    saved = write_snapshot(machine, agent, tmp_path / "snap")
    clone, warnings = restored(tmp_path / "snap")
    try:
        assert warnings == []
        again = S.capture(clone, agent)
        for before, after in zip(saved["vcpus"], again["vcpus"], strict=True):
            moving = {S.MSR_IA32_TSC}  # the TSC counts on between the two reads
            assert [m for m in before["msrs"] if m[0] not in moving] == [m for m in after["msrs"] if m[0] not in moving]
            assert {k: v for k, v in before.items() if k != "msrs"} == {k: v for k, v in after.items() if k != "msrs"}
        for chip in ("pic_master", "pic_slave", "ioapic"):
            assert saved["vm"][chip] == again["vm"][chip]
        assert saved["devices"] == again["devices"]
        assert clone.serial.scr == 0x5A and clone.console.pending == len(b"queued for the guest")
        assert clone.memory.read(MARK_GPA, 23) == b"written by the template"
        assert again["config"]["mem_mib"] == 64 and again["config"]["vcpus"] == 2
    finally:
        clone.close()


def test_clone_writes_stay_private_and_the_file_is_sparse(template, tmp_path):
    machine, agent = template
    write_snapshot(machine, agent, tmp_path / "snap")
    memory_file = tmp_path / "snap" / "memory"
    assert memory_file.stat().st_size == 64 << 20
    assert memory_file.stat().st_blocks * 512 < 32 << 20  # untouched guest RAM stays a hole
    clone, _ = restored(tmp_path / "snap")
    try:
        clone.memory.write(MARK_GPA, b"WRITTEN BY THE CLONE   ")
        assert clone.memory.read(MARK_GPA, 23) == b"WRITTEN BY THE CLONE   "
        with open(memory_file, "rb") as f:
            f.seek(MARK_GPA)
            assert f.read(23) == b"written by the template"  # copy-on-write: the file is never touched
    finally:
        clone.close()


def test_a_clone_can_be_snapshotted_with_what_it_never_touched(template, tmp_path):
    machine, agent = template
    machine.memory.write(0x500000, b"only the template wrote this")
    write_snapshot(machine, agent, tmp_path / "a")
    clone, _ = restored(tmp_path / "a")
    try:
        clone.memory.write(MARK_GPA, b"the clone wrote this too")
        write_snapshot(clone, agent, tmp_path / "b")  # its RAM is a file mapping: unmapped pages are not zero
    finally:
        clone.close()
    grandchild, _ = restored(tmp_path / "b")
    try:
        assert grandchild.memory.read(0x500000, 28) == b"only the template wrote this"
        assert grandchild.memory.read(MARK_GPA, 24) == b"the clone wrote this too"
    finally:
        grandchild.close()


def test_a_clone_gets_the_disks_its_spec_names_never_the_snapshots(template, tmp_path):
    from hypervisor.runspec import Drive, RunSpec
    machine, agent = template
    image = tmp_path / "rootfs.img"
    image.write_bytes(b"\xab" * 4096)
    machine.rootfs.swap_backing(image, read_only=True)  # as PUT /drives/rootfs does
    write_snapshot(machine, agent, tmp_path / "snap")
    clone, _ = restored(tmp_path / "snap")
    try:
        assert (clone.rootfs.path, clone.rootfs.capacity) == (os.devnull, 0)  # the template's disk is not taken
    finally:
        clone.close()
    other = tmp_path / "other.img"
    other.write_bytes(b"\xcd" * 8192)
    spec = RunSpec("restore", snapshot=str(tmp_path / "snap"), drives=(Drive("rootfs", str(other), True),))
    clone, _ = restored(tmp_path / "snap", spec)
    try:
        assert (clone.rootfs.path, clone.rootfs.read_only, clone.rootfs.capacity) == (str(other), True, 16)
    finally:
        clone.close()
    machine.rootfs.swap_backing(image, read_only=False)
    with pytest.raises(S.SnapshotError, match="writable disk attached .*every clone would write"):
        S.take_snapshot(machine, agent, str(tmp_path / "refused"))


def test_msrs_restore_in_a_safe_order(template):
    machine, _ = template
    order = S.msrs_to_save(machine.kvm)
    assert order[0] == S.MSR_IA32_TSC
    if S.MSR_IA32_TSC_DEADLINE in order:
        assert order[-1] == S.MSR_IA32_TSC_DEADLINE
    assert not [i for i in order if i in S.HYPERV_MSRS]


def test_data_runs_skip_untouched_and_zero_memory():
    from hypervisor.kvm import buffer_address
    memory = GuestMemory(8 << 20, [(0, 8 << 20)])
    try:
        address = buffer_address(memory.regions[0][2])
        memory.write(0x5000, b"x")
        memory.write(0x400000, b"y" * 0x2000)
        memory.write(0x600000, bytes(0x10000))  # touched, but zero: still a hole
        populated = S.populated_runs(address, 8 << 20)
        assert sum(length for _, length in populated) < 8 << 20  # never-touched memory is not even read
        runs = S.data_runs(address, 8 << 20, anonymous=True)
        assert runs == [(0, S.ZERO_CHUNK), (0x400000, S.ZERO_CHUNK)]
        assert S.data_runs(address, 8 << 20, anonymous=False) == runs  # file-backed: every page is looked at
    finally:
        memory.close()


# ---- refusals: each says what happened and what to do

def test_refuses_a_directory_that_is_no_snapshot(tmp_path):
    with pytest.raises(S.SnapshotError, match="is not a snapshot .*python -m hypervisor snapshot"):
        S.load_snapshot(str(tmp_path))


def test_refuses_another_format_version(template, tmp_path):
    state = write_snapshot(*template, tmp_path / "snap")
    rewrite(tmp_path / "snap", state, S.VERSION + 1)
    with pytest.raises(S.SnapshotError, match=f"format version {S.VERSION + 1}.*take a new snapshot"):
        S.load_snapshot(str(tmp_path / "snap"))


def test_refuses_a_corrupted_state(template, tmp_path):
    write_snapshot(*template, tmp_path / "snap")
    path = tmp_path / "snap" / "state.json"
    raw = path.read_bytes()
    regs = raw.index(b'"regs":"') + 8
    path.write_bytes(raw[:regs] + (b"1" if raw[regs:regs + 1] == b"0" else b"0") + raw[regs + 1:])  # one digit
    with pytest.raises(S.SnapshotError, match="corrupted.*sha256"):
        S.load_snapshot(str(tmp_path / "snap"))
    document = json.loads(raw)
    path.write_text(json.dumps(document, indent=1))  # same content, other bytes: still not what was written
    with pytest.raises(S.SnapshotError, match="corrupted.*sha256"):
        S.load_snapshot(str(tmp_path / "snap"))
    path.write_text("{not json")
    with pytest.raises(S.SnapshotError, match="cannot be read.*corrupted"):
        S.load_snapshot(str(tmp_path / "snap"))


def test_refuses_a_truncated_memory_file(template, tmp_path):
    write_snapshot(*template, tmp_path / "snap")
    os.truncate(tmp_path / "snap" / "memory", 1 << 20)
    with pytest.raises(S.SnapshotError, match="is 1048576 bytes, the snapshot needs 67108864"):
        S.load_snapshot(str(tmp_path / "snap"))


def test_refuses_another_host(template):
    machine, _ = template
    here = S.host_identity(machine.kvm, 2)
    assert here == S.host_identity(machine.kvm, 2)  # stable on one host, whichever CPU answers
    S.check_host(here, here, "snap")
    with pytest.raises(S.SnapshotError, match="different CPU features .*restore it on the host that took it"):
        S.check_host({**here, "cpuid_sha256": "0" * 64}, here, "snap")


def test_refuses_to_snapshot_a_busy_agent(template, tmp_path):
    machine, agent = template
    agent.ready.set()
    agent._open()  # a request awaiting its reply
    with pytest.raises(S.SnapshotError, match="in flight.*idle"):
        S.take_snapshot(machine, agent, str(tmp_path / "snap"))
    assert not (tmp_path / "snap").exists()


def test_restore_cli_refuses_with_one_line_and_exit_1(template, tmp_path):
    state = write_snapshot(*template, tmp_path / "snap")
    rewrite(tmp_path / "snap", state, 99)
    sock = tmp_path / "clone.sock"
    out = subprocess.run(vmm_command(["restore", "--from", str(tmp_path / "snap"), "--api-sock", str(sock)]),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1, out.stderr
    assert out.stderr.strip().count("\n") == 0 and "format version 99" in out.stderr
    assert not sock.exists()


def _forged(snap, edit) -> None:
    """The snapshot with its state edited and its checksum made to match (a forger can compute a sha256)."""
    raw = (snap / S.STATE_FILE).read_bytes()
    state = json.loads(raw)["state"]
    edit(state)
    (snap / S.STATE_FILE).write_bytes(S.state_document(state))


@pytest.mark.parametrize("forgery, message", [
    (lambda state: state["memory"].update(file="../x"), "names its memory file '../x', not a plain file name"),
    (lambda state: state["memory"].update(file="/etc/passwd"), "not a plain file name"),
    (lambda state: state["config"].update(rootfs="/etc/shadow", rootfs_read_only=False),
     "config keys ['rootfs', 'rootfs_read_only']"),
    (lambda state: state["config"].update(vcpus="2"), "bad VM size"),
    (lambda state: state["memory"]["regions"][0].__setitem__(2, 4096), "bad memory region"),
    (lambda state: state["memory"].update(sha256="0" * 64), "does not match its sha256 checksum"),
    (None, "does not match its sha256 checksum"),  # one byte of guest RAM changed behind the state's back
])
def test_forged_snapshots_are_refused_with_one_line_and_exit_1(template, tmp_path, forgery, message):
    snap = tmp_path / "snap"
    write_snapshot(*template, snap)
    (tmp_path / "x").write_bytes(bytes(64 << 20))
    if forgery:
        _forged(snap, forgery)
    else:
        with open(snap / S.MEMORY_FILE, "r+b") as memory:
            memory.seek(MARK_GPA)
            memory.write(b"W")
    with pytest.raises(S.SnapshotError, match="forged|checksum"):
        S.load_snapshot(str(snap))
    sock = tmp_path / "clone.sock"
    out = subprocess.run(vmm_command(["restore", "--from", str(snap), "--api-sock", str(sock), "--console", "none"]),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1, out.stderr
    assert out.stderr.startswith("pclite: error: ") and out.stderr.strip().count("\n") == 0, out.stderr
    assert message in out.stderr and "take a new snapshot" in out.stderr
    assert not sock.exists()


def test_memory_digest_is_defined_by_content_not_holes(tmp_path):
    sparse, dense = tmp_path / "sparse", tmp_path / "dense"
    with open(sparse, "wb") as f:
        f.truncate(4 << 20)
        f.seek(3 << 20)
        f.write(b"data")
    dense.write_bytes(bytes(3 << 20) + b"data" + bytes((1 << 20) - 4))
    assert S.memory_digest(str(sparse)) == S.memory_digest(str(dense))
    with open(dense, "r+b") as f:
        f.seek(5)
        f.write(b"\x01")
    assert S.memory_digest(str(sparse)) != S.memory_digest(str(dense))


def test_restore_cli_usage(tmp_path):
    out = subprocess.run([sys.executable, "-m", "hypervisor", "restore"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 2 and "missing --from" in out.stderr


# ---- a fork server's preloaded snapshot: used while unchanged, verified again after any change

def test_preloaded_state_is_reused_until_a_file_changes(template, tmp_path):
    machine, agent = template
    snap = str(tmp_path / "snap")
    state = write_snapshot(machine, agent, snap)
    assert S.preload_snapshot(snap) and not S.preload_snapshot(snap)  # something new kept once, not again
    try:
        assert S.load_snapshot(snap) is S._PRELOADED[snap][1]  # no re-read: the same object
        rewrite(snap, state, version=S.VERSION + 1)  # replaced behind the server's back
        with pytest.raises(S.SnapshotError, match="format version"):
            S.load_snapshot(snap)
        rewrite(snap, state)
        S.preload_snapshot(snap)
        os.truncate(os.path.join(snap, S.MEMORY_FILE), 4096)
        with pytest.raises(S.SnapshotError, match="truncated or replaced"):
            S.load_snapshot(snap)
    finally:
        S._PRELOADED.pop(snap, None)


def test_preloading_a_bad_snapshot_leaves_the_error_to_the_clone(tmp_path):
    assert not S.preload_snapshot(str(tmp_path))  # no state.json: nothing cached, nothing raised
    assert str(tmp_path) not in S._PRELOADED
    with pytest.raises(S.SnapshotError, match="is not a snapshot"):
        S.load_snapshot(str(tmp_path))
