"""Everything one pclited runs, wired together: started and stopped by the app's lifespan."""

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

log = logging.getLogger("pclited")


class Runtime:
    def __init__(self, settings: Settings, db: Database | None = None) -> None:
        self.settings = settings
        self.db = db or Database(settings.database_url)
        self.metrics = Metrics()
        self.inv = Inventory(self.db, settings)
        self.flavors = FlavorService(self.db, settings)
        self.launcher = Launcher(settings)
        self.metrics.set_jail({f: self.launcher.jails.on(f) for f in self.launcher.jails.features})
        self.pool = PoolManager(self)
        self.templates = TemplateManager(self)
        self.supervisor = Supervisor(self)
        self.vms = VmService(self)
        self.rootfs = RootfsService(self)
        self.ready = False
        self._tasks: list[asyncio.Task] = []

    async def start(self) -> None:
        for path in (self.settings.run_dir, self.settings.vm_dir):
            path.mkdir(parents=True, exist_ok=True, mode=0o700)
        await self.supervisor.reconcile()
        await asyncio.to_thread(self.templates.start)
        self._tasks = [asyncio.create_task(coro, name=name) for name, coro in (
            ("pool", self.pool.run()), ("supervisor", self.supervisor.run()), ("health", self.supervisor.run_health()))]
        self.ready = True

    async def stop(self) -> None:
        """Stop pclited's own tasks. VMMs keep running (detached) and are adopted by the next start."""
        self.ready = False
        tasks = (self._tasks + list(self.pool.boots.values()) + list(self.supervisor.stops.values())
                 + self.templates.tasks())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.launcher.close()  # the fork server; the VMMs it forked keep running
        self.db.dispose()

    def healthy(self) -> str | None:
        """None when ready to serve, else why not."""
        if not self.ready:
            return "starting up (reconciling the inventory)"
        for task in self._tasks:
            if task.done():
                return f"the {task.get_name()} loop has stopped"
        try:
            self.db.ping()
        except Exception as exc:  # noqa: BLE001
            return f"database unreachable: {exc}"
        return None
