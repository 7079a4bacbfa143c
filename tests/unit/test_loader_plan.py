"""plan_boot end to end on synthetic images: entry choice, segment placement, e820, initrd, errors."""

from __future__ import annotations

import struct

import pytest

from guestboot.bootparams import read_e820
from guestboot.layout import CMDLINE_ADDR, GIB, MIB, MPTABLE_ADDR, PVH_START_INFO_ADDR, ZERO_PAGE_ADDR, ram_regions
from guestboot.loader import check_in_ram, check_no_overlap, e820_map, place_initrd, plan_boot
from guestboot.plan import LoaderError, Segment

INITRD = b"\x07" * 5000


def by_what(plan, what):
    return [s for s in plan.segments if s.what == what]


def assert_sane(plan, mem_bytes):
    check_no_overlap(plan.segments)
    check_in_ram(plan.segments, ram_regions(mem_bytes))


def test_bzimage_auto(images):
    image = images.bzimage()
    plan = plan_boot(image, initrd=INITRD, cmdline="console=ttyS0", mem_bytes=256 * MIB)
    assert (plan.entry_mode, plan.kernel_format) == ("linux64", "bzImage")
    assert plan.entry == 0x1000200 and plan.boot_info == ZERO_PAGE_ADDR
    (kernel,) = by_what(plan, "kernel")
    assert kernel.gpa == 0x1000000 and bytes(kernel.data) == image[5 * 512:] and kernel.data.obj is image
    assert plan.details["protocol"] == "2.15" and plan.details["compression"] == "gzip"
    assert plan.e820 == [(0, 0x9FC00, 1), (0x9FC00, 0x60400, 2), (MIB, 255 * MIB, 1)]
    (initrd,) = by_what(plan, "initrd")
    assert initrd.gpa == 256 * MIB - 8192 and initrd.gpa % 4096 == 0 and bytes(initrd.data) == INITRD
    (cmdline,) = by_what(plan, "cmdline")
    assert cmdline.gpa == CMDLINE_ADDR and cmdline.data == b"console=ttyS0\0"
    (zero,) = by_what(plan, "zero page")
    assert zero.gpa == ZERO_PAGE_ADDR and zero.data[0x1F1:0x210] == image[0x1F1:0x210]
    assert struct.unpack_from("<II", zero.data, 0x218) == (initrd.gpa, len(INITRD))
    assert struct.unpack_from("<I", zero.data, 0x228)[0] == CMDLINE_ADDR
    assert read_e820(zero.data) == plan.e820
    assert by_what(plan, "mptable")[0].gpa == MPTABLE_ADDR
    assert [s.what for s in plan.segments].count("page tables") == 3
    assert_sane(plan, 256 * MIB)


def test_elf_with_pvh_note(images):
    plan = plan_boot(images.elf(), initrd=INITRD, mem_bytes=128 * MIB, vcpus=2)
    assert (plan.entry_mode, plan.kernel_format, plan.entry) == ("pvh", "elf-pvh", images.PVH_ENTRY)
    assert plan.boot_info == PVH_START_INFO_ADDR
    assert [(s.gpa, len(s.data)) for s in by_what(plan, "kernel")] == [(0x1000000, 0x3000), (0x1200000, 0x800)]
    (info,) = by_what(plan, "start info")
    assert struct.unpack_from("<II", info.data) == (0x336EC578, 1)
    assert not by_what(plan, "zero page") and not by_what(plan, "page tables")
    assert_sane(plan, 128 * MIB)


def test_elf_without_pvh_note_uses_64_bit_entry(images):
    plan = plan_boot(images.elf(pvh_entry=None), mem_bytes=64 * MIB)
    assert (plan.entry_mode, plan.kernel_format, plan.entry) == ("linux64", "elf64", images.KERNEL_PADDR)
    (zero,) = by_what(plan, "zero page")
    assert zero.data[0x202:0x206] == b"HdrS" and zero.data[0x210] == 0xFF
    assert plan_boot(images.elf(), mem_bytes=64 * MIB, boot="elf64").kernel_format == "elf64"


@pytest.mark.parametrize("name", ["gzip", "xz", "lz4", "zstd"])
@pytest.mark.parametrize("boot", ["pvh", "unpack"])
def test_bzimage_unpacked_to_pvh(images, name, boot):
    vmlinux = images.elf()
    plan = plan_boot(images.bzimage(vmlinux, compression=name), initrd=INITRD, mem_bytes=128 * MIB, boot=boot)
    assert (plan.entry_mode, plan.kernel_format, plan.entry) == ("pvh", "bzImage-unpacked", images.PVH_ENTRY)
    assert plan.details["compression"] == name and plan.details["unpacked_bytes"] == len(vmlinux)
    assert "fallback" not in plan.details
    assert_sane(plan, 128 * MIB)


def test_unpack_falls_back_without_pvh_note(images):
    plan = plan_boot(images.bzimage(images.elf(pvh_entry=None)), mem_bytes=128 * MIB, boot="unpack")
    assert (plan.entry_mode, plan.kernel_format, plan.entry) == ("linux64", "bzImage", 0x1000200)
    assert "no PVH entry note" in plan.details["fallback"]


def test_unpack_falls_back_for_lzo(images):
    plan = plan_boot(images.bzimage(compression="lzo"), mem_bytes=128 * MIB, boot="unpack")
    assert plan.kernel_format == "bzImage" and "LZO" in plan.details["fallback"]


def test_pvh_required_but_missing(images):
    with pytest.raises(LoaderError, match="boot='pvh' cannot use this bzImage .*CONFIG_PVH=y"):
        plan_boot(images.bzimage(images.elf(pvh_entry=None)), mem_bytes=128 * MIB, boot="pvh")
    with pytest.raises(LoaderError, match="boot='pvh' but the vmlinux has no PVH entry note"):
        plan_boot(images.elf(pvh_entry=None), mem_bytes=128 * MIB, boot="pvh")


@pytest.mark.parametrize(("boot", "message"), [("bzimage", "needs a bzImage but the kernel is an ELF"),
                                               ("unpack", "needs a bzImage but the kernel is an ELF"),
                                               ("uefi", "unknown boot mode 'uefi'")])
def test_boot_mode_mismatch(images, boot, message):
    with pytest.raises(LoaderError, match=message):
        plan_boot(images.elf(), mem_bytes=128 * MIB, boot=boot)


def test_elf64_mode_needs_elf(images):
    with pytest.raises(LoaderError, match="boot='elf64' needs an ELF vmlinux"):
        plan_boot(images.bzimage(), mem_bytes=128 * MIB, boot="elf64")


def test_large_memory_splits_around_the_hole(images):
    mem = 4 * GIB
    plan = plan_boot(images.bzimage(), initrd=INITRD, mem_bytes=mem)
    assert plan.e820[-2:] == [(MIB, 3 * GIB - MIB, 1), (4 * GIB, GIB, 1)]
    assert by_what(plan, "initrd")[0].gpa == 2 * GIB - 8192  # the bzImage's initrd_addr_max is 2 GiB - 1
    elf_plan = plan_boot(images.elf(), initrd=INITRD, mem_bytes=mem)
    assert by_what(elf_plan, "initrd")[0].gpa == 3 * GIB - 8192  # top of low RAM, below the MMIO hole
    assert_sane(plan, mem)
    assert e820_map(8 * GIB)[-1] == (4 * GIB, 5 * GIB, 1)


def test_initrd_goes_below_the_kernel_when_the_top_is_taken():
    assert place_initrd(MIB, kernel=(16 * MIB, 40 * MIB), limit=40 * MIB) == 15 * MIB
    assert place_initrd(MIB, kernel=(16 * MIB, 20 * MIB), limit=100 * MIB) == 99 * MIB


def test_initrd_too_big(images):
    with pytest.raises(LoaderError, match=r"initrd \(200 MiB\) does not fit .*more memory \(--mem\) or a smaller"):
        plan_boot(images.bzimage(), initrd=bytes(200 * MIB), mem_bytes=128 * MIB)


def test_empty_initrd(images):
    with pytest.raises(LoaderError, match="initrd is empty"):
        plan_boot(images.bzimage(), initrd=b"", mem_bytes=128 * MIB)


def test_cmdline_too_long(images):
    with pytest.raises(LoaderError, match="command line is 3000 bytes, the limit is 2047"):
        plan_boot(images.elf(), cmdline="x" * 3000, mem_bytes=128 * MIB)
    with pytest.raises(LoaderError, match="command line is 300 bytes, the limit is 255"):
        plan_boot(images.bzimage(cmdline_size=255), cmdline="x" * 300, mem_bytes=128 * MIB)


def test_ram_too_small(images):
    with pytest.raises(LoaderError, match="16 MiB of RAM is too small: this kernel needs at least 32 MiB"):
        plan_boot(images.bzimage(), mem_bytes=16 * MIB)
    with pytest.raises(LoaderError, match="64 MiB of RAM is too small: this kernel needs at least 88 MiB"):
        plan_boot(images.bzimage(init_size=64 * MIB), mem_bytes=64 * MIB)


def test_memory_not_page_multiple(images):
    with pytest.raises(LoaderError, match="not a multiple of 4 KiB"):
        plan_boot(images.elf(), mem_bytes=64 * MIB + 1)


def test_bad_vcpus(images):
    with pytest.raises(LoaderError, match="0 vCPUs"):
        plan_boot(images.elf(), mem_bytes=64 * MIB, vcpus=0)


def test_kernel_outside_ram(images):
    image = images.elf(segments=[(3 * GIB + MIB, b"\xf4" * 16, 16)], entry=3 * GIB + MIB, pvh_entry=None)
    with pytest.raises(LoaderError, match="kernel .* is outside guest RAM"):
        plan_boot(image, mem_bytes=4 * GIB)


def test_entry_outside_segments(images):
    with pytest.raises(LoaderError, match="e_entry 0x5000000 is outside every PT_LOAD"):
        plan_boot(images.elf(entry=0x5000000, pvh_entry=None), mem_bytes=64 * MIB)


def test_garbage_kernel():
    with pytest.raises(LoaderError, match="not a bzImage.*or an ELF vmlinux"):
        plan_boot(bytes(4096), mem_bytes=64 * MIB)


def test_check_no_overlap():
    check_no_overlap([Segment(0x1000, b"a" * 16, "a"), Segment(0x1010, b"b", "b")])
    with pytest.raises(LoaderError, match=r"overlap: a \[0x1000, 0x1010\) and b \[0x100f, 0x1010\)"):
        check_no_overlap([Segment(0x1000, b"a" * 16, "a"), Segment(0x100F, b"b", "b")])
