"""vCPU setup (CPUID, MSRs, LAPIC, boot registers) and the per-vCPU run loop, one thread each."""

from __future__ import annotations

import sys
import threading

from guestboot.cpu import CpuState
from hypervisor import kvm_structs as K
from hypervisor.cpuid import normalize_cpuid
from hypervisor.msrs import boot_msrs

APIC_LVT0, APIC_LVT1 = 0x350, 0x360
APIC_MODE_EXTINT, APIC_MODE_NMI = 0x7, 0x4
FPU_CONTROL_WORD = 0x37F
MXCSR_DEFAULT = 0x1F80


def _set_lvt(lapic, offset: int, mode: int) -> None:
    regs = lapic.regs
    value = int.from_bytes(bytes(regs[offset:offset + 4]), "little")
    value = (value & ~0x700) | (mode << 8)
    regs[offset:offset + 4] = list(value.to_bytes(4, "little"))


def configure_vcpu(vcpu, supported_cpuid, index: int, count: int, tsc_deadline: bool) -> None:
    vcpu.set_cpuid2(normalize_cpuid(supported_cpuid, index, count, tsc_deadline=tsc_deadline))
    vcpu.set_msrs(boot_msrs())
    lapic = vcpu.get_lapic()
    _set_lvt(lapic, APIC_LVT0, APIC_MODE_EXTINT)  # legacy PIC interrupts arrive through LINT0
    _set_lvt(lapic, APIC_LVT1, APIC_MODE_NMI)
    vcpu.set_lapic(lapic)
    fpu = vcpu.get_fpu()
    fpu.fcw = FPU_CONTROL_WORD
    fpu.mxcsr = MXCSR_DEFAULT
    vcpu.set_fpu(fpu)


def set_boot_registers(vcpu, state: CpuState) -> None:
    sregs = vcpu.get_sregs()
    for name, desc in state.segments.items():
        seg = getattr(sregs, name)
        seg.base, seg.limit, seg.selector, seg.type = desc.base, desc.limit, desc.selector, desc.type
        seg.present, seg.dpl, seg.db, seg.s, seg.l, seg.g, seg.avl = (desc.present, desc.dpl, desc.db, desc.s,
                                                                      desc.l, desc.g, desc.avl)
        seg.unusable = 0
    sregs.gdt.base, sregs.gdt.limit = state.gdt
    sregs.idt.base, sregs.idt.limit = state.idt
    sregs.cr0, sregs.cr3, sregs.cr4, sregs.efer = state.cr0, state.cr3, state.cr4, state.efer
    vcpu.set_sregs(sregs)
    regs = K.kvm_regs()
    regs.rip, regs.rsp, regs.rbp = state.rip, state.rsp, state.rsp
    regs.rsi, regs.rbx, regs.rflags = state.rsi, state.rbx, state.rflags
    vcpu.set_regs(regs)


def describe_registers(vcpu) -> str:
    try:
        r, s = vcpu.get_regs(), vcpu.get_sregs()
    except OSError as exc:
        return f"(registers unavailable: {exc})"
    return (f"rip={r.rip:#x} rsp={r.rsp:#x} rflags={r.rflags:#x} rax={r.rax:#x} rbx={r.rbx:#x} rcx={r.rcx:#x} "
            f"rdx={r.rdx:#x} rsi={r.rsi:#x} rdi={r.rdi:#x} cr0={s.cr0:#x} cr3={s.cr3:#x} cr4={s.cr4:#x} "
            f"efer={s.efer:#x} cs={s.cs.selector:#x}/{s.cs.base:#x}/l{s.cs.l}")


class VcpuThread(threading.Thread):
    """Runs KVM_RUN in a loop and dispatches exits to the buses; stops the machine on shutdown events."""

    def __init__(self, machine, vcpu):
        super().__init__(name=f"vcpu{vcpu.index}", daemon=True)
        self.machine = machine
        self.vcpu = vcpu
        self.exit_counts = [0] * 64
        self.paused = threading.Event()
        self.resume_event = threading.Event()

    def run(self) -> None:
        try:
            self._loop()
        except Exception as exc:  # a VMM bug: stop the VM with a report instead of hanging
            import traceback
            print(f"pclite: vcpu{self.vcpu.index} crashed:\n{traceback.format_exc()}", file=sys.stderr)
            self.machine.stop(f"vcpu{self.vcpu.index} VMM error: {exc}", 1)

    def _loop(self) -> None:
        vcpu, machine = self.vcpu, self.machine
        run, io, mmio, counts = vcpu.run, vcpu.io, vcpu.mmio, self.exit_counts
        pio_bus, mmio_bus = machine.pio_bus, machine.mmio_bus
        exit_io, exit_mmio, exit_intr, io_out = K.KVM_EXIT_IO, K.KVM_EXIT_MMIO, K.KVM_EXIT_INTR, K.KVM_EXIT_IO_OUT
        if vcpu.index == 0:
            machine.timeline.mark("first_kvm_run")
        while not machine.stopping:
            reason = run()
            counts[reason if reason < 64 else 0] += 1
            if reason == exit_io:
                size, port = io.size, io.port
                data = vcpu.io_data()
                if io.direction == io_out:
                    for start in range(0, len(data), size):
                        pio_bus.write(port, size, int.from_bytes(data[start:start + size], "little"))
                else:
                    for start in range(0, len(data), size):
                        data[start:start + size] = pio_bus.read(port, size).to_bytes(size, "little")
            elif reason == exit_mmio:
                length, addr = mmio.len, mmio.phys_addr
                if mmio.is_write:
                    mmio_bus.write(addr, length, int.from_bytes(bytes(mmio.data)[:length], "little"))
                else:
                    vcpu.mmio_data()[:] = mmio_bus.read(addr, length).to_bytes(length, "little")
            elif reason == exit_intr:
                vcpu.immediate_exit = 0
                if machine.pause_requested and not machine.stopping:
                    self.paused.set()
                    machine.resume_event.wait()
                    self.paused.clear()
            else:
                self._special_exit(reason)

    def _special_exit(self, reason: int) -> None:
        machine, vcpu = self.machine, self.vcpu
        if reason == K.KVM_EXIT_SHUTDOWN:
            # A triple fault: Linux's last-resort reboot (reboot=t), or a crash before the kernel got going.
            if "init_reached" in machine.timeline.marks:
                machine.stop("guest reset (triple fault)", 0)
            else:
                machine.stop(f"triple fault before init was reached: {describe_registers(vcpu)}", 2)
        elif reason == K.KVM_EXIT_SYSTEM_EVENT:
            kind = vcpu.system_event.type
            if kind == K.KVM_SYSTEM_EVENT_CRASH:
                machine.stop("guest crashed (system event)", 1)
            else:
                machine.stop("guest powered off" if kind == K.KVM_SYSTEM_EVENT_SHUTDOWN else "guest reset", 0)
        elif reason == K.KVM_EXIT_HLT:
            machine.stop("guest halted with no in-kernel irqchip to wake it", 1)
        elif reason == K.KVM_EXIT_INTERNAL_ERROR:
            internal = vcpu.internal
            data = [hex(internal.data[i]) for i in range(min(internal.ndata, 16))]
            machine.stop(f"KVM internal error suberror={internal.suberror} data={data}: {describe_registers(vcpu)}",
                         1)
        elif reason == K.KVM_EXIT_FAIL_ENTRY:
            machine.stop(f"VM entry failed, hardware reason "
                         f"{vcpu.fail_entry.hardware_entry_failure_reason:#x}: {describe_registers(vcpu)}", 1)
        else:
            machine.stop(f"unexpected VM exit {K.exit_reason_name(reason)}: {describe_registers(vcpu)}", 1)
