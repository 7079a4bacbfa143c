"""Prometheus metrics, one registry per app (tests run several apps in one process)."""

from __future__ import annotations

import contextlib

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from service.models import TEMPLATE_STATES, VM_STATES

BOOT_PHASES = ("vmm_setup", "kernel", "init_to_agent", "total")
# 100 µs … 60 s: a warm claim is sub-millisecond to milliseconds, a cold boot in an emulated lab is seconds.
BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
           10.0, 20.0, 30.0, 60.0)
CONTENT_TYPE = CONTENT_TYPE_LATEST
disable_created_metrics()  # no *_created series: they only double the scrape


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):  # process_*, python_*
            r.register(collector)
        self.build_info = Info("pclite_build", "pclited's version", registry=r)
        self.http_requests = Counter("pclite_http_requests", "HTTP requests by route template, method and status",
                                     ["route", "method", "status"], registry=r)
        self.http_duration = Histogram("pclite_http_request_duration_seconds", "HTTP request duration by route "
                                       "template and method", ["route", "method"], buckets=BUCKETS, registry=r)
        self.pool_degraded = Gauge("pclite_pool_degraded", "1 when the flavor's pool is degraded (boots keep "
                                   "failing: claims of it answer 503)", ["flavor"], registry=r)
        self.quota_limit = Gauge("pclite_quota_limit", "Configured quota by resource (vms, guest_mem_mib)",
                                 ["resource"], registry=r)
        self.quota_used = Gauge("pclite_quota_used", "Quota in use by resource: running or booting VMs and their "
                                "guest memory", ["resource"], registry=r)
        self.boot_phase = Histogram("pclite_boot_phase_seconds", "VM boot phases from the VMM timeline",
                                    ["phase", "flavor"], buckets=BUCKETS, registry=r)
        self.claim = Histogram("pclite_claim_seconds", "Time to answer a successful claim (POST /v1/vms)",
                               ["flavor", "result"], buckets=BUCKETS, registry=r)
        self.claims = Counter("pclite_claims", "Claims by result (hit: from the pool, miss: pool empty)",
                              ["flavor", "result"], registry=r)
        self.pool_ready = Gauge("pclite_pool_ready", "Ready VMs in the pool", ["flavor"], registry=r)
        self.pool_target = Gauge("pclite_pool_target", "Target number of ready VMs", ["flavor"], registry=r)
        self.vms = Gauge("pclite_vms", "VMs in the inventory by flavor and state", ["flavor", "state"], registry=r)
        self.vm_exits = Counter("pclite_vm_exits", "KVM exits of pclite VMs by reason (from the VMMs)",
                                ["reason"], registry=r)
        self.vmm_crashes = Counter("pclite_vmm_crashes", "VMM processes that died without being asked to",
                                   registry=r)
        # Clone pools (issue 7): how VMs were made and what their templates are doing.
        self.boot_to_ready = Histogram("pclite_boot_to_ready_seconds", "VMM start to agent ready, by how the VM "
                                       "was made (cold: booted; clone: restored from the template)",
                                       ["flavor", "source"], buckets=BUCKETS, registry=r)
        self.clone_fallbacks = Counter("pclite_clone_fallbacks", "Clones that failed to restore and were "
                                       "cold-booted instead", ["flavor"], registry=r)
        self.template_state = Gauge("pclite_template_state", "Clone template state per flavor (1 = current state)",
                                    ["flavor", "state"], registry=r)
        self.template_builds = Counter("pclite_template_builds", "Template builds (boot + snapshot) by result",
                                       ["flavor", "result"], registry=r)
        self.template_build = Histogram("pclite_template_build_seconds", "Time to build a template: cold boot to "
                                        "agent ready, snapshot, stop", ["flavor"], buckets=BUCKETS, registry=r)
        self.jail_enabled = Gauge("pclite_jail_enabled", "VMM jail features in force (1) or off (0): uid, mountns, "
                                  "pidns, netns, cgroup, seccomp", ["feature"], registry=r)
        self._flavors: set[str] = set()
        self._vm_flavors: set[str] = set()
        self._template_flavors: set[str] = set()
        self._exits_seen: dict[str, dict[str, int]] = {}

    def observe_boot(self, flavor: str, boot_ms: dict, source: str | None = "cold") -> None:
        """A VM reached its agent (source None: a template VM, which is no pool VM). A clone has no kernel or init
        phase: it adds to vmm_setup (up to its state restored) and total only."""
        if boot_ms.get("total") is not None and source is not None:
            self.boot_to_ready.labels(flavor, source).observe(boot_ms["total"] / 1000)
        for phase in BOOT_PHASES:
            if boot_ms.get(phase) is not None:
                self.boot_phase.labels(phase, flavor).observe(boot_ms[phase] / 1000)

    def set_jail(self, enabled: dict[str, bool]) -> None:
        for feature, on in enabled.items():
            self.jail_enabled.labels(feature).set(1 if on else 0)

    def set_version(self, version: str) -> None:
        self.build_info.info({"version": version})

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        self.http_requests.labels(route, method, str(status)).inc()
        self.http_duration.labels(route, method).observe(seconds)

    def set_pools(self, pools: dict[str, tuple[int, int]], degraded: set[str] = frozenset()) -> None:
        """{flavor: (ready, target)} and the degraded ones; flavors that went away lose their series."""
        for flavor in self._flavors - set(pools):
            for gauge in (self.pool_ready, self.pool_target, self.pool_degraded):
                with contextlib.suppress(KeyError):
                    gauge.remove(flavor)
        for flavor, (ready, target) in pools.items():
            self.pool_ready.labels(flavor).set(ready)
            self.pool_target.labels(flavor).set(target)
            self.pool_degraded.labels(flavor).set(1 if flavor in degraded else 0)
        self._flavors = set(pools)

    def set_quota(self, limits: dict[str, float], used: dict[str, float]) -> None:
        for resource, limit in limits.items():
            self.quota_limit.labels(resource).set(limit)
            self.quota_used.labels(resource).set(used.get(resource, 0))

    def set_templates(self, states: dict[str, str]) -> None:
        """{flavor: template state}: one series per state, 1 for the current one; gone flavors lose theirs."""
        for flavor in self._template_flavors - set(states):
            for state in TEMPLATE_STATES:
                with contextlib.suppress(KeyError):
                    self.template_state.remove(flavor, state)
        for flavor, current in states.items():
            for state in TEMPLATE_STATES:
                self.template_state.labels(flavor, state).set(1 if state == current else 0)
        self._template_flavors = set(states)

    def set_vm_states(self, counts: dict[tuple[str, str], int]) -> None:
        """{(flavor, state): VMs}: every state of a flavor seen has a series (0 when none)."""
        flavors = {flavor for flavor, _ in counts}
        for flavor in self._vm_flavors - flavors:
            for state in VM_STATES:
                with contextlib.suppress(KeyError):
                    self.vms.remove(flavor, state)
        for flavor in flavors:
            for state in VM_STATES:
                self.vms.labels(flavor, state).set(counts.get((flavor, state), 0))
        self._vm_flavors = flavors

    def record_exits(self, vm_id: str, exits: dict) -> None:
        """The VMM reports cumulative counts; the counter gets what is new since the last report."""
        seen = self._exits_seen.setdefault(vm_id, {})
        for reason, count in (exits or {}).items():
            if not isinstance(count, int):
                continue
            delta = count - seen.get(reason, 0)
            if delta > 0:
                self.vm_exits.labels(str(reason)).inc(delta)
            seen[reason] = max(count, seen.get(reason, 0))

    def forget_vm(self, vm_id: str) -> None:
        self._exits_seen.pop(vm_id, None)

    def render(self) -> bytes:
        return generate_latest(self.registry)
