"""ELF64 vmlinux parsing: PT_LOAD segments, entry points, the PVH note, malformed files."""

from __future__ import annotations

import struct

import pytest

from guestboot.elf import is_elf, parse_elf
from guestboot.plan import LoaderError


def test_segments_and_entries(images):
    image = images.elf()
    elf = parse_elf(image)
    assert is_elf(image)
    assert elf.entry == images.KERNEL_PADDR
    assert elf.pvh_entry == images.PVH_ENTRY
    assert [(s.paddr, len(s.data), s.memsz) for s in elf.segments] == [
        (images.KERNEL_PADDR, 0x3000, 0x3000), (images.DATA_PADDR, 0x800, 0x5000)]
    assert bytes(elf.segments[1].data) == b"D" * 0x800
    assert elf.start == images.KERNEL_PADDR and elf.end == images.DATA_PADDR + 0x5000
    assert elf.contains(images.PVH_ENTRY) and not elf.contains(images.KERNEL_PADDR + 0x3000)


def test_segment_data_are_views_of_the_image(images):
    image = images.elf()
    assert all(s.data.obj is image for s in parse_elf(image).segments)


def test_pvh_note_with_4_byte_value(images):
    assert parse_elf(images.elf(pvh_entry=0x1000ABC, pvh_size=4)).pvh_entry == 0x1000ABC


def test_no_pvh_note(images):
    assert parse_elf(images.elf(pvh_entry=None)).pvh_entry is None


def test_other_program_headers_are_ignored(images):
    gnu_stack = struct.pack("<IIQQQQQQ", 0x6474E551, 6, 0, 0, 0, 0, 0, 16)
    assert len(parse_elf(images.elf(extra_phdrs=[gnu_stack])).segments) == 2


def test_bad_pvh_note_size(images):
    with pytest.raises(LoaderError, match="PVH entry note has a 2-byte value, expected 4 or 8"):
        parse_elf(images.elf(pvh_entry=0x1234, pvh_size=2))


def test_truncated_header(images):
    with pytest.raises(LoaderError, match="ELF truncated: 40 bytes, the ELF header alone is 64"):
        parse_elf(images.elf()[:40])


def test_truncated_segment(images):
    image = images.elf()
    with pytest.raises(LoaderError, match="ELF truncated: program header 1 .* past the end"):
        parse_elf(image[:64 + 3 * 56 + 0x3000 + 0x100])


def test_truncated_program_headers(images):
    with pytest.raises(LoaderError, match="ELF truncated: 3 program headers at 0x40"):
        parse_elf(images.elf()[:100])


def test_not_elf():
    with pytest.raises(LoaderError, match="not an ELF file"):
        parse_elf(b"MZ" + bytes(100))


def test_not_elf64(images):
    with pytest.raises(LoaderError, match="not ELFCLASS64.*64-bit x86_64"):
        parse_elf(images.elf(elf_class=1))


def test_not_x86_64(images):
    with pytest.raises(LoaderError, match="ELF machine is 183, not x86_64"):
        parse_elf(images.elf(machine=183))


def test_no_pt_load(images):
    with pytest.raises(LoaderError, match="no PT_LOAD segment"):
        parse_elf(images.elf(segments=[]))
