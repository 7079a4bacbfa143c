"""QEMU command lines for the peer baselines (run where /dev/kvm can boot Linux: the lab or real hardware)."""

from __future__ import annotations

from pathlib import Path

QEMU = "qemu-system-x86_64"
COMMON = ["-enable-kvm", "-cpu", "host", "-nodefaults", "-no-user-config", "-nographic", "-serial", "stdio",
          "-no-reboot"]


def microvm_direct(vmlinux: Path, initrd: Path, cmdline: str, mem_mib: int = 256, vcpus: int = 1) -> list[str]:
    """QEMU microvm loading the vmlinux itself (PVH) with option ROMs off: the closest peer to pclite."""
    return [QEMU, "-M", "microvm,x-option-roms=off,acpi=off", *COMMON, "-m", str(mem_mib), "-smp", str(vcpus),
            "-kernel", str(vmlinux), "-initrd", str(initrd), "-append", cmdline]


def microvm_qboot(bzimage: Path, initrd: Path, cmdline: str, mem_mib: int = 256, vcpus: int = 1) -> list[str]:
    """QEMU microvm with its qboot firmware booting the bzImage."""
    return [QEMU, "-M", "microvm,acpi=off", "-bios", "qboot.rom", *COMMON, "-m", str(mem_mib),
            "-smp", str(vcpus), "-kernel", str(bzimage), "-initrd", str(initrd), "-append", cmdline]


def microvm_seabios(bzimage: Path, initrd: Path, cmdline: str, mem_mib: int = 256, vcpus: int = 1) -> list[str]:
    """QEMU microvm with bios-microvm.bin (SeaBIOS for microvm) booting the bzImage."""
    return [QEMU, "-M", "microvm,acpi=off", "-bios", "bios-microvm.bin", *COMMON, "-m", str(mem_mib),
            "-smp", str(vcpus), "-kernel", str(bzimage), "-initrd", str(initrd), "-append", cmdline]


def q35_seabios(bzimage: Path, initrd: Path, cmdline: str, mem_mib: int = 256, vcpus: int = 1) -> list[str]:
    """A classic PC: q35 + SeaBIOS, bzImage through the linuxboot option ROM."""
    return [QEMU, "-M", "q35", *COMMON, "-m", str(mem_mib), "-smp", str(vcpus),
            "-kernel", str(bzimage), "-initrd", str(initrd), "-append", cmdline]
