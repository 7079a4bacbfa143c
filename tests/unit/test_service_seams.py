"""Each service built alone from its collaborators: the pool manager, the template manager and the supervisor with a
fake inventory and a fake launcher (no database, no VMM), real Settings, Metrics, Work and Wakeup. What they do with
them is their real behaviour: a refill, a template build decision and build, reaping a dead VMM.
"""

from __future__ import annotations

import asyncio
import shutil
from collections import Counter
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import get_args

import pytest

from hypervisor.runspec import RunSpec
from service.core.config import Settings
from service.metrics import Metrics
from service.models import BOOTING, CLONE, COLD, FAILED, LIVE_STATES, READY, TEMPLATE_STATES, utcnow
from service.schemas import TemplateState
from service.services import templates as T
from service.services.pool import PoolManager
from service.services.supervisor import Supervisor
from service.services.templates import TemplateManager
from service.services.work import BOOT, STOP, TEMPLATE, Wakeup, Work
from tests.support.servers import short_tmpdir


@pytest.fixture
def workdir():
    path = short_tmpdir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def settings(workdir):
    return Settings(data_dir=workdir / "data", database_url="sqlite://", boot_concurrency=2, boot_timeout_s=5.0,
                    stop_timeout_s=0.5)


def flavor(**fields) -> SimpleNamespace:
    return SimpleNamespace(**({"name": "f", "generation": 1, "pool_target": 2, "pool_min": 0, "max_age_s": 0,
                               "mem_mib": 128, "vcpus": 1, "cmdline_extra": "", "clone": False, "kernel": None,
                               "initrd": None} | fields))


class FakeInventory:
    """VM rows in a dict, with the real inventory's compare-and-set transitions; events in a list."""

    def __init__(self, settings: Settings) -> None:
        self.settings, self.vms, self.events, self.room = settings, {}, [], None

    def add(self, vm_id: str, state: str, **fields) -> SimpleNamespace:
        now = utcnow()
        vm = SimpleNamespace(**({"id": vm_id, "flavor": "f", "flavor_generation": 1, "state": state, "pooled": True,
                                 "source": COLD, "template": None, "pid": None, "mem_mib": 128, "vcpus": 1,
                                 "created_at": now, "ready_at": None, "failure_reason": None, "exit_code": None,
                                 "api_socket": str(self.settings.run_dir / f"{vm_id}.sock"),
                                 "console_path": str(self.settings.vm_dir / vm_id / "console.log")} | fields))
        self.vms[vm_id] = vm
        return vm

    def copy(self, vm):
        return SimpleNamespace(**vars(vm))

    def new_vm(self, flavor, *, pooled: bool, template: str | None = None):
        vm = self.add(f"vm-{len(self.vms):012d}", BOOTING, flavor=flavor.name, pooled=pooled, template=template,
                      source=CLONE if template else COLD)
        return self.copy(vm)

    def get(self, vm_id: str):
        return self.copy(self.vms[vm_id])

    def live_brief(self) -> list:
        return [self.copy(vm) for vm in self.vms.values() if vm.state in LIVE_STATES]

    live = live_brief

    def list(self, flavor_name=None, state=None) -> list:
        return [self.copy(vm) for vm in self.vms.values() if flavor_name in (None, vm.flavor)]

    def state_counts(self) -> dict[str, int]:
        return dict(Counter(vm.state for vm in self.vms.values()))

    def flavor_state_counts(self) -> dict[tuple[str, str], int]:
        return dict(Counter((vm.flavor, vm.state) for vm in self.vms.values()))

    def pool_counts(self) -> dict[str, Counter]:
        return {}

    def update(self, vm_id: str, **fields) -> None:
        vars(self.vms[vm_id]).update(fields)

    def transition(self, vm_id, from_states, to_state, events, **fields):
        vm = self.vms[vm_id]
        if vm.state not in from_states:
            return None
        vars(vm).update(fields, state=to_state)
        self.events += [(kind, message, vm_id) for kind, message in events]
        return self.copy(vm)

    def event(self, kind, message, vm_id=None, flavor=None) -> None:
        self.events.append((kind, message, vm_id))

    def no_room_for(self, mem_mib: int) -> str | None:
        return self.room


class FakeClient:
    def __init__(self, launcher: FakeLauncher, vm) -> None:
        self.launcher, self.vm = launcher, vm

    def wait_agent_ready(self, timeout: float) -> dict:
        return {"pid": self.vm.pid, "exits": {"io": 3},
                "timeline_ms": {"process_start": 0.0, "first_kvm_run": 10.0, "init_reached": 300.0,
                                "agent_ready": 350.0}}

    def snapshot(self, path: str, resume: bool, timeout: float) -> dict:
        Path(path).mkdir(parents=True)
        (Path(path) / "state.json").write_text("{}")
        return {"memory_written": 64 << 20}

    def status(self) -> dict:
        return {"exits": {}}


class FakeLauncher:
    """Starts nothing: a 'VMM' is a pid and a socket file; `dead` holds the exit codes of VMMs that died."""

    def __init__(self, workdir: Path) -> None:
        self.workdir, self.children, self.spawned, self.stopped, self.cleaned = workdir, {}, [], [], []
        self.dead: dict[str, int | None] = {}
        self.reaped: list[set[str]] = []

    def _started(self, api_socket: str) -> SimpleNamespace:
        Path(api_socket).parent.mkdir(parents=True, exist_ok=True)
        Path(api_socket).touch()
        return SimpleNamespace(pid=4000 + len(self.spawned), poll=lambda: None)

    def spawn(self, vm, flavor):
        self.spawned.append(vm.id)
        return self._started(vm.api_socket)

    def boot_files(self, flavor) -> tuple[str, str]:
        kernel, initrd = self.workdir / "vmlinux", self.workdir / "initrd"
        kernel.write_bytes(b"kernel")
        initrd.write_bytes(b"initrd")
        return str(kernel), str(initrd)

    def boot_spec(self, flavor, api_socket, console_path, detach):
        return RunSpec("run", kernel="/k", api_sock=api_socket, console=console_path, detach=detach)

    def start_process(self, spec, cwd, log_path):
        self.spawned.append(spec.api_sock)
        return self._started(spec.api_sock)

    def exit_status(self, vm) -> tuple[bool, int | None]:
        return (False, self.dead[vm.id]) if vm.id in self.dead else (True, None)

    def describe_exit(self, vm, code) -> str:
        return f"VMM exited with code {code}"

    def logged_exit_code(self, vm) -> int | None:
        return None

    def client(self, vm, timeout: float = 10.0) -> FakeClient:
        return FakeClient(self, vm)

    def stop(self, vm, timeout_s: float) -> int | None:
        self.stopped.append(vm.id)
        return 0

    def cleanup(self, vm) -> None:
        self.cleaned.append(vm.id)

    def watch(self, vm_id: str, proc) -> None:
        self.children[vm_id] = proc

    def forget(self, vm_id: str) -> None:
        self.children.pop(vm_id, None)

    def reap(self, live_ids: set[str]) -> None:
        self.reaped.append(live_ids)

    def scan(self) -> dict[str, int]:
        return {}

    def foreground(self, vm) -> None:
        pass


class FakeTemplates:
    def __init__(self) -> None:
        self.ticks, self.failed = 0, []

    def plan(self, flavor) -> tuple[str | None, str | None]:
        return None, None

    async def tick(self, flavors, live_templates) -> None:
        self.ticks += 1

    async def restore_failed(self, flavor_name, dir_name, reason, fallback=True) -> None:
        self.failed.append((flavor_name, dir_name, reason, fallback))


class Rings:
    """A wake callable that counts."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, after_s: float = 0.0) -> None:
        self.count += 1


# --- the pool manager -----------------------------------------------------------------------------------------

def pool(settings, workdir, flavors) -> tuple[PoolManager, FakeInventory, FakeLauncher, list]:
    inventory, launcher, stops = FakeInventory(settings), FakeLauncher(workdir), []

    async def stop_vm(vm_id, reason, from_states=(BOOTING, READY), kind="vm.stopping"):
        stops.append((vm_id, reason))
        return inventory.get(vm_id)

    listing = SimpleNamespace(list=lambda: flavors, get=lambda name: next(f for f in flavors if f.name == name))
    manager = PoolManager(settings, inventory, listing, launcher, Metrics(), Work(), Wakeup(), FakeTemplates(),
                          stop_vm)
    return manager, inventory, launcher, stops


def test_a_tick_refills_the_pool_and_the_boots_make_ready_vms(settings, workdir):
    manager, inventory, launcher, _ = pool(settings, workdir, [flavor(pool_target=3)])

    async def refill():
        await manager.tick()
        boots = [manager.work.get(BOOT, vm_id) for vm_id in inventory.vms]
        assert len([b for b in boots if b]) == 2, "boot_concurrency=2 caps the boots in flight"
        await asyncio.gather(*(b for b in boots if b))
        await manager.tick()  # the third one, now there is room
        await asyncio.gather(*(manager.work.get(BOOT, vm_id) or asyncio.sleep(0) for vm_id in inventory.vms))

    asyncio.run(refill())
    assert [vm.state for vm in inventory.vms.values()] == [READY] * 3
    assert sorted(launcher.spawned) == sorted(inventory.vms)
    vm = next(iter(inventory.vms.values()))
    assert vm.boot_ms == {"vmm_setup": 10.0, "kernel": 290.0, "init_to_agent": 50.0, "total": 350.0}
    assert ("vm.ready", "agent ready (boot 350 ms)", vm.id) in inventory.events
    assert not manager.refills and manager.templates.ticks == 2
    assert 'pclite_pool_ready{flavor="f"} 2.0' in manager.metrics.render().decode()  # as of the second tick


def test_a_tick_retires_vms_of_an_old_spec_through_stop_vm(settings, workdir):
    manager, inventory, launcher, stops = pool(settings, workdir, [flavor(pool_target=1, generation=2)])
    inventory.add("vm-000000000001", READY, flavor_generation=1, ready_at=utcnow())
    inventory.add("vm-000000000002", READY, flavor_generation=2, ready_at=utcnow())
    asyncio.run(manager.tick())
    assert stops == [("vm-000000000001", "retired: flavor spec changed")]
    assert not launcher.spawned, "the VM of the current spec fills the target"


def test_a_boot_that_dies_fails_the_vm_and_backs_the_flavor_off(settings, workdir):
    manager, inventory, launcher, _ = pool(settings, workdir, [flavor(pool_target=1)])

    async def boot_and_die():
        launcher.dead["vm-000000000000"] = 1
        await manager.tick()
        await manager.work.get(BOOT, "vm-000000000000")

    asyncio.run(boot_and_die())
    vm = inventory.vms["vm-000000000000"]
    assert (vm.state, vm.exit_code) == (FAILED, 1)
    assert vm.failure_reason == "VMM exited with code 1 (during boot)"
    assert manager.health["f"].failures == 1 and manager.health["f"].backoff_until > 0
    assert launcher.stopped == ["vm-000000000000"]


# --- the template manager -------------------------------------------------------------------------------------

def templates(settings, workdir) -> tuple[TemplateManager, FakeInventory, FakeLauncher, Rings]:
    inventory, launcher, wake = FakeInventory(settings), FakeLauncher(workdir), Rings()
    manager = TemplateManager(settings, inventory, launcher, Metrics(), Work(), wake)
    manager.start()
    return manager, inventory, launcher, wake


def test_a_template_is_built_for_a_clone_pool_only_and_then_cloned_from(settings, workdir):
    manager, inventory, launcher, wake = templates(settings, workdir)
    clones, plain, idle = flavor(clone=True), flavor(name="g"), flavor(name="h", clone=True, pool_target=0)

    async def decide_and_build():
        await manager.tick([clones, plain, idle], set())
        task = manager.work.get(TEMPLATE, "f")
        assert task is not None and manager.work.get(TEMPLATE, "h") is None, "no pool, no template"
        assert manager.plan(clones) == (None, f"waiting for template {manager.templates['f'].dir_name} to be built")
        await task

    asyncio.run(decide_and_build())
    name = manager.templates["f"].dir_name
    assert manager.plan(clones) == (name, None) and manager.plan(plain) == (None, None)
    assert [manager.status(f)["state"] for f in (clones, plain, idle)] == ["ready", "disabled", "pending"]
    assert (settings.templates_dir / name / "state.json").is_file()
    assert (settings.templates_dir / name / "spec.json").is_file()
    assert wake.count == 1, "the pool is woken to clone"
    assert launcher.stopped == [f"tpl-{name}"] and not launcher.children
    assert [e[0] for e in inventory.events] == ["template.building", "template.ready"]
    assert "(64 MiB of guest RAM written)" in inventory.events[-1][1]


def test_a_template_build_waits_while_the_quota_has_no_room(settings, workdir):
    manager, inventory, launcher, _ = templates(settings, workdir)
    inventory.room = "128 MiB of guest memory in use + 128 MiB > max 200 MiB"
    asyncio.run(manager.tick([flavor(clone=True)], set()))
    assert manager.work.get(TEMPLATE, "f") is None and not launcher.spawned
    assert manager.templates["f"].error == f"template build waits for quota: {inventory.room}"


# --- the supervisor -------------------------------------------------------------------------------------------

def supervisor(settings, workdir) -> tuple[Supervisor, FakeInventory, FakeLauncher, Rings, FakeTemplates]:
    inventory, launcher, wake, tpl = FakeInventory(settings), FakeLauncher(workdir), Rings(), FakeTemplates()
    return (Supervisor(settings, inventory, launcher, Metrics(), Work(), wake, tpl.restore_failed),
            inventory, launcher, wake, tpl)


def test_the_supervisor_reaps_a_dead_vmm_and_leaves_vms_with_a_task_alone(settings, workdir):
    sup, inventory, launcher, wake, tpl = supervisor(settings, workdir)
    inventory.add("vm-000000000001", READY, ready_at=utcnow() - timedelta(hours=1))
    inventory.add("vm-000000000002", READY, ready_at=utcnow(), source=CLONE, template="f-0123456789ab")
    inventory.add("vm-000000000003", READY)
    inventory.add("vm-000000000004", BOOTING)
    launcher.dead.update({"vm-000000000001": -9, "vm-000000000002": 1, "vm-000000000003": 1})

    async def check():
        sup.work.start(STOP, "vm-000000000003", asyncio.sleep(3600))  # being stopped: its task owns it
        await sup.check_processes()
        await sup.work.drain()

    asyncio.run(check())
    states = {vm_id: (vm.state, vm.exit_code) for vm_id, vm in inventory.vms.items()}
    assert states == {"vm-000000000001": (FAILED, -9), "vm-000000000002": (FAILED, 1),
                      "vm-000000000003": (READY, None), "vm-000000000004": (BOOTING, None)}
    assert inventory.vms["vm-000000000001"].failure_reason == "VMM exited with code -9"
    assert launcher.reaped == [{f"vm-00000000000{n}" for n in range(1, 5)}]
    assert sorted(launcher.cleaned) == ["vm-000000000001", "vm-000000000002"] and wake.count == 2
    assert tpl.failed == [("f", "f-0123456789ab", "VMM exited with code 1", False)], "a young clone: bad template"
    assert 'pclite_vmm_crashes_total 2.0' in sup.metrics.render().decode()


def test_stop_vm_stops_in_the_background_as_work(settings, workdir):
    sup, inventory, launcher, wake, _ = supervisor(settings, workdir)
    inventory.add("vm-000000000001", READY)

    async def stop():
        vm = await sup.stop_vm("vm-000000000001", "deleted through the API")
        assert vm.state == "stopping" and sup.work.get(STOP, vm.id) is not None
        await sup.wait_stopped(vm.id, 5)
        assert sup.work.get(STOP, vm.id) is None

    asyncio.run(stop())
    assert inventory.vms["vm-000000000001"].state == "stopped" and launcher.stopped == ["vm-000000000001"]
    assert wake.count == 1


# --- work and wake-ups ----------------------------------------------------------------------------------------

def test_work_keeps_the_newest_task_per_key_and_drain_cancels_everything():
    async def scenario():
        work = Work()
        first = work.start(BOOT, "vm-1", asyncio.sleep(3600))
        second = work.start(BOOT, "vm-1", asyncio.sleep(3600))
        first.cancel()
        await asyncio.sleep(0)
        assert work.get(BOOT, "vm-1") is second, "the ended first task does not take the second's place"
        assert work.get(STOP, "vm-1") is None
        await work.drain()
        assert second.cancelled() and work.get(BOOT, "vm-1") is None

    asyncio.run(scenario())


def test_a_burst_of_delayed_wakes_is_one_wake():
    async def scenario():
        wake, woken = Wakeup(), []
        for _ in range(5):
            wake(after_s=0.01)
        loop = asyncio.get_running_loop()
        started = loop.time()
        await wake.wait(5)
        woken.append(loop.time() - started)
        await wake.wait(0.05)  # nothing more pending: times out
        woken.append(loop.time() - started)
        return woken

    first, second = asyncio.run(scenario())
    assert first < 1 and second >= 0.05


def test_template_states_are_one_list():
    assert get_args(TemplateState) == TEMPLATE_STATES == T.STATES
