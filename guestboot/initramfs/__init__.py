"""The guest initramfs: a deterministic cpio writer and the busybox + /init builder."""

from guestboot.initramfs.builder import build_initramfs
from guestboot.initramfs.cpio import CpioArchive

__all__ = ["CpioArchive", "build_initramfs"]
