"""plan_boot: kernel image (+ initrd, command line, memory size, vCPUs) -> BootPlan, as a pure function.

Entry paths, all without firmware:
  linux64 (bzImage)          the bzImage's protected-mode code at pref_address, 64-bit entry at +0x200
  linux64 (elf64)            an ELF vmlinux at its p_paddr, entered at e_entry with a synthesized zero page
  pvh (elf-pvh)              an ELF vmlinux entered at its Xen PHYS32_ENTRY note in 32-bit flat mode
  pvh (bzImage-unpacked)     a bzImage whose payload was decompressed on the host into such a vmlinux
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from itertools import pairwise

from guestboot.bootparams import build_zero_page
from guestboot.bzimage import (
    ENTRY64_OFFSET,
    SetupHeader,
    header_bytes,
    kernel_version_string,
    parse_setup_header,
    payload,
    protected_mode_code,
    unpack_bzimage,
)
from guestboot.cmdline import encode_cmdline
from guestboot.cpu import boot_segments
from guestboot.elf import ElfImage, is_elf, parse_elf
from guestboot.layout import (
    CMDLINE_ADDR,
    CMDLINE_MAX,
    E820_RAM,
    E820_RESERVED,
    EBDA_START,
    GIB,
    HIMEM_START,
    MIB,
    MPTABLE_ADDR,
    PVH_START_INFO_ADDR,
    ZERO_PAGE_ADDR,
    ram_regions,
)
from guestboot.mptable import build_mptable
from guestboot.plan import BootPlan, LoaderError, Segment
from guestboot.pvh import build_start_info

BOOT_MODES = ("auto", "pvh", "bzimage", "unpack", "elf64")
MIN_MEM = 32 * MIB
KERNEL_HEADROOM = 8 * MIB  # RAM past the kernel's end it needs for page tables, slab and the initrd unpacking
PAGE = 4096

Range = tuple[int, int, str]  # [start, end) and what lives there


class _Kernel:
    """The loader's choice of kernel bytes and entry, before the initrd and boot structures are placed."""

    def __init__(self, kernel_format: str, entry_mode: str, entry: int, segments: list[Segment],
                 footprint: list[Range], setup_header: memoryview | None = None, initrd_limit: int = 4 * GIB,
                 cmdline_limit: int = CMDLINE_MAX - 1, details: dict | None = None):
        self.kernel_format = kernel_format
        self.entry_mode = entry_mode
        self.entry = entry
        self.segments = segments
        self.footprint = footprint  # memory the kernel owns: bss past the file bytes, init_size for a bzImage
        self.setup_header = setup_header  # copied into the zero page for a bzImage
        self.initrd_limit = initrd_limit
        self.cmdline_limit = cmdline_limit
        self.details = {} if details is None else details
        self.unpacked: bytes | memoryview | None = None  # the vmlinux unpacked on the host, for the plan's caller

    @property
    def start(self) -> int:
        return min(start for start, _, _ in self.footprint)

    @property
    def end(self) -> int:
        return max(end for _, end, _ in self.footprint)


def plan_boot(kernel: bytes | memoryview, *, initrd: bytes | memoryview | None = None, cmdline: str = "",
              mem_bytes: int, vcpus: int = 1, boot: str = "auto",
              unpacked: bytes | memoryview | None = None) -> BootPlan:
    """Everything the VMM copies into guest RAM, and where the boot vCPU starts.

    boot: "auto" (ELF with PVH note -> pvh, other ELF -> elf64, bzImage -> its 64-bit entry), "pvh" (require a PVH
    entry, unpacking a bzImage on the host), "bzimage", "unpack" (bzImage -> host-unpacked vmlinux via PVH, else the
    bzImage entry with details["fallback"] saying why), "elf64" (an ELF's e_entry even if it has a PVH note).
    unpacked: what this bzImage unpacked to before (the caller's cache), instead of decompressing it again; a
    plan that did decompress carries the result as plan.unpacked_kernel, for the caller to keep.
    """
    if boot not in BOOT_MODES:
        raise LoaderError(f"unknown boot mode {boot!r}: expected one of {', '.join(BOOT_MODES)}")
    image = memoryview(kernel)
    chosen = _choose_kernel(image, boot, unpacked)
    _check_memory(mem_bytes, chosen)
    regions = ram_regions(mem_bytes)
    low_end = regions[0][1]
    e820 = e820_map(mem_bytes)
    cmdline_bytes = encode_cmdline(cmdline, chosen.cmdline_limit)

    segments = list(chosen.segments)
    details = dict(chosen.details, cmdline_bytes=len(cmdline_bytes) - 1)
    initrd_range = None
    if initrd is not None:
        if not len(initrd):
            raise LoaderError("initrd is empty: pass a cpio archive or no initrd at all")
        address = place_initrd(len(initrd), kernel=(chosen.start, chosen.end), limit=min(low_end, chosen.initrd_limit))
        initrd_range = (address, len(initrd))
        segments.append(Segment(address, memoryview(initrd), "initrd"))
        details.update(initrd_addr=address, initrd_size=len(initrd))
    segments.append(Segment(CMDLINE_ADDR, cmdline_bytes, "cmdline"))
    if chosen.entry_mode == "linux64":
        boot_info = ZERO_PAGE_ADDR
        segments.append(Segment(boot_info, build_zero_page(setup_header=chosen.setup_header, cmdline_addr=CMDLINE_ADDR,
                                                           initrd=initrd_range, e820=e820), "zero page"))
    else:
        boot_info = PVH_START_INFO_ADDR
        segments.append(Segment(boot_info, build_start_info(cmdline_addr=CMDLINE_ADDR, initrd=initrd_range,
                                                            e820=e820), "start info"))
    # always: PVH and ACPI-less kernels find the other vCPUs and the IOAPIC only through it
    segments.append(Segment(MPTABLE_ADDR, build_mptable(vcpus), "mptable"))
    segments += boot_segments(chosen.entry_mode)

    ranges = chosen.footprint + [_range(s) for s in segments if s.what != "kernel"]
    check_no_overlap(ranges)
    check_in_ram(ranges, regions)
    plan = BootPlan(chosen.entry_mode, chosen.entry, boot_info, segments, e820, chosen.kernel_format, details)
    plan.unpacked_kernel = chosen.unpacked if unpacked is None else None
    return plan


def e820_map(mem_bytes: int) -> list[tuple[int, int, int]]:
    """RAM below the EBDA, the reserved EBDA..1 MiB (MP table, legacy ROM area), the rest of low RAM, high RAM."""
    (_, low_end), *high = ram_regions(mem_bytes)
    e820 = [(0, EBDA_START, E820_RAM), (EBDA_START, HIMEM_START - EBDA_START, E820_RESERVED)]
    if low_end > HIMEM_START:
        e820.append((HIMEM_START, low_end - HIMEM_START, E820_RAM))
    return e820 + [(address, size, E820_RAM) for address, size in high]


def place_initrd(size: int, *, kernel: tuple[int, int], limit: int) -> int:
    """Highest page-aligned address with [address, address + size) below `limit`, above 1 MiB, clear of the kernel."""
    kernel_start, kernel_end = kernel
    address = (limit - size) & ~(PAGE - 1)
    if address < kernel_end and address + size > kernel_start:
        address = (kernel_start - size) & ~(PAGE - 1)  # try the gap between 1 MiB and the kernel
    if address < HIMEM_START:
        raise LoaderError(f"initrd ({_mib(size)}) does not fit in guest RAM below {_mib(limit)} next to the kernel "
                          f"at [{_mib(kernel_start)}, {_mib(kernel_end)}): give the VM more memory (--mem) or a "
                          f"smaller initrd")
    return address


def check_no_overlap(items: Iterable[Segment | Range]) -> None:
    """Raise LoaderError if any two segments or reserved ranges share a byte."""
    ranges = sorted(_range(item) for item in items)
    for (start_a, end_a, what_a), (start_b, end_b, what_b) in pairwise(ranges):
        if start_b < end_a:
            raise LoaderError(f"boot plan overlap: {what_a} [{start_a:#x}, {end_a:#x}) and {what_b} "
                              f"[{start_b:#x}, {end_b:#x}): the kernel image or layout does not fit this memory map")


def check_in_ram(items: Iterable[Segment | Range], regions: Sequence[tuple[int, int]]) -> None:
    """Raise LoaderError unless every segment lies inside one RAM region."""
    for start, end, what in map(_range, items):
        if not any(base <= start and end <= base + size for base, size in regions):
            layout = ", ".join(f"[{base:#x}, {base + size:#x})" for base, size in regions)
            raise LoaderError(f"{what} [{start:#x}, {end:#x}) is outside guest RAM ({layout}): give the VM more "
                              f"memory (--mem) or use a kernel linked for lower addresses")


def _choose_kernel(image: memoryview, boot: str, unpacked: bytes | memoryview | None = None) -> _Kernel:
    if is_elf(image):
        if boot in ("bzimage", "unpack"):
            raise LoaderError(f"boot={boot!r} needs a bzImage but the kernel is an ELF vmlinux: use boot='auto', "
                              f"'pvh' or 'elf64'")
        elf = parse_elf(image)
        if boot == "pvh" and elf.pvh_entry is None:
            raise LoaderError("boot='pvh' but the vmlinux has no PVH entry note (Xen PHYS32_ENTRY): build the "
                              "kernel with CONFIG_PVH=y or use boot='elf64'")
        if boot == "elf64" or elf.pvh_entry is None:
            return _elf_kernel(elf, "elf64")
        return _elf_kernel(elf, "elf-pvh")
    header = parse_setup_header(image)
    if boot == "elf64":
        raise LoaderError("boot='elf64' needs an ELF vmlinux but the kernel is a bzImage: use boot='bzimage', "
                          "'unpack' or 'pvh'")
    if boot in ("auto", "bzimage"):
        return _bzimage_kernel(image, header)
    try:
        compression = payload(image)[0]
        vmlinux = unpack_bzimage(image) if unpacked is None else memoryview(unpacked)
        elf = parse_elf(vmlinux)
        if elf.pvh_entry is None:
            raise LoaderError("the unpacked vmlinux has no PVH entry note: the kernel lacks CONFIG_PVH=y")
    except LoaderError as error:
        if boot == "pvh":
            raise LoaderError(f"boot='pvh' cannot use this bzImage ({error}): use boot='bzimage' or 'unpack'") from None
        kernel = _bzimage_kernel(image, header)
        kernel.details["fallback"] = f"{error}; booted the bzImage 64-bit entry instead"
        return kernel
    kernel = _elf_kernel(elf, "bzImage-unpacked")
    kernel.initrd_limit = header.initrd_addr_max + 1
    kernel.cmdline_limit = min(CMDLINE_MAX - 1, header.cmdline_size)
    kernel.details.update(_header_details(image, header), compression=compression, unpacked_bytes=len(vmlinux),
                          unpacked_before=unpacked is not None)
    kernel.unpacked = vmlinux
    return kernel


def _bzimage_kernel(image: memoryview, header: SetupHeader) -> _Kernel:
    code = protected_mode_code(image, header)
    load = header.pref_address  # relocatable kernels accept any aligned address; this one is always valid
    try:
        compression = payload(image)[0]
    except LoaderError:
        compression = "unknown"  # the in-guest decompressor may know it; only unpacking on the host needs it
    return _Kernel(
        "bzImage", "linux64", load + ENTRY64_OFFSET, [Segment(load, code, "kernel")],
        footprint=[(load, load + max(header.init_size, len(code)), "kernel (init_size)")],
        setup_header=header_bytes(image, header), initrd_limit=header.initrd_addr_max + 1,
        cmdline_limit=min(CMDLINE_MAX - 1, header.cmdline_size),
        details=dict(_header_details(image, header), compression=compression))


def _elf_kernel(elf: ElfImage, kernel_format: str) -> _Kernel:
    pvh = kernel_format != "elf64"
    entry = elf.pvh_entry if pvh else elf.entry
    if not elf.contains(entry):
        which = "PVH entry note" if pvh else "e_entry"
        raise LoaderError(f"ELF {which} {entry:#x} is outside every PT_LOAD segment's physical range: not a vmlinux "
                          f"linked for physical loading")
    return _Kernel(
        kernel_format, "pvh" if pvh else "linux64", entry, [Segment(s.paddr, s.data, "kernel") for s in elf.segments],
        footprint=[(s.paddr, s.end, "kernel") for s in elf.segments],
        details={"elf_segments": len(elf.segments)})


def _header_details(image: memoryview, header: SetupHeader) -> dict:
    details = {"protocol": header.protocol, "load_addr": header.pref_address, "init_size": header.init_size}
    if version := kernel_version_string(image, header):
        details["kernel_version"] = version
    return details


def _check_memory(mem_bytes: int, kernel: _Kernel) -> None:
    if mem_bytes % PAGE:
        raise LoaderError(f"memory size {mem_bytes} is not a multiple of 4 KiB: round it (e.g. to whole MiB)")
    needed = max(MIN_MEM, -(-(kernel.end + KERNEL_HEADROOM) // MIB) * MIB)
    if mem_bytes < needed:
        raise LoaderError(f"{_mib(mem_bytes)} of RAM is too small: this kernel needs at least {_mib(needed)} "
                          f"(it occupies up to {_mib(kernel.end)}, plus {_mib(KERNEL_HEADROOM)} to start); "
                          f"give the VM more memory (--mem)")


def _range(item: Segment | Range) -> Range:
    if isinstance(item, Segment):
        return (item.gpa, item.gpa + len(item.data), item.what)
    return item


def _mib(size: int) -> str:
    return f"{size // MIB} MiB" if size % MIB == 0 else f"{size / MIB:.1f} MiB"
