"""The boot vCPU's initial state as plain data: GDT, identity page tables, segments and control registers.

The VMM copies `boot_segments` into RAM (the loader already adds them to the plan) and `initial_cpu_state`
into kvm_sregs/kvm_regs; segment names match kvm_sregs fields.
"""

from __future__ import annotations

import struct
from collections import namedtuple

from guestboot.layout import BOOT_STACK_TOP, GDT_ADDR, IDT_ADDR, MIB, PD_ADDR, PDPT_ADDR, PML4_ADDR
from guestboot.plan import BootPlan, LoaderError, Segment

CR0_PE = 1 << 0
CR0_ET = 1 << 4
CR0_NE = 1 << 5
CR0_PG = 1 << 31
CR4_PAE = 1 << 5
EFER_LME = 1 << 8
EFER_LMA = 1 << 10
RFLAGS_RESERVED = 0x2  # bit 1 always reads 1; IF stays clear

CODE_SELECTOR = 0x08
DATA_SELECTOR = 0x10
TSS_SELECTOR = 0x18
GDT_ENTRIES = 4
IDT_SIZE = 8  # one empty gate: any interrupt before the kernel loads its IDT is a triple fault, as intended

PAGE = 4096
PTE_PRESENT = 1 << 0
PTE_WRITABLE = 1 << 1
PTE_HUGE = 1 << 7  # PS: a PD entry maps 2 MiB
IDENTITY_PDS = 4   # 4 x 512 x 2 MiB = the first 4 GiB

SEGMENT_NAMES = ("cs", "ds", "es", "fs", "gs", "ss", "tr")


class SegmentDesc(namedtuple("SegmentDesc", "base limit selector type present dpl db s l g avl",
                             defaults=(1, 0, 0, 1, 0, 0, 0))):
    """A kvm_segment: limit is in bytes (already scaled by g), type is the 4-bit descriptor type."""
    __slots__ = ()

    def descriptor(self) -> bytes:
        """The 8-byte GDT entry for this segment."""
        limit = self.limit >> 12 if self.g else self.limit
        access = self.present << 7 | self.dpl << 5 | self.s << 4 | self.type
        flags = self.g << 3 | self.db << 2 | self.l << 1 | self.avl
        value = ((limit & 0xFFFF) | (self.base & 0xFFFFFF) << 16 | access << 40 | ((limit >> 16) & 0xF) << 48
                 | flags << 52 | (self.base >> 24 & 0xFF) << 56)
        return value.to_bytes(8, "little")


CpuState = namedtuple("CpuState", (
    "segments",  # dict[str, SegmentDesc]: cs, ds, es, fs, gs, ss, tr
    "gdt",       # (base, limit)
    "idt",
    "cr0", "cr3", "cr4", "efer", "rip", "rsp", "rsi", "rbx", "rflags",
), defaults=(RFLAGS_RESERVED,))


def segment(selector: int, *, entry_mode: str) -> SegmentDesc:
    """The flat segment behind `selector` in the boot GDT of `entry_mode` ("linux64" or "pvh")."""
    long_mode = _mode(entry_mode) == "linux64"
    if selector == CODE_SELECTOR:  # execute/read, accessed; 64-bit code has L=1 and D=0
        return SegmentDesc(0, 0xFFFFFFFF, selector, 0xB, db=0 if long_mode else 1, l=1 if long_mode else 0, g=1)
    if selector == DATA_SELECTOR:  # read/write, accessed
        return SegmentDesc(0, 0xFFFFFFFF, selector, 0x3, db=1, g=1)
    if selector == TSS_SELECTOR:  # busy TSS: VM entry insists on it though the kernel loads its own before use
        return SegmentDesc(0, 0x67, selector, 0xB, s=0)
    raise ValueError(f"no segment {selector:#x} in the boot GDT")


def gdt_bytes(entry_mode: str) -> bytes:
    """null, code 0x08, data 0x10, TSS 0x18 (as one 8-byte entry: the kernel replaces the GDT and TR early)."""
    return bytes(8) + b"".join(segment(s, entry_mode=entry_mode).descriptor()
                               for s in (CODE_SELECTOR, DATA_SELECTOR, TSS_SELECTOR))


def page_tables() -> list[tuple[int, bytes]]:
    """(address, bytes) of the PML4, the PDPT and the PDs identity-mapping [0, 4 GiB) with 2 MiB pages."""
    table = PTE_PRESENT | PTE_WRITABLE
    pml4 = struct.pack("<Q", PDPT_ADDR | table).ljust(PAGE, b"\0")
    pdpt = struct.pack(f"<{IDENTITY_PDS}Q", *(PD_ADDR + i * PAGE | table for i in range(IDENTITY_PDS)))
    huge_pages = IDENTITY_PDS * 512
    pds = struct.pack(f"<{huge_pages}Q", *(i * 2 * MIB | table | PTE_HUGE for i in range(huge_pages)))
    return [(PML4_ADDR, pml4), (PDPT_ADDR, pdpt.ljust(PAGE, b"\0")), (PD_ADDR, pds)]


def boot_segments(entry_mode: str) -> list[Segment]:
    """GDT and IDT, plus (for the 64-bit entry) the identity page tables."""
    segments = [Segment(GDT_ADDR, gdt_bytes(entry_mode), "gdt"), Segment(IDT_ADDR, bytes(IDT_SIZE), "idt")]
    if _mode(entry_mode) == "linux64":
        segments += [Segment(address, data, "page tables") for address, data in page_tables()]
    return segments


def initial_cpu_state(plan: BootPlan) -> CpuState:
    """Registers at the kernel entry: long mode with RSI = zero page, or 32-bit flat mode with RBX = start info."""
    mode = _mode(plan.entry_mode)
    segments = {name: segment(CODE_SELECTOR if name == "cs" else TSS_SELECTOR if name == "tr" else DATA_SELECTOR,
                              entry_mode=mode) for name in SEGMENT_NAMES}
    common = dict(segments=segments, gdt=(GDT_ADDR, GDT_ENTRIES * 8 - 1), idt=(IDT_ADDR, IDT_SIZE - 1),
                  rip=plan.entry, rsp=BOOT_STACK_TOP)
    if mode == "linux64":
        return CpuState(**common, cr0=CR0_PE | CR0_ET | CR0_NE | CR0_PG, cr3=PML4_ADDR, cr4=CR4_PAE,
                        efer=EFER_LME | EFER_LMA, rsi=plan.boot_info, rbx=0)
    return CpuState(**common, cr0=CR0_PE | CR0_ET, cr3=0, cr4=0, efer=0, rsi=0, rbx=plan.boot_info)


def _mode(entry_mode: str) -> str:
    if entry_mode not in ("linux64", "pvh"):
        raise LoaderError(f"unknown entry mode {entry_mode!r}: expected 'linux64' or 'pvh'")
    return entry_mode
