"""Intel MultiProcessor Specification 1.4 tables: how a kernel without ACPI finds the vCPUs and the IOAPIC.

The floating pointer must sit in the last KiB of base memory (Linux scans 639K..640K); the configuration table
follows it, inside the reserved [EBDA_START, 1 MiB) range of the e820.
"""

from __future__ import annotations

import struct

from guestboot.layout import HIMEM_START, IOAPIC_ADDR, LAPIC_ADDR, MPTABLE_ADDR
from guestboot.plan import LoaderError

MAX_VCPUS = 254          # APIC ids are 8 bits, 0xFF is broadcast and the IOAPIC takes id = vcpus
IOAPIC_PINS = 24
SPEC_REV = 4             # 1.4
APIC_VERSION = 0x14      # integrated local APIC
IOAPIC_VERSION = 0x11
CPU_SIGNATURE = 0x600    # family 6: informational, the kernel reads CPUID itself
CPU_FEATURES = 0x201     # FPU | APIC
OEM_ID = b"PCLITE  "
PRODUCT_ID = b"MICROVM     "

FLOATING = struct.Struct("<4sIBBBBB3s")       # signature, physptr, length, spec_rev, checksum, feature1..5
CONFIG = struct.Struct("<4sHBB8s12sIHHIHBB")  # signature, length, spec_rev, checksum, oem, product, oem table
                                              # ptr/size, entry count, lapic addr, ext length/checksum, reserved
PROCESSOR = struct.Struct("<BBBBII8s")        # type 0, apic id, apic version, flags, signature, features
BUS = struct.Struct("<BB6s")                  # type 1, bus id, bus type
IOAPIC = struct.Struct("<BBBBI")              # type 2, id, version, flags, address
INTERRUPT = struct.Struct("<BBHBBBB")         # type 3/4, irq type, flags, src bus, src irq, dst id, dst pin

ENTRY_PROCESSOR, ENTRY_BUS, ENTRY_IOAPIC, ENTRY_IO_INTERRUPT, ENTRY_LOCAL_INTERRUPT = range(5)
INT_INT, INT_NMI, INT_SMI, INT_EXTINT = range(4)
CPU_ENABLED = 1
CPU_BSP = 2
ALL_LAPICS = 0xFF


def mptable_size(vcpus: int) -> int:
    return (FLOATING.size + CONFIG.size + PROCESSOR.size * vcpus + BUS.size + IOAPIC.size
            + INTERRUPT.size * (IOAPIC_PINS + 2))


def build_mptable(vcpus: int, base: int = MPTABLE_ADDR) -> bytes:
    """Floating pointer at `base`, the configuration table right after it."""
    if not 1 <= vcpus <= MAX_VCPUS:
        raise LoaderError(f"{vcpus} vCPUs: the MP table describes 1 to {MAX_VCPUS}, choose a count in that range")
    if base + mptable_size(vcpus) > HIMEM_START:
        raise LoaderError(f"MP table for {vcpus} vCPUs ({mptable_size(vcpus)} bytes at {base:#x}) would cross 1 MiB: "
                          f"use fewer vCPUs")
    ioapic_id = vcpus
    entries = [PROCESSOR.pack(ENTRY_PROCESSOR, cpu, APIC_VERSION, CPU_ENABLED | (CPU_BSP if cpu == 0 else 0),
                              CPU_SIGNATURE, CPU_FEATURES, bytes(8)) for cpu in range(vcpus)]
    entries.append(BUS.pack(ENTRY_BUS, 0, b"ISA   "))
    entries.append(IOAPIC.pack(ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, 1, IOAPIC_ADDR))
    # flags 0: polarity and trigger conform to the bus; ISA irq i wired to IOAPIC pin i, as KVM routes GSIs
    entries += [INTERRUPT.pack(ENTRY_IO_INTERRUPT, INT_INT, 0, 0, irq, ioapic_id, irq) for irq in range(IOAPIC_PINS)]
    entries.append(INTERRUPT.pack(ENTRY_LOCAL_INTERRUPT, INT_EXTINT, 0, 0, 0, ALL_LAPICS, 0))
    entries.append(INTERRUPT.pack(ENTRY_LOCAL_INTERRUPT, INT_NMI, 0, 0, 0, ALL_LAPICS, 1))
    body = b"".join(entries)
    config = bytearray(CONFIG.pack(b"PCMP", CONFIG.size + len(body), SPEC_REV, 0, OEM_ID, PRODUCT_ID, 0, 0,
                                   len(entries), LAPIC_ADDR, 0, 0, 0) + body)
    config[7] = _checksum(config)
    floating = bytearray(FLOATING.pack(b"_MP_", base + FLOATING.size, 1, SPEC_REV, 0, 0, 0, bytes(3)))
    floating[10] = _checksum(floating)
    return bytes(floating + config)


def _checksum(data: bytes | bytearray) -> int:
    """The byte that makes the whole structure sum to 0 mod 256."""
    return -sum(data) & 0xFF
