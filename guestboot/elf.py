"""ELF64 x86_64 vmlinux: PT_LOAD segments by physical address, the 64-bit entry and the PVH entry note."""

from __future__ import annotations

import struct
from collections import namedtuple

from guestboot.plan import LoaderError

ELF_MAGIC = b"\x7fELF"
ELFCLASS64 = 2
ELFDATA2LSB = 1
EM_X86_64 = 62
PT_LOAD = 1
PT_NOTE = 4
EHDR_SIZE = 64
PHDR_SIZE = 56  # == _PHDR.size
XEN_ELFNOTE_PHYS32_ENTRY = 18  # Linux emits it under name "Xen" when CONFIG_PVH=y

_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
_PHDR = struct.Struct("<IIQQQQQQ")
_NHDR = struct.Struct("<III")


class ElfSegment(namedtuple("ElfSegment", (
    "paddr",
    "data",    # memoryview: p_filesz bytes from the file
    "memsz",   # bytes past len(data) up to memsz are zero (bss): fresh guest RAM already is
))):
    __slots__ = ()

    @property
    def end(self) -> int:
        return self.paddr + self.memsz


class ElfImage(namedtuple("ElfImage", (
    "entry",      # e_entry: for vmlinux the physical address of startup_64 (64-bit boot protocol)
    "segments",   # list[ElfSegment]
    "pvh_entry",  # int | None: 32-bit PVH entry from the Xen PHYS32_ENTRY note, if the kernel has one
))):
    __slots__ = ()

    @property
    def start(self) -> int:
        return min(s.paddr for s in self.segments)

    @property
    def end(self) -> int:
        return max(s.end for s in self.segments)

    def contains(self, addr: int) -> bool:
        return any(s.paddr <= addr < s.end for s in self.segments)


def is_elf(image: bytes | memoryview) -> bool:
    return bytes(image[:4]) == ELF_MAGIC


def parse_elf(image: bytes | memoryview) -> ElfImage:
    """Decode an x86_64 vmlinux; segment data are memoryview slices of `image` (no copy)."""
    image = memoryview(image)
    if len(image) < EHDR_SIZE:
        raise LoaderError(f"ELF truncated: {len(image)} bytes, the ELF header alone is {EHDR_SIZE}: "
                          f"is the file complete?")
    (ident, _type, machine, _version, entry, phoff, _shoff, _flags, _ehsize, phentsize, phnum, *_rest
     ) = _EHDR.unpack_from(image)
    if ident[:4] != ELF_MAGIC:
        raise LoaderError(f"not an ELF file (magic {ident[:4].hex(' ')}, expected 7f 45 4c 46): "
                          f"pass a vmlinux or a bzImage")
    if ident[4] != ELFCLASS64:
        raise LoaderError(f"ELF class is {ident[4]}, not ELFCLASS64 (2): pclite boots 64-bit x86_64 kernels only")
    if ident[5] != ELFDATA2LSB:
        raise LoaderError(f"ELF data encoding is {ident[5]}, not little-endian (1): not an x86_64 kernel")
    if machine != EM_X86_64:
        raise LoaderError(f"ELF machine is {machine}, not x86_64 ({EM_X86_64}): build the kernel for x86_64")
    if phnum and phentsize != PHDR_SIZE:
        raise LoaderError(f"ELF program header entries are {phentsize} bytes, expected {PHDR_SIZE}: corrupt ELF")
    if phoff + phnum * PHDR_SIZE > len(image):
        raise LoaderError(f"ELF truncated: {phnum} program headers at {phoff:#x} extend past the end of the "
                          f"{len(image)}-byte file: is the file complete?")
    segments = []
    pvh_entry = None
    for index in range(phnum):
        p_type, _, offset, _, paddr, filesz, memsz, _ = _PHDR.unpack_from(image, phoff + PHDR_SIZE * index)
        if p_type not in (PT_LOAD, PT_NOTE):
            continue
        if offset + filesz > len(image):
            raise LoaderError(f"ELF truncated: program header {index} file bytes [{offset:#x}, "
                              f"{offset + filesz:#x}) extend past the end of the {len(image)}-byte file")
        data = image[offset:offset + filesz]
        if p_type == PT_NOTE:
            pvh_entry = _pvh_entry(data, index) if pvh_entry is None else pvh_entry
            continue
        if filesz > memsz:
            raise LoaderError(f"ELF PT_LOAD {index} has p_filesz {filesz:#x} > p_memsz {memsz:#x}: corrupt ELF")
        if memsz:
            segments.append(ElfSegment(paddr, data, memsz))
    if not segments:
        raise LoaderError("ELF has no PT_LOAD segment: nothing to load, pass a vmlinux")
    return ElfImage(entry, segments, pvh_entry)


def _pvh_entry(notes: memoryview, index: int) -> int | None:
    """Walk the notes of one PT_NOTE segment for name "Xen", type XEN_ELFNOTE_PHYS32_ENTRY."""
    offset = 0
    while offset + _NHDR.size <= len(notes):
        namesz, descsz, note_type = _NHDR.unpack_from(notes, offset)
        name_at = offset + _NHDR.size
        desc_at = name_at + _align4(namesz)
        if desc_at + descsz > len(notes):
            raise LoaderError(f"ELF PT_NOTE {index} has a note running past the segment end: corrupt ELF")
        if bytes(notes[name_at:name_at + namesz]).rstrip(b"\0") == b"Xen" and note_type == XEN_ELFNOTE_PHYS32_ENTRY:
            if descsz not in (4, 8):
                raise LoaderError(f"ELF PVH entry note has a {descsz}-byte value, expected 4 or 8: corrupt ELF")
            return int.from_bytes(notes[desc_at:desc_at + descsz], "little")
        offset = desc_at + _align4(descsz)
    return None


def _align4(size: int) -> int:
    return (size + 3) & ~3
