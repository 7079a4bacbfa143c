"""pclited's database layer on SQLite and on a real PostgreSQL server: migrations, claims, quotas, transitions."""

from __future__ import annotations

import shutil
import threading
import uuid
from datetime import UTC, timedelta
from pathlib import Path

import pytest
from sqlalchemy import inspect, select

from service.core.config import Settings
from service.core.db import Database, downgrade, upgrade
from service.models import BOOTING, CLAIMED, FAILED, READY, STOPPED, STOPPING, VM, Base, Event, Flavor, utcnow
from service.schemas import FlavorPatch, FlavorSpec
from service.services.errors import Conflict, Invalid, NotFound, QuotaExceeded
from service.services.flavors import FlavorService
from service.services.inventory import Inventory
from tests.support.servers import database_url, short_tmpdir

TABLES = {"flavors", "vms", "events"}


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request):
    return request.param


@pytest.fixture
def workdir():
    path = short_tmpdir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def db(backend, workdir):
    database = Database(database_url(backend, workdir))
    upgrade(database)
    yield database
    database.dispose()


def settings_for(workdir: Path, **overrides) -> Settings:
    return Settings(data_dir=workdir / "data", database_url="sqlite://", **overrides)


def add_flavor(db: Database, name: str = "small", mem_mib: int = 256, generation: int = 1) -> Flavor:
    with db.write() as s:
        flavor = Flavor(name=name, kernel=None, initrd=None, cmdline_extra="", vcpus=1, mem_mib=mem_mib, pool_min=0,
                        pool_target=0, max_age_s=0, generation=generation, created_at=utcnow(), updated_at=utcnow())
        s.add(flavor)
    return flavor


def add_vms(db: Database, n: int, state: str = READY, flavor: str = "small", mem_mib: int = 256,
            generation: int = 1) -> list[str]:
    ids = [f"vm-{uuid.uuid4().hex[:12]}" for _ in range(n)]
    with db.write() as s:
        for i, vm_id in enumerate(ids):
            s.add(VM(id=vm_id, flavor=flavor, flavor_generation=generation, pooled=True, state=state, vcpus=1,
                     mem_mib=mem_mib, api_socket=f"/tmp/{vm_id}.sock", console_path=f"/tmp/{vm_id}/console.log",
                     created_at=utcnow(), ready_at=utcnow() + timedelta(milliseconds=i)))
    return ids


def test_upgrade_head_then_downgrade_base_round_trips(backend, workdir):
    database = Database(database_url(backend, workdir))
    try:
        upgrade(database)
        assert set(inspect(database.engine).get_table_names()) >= TABLES
        downgrade(database, "base")
        assert not TABLES & set(inspect(database.engine).get_table_names())
        upgrade(database)  # and back up: the downgrade left nothing behind that blocks it
        assert set(inspect(database.engine).get_table_names()) >= TABLES
    finally:
        database.dispose()


def test_migrations_match_the_models(db):
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    with db.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
    assert diff == [], f"models and migrations disagree (write a migration): {diff}"


def test_alembic_cli_config_upgrades_and_downgrades(backend, workdir, monkeypatch):
    """`alembic upgrade head` from the repository root (alembic.ini), the URL from pclited's settings."""
    from alembic import command
    from alembic.config import Config

    url = database_url(backend, workdir)
    monkeypatch.setenv("PCLITE_DATABASE_URL", url)
    monkeypatch.setenv("PCLITE_DATA_DIR", str(workdir / "data"))
    config = Config(str(Path(__file__).resolve().parents[2] / "alembic.ini"))
    command.upgrade(config, "head")
    database = Database(url)
    try:
        assert set(inspect(database.engine).get_table_names()) >= TABLES
        command.downgrade(config, "base")
        assert not TABLES & set(inspect(database.engine).get_table_names())
    finally:
        database.dispose()


def test_a_ready_vm_is_claimed_exactly_once_under_16_concurrent_claims(db, workdir):
    add_flavor(db)
    ready = set(add_vms(db, 5))
    inv = Inventory(db, settings_for(workdir))
    barrier = threading.Barrier(16)
    results: list[str | None] = []
    errors: list[BaseException] = []

    def claim():
        try:
            barrier.wait()
            vm, _ = inv.claim("small")
            results.append(vm.id if vm else None)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=claim) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    claimed = [r for r in results if r]
    assert len(results) == 16
    assert sorted(claimed) == sorted(ready), "every ready VM claimed, and none twice"
    assert results.count(None) == 11
    with db.read() as s:
        assert {vm.state for vm in s.scalars(select(VM))} == {CLAIMED}
        claim_events = list(s.scalars(select(Event).where(Event.kind == "vm.claimed")))
    assert sorted(e.vm_id for e in claim_events) == sorted(ready)


def test_claim_takes_the_oldest_ready_vm_of_the_current_generation_only(db, workdir):
    add_flavor(db, generation=2)
    stale = add_vms(db, 1, generation=1)
    current = add_vms(db, 2, flavor="small", generation=2, state=READY, mem_mib=128)
    inv = Inventory(db, settings_for(workdir))
    inv.update(stale[0], ready_at=utcnow() - timedelta(hours=1))  # the oldest, but of the old spec
    vm, _ = inv.claim("small")
    assert vm.id == current[0] and vm.state == CLAIMED and vm.claimed_at is not None
    assert inv.claim("small")[0].id == current[1]
    vm, flavor = inv.claim("small")
    assert vm is None, "a VM of an older flavor spec is never handed out"
    assert flavor.generation == 2, "a miss hands back the flavor, for a cold boot"


def test_claim_of_an_unknown_flavor_is_not_found(db, workdir):
    with pytest.raises(NotFound, match="no flavor named 'nope'"):
        Inventory(db, settings_for(workdir)).claim("nope")


def test_transitions_are_compare_and_set(db, workdir):
    add_flavor(db)
    (vm_id,) = add_vms(db, 1, state=BOOTING)
    inv = Inventory(db, settings_for(workdir))
    assert inv.transition(vm_id, (READY,), CLAIMED, []) is None, "not ready: no claim"
    vm = inv.transition(vm_id, (BOOTING,), STOPPING, [("vm.stopping", "deleted")])
    assert vm.state == STOPPING
    assert inv.transition(vm_id, (BOOTING,), FAILED, [("vm.failed", "late boot failure")]) is None, \
        "a boot failure after a stop request must not overwrite it"
    assert inv.transition(vm_id, (STOPPING,), STOPPED, [("vm.stopped", "done")], stopped_at=utcnow()).state == STOPPED
    assert [e.kind for e in inv.events(vm_id)] == ["vm.stopping", "vm.stopped"]


@pytest.mark.parametrize("quota", ["vms", "memory"])
def test_quotas_refuse_a_new_vm_with_a_clear_message(db, workdir, quota):
    flavor = add_flavor(db, mem_mib=512)
    add_vms(db, 2, state=CLAIMED, mem_mib=512)
    add_vms(db, 3, state=FAILED, mem_mib=512)  # terminal VMs hold nothing
    limits = {"max_vms": 2} if quota == "vms" else {"max_guest_mem_mib": 1500}
    inv = Inventory(db, settings_for(workdir, **limits))
    with pytest.raises(QuotaExceeded) as err:
        inv.new_vm(flavor, pooled=False)
    assert ("PCLITE_MAX_VMS" if quota == "vms" else "PCLITE_MAX_GUEST_MEM_MIB") in err.value.detail
    roomy = Inventory(db, settings_for(workdir, max_vms=3, max_guest_mem_mib=1536))
    vm = roomy.new_vm(flavor, pooled=True)
    assert vm.state == BOOTING and vm.api_socket.endswith(f"/run/{vm.id}.sock")
    assert vm.id.startswith("vm-") and len(vm.id) == 15 and int(vm.id[3:], 16) >= 0


def test_concurrent_new_vms_never_exceed_the_vm_quota(db, workdir):
    flavor = add_flavor(db, mem_mib=64)
    inv = Inventory(db, settings_for(workdir, max_vms=5))
    barrier = threading.Barrier(12)
    made, refused = [], []

    def make():
        barrier.wait()
        try:
            made.append(inv.new_vm(flavor, pooled=True).id)
        except QuotaExceeded:
            refused.append(1)

    threads = [threading.Thread(target=make) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(made) == 5 and len(refused) == 7


def test_timestamps_come_back_as_aware_utc(db, workdir):
    add_flavor(db)
    (vm_id,) = add_vms(db, 1)
    vm = Inventory(db, settings_for(workdir)).get(vm_id)
    assert vm.created_at.tzinfo is not None and vm.created_at.utcoffset() == timedelta(0)
    assert abs((utcnow() - vm.created_at).total_seconds()) < 60
    assert vm.ready_at.tzinfo == UTC


def test_prune_forgets_old_terminal_vms_but_keeps_their_events(db, workdir):
    add_flavor(db)
    inv = Inventory(db, settings_for(workdir))
    (old,) = add_vms(db, 1, state=STOPPED)
    (live,) = add_vms(db, 1, state=CLAIMED, flavor="other")
    inv.update(old, stopped_at=utcnow() - timedelta(days=2))
    inv.event("vm.stopped", "bye", old, "small")
    assert [vm.id for vm in inv.prune(86400)] == [old]
    with pytest.raises(NotFound):
        inv.get(old)
    assert inv.get(live).state == CLAIMED
    with db.read() as s:
        assert s.scalar(select(Event).where(Event.vm_id == old)) is not None


# --- flavors ------------------------------------------------------------------------------------------------
def test_flavor_crud_and_generation_bump(db, workdir):
    flavors = FlavorService(db, settings_for(workdir))
    created = flavors.create(FlavorSpec(name="small", pool_target=2))
    assert (created.generation, created.vcpus, created.mem_mib) == (1, 1, 256)
    with pytest.raises(Conflict, match="already exists"):
        flavors.create(FlavorSpec(name="small"))
    assert flavors.patch("small", FlavorPatch(pool_target=3)).generation == 1, "pool size is not a boot change"
    assert flavors.patch("small", FlavorPatch(mem_mib=512)).generation == 2, "a new size retires pooled VMs"
    replaced, was_created = flavors.replace("small", FlavorSpec(vcpus=2, pool_target=1))
    assert not was_created and replaced.vcpus == 2 and replaced.mem_mib == 256 and replaced.generation == 3
    _, was_created = flavors.replace("big", FlavorSpec(mem_mib=1024, pool_target=0))
    assert was_created
    assert [f.name for f in flavors.list()] == ["big", "small"]
    flavors.delete("big")
    with pytest.raises(NotFound):
        flavors.get("big")


def test_flavor_validation_beyond_the_schema(db, workdir):
    flavors = FlavorService(db, settings_for(workdir, max_vms=10, max_guest_mem_mib=2048))
    with pytest.raises(Invalid, match="does not exist"):
        flavors.create(FlavorSpec(name="a", kernel="/nonexistent/vmlinux"))
    with pytest.raises(Invalid, match="absolute path"):
        flavors.create(FlavorSpec(name="a", initrd="relative/initrd"))
    with pytest.raises(QuotaExceeded, match="PCLITE_MAX_GUEST_MEM_MIB"):
        flavors.create(FlavorSpec(name="a", mem_mib=1024, pool_target=3))
    with pytest.raises(QuotaExceeded, match="PCLITE_MAX_VMS"):
        flavors.create(FlavorSpec(name="a", mem_mib=64, pool_target=11))
    flavors.create(FlavorSpec(name="a", pool_min=1, pool_target=2))
    with pytest.raises(Invalid, match="below the pool's min"):
        flavors.set_target("a", 0)
    with pytest.raises(Invalid, match="must not exceed"):
        flavors.patch("a", FlavorPatch(pool_min=5))
    with pytest.raises(Invalid, match="body name"):
        flavors.replace("a", FlavorSpec(name="b"))
    assert flavors.set_target("a", 4).pool_target == 4
