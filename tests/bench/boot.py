"""pclite vs peers: process start → init reached, same kernel + initramfs, one run; phase split and VM exits.

Goal (issue 3): pclite's median <= 0.8x QEMU microvm's (direct vmlinux). Ratios only: lab figures are emulated.
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path

from common import RUNS, interleaved, ratio, summary  # noqa: I001

from tests.support.artifacts import PROBE_CMDLINE, guest_artifacts
from tests.support.pclite import ForkServer, timeline_of, vmm_args, vmm_run
from tests.support.qemu import microvm_direct, q35_seabios

FORKED = "pclite via its fork server, vmlinux via PVH"
FORKED_BZ = "pclite via its fork server, bzImage 64-bit"
FORKED_COLD = "pclite via its fork server, no warm VMM, PVH"


def _phase_split(outputs: list[str]) -> str:
    timelines = [timeline_of(out) for out in outputs]
    def med(name):
        values = [t["timeline_ms"].get(name) for t in timelines if name in t["timeline_ms"]]
        return statistics.median(values) if values else float("nan")
    exits = [sum(t["exits"].values()) for t in timelines]
    return (f"    phases (median ms from process start): vmm_ready {med('vmm_ready'):.0f}, "
            f"vm_created {med('vm_created'):.0f}, kernel_loaded {med('kernel_loaded'):.0f}, "
            f"first_kvm_run {med('first_kvm_run'):.0f}, init_reached {med('init_reached'):.0f}; "
            f"VM exits per boot {statistics.median(exits):.0f} ({timelines[0]['exits']})")


def main() -> None:
    art = guest_artifacts()
    print(f"== boot: pclite vs peers, {RUNS} interleaved rounds, cmdline {PROBE_CMDLINE!r}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("pvh", "bzimage"):
            (Path(tmp) / name).mkdir()
        # One server per series, as a pool's server boots one kind of VM: a warm VMM loads the last request's
        # images ahead, which interleaving two kernels on one server would defeat.
        with ForkServer(Path(tmp) / "pvh") as forkserver, ForkServer(Path(tmp) / "bzimage") as bz_forkserver, \
                ForkServer(Path(tmp), warm=False) as plain_forks:
            measured = _measure(art, forkserver, bz_forkserver, plain_forks)
    _report(measured)


def _measure(art, forkserver, bz_forkserver, plain_forks) -> dict:
    runs = {
        "pclite, vmlinux via PVH": vmm_run(art.vmlinux, art.initrd, PROBE_CMDLINE),
        "pclite, bzImage 64-bit entry": vmm_run(art.bzimage, art.initrd, PROBE_CMDLINE, boot="bzimage"),
        "pclite, bzImage host-unpacked → PVH": vmm_run(art.bzimage, art.initrd, PROBE_CMDLINE, boot="unpack"),
        FORKED: forkserver.starter(vmm_args(art.vmlinux, art.initrd, PROBE_CMDLINE)),
        FORKED_BZ: bz_forkserver.starter(vmm_args(art.bzimage, art.initrd, PROBE_CMDLINE, boot="bzimage")),
        FORKED_COLD: plain_forks.starter(vmm_args(art.vmlinux, art.initrd, PROBE_CMDLINE)),
        "QEMU microvm, direct vmlinux (PVH)": microvm_direct(art.vmlinux, art.initrd, PROBE_CMDLINE),
        "QEMU q35 + SeaBIOS, bzImage": q35_seabios(art.bzimage, art.initrd, PROBE_CMDLINE),
    }
    print("  columns: " + " | ".join(runs), flush=True)
    return interleaved(runs)


def _report(measured: dict) -> None:
    results = {name: seconds for name, (seconds, _) in measured.items()}
    for name, (seconds, outputs) in measured.items():
        print(summary(name, seconds), flush=True)
        if name.startswith("pclite") and outputs:
            print(_phase_split(outputs), flush=True)
    baseline = "QEMU microvm, direct vmlinux (PVH)"
    for name in measured:
        if name.startswith("pclite"):
            print(ratio(name, results[name], baseline, results[baseline]) + "   (goal <= 0.80x)")
    print(ratio("QEMU q35 + SeaBIOS, bzImage", results["QEMU q35 + SeaBIOS, bzImage"], baseline, results[baseline]))
    print("(the fork-server rows are timed from the request, as pclited starts VMs; the others from process start. "
          "A warm VMM was forked, made its empty KVM VM and loaded the previous request's kernel + initrd, before "
          "the request; 'no warm VMM' forks per request)")


if __name__ == "__main__":
    main()
