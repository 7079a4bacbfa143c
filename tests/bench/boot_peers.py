"""Peer baselines: process start → `pclite-init: ready` for QEMU boot paths, same kernel + initramfs, one run.

Run where KVM can boot Linux (`make bench` puts it in the lab on hosts like ours). Prints medians and ratios.
"""

from __future__ import annotations

from common import RUNS, repeat, summary  # noqa: I001

from tests.support.artifacts import PROBE_CMDLINE, guest_artifacts
from tests.support.qemu import microvm_direct, microvm_qboot, microvm_seabios, q35_seabios


def peer_commands() -> dict[str, list[str]]:
    art = guest_artifacts()
    return {
        "QEMU microvm, direct vmlinux (PVH)": microvm_direct(art.vmlinux, art.initrd, PROBE_CMDLINE),
        "QEMU microvm + qboot, bzImage": microvm_qboot(art.bzimage, art.initrd, PROBE_CMDLINE),
        "QEMU microvm + bios-microvm.bin, bzImage": microvm_seabios(art.bzimage, art.initrd, PROBE_CMDLINE),
        "QEMU q35 + SeaBIOS, bzImage": q35_seabios(art.bzimage, art.initrd, PROBE_CMDLINE),
    }


def main() -> dict[str, list[float]]:
    print(f"== boot_peers: process start → ready line, {RUNS} runs each, cmdline {PROBE_CMDLINE!r}", flush=True)
    results = {}
    for name, cmd in peer_commands().items():
        results[name], _ = repeat(name, cmd)
        print(summary(name, results[name]), flush=True)
    return results


if __name__ == "__main__":
    main()
