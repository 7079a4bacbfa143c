"""The loader on pclite's real guest kernel (LZ4 bzImage + vmlinux with CONFIG_PVH=y): no KVM needed."""

from __future__ import annotations

import functools

import pytest

from guestboot.elf import parse_elf
from guestboot.layout import MIB, ram_regions
from guestboot.loader import check_in_ram, check_no_overlap, plan_boot
from guestbuild.kernel import cached_kernel

MEM = 256 * MIB


@functools.cache
def _read_kernel() -> tuple[bytes, bytes] | None:
    artifacts = cached_kernel()
    return None if artifacts is None else (artifacts.bzimage.read_bytes(), artifacts.vmlinux.read_bytes())


def _kernel() -> tuple[bytes, bytes]:
    """(bzImage, vmlinux); a missing kernel fails each test (never a skip): the loader must be checked on it."""
    kernel = _read_kernel()
    if kernel is None:
        pytest.fail("the guest kernel is not built: run `python -m guestbuild.kernel build` first")
    return kernel


def _sane(plan):
    check_no_overlap(plan.segments)
    check_in_ram(plan.segments, ram_regions(MEM))


def test_real_bzimage():
    bzimage, _ = _kernel()
    plan = plan_boot(bzimage, initrd=b"\0" * 4096, cmdline="console=ttyS0", mem_bytes=MEM, boot="bzimage")
    assert (plan.entry_mode, plan.kernel_format) == ("linux64", "bzImage")
    assert plan.details["compression"] == "lz4"
    assert tuple(map(int, plan.details["protocol"].split("."))) >= (2, 12)
    assert plan.details["kernel_version"].startswith("6.1")
    assert plan.entry == plan.details["load_addr"] + 0x200
    _sane(plan)


def test_real_bzimage_unpacked_to_pvh():
    bzimage, _ = _kernel()
    plan = plan_boot(bzimage, initrd=b"\0" * 4096, cmdline="console=ttyS0", mem_bytes=MEM, boot="unpack")
    assert (plan.entry_mode, plan.kernel_format) == ("pvh", "bzImage-unpacked"), plan.details.get("fallback")
    assert plan.details["compression"] == "lz4" and plan.details["unpacked_bytes"] > 4 * MIB
    _sane(plan)


def test_real_vmlinux_pvh():
    bzimage, vmlinux = _kernel()
    plan = plan_boot(vmlinux, initrd=b"\0" * 4096, cmdline="console=ttyS0", mem_bytes=MEM)
    assert (plan.entry_mode, plan.kernel_format) == ("pvh", "elf-pvh")
    unpacked = plan_boot(bzimage, mem_bytes=MEM, boot="pvh")
    assert plan.entry == unpacked.entry == parse_elf(vmlinux).pvh_entry  # same build, same PVH entry
    _sane(plan)
