"""A boot plan: everything the VMM must copy into guest RAM and how to start the boot vCPU.

Loaders are pure functions from image bytes (+ options) to a BootPlan; the VMM only copies segments and sets
registers, like rust-vmm linux-loader's loader/configurator split.
"""

from __future__ import annotations

from collections import namedtuple


class LoaderError(ValueError):
    """The kernel image, initrd, command line or memory size cannot be booted; the message says why and what to do."""


# Plain classes and namedtuples rather than dataclasses throughout the VMM's start-up path: importing
# dataclasses (and the inspect it pulls) plus building each class costs ~0.3 s of VMM start in the lab.

# data: bytes | memoryview; what: "kernel", "initrd", "zero page", "cmdline", "mptable", "gdt", "page tables", ...
Segment = namedtuple("Segment", "gpa data what")


class BootPlan:
    __slots__ = ("entry_mode", "entry", "boot_info", "segments", "e820", "kernel_format", "details", "unpacked_kernel")

    def __init__(self, entry_mode: str, entry: int, boot_info: int, segments: list[Segment],
                 e820: list[tuple[int, int, int]], kernel_format: str, details: dict | None = None):
        # linux64: 64-bit boot protocol (RSI = zero page, long mode, identity paging)
        # pvh: PVH entry (RBX = hvm_start_info, 32-bit protected mode, paging off)
        self.entry_mode = entry_mode  # "linux64" | "pvh"
        self.entry = entry
        self.boot_info = boot_info  # zero page (linux64) or hvm_start_info (pvh) address
        self.segments = segments
        self.e820 = e820  # (addr, size, type)
        self.kernel_format = kernel_format  # "bzImage", "bzImage-unpacked", "elf-pvh", "elf64"
        self.details = {} if details is None else details  # e.g. compression, protocol: for logs and the timeline
        self.unpacked_kernel: bytes | memoryview | None = None  # a bzImage's vmlinux, when unpacked for this plan

    def __repr__(self) -> str:
        return (f"BootPlan({self.entry_mode}, entry={self.entry:#x}, boot_info={self.boot_info:#x}, "
                f"{len(self.segments)} segments, {self.kernel_format}, {self.details})")
