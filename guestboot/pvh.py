"""PVH boot information: struct hvm_start_info (version 1) with its module list and memory map.

Layout from Xen's public/arch-x86/hvm/start_info.h; Linux's PVH entry reads it through RBX (EBX).
"""

from __future__ import annotations

import struct

from guestboot.layout import PVH_START_INFO_ADDR, ZERO_PAGE_ADDR
from guestboot.plan import LoaderError

HVM_START_MAGIC = 0x336EC578
HVM_START_VERSION = 1          # version 1 adds memmap_paddr/memmap_entries, which Linux needs without Xen

# magic, version, flags, nr_modules, modlist_paddr, cmdline_paddr, rsdp_paddr, memmap_paddr, memmap_entries, reserved
START_INFO = struct.Struct("<IIIIQQQQII")
MODLIST_ENTRY = struct.Struct("<QQQQ")   # paddr, size, cmdline_paddr, reserved
MEMMAP_ENTRY = struct.Struct("<QQII")    # addr, size, type (e820 values), reserved


def build_start_info(*, cmdline_addr: int, initrd: tuple[int, int] | None,
                     e820: list[tuple[int, int, int]], base: int = PVH_START_INFO_ADDR) -> bytes:
    """start_info at `base`, the initrd's modlist entry after it, then the memmap; one blob to place at `base`."""
    modules = [initrd] if initrd else []
    modlist_addr = base + START_INFO.size
    memmap_addr = modlist_addr + MODLIST_ENTRY.size * len(modules)
    end = memmap_addr + MEMMAP_ENTRY.size * len(e820)
    if end > ZERO_PAGE_ADDR:
        raise LoaderError(f"PVH start info with {len(e820)} memory map entries ends at {end:#x}, past the "
                          f"{ZERO_PAGE_ADDR:#x} it must stay below: use fewer memory regions")
    blob = bytearray(START_INFO.pack(HVM_START_MAGIC, HVM_START_VERSION, 0, len(modules),
                                     modlist_addr if modules else 0, cmdline_addr, 0, memmap_addr, len(e820), 0))
    for address, size in modules:
        blob += MODLIST_ENTRY.pack(address, size, 0, 0)
    for address, size, kind in e820:
        blob += MEMMAP_ENTRY.pack(address, size, kind, 0)
    return bytes(blob)
