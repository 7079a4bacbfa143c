"""The guest initramfs: a deterministic cpio writer and the busybox + /init builder."""

from guestbuild.initramfs.builder import build_initramfs
from guestbuild.initramfs.cpio import CpioArchive

__all__ = ["CpioArchive", "build_initramfs"]
