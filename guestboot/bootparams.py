"""The zero page (struct boot_params) for the Linux 64-bit boot protocol, built as 4096 bytes.

Offsets are from arch/x86/include/uapi/asm/bootparam.h and Documentation/x86/zero-page.rst.
"""

from __future__ import annotations

import struct

from guestboot.bzimage import BOOT_FLAG, HDR_START, HDR_STRUCT_END, HDRS_MAGIC, XLF_KERNEL_64
from guestboot.layout import CMDLINE_MAX
from guestboot.plan import LoaderError

ZERO_PAGE_SIZE = 4096

# boot_params
EXT_RAMDISK_IMAGE = 0x0C0
EXT_RAMDISK_SIZE = 0x0C4
EXT_CMD_LINE_PTR = 0x0C8
E820_ENTRIES = 0x1E8
SENTINEL = 0x1EF            # must stay 0, or the kernel wipes fields it thinks a broken loader left behind
E820_TABLE = 0x2D0
E820_ENTRY_SIZE = 20
E820_MAX_ENTRIES = 128

# setup_header, at its offset inside boot_params
BOOT_FLAG_OFF = 0x1FE
JUMP = 0x200
HEADER = 0x202
VERSION = 0x206
TYPE_OF_LOADER = 0x210
LOADFLAGS = 0x211
RAMDISK_IMAGE = 0x218
RAMDISK_SIZE = 0x21C
HEAP_END_PTR = 0x224
CMD_LINE_PTR = 0x228
INITRD_ADDR_MAX = 0x22C
KERNEL_ALIGNMENT = 0x230
XLOADFLAGS = 0x236
CMDLINE_SIZE = 0x238

LOADED_HIGH = 0x01
CAN_USE_HEAP = 0x80
LOADER_UNDEFINED = 0xFF      # type_of_loader for a boot loader without an assigned id
HEAP_END = 0xE000 - 0x200    # only the 16-bit setup uses the heap; the value boot.rst suggests
SYNTH_VERSION = 0x020F
SYNTH_KERNEL_ALIGNMENT = 0x1000000


def synthesized_header() -> bytes:
    """A setup header for a kernel loaded from an ELF vmlinux, which carries none (0x1F1..0x290)."""
    page = bytearray(HDR_STRUCT_END)
    struct.pack_into("<H", page, BOOT_FLAG_OFF, BOOT_FLAG)
    page[JUMP:JUMP + 2] = bytes([0xEB, 0x26C - HEADER])  # jmp over the header, so its length is known
    page[HEADER:HEADER + 4] = HDRS_MAGIC
    struct.pack_into("<H", page, VERSION, SYNTH_VERSION)
    struct.pack_into("<I", page, INITRD_ADDR_MAX, 0x7FFFFFFF)
    struct.pack_into("<I", page, KERNEL_ALIGNMENT, SYNTH_KERNEL_ALIGNMENT)
    struct.pack_into("<H", page, XLOADFLAGS, XLF_KERNEL_64)
    struct.pack_into("<I", page, CMDLINE_SIZE, CMDLINE_MAX - 1)
    return bytes(page[HDR_START:])


def build_zero_page(*, setup_header: bytes | memoryview | None, cmdline_addr: int,
                    initrd: tuple[int, int] | None, e820: list[tuple[int, int, int]]) -> bytes:
    """boot_params with the kernel's setup header (bytes from image offset 0x1F1) or a synthesized one.

    initrd is (address, size); e820 is [(address, size, type)].
    """
    if len(e820) > E820_MAX_ENTRIES:
        raise LoaderError(f"{len(e820)} e820 entries, the zero page holds at most {E820_MAX_ENTRIES}")
    header = synthesized_header() if setup_header is None else bytes(setup_header)
    if len(header) > HDR_STRUCT_END - HDR_START:
        raise LoaderError(f"setup header is {len(header)} bytes, boot_params has room for "
                          f"{HDR_STRUCT_END - HDR_START}: the bzImage is corrupt")
    page = bytearray(ZERO_PAGE_SIZE)
    page[HDR_START:HDR_START + len(header)] = header
    page[TYPE_OF_LOADER] = LOADER_UNDEFINED
    page[LOADFLAGS] |= LOADED_HIGH | CAN_USE_HEAP
    struct.pack_into("<H", page, HEAP_END_PTR, HEAP_END)
    _split_pack(page, CMD_LINE_PTR, EXT_CMD_LINE_PTR, cmdline_addr)
    address, size = initrd or (0, 0)
    _split_pack(page, RAMDISK_IMAGE, EXT_RAMDISK_IMAGE, address)
    _split_pack(page, RAMDISK_SIZE, EXT_RAMDISK_SIZE, size)
    page[E820_ENTRIES] = len(e820)
    for index, (addr, length, kind) in enumerate(e820):
        struct.pack_into("<QQI", page, E820_TABLE + index * E820_ENTRY_SIZE, addr, length, kind)
    return bytes(page)


def _split_pack(page: bytearray, low_offset: int, high_offset: int, value: int) -> None:
    """The low 32 bits go in the setup header field, the high 32 in boot_params' ext_* field."""
    struct.pack_into("<I", page, low_offset, value & 0xFFFFFFFF)
    struct.pack_into("<I", page, high_offset, value >> 32)


def read_e820(page: bytes | memoryview) -> list[tuple[int, int, int]]:
    """The e820 table of a zero page, as (address, size, type): for tests and logs."""
    return [struct.unpack_from("<QQI", page, E820_TABLE + i * E820_ENTRY_SIZE) for i in range(page[E820_ENTRIES])]
