"""pclite's VMM boots our kernel + initramfs with no firmware, through each entry path, to the probe line."""

import re

import pytest

from tests.support.artifacts import PROBE_CMDLINE, guest_artifacts
from tests.support.pclite import timeline_of, vmm_run
from tests.support.timing import time_until_line

READY = r"pclite-init: ready cpus=(\d+) mem_kib=(\d+)"


def boot_probe(kernel, initrd, *, boot, vcpus, mem_mib, cmdline=PROBE_CMDLINE, timeout_s=120):
    result = time_until_line(vmm_run(kernel, initrd, cmdline, mem_mib=mem_mib, vcpus=vcpus, boot=boot),
                             READY, timeout_s=timeout_s)
    assert result.seconds is not None, f"no ready line ({boot}, {vcpus} vCPU); output:\n{result.output[-3000:]}"
    cpus, mem_kib = map(int, re.search(READY, result.line).groups())
    timeline = timeline_of(result.output)
    assert timeline["exit_code"] == 0, timeline
    return cpus, mem_kib, timeline, result.seconds


@pytest.mark.parametrize("vcpus, mem_mib", [(1, 256), (2, 512)])
@pytest.mark.parametrize("path", ["vmlinux-pvh", "bzimage-64bit", "bzimage-unpack"])
def test_boot_paths_reach_init_with_requested_cpus_and_memory(path, vcpus, mem_mib):
    art = guest_artifacts()
    kernel, boot, kind = {"vmlinux-pvh": (art.vmlinux, "auto", "elf-pvh"),
                          "bzimage-64bit": (art.bzimage, "bzimage", "bzImage"),
                          "bzimage-unpack": (art.bzimage, "unpack", "bzImage-unpacked")}[path]
    cpus, mem_kib, timeline, seconds = boot_probe(kernel, art.initrd, boot=boot, vcpus=vcpus, mem_mib=mem_mib)
    assert cpus == vcpus
    assert (mem_mib - 40) * 1024 < mem_kib <= mem_mib * 1024
    assert timeline["boot"] == kind
    marks = timeline["timeline_ms"]
    assert marks["process_start"] <= marks["vm_created"] <= marks["first_kvm_run"] < marks["init_reached"]
    print(f"pclite {path} {vcpus} vCPU: ready in {seconds:.2f}s, timeline {marks}, exits {timeline['exits']}")


def test_stock_debian_cloud_kernel_boots_through_host_side_unpack():
    """A distro bzImage (LZ4, 14 MB) decompressed on the host and booted through PVH: no guest decompression.

    One vCPU: that kernel finds secondary CPUs only through ACPI, which a pclite microVM does not provide.
    """
    from pclitelab.assets import cached_stock_kernel
    stock = cached_stock_kernel()
    assert stock is not None, "stock kernel not fetched: `pclite-lab test` fetches it before entering the lab"
    art = guest_artifacts()
    cmdline = PROBE_CMDLINE + " pci=off"
    cpus, mem_kib, timeline, seconds = boot_probe(stock, art.initrd, boot="unpack", vcpus=1, mem_mib=512,
                                                  cmdline=cmdline, timeout_s=400)
    assert cpus == 1 and 400 * 1024 < mem_kib <= 512 * 1024
    assert timeline["boot"] == "bzImage-unpacked"
    print(f"Debian cloud kernel via host-side unpack: ready in {seconds:.1f}s, exits {timeline['exits']}")
