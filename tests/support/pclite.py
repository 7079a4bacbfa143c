"""Command lines for pclite's own VMM, and reading its --timeline JSON."""

from __future__ import annotations

import json
from pathlib import Path

from hypervisor.launch import vmm_command


def vmm_run(kernel: Path, initrd: Path, cmdline: str, *, mem_mib: int = 256, vcpus: int = 1,
            boot: str = "auto") -> list[str]:
    return vmm_command(["run", "--kernel", str(kernel), "--initrd", str(initrd), "--cmdline", cmdline,
                        "--mem", str(mem_mib), "--vcpus", str(vcpus), "--boot", boot, "--timeline"])


def timeline_of(output: str) -> dict:
    for line in reversed(output.splitlines()):
        if line.startswith('{"timeline_ms"'):
            return json.loads(line)
    raise AssertionError(f"no --timeline JSON in the VMM output:\n{output[-2000:]}")
