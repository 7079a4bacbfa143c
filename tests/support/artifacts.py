"""The guest kernel and initramfs the tests boot; they must already be built (make test builds them first)."""

from dataclasses import dataclass
from pathlib import Path

from guestbuild.cache import cache_root
from guestbuild.kernel import cached_kernel

PROBE_CMDLINE = "console=ttyS0 quiet panic=-1 reboot=t pclite.mode=probe"


@dataclass(frozen=True)
class GuestArtifacts:
    bzimage: Path
    vmlinux: Path
    initrd: Path


def guest_artifacts() -> GuestArtifacts:
    kernel = cached_kernel()
    if kernel is None:
        raise RuntimeError("the guest kernel is not built: run `make kernel` (python -m guestbuild.kernel build)")
    from guestbuild.initramfs.builder import build_initramfs  # cached: a hit only stats the file
    return GuestArtifacts(kernel.bzimage, kernel.vmlinux, build_initramfs())


def results_dir() -> Path:
    path = cache_root() / "results"
    path.mkdir(parents=True, exist_ok=True)
    return path
