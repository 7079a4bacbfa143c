"""Can this host's KVM boot an unmodified Linux guest? (No for kvm_pvm or no /dev/kvm.)"""

from __future__ import annotations

import os
from pathlib import Path


def in_lab() -> bool:
    return os.environ.get("PCLITE_IN_LAB") == "1"


def host_kvm_status(sys_module: Path = Path("/sys/module"), dev_kvm: Path = Path("/dev/kvm"),
                    cpuinfo: Path = Path("/proc/cpuinfo")) -> tuple[bool, str]:
    """(can boot Linux guests, one-line reason)."""
    if (sys_module / "kvm_pvm").exists():
        return False, ("/dev/kvm is served by kvm_pvm (nested, no VMX/SVM): unmodified guest kernel code is "
                       "emulated ~1000x slower and interrupts cannot be injected, so Linux cannot boot on it; "
                       "guest tests run in the lab (pclite-lab run)")
    if not dev_kvm.exists():
        return False, "no /dev/kvm: load kvm_intel or kvm_amd (needs VMX/SVM), or use the lab (pclite-lab run)"
    if not os.access(dev_kvm, os.R_OK | os.W_OK):
        return False, f"{dev_kvm} is not readable and writable by this user: add it to the kvm group or run as root"
    for vendor in ("kvm_intel", "kvm_amd"):
        if (sys_module / vendor).exists():
            where = "inside the lab" if in_lab() else "on this host"
            return True, f"/dev/kvm is served by {vendor} {where}: Linux guests boot directly"
    try:
        flags = cpuinfo.read_text()
    except OSError:
        flags = ""
    if " vmx" in flags or " svm" in flags:
        return True, "/dev/kvm present and the CPU has VMX/SVM: Linux guests boot directly"
    return False, "/dev/kvm is present but no kvm_intel/kvm_amd module is loaded and the CPU shows no VMX/SVM"
