"""Crafted kernel images for the loader tests: tiny ELF vmlinuxes and bzImages wrapping them, built in memory."""

from __future__ import annotations

import bz2
import gzip
import lzma
import struct

import lz4.block
import pytest
import zstandard

KERNEL_PADDR = 0x1000000
PVH_ENTRY = KERNEL_PADDR + 0x100
DATA_PADDR = 0x1200000


class Images:
    """Builders for synthetic images (a fixture, so test modules need no import path tricks)."""

    KERNEL_PADDR = KERNEL_PADDR
    PVH_ENTRY = PVH_ENTRY
    DATA_PADDR = DATA_PADDR

    @staticmethod
    def note(name: bytes, note_type: int, desc: bytes) -> bytes:
        pad = lambda b: b + bytes(-len(b) % 4)  # noqa: E731
        return struct.pack("<III", len(name) + 1, len(desc), note_type) + pad(name + b"\0") + pad(desc)

    @staticmethod
    def elf(*, segments=None, entry=KERNEL_PADDR, pvh_entry: int | None = PVH_ENTRY, pvh_size: int = 8,
            elf_class: int = 2, machine: int = 62, extra_phdrs=()) -> bytes:
        """ELF64 with PT_LOADs (paddr, file bytes, memsz) and a PT_NOTE holding a GNU note, then the Xen PVH one."""
        if segments is None:
            segments = [(KERNEL_PADDR, b"\xf4" * 0x3000, 0x3000), (DATA_PADDR, b"D" * 0x800, 0x5000)]
        notes = Images.note(b"GNU", 3, b"\x11" * 20)
        if pvh_entry is not None:
            notes += Images.note(b"Xen", 18, pvh_entry.to_bytes(pvh_size, "little"))
        phnum = len(segments) + 1 + len(extra_phdrs)
        offset = 64 + 56 * phnum
        phdrs, blobs = [], []
        for paddr, data, memsz in segments:
            phdrs.append(struct.pack("<IIQQQQQQ", 1, 5, offset, paddr | 0xFFFFFFFF80000000, paddr, len(data), memsz,
                                     0x200000))
            blobs.append(data)
            offset += len(data)
        phdrs.append(struct.pack("<IIQQQQQQ", 4, 4, offset, 0, 0, len(notes), len(notes), 4))
        blobs.append(notes)
        phdrs += list(extra_phdrs)
        ident = b"\x7fELF" + bytes([elf_class, 1, 1]) + bytes(9)
        header = struct.pack("<16sHHIQQQIHHHHHH", ident, 2, machine, 1, entry, 64, 0, 0, 64, 56, phnum, 64, 0, 0)
        return header + b"".join(phdrs) + b"".join(blobs)

    @staticmethod
    def compress(data: bytes, name: str, *, lz4_block: int = 8 << 20, lz4_frames: int = 1) -> bytes:
        """As the kernel's Makefile does: most formats get the le32 uncompressed size appended."""
        size = struct.pack("<I", len(data))
        if name == "gzip":
            return gzip.compress(data, mtime=0)
        if name == "xz":
            return lzma.compress(data, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32) + size
        if name == "lzma":
            return lzma.compress(data, format=lzma.FORMAT_ALONE) + size
        if name == "bzip2":
            return bz2.compress(data) + size
        if name == "zstd":
            return zstandard.ZstdCompressor(write_content_size=False).compress(data) + size
        if name == "lz4":  # legacy frames: magic, then [le32 size][block]...
            out = b""
            chunks = [data[i:i + lz4_block] for i in range(0, len(data), lz4_block)]
            per_frame = -(-len(chunks) // lz4_frames)
            for index, chunk in enumerate(chunks):
                if index % per_frame == 0:
                    out += struct.pack("<I", 0x184C2102)
                block = lz4.block.compress(chunk, store_size=False)
                out += struct.pack("<I", len(block)) + block
            return out + size
        if name == "lzo":
            return b"\x89LZO\x00\r\n\x1a\n" + bytes(64)
        raise ValueError(name)

    @staticmethod
    def bzimage(vmlinux: bytes | None = None, *, compression: str = "gzip", payload: bytes | None = None,
                version: int = 0x020F, xloadflags: int = 0x3, setup_sects: int = 4, boot_flag: int = 0xAA55,
                magic: bytes = b"HdrS", pref_address: int = KERNEL_PADDR, init_size: int = 4 << 20,
                initrd_addr_max: int = 0x7FFFFFFF, cmdline_size: int = 2047) -> bytes:
        """A bzImage: boot sector + setup sectors with the header, then protected-mode code wrapping the payload."""
        if payload is None:
            payload = Images.compress(Images.elf() if vmlinux is None else vmlinux, compression)
        setup = bytearray((max(setup_sects, 0) or 4) * 512 + 512)
        setup[0x1F1] = setup_sects
        struct.pack_into("<H", setup, 0x1FE, boot_flag)
        setup[0x200:0x202] = b"\xeb\x6a"
        setup[0x202:0x206] = magic
        struct.pack_into("<H", setup, 0x206, version)
        struct.pack_into("<H", setup, 0x20E, 0x400 - 0x200)
        banner = b"6.1.0-synthetic (test) #1 SMP\0"
        setup[0x400:0x400 + len(banner)] = banner
        setup[0x211] = 0x01
        struct.pack_into("<I", setup, 0x214, 0x100000)
        struct.pack_into("<I", setup, 0x22C, initrd_addr_max)
        struct.pack_into("<I", setup, 0x230, 0x200000)
        setup[0x234] = 1
        setup[0x235] = 21
        struct.pack_into("<H", setup, 0x236, xloadflags)
        struct.pack_into("<I", setup, 0x238, cmdline_size)
        struct.pack_into("<II", setup, 0x248, 0x400, len(payload))
        struct.pack_into("<QI", setup, 0x258, pref_address, init_size)
        protected = b"\x90" * 0x200 + b"\xcc" * 0x200 + payload + b"\0" * 16
        struct.pack_into("<I", setup, 0x1F4, len(protected) // 16)
        return bytes(setup) + protected


@pytest.fixture
def images() -> type[Images]:
    return Images


@pytest.fixture(autouse=True)
def _fresh_log_rate_limits():
    """The VMM's log lines are rate-limited per process (hypervisor/lazylog.py): each test starts afresh."""
    from hypervisor.lazylog import reset_rate_limits
    reset_rate_limits()
