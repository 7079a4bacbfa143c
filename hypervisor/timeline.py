"""The boot timeline: named instants measured from process start, plus VM-exit counts by reason."""

from __future__ import annotations

import os
import time

_CLK_TCK = os.sysconf("SC_CLK_TCK")


def process_start_monotonic() -> float:
    """When this process started, on the CLOCK_MONOTONIC scale (10 ms resolution from /proc/self/stat)."""
    try:
        with open("/proc/self/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        started_since_boot = int(fields[19]) / _CLK_TCK
        uptime_now = time.clock_gettime(time.CLOCK_BOOTTIME)
        return time.monotonic() - (uptime_now - started_since_boot)
    except (OSError, IndexError, ValueError):
        return time.monotonic()


class Timeline:
    PHASES = ("process_start", "vmm_ready", "vm_created", "kernel_loaded", "first_kvm_run", "init_reached",
              "agent_ready", "stopped")

    def __init__(self, origin: float | None = None) -> None:
        """origin: when the VM was asked for (a fork server's request time), else this process's start."""
        self.origin = process_start_monotonic() if origin is None else origin
        self.marks: dict[str, float] = {"process_start": self.origin}

    def mark(self, name: str, when: float | None = None) -> None:
        self.marks.setdefault(name, time.monotonic() if when is None else when)

    def as_ms(self) -> dict[str, float]:
        return {name: round((t - self.origin) * 1000, 3) for name, t in
                sorted(self.marks.items(), key=lambda item: item[1])}
