"""KVM userspace ABI for x86_64: ctypes structs, ioctl numbers, capabilities and exit reasons.

Everything here mirrors ``<linux/kvm.h>`` / ``<asm/kvm.h>`` and is pure data: no file descriptors are
opened by importing this module.  Struct sizes are asserted against the kernel ABI in
``tests/unit/test_kvm_bindings.py``; ioctl numbers are computed from the ctypes struct sizes exactly
like the C ``_IOR``/``_IOW`` macros do.
"""

from __future__ import annotations

import ctypes
import functools

u8, u16, u32, u64, s32, s64 = (
    ctypes.c_uint8,
    ctypes.c_uint16,
    ctypes.c_uint32,
    ctypes.c_uint64,
    ctypes.c_int32,
    ctypes.c_int64,
)

# --------------------------------------------------------------------------- ioctl number helpers

_IOC_NRSHIFT = 0
_IOC_TYPESHIFT = 8
_IOC_SIZESHIFT = 16
_IOC_DIRSHIFT = 30
_IOC_SIZEMASK = (1 << 14) - 1

_IOC_NONE = 0
_IOC_WRITE = 1
_IOC_READ = 2

KVMIO = 0xAE


def _size(struct_or_size) -> int:
    return struct_or_size if isinstance(struct_or_size, int) else ctypes.sizeof(struct_or_size)


def _IOC(direction: int, type_: int, nr: int, size: int) -> int:
    if not 0 <= size <= _IOC_SIZEMASK:
        raise ValueError(f"ioctl argument size {size} does not fit in 14 bits")
    return (direction << _IOC_DIRSHIFT) | (type_ << _IOC_TYPESHIFT) | (nr << _IOC_NRSHIFT) | (size << _IOC_SIZESHIFT)


def _IO(type_: int, nr: int) -> int:
    return _IOC(_IOC_NONE, type_, nr, 0)


def _IOR(type_: int, nr: int, struct) -> int:
    return _IOC(_IOC_READ, type_, nr, _size(struct))


def _IOW(type_: int, nr: int, struct) -> int:
    return _IOC(_IOC_WRITE, type_, nr, _size(struct))


def _IOWR(type_: int, nr: int, struct) -> int:
    return _IOC(_IOC_READ | _IOC_WRITE, type_, nr, _size(struct))


# --------------------------------------------------------------------------- structs


def _same(ctype, names: str) -> list[tuple[str, type]]:
    """Fields of one type from a space-separated list of names."""
    return [(name, ctype) for name in names.split()]


class _Struct(ctypes.Structure):
    def __repr__(self) -> str:
        shown = (name for name, *_ in self._fields_ if not name.startswith("pad"))
        return f"{type(self).__name__}({', '.join(f'{name}={getattr(self, name)!r}' for name in shown)})"


class kvm_userspace_memory_region(_Struct):
    _fields_ = [("slot", u32), ("flags", u32), ("guest_phys_addr", u64), ("memory_size", u64), ("userspace_addr", u64)]


class kvm_regs(_Struct):
    _fields_ = _same(u64, "rax rbx rcx rdx rsi rdi rsp rbp r8 r9 r10 r11 r12 r13 r14 r15 rip rflags")


class kvm_segment(_Struct):
    _fields_ = [
        ("base", u64),
        ("limit", u32),
        ("selector", u16),
        ("type", u8),
        ("present", u8),
        ("dpl", u8),
        ("db", u8),
        ("s", u8),
        ("l", u8),
        ("g", u8),
        ("avl", u8),
        ("unusable", u8),
        ("padding", u8),
    ]


class kvm_dtable(_Struct):
    _fields_ = [("base", u64), ("limit", u16), ("padding", u16 * 3)]


KVM_NR_INTERRUPTS = 256


class kvm_sregs(_Struct):
    _fields_ = [
        *_same(kvm_segment, "cs ds es fs gs ss tr ldt"),
        ("gdt", kvm_dtable),
        ("idt", kvm_dtable),
        *_same(u64, "cr0 cr2 cr3 cr4 cr8 efer apic_base"),
        ("interrupt_bitmap", u64 * ((KVM_NR_INTERRUPTS + 63) // 64)),
    ]


class kvm_fpu(_Struct):
    _fields_ = [
        ("fpr", (u8 * 16) * 8),
        ("fcw", u16),
        ("fsw", u16),
        ("ftwx", u8),
        ("pad1", u8),
        ("last_opcode", u16),
        ("last_ip", u64),
        ("last_dp", u64),
        ("xmm", (u8 * 16) * 16),
        ("mxcsr", u32),
        ("pad2", u32),
    ]


class kvm_msr_entry(_Struct):
    _fields_ = [("index", u32), ("reserved", u32), ("data", u64)]


class kvm_msrs(_Struct):
    """Header only (flexible array follows); use :func:`make_kvm_msrs` for a sized instance."""

    _fields_ = [("nmsrs", u32), ("pad", u32)]


class kvm_msr_list(_Struct):
    _fields_ = [("nmsrs", u32)]


class kvm_cpuid_entry2(_Struct):
    _fields_ = [
        ("function", u32),
        ("index", u32),
        ("flags", u32),
        ("eax", u32),
        ("ebx", u32),
        ("ecx", u32),
        ("edx", u32),
        ("padding", u32 * 3),
    ]


class kvm_cpuid2(_Struct):
    _fields_ = [("nent", u32), ("padding", u32)]


@functools.lru_cache(maxsize=64)
def make_kvm_msrs_type(n: int) -> type[ctypes.Structure]:
    fields = [("nmsrs", u32), ("pad", u32), ("entries", kvm_msr_entry * n)]
    return type(f"kvm_msrs_{n}", (_Struct,), {"_fields_": fields})


@functools.lru_cache(maxsize=64)
def make_kvm_msr_list_type(n: int) -> type[ctypes.Structure]:
    return type(f"kvm_msr_list_{n}", (_Struct,), {"_fields_": [("nmsrs", u32), ("indices", u32 * n)]})


@functools.lru_cache(maxsize=64)
def make_kvm_cpuid2_type(n: int) -> type[ctypes.Structure]:
    fields = [("nent", u32), ("padding", u32), ("entries", kvm_cpuid_entry2 * n)]
    return type(f"kvm_cpuid2_{n}", (_Struct,), {"_fields_": fields})


def make_kvm_msrs(n: int):
    msrs = make_kvm_msrs_type(n)()
    msrs.nmsrs = n
    return msrs


def make_kvm_msr_list(n: int):
    lst = make_kvm_msr_list_type(n)()
    lst.nmsrs = n
    return lst


def make_kvm_cpuid2(n: int):
    cpuid = make_kvm_cpuid2_type(n)()
    cpuid.nent = n
    return cpuid


KVM_APIC_REG_SIZE = 0x400


class kvm_lapic_state(_Struct):
    _fields_ = [("regs", u8 * KVM_APIC_REG_SIZE)]


class kvm_pit_config(_Struct):
    _fields_ = [("flags", u32), ("pad", u32 * 15)]


class kvm_irq_level(_Struct):
    _fields_ = [("irq", u32), ("level", u32)]  # ``irq`` aliases the s32 ``status`` of KVM_IRQ_LINE_STATUS


class kvm_irqfd(_Struct):
    _fields_ = [("fd", u32), ("gsi", u32), ("flags", u32), ("resamplefd", u32), ("pad", u8 * 16)]


class kvm_ioeventfd(_Struct):
    _fields_ = [("datamatch", u64), ("addr", u64), ("len", u32), ("fd", s32), ("flags", u32), ("pad", u8 * 36)]


class kvm_enable_cap(_Struct):
    _fields_ = [("cap", u32), ("flags", u32), ("args", u64 * 4), ("pad", u8 * 64)]


# --------------------------------------------------------------------------- struct kvm_run


class kvm_run_io(_Struct):
    _fields_ = [("direction", u8), ("size", u8), ("port", u16), ("count", u32), ("data_offset", u64)]


class kvm_run_mmio(_Struct):
    _fields_ = [("phys_addr", u64), ("data", u8 * 8), ("len", u32), ("is_write", u8)]


class kvm_run_hw(_Struct):
    _fields_ = [("hardware_exit_reason", u64)]


class kvm_run_fail_entry(_Struct):
    _fields_ = [("hardware_entry_failure_reason", u64), ("cpu", u32)]


class kvm_run_ex(_Struct):
    _fields_ = [("exception", u32), ("error_code", u32)]


class kvm_run_internal(_Struct):
    _fields_ = [("suberror", u32), ("ndata", u32), ("data", u64 * 16)]


class _system_event_data(ctypes.Union):
    _fields_ = [("flags", u64), ("data", u64 * 16)]


class kvm_run_system_event(_Struct):
    _anonymous_ = ("_u",)
    _fields_ = [("type", u32), ("ndata", u32), ("_u", _system_event_data)]


class kvm_run_exit_union(ctypes.Union):
    _fields_ = [
        ("hw", kvm_run_hw),
        ("fail_entry", kvm_run_fail_entry),
        ("ex", kvm_run_ex),
        ("io", kvm_run_io),
        ("mmio", kvm_run_mmio),
        ("internal", kvm_run_internal),
        ("system_event", kvm_run_system_event),
        ("padding", u8 * 256),
    ]


SYNC_REGS_SIZE_BYTES = 2048


class kvm_run(_Struct):
    """``struct kvm_run``; the exit union members are reachable directly (``run.io.port``)."""

    _anonymous_ = ("_exit",)
    _fields_ = [
        ("request_interrupt_window", u8),
        ("immediate_exit", u8),
        ("padding1", u8 * 6),
        ("exit_reason", u32),
        ("ready_for_interrupt_injection", u8),
        ("if_flag", u8),
        ("flags", u16),
        ("cr8", u64),
        ("apic_base", u64),
        ("_exit", kvm_run_exit_union),
        ("kvm_valid_regs", u64),
        ("kvm_dirty_regs", u64),
        ("s", u8 * SYNC_REGS_SIZE_BYTES),
    ]


# --------------------------------------------------------------------------- ioctl numbers

# Structs only snapshot/restore uses are in kvm_snapshot_structs, built on first use (see __getattr__ at the end);
# their ioctls give the ABI size as a number, which tests/unit/test_kvm_bindings.py pins.
XSAVE_LEGACY_SIZE = 4096  # sizeof(struct kvm_xsave)

# /dev/kvm
KVM_GET_API_VERSION = _IO(KVMIO, 0x00)
KVM_CREATE_VM = _IO(KVMIO, 0x01)
KVM_GET_MSR_INDEX_LIST = _IOWR(KVMIO, 0x02, kvm_msr_list)
KVM_CHECK_EXTENSION = _IO(KVMIO, 0x03)
KVM_GET_VCPU_MMAP_SIZE = _IO(KVMIO, 0x04)
KVM_GET_SUPPORTED_CPUID = _IOWR(KVMIO, 0x05, kvm_cpuid2)
KVM_GET_EMULATED_CPUID = _IOWR(KVMIO, 0x09, kvm_cpuid2)
KVM_GET_MSR_FEATURE_INDEX_LIST = _IOWR(KVMIO, 0x0A, kvm_msr_list)

# VM fd
KVM_CREATE_VCPU = _IO(KVMIO, 0x41)
KVM_SET_USER_MEMORY_REGION = _IOW(KVMIO, 0x46, kvm_userspace_memory_region)
KVM_SET_TSS_ADDR = _IO(KVMIO, 0x47)
KVM_SET_IDENTITY_MAP_ADDR = _IOW(KVMIO, 0x48, u64)
KVM_CREATE_IRQCHIP = _IO(KVMIO, 0x60)
KVM_IRQ_LINE = _IOW(KVMIO, 0x61, kvm_irq_level)
KVM_GET_IRQCHIP = _IOWR(KVMIO, 0x62, 520)  # kvm_irqchip
KVM_SET_IRQCHIP = _IOR(KVMIO, 0x63, 520)  # kvm_irqchip; sic: the kernel defines it as _IOR
KVM_IRQ_LINE_STATUS = _IOWR(KVMIO, 0x67, kvm_irq_level)
KVM_IRQFD = _IOW(KVMIO, 0x76, kvm_irqfd)
KVM_CREATE_PIT2 = _IOW(KVMIO, 0x77, kvm_pit_config)
KVM_IOEVENTFD = _IOW(KVMIO, 0x79, kvm_ioeventfd)
KVM_SET_CLOCK = _IOW(KVMIO, 0x7B, 48)  # kvm_clock_data
KVM_GET_CLOCK = _IOR(KVMIO, 0x7C, 48)
KVM_GET_PIT2 = _IOR(KVMIO, 0x9F, 112)  # kvm_pit_state2
KVM_SET_PIT2 = _IOW(KVMIO, 0xA0, 112)
KVM_ENABLE_CAP = _IOW(KVMIO, 0xA3, kvm_enable_cap)

# vCPU fd
KVM_RUN = _IO(KVMIO, 0x80)
KVM_GET_REGS = _IOR(KVMIO, 0x81, kvm_regs)
KVM_SET_REGS = _IOW(KVMIO, 0x82, kvm_regs)
KVM_GET_SREGS = _IOR(KVMIO, 0x83, kvm_sregs)
KVM_SET_SREGS = _IOW(KVMIO, 0x84, kvm_sregs)
KVM_GET_MSRS = _IOWR(KVMIO, 0x88, kvm_msrs)
KVM_SET_MSRS = _IOW(KVMIO, 0x89, kvm_msrs)
KVM_GET_FPU = _IOR(KVMIO, 0x8C, kvm_fpu)
KVM_SET_FPU = _IOW(KVMIO, 0x8D, kvm_fpu)
KVM_GET_LAPIC = _IOR(KVMIO, 0x8E, kvm_lapic_state)
KVM_SET_LAPIC = _IOW(KVMIO, 0x8F, kvm_lapic_state)
KVM_SET_CPUID2 = _IOW(KVMIO, 0x90, kvm_cpuid2)
KVM_GET_CPUID2 = _IOWR(KVMIO, 0x91, kvm_cpuid2)
KVM_GET_MP_STATE = _IOR(KVMIO, 0x98, 4)  # kvm_mp_state
KVM_SET_MP_STATE = _IOW(KVMIO, 0x99, 4)
KVM_GET_VCPU_EVENTS = _IOR(KVMIO, 0x9F, 64)  # kvm_vcpu_events
KVM_SET_VCPU_EVENTS = _IOW(KVMIO, 0xA0, 64)
KVM_GET_DEBUGREGS = _IOR(KVMIO, 0xA1, 128)  # kvm_debugregs
KVM_SET_DEBUGREGS = _IOW(KVMIO, 0xA2, 128)
KVM_SET_TSC_KHZ = _IO(KVMIO, 0xA2)
KVM_GET_TSC_KHZ = _IO(KVMIO, 0xA3)
KVM_GET_XSAVE = _IOR(KVMIO, 0xA4, XSAVE_LEGACY_SIZE)  # kvm_xsave
KVM_SET_XSAVE = _IOW(KVMIO, 0xA5, XSAVE_LEGACY_SIZE)
KVM_GET_XCRS = _IOR(KVMIO, 0xA6, 392)  # kvm_xcrs
KVM_SET_XCRS = _IOW(KVMIO, 0xA7, 392)
KVM_KVMCLOCK_CTRL = _IO(KVMIO, 0xAD)
KVM_GET_XSAVE2 = _IOR(KVMIO, 0xCF, XSAVE_LEGACY_SIZE)

IOCTL_NAMES: dict[int, str] = {
    value: name
    for name, value in list(globals().items())
    if name.startswith("KVM_") and isinstance(value, int) and (value >> _IOC_TYPESHIFT) & 0xFF == KVMIO
}

# --------------------------------------------------------------------------- capabilities

KVM_API_VERSION = 12

KVM_CAP_IRQCHIP = 0
KVM_CAP_HLT = 1
KVM_CAP_USER_MEMORY = 3
KVM_CAP_SET_TSS_ADDR = 4
KVM_CAP_EXT_CPUID = 7
KVM_CAP_CLOCKSOURCE = 8
KVM_CAP_NR_VCPUS = 9
KVM_CAP_NOP_IO_DELAY = 12
KVM_CAP_MP_STATE = 14
KVM_CAP_COALESCED_MMIO = 15
KVM_CAP_SYNC_MMU = 16
KVM_CAP_IRQ_ROUTING = 25
KVM_CAP_IRQ_INJECT_STATUS = 26
KVM_CAP_IRQFD = 32
KVM_CAP_PIT2 = 33
KVM_CAP_PIT_STATE2 = 35
KVM_CAP_IOEVENTFD = 36
KVM_CAP_SET_IDENTITY_MAP_ADDR = 37
KVM_CAP_ADJUST_CLOCK = 39
KVM_CAP_VCPU_EVENTS = 41
KVM_CAP_DEBUGREGS = 50
KVM_CAP_XSAVE = 55
KVM_CAP_XCRS = 56
KVM_CAP_TSC_CONTROL = 60
KVM_CAP_GET_TSC_KHZ = 61
KVM_CAP_MAX_VCPUS = 66
KVM_CAP_TSC_DEADLINE_TIMER = 72
KVM_CAP_KVMCLOCK_CTRL = 76
KVM_CAP_SIGNAL_MSI = 77
KVM_CAP_READONLY_MEM = 81
KVM_CAP_SPLIT_IRQCHIP = 121
KVM_CAP_IOEVENTFD_ANY_LENGTH = 122
KVM_CAP_MAX_VCPU_ID = 128
KVM_CAP_X2APIC_API = 129
KVM_CAP_IMMEDIATE_EXIT = 136
KVM_CAP_X86_DISABLE_EXITS = 143
KVM_CAP_GET_MSR_FEATURES = 153
KVM_CAP_EXCEPTION_PAYLOAD = 164
KVM_CAP_XSAVE2 = 208
KVM_CAP_SYSTEM_EVENT_DATA = 215

# --------------------------------------------------------------------------- flags / misc constants

KVM_MEM_LOG_DIRTY_PAGES = 1 << 0
KVM_MEM_READONLY = 1 << 1

KVM_PIT_SPEAKER_DUMMY = 1

KVM_IRQCHIP_PIC_MASTER = 0
KVM_IRQCHIP_PIC_SLAVE = 1
KVM_IRQCHIP_IOAPIC = 2

KVM_IRQFD_FLAG_DEASSIGN = 1 << 0
KVM_IRQFD_FLAG_RESAMPLE = 1 << 1

KVM_IOEVENTFD_FLAG_DATAMATCH = 1 << 0
KVM_IOEVENTFD_FLAG_PIO = 1 << 1
KVM_IOEVENTFD_FLAG_DEASSIGN = 1 << 2

KVM_CLOCK_TSC_STABLE = 2
KVM_CLOCK_REALTIME = 1 << 2
KVM_CLOCK_HOST_TSC = 1 << 3

KVM_CPUID_FLAG_SIGNIFCANT_INDEX = 1 << 0
KVM_CPUID_FLAG_SIGNIFICANT_INDEX = KVM_CPUID_FLAG_SIGNIFCANT_INDEX  # the kernel's spelling is above

KVM_MP_STATE_RUNNABLE = 0
KVM_MP_STATE_UNINITIALIZED = 1
KVM_MP_STATE_INIT_RECEIVED = 2
KVM_MP_STATE_HALTED = 3
KVM_MP_STATE_SIPI_RECEIVED = 4

KVM_VCPUEVENT_VALID_NMI_PENDING = 0x01
KVM_VCPUEVENT_VALID_SIPI_VECTOR = 0x02
KVM_VCPUEVENT_VALID_SHADOW = 0x04
KVM_VCPUEVENT_VALID_SMM = 0x08
KVM_VCPUEVENT_VALID_PAYLOAD = 0x10
KVM_VCPUEVENT_VALID_TRIPLE_FAULT = 0x20

KVM_MAX_CPUID_ENTRIES = 256  # KVM_SET_CPUID2 rejects more with E2BIG

# --------------------------------------------------------------------------- exit reasons

KVM_EXIT_UNKNOWN = 0
KVM_EXIT_EXCEPTION = 1
KVM_EXIT_IO = 2
KVM_EXIT_HYPERCALL = 3
KVM_EXIT_DEBUG = 4
KVM_EXIT_HLT = 5
KVM_EXIT_MMIO = 6
KVM_EXIT_IRQ_WINDOW_OPEN = 7
KVM_EXIT_SHUTDOWN = 8
KVM_EXIT_FAIL_ENTRY = 9
KVM_EXIT_INTR = 10
KVM_EXIT_SET_TPR = 11
KVM_EXIT_TPR_ACCESS = 12
KVM_EXIT_NMI = 16
KVM_EXIT_INTERNAL_ERROR = 17
KVM_EXIT_SYSTEM_EVENT = 24
KVM_EXIT_IOAPIC_EOI = 26
KVM_EXIT_HYPERV = 27
KVM_EXIT_X86_RDMSR = 29
KVM_EXIT_X86_WRMSR = 30
KVM_EXIT_DIRTY_RING_FULL = 31
KVM_EXIT_AP_RESET_HOLD = 32
KVM_EXIT_X86_BUS_LOCK = 33
KVM_EXIT_XEN = 34
KVM_EXIT_NOTIFY = 37

EXIT_REASON_NAMES: dict[int, str] = {
    value: name[len("KVM_EXIT_") :]
    for name, value in list(globals().items())
    if name.startswith("KVM_EXIT_") and isinstance(value, int)
}


def exit_reason_name(reason: int) -> str:
    return EXIT_REASON_NAMES.get(reason, f"UNKNOWN_EXIT_{reason}")


KVM_EXIT_IO_IN = 0
KVM_EXIT_IO_OUT = 1

KVM_SYSTEM_EVENT_SHUTDOWN = 1
KVM_SYSTEM_EVENT_RESET = 2
KVM_SYSTEM_EVENT_CRASH = 3
KVM_SYSTEM_EVENT_WAKEUP = 4
KVM_SYSTEM_EVENT_SUSPEND = 5
KVM_SYSTEM_EVENT_SEV_TERM = 6

KVM_INTERNAL_ERROR_EMULATION = 1
KVM_INTERNAL_ERROR_SIMUL_EX = 2
KVM_INTERNAL_ERROR_DELIVERY_EV = 3
KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON = 4

# --------------------------------------------------------------------------- plain CPUID entry


class CpuidEntry:
    """One CPUID leaf/subleaf, decoupled from ctypes so CPUID policy code is pure and unit-testable."""

    __slots__ = ("function", "index", "flags", "eax", "ebx", "ecx", "edx")

    def __init__(self, function: int, index: int = 0, flags: int = 0, eax: int = 0, ebx: int = 0, ecx: int = 0,
                 edx: int = 0):
        self.function, self.index, self.flags = function, index, flags
        self.eax, self.ebx, self.ecx, self.edx = eax, ebx, ecx, edx

    def _values(self) -> tuple[int, ...]:
        return self.function, self.index, self.flags, self.eax, self.ebx, self.ecx, self.edx

    def __eq__(self, other) -> bool:
        return self._values() == other._values() if isinstance(other, CpuidEntry) else NotImplemented

    __hash__ = None  # mutable, like the dataclass it replaces

    def __repr__(self) -> str:
        return ("CpuidEntry(function={:#x}, index={}, flags={}, eax={:#x}, ebx={:#x}, ecx={:#x}, edx={:#x})"
                .format(*self._values()))

    @classmethod
    def from_struct(cls, e) -> CpuidEntry:
        return cls(e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx)

    def to_struct(self, out: kvm_cpuid_entry2 | None = None) -> kvm_cpuid_entry2:
        out = kvm_cpuid_entry2() if out is None else out
        out.function, out.index, out.flags = self.function, self.index, self.flags
        out.eax, out.ebx, out.ecx, out.edx = self.eax, self.ebx, self.ecx, self.edx
        return out
