"""Boot structures byte by byte: command line, zero page, hvm_start_info, MP table, GDT, page tables, CPU state."""

from __future__ import annotations

import struct

import pytest

from guestboot.bootparams import build_zero_page, read_e820
from guestboot.bzimage import header_bytes, parse_setup_header
from guestboot.cmdline import encode_cmdline
from guestboot.cpu import boot_segments, gdt_bytes, initial_cpu_state, page_tables
from guestboot.layout import (
    CMDLINE_MAX,
    GDT_ADDR,
    GIB,
    IDT_ADDR,
    IOAPIC_ADDR,
    LAPIC_ADDR,
    PD_ADDR,
    PDPT_ADDR,
    PML4_ADDR,
    PVH_START_INFO_ADDR,
    ZERO_PAGE_ADDR,
)
from guestboot.mptable import build_mptable
from guestboot.plan import BootPlan, LoaderError
from guestboot.pvh import build_start_info

E820 = [(0, 0x9FC00, 1), (0x9FC00, 0x60400, 2), (0x100000, 0xBFF00000, 1), (4 * GIB, GIB, 1)]


def u(data, offset, size):
    return int.from_bytes(data[offset:offset + size], "little")


# --- command line

def test_cmdline_is_nul_terminated():
    assert encode_cmdline("console=ttyS0 quiet") == b"console=ttyS0 quiet\0"
    assert encode_cmdline("") == b"\0"
    assert len(encode_cmdline("x" * (CMDLINE_MAX - 1))) == CMDLINE_MAX


def test_cmdline_too_long():
    with pytest.raises(LoaderError, match="command line is 2048 bytes, the limit is 2047"):
        encode_cmdline("x" * CMDLINE_MAX)


@pytest.mark.parametrize(("text", "message"), [("a\0b", "NUL byte at offset 1"),
                                               ("root=/dev/vda\n", r"non-printable .*'\\n' at offset 13"),
                                               ("caf\u00e9", "non-ASCII character 'é' at offset 3")])
def test_cmdline_bad_characters(text, message):
    with pytest.raises(LoaderError, match=message):
        encode_cmdline(text)


# --- zero page

def test_zero_page_from_bzimage_header(images):
    image = images.bzimage()
    header = header_bytes(image, parse_setup_header(image))
    page = build_zero_page(setup_header=header, cmdline_addr=0x20000, initrd=(0x7000000, 0x123456), e820=E820)
    assert len(page) == 4096
    assert page[0x1F1:0x210] == image[0x1F1:0x210]  # untouched header fields are copied
    assert page[0x1FE:0x200] == b"\x55\xaa" and page[0x202:0x206] == b"HdrS" and u(page, 0x206, 2) == 0x020F
    assert page[0x210] == 0xFF                       # type_of_loader
    assert page[0x211] == 0x01 | 0x80                # LOADED_HIGH | CAN_USE_HEAP
    assert u(page, 0x224, 2) == 0xDE00               # heap_end_ptr
    assert u(page, 0x228, 4) == 0x20000 and u(page, 0xC8, 4) == 0   # cmd_line_ptr, ext_cmd_line_ptr
    assert u(page, 0x218, 4) == 0x7000000 and u(page, 0x21C, 4) == 0x123456
    assert u(page, 0xC0, 4) == 0 and u(page, 0xC4, 4) == 0
    assert u(page, 0x238, 4) == 2047                 # the kernel's cmdline_size is kept
    assert page[0x1EF] == 0                          # sentinel
    assert not any(page[:0xC0]) and not any(page[0xCC:0x1E8]) and not any(page[0x26C:0x2D0])
    assert page[0x1E8] == 4
    assert struct.unpack_from("<QQI", page, 0x2D0 + 2 * 20) == (0x100000, 0xBFF00000, 1)
    assert read_e820(page) == E820


def test_zero_page_synthesized_header():
    page = build_zero_page(setup_header=None, cmdline_addr=0x20000, initrd=None, e820=E820[:1])
    assert page[0x1FE:0x200] == b"\x55\xaa" and page[0x200] == 0xEB and page[0x201] == 0x6A
    assert page[0x202:0x206] == b"HdrS" and u(page, 0x206, 2) == 0x020F
    assert u(page, 0x230, 4) == 0x1000000 and u(page, 0x236, 2) & 1
    assert u(page, 0x238, 4) == CMDLINE_MAX - 1
    assert page[0x210] == 0xFF and page[0x211] & 0x81 == 0x81
    assert u(page, 0x218, 4) == 0 and u(page, 0x21C, 4) == 0 and page[0x1E8] == 1


def test_zero_page_high_addresses_use_ext_fields():
    page = build_zero_page(setup_header=None, cmdline_addr=0x1_2345_6000, initrd=(0x2_0000_1000, 0x1_0000_0010),
                           e820=E820)
    assert (u(page, 0x228, 4), u(page, 0xC8, 4)) == (0x2345_6000, 0x1)
    assert (u(page, 0x218, 4), u(page, 0xC0, 4)) == (0x1000, 0x2)
    assert (u(page, 0x21C, 4), u(page, 0xC4, 4)) == (0x10, 0x1)


def test_zero_page_e820_limit():
    with pytest.raises(LoaderError, match="129 e820 entries, the zero page holds at most 128"):
        build_zero_page(setup_header=None, cmdline_addr=0, initrd=None, e820=[(0, 4096, 1)] * 129)


# --- PVH start info

def test_hvm_start_info_layout():
    blob = build_start_info(cmdline_addr=0x20000, initrd=(0x8000000, 0x4321), e820=E820)
    base = PVH_START_INFO_ADDR
    magic, version, flags, nr_modules, modlist, cmdline, rsdp, memmap, entries, reserved = struct.unpack_from(
        "<IIIIQQQQII", blob)
    assert (magic, version, flags, nr_modules) == (0x336EC578, 1, 0, 1)
    assert (modlist, cmdline, rsdp, memmap, entries, reserved) == (base + 56, 0x20000, 0, base + 56 + 32, 4, 0)
    assert struct.unpack_from("<QQQQ", blob, 56) == (0x8000000, 0x4321, 0, 0)
    assert [struct.unpack_from("<QQII", blob, 88 + 24 * i) for i in range(4)] == [(*e, 0) for e in E820]
    assert len(blob) == 56 + 32 + 24 * 4 and base + len(blob) <= ZERO_PAGE_ADDR


def test_hvm_start_info_without_initrd():
    blob = build_start_info(cmdline_addr=0x20000, initrd=None, e820=E820)
    assert u(blob, 0x0C, 4) == 0 and u(blob, 0x10, 8) == 0 and u(blob, 0x28, 8) == PVH_START_INFO_ADDR + 56


def test_hvm_start_info_must_stay_below_zero_page():
    with pytest.raises(LoaderError, match="past the 0x7000 it must stay below"):
        build_start_info(cmdline_addr=0, initrd=None, e820=[(0, 4096, 1)] * 200)


# --- MP table

@pytest.mark.parametrize("vcpus", [1, 4, 254])
def test_mptable(vcpus):
    table = build_mptable(vcpus)
    floating, config = table[:16], table[16:]
    assert sum(floating) % 256 == 0 and sum(config) % 256 == 0
    assert floating[:4] == b"_MP_" and u(floating, 4, 4) == 0x9FC00 + 16 and floating[8] == 1 and floating[9] == 4
    assert config[:4] == b"PCMP" and u(config, 4, 2) == len(config) and config[6] == 4
    assert config[8:16] == b"PCLITE  " and u(config, 36, 4) == LAPIC_ADDR
    assert u(config, 34, 2) == vcpus + 1 + 1 + 24 + 2
    assert 0x9FC00 + len(table) <= 0x100000
    entries = config[44:]
    cpus = [entries[i * 20:(i + 1) * 20] for i in range(vcpus)]
    assert [(c[0], c[1], c[2], c[3]) for c in cpus] == [(0, i, 0x14, 3 if i == 0 else 1) for i in range(vcpus)]
    rest = entries[20 * vcpus:]
    assert rest[:8] == b"\x01\x00ISA   "
    assert struct.unpack_from("<BBBBI", rest, 8) == (2, vcpus, 0x11, 1, IOAPIC_ADDR)
    ints = [struct.unpack_from("<BBHBBBB", rest, 16 + 8 * i) for i in range(26)]
    assert ints[:24] == [(3, 0, 0, 0, irq, vcpus, irq) for irq in range(24)]
    assert ints[24:] == [(4, 3, 0, 0, 0, 0xFF, 0), (4, 1, 0, 0, 0, 0xFF, 1)]


@pytest.mark.parametrize("vcpus", [0, 255])
def test_mptable_vcpu_count(vcpus):
    with pytest.raises(LoaderError, match=f"{vcpus} vCPUs: the MP table describes 1 to 254"):
        build_mptable(vcpus)


# --- GDT, page tables, CPU state

def test_gdt_entries():
    long_mode = struct.unpack("<4Q", gdt_bytes("linux64"))
    assert long_mode[:3] == (0, 0x00AF9B000000FFFF, 0x00CF93000000FFFF)
    assert long_mode[3] == 0x00008B0000000067
    pvh = struct.unpack("<4Q", gdt_bytes("pvh"))
    assert pvh[:3] == (0, 0x00CF9B000000FFFF, 0x00CF93000000FFFF)


def test_page_tables_identity_map_4_gib():
    tables = dict(page_tables())
    assert set(tables) == {PML4_ADDR, PDPT_ADDR, PD_ADDR} and len(tables[PD_ADDR]) == 4 * 4096
    memory = {addr + i: b for addr, data in tables.items() for i, b in enumerate(data)}

    def entry(table, index):
        return int.from_bytes(bytes(memory.get(table + 8 * index + i, 0) for i in range(8)), "little")

    def translate(virt):
        pml4e = entry(PML4_ADDR, virt >> 39 & 511)
        assert pml4e & 3 == 3
        pdpte = entry(pml4e & ~0xFFF, virt >> 30 & 511)
        assert pdpte & 3 == 3
        pde = entry(pdpte & ~0xFFF, virt >> 21 & 511)
        assert pde & 0x83 == 0x83  # present, writable, 2 MiB page
        return (pde & ~0x1FFFFF & (1 << 52) - 1) | virt & 0x1FFFFF

    for virt in (0, 0x7000, 0x1000200, 0x1234567, GIB + 5, 3 * GIB - 1, 0xFEE00000, 4 * GIB - 1):
        assert translate(virt) == virt
    assert entry(PML4_ADDR, 1) == 0 and entry(PDPT_ADDR, 4) == 0


def test_boot_segments():
    assert [(s.gpa, s.what) for s in boot_segments("pvh")] == [(GDT_ADDR, "gdt"), (IDT_ADDR, "idt")]
    assert [s.what for s in boot_segments("linux64")] == ["gdt", "idt"] + ["page tables"] * 3


def test_initial_cpu_state_linux64():
    plan = BootPlan("linux64", 0x1000200, ZERO_PAGE_ADDR, [], [], "bzImage")
    state = initial_cpu_state(plan)
    assert (state.rip, state.rsi, state.rflags) == (0x1000200, ZERO_PAGE_ADDR, 2)
    assert state.cr0 & 0x80000001 == 0x80000001 and state.cr3 == PML4_ADDR and state.cr4 == 0x20
    assert state.efer == 0x500 and state.gdt == (GDT_ADDR, 31)
    cs, ds, tr = state.segments["cs"], state.segments["ds"], state.segments["tr"]
    assert (cs.selector, cs.l, cs.db, cs.g, cs.limit, cs.type) == (0x08, 1, 0, 1, 0xFFFFFFFF, 0xB)
    assert all(state.segments[n] == ds for n in ("es", "fs", "gs", "ss")) and ds.selector == 0x10
    assert (tr.selector, tr.type, tr.s) == (0x18, 0xB, 0)


def test_initial_cpu_state_pvh():
    state = initial_cpu_state(BootPlan("pvh", 0x10004A0, PVH_START_INFO_ADDR, [], [], "elf-pvh"))
    assert (state.rip, state.rbx, state.rsi) == (0x10004A0, PVH_START_INFO_ADDR, 0)
    assert state.cr0 & 0x80000001 == 1 and (state.cr4, state.efer) == (0, 0)
    cs = state.segments["cs"]
    assert (cs.l, cs.db, cs.g, cs.limit) == (0, 1, 1, 0xFFFFFFFF)
