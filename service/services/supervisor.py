"""Supervision: notice VMMs that die, health-check ready VMs, stop VMs, and reconcile after a restart.

A VMM is found again by pid *and* its socket path on the command line (/proc), so a reused pid is never
mistaken for a VM, and a VMM nobody knows about (pclited died between spawning it and recording it) is found too.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shutil
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from service.core.config import Settings
from service.metrics import Metrics
from service.models import BOOTING, CLAIMED, CLONE, FAILED, LIVE_STATES, READY, STOPPED, STOPPING, VM, utcnow
from service.services.inventory import Inventory
from service.services.vmm import Launcher
from service.services.work import BOOT, STOP, Work, blocking

log = logging.getLogger("pclited")
PRUNE_EVERY_S = 300.0
SWEEP_EVERY_S = 30.0
VM_ID = re.compile(r"vm-\w{12}")
CLONE_GRACE_S = 90.0  # a clone that exits 1 this soon after ready failed its restore (identity), not its work


class Supervisor:
    """Owns VM deaths and stops: `run` notices dead VMMs, `run_health` pings ready VMs, `stop_vm` stops one in the
    background (as `work` (STOP, vm id)), `reconcile` makes the inventory true after a restart. A VM some task
    works on (its boot, its stop) is that task's: the supervisor leaves it alone. `wake` is called when a VM leaves;
    `restore_failed(flavor, template, reason, fallback=False)` when a young clone dies refusing its identity."""

    def __init__(self, settings: Settings, inventory: Inventory, launcher: Launcher, metrics: Metrics, work: Work,
                 wake: Callable[[], None], restore_failed: Callable[..., Awaitable[None]]) -> None:
        self.settings = settings
        self.inventory, self.launcher, self.metrics, self.work, self.wake = inventory, launcher, metrics, work, wake
        self.restore_failed = restore_failed
        self.ping_failures: dict[str, int] = {}

    # --- loops ----------------------------------------------------------------------------------------------
    async def run(self) -> None:
        last_prune = last_sweep = time.monotonic()
        while True:
            try:
                await self.check_processes()
                await self.expire_leases()
                if time.monotonic() - last_sweep >= SWEEP_EVERY_S:
                    last_sweep = time.monotonic()
                    await self.sweep_orphans()
                if time.monotonic() - last_prune >= PRUNE_EVERY_S:
                    last_prune = time.monotonic()
                    await self.prune()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001
                log.exception("supervision pass failed")
            await asyncio.sleep(self.settings.supervise_interval_s)

    async def run_health(self) -> None:
        while True:
            await asyncio.sleep(self.settings.health_interval_s)
            try:
                await self.health_check()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001
                log.exception("health check pass failed")

    # --- process deaths -------------------------------------------------------------------------------------
    async def check_processes(self) -> None:
        live = await asyncio.to_thread(self.inventory.live_brief)
        self.launcher.reap({vm.id for vm in live})
        for vm in live:
            if self.work.get(BOOT, vm.id) or self.work.get(STOP, vm.id):
                continue  # that task owns the VM
            if vm.state == BOOTING:
                # Its boot task may just not be registered yet; only one long past its timeout is stuck.
                if (utcnow() - vm.created_at).total_seconds() > self.settings.boot_timeout_s + 30:
                    await self.stop_vm(vm.id, "boot abandoned (no task was waiting for it)", (BOOTING,))
            elif vm.state == STOPPING:
                self._start_stop(await asyncio.to_thread(self.inventory.get, vm.id))
            else:
                alive, code = self.launcher.exit_status(vm)
                if not alive:
                    await self._died(vm, code)

    async def _died(self, vm: VM, code: int | None) -> None:
        launcher = self.launcher
        if code is None:  # not our child (adopted): the VMM's own exit line in its log may say
            code = launcher.logged_exit_code(vm)
        reason = launcher.describe_exit(vm, code)
        if code == 0:
            final = await asyncio.to_thread(self.inventory.transition, vm.id, (READY, CLAIMED), STOPPED,
                                            [("vm.stopped", f"guest powered off ({reason})")],
                                            stopped_at=utcnow(), exit_code=0)
        else:
            final = await asyncio.to_thread(self.inventory.transition, vm.id, (READY, CLAIMED), FAILED,
                                            [("vm.failed", f"VMM crashed: {reason}")], stopped_at=utcnow(),
                                            exit_code=code, failure_reason=reason)
            if final is not None:
                self.metrics.vmm_crashes.inc()
        if final is not None:
            log.warning("%s (%s): %s", vm.id, vm.flavor, reason)
            young = vm.ready_at is not None and (utcnow() - vm.ready_at).total_seconds() < CLONE_GRACE_S
            if getattr(vm, "source", None) == CLONE and vm.template and code == 1 and young:
                # The restored guest refused its identity (restore.py fails closed with 1): the template is bad.
                await self.restore_failed(vm.flavor, vm.template, reason, fallback=False)
            launcher.cleanup(vm)
            self.metrics.forget_vm(vm.id)
            self.wake()

    async def expire_leases(self) -> None:
        """Stop claimed VMs whose lease (ttl_s, renewed by PATCH) has ended; the stop is logged as vm.expired."""
        for vm_id in await asyncio.to_thread(self.inventory.expired):
            if self.work.get(STOP, vm_id):
                continue
            if await self.stop_vm(vm_id, "lease expired (claimed with ttl_s and not renewed)", (CLAIMED,),
                                  kind="vm.expired") is not None:
                log.info("%s: lease expired, stopping", vm_id)

    # --- stopping -------------------------------------------------------------------------------------------
    async def stop_vm(self, vm_id: str, reason: str, from_states: tuple[str, ...] = (BOOTING, READY, CLAIMED),
                      kind: str = "vm.stopping") -> VM:
        """Move the VM to stopping (if it is in from_states) and stop its VMM in the background."""
        vm = await asyncio.to_thread(self.inventory.transition, vm_id, from_states, STOPPING, [(kind, reason)])
        if vm is None:
            current = await asyncio.to_thread(self.inventory.get, vm_id)
            if current.state == STOPPING:
                self._start_stop(current)
            return current
        self._start_stop(vm)
        return vm

    def _start_stop(self, vm: VM) -> None:
        if self.work.get(STOP, vm.id) is None:
            self.work.start(STOP, vm.id, self._stop(vm))

    async def _stop(self, vm: VM) -> None:
        if os.path.exists(vm.api_socket):
            try:  # last look at its exit counters
                status = await blocking(lambda: self.launcher.client(vm, timeout=1.0).status())
                self.metrics.record_exits(vm.id, status.get("exits") or {})
            except Exception:  # noqa: BLE001 - best effort
                pass
        code = await blocking(self.launcher.stop, vm, self.settings.stop_timeout_s)
        await asyncio.to_thread(self.inventory.transition, vm.id, (STOPPING,), STOPPED,
                                [("vm.stopped", "VMM stopped" + (f" (exit code {code})" if code is not None else ""))],
                                stopped_at=utcnow(), exit_code=code)
        self.metrics.forget_vm(vm.id)
        self.ping_failures.pop(vm.id, None)
        self.wake()

    async def wait_stopped(self, vm_id: str, timeout_s: float) -> None:
        task = self.work.get(STOP, vm_id)
        if task is not None:
            await asyncio.wait_for(asyncio.shield(task), timeout_s)

    # --- health ---------------------------------------------------------------------------------------------
    async def health_check(self) -> None:
        live = await asyncio.to_thread(self.inventory.live)
        gate = asyncio.Semaphore(8)
        vms = [vm for vm in live if vm.state in (READY, CLAIMED) and self.work.get(STOP, vm.id) is None]
        await asyncio.gather(*(self._check_one(vm, gate) for vm in vms))

    def _probe(self, vm: VM, ping: bool) -> dict:
        client = self.launcher.client(vm, timeout=5.0)
        if ping:
            client.ping()
        return client.status()

    async def _check_one(self, vm: VM, gate: asyncio.Semaphore) -> None:
        async with gate:
            try:
                status = await blocking(self._probe, vm, vm.state == READY)  # claimed VMs are the user's: no ping
            except Exception as exc:  # noqa: BLE001 - any failure counts
                if vm.state != READY:
                    return
                failures = self.ping_failures[vm.id] = self.ping_failures.get(vm.id, 0) + 1
                if failures < self.settings.health_failures:
                    return
                reason = f"health check failed {failures} times in a row: {exc}"
                final = await asyncio.to_thread(self.inventory.transition, vm.id, (READY,), FAILED,
                                                [("vm.failed", reason)], failure_reason=reason, stopped_at=utcnow())
                self.ping_failures.pop(vm.id, None)
                if final is not None:
                    await blocking(self.launcher.stop, final, 1.0)
                    self.wake()
                return
            self.ping_failures.pop(vm.id, None)
            self.metrics.record_exits(vm.id, status.get("exits") or {})

    # --- restart --------------------------------------------------------------------------------------------
    async def reconcile(self, adopt_boot: Callable[[VM], Awaitable[None]]) -> dict[str, int]:
        """Make the inventory true again after a restart: adopt live VMMs (a booting one is handed to adopt_boot,
        which waits for its agent), close the books on dead ones, kill VMMs in our run dir that no live VM owns,
        remove stale sockets. Runs before the API and pools start."""
        launcher, inv = self.launcher, self.inventory
        running = await blocking(launcher.scan)
        summary = {"adopted": 0, "failed": 0, "stopped": 0, "orphans_killed": 0}
        owned: set[str] = set()
        for vm in await asyncio.to_thread(inv.live):
            pid = running.pop(vm.api_socket, None)
            if pid is None:
                await self._gone_while_down(vm, summary)
                continue
            owned.add(vm.api_socket)
            summary["adopted"] += 1
            if pid != vm.pid:
                await asyncio.to_thread(inv.update, vm.id, pid=pid)
                vm.pid = pid
            await asyncio.to_thread(inv.event, "vm.adopted", f"adopted VMM pid {pid} ({vm.state}) after a restart",
                                    vm.id, vm.flavor)
            if vm.state == BOOTING:
                await adopt_boot(vm)
            elif vm.state == STOPPING:
                self._start_stop(vm)
        for socket_path, pid in running.items():  # nobody's VMM: no orphan survives a restart
            log.warning("killing orphan VMM pid %d (%s)", pid, socket_path)
            await blocking(launcher.kill_orphan, pid, socket_path)
            stem = Path(socket_path).stem
            await asyncio.to_thread(inv.event, "vmm.orphan", f"killed VMM pid {pid} that no VM owned ({socket_path})",
                                    stem if VM_ID.fullmatch(stem) else None)
            summary["orphans_killed"] += 1
        run_dir = self.settings.run_dir
        if run_dir.is_dir():
            for entry in run_dir.iterdir():
                if entry.suffix == ".sock" and str(entry) not in owned:
                    entry.unlink(missing_ok=True)
        log.info("reconciled the inventory: %s", summary)
        return summary

    async def _gone_while_down(self, vm: VM, summary: dict[str, int]) -> None:
        launcher, inv = self.launcher, self.inventory
        code = launcher.logged_exit_code(vm)
        if vm.state == STOPPING or (code == 0 and vm.state != BOOTING):
            await asyncio.to_thread(inv.transition, vm.id, LIVE_STATES, STOPPED,
                                    [("vm.stopped", "VMM exited while pclited was not running")],
                                    stopped_at=utcnow(), exit_code=code)
            summary["stopped"] += 1
        else:
            reason = f"VMM gone while pclited was not running ({launcher.describe_exit(vm, code)})"
            await asyncio.to_thread(inv.transition, vm.id, LIVE_STATES, FAILED, [("vm.failed", reason)],
                                    stopped_at=utcnow(), exit_code=code, failure_reason=reason)
            self.metrics.vmm_crashes.inc()
            summary["failed"] += 1
        launcher.cleanup(vm)

    async def sweep_orphans(self) -> None:
        """A VMM in our run dir whose VM is no longer live has no owner: stop it (a safety net; every VM row is
        written before its VMM starts, so a live VMM without a live row is a leak)."""
        running = await blocking(self.launcher.scan)
        if not running:
            return
        owned = {vm.api_socket for vm in await asyncio.to_thread(self.inventory.live_brief)}
        for socket_path, pid in running.items():
            if socket_path not in owned:
                log.warning("stopping VMM pid %d: its VM is no longer live (%s)", pid, socket_path)
                await blocking(self.launcher.kill_orphan, pid, socket_path)

    async def prune(self) -> None:
        old = await asyncio.to_thread(self.inventory.prune, self.settings.terminal_retention_s)
        for vm in old:
            vm_dir = Path(vm.console_path).parent
            if vm_dir.parent == self.settings.vm_dir:
                await asyncio.to_thread(shutil.rmtree, vm_dir, True)
