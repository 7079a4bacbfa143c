"""Restore a snapshot (hypervisor/snapshot.py) into this process: a clone of the template VM, running.

No kernel is loaded: the VM is built bare, guest RAM is the snapshot's memory file mapped copy-on-write, and
the saved state goes back in an order KVM needs: the irqchip before the LAPICs that deliver into it; per vCPU
CPUID, sregs (EFER, CR4, APIC base) then the rest, the LAPIC before the MSRs (the TSC deadline needs
TSC-deadline mode), the TSC first among the MSRs; kvmclock last, once every vCPU's kvmclock MSRs are in.

The guest agent was idle at snapshot time, blocked reading /dev/hvc0: the channel starts fresh at a frame
boundary and is ready at once. Before anything else reaches it, the clone's own identity is queued: RESEED
(fresh host entropy; the agent forces a CRNG reseed), SET_CLOCK, SET_HOSTNAME.
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading
import time

from hypervisor import kvm_structs as K
from hypervisor.snapshot import IRQCHIPS, SnapshotError, check_host, host_identity, load_snapshot, msr_transfer
from hypervisor.snapshot import stateful_devices as _stateful_devices

IDENTITY_TIMEOUT_S = 60.0  # generous: a starved (nested, emulated) guest is slow, not broken


def _struct(cls, hex_data: str):
    raw = bytes.fromhex(hex_data)
    if len(raw) != ctypes.sizeof(cls):
        raise SnapshotError(f"saved {cls.__name__} is {len(raw)} bytes, this host's is {ctypes.sizeof(cls)}: "
                            f"take a new snapshot on this host")
    return cls.from_buffer_copy(raw)


def restore_vcpu(vcpu, state: dict) -> list[int]:
    """Put one vCPU's saved state back; returns the MSRs KVM refused (reported, not fatal)."""
    from hypervisor.kvm_snapshot_structs import kvm_debugregs, kvm_vcpu_events, kvm_xcrs
    vcpu.set_cpuid2([K.CpuidEntry(*row) for row in state["cpuid"]])
    vcpu.set_sregs(_struct(K.kvm_sregs, state["sregs"]))
    vcpu.set_regs(_struct(K.kvm_regs, state["regs"]))
    vcpu.set_xsave(bytes.fromhex(state["xsave"]))
    if "xcrs" in state:
        vcpu.set_xcrs(_struct(kvm_xcrs, state["xcrs"]))
    vcpu.set_debugregs(_struct(kvm_debugregs, state["debugregs"]))
    vcpu.set_lapic(_struct(K.kvm_lapic_state, state["lapic"]))
    _, refused = msr_transfer(vcpu, K.KVM_SET_MSRS, [tuple(pair) for pair in state["msrs"]])
    vcpu.set_mp_state(state["mp_state"])
    events = _struct(kvm_vcpu_events, state["events"])
    # Also apply the pending-NMI and SIPI fields GET reports but does not flag as valid.
    events.flags |= K.KVM_VCPUEVENT_VALID_NMI_PENDING | K.KVM_VCPUEVENT_VALID_SIPI_VECTOR
    vcpu.set_vcpu_events(events)
    return refused


def apply_state(machine, state: dict) -> list[str]:
    """The snapshot's VM, vCPU and device state into a machine from Machine.build_restored; returns warnings."""
    from hypervisor.kvm_snapshot_structs import kvm_clock_data, kvm_irqchip, kvm_pit_state2
    saved_vm, vm, warnings = state["vm"], machine.vm, []
    for name, _ in IRQCHIPS:
        vm.set_irqchip(_struct(kvm_irqchip, saved_vm[name]))
    vm.set_pit2(_struct(kvm_pit_state2, saved_vm["pit2"]))
    for thread, saved in zip(machine.threads, state["vcpus"], strict=True):
        refused = restore_vcpu(thread.vcpu, saved)
        if refused:
            warnings.append(f"vcpu{thread.vcpu.index}: KVM refused MSRs {', '.join(hex(i) for i in refused)}")
    devices = _stateful_devices(machine)
    if set(devices) != set(state["devices"]):
        raise SnapshotError(f"this VMM builds devices {sorted(devices)}, the snapshot has {sorted(state['devices'])}:"
                            f" take a new snapshot with this pclite")
    for key, device in devices.items():
        device.load_state(state["devices"][key])
    # Last: the clock carries on from the snapshot's instant (no flags: KVM_CLOCK_REALTIME would advance it by
    # the wall time since, under a guest whose TSC was just put back). SET_CLOCK fixes the wall clock.
    vm.set_clock(kvm_clock_data(clock=saved_vm["clock_ns"]))
    return warnings


def machine_config(saved: dict, console_sink, agent_sink, spec=None):
    """The clone's MachineConfig: the template's size (its RAM and vCPU state are the snapshot's), everything else
    from the restoring RunSpec `spec` (its disks: never a path from the snapshot), this process's sinks; no kernel
    or initrd (nothing is loaded)."""
    from hypervisor.vm import MachineConfig
    drive = spec.drive("rootfs") if spec is not None else None
    return MachineConfig(kernel=None, mem_mib=saved["mem_mib"], vcpus=saved["vcpus"], console_sink=console_sink,
                         agent_sink=agent_sink, rootfs=drive.path if drive else None,
                         rootfs_read_only=drive.read_only if drive else False)


def identity_requests(hostname: str) -> list[tuple[int, bytes]]:
    from hypervisor import agent_protocol as P
    name = hostname.encode()
    if not 0 < len(name) <= 64:
        raise SnapshotError(f"--hostname must be 1..64 bytes, got {hostname!r}")
    return [(P.MsgType.RESEED, os.urandom(32)),
            (P.MsgType.SET_CLOCK, P.SetClockRequest.from_ns(time.time_ns()).encode()),
            (P.MsgType.SET_HOSTNAME, name)]


class _EarlyVm(threading.Thread):
    """Opens KVM and makes the VM and its chips (Machine.prepare_vm) on a thread; result() hands them over."""

    def __init__(self, kvm=None):
        super().__init__(name="create-vm", daemon=True)
        self.kvm, self.vm, self.error = kvm, None, None
        from hypervisor.vm import take_prepared_vm
        prepared = None if kvm else take_prepared_vm()
        if prepared:  # made before the request (a pre-forked VMM): nothing left to do
            self.kvm, self.vm = prepared
            self._on_thread = False
            return
        self._on_thread = True
        self.start()

    def run(self) -> None:
        from hypervisor.kvm import Kvm
        from hypervisor.vm import Machine
        try:
            self.kvm = self.kvm or Kvm()
            self.vm = Machine.prepare_vm(self.kvm)
        except BaseException as exc:  # noqa: BLE001 - raised by result(), in the restoring thread
            self.error = exc

    def result(self):
        if self._on_thread:
            self.join()
        if self.error is not None:
            raise self.error
        return self.kvm, self.vm

    def discard(self) -> None:
        if self._on_thread:
            self.join()
        for owner in (self.vm, self.kvm):
            if owner is not None:
                owner.close()


def _await_identity(machine, agent, tickets, timeline) -> None:
    from hypervisor.agent_channel import AgentError
    try:
        agent.await_replies(tickets, IDENTITY_TIMEOUT_S)
        timeline.mark("identity_set")
    except AgentError as exc:
        machine.stop(f"the restored guest's agent did not take its new identity ({exc}): the snapshot is unusable "
                     f"(was it taken while the agent was busy?); take a new one", 1)


def restore(spec, console_sink, timeline, kvm=None):
    """Load, verify and restore the snapshot of the `restore` RunSpec `spec` (hypervisor/builder.py calls this);
    returns the running (machine, agent channel), the agent ready and the clone's identity queued ahead of any
    request. Raises SnapshotError (or KvmError/OSError), nothing left running."""
    snapshot_dir, hostname = spec.snapshot, spec.hostname
    from hypervisor.agent_channel import AgentChannel
    from hypervisor.memory import GuestMemory
    from hypervisor.vm import Machine

    early = _EarlyVm(kvm)  # KVM_CREATE_VM (~20 ms in the lab, GIL released) overlaps reading the snapshot
    memory = None
    try:
        state = load_snapshot(snapshot_dir)
        timeline.mark("snapshot_loaded")
        requests = identity_requests(hostname or f"pclite-{os.urandom(4).hex()}")
        kvm, vm = early.result()  # KVM errors (no /dev/kvm...) come after the snapshot's own
        check_host(state["host"], host_identity(kvm, state["config"]["vcpus"], cached=True), snapshot_dir)
        timeline.mark("host_checked")
        memory = GuestMemory.from_file(os.path.join(snapshot_dir, state["memory"]["file"]),
                                       [tuple(region) for region in state["memory"]["regions"]])
    except BaseException:
        early.discard()
        if memory is not None:
            memory.close()
        raise
    agent, machine = AgentChannel(lambda data: machine.console.push_input(data)), None
    try:
        machine = Machine(machine_config(state["config"], console_sink, agent.feed, spec), timeline)
        machine.build_restored(memory, kvm, vm)
        warnings = apply_state(machine, state)
        timeline.mark("restored")
        timeline.mark("init_reached")  # in the template: a triple fault from now on is the guest's reset
        # The identity requests go in before anything else can (the API is not served yet) and the agent handles
        # requests in stream order: whatever a client sends later runs with them applied. So the clone is ready
        # now; the replies are awaited on the side and a failure stops the VM (fail closed).
        agent.adopt(state["agent"]["version"])
        tickets = agent.send_requests(requests, IDENTITY_TIMEOUT_S)
        machine.start()
        threading.Thread(target=_await_identity, args=(machine, agent, tickets, timeline), name="identity",
                         daemon=True).start()
        timeline.mark("agent_ready")
    except BaseException:
        agent.close()
        if machine is not None:
            machine.stop("restore failed", 1)
            machine.close()  # closes kvm too, once build_restored has taken it
        if machine is None or machine.kvm is None:
            early.discard()
        memory.close()
        raise
    for warning in warnings:
        print(f"pclite: warning: {warning}", file=sys.stderr, flush=True)
    return machine, agent
