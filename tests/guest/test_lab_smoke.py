"""The lab smoke test: QEMU microvm under the lab's real KVM boots our kernel + initramfs to the probe line."""

import re

import pytest

from tests.support.artifacts import PROBE_CMDLINE, guest_artifacts
from tests.support.qemu import microvm_direct
from tests.support.timing import time_until_line

READY = r"pclite-init: ready cpus=(\d+) mem_kib=(\d+)"


@pytest.mark.parametrize("vcpus", [1, 2])
def test_qemu_microvm_boots_our_kernel_to_probe_line(vcpus):
    art = guest_artifacts()
    boot = time_until_line(microvm_direct(art.vmlinux, art.initrd, PROBE_CMDLINE, mem_mib=256, vcpus=vcpus),
                           READY, timeout_s=120)
    assert boot.seconds is not None, f"no ready line from QEMU microvm; console:\n{boot.output[-3000:]}"
    cpus, mem_kib = map(int, re.search(READY, boot.line).groups())
    assert cpus == vcpus
    assert 200 * 1024 < mem_kib <= 256 * 1024, mem_kib
    print(f"QEMU microvm (PVH, {vcpus} vCPU) → ready line in {boot.seconds:.2f}s")
