"""KVM bindings: ABI sizes/ioctl numbers (pure) and real /dev/kvm behaviour (tests marked ``kvm``).

The ``kvm`` tests need /dev/kvm and fail (never skip) with the KvmError explanation when it is missing.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import mmap
import os
import signal
import threading
import time

import pytest

from hypervisor import kvm_snapshot_structs as kss
from hypervisor import kvm_structs as ks
from hypervisor.cpuid import normalize_cpuid
from hypervisor.kvm import (
    Kvm,
    KvmError,
    Vcpu,
    Vm,
    buffer_address,
)
from hypervisor.kvm_structs import (
    KVM_CAP_TSC_DEADLINE_TIMER,
    KVM_EXIT_INTR,
    KVM_EXIT_IO,
    KVM_EXIT_IO_IN,
    KVM_EXIT_IO_OUT,
    KVM_EXIT_MMIO,
    KVM_IRQCHIP_IOAPIC,
    KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
    KVM_IRQFD_FLAG_DEASSIGN,
    KVM_MP_STATE_HALTED,
    KVM_MP_STATE_RUNNABLE,
    KVM_MP_STATE_UNINITIALIZED,
    kvm_regs,
)
from hypervisor.msrs import MSR_IA32_TSC, boot_msrs

kvm = pytest.mark.kvm  # real /dev/kvm; registration of the marker is done centrally

MEM_SIZE = 2 << 20
CODE_ADDR = 0x1000

# ------------------------------------------------------------------------------------------ pure ABI checks

# Values from <linux/kvm.h>/<asm/kvm.h> (x86_64), checked with sizeof()/offsetof() in C.
ABI_SIZES = {
    "kvm_userspace_memory_region": 32,
    "kvm_regs": 144,
    "kvm_segment": 24,
    "kvm_dtable": 16,
    "kvm_sregs": 312,
    "kvm_fpu": 416,
    "kvm_msr_entry": 16,
    "kvm_msrs": 8,
    "kvm_msr_list": 4,
    "kvm_cpuid_entry2": 40,
    "kvm_cpuid2": 8,
    "kvm_lapic_state": 1024,
    "kvm_xcr": 16,
    "kvm_xcrs": 392,
    "kvm_xsave": 4096,
    "kvm_vcpu_events": 64,
    "kvm_mp_state": 4,
    "kvm_debugregs": 128,
    "kvm_pic_state": 16,
    "kvm_ioapic_state": 216,
    "kvm_irqchip": 520,
    "kvm_pit_channel_state": 24,
    "kvm_pit_state2": 112,
    "kvm_pit_config": 64,
    "kvm_clock_data": 48,
    "kvm_irq_level": 8,
    "kvm_irqfd": 32,
    "kvm_ioeventfd": 64,
    "kvm_enable_cap": 104,
    "kvm_run": 2352,
}


@pytest.mark.parametrize("name,size", sorted(ABI_SIZES.items()))
def test_struct_sizes_match_kernel_abi(name, size):
    assert ctypes.sizeof(getattr(ks, name, None) or getattr(kss, name)) == size


def test_kvm_run_layout():
    run = ks.kvm_run
    assert (run.immediate_exit.offset, run.exit_reason.offset, run.cr8.offset, run.apic_base.offset) == (1, 8, 16, 24)
    assert run._exit.offset == 32
    assert (run.kvm_valid_regs.offset, run.kvm_dirty_regs.offset, run.s.offset) == (288, 296, 304)
    assert (ks.kvm_run_io.port.offset, ks.kvm_run_io.count.offset, ks.kvm_run_io.data_offset.offset) == (2, 4, 8)
    assert (ks.kvm_run_mmio.data.offset, ks.kvm_run_mmio.len.offset, ks.kvm_run_mmio.is_write.offset) == (8, 16, 20)
    assert ks.kvm_run_system_event.data.offset == 8 and ks.kvm_run_system_event.flags.offset == 8
    assert ks.kvm_run_internal.data.offset == 8
    assert ks.kvm_run_fail_entry.cpu.offset == 8
    assert kss.kvm_vcpu_events.exception_has_payload.offset == 55
    assert kss.kvm_vcpu_events.triple_fault.offset == 28
    assert kss.kvm_clock_data.realtime.offset == 16 and kss.kvm_clock_data.host_tsc.offset == 24


def test_variable_length_structs():
    assert ctypes.sizeof(ks.make_kvm_msrs(3)) == 8 + 3 * 16
    assert ks.make_kvm_msrs(3).nmsrs == 3
    assert ctypes.sizeof(ks.make_kvm_cpuid2(5)) == 8 + 5 * 40
    assert ks.make_kvm_cpuid2(5).nent == 5
    assert ctypes.sizeof(ks.make_kvm_msr_list(7)) == 4 + 7 * 4
    assert ks.make_kvm_msrs_type(3) is ks.make_kvm_msrs_type(3)  # cached types


IOCTL_NUMBERS = {
    "KVM_GET_API_VERSION": 0xAE00,
    "KVM_CREATE_VM": 0xAE01,
    "KVM_GET_MSR_INDEX_LIST": 0xC004AE02,
    "KVM_CHECK_EXTENSION": 0xAE03,
    "KVM_GET_VCPU_MMAP_SIZE": 0xAE04,
    "KVM_GET_SUPPORTED_CPUID": 0xC008AE05,
    "KVM_CREATE_VCPU": 0xAE41,
    "KVM_SET_USER_MEMORY_REGION": 0x4020AE46,
    "KVM_SET_TSS_ADDR": 0xAE47,
    "KVM_SET_IDENTITY_MAP_ADDR": 0x4008AE48,
    "KVM_CREATE_IRQCHIP": 0xAE60,
    "KVM_IRQ_LINE": 0x4008AE61,
    "KVM_GET_IRQCHIP": 0xC208AE62,
    "KVM_SET_IRQCHIP": 0x8208AE63,
    "KVM_IRQFD": 0x4020AE76,
    "KVM_CREATE_PIT2": 0x4040AE77,
    "KVM_IOEVENTFD": 0x4040AE79,
    "KVM_SET_CLOCK": 0x4030AE7B,
    "KVM_GET_CLOCK": 0x8030AE7C,
    "KVM_GET_PIT2": 0x8070AE9F,
    "KVM_SET_PIT2": 0x4070AEA0,
    "KVM_RUN": 0xAE80,
    "KVM_GET_REGS": 0x8090AE81,
    "KVM_SET_REGS": 0x4090AE82,
    "KVM_GET_SREGS": 0x8138AE83,
    "KVM_SET_SREGS": 0x4138AE84,
    "KVM_GET_MSRS": 0xC008AE88,
    "KVM_SET_MSRS": 0x4008AE89,
    "KVM_GET_FPU": 0x81A0AE8C,
    "KVM_SET_FPU": 0x41A0AE8D,
    "KVM_GET_LAPIC": 0x8400AE8E,
    "KVM_SET_LAPIC": 0x4400AE8F,
    "KVM_SET_CPUID2": 0x4008AE90,
    "KVM_GET_MP_STATE": 0x8004AE98,
    "KVM_SET_MP_STATE": 0x4004AE99,
    "KVM_GET_VCPU_EVENTS": 0x8040AE9F,
    "KVM_SET_VCPU_EVENTS": 0x4040AEA0,
    "KVM_GET_DEBUGREGS": 0x8080AEA1,
    "KVM_SET_DEBUGREGS": 0x4080AEA2,
    "KVM_ENABLE_CAP": 0x4068AEA3,
    "KVM_GET_XSAVE": 0x9000AEA4,
    "KVM_SET_XSAVE": 0x5000AEA5,
    "KVM_GET_XCRS": 0x8188AEA6,
    "KVM_SET_XCRS": 0x4188AEA7,
    "KVM_GET_XSAVE2": 0x9000AECF,
}


@pytest.mark.parametrize("name,value", sorted(IOCTL_NUMBERS.items()))
def test_ioctl_numbers(name, value):
    assert getattr(ks, name) == value
    assert ks.IOCTL_NAMES[value] == name


def test_ioc_helpers():
    assert ks._IOR(0xAE, 0x81, ks.kvm_regs) == ks._IOR(0xAE, 0x81, 144)
    assert ks._IOWR(0xAE, 0x02, 4) == 0xC004AE02
    with pytest.raises(ValueError):
        ks._IOW(0xAE, 1, 1 << 14)


def test_exit_reason_table():
    expected = {2: "IO", 5: "HLT", 6: "MMIO", 8: "SHUTDOWN", 9: "FAIL_ENTRY", 10: "INTR", 17: "INTERNAL_ERROR"}
    for value, name in expected.items():
        assert ks.EXIT_REASON_NAMES[value] == name
    assert ks.exit_reason_name(24) == "SYSTEM_EVENT"
    assert ks.exit_reason_name(999) == "UNKNOWN_EXIT_999"


def test_open_missing_device_explains(tmp_path):
    with pytest.raises(KvmError) as exc:
        Kvm(str(tmp_path / "kvm"))
    err = exc.value
    assert err.errno == errno.ENOENT and isinstance(err, OSError)
    for needle in ("ENOENT", "kvm_intel", "kvm_amd", "pclite-lab run"):
        assert needle in str(err)


def test_open_non_kvm_device_names_ioctl():
    with pytest.raises(KvmError) as exc:
        Kvm("/dev/null")
    assert exc.value.ioctl == "KVM_GET_API_VERSION"
    assert "KVM_GET_API_VERSION failed: ENOTTY" in str(exc.value)


def test_permission_hint():
    err = KvmError.from_errno("open", errno.EACCES, "/dev/kvm")
    assert "group kvm" in str(err) and "EACCES" in str(err)
    assert "create_irqchip() was called twice" in str(KvmError.from_errno("KVM_CREATE_IRQCHIP", errno.EEXIST))


# ------------------------------------------------------------------------------------------ real /dev/kvm


def open_kvm() -> Kvm:
    try:
        return Kvm()
    except KvmError as e:
        pytest.fail(f"this test needs a usable /dev/kvm: {e}", pytrace=False)


@pytest.fixture(scope="module")
def kvm_sys():
    k = open_kvm()
    yield k
    k.close()


@pytest.fixture
def machine(kvm_sys):
    """A VM with 2 MiB of RAM at GPA 0, in-kernel irqchip + PIT, and vCPU 0; yields (vm, mem, vcpu)."""
    mem = mmap.mmap(-1, MEM_SIZE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    vm = kvm_sys.create_vm()
    vm.set_tss_addr(0xFFFBD000)  # > INT_MAX: exercises the unsigned-long ioctl path
    vm.set_identity_map_addr(0xFFFBC000)
    vm.set_user_memory_region(0, 0, MEM_SIZE, buffer_address(mem))
    vm.create_irqchip()
    vm.create_pit2()
    vcpu = vm.create_vcpu(0)
    yield vm, mem, vcpu
    vm.close()
    mem.close()


def enter_real_mode(vcpu: Vcpu, rip: int = CODE_ADDR) -> None:
    sregs = vcpu.get_sregs()
    for seg in (sregs.cs, sregs.ds, sregs.es, sregs.ss):
        seg.base = 0
        seg.selector = 0
    vcpu.set_sregs(sregs)
    regs = kvm_regs()
    regs.rip = rip
    regs.rflags = 0x2
    regs.rsp = 0x8000
    vcpu.set_regs(regs)


def load(mem: mmap.mmap, code: bytes, addr: int = CODE_ADDR) -> None:
    mem[addr : addr + len(code)] = code


def expect_io(vcpu: Vcpu, direction: int, port: int, size: int = 1) -> memoryview:
    reason = vcpu.run()
    assert reason == KVM_EXIT_IO, f"expected IO exit, got {ks.exit_reason_name(reason)}"
    io = vcpu.io
    assert (io.direction, io.port, io.size, io.count) == (direction, port, size, 1)
    return vcpu.io_data()


@kvm
def test_open_and_capabilities(kvm_sys):
    assert kvm_sys.api_version() == 12
    assert kvm_sys.vcpu_mmap_size() >= 4096
    for cap in (ks.KVM_CAP_IRQCHIP, ks.KVM_CAP_PIT2, ks.KVM_CAP_IRQFD, ks.KVM_CAP_IOEVENTFD, ks.KVM_CAP_USER_MEMORY):
        assert kvm_sys.check_extension(cap) > 0, f"cap {cap}"
    cpuid = kvm_sys.supported_cpuid()
    assert {0, 1, 0x40000000, 0x80000000} <= {e.function for e in cpuid}
    msr_list = kvm_sys.msr_index_list()
    assert {0x174, 0xC0000081, 0x10} <= set(msr_list)


@kvm
def test_real_mode_port_io_and_mmio(machine):
    vm, mem, vcpu = machine
    enter_real_mode(vcpu)
    sregs = vcpu.get_sregs()
    sregs.es.base = 0x400000  # beyond guest RAM: ES accesses become MMIO exits
    vcpu.set_sregs(sregs)
    load(
        mem,
        bytes.fromhex(
            "b042 e610"  # mov al,0x42 ; out 0x10,al
            "baf803 b043 ee"  # mov dx,0x3f8 ; mov al,0x43 ; out dx,al
            "e411 e612"  # in al,0x11 ; out 0x12,al
            "26c6061000 55"  # mov byte [es:0x10],0x55
            "26a02000 e613"  # mov al,[es:0x20] ; out 0x13,al
            "ebfe"  # jmp $
        ),
    )
    assert bytes(expect_io(vcpu, KVM_EXIT_IO_OUT, 0x10)) == b"\x42"
    assert bytes(expect_io(vcpu, KVM_EXIT_IO_OUT, 0x3F8)) == b"\x43"
    expect_io(vcpu, KVM_EXIT_IO_IN, 0x11)[0] = 0x99  # answer the IN through the shared mmap
    assert bytes(expect_io(vcpu, KVM_EXIT_IO_OUT, 0x12)) == b"\x99"

    assert vcpu.run() == KVM_EXIT_MMIO
    assert (vcpu.mmio.phys_addr, vcpu.mmio.len, vcpu.mmio.is_write) == (0x400010, 1, 1)
    assert bytes(vcpu.mmio_data()) == b"\x55"
    assert vcpu.run() == KVM_EXIT_MMIO
    assert (vcpu.mmio.phys_addr, vcpu.mmio.len, vcpu.mmio.is_write) == (0x400020, 1, 0)
    vcpu.mmio_data()[0] = 0x77
    assert bytes(expect_io(vcpu, KVM_EXIT_IO_OUT, 0x13)) == b"\x77"

    # Guest now spins on `jmp $`: immediate_exit makes KVM_RUN return at once.
    vcpu.immediate_exit = 1
    assert vcpu.run() == KVM_EXIT_INTR
    vcpu.immediate_exit = 0

    # Pause from another thread while the vCPU is inside KVM_RUN.
    previous = signal.signal(signal.SIGUSR1, lambda *_: None)
    try:
        result = []
        worker = threading.Thread(target=lambda: result.append(vcpu.run()), daemon=True)
        worker.start()
        time.sleep(0.05)
        vcpu.request_exit(worker.ident)
        worker.join(10)
        assert not worker.is_alive(), "KVM_RUN was not interrupted"
        assert result == [KVM_EXIT_INTR]
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert vcpu.immediate_exit == 1
    assert vcpu.get_regs().rip == CODE_ADDR + 26  # still at the `jmp $`


@kvm
def test_ioeventfd_and_irqfd(machine):
    vm, mem, vcpu = machine
    efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    try:
        vm.ioeventfd(0x10, 1, efd, datamatch=0x42, pio=True)
        enter_real_mode(vcpu)
        load(mem, bytes.fromhex("b042 e610 b043 e630 ebfe"))  # out 0x10 handled in-kernel, then out 0x30
        assert bytes(expect_io(vcpu, KVM_EXIT_IO_OUT, 0x30)) == b"\x43"
        assert os.eventfd_read(efd) == 1
        vm.ioeventfd(0x10, 1, efd, datamatch=0x42, pio=True, deassign=True)

        vm.irqfd(efd, 5)
        os.eventfd_write(efd, 1)
        vm.irqfd(efd, 5, flags=KVM_IRQFD_FLAG_DEASSIGN)
        vm.irq_line(4, 1)
        vm.irq_line(4, 0)
    finally:
        os.close(efd)


@kvm
def test_vcpu_state_round_trips(machine):
    vm, mem, vcpu = machine
    regs = kvm_regs(rax=0x1122334455667788, rbx=7, rsp=0x7000, rip=0x1234, rflags=0x202)
    vcpu.set_regs(regs)
    assert bytes(vcpu.get_regs()) == bytes(regs)

    sregs = vcpu.get_sregs()
    sregs.cs.base, sregs.cs.selector, sregs.cr2 = 0, 0, 0xDEAD000
    vcpu.set_sregs(sregs)
    got = vcpu.get_sregs()
    assert (got.cs.base, got.cs.selector, got.cr2) == (0, 0, 0xDEAD000)
    assert bytes(got) == bytes(sregs)

    fpu = vcpu.get_fpu()
    fpu.fcw = 0x27F
    fpu.xmm[3][:] = list(range(16))
    vcpu.set_fpu(fpu)
    got = vcpu.get_fpu()
    # KVM_GET/SET_FPU do not carry MXCSR (upstream KVM behaviour); it lives in the XSAVE area below.
    assert (got.fcw, list(got.xmm[3])) == (0x27F, list(range(16)))

    wanted = boot_msrs()
    vcpu.set_msrs(wanted)
    got_msrs = vcpu.get_msrs(wanted)
    # Writing TSC=0 is KVM's "vCPU reset, sync with the other vCPUs" signal; the value read back is
    # implementation specific (kvm_pvm keeps the host TSC), so only its presence is checked.
    assert got_msrs.pop(MSR_IA32_TSC) >= 0
    assert got_msrs == {k: v for k, v in wanted.items() if k != MSR_IA32_TSC}
    with pytest.raises(KvmError, match=r"KVM_GET_MSRS handled only 1 of 2 MSRs: MSR 0xdead0000"):
        vcpu.get_msrs([0x174, 0xDEAD0000])

    lapic = vcpu.get_lapic()
    assert int.from_bytes(bytes(lapic.regs[0x20:0x24]), "little") >> 24 == 0, "APIC id of vCPU 0"
    vcpu.set_lapic(lapic)
    assert bytes(vcpu.get_lapic()) == bytes(lapic)

    xcrs = vcpu.get_xcrs()
    assert xcrs.nr_xcrs >= 1 and xcrs.xcrs[0].value & 1, "XCR0.x87"
    vcpu.set_xcrs(xcrs)
    assert bytes(vcpu.get_xcrs()) == bytes(xcrs)

    xsave = vcpu.get_xsave()
    assert len(xsave) == vcpu.xsave_size >= 4096
    assert int.from_bytes(xsave[24:28], "little") == 0x1F80, "MXCSR in the legacy area"
    vcpu.set_xsave(xsave)
    assert vcpu.get_xsave() == xsave

    events = vcpu.get_vcpu_events()
    vcpu.set_vcpu_events(events)
    assert bytes(vcpu.get_vcpu_events()) == bytes(events)

    assert vcpu.get_mp_state() == KVM_MP_STATE_RUNNABLE
    vcpu.set_mp_state(KVM_MP_STATE_HALTED)
    assert vcpu.get_mp_state() == KVM_MP_STATE_HALTED
    vcpu.set_mp_state(KVM_MP_STATE_RUNNABLE)
    assert vm.create_vcpu(1).get_mp_state() == KVM_MP_STATE_UNINITIALIZED, "APs wait for INIT/SIPI"

    dregs = vcpu.get_debugregs()
    dregs.db[0], dregs.dr7 = 0x1000, 0x401
    vcpu.set_debugregs(dregs)
    got = vcpu.get_debugregs()
    assert (got.db[0], got.dr7) == (0x1000, 0x401)


@kvm
def test_cpuid_applied_to_vcpu(kvm_sys, machine):
    vm, mem, vcpu = machine
    vcpu1 = vm.create_vcpu(1)
    supported = kvm_sys.supported_cpuid()
    tsc_deadline = bool(kvm_sys.check_extension(KVM_CAP_TSC_DEADLINE_TIMER))
    for v in (vcpu, vcpu1):
        table = normalize_cpuid(supported, v.index, 2, tsc_deadline=tsc_deadline)
        v.set_cpuid2(table)
        got = {(e.function, e.index): e for e in v.get_cpuid2()}
        assert got[(1, 0)].ebx >> 24 == v.index
        assert got[(0x40000000, 0)].ebx == 0x4B4D564B
    assert int.from_bytes(bytes(vcpu1.get_lapic().regs[0x20:0x24]), "little") >> 24 == 1


@kvm
def test_vm_device_state_round_trips(machine):
    vm, mem, vcpu = machine
    master = vm.get_irqchip(KVM_IRQCHIP_PIC_MASTER)
    master.chip.pic.imr = 0xFB
    vm.set_irqchip(master)
    assert vm.get_irqchip(KVM_IRQCHIP_PIC_MASTER).chip.pic.imr == 0xFB
    slave = vm.get_irqchip(KVM_IRQCHIP_PIC_SLAVE)
    vm.set_irqchip(slave)
    assert bytes(vm.get_irqchip(KVM_IRQCHIP_PIC_SLAVE)) == bytes(slave)
    ioapic = vm.get_irqchip(KVM_IRQCHIP_IOAPIC)
    assert ioapic.chip.ioapic.base_address == 0xFEC00000
    ioapic.chip.ioapic.redirtbl[3] = 0x10030
    vm.set_irqchip(ioapic)
    assert vm.get_irqchip(KVM_IRQCHIP_IOAPIC).chip.ioapic.redirtbl[3] == 0x10030

    pit = vm.get_pit2()
    pit.channels[2].gate = 1
    vm.set_pit2(pit)
    got = vm.get_pit2()
    assert [(c.mode, c.count, c.gate) for c in got.channels] == [(c.mode, c.count, c.gate) for c in pit.channels]

    clock = vm.get_clock()
    vm.set_clock(clock.clock + 10**9)
    assert vm.get_clock().clock >= clock.clock + 10**9
    again = vm.get_clock()
    again.flags = 0
    vm.set_clock(again)


@kvm
def test_errors_name_the_ioctl(kvm_sys, machine):
    vm, mem, vcpu = machine
    with pytest.raises(KvmError) as exc:
        vm.set_user_memory_region(1, 0x10000000, 0x1000, buffer_address(mem) + 1)
    err = exc.value
    assert err.errno == errno.EINVAL and err.ioctl == "KVM_SET_USER_MEMORY_REGION"
    assert "KVM_SET_USER_MEMORY_REGION" in str(err) and "EINVAL" in str(err) and "aligned" in str(err)
    with pytest.raises(KvmError, match="KVM_CREATE_IRQCHIP failed.*EEXIST.*twice"):
        vm.create_irqchip()
    with pytest.raises(KvmError, match="KVM_CREATE_VCPU failed.*EEXIST"):
        vm.create_vcpu(0)


@kvm
def test_close_releases_everything(kvm_sys):
    with kvm_sys.create_vm() as vm:
        assert isinstance(vm, Vm)
        vcpu = vm.create_vcpu(0)
        fds = (vm.fd, vcpu.fd)
        view = vcpu.io_data()  # a live view must not make close() fail
    del view
    assert vm.closed and vcpu.closed
    for fd in fds:
        with pytest.raises(OSError):
            os.fstat(fd)
    with pytest.raises(KvmError, match="EBADF.*after close"):
        vm.create_irqchip()
    with pytest.raises(KvmError, match="KVM_RUN failed.*EBADF"):
        vcpu.run()
    vm.close()  # idempotent
    with Kvm() as k:
        pass
    assert k.closed


@kvm
def test_port_io_exit_round_trip(machine, capsys):
    """Measured, not asserted: cost of one `out` -> KVM_EXIT_IO -> KVM_RUN cycle through these bindings."""
    vm, mem, vcpu = machine
    enter_real_mode(vcpu)
    load(mem, bytes.fromhex("b042 e610 ebfc"))  # mov al,0x42 ; 1: out 0x10,al ; jmp 1b
    run, io = vcpu.run, vcpu.io
    for _ in range(50):
        run()
    n = 2000
    t0 = time.perf_counter_ns()
    for _ in range(n):
        if run() != KVM_EXIT_IO or io.port != 0x10:
            pytest.fail(f"unexpected exit {ks.exit_reason_name(vcpu.run_struct.exit_reason)}")
    per_exit_us = (time.perf_counter_ns() - t0) / n / 1000
    with capsys.disabled():
        print(f"\n[kvm] port-IO exit round trip: {per_exit_us:.2f} us/exit over {n} exits")


def test_buffer_address():
    buf = bytearray(16)
    addr = buffer_address(buf)
    ctypes.memmove(addr, b"hi", 2)
    assert buf[:2] == b"hi"
    with contextlib.suppress(BufferError):
        buf.extend(b"x")  # the probe export must be gone
    assert len(buf) == 17
