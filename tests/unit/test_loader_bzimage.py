"""bzImage setup header parsing and host-side payload unpacking."""

from __future__ import annotations

import struct

import pytest

from guestboot.bzimage import (
    header_bytes,
    kernel_version_string,
    parse_setup_header,
    payload,
    protected_mode_code,
    unpack_bzimage,
)
from guestboot.plan import LoaderError

COMPRESSIONS = ["gzip", "xz", "lzma", "bzip2", "lz4", "zstd"]


def test_header_fields(images):
    image = images.bzimage(init_size=0x123000, cmdline_size=1023)
    header = parse_setup_header(image)
    assert header.protocol == "2.15"
    assert header.setup_sects == 4 and header.setup_size == 5 * 512
    assert header.pref_address == 0x1000000 and header.init_size == 0x123000
    assert header.kernel_alignment == 0x200000 and header.relocatable_kernel == 1
    assert header.initrd_addr_max == 0x7FFFFFFF and header.cmdline_size == 1023
    assert header.xloadflags & 1
    assert header.payload_offset == 0x400 and header.payload_length > 0
    assert header.header_end == 0x26C
    assert bytes(header_bytes(image, header)) == image[0x1F1:0x26C]
    assert kernel_version_string(image, header) == "6.1.0-synthetic (test) #1 SMP"


def test_setup_sects_zero_means_four(images):
    image = images.bzimage(setup_sects=0)
    header = parse_setup_header(image)
    assert header.setup_sects == 4
    assert bytes(protected_mode_code(image, header)[:0x200]) == b"\x90" * 0x200


def test_protected_mode_code_is_a_view(images):
    image = images.bzimage(setup_sects=7)
    code = protected_mode_code(image, parse_setup_header(image))
    assert isinstance(code, memoryview) and code.obj is image
    assert len(code) == len(image) - 8 * 512


@pytest.mark.parametrize("name", COMPRESSIONS)
def test_unpack_round_trip(images, name):
    vmlinux = images.elf()
    image = images.bzimage(vmlinux, compression=name)
    detected, data = payload(image)
    assert detected == name
    assert bytes(data) == images.compress(vmlinux, name)
    assert unpack_bzimage(image) == vmlinux


def test_lz4_several_blocks_and_frames(images):
    vmlinux = images.elf(segments=[(0x1000000, bytes(range(256)) * 300, 0x20000)])
    payload_bytes = images.compress(vmlinux, "lz4", lz4_block=4096, lz4_frames=3)
    assert payload_bytes.count(struct.pack("<I", 0x184C2102)) >= 3
    assert unpack_bzimage(images.bzimage(payload=payload_bytes)) == vmlinux


def test_lz4_without_size_trailer(images):
    vmlinux = images.elf()
    assert unpack_bzimage(images.bzimage(payload=images.compress(vmlinux, "lz4")[:-4])) == vmlinux


def test_zstd_with_content_size_and_odd_trailer(images):
    import zstandard

    vmlinux = images.elf()
    data = zstandard.ZstdCompressor(write_content_size=True).compress(vmlinux) + b"\0" * 7
    assert unpack_bzimage(images.bzimage(payload=data)) == vmlinux


def test_lzo_is_refused(images):
    image = images.bzimage(compression="lzo")
    assert payload(image)[0] == "lzo"
    with pytest.raises(LoaderError, match="LZO-compressed.*CONFIG_KERNEL_LZ4"):
        unpack_bzimage(image)


def test_unknown_compression(images):
    with pytest.raises(LoaderError, match="unknown compression.*expected gzip, xz"):
        payload(images.bzimage(payload=b"\x00\x01\x02\x03garbage"))


@pytest.mark.parametrize("name", ["gzip", "xz", "zstd"])
def test_truncated_payload(images, name):
    data = images.compress(images.elf(), name)
    with pytest.raises(LoaderError, match=f"{name} payload.*(ends before|corrupt)"):
        unpack_bzimage(images.bzimage(payload=data[: len(data) // 2]))


def test_truncated_lz4_block(images):
    data = images.compress(images.elf(), "lz4")
    with pytest.raises(LoaderError, match="lz4 block .* claims .* bytes but only"):
        unpack_bzimage(images.bzimage(payload=data[:40]))


def test_size_trailer_mismatch(images):
    data = images.compress(images.elf(), "xz")[:-4] + struct.pack("<I", 12345)
    with pytest.raises(LoaderError, match="size trailer says 12345"):
        unpack_bzimage(images.bzimage(payload=data))


def test_payload_not_elf(images):
    with pytest.raises(LoaderError, match="not an ELF vmlinux"):
        unpack_bzimage(images.bzimage(payload=images.compress(b"just text" * 10, "gzip")))


def test_truncated_file(images):
    with pytest.raises(LoaderError, match="bzImage truncated: 100 bytes.*is the file complete"):
        parse_setup_header(images.bzimage()[:100])


def test_truncated_after_setup(images):
    with pytest.raises(LoaderError, match="bzImage truncated: 2560 bytes but setup alone is 2560"):
        parse_setup_header(images.bzimage()[:2560])


def test_payload_past_end(images):
    image = images.bzimage()
    with pytest.raises(LoaderError, match="payload .* past the end"):
        parse_setup_header(image[:-100])


def test_bad_boot_flag(images):
    with pytest.raises(LoaderError, match="not a bzImage: boot_flag at 0x1FE is 0x1234, expected 0xAA55"):
        parse_setup_header(images.bzimage(boot_flag=0x1234))


def test_bad_magic(images):
    with pytest.raises(LoaderError, match="no 'HdrS' magic at 0x202"):
        parse_setup_header(images.bzimage(magic=b"Hdrs"))


def test_protocol_too_old(images):
    with pytest.raises(LoaderError, match=r"protocol 2\.09 is too old: pclite needs 2\.10"):
        parse_setup_header(images.bzimage(version=0x0209))


def test_not_64_bit(images):
    with pytest.raises(LoaderError, match="no 64-bit entry .*XLF_KERNEL_64.*x86_64"):
        parse_setup_header(images.bzimage(xloadflags=0))
