"""The pool manager: per flavor, keep `pool_target` ready VMs; boot them, claim them, back off on failures.

One asyncio task loop (woken early by claims and VM exits, through the shared `Wakeup`) compares the inventory with
each flavor's target: it starts background boots (at most `boot_concurrency` in flight), retires surplus, stale and
over-age ready VMs, and backs a flavor off exponentially after boot failures (degraded after `degrade_after_failures`
in a row).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from service.core.config import Settings
from service.metrics import Metrics
from service.models import BOOTING, CLAIMED, CLONE, COLD, FAILED, READY, TERMINAL_STATES, VM, Flavor, utcnow
from service.services.errors import NotFound, QuotaExceeded, Unavailable
from service.services.flavors import FlavorService
from service.services.inventory import Inventory
from service.services.timeline import boot_phases
from service.services.vmm import VMM_ERRORS, VMM_LOG, Launcher, LaunchError
from service.services.work import BOOT, STOP, Wakeup, Work, blocking

log = logging.getLogger("pclited")


@dataclass
class PoolHealth:
    failures: int = 0  # consecutive boot failures
    backoff_until: float = 0.0  # monotonic
    last_error: str | None = None
    quota: str | None = None  # why a refill was refused, while it is
    waiting: str | None = None  # why refills wait (the flavor's first template is being built)


class BootError(Exception):
    def __init__(self, reason: str, code: int | None = None, crashed: bool = False, started: bool = True) -> None:
        super().__init__(reason)
        self.reason, self.code, self.crashed = reason, code, crashed
        self.started = started  # False: no VMM ran (nothing to say about a clone's template)


class _Released(Exception):
    """The VM left BOOTING while its VMM was being started (it was deleted)."""


class Templates(Protocol):
    """What the pool asks of clone templates (templates.TemplateManager)."""

    def plan(self, flavor: Flavor) -> tuple[str | None, str | None]: ...

    async def tick(self, flavors: list[Flavor], live_templates: set[str]) -> None: ...

    async def restore_failed(self, flavor_name: str, dir_name: str, reason: str, fallback: bool = True) -> None: ...


StopVm = Callable[..., Awaitable[VM]]  # supervisor.Supervisor.stop_vm(vm_id, reason, from_states, kind=...)


class PoolManager:
    """Keeps each flavor's pool at its target and serves claims. Boots run as `work` (BOOT, vm id); VMs leave the
    pool through `stop_vm`; `wake` (which `run` waits on) is rung by whoever frees room or a VM."""

    def __init__(self, settings: Settings, inventory: Inventory, flavors: FlavorService, launcher: Launcher,
                 metrics: Metrics, work: Work, wake: Wakeup, templates: Templates, stop_vm: StopVm) -> None:
        self.settings = settings
        self.inventory, self.flavors, self.launcher, self.metrics = inventory, flavors, launcher, metrics
        self.work, self.wake, self.templates, self.stop_vm = work, wake, templates, stop_vm
        self.health: dict[str, PoolHealth] = defaultdict(PoolHealth)
        self.refills: set[str] = set()  # background boots in flight (the concurrency cap counts these)
        self.claim_waiters: dict[str, bool] = {}  # cold boots: True while their claimant still waits
        self.boot_s_estimate = 5.0  # moving average of boot totals: the Retry-After hint

    async def run(self) -> None:
        while True:
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - one bad tick must not stop the pools
                log.exception("pool tick failed")
            await self.wake.wait(self.settings.pool_tick_s)

    # --- the loop -------------------------------------------------------------------------------------------
    async def tick(self) -> None:
        flavors = await asyncio.to_thread(self.flavors.list)
        live = await asyncio.to_thread(self.inventory.live_brief)
        await self.templates.tick(flavors, {vm.template for vm in live if vm.template})
        by_flavor: dict[str, list[VM]] = defaultdict(list)
        for vm in live:
            by_flavor[vm.flavor].append(vm)
        gauges = {}
        for flavor in flavors:
            gauges[flavor.name] = (await self._balance(flavor, by_flavor.pop(flavor.name, [])), flavor.pool_target)
        for name, vms in by_flavor.items():
            await self._drain(name, vms)
        for name in set(self.health) - {f.name for f in flavors}:
            del self.health[name]
        degraded = {f.name for f in flavors if self.degraded_reason(f, gauges[f.name][0])}
        self.metrics.set_pools(gauges, degraded)
        self.metrics.set_vm_states(await asyncio.to_thread(self.inventory.flavor_state_counts))
        # Each row's own mem_mib, as new_vm's quota check counts it (a flavor's may have changed since).
        self.metrics.set_quota({"vms": self.settings.max_vms, "guest_mem_mib": self.settings.max_guest_mem_mib},
                               {"vms": len(live), "guest_mem_mib": sum(vm.mem_mib for vm in live)})

    async def drain(self, flavor_name: str) -> None:
        """The flavor was deleted: stop its pool (claimed VMs stay their claimants')."""
        await self._drain(flavor_name, await asyncio.to_thread(self.inventory.list, flavor_name))

    async def _drain(self, flavor_name: str, vms: list[VM]) -> None:
        for vm in vms:
            if vm.state == READY or (vm.state == BOOTING and vm.pooled):
                await self.stop_vm(vm.id, f"flavor {flavor_name} was deleted", (READY, BOOTING),
                                   kind="vm.retired")

    async def _balance(self, flavor: Flavor, vms: list[VM]) -> int:
        """Retire what should not be in the pool, start boots for what is missing; returns the ready count."""
        now = utcnow()
        ready = sorted((vm for vm in vms if vm.state == READY), key=lambda vm: (vm.ready_at or now, vm.id))
        retire: list[tuple[VM, str]] = []
        keep: list[VM] = []
        for vm in ready:
            age = (now - (vm.ready_at or now)).total_seconds()
            if vm.flavor_generation != flavor.generation:
                retire.append((vm, "flavor spec changed"))
            elif flavor.max_age_s and age > flavor.max_age_s:
                retire.append((vm, f"older than max_age_s={flavor.max_age_s}"))
            else:
                keep.append(vm)
        booting = [vm for vm in vms if vm.state == BOOTING and vm.pooled and vm.flavor_generation == flavor.generation]
        surplus = len(keep) - flavor.pool_target  # booting ones are not counted: never retire a ready VM for them
        while surplus > 0 and keep:
            retire.append((keep.pop(0), f"pool target lowered to {flavor.pool_target}"))
            surplus -= 1
        for vm, why in retire:
            # Only from READY: a claim that got there first keeps its VM.
            await self.stop_vm(vm.id, f"retired: {why}", (READY,), kind="vm.retired")
        await self._refill(flavor, flavor.pool_target - len(keep) - len(booting))
        return len(keep)

    async def _refill(self, flavor: Flavor, deficit: int) -> None:
        health = self.health[flavor.name]
        if deficit <= 0:
            health.quota = health.waiting = None
            return
        if time.monotonic() < health.backoff_until:
            return
        slots = self.settings.boot_concurrency - len(self.refills)
        if health.failures:  # probing a failing flavor: one boot at a time
            boots = [self.work.get(BOOT, i) for i in self.refills]
            in_flight = any(task.get_name() == flavor.name for task in boots if task is not None)
            slots = 0 if in_flight else min(slots, 1)
        template, health.waiting = self.templates.plan(flavor)
        if health.waiting:  # the first template of this spec is on its way: clones will be much quicker
            return
        for _ in range(min(deficit, slots)):
            try:
                vm = await asyncio.to_thread(self.inventory.new_vm, flavor, pooled=True, template=template)
            except QuotaExceeded as exc:
                health.quota = exc.detail
                return
            health.quota = None
            self.refills.add(vm.id)
            self.start_boot(vm, flavor)

    # --- booting --------------------------------------------------------------------------------------------
    def start_boot(self, vm: VM, flavor: Flavor, *, adopted: bool = False) -> asyncio.Task:
        task = self.work.start(BOOT, vm.id, self._boot(vm, flavor, adopted), name=flavor.name)

        def done(_task) -> None:
            self.refills.discard(vm.id)
            self.wake()

        task.add_done_callback(done)
        return task

    async def _boot(self, vm: VM, flavor: Flavor, adopted: bool) -> VM | None:
        """Start the VMM (unless adopted) and wait for its agent; a clone that fails to restore is cold-booted
        instead. Returns the VM ready, or claimed when a claimant waits for it; None when it failed or was stopped
        meanwhile."""
        try:
            try:
                status = await self._start(vm, flavor, adopted)
            except BootError as exc:
                if vm.source != CLONE or not exc.started:
                    raise
                if not await self._fall_back(vm, flavor, exc):
                    return await self._release(vm)
                status = await self._start(vm, flavor, False)
        except _Released:
            return await self._release(vm)
        except BootError as exc:
            return await self._boot_failed(vm, flavor, exc)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - a bug must fail one VM, not the pool
            log.exception("boot of %s", vm.id)
            return await self._boot_failed(vm, flavor, BootError(f"internal error: {exc!r}"))
        return await self._booted(vm, flavor, status)

    async def _start(self, vm: VM, flavor: Flavor, adopted: bool) -> dict:
        since = None  # an adopted VM's timeout counts from its creation
        if not adopted:
            try:
                proc = await blocking(self.launcher.spawn, vm, flavor)
            except (LaunchError, OSError) as exc:
                raise BootError(f"could not start the VMM: {exc}", started=False) from exc
            vm.pid = proc.pid
            await asyncio.to_thread(self.inventory.update, vm.id, pid=proc.pid)
            if (await asyncio.to_thread(self.inventory.get, vm.id)).state != BOOTING:
                raise _Released  # deleted while its VMM was being started
            # The boot timeout is the VMM's: starting it (the fork server, the images) may have taken a while.
            since = utcnow()
        return await self._wait_agent(vm, grace_s=min(5.0, self.settings.boot_timeout_s) if adopted else 0.0,
                                      since=since)

    async def _fall_back(self, vm: VM, flavor: Flavor, error: BootError) -> bool:
        """The clone did not come up: record why, invalidate its template, make the VM a cold boot. False when the
        VM left BOOTING meanwhile (deleted)."""
        template = vm.template
        log.warning("%s (%s): restore from template %s failed, cold-booting instead: %s", vm.id, flavor.name,
                    template, error.reason)
        await blocking(self.launcher.stop, vm, 1.0)  # a clone that hangs must not linger
        vm_dir = Path(vm.console_path).parent
        with contextlib.suppress(OSError):  # its own log: the cold boot's failure must not quote the restore's
            os.replace(vm_dir / VMM_LOG, vm_dir / "vmm-restore.log")
        vm.source, vm.template, vm.pid = COLD, None, None
        moved = await asyncio.to_thread(
            self.inventory.transition, vm.id, (BOOTING,), BOOTING,
            [("vm.clone_fallback", f"restore from template {template} failed ({error.reason}); cold-booting instead")],
            source=COLD, template=None, pid=None)
        await self.templates.restore_failed(flavor.name, template, error.reason)
        return moved is not None

    async def _wait_agent(self, vm: VM, grace_s: float, since=None) -> dict:
        """The VMM's status once its agent is ready; BootError when the VMM dies or the boot times out. The
        timeout counts from `since` (its VMM's start), else the VM's creation (an adopted VM gets grace_s more, it
        may have been close)."""
        launcher = self.launcher
        elapsed = (utcnow() - (since or vm.created_at)).total_seconds()
        deadline = time.monotonic() + max(grace_s, self.settings.boot_timeout_s - elapsed)
        client, last_error = None, None
        while True:
            alive, code = launcher.exit_status(vm)
            if not alive:
                moved = await blocking(launcher.scan)  # a VMM that forked away from its launcher is still fine
                if moved.get(vm.api_socket) not in (None, vm.pid):
                    vm.pid = moved[vm.api_socket]
                    await asyncio.to_thread(self.inventory.update, vm.id, pid=vm.pid)
                    continue
                raise BootError(f"{launcher.describe_exit(vm, code)} (during boot)", code,
                                crashed=code is None or code < 0)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BootError(f"agent not ready within {self.settings.boot_timeout_s:g}s"
                                + (f" (last VMM answer: {last_error})" if last_error else ""))
            if not os.path.exists(vm.api_socket):
                await asyncio.sleep(0.01)
                continue
            try:
                client = client or launcher.client(vm, timeout=5.0)
                return await blocking(client.wait_agent_ready, min(1.0, remaining))
            except LaunchError as exc:
                raise BootError(str(exc)) from exc
            except VMM_ERRORS as exc:
                last_error = str(exc)[:300]
                await asyncio.sleep(0.02)  # then look at the process and the deadline again

    async def _booted(self, vm: VM, flavor: Flavor, status: dict) -> VM | None:
        timeline = status.get("timeline_ms") or {}
        phases = boot_phases(timeline, vm.source)
        now = utcnow()
        # The host's pid first: a jailed VMM is pid 1 of its own pid namespace, and says so in its status.
        fields = {"ready_at": now, "boot_ms": phases, "timeline_ms": timeline, "pid": vm.pid or status.get("pid")}
        total = (phases or {}).get("total")
        how = "restored" if vm.source == CLONE else "boot"
        ready_msg = f"agent ready ({how} {total:.0f} ms)" if total is not None else "agent ready"
        if self.claim_waiters.pop(vm.id, False):
            final = await asyncio.to_thread(self.inventory.transition, vm.id, (BOOTING,), CLAIMED,
                                            [("vm.ready", ready_msg), ("vm.claimed", "cold-booted for a claim (miss)")],
                                            claimed_at=now, **fields)
        else:  # a pool VM, or a cold boot whose claimant went away: it joins the pool
            final = await asyncio.to_thread(self.inventory.transition, vm.id, (BOOTING,), READY,
                                            [("vm.ready", ready_msg)], pooled=True, **fields)
        if final is None:
            return await self._release(vm)  # stopped while booting
        self.metrics.observe_boot(flavor.name, phases or {}, vm.source)
        self.metrics.record_exits(vm.id, status.get("exits") or {})
        if total is not None:
            self.boot_s_estimate = 0.8 * self.boot_s_estimate + 0.2 * total / 1000
        health = self.health[flavor.name]
        if health.failures >= self.settings.degrade_after_failures:
            await asyncio.to_thread(self.inventory.event, "pool.recovered", f"{vm.id} booted after "
                                    f"{health.failures} failures", vm.id, flavor.name)
        health.failures, health.backoff_until, health.last_error = 0, 0.0, None
        return final

    async def _boot_failed(self, vm: VM, flavor: Flavor, error: BootError) -> None:
        self.claim_waiters.pop(vm.id, None)
        final = await asyncio.to_thread(self.inventory.transition, vm.id, (BOOTING,), FAILED,
                                        [("vm.failed", f"boot failed: {error.reason}")], failure_reason=error.reason,
                                        stopped_at=utcnow(), exit_code=error.code)
        if final is None:
            return await self._release(vm)  # it was being stopped: not a boot failure
        log.warning("%s (%s) failed to boot: %s", vm.id, flavor.name, error.reason)
        # Counted before the VMM is stopped: whoever sees it gone (the failed row is already there) must also see
        # the pool's failure count and backoff.
        health = self.health[flavor.name]
        health.failures += 1
        health.last_error = error.reason
        delay = min(self.settings.backoff_base_s * 2 ** (health.failures - 1), self.settings.backoff_max_s)
        health.backoff_until = time.monotonic() + delay
        await blocking(self.launcher.stop, final, 1.0)  # a hung VMM (timeout) must not linger
        if error.crashed:
            self.metrics.vmm_crashes.inc()
        asyncio.get_running_loop().call_later(delay, self.wake)  # retry on time, not at the next tick
        if health.failures == self.settings.degrade_after_failures:
            await asyncio.to_thread(self.inventory.event, "pool.degraded", f"{health.failures} consecutive boot "
                                    f"failures, last: {error.reason}", vm.id, flavor.name)
        self.wake()
        return None

    async def _release(self, vm: VM) -> None:
        """The VM left BOOTING under us (it was deleted): its VMM must not outlive it."""
        current = await asyncio.to_thread(self.inventory.get, vm.id)
        if current.state in TERMINAL_STATES and self.work.get(STOP, vm.id) is None:
            await blocking(self.launcher.stop, vm, 1.0)

    def flavor_changed(self, name: str) -> None:
        """A new spec deserves a fresh start: forget its failures and backoff."""
        self.health.pop(name, None)
        self.wake()

    async def adopt_boot(self, vm: VM) -> None:
        """A VM found booting after a restart: wait for its agent like any boot (its claimant is gone); stop it
        when its flavor is gone."""
        try:
            flavor = await asyncio.to_thread(self.flavors.get, vm.flavor)
        except NotFound:
            await self.stop_vm(vm.id, f"flavor {vm.flavor} no longer exists", (BOOTING,))
            return
        if self.work.get(BOOT, vm.id) is None:
            self.start_boot(vm, flavor, adopted=True)

    # --- claims ---------------------------------------------------------------------------------------------
    async def claim(self, flavor_name: str, wait: bool) -> tuple[VM, str]:
        started = time.monotonic()
        metrics = self.metrics
        vm, flavor = await asyncio.to_thread(self.inventory.claim, flavor_name)
        if vm is not None:
            self.launcher.foreground(vm)
            self.wake(after_s=0.02)  # refill, once the burst this claim may be part of is served
            metrics.claims.labels(flavor_name, "hit").inc()
            metrics.claim.labels(flavor_name, "hit").observe(time.monotonic() - started)
            return vm, "hit"
        self.wake()
        health = self.health[flavor_name]
        if not wait:
            metrics.claims.labels(flavor_name, "miss").inc()
            booting = (await asyncio.to_thread(self.inventory.pool_counts)).get(flavor_name, Counter())[BOOTING]
            raise Unavailable(f"pool {flavor_name} has no ready VM ({booting} booting): retry after Retry-After "
                              "seconds, or claim with \"wait\": true to cold-boot one", self.retry_after(flavor_name),
                              slug="pool-empty")
        if health.failures >= self.settings.degrade_after_failures:  # a cold boot would fail too: say so now
            metrics.claims.labels(flavor_name, "error").inc()
            raise Unavailable(f"flavor {flavor_name} is degraded ({self.degraded_reason(flavor)}): fix it with "
                              f"PUT/PATCH /v1/flavors/{flavor_name} or retry later", self.retry_after(flavor_name),
                              slug="flavor-degraded")
        try:  # a clone if the template is ready (the claimant waits less), else a cold boot
            vm = await asyncio.to_thread(self.inventory.new_vm, flavor, pooled=False,
                                         template=self.templates.plan(flavor)[0])
        except QuotaExceeded:
            metrics.claims.labels(flavor_name, "error").inc()
            raise
        self.claim_waiters[vm.id] = True
        task = self.start_boot(vm, flavor)
        try:
            final = await asyncio.shield(task)
        except asyncio.CancelledError:
            if vm.id in self.claim_waiters:
                self.claim_waiters[vm.id] = False  # nobody will receive it: it joins the pool when ready
            raise
        if final is None or final.state != CLAIMED:
            metrics.claims.labels(flavor_name, "error").inc()
            current = await asyncio.to_thread(self.inventory.get, vm.id)
            why = current.failure_reason or f"it is {current.state}"
            raise Unavailable(f"cold boot of {vm.id} ({flavor_name}) failed: {why}; see GET /v1/vms/{vm.id}/events "
                              "and /console", self.retry_after(flavor_name), slug="boot-failed")
        metrics.claims.labels(flavor_name, "miss").inc()
        metrics.claim.labels(flavor_name, "miss").observe(time.monotonic() - started)
        return final, "miss"

    # --- status ---------------------------------------------------------------------------------------------
    def retry_after(self, flavor_name: str) -> float:
        backoff = self.health[flavor_name].backoff_until - time.monotonic()
        return max(1.0, backoff if backoff > 0 else self.boot_s_estimate)

    def degraded_reason(self, flavor: Flavor, ready: int | None = None) -> str | None:
        health = self.health[flavor.name]
        reasons = []
        if health.failures >= self.settings.degrade_after_failures:
            wait = max(0.0, health.backoff_until - time.monotonic())
            reasons.append(f"{health.failures} consecutive boot failures, last: {health.last_error}; "
                           f"next attempt in {wait:.0f}s")
        if health.quota:
            reasons.append(health.quota)
        if ready is not None and ready < flavor.pool_min:
            reasons.append(f"{ready} ready, below min {flavor.pool_min}")
        return "; ".join(reasons) or None

    def pool_status(self, flavor: Flavor, counts: Counter) -> dict:
        reason = self.degraded_reason(flavor, counts[READY])
        waiting = self.health[flavor.name].waiting  # not degraded: it is how a clone pool starts
        return {"flavor": flavor.name, "target": flavor.pool_target, "min": flavor.pool_min, "ready": counts[READY],
                "booting": counts[BOOTING], "claimed": counts[CLAIMED], "state": "degraded" if reason else "ok",
                "reason": "; ".join(r for r in (reason, waiting) if r) or None}
