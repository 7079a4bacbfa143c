"""Jails for the VMMs pclited starts (hypervisor/jail.py does the work inside each VMM; this plans them).

Per VM: a uid/gid from `jail_uid_base` .. + `jail_uid_count` that no live VM (and no other process) has, a cgroup
leaf `<jail_cgroup>/<key>` with memory.max = guest RAM + `jail_vmm_overhead_mib`, pids.max and cpu.weight, a mount
namespace holding the VM's own directory (read-write), its images or template (read-only) and a socket directory
of its own, `<vm dir>/sock/`, shown inside at the run dir's path: the VMM binds its API socket where pclited expects
it, and pclited reaches it through a symlink `<run dir>/<vm>.sock` -> `<vm dir>/sock/<vm>.sock`.

What this pclited may not do (not root, no cgroup v2 controllers delegated) is said once in the log and exported
(`pclite_jail_enabled{feature}`, /readyz), never silently dropped. `jail: false` turns it all off (benches).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from pathlib import Path

from service.core.config import Settings

log = logging.getLogger("pclited")
SOCK_DIR = "sock"
PIDS_PER_VCPU = 16  # vCPU, API connection, agent stream and loader threads, with room to spare
PIDS_BASE = 64


class JailService:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.features: dict[str, str | None] = {}  # feature -> None (on) or why it is off
        self._uids: dict[str, int] = {}  # key (the VM's directory) -> uid
        self._cgroups: dict[str, str] = {}
        self._lock = threading.Lock()
        self._foreign: set[int] | None = None
        self._detect()

    @property
    def enabled(self) -> bool:
        return self.features.get("uid") is None and bool(self.features)

    def on(self, feature: str) -> bool:
        return self.enabled and self.features.get(feature) is None

    def _detect(self) -> None:
        from hypervisor import jail
        wanted = self.settings.jail
        if wanted is None:
            wanted = os.geteuid() == 0
        if not wanted:
            why = "jail: false in the settings" if self.settings.jail is False else "pclited is not root"
            self.features = dict.fromkeys(jail.FEATURES, why)
        else:
            self.features = jail.available_features(str(self.settings.jail_cgroup))
        off = {f: why for f, why in self.features.items() if why}
        if off:
            log.warning("VMM jail: off: %s", "; ".join(f"{f} ({why})" for f, why in off.items()))
        else:
            log.info("VMM jail: on (%s)", ", ".join(self.features))

    def status(self) -> dict[str, str]:
        """{feature: "on" | "off: why"} for /readyz."""
        return {f: "on" if self.on(f) else f"off: {why or 'jail off'}" for f, why in self.features.items()}

    # --- per VM ---------------------------------------------------------------------------------------------
    def plan(self, spec, cwd: Path, mem_mib: int | None = None) -> str | None:
        """The JSON jail plan for the VMM of `spec` (a hypervisor.runspec.RunSpec: its host_files() say what the VM
        needs), or None with the jail off. Sets up the host side: the uid, the VM's socket directory and the symlink
        pclited connects through. mem_mib: a clone's guest RAM (its spec has none)."""
        if not self.enabled:
            return None
        from hypervisor.jail import JailPlan
        key = str(cwd)
        uid = self._allocate(key)
        read_only, read_write, binds, owned = [], [str(cwd)], [], [str(cwd)]
        for item in spec.host_files():
            path = os.path.abspath(item.path)
            if item.what == "kvm":
                continue  # made in the jail for the VM's uid
            if item.what == "api-socket-dir":  # shared by every VM: each VMM sees its own in its place
                sock_dir = cwd / SOCK_DIR
                sock_dir.mkdir(parents=True, exist_ok=True)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(spec.api_sock)
                os.symlink(sock_dir / os.path.basename(spec.api_sock), spec.api_sock)
                binds.append((str(sock_dir), path))
                owned.append(str(sock_dir))
            elif path == key or path.startswith(key + "/"):
                continue  # in the VM's own directory, bound read-write already
            elif item.writable:
                read_write.append(path)
            else:
                read_only.append(path)
        cgroup = None
        if self.on("cgroup"):
            cgroup = str(self.settings.jail_cgroup / cwd.name)
            with self._lock:
                self._cgroups[key] = cgroup
        mem = mem_mib or spec.mem_mib or 256
        cpus = spec.vcpus or 1
        plan = JailPlan(vm_id=cwd.name, uid=uid, gid=uid, root=str(self.settings.run_dir / "jail-root"),
                        read_only=read_only, read_write=read_write, binds=binds, owned=owned, cgroup=cgroup,
                        memory_max=(mem + self.settings.jail_vmm_overhead_mib) << 20,
                        pids_max=PIDS_BASE + PIDS_PER_VCPU * cpus, cpu_weight=max(1, min(10000, 100 * cpus)),
                        mount=self.on("mountns"), net=self.on("netns"), seccomp=self.on("seccomp"))
        (self.settings.run_dir / "jail-root").mkdir(exist_ok=True)
        return plan.to_json()

    def hand_over(self, path: Path) -> None:
        """A file pclited made in a VM's directory for its VMM to open read-write (a container's rootfs image):
        owned by the VM's uid, which owns that directory (also for a VM adopted after a restart)."""
        owner = os.stat(path.parent).st_uid
        base = self.settings.jail_uid_base
        if self.enabled and base <= owner < base + self.settings.jail_uid_count:
            os.chown(path, owner, owner)

    def release(self, cwd: Path, wait_s: float = 2.0) -> None:
        """The VM is gone: its uid is free again and its cgroup removed (a leaf still emptying is retried)."""
        from hypervisor.jail import remove_cgroup
        key = str(cwd)
        with self._lock:
            self._uids.pop(key, None)
            cgroup = self._cgroups.pop(key, None)
        if cgroup is None and self.on("cgroup"):  # adopted after a restart: its leaf is named after its directory
            cgroup = str(self.settings.jail_cgroup / cwd.name)
        if cgroup:
            deadline = time.monotonic() + wait_s
            while not remove_cgroup(cgroup):
                if time.monotonic() > deadline:
                    log.warning("cgroup %s still busy; left in place", cgroup)
                    return
                time.sleep(0.02)

    def _allocate(self, key: str) -> int:
        base, count = self.settings.jail_uid_base, self.settings.jail_uid_count
        with self._lock:
            if key in self._uids:
                return self._uids[key]
            if self._foreign is None:  # VMMs of an earlier pclited (adopted) keep their uids
                self._foreign = _uids_in_use(base, base + count)
            taken = set(self._uids.values()) | self._foreign
            for uid in range(base, base + count):
                if uid not in taken:
                    self._uids[key] = uid
                    return uid
        raise OSError(f"no free VMM uid left in {base}..{base + count - 1}: raise jail_uid_count")


def _uids_in_use(low: int, high: int) -> set[int]:
    found = set()
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError, ValueError, StopIteration), open(f"/proc/{entry.name}/status") as f:
                uid = int(next(line for line in f if line.startswith("Uid:")).split()[1])
                if low <= uid < high:
                    found.add(uid)
    return found
