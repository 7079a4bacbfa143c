"""A boot plan: everything the VMM must copy into guest RAM and how to start the boot vCPU.

Loaders are pure functions from image bytes (+ options) to a BootPlan; the VMM only copies segments and sets
registers, like rust-vmm linux-loader's loader/configurator split.
"""

from __future__ import annotations

from dataclasses import dataclass, field


class LoaderError(ValueError):
    """The kernel image, initrd, command line or memory size cannot be booted; the message says why and what to do."""


@dataclass(frozen=True)
class Segment:
    gpa: int
    data: bytes | memoryview
    what: str  # "kernel", "initrd", "zero page", "cmdline", "mptable", "gdt", "page tables", ...


@dataclass(frozen=True)
class BootPlan:
    # linux64: 64-bit boot protocol (RSI = zero page, long mode, identity paging)
    # pvh: PVH entry (RBX = hvm_start_info, 32-bit protected mode, paging off)
    entry_mode: str  # "linux64" | "pvh"
    entry: int
    boot_info: int  # zero page (linux64) or hvm_start_info (pvh) address
    segments: list[Segment]
    e820: list[tuple[int, int, int]]  # (addr, size, type)
    kernel_format: str  # "bzImage", "bzImage-unpacked", "elf-pvh", "elf64"
    details: dict = field(default_factory=dict)  # e.g. compression, protocol version: for logs and the timeline

    def end_of_image(self) -> int:
        return max(s.gpa + len(s.data) for s in self.segments)
