"""The MSR values every vCPU gets before booting Linux (64-bit boot protocol, no firmware)."""

from __future__ import annotations

MSR_IA32_TSC = 0x10
MSR_IA32_SYSENTER_CS = 0x174
MSR_IA32_SYSENTER_ESP = 0x175
MSR_IA32_SYSENTER_EIP = 0x176
MSR_IA32_MISC_ENABLE = 0x1A0
MSR_MTRR_DEF_TYPE = 0x2FF
MSR_EFER = 0xC0000080
MSR_STAR = 0xC0000081
MSR_LSTAR = 0xC0000082
MSR_CSTAR = 0xC0000083
MSR_SYSCALL_MASK = 0xC0000084
MSR_KERNEL_GS_BASE = 0xC0000102

MSR_IA32_MISC_ENABLE_FAST_STRING = 1 << 0
MTRR_DEF_TYPE_ENABLE = 1 << 11  # MTRRs enabled (E); fixed-range MTRRs (FE, bit 10) left off
MTRR_TYPE_WRBACK = 6
MTRR_DEF_TYPE_BOOT = MTRR_DEF_TYPE_ENABLE | MTRR_TYPE_WRBACK  # all memory write-back by default

MSR_NAMES: dict[int, str] = {
    MSR_IA32_TSC: "IA32_TSC",
    MSR_IA32_SYSENTER_CS: "IA32_SYSENTER_CS",
    MSR_IA32_SYSENTER_ESP: "IA32_SYSENTER_ESP",
    MSR_IA32_SYSENTER_EIP: "IA32_SYSENTER_EIP",
    MSR_IA32_MISC_ENABLE: "IA32_MISC_ENABLE",
    MSR_MTRR_DEF_TYPE: "MTRRdefType",
    MSR_EFER: "EFER",
    MSR_STAR: "STAR",
    MSR_LSTAR: "LSTAR",
    MSR_CSTAR: "CSTAR",
    MSR_SYSCALL_MASK: "SYSCALL_MASK",
    MSR_KERNEL_GS_BASE: "KERNEL_GS_BASE",
}


def msr_name(index: int) -> str:
    return MSR_NAMES.get(index, f"MSR 0x{index:x}")


def boot_msrs() -> dict[int, int]:
    """A fresh dict {msr index: value} for ``Vcpu.set_msrs`` before the first KVM_RUN.

    MTRRdefType is not in KVM_GET_MSR_INDEX_LIST on every kernel but KVM always emulates it, so do not
    filter this set by that list.
    """
    return {
        MSR_IA32_SYSENTER_CS: 0,
        MSR_IA32_SYSENTER_ESP: 0,
        MSR_IA32_SYSENTER_EIP: 0,
        MSR_STAR: 0,
        MSR_LSTAR: 0,
        MSR_CSTAR: 0,
        MSR_KERNEL_GS_BASE: 0,
        MSR_SYSCALL_MASK: 0,
        MSR_IA32_TSC: 0,
        MSR_IA32_MISC_ENABLE: MSR_IA32_MISC_ENABLE_FAST_STRING,
        MSR_MTRR_DEF_TYPE: MTRR_DEF_TYPE_BOOT,
    }
