"""pclited's composition root: the one place its services are built and wired together, started and stopped by the
app's lifespan. Each service gets only the collaborators it uses; in-flight work (boots, stops, template builds) is
owned by one `Work`, which shutdown drains.

    Inventory, FlavorService    the database                    Launcher    VMM processes
    TemplateManager             → inventory, launcher, metrics, work, wake
    Supervisor                  → inventory, launcher, metrics, work, wake, templates.restore_failed
    PoolManager                 → inventory, flavors, launcher, metrics, work, wake, templates, supervisor.stop_vm
    VmService, RootfsService    → inventory (+ the supervisor, to stop a VM; VmService: pool.claim for leases)
"""

from __future__ import annotations

import asyncio
import logging

from service.core.config import Settings
from service.core.db import Database
from service.metrics import Metrics
from service.services.flavors import FlavorService
from service.services.inventory import Inventory
from service.services.pool import PoolManager
from service.services.rootfs import RootfsService
from service.services.supervisor import Supervisor
from service.services.templates import TemplateManager
from service.services.vmm import Launcher
from service.services.vms import VmService
from service.services.work import Wakeup, Work

log = logging.getLogger("pclited")


class Node:
    """Everything one pclited runs on this host."""

    def __init__(self, settings: Settings, db: Database | None = None) -> None:
        self.settings = settings
        self.db = db or Database(settings.database_url)
        self.metrics = Metrics()
        self.inventory = Inventory(self.db, settings)
        self.flavors = FlavorService(self.db, settings)
        self.launcher = Launcher(settings)
        self.metrics.set_jail({f: self.launcher.jails.on(f) for f in self.launcher.jails.features})
        self.work = Work()
        self.wake = Wakeup()  # rung by anyone who frees room or a VM; the pool loop waits on it
        self.templates = TemplateManager(settings, self.inventory, self.launcher, self.metrics, self.work, self.wake)
        self.supervisor = Supervisor(settings, self.inventory, self.launcher, self.metrics, self.work, self.wake,
                                     restore_failed=self.templates.restore_failed)
        self.pool = PoolManager(settings, self.inventory, self.flavors, self.launcher, self.metrics, self.work,
                                self.wake, templates=self.templates, stop_vm=self.supervisor.stop_vm)
        self.vms = VmService(settings, self.inventory, self.supervisor, claim=self.pool.claim)
        self.rootfs = RootfsService(settings, self.inventory, self.launcher.jails.hand_over)
        self.ready = False
        self._loops: list[asyncio.Task] = []

    async def start(self) -> None:
        for path in (self.settings.run_dir, self.settings.vm_dir):
            path.mkdir(parents=True, exist_ok=True, mode=0o700)
        await self.supervisor.reconcile(adopt_boot=self.pool.adopt_boot)
        await asyncio.to_thread(self.templates.start)
        self._loops = [asyncio.create_task(coro, name=name) for name, coro in (
            ("pool", self.pool.run()), ("supervisor", self.supervisor.run()), ("health", self.supervisor.run_health()))]
        self.ready = True

    async def stop(self) -> None:
        """Stop pclited's own tasks. VMMs keep running (detached) and are adopted by the next start."""
        self.ready = False
        for task in self._loops:
            task.cancel()
        await self.work.drain()
        await asyncio.gather(*self._loops, return_exceptions=True)
        self.launcher.close()  # the fork server; the VMMs it forked keep running
        self.db.dispose()

    def healthy(self) -> str | None:
        """None when ready to serve, else why not."""
        if not self.ready:
            return "starting up (reconciling the inventory)"
        for task in self._loops:
            if task.done():
                return f"the {task.get_name()} loop has stopped"
        try:
            self.db.ping()
        except Exception as exc:  # noqa: BLE001 - the reason goes to the log: its text may hold the URL or schema
            log.warning("readyz: database ping failed: %s", exc)
            return "database unreachable (see pclited's log)"
        return None
