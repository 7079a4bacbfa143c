"""Clone templates: per clone flavor, one template VM booted cold, snapshotted at agent-ready and stopped; the pool
then refills with clones restored from that snapshot (hypervisor/restore.py) instead of cold boots.

A template directory is `<data_dir>/templates/<flavor>-<spec key>/` (state.json + memory), the key a hash over
everything that changes the guest (spec_key): a changed flavor or a rebuilt kernel gets a new directory, and old
ones are removed once no live VM maps them. A restore that fails invalidates the template: that VM is cold-booted
instead (pool.py) and the template is rebuilt after a backoff that doubles per failure.

Template VMs are not in the inventory: their sockets are under <run_dir>/tpl/ (never taken for a pool VM's), they
are started without --detach (they die with pclited; a restart kills any left over) and last one boot.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import secrets
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace

from service.core.config import Settings
from service.metrics import Metrics
from service.models import TEMPLATE_STATES, Flavor
from service.services.inventory import Inventory
from service.services.procfs import scan_vmms
from service.services.timeline import boot_phases
from service.services.vmm import BASE_CMDLINE, VMM_ERRORS, Launcher, LaunchError
from service.services.work import TEMPLATE, Work, blocking

log = logging.getLogger("pclited")
SOCKET_DIR = "tpl"  # under run_dir; scan_vmms only looks at run_dir's own entries, so no pool VM is confused
BUILD_PREFIX = ".build-"  # a build in progress; such a directory found at start-up is a crashed build
GC_EVERY_S = 5.0
SNAPSHOT_TIMEOUT_S = 300.0  # writing guest RAM (holes skipped) over a slow disk
SNAPSHOT_TRIES = 3
STATES = TEMPLATE_STATES
DISABLED, PENDING, BUILDING, READY, FAILED = STATES


def snapshot_version() -> int:
    from hypervisor.snapshot import VERSION  # here: it loads the KVM structures, which pclited needs for nothing else
    return VERSION


def template_spec(flavor: Flavor, kernel: str, initrd: str) -> dict:
    """What the template's guest is made of. Files by path, size and mtime: a rebuilt kernel or initramfs (the
    agent lives in it) at the same path is another guest. Raises OSError when a file is missing."""
    files = {}
    for role, path in (("kernel", kernel), ("initrd", initrd)):
        st = os.stat(path)
        files[role] = {"path": os.path.abspath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    return {**files, "cmdline": f"{BASE_CMDLINE} {flavor.cmdline_extra}".strip(), "mem_mib": flavor.mem_mib,
            "vcpus": flavor.vcpus, "snapshot_format": snapshot_version()}


def spec_key(spec: dict) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:12]


def split_name(dir_name: str) -> tuple[str, str] | None:
    """`<flavor>-<key>` → (flavor, key); None for what is not a template directory."""
    flavor, _, key = dir_name.rpartition("-")
    if not flavor or len(key) != 12 or any(c not in "0123456789abcdef" for c in key):
        return None
    return flavor, key


def backoff_s(failures: int, base_s: float, max_s: float) -> float:
    return min(base_s * 2 ** max(failures - 1, 0), max_s)


class TemplateError(Exception):
    pass


@dataclass
class Template:
    flavor: str
    key: str | None = None
    state: str = PENDING
    spec: dict | None = None
    built_at: datetime | None = None
    build_ms: float | None = None
    error: str | None = None
    failures: int = 0  # consecutive failed builds or restores of this key
    backoff_until: float = 0.0  # monotonic
    started: float = 0.0  # monotonic, when the current build started
    task: asyncio.Task | None = None

    @property
    def dir_name(self) -> str | None:
        return f"{self.flavor}-{self.key}" if self.key else None

    def status(self) -> dict:
        retry = self.backoff_until - time.monotonic() if self.state == FAILED else 0
        return {"state": self.state, "key": self.key, "dir": self.dir_name, "built_at": self.built_at,
                "build_ms": self.build_ms, "error": self.error, "failures": self.failures,
                "retry_in_s": round(retry, 1) if retry > 0 else None}


class TemplateManager:
    """Per clone flavor, the template's state and its build. The pool asks `plan` (clone, wait or cold-boot) and
    calls `tick` each round; `restore_failed` invalidates a template. Builds run as `work` (TEMPLATE, flavor name);
    `wake` is called when a template becomes ready or may be retried."""

    def __init__(self, settings: Settings, inventory: Inventory, launcher: Launcher, metrics: Metrics, work: Work,
                 wake: Callable[[], None]) -> None:
        self.settings = settings
        self.inventory, self.launcher, self.metrics, self.work, self.wake = inventory, launcher, metrics, work, wake
        self.dir = settings.templates_dir
        self.socket_dir = settings.run_dir / SOCKET_DIR
        self.templates: dict[str, Template] = {}
        self._last_gc = 0.0

    # --- start-up -------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Blocking. Kill template VMMs a previous pclited left behind and remove its unfinished builds."""
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        for socket_path, pid in scan_vmms(self.socket_dir).items():
            log.warning("killing template VMM pid %d left by a previous pclited (%s)", pid, socket_path)
            self.launcher.kill_orphan(pid, socket_path)
        for entry in self.dir.iterdir():
            if entry.name.startswith("."):
                shutil.rmtree(entry, ignore_errors=True)

    # --- what the pool asks ---------------------------------------------------------------------------------
    def status(self, flavor: Flavor) -> dict:
        if not flavor.clone:
            return {"state": DISABLED}
        return self.templates.get(flavor.name, Template(flavor.name)).status()

    def plan(self, flavor: Flavor) -> tuple[str | None, str | None]:
        """(template directory to clone from, None) when one is ready; (None, why) when the pool should wait for
        the first build of this spec rather than cold-boot; (None, None): cold boot."""
        template = self.templates.get(flavor.name)
        if not flavor.clone or template is None or template.key is None:
            return None, None
        if template.state == READY:
            return template.dir_name, None
        slow = template.state == BUILDING and time.monotonic() - template.started > self.settings.boot_timeout_s
        if template.state in (PENDING, BUILDING) and template.failures == 0 and not slow:
            return None, f"waiting for template {template.dir_name} to be built"
        return None, None  # cold boots: after a failure, or while a build takes longer than a boot may

    # --- the loop (called by the pool's tick) ---------------------------------------------------------------
    async def tick(self, flavors: list[Flavor], live_templates: set[str]) -> None:
        for flavor in flavors:
            await self._observe(flavor)
        for name in set(self.templates) - {f.name for f in flavors}:
            template = self.templates.pop(name)
            if template.task is not None:
                template.task.cancel()
        self.metrics.set_templates({f.name: self.status(f)["state"] for f in flavors})
        if time.monotonic() - self._last_gc >= GC_EVERY_S:
            self._last_gc = time.monotonic()
            await asyncio.to_thread(self.gc, flavors, live_templates)

    async def _observe(self, flavor: Flavor) -> None:
        template = self.templates.get(flavor.name) or Template(flavor.name)
        if not flavor.clone:
            if template.state != DISABLED:  # a build in flight is of no use now
                self._replace(template, Template(flavor.name, state=DISABLED))
            return
        try:
            spec = await asyncio.to_thread(self._spec, flavor)
        except (OSError, LaunchError) as exc:
            self._replace(template, Template(flavor.name, state=FAILED, error=f"cannot read the flavor's boot files "
                                             f"({exc}): fix its kernel/initrd; pool VMs are cold-booted meanwhile"))
            return
        key = spec_key(spec)
        if key != template.key:  # a new spec (or the first look): start over, reusing a snapshot already on disk
            template = self._replace(template, Template(flavor.name, key=key, spec=spec))
            state_file = self.dir / template.dir_name / "state.json"
            if await asyncio.to_thread(state_file.is_file):
                template.state = READY
                template.built_at = datetime.fromtimestamp(state_file.stat().st_mtime, UTC)
        busy = template.task is not None and not template.task.done()
        due = template.state == PENDING or (template.state == FAILED and time.monotonic() >= template.backoff_until)
        due = due and flavor.pool_target > 0  # no pool to refill, no template (a claim miss boots cold)
        if due and not busy:
            if full := await asyncio.to_thread(self.inventory.no_room_for, flavor.mem_mib):
                template.error = f"template build waits for quota: {full}"  # the pool could not boot either
                return
            template.state, template.started = BUILDING, time.monotonic()
            template.task = self.work.start(TEMPLATE, flavor.name, self._build(flavor, template),
                                            name=f"template-{flavor.name}")

    def _replace(self, old: Template, new: Template) -> Template:
        if old.task is not None and old.key != new.key:
            old.task.cancel()  # building a spec nobody wants any more
        self.templates[new.flavor] = new
        return new

    def _spec(self, flavor: Flavor) -> dict:
        kernel, initrd = self.launcher.boot_files(flavor)
        return template_spec(flavor, kernel, initrd)

    # --- building -------------------------------------------------------------------------------------------
    async def _build(self, flavor: Flavor, template: Template) -> None:
        name = template.dir_name
        started = time.monotonic()
        await asyncio.to_thread(self.inventory.event, "template.building", f"booting template VM {name} (cold) to "
                                "snapshot at agent-ready", None, flavor.name)
        work = self.dir / f"{BUILD_PREFIX}{name}-{secrets.token_hex(3)}"
        vm = SimpleNamespace(id=f"tpl-{name}", pid=None, api_socket=str(self.socket_dir / f"{template.key}.sock"),
                             console_path=str(work / "console.log"))
        try:
            summary = await self._boot_and_snapshot(flavor, vm, work)
            await asyncio.to_thread(self._install, work / "snapshot", name, template.spec)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - any failure: cold boots carry on, retry later
            reason = str(exc) if isinstance(exc, TemplateError | LaunchError) else f"{type(exc).__name__}: {exc}"
            logs = await asyncio.to_thread(self._keep_logs, work, flavor.name)
            await self._failed(flavor.name, template, f"template build failed: {reason} (its console and VMM logs: "
                                                      f"{logs})")
            self.metrics.template_builds.labels(flavor.name, "failed").inc()
            return
        finally:
            await blocking(self.launcher.stop, vm, 1.0)
            self.launcher.forget(vm.id)
            await asyncio.to_thread(shutil.rmtree, work, True)
        if self.templates.get(flavor.name) is not template:
            return  # the spec changed while it was built: the garbage collector takes the directory
        template.state, template.error = READY, None
        template.built_at, template.build_ms = datetime.now(UTC), round((time.monotonic() - started) * 1000, 1)
        self.metrics.template_builds.labels(flavor.name, "ok").inc()
        self.metrics.template_build.labels(flavor.name).observe(template.build_ms / 1000)
        written = summary.get("memory_written")
        await asyncio.to_thread(self.inventory.event, "template.ready", f"template {name} ready in "
                                f"{template.build_ms / 1000:.1f}s" + (f" ({written >> 20} MiB of guest RAM written)"
                                                                      if isinstance(written, int) else ""),
                                None, flavor.name)
        self.wake()

    async def _boot_and_snapshot(self, flavor: Flavor, vm, work: Path) -> dict:
        launcher = self.launcher
        spec = launcher.boot_spec(flavor, vm.api_socket, vm.console_path, detach=False)  # dies with pclited
        proc = await blocking(launcher.start_process, spec, work, work / "vmm.log")
        vm.pid = proc.pid
        launcher.watch(vm.id, proc)
        client = launcher.client(vm, timeout=10.0)
        deadline = time.monotonic() + self.settings.boot_timeout_s
        while True:
            alive, code = launcher.exit_status(vm)
            if not alive:
                raise TemplateError(f"the template VM's {launcher.describe_exit(vm, code)}")
            if time.monotonic() > deadline:
                raise TemplateError(f"the template VM's agent was not ready within {self.settings.boot_timeout_s:g}s;"
                                    " its console log says how far the guest got; raise PCLITE_BOOT_TIMEOUT_S if it "
                                    "was merely slow")
            if os.path.exists(vm.api_socket):
                with contextlib.suppress(*VMM_ERRORS):
                    status = await blocking(client.wait_agent_ready, 1.0)
                    break
            await asyncio.sleep(0.02)
        # A cold boot of the flavor like any other: its phases count (clones have no kernel or init phase).
        self.metrics.observe_boot(flavor.name, boot_phases(status.get("timeline_ms")) or {}, source=None)
        # The agent must be idle (the snapshot refuses otherwise) and the vCPUs must pause within 5 s (a starved
        # host may miss it): a few tries before giving up. Not resumed: the template VM stops next.
        for attempt in range(1, SNAPSHOT_TRIES + 1):
            try:
                return await blocking(client.snapshot, str(work / "snapshot"), False, SNAPSHOT_TIMEOUT_S)
            except VMM_ERRORS as exc:
                if attempt == SNAPSHOT_TRIES:
                    raise TemplateError(f"the template VM refused the snapshot {attempt} times, last: {exc}") from None
                log.warning("template %s: snapshot refused (%s); trying again", vm.id, exc)
                await asyncio.sleep(0.5)

    def _keep_logs(self, work: Path, flavor_name: str) -> Path:
        """A failed build's logs outlive its work directory: <vm_dir>/template-<flavor>/ (the last failure's)."""
        logs = self.settings.vm_dir / f"template-{flavor_name}"
        logs.mkdir(parents=True, exist_ok=True)
        for name in ("console.log", "vmm.log"):
            with contextlib.suppress(OSError):
                os.replace(work / name, logs / name)
        return logs

    def _install(self, snapshot: Path, name: str, spec: dict) -> None:
        """Move the finished snapshot into place (a rename: restores never see half a template)."""
        (snapshot / "spec.json").write_text(json.dumps(spec, indent=1, sort_keys=True) + "\n")
        os.chmod(snapshot, 0o755)  # written by the template VM's jailed uid: its clones run as other uids
        for entry in snapshot.iterdir():
            os.chmod(entry, 0o644)
        final = self.dir / name
        if final.exists():  # an invalidated template of the same spec; its clones keep their mapping
            self._discard(final)
        os.rename(snapshot, final)

    def _discard(self, path: Path) -> None:
        trash = self.dir / f"{BUILD_PREFIX}trash-{path.name}-{secrets.token_hex(3)}"
        with contextlib.suppress(FileNotFoundError):
            os.rename(path, trash)
            shutil.rmtree(trash, ignore_errors=True)

    async def _failed(self, flavor_name: str, template: Template, reason: str) -> None:
        template.failures += 1
        template.state, template.error = FAILED, reason[:2000]
        delay = backoff_s(template.failures, self.settings.template_backoff_s, self.settings.template_backoff_max_s)
        template.backoff_until = time.monotonic() + delay
        log.warning("%s: %s (attempt %d; next in %.0fs)", flavor_name, reason, template.failures, delay)
        await asyncio.to_thread(self.inventory.event, "template.failed", f"{reason}; pool VMs are cold-booted "
                                f"meanwhile; template rebuilt in {delay:.0f}s (failure {template.failures})",
                                None, flavor_name)
        asyncio.get_running_loop().call_later(delay, self.wake)

    async def restore_failed(self, flavor_name: str, dir_name: str, reason: str, fallback: bool = True) -> None:
        """A clone of `dir_name` did not come up (fallback: it is being cold-booted instead): that template is
        unusable (corrupted, another host, another pclite). Remove it so no other VM tries it; running clones keep
        the memory they mapped."""
        if fallback:
            self.metrics.clone_fallbacks.labels(flavor_name).inc()
        template = self.templates.get(flavor_name)
        if template is None or template.dir_name != dir_name or template.state != READY:
            return  # an older template, or already invalidated by another clone's failure
        template.state = FAILED  # before any await: concurrent failures invalidate once
        await asyncio.to_thread(self._discard, self.dir / dir_name)
        await self._failed(flavor_name, template, f"restore from template {dir_name} failed: {reason}")

    # --- garbage ----------------------------------------------------------------------------------------------
    def gc(self, flavors: list[Flavor], live_templates: set[str]) -> list[str]:
        """Blocking. Remove template directories no flavor wants and no live VM maps; returns their names."""
        wanted = {t.dir_name for t in self.templates.values() if t.key}
        unknown = {f.name for f in flavors if f.clone and self.templates.get(f.name, Template(f.name)).key is None}
        removed = []
        with contextlib.suppress(FileNotFoundError):
            for entry in self.dir.iterdir():
                parts = split_name(entry.name)
                if parts is None or entry.name in wanted or entry.name in live_templates or parts[0] in unknown:
                    continue  # not ours, current, in use, or its flavor's spec cannot be read right now
                self._discard(entry)
                removed.append(entry.name)
                self.inventory.event("template.removed", f"removed template {entry.name}: no longer the flavor's "
                                  "spec and no VM uses it", None, parts[0])
        return removed
