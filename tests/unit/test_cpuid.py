"""Pure unit tests of the per-vCPU CPUID policy and the boot MSR set (no /dev/kvm needed)."""

from __future__ import annotations

import copy
import struct

import pytest

from hypervisor import msrs
from hypervisor.cpuid import KVM_SIGNATURE, find_entry, normalize_cpuid
from hypervisor.kvm_structs import KVM_CPUID_FLAG_SIGNIFCANT_INDEX, CpuidEntry

SIG = KVM_CPUID_FLAG_SIGNIFCANT_INDEX


def vendor_leaf(max_basic: int, vendor: bytes) -> CpuidEntry:
    ebx, edx, ecx = struct.unpack("<III", vendor)
    return CpuidEntry(0, 0, 0, max_basic, ebx, ecx, edx)


def intel_table() -> list[CpuidEntry]:
    return [
        vendor_leaf(0x1F, b"GenuineIntel"),
        CpuidEntry(1, 0, 0, eax=0x000906EA, ebx=0x00FF0800 | (7 << 24), ecx=0x7FFAFBFF & ~(1 << 24), edx=0xBFEBFBFF),
        # leaf 4: L1d, L1i, L2, L3, terminator (host says 8 cores / 16 threads)
        CpuidEntry(4, 0, SIG, eax=0x1C004121, ebx=0x01C0003F, ecx=0x3F),
        CpuidEntry(4, 1, SIG, eax=0x1C004122, ebx=0x01C0003F, ecx=0x3F),
        CpuidEntry(4, 2, SIG, eax=0x1C004143, ebx=0x00C0003F, ecx=0x3FF),
        CpuidEntry(4, 3, SIG, eax=0x1C03C163, ebx=0x03C0003F, ecx=0x3FFF, edx=6),
        CpuidEntry(4, 4, SIG),
        CpuidEntry(6, 0, 0, eax=0x77, ebx=0x2, ecx=0x9, edx=0),
        CpuidEntry(0xA, 0, 0, eax=0x07300404, ebx=0, ecx=0, edx=0x603),
        CpuidEntry(0xB, 0, SIG, eax=1, ebx=2, ecx=0x100, edx=14),
        CpuidEntry(0xB, 1, SIG, eax=4, ebx=16, ecx=0x201, edx=14),
        CpuidEntry(0x1F, 0, SIG, eax=1, ebx=2, ecx=0x100, edx=14),
        CpuidEntry(0x40000000, 0, 0, eax=0x40000001, ebx=0x4B4D564B, ecx=0x564B4D56, edx=0x4D),
        CpuidEntry(0x40000001, 0, 0, eax=0x01007EFB),
        CpuidEntry(0x80000000, 0, 0, eax=0x80000008),
        CpuidEntry(0x80000001, 0, 0, ecx=0x121 | (1 << 2), edx=0x2C100800),
        CpuidEntry(0x80000008, 0, 0, eax=0x3027, ecx=0),
    ]


def amd_table() -> list[CpuidEntry]:
    return [
        vendor_leaf(0x10, b"AuthenticAMD"),
        CpuidEntry(1, 0, 0, eax=0x00A00F11, ebx=0x00400800 | (5 << 24), ecx=0xFED83203, edx=0x178BFBFF),
        CpuidEntry(4, 0, SIG),  # AMD: reserved
        CpuidEntry(0xB, 0, SIG),
        CpuidEntry(0x40000000, 0, 0, eax=0x40000001),
        CpuidEntry(0x40000001, 0, 0, eax=0x01007EFB),
        CpuidEntry(0x80000000, 0, 0, eax=0x80000022),
        CpuidEntry(0x80000001, 0, 0, ecx=0x75C237FF, edx=0x2FD3FBFF),
        CpuidEntry(0x80000008, 0, 0, eax=0x3030, ebx=0x0, ecx=0x0000703F),
        CpuidEntry(0x8000001D, 0, SIG, eax=0x00004121, ebx=0x01C0003F, ecx=0x3F),
        CpuidEntry(0x8000001D, 1, SIG, eax=0x00004122, ebx=0x01C0003F, ecx=0x3F),
        CpuidEntry(0x8000001D, 2, SIG, eax=0x00004143, ebx=0x01C0003F, ecx=0x3FF, edx=2),
        CpuidEntry(0x8000001D, 3, SIG, eax=0x0003C163, ebx=0x03C0003F, ecx=0x7FFF, edx=1),
        CpuidEntry(0x8000001D, 4, SIG),
        CpuidEntry(0x8000001E, 0, 0, eax=0x0B, ebx=0x0105, ecx=0x0100, edx=0),
        CpuidEntry(0x80000022, 0, 0, eax=0x7, ebx=0x1016),
    ]


def get(entries, function, index=0) -> CpuidEntry:
    e = find_entry(entries, function, index)
    assert e is not None, f"leaf {function:#x}.{index} missing"
    return e


# ------------------------------------------------------------------------------------------ leaf 1


@pytest.mark.parametrize("index,count", [(0, 1), (0, 4), (3, 4), (200, 255)])
def test_leaf1_apic_id_and_logical_count(index, count):
    out = normalize_cpuid(intel_table(), index, count)
    leaf1 = get(out, 1)
    assert leaf1.ebx >> 24 == index
    assert (leaf1.ebx >> 16) & 0xFF == count
    assert leaf1.ebx & 0xFFFF == 0x0800  # CLFLUSH size etc. preserved
    assert leaf1.ecx & (1 << 31), "hypervisor bit"
    assert bool(leaf1.edx & (1 << 28)) == (count > 1), "HTT only for multi-vCPU"
    assert leaf1.eax == 0x000906EA


def test_tsc_deadline_only_if_supported():
    assert not get(normalize_cpuid(intel_table(), 0, 1), 1).ecx & (1 << 24)
    assert get(normalize_cpuid(intel_table(), 0, 1, tsc_deadline=True), 1).ecx & (1 << 24)
    reported = intel_table()
    reported[1].ecx |= 1 << 24  # KVM listed it itself
    assert get(normalize_cpuid(reported, 0, 1), 1).ecx & (1 << 24)


def test_nested_virt_hidden_by_default():
    table = intel_table()
    table[1].ecx |= 1 << 5
    out = normalize_cpuid(table, 0, 2)
    assert not get(out, 1).ecx & (1 << 5)
    assert not get(out, 0x80000001).ecx & (1 << 2)
    kept = normalize_cpuid(table, 0, 2, nested=True)
    assert get(kept, 1).ecx & (1 << 5)
    assert get(kept, 0x80000001).ecx & (1 << 2)


def test_input_not_mutated_and_output_sorted_unique():
    table = intel_table()
    before = copy.deepcopy(table)
    out = normalize_cpuid(table, 1, 2)
    assert table == before
    keys = [(e.function, e.index) for e in out]
    assert keys == sorted(keys)
    assert len(keys) == len(set(keys))
    assert all(isinstance(e, CpuidEntry) for e in out)


@pytest.mark.parametrize("index,count", [(0, 0), (1, 1), (-1, 2), (0, 256)])
def test_bad_topology_rejected(index, count):
    with pytest.raises(ValueError):
        normalize_cpuid(intel_table(), index, count)


def test_accepts_ctypes_entries():
    from hypervisor.kvm_structs import kvm_cpuid_entry2

    structs = [e.to_struct() for e in intel_table()]
    assert isinstance(structs[0], kvm_cpuid_entry2)
    assert normalize_cpuid(structs, 1, 2) == normalize_cpuid(intel_table(), 1, 2)


# ------------------------------------------------------------------------------------------ topology


@pytest.mark.parametrize("count,shift", [(1, 0), (2, 1), (3, 2), (4, 2), (5, 3), (8, 3), (9, 4)])
def test_leaf_0xb_topology(count, shift):
    index = count - 1
    out = normalize_cpuid(intel_table(), index, count)
    smt, core, end = get(out, 0xB, 0), get(out, 0xB, 1), get(out, 0xB, 2)
    assert (smt.eax & 0x1F, smt.ebx & 0xFFFF, smt.ecx, smt.edx) == (0, 1, 0x100, index)
    assert (core.eax & 0x1F, core.ebx & 0xFFFF, core.ecx, core.edx) == (shift, count, 0x201, index)
    assert (end.eax, end.ebx, end.ecx & 0xFF00, end.ecx & 0xFF, end.edx) == (0, 0, 0, 2, index)
    assert all(e.flags & SIG for e in (smt, core, end))
    assert len([e for e in out if e.function == 0xB]) == 3
    # 0x1F was offered by KVM, so it mirrors 0xB
    assert [(e.index, e.eax, e.ebx, e.ecx, e.edx) for e in out if e.function == 0x1F] == [
        (e.index, e.eax, e.ebx, e.ecx, e.edx) for e in out if e.function == 0xB
    ]


def test_leaf_0x1f_not_invented_and_0xb_needs_max_leaf():
    out = normalize_cpuid(amd_table(), 0, 2)
    assert not [e for e in out if e.function == 0x1F]
    assert get(out, 0xB, 1).ebx == 2
    low = [vendor_leaf(0xA, b"GenuineIntel"), CpuidEntry(1)]
    assert not [e for e in normalize_cpuid(low, 0, 2) if e.function == 0xB]


def test_leaf4_cache_topology():
    out = normalize_cpuid(intel_table(), 2, 4)
    for sub in range(4):
        eax = get(out, 4, sub).eax
        level = (eax >> 5) & 7
        assert eax >> 26 == 3, "cores per package - 1"
        assert (eax >> 14) & 0xFFF == (3 if level == 3 else 0)
        assert eax & 0x3FFF == get(intel_table(), 4, sub).eax & 0x3FFF  # type/level/flags kept
    assert get(out, 4, 4).eax == 0, "terminator untouched"


def test_amd_topology_leaves():
    out = normalize_cpuid(amd_table(), 2, 3)
    ext8 = get(out, 0x80000008)
    assert ext8.ecx & 0xFF == 2, "NC = cores - 1"
    assert (ext8.ecx >> 12) & 0xF == 2, "ApicIdCoreIdSize"
    assert ext8.ecx & ~0xF0FF == 0x0000703F & ~0xF0FF, "other ECX bits preserved"
    assert ext8.eax == 0x3030
    e1e = get(out, 0x8000001E)
    assert (e1e.eax, e1e.ebx, e1e.ecx, e1e.edx) == (2, 2, 0, 0)
    for sub in range(4):
        eax = get(out, 0x8000001D, sub).eax
        assert (eax >> 14) & 0xFFF == (2 if (eax >> 5) & 7 == 3 else 0)
    assert get(out, 0x8000001D, 4).eax == 0
    assert get(out, 0x80000022).eax == 0, "AMD perfmon zeroed"


def test_intel_0x80000008_ecx_untouched():
    assert get(normalize_cpuid(intel_table(), 1, 4), 0x80000008).ecx == 0


# ------------------------------------------------------------------------------------------ hardware lies


def test_thermal_power_and_pmu_zeroed():
    out = normalize_cpuid(intel_table(), 0, 1)
    leaf6 = get(out, 6)
    assert (leaf6.eax, leaf6.ebx, leaf6.ecx, leaf6.edx) == (0x4, 0, 0, 0), "only ARAT survives"
    pmu = get(out, 0xA)
    assert (pmu.eax, pmu.ebx, pmu.ecx, pmu.edx) == (0, 0, 0, 0)


# ------------------------------------------------------------------------------------------ KVM leaves


def test_kvm_signature_and_features():
    table = intel_table()
    table.append(CpuidEntry(0x40000010, 0, 0, eax=0x1234))
    out = normalize_cpuid(table, 0, 1)
    sig = get(out, 0x40000000)
    assert struct.pack("<III", sig.ebx, sig.ecx, sig.edx) == KVM_SIGNATURE == b"KVMKVMKVM\0\0\0"
    assert sig.eax == 0x40000010, "EAX = max KVM leaf"
    assert get(out, 0x40000001).eax == 0x01007EFB, "KVM features passed through"
    assert get(out, 0x40000010).eax == 0x1234
    assert len([e for e in out if e.function == 0x40000001]) == 1


def test_kvm_leaves_added_when_missing():
    table = [e for e in intel_table() if not 0x40000000 <= e.function < 0x40000100]
    out = normalize_cpuid(table, 0, 1)
    assert get(out, 0x40000000).eax == 0x40000001
    features = get(out, 0x40000001)
    assert (features.eax, features.edx) == (0, 0)


# ------------------------------------------------------------------------------------------ MSRs


def test_boot_msrs():
    m = msrs.boot_msrs()
    assert m == {
        0x174: 0,
        0x175: 0,
        0x176: 0,
        0xC0000081: 0,
        0xC0000082: 0,
        0xC0000083: 0,
        0xC0000102: 0,
        0xC0000084: 0,
        0x10: 0,
        0x1A0: 1,
        0x2FF: 0x806,
    }
    assert msrs.MTRR_DEF_TYPE_BOOT == (1 << 11) | 6
    assert m[msrs.MSR_IA32_MISC_ENABLE] == msrs.MSR_IA32_MISC_ENABLE_FAST_STRING
    m[0x10] = 5
    assert msrs.boot_msrs()[0x10] == 0, "fresh dict per call"
    assert msrs.msr_name(0x2FF) == "MTRRdefType"
    assert msrs.msr_name(0x1234) == "MSR 0x1234"
    assert all(index in msrs.MSR_NAMES for index in m)
