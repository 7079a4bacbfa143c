"""Per-vCPU CPUID policy for booting Linux: a pure function over KVM_GET_SUPPORTED_CPUID entries.

Topology presented to the guest: ``vcpu_count`` cores in one package, one thread per core, APIC id ==
x2APIC id == vCPU index.  Leaves that would describe host hardware the guest does not get (thermal/power,
PMU) are zeroed.  Works for Intel and AMD hosts (AMD: leaves 0x80000008/0x8000001D/0x8000001E).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable

from hypervisor.kvm_structs import KVM_CPUID_FLAG_SIGNIFCANT_INDEX, CpuidEntry

__all__ = ["CpuidEntry", "normalize_cpuid", "KVM_SIGNATURE", "find_entry"]

# leaf 0x1
LEAF1_EBX_APIC_ID_SHIFT = 24
LEAF1_EBX_LOGICAL_COUNT_SHIFT = 16
LEAF1_ECX_VMX = 1 << 5
LEAF1_ECX_X2APIC = 1 << 21
LEAF1_ECX_TSC_DEADLINE = 1 << 24
LEAF1_ECX_HYPERVISOR = 1 << 31
LEAF1_EDX_HTT = 1 << 28
# leaf 0x6
LEAF6_EAX_ARAT = 1 << 2  # always-running APIC timer: true of KVM's emulated LAPIC
# leaf 0x80000001
EXT1_ECX_SVM = 1 << 2
# leaf 0xB / 0x1F level types
TOPO_LEVEL_INVALID = 0
TOPO_LEVEL_SMT = 1
TOPO_LEVEL_CORE = 2

KVM_CPUID_SIGNATURE = 0x40000000
KVM_CPUID_FEATURES = 0x40000001
KVM_SIGNATURE = b"KVMKVMKVM\0\0\0"

# Leaves whose content is host hardware the guest does not get: zeroed.
_ZEROED_LEAVES = (
    0x0A,  # architectural PMU
    0x23,  # Intel architectural perfmon extensions
    0x80000022,  # AMD extended perfmon
)

_AMD_VENDORS = (b"AuthenticAMD", b"HygonGenuine")


def find_entry(entries: Iterable, function: int, index: int = 0):
    for e in entries:
        if e.function == function and e.index == index:
            return e
    return None


def _cache_sharing(eax: int, vcpu_count: int, cores_field: bool) -> int:
    """Leaf 4 / 0x8000001D EAX: L1/L2 private per core, L3 shared by the package."""
    level = (eax >> 5) & 0x7
    sharing = 0 if level <= 2 else min(vcpu_count - 1, 0xFFF)
    eax = (eax & ~(0xFFF << 14)) | (sharing << 14)
    if cores_field:  # leaf 4 only: EAX[31:26] = cores per package - 1
        eax = (eax & ~(0x3F << 26) & 0xFFFFFFFF) | (min(vcpu_count - 1, 0x3F) << 26)
    return eax & 0xFFFFFFFF


def _topology_leaf(function: int, vcpu_index: int, vcpu_count: int, flags: int) -> list[CpuidEntry]:
    """Leaf 0xB / 0x1F: subleaf 0 = SMT (1 thread), subleaf 1 = core (vcpu_count), subleaf 2 terminates."""
    flags |= KVM_CPUID_FLAG_SIGNIFCANT_INDEX
    core_shift = (vcpu_count - 1).bit_length()
    return [
        CpuidEntry(function, 0, flags, eax=0, ebx=1, ecx=(TOPO_LEVEL_SMT << 8) | 0, edx=vcpu_index),
        CpuidEntry(function, 1, flags, eax=core_shift, ebx=vcpu_count, ecx=(TOPO_LEVEL_CORE << 8) | 1, edx=vcpu_index),
        CpuidEntry(function, 2, flags, eax=0, ebx=0, ecx=(TOPO_LEVEL_INVALID << 8) | 2, edx=vcpu_index),
    ]


def normalize_cpuid(
    supported_entries: Iterable,
    vcpu_index: int,
    vcpu_count: int,
    *,
    tsc_deadline: bool = False,
    nested: bool = False,
) -> list[CpuidEntry]:
    """Return the CPUID table for vCPU ``vcpu_index`` of ``vcpu_count`` (input is not modified).

    ``supported_entries``: objects with function/index/flags/eax/ebx/ecx/edx (``Kvm.supported_cpuid()``).
    ``tsc_deadline``: the host has KVM_CAP_TSC_DEADLINE_TIMER (KVM does not list that bit in the supported
    CPUID); leaf 1 ECX[24] is set only if this is true or KVM already reported it.
    ``nested``: keep VMX/SVM if KVM offers them (default: hidden).
    Output is sorted by (function, index).
    """
    if not 1 <= vcpu_count <= 255:
        raise ValueError(f"vcpu_count must be 1..255 (8-bit xAPIC ids), got {vcpu_count}")
    if not 0 <= vcpu_index < vcpu_count:
        raise ValueError(f"vcpu_index must be in 0..{vcpu_count - 1}, got {vcpu_index}")

    entries = [CpuidEntry(e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx) for e in supported_entries]
    leaf0 = find_entry(entries, 0)
    max_basic = leaf0.eax if leaf0 else 0
    vendor = struct.pack("<III", leaf0.ebx, leaf0.edx, leaf0.ecx) if leaf0 else b""
    is_amd = vendor in _AMD_VENDORS
    present = {e.function for e in entries}

    out: list[CpuidEntry] = []
    for e in entries:
        fn = e.function
        if fn in (0xB, 0x1F) or KVM_CPUID_SIGNATURE <= fn <= 0x400000FF:
            continue  # regenerated below
        if fn == 0x1:
            e.ebx = (e.ebx & 0xFFFF) | (vcpu_count << LEAF1_EBX_LOGICAL_COUNT_SHIFT) | (
                vcpu_index << LEAF1_EBX_APIC_ID_SHIFT
            )
            e.ecx |= LEAF1_ECX_HYPERVISOR
            if tsc_deadline:
                e.ecx |= LEAF1_ECX_TSC_DEADLINE
            if not nested:
                e.ecx &= ~LEAF1_ECX_VMX
            e.edx = e.edx | LEAF1_EDX_HTT if vcpu_count > 1 else e.edx & ~LEAF1_EDX_HTT
        elif fn == 0x4:
            if e.eax & 0x1F:  # cache type 0 = no more caches
                e.eax = _cache_sharing(e.eax, vcpu_count, cores_field=True)
        elif fn == 0x6:
            e.eax &= LEAF6_EAX_ARAT
            e.ebx = e.ecx = e.edx = 0
        elif fn in _ZEROED_LEAVES:
            e.eax = e.ebx = e.ecx = e.edx = 0
        elif fn == 0x80000001:
            if not nested:
                e.ecx &= ~EXT1_ECX_SVM
        elif fn == 0x80000008 and is_amd:
            # ECX[7:0] NC = cores - 1, ECX[15:12] ApicIdCoreIdSize = bits of the core id in the APIC id
            core_bits = (vcpu_count - 1).bit_length()
            e.ecx = (e.ecx & ~0xF0FF) | (core_bits << 12) | (vcpu_count - 1)
        elif fn == 0x8000001D:
            if e.eax & 0x1F:
                e.eax = _cache_sharing(e.eax, vcpu_count, cores_field=False)
        elif fn == 0x8000001E:
            e.eax = vcpu_index  # extended APIC id
            e.ebx = vcpu_index & 0xFF  # core id; EBX[15:8] threads per core - 1 = 0
            e.ecx = 0  # node 0; EBX[10:8] nodes per package - 1 = 0
            e.edx = 0
        out.append(e)

    if max_basic >= 0xB:
        old = find_entry(entries, 0xB)
        out += _topology_leaf(0xB, vcpu_index, vcpu_count, old.flags if old else 0)
    if max_basic >= 0x1F and 0x1F in present:
        out += _topology_leaf(0x1F, vcpu_index, vcpu_count, find_entry(entries, 0x1F).flags)

    kvm_leaves = [e for e in entries if KVM_CPUID_SIGNATURE < e.function <= 0x400000FF]
    features = find_entry(entries, KVM_CPUID_FEATURES)
    max_kvm = max([KVM_CPUID_FEATURES, *(e.function for e in kvm_leaves)])
    ebx, ecx, edx = struct.unpack("<III", KVM_SIGNATURE)
    out.append(CpuidEntry(KVM_CPUID_SIGNATURE, 0, 0, max_kvm, ebx, ecx, edx))
    if features is None:
        out.append(CpuidEntry(KVM_CPUID_FEATURES))
    out += [e for e in kvm_leaves if e.function <= max_kvm]

    out.sort(key=lambda e: (e.function, e.index))
    return out
