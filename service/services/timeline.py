"""A boot's phases, from the timeline a VMM reports (`--timeline`): what the boot metrics and a VM's boot_ms show."""

from __future__ import annotations

from service.models import CLONE, COLD


def boot_phases(timeline_ms: dict | None, source: str = COLD) -> dict | None:
    """Per-phase milliseconds from the VMM's timeline (keys appear as reached). A clone loads no kernel: its
    set-up runs to `restored` (snapshot read, state back) and it has no kernel or init phase."""
    t = timeline_ms or {}

    def span(start: str, end: str) -> float | None:
        if isinstance(t.get(start), int | float) and isinstance(t.get(end), int | float):
            return round(t[end] - t[start], 3)
        return None

    if source == CLONE:
        phases = {"vmm_setup": span("process_start", "restored"), "kernel": None, "init_to_agent": None,
                  "total": span("process_start", "agent_ready")}
    else:
        phases = {"vmm_setup": span("process_start", "first_kvm_run"), "kernel": span("first_kvm_run", "init_reached"),
                  "init_to_agent": span("init_reached", "agent_ready"), "total": span("process_start", "agent_ready")}
    return phases if any(v is not None for v in phases.values()) else None
