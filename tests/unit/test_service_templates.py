"""Clone pools on this host (no guest boots here): template keys, the flavor's `clone` field end to end, migration
0002 on SQLite and PostgreSQL, the template manager's decisions and garbage collection, and a real pclited that
falls back to cold boots when a template does not restore.
"""

from __future__ import annotations

import asyncio
import mmap
import os
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from sqlalchemy import inspect, text

from service.cli import manifest
from service.cli.errors import CliError
from service.core.config import Settings
from service.core.db import Database, downgrade, upgrade
from service.models import VM, Flavor, utcnow
from service.schemas import FlavorPatch, FlavorSpec
from service.services import templates as T
from service.services.node import Node
from tests.support.servers import Pclited, database_url, short_tmpdir

FAST = {"pool_tick_s": 0.2, "supervise_interval_s": 0.1, "backoff_base_s": 0.4, "backoff_max_s": 1.6,
        "degrade_after_failures": 2, "stop_timeout_s": 0.5, "health_interval_s": 3600,
        "template_backoff_s": 1.0, "template_backoff_max_s": 4.0}


@pytest.fixture
def workdir():
    path = short_tmpdir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


def files(workdir: Path) -> tuple[str, str]:
    kernel, initrd = workdir / "vmlinux", workdir / "initrd"
    kernel.write_bytes(b"kernel")
    initrd.write_bytes(b"initrd")
    return str(kernel), str(initrd)


def flavor(**fields) -> SimpleNamespace:
    return SimpleNamespace(**({"name": "f", "cmdline_extra": "", "mem_mib": 128, "vcpus": 1, "clone": True,
                               "pool_target": 2} | fields))


# --- the template key ---------------------------------------------------------------------------------------

def test_the_key_changes_with_everything_that_changes_the_guest_and_nothing_else(workdir):
    kernel, initrd = files(workdir)
    key = T.spec_key(T.template_spec(flavor(), kernel, initrd))
    assert len(key) == 12 and key == T.spec_key(T.template_spec(flavor(), kernel, initrd))
    assert T.spec_key(T.template_spec(flavor(pool_target=9, name="g"), kernel, initrd)) == key  # not the guest
    changed = {T.spec_key(T.template_spec(flavor(**change), kernel, initrd))
               for change in ({"mem_mib": 256}, {"vcpus": 2}, {"cmdline_extra": "loglevel=3"})}
    assert len(changed) == 3 and key not in changed
    Path(kernel).write_bytes(b"kernel, rebuilt")  # same path, another size
    rebuilt = T.spec_key(T.template_spec(flavor(), kernel, initrd))
    os.utime(initrd, ns=(0, 1))  # same size, another mtime
    touched = T.spec_key(T.template_spec(flavor(), kernel, initrd))
    assert len({key, rebuilt, touched}) == 3
    with pytest.raises(FileNotFoundError):
        T.template_spec(flavor(), str(workdir / "gone"), initrd)


def test_template_directory_names_and_backoff():
    assert T.split_name("my-flavor-0123456789ab") == ("my-flavor", "0123456789ab")
    for name in (".build-f-0123456789ab-abc", "f", "f-xyz", "f-0123456789AB", "-0123456789ab"):
        assert T.split_name(name) is None, name
    assert [T.backoff_s(n, 5, 60) for n in (1, 2, 3, 4, 5, 6)] == [5, 10, 20, 40, 60, 60]


def test_a_clone_has_no_kernel_phase_and_metrics_label_the_source():
    from service.metrics import Metrics
    from service.services.timeline import boot_phases
    restored = {"process_start": 0.0, "vmm_ready": 40.0, "restored": 90.0, "init_reached": 90.5,
                "agent_ready": 91.0, "first_kvm_run": 95.0, "api_served": 96.0}  # KVM_RUN starts after ready
    assert boot_phases(restored, "clone") == {"vmm_setup": 90.0, "kernel": None, "init_to_agent": None,
                                              "total": 91.0}
    metrics = Metrics()
    metrics.observe_boot("f", boot_phases(restored, "clone"), "clone")
    metrics.observe_boot("f", {"vmm_setup": 10.0, "kernel": 800.0, "init_to_agent": 50.0, "total": 860.0}, "cold")
    metrics.observe_boot("f", {"vmm_setup": 10.0, "kernel": 800.0, "init_to_agent": 50.0, "total": 860.0}, None)
    text = metrics.render().decode()
    assert 'pclite_boot_to_ready_seconds_count{flavor="f",source="clone"} 1.0' in text
    assert 'pclite_boot_to_ready_seconds_count{flavor="f",source="cold"} 1.0' in text  # not the template's
    assert 'pclite_boot_phase_seconds_count{flavor="f",phase="total"} 3.0' in text
    assert 'pclite_boot_phase_seconds_count{flavor="f",phase="kernel"} 2.0' in text
    metrics.set_templates({"f": "ready"})
    assert 'pclite_template_state{flavor="f",state="ready"} 1.0' in metrics.render().decode()
    metrics.set_templates({})
    assert "pclite_template_state{" not in metrics.render().decode()


# --- the flavor's `clone` field: schema, manifests, deploy ----------------------------------------------------

def test_clone_defaults_to_true_in_the_schema_and_manifests_carry_it():
    assert FlavorSpec(name="a").clone is True
    assert FlavorSpec(name="a", clone=False).clone is False
    assert FlavorPatch(clone=False).model_dump(exclude_unset=True) == {"clone": False}
    doc = "apiVersion: pclite/v1\nkind: Flavor\nmetadata: {name: a}\nspec:\n  clone: false\n"
    (parsed,) = manifest.parse(doc, "a.yaml")
    assert parsed.body == {"clone": False}
    assert manifest.to_manifest({"name": "a", "clone": False})["spec"]["clone"] is False
    with pytest.raises(CliError, match=r"a.yaml:5: document 1 \(flavor/a\): spec.clone: must be true or false, "
                                       r"got str 'yes'"):
        manifest.parse(doc.replace("false", "'yes'"), "a.yaml")
    default = Path(__file__).resolve().parents[2] / "deploy" / "flavors" / "default.yaml"
    assert manifest.parse(default.read_text(), "default.yaml")[0].body["clone"] is True


# --- migration 0002 -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_migration_0002_fills_existing_rows_and_downgrades_keeping_them(backend, workdir):
    database = Database(database_url(backend, workdir))
    try:
        upgrade(database, "0001")
        with database.engine.begin() as conn:
            conn.execute(text("INSERT INTO flavors (name, cmdline_extra, vcpus, mem_mib, pool_min, pool_target, "
                              "max_age_s, generation, created_at, updated_at) VALUES ('old', '', 1, 128, 0, 1, 0, 1, "
                              ":now, :now)"), {"now": utcnow().replace(tzinfo=None)})
            conn.execute(text("INSERT INTO vms (id, flavor, flavor_generation, pooled, state, vcpus, mem_mib, "
                              "api_socket, console_path, created_at) VALUES ('vm-000000000001', 'old', 1, true, "
                              "'ready', 1, 128, '/s', '/c', :now)"), {"now": utcnow().replace(tzinfo=None)})
        upgrade(database)
        with database.read() as s:
            assert s.get(Flavor, "old").clone is True
            vm = s.get(VM, "vm-000000000001")
            assert (vm.source, vm.template) == ("cold", None)
        downgrade(database, "0001")
        columns = {c["name"] for c in inspect(database.engine).get_columns("vms")}
        assert not {"source", "template"} & columns
        assert "clone" not in {c["name"] for c in inspect(database.engine).get_columns("flavors")}
        with database.engine.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM vms")).scalar() == 1
        upgrade(database)
    finally:
        database.dispose()


# --- the template manager, on real objects --------------------------------------------------------------------

@pytest.fixture
def node(workdir):
    settings = Settings(data_dir=workdir / "data", database_url=f"sqlite:///{workdir / 'db.sqlite'}",
                        template_backoff_s=5.0)
    rt = Node(settings)
    upgrade(rt.db)
    settings.templates_dir.mkdir(parents=True)
    yield rt
    rt.db.dispose()


def events(rt) -> list[tuple[str, str]]:
    with rt.db.read() as s:
        return [(e.kind, e.message) for e in s.execute(text("SELECT kind, message FROM events ORDER BY id"))]


def test_plan_waits_for_the_first_template_clones_when_ready_and_falls_back_cold(node, workdir):
    manager, f = node.templates, flavor()
    assert manager.plan(f) == (None, None)  # nothing known yet: cold
    template = manager.templates["f"] = T.Template("f", key="0123456789ab")
    assert manager.plan(f) == (None, "waiting for template f-0123456789ab to be built")
    template.state, template.started = T.BUILDING, time.monotonic()
    assert manager.plan(f)[0] is None and manager.plan(f)[1]
    template.started -= node.settings.boot_timeout_s + 1  # a build slower than any boot: stop waiting for it
    assert manager.plan(f) == (None, None)
    template.state = T.READY
    assert manager.plan(f) == ("f-0123456789ab", None)
    assert manager.plan(flavor(clone=False)) == (None, None)
    template.state, template.failures = T.BUILDING, 1  # a rebuild after a failure: cold boots meanwhile
    assert manager.plan(f) == (None, None)
    assert manager.status(flavor(clone=False)) == {"state": "disabled"}


def test_a_failed_restore_invalidates_the_template_once_and_backs_off(node):
    manager = node.templates
    snapshot = node.settings.templates_dir / "f-0123456789ab"
    snapshot.mkdir()
    (snapshot / "state.json").write_text("{}")
    manager.templates["f"] = T.Template("f", key="0123456789ab", state=T.READY)

    async def two_clones_fail():
        started = time.monotonic()
        await asyncio.gather(manager.restore_failed("f", "f-0123456789ab", "snapshot memory is truncated"),
                             manager.restore_failed("f", "f-0123456789ab", "snapshot memory is truncated"))
        return started

    started = asyncio.run(two_clones_fail())
    template = manager.templates["f"]
    assert not snapshot.exists(), "an unusable template is removed so no other clone tries it"
    assert (template.state, template.failures) == (T.FAILED, 1)
    assert template.error == "restore from template f-0123456789ab failed: snapshot memory is truncated"
    assert 4.5 < template.backoff_until - started < 5.5, "rebuilt after the backoff, not at once"
    assert manager.plan(flavor()) == (None, None), "cold boots meanwhile"
    assert node.metrics.clone_fallbacks.labels("f")._value.get() == 2  # both VMs fell back
    (kind, message), = [e for e in events(node) if e[0] == "template.failed"]
    assert "truncated" in message and "cold-booted" in message and "rebuilt in 5s" in message


def test_a_template_build_waits_for_quota_room(node, workdir):
    manager = node.templates
    node.settings.max_guest_mem_mib = 200
    kernel, initrd = files(workdir)
    f = flavor(mem_mib=128, kernel=kernel, initrd=initrd)
    with node.db.write() as s:
        s.add(VM(id="vm-000000000001", flavor="f", flavor_generation=1, pooled=True, state="claimed", vcpus=1,
                 mem_mib=128, api_socket="/s", console_path="/c", created_at=utcnow()))
    asyncio.run(manager._observe(f))
    template = manager.templates["f"]
    assert template.state == T.PENDING and template.task is None, "no template VM beyond the quota"
    assert template.error == ("template build waits for quota: 128 MiB of guest memory in use + 128 MiB > max "
                              "200 MiB (PCLITE_MAX_GUEST_MEM_MIB)")
    node.settings.max_guest_mem_mib = 16384
    assert node.inventory.no_room_for(128) is None


def test_gc_keeps_current_and_used_templates_and_removes_the_rest(node):
    root = node.settings.templates_dir
    for name in ("f-000000000001", "f-000000000002", "f-000000000003", "g-000000000004", "h-000000000005",
                 "not-a-template"):
        (root / name).mkdir()
        (root / name / "memory").write_bytes(b"x")
    node.templates.templates["f"] = T.Template("f", key="000000000002", state=T.READY)
    node.templates.templates["h"] = T.Template("h", state=T.FAILED)  # its spec cannot be read right now
    flavors = [flavor(), flavor(name="h")]
    removed = node.templates.gc(flavors, live_templates={"f-000000000003"})
    assert sorted(removed) == ["f-000000000001", "g-000000000004"]
    assert sorted(p.name for p in root.iterdir()) == ["f-000000000002", "f-000000000003", "h-000000000005",
                                                      "not-a-template"]
    assert [k for k, _ in events(node)] == ["template.removed", "template.removed"]


def test_a_clone_keeps_its_memory_when_the_template_file_is_deleted(workdir):
    """Why removing a template under running clones is safe: they map it MAP_PRIVATE, and an unlinked file lives
    on while mapped (pages the clone wrote are its own copies)."""
    path = workdir / "memory"
    path.write_bytes(bytes(range(256)) * 64)
    with open(path, "rb") as f:
        mapping = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    mapping[0:4] = b"mine"
    os.unlink(path)
    assert mapping[0:4] == b"mine" and mapping[4:8] == bytes([4, 5, 6, 7]) and mapping[-1] == 255
    mapping.close()


# --- a real pclited: the fallback, end to end -----------------------------------------------------------------

def test_pclited_falls_back_to_cold_boot_when_a_template_does_not_restore(workdir):
    """A template directory for the flavor's exact spec whose state is garbage: pclited takes it as ready, the
    clone's VMM refuses it (exit 1), the VM is cold-booted instead (which fails on this host's KVM), the template
    is removed and rebuilt with a backoff, never in a tight loop."""
    data = workdir / "data"
    garbage = workdir / "not-a-kernel"
    garbage.write_bytes(b"this is not a kernel\n")
    service = Pclited(data, **FAST).start()
    try:
        with service.client() as api:  # target 0: no template is built, but its key is known
            created = api.post("/v1/flavors", json={"name": "lab", "kernel": str(garbage), "initrd": str(garbage),
                                                    "mem_mib": 64, "pool_target": 0})
            assert created.status_code == 201, created.text
            spec = T.template_spec(flavor(mem_mib=64), str(garbage), str(garbage))
            key = service.wait_for(lambda: api.get("/v1/flavors/lab").json()["template"]["key"], 10)
            assert key == T.spec_key(spec)
        service.stop()
        snapshot = data / "templates" / f"lab-{key}"
        snapshot.mkdir(parents=True)
        (snapshot / "state.json").write_text('{"format": "something else"}')
        service.start()
        with service.client() as api:
            assert api.get("/v1/flavors/lab").json()["template"]["state"] == "ready"
            assert api.patch("/v1/pools/lab", json={"target": 1}).status_code == 200

            def fell_back():
                return [e for vm in api.get("/v1/vms", params={"flavor": "lab"}).json()
                        for e in api.get(f"/v1/vms/{vm['id']}/events").json() if e["kind"] == "vm.clone_fallback"]

            fallback = service.wait_for(fell_back, 30, message="a clone fallback")[0]
            assert "is not a pclite snapshot" in fallback["message"] and "cold-booting instead" in fallback["message"]
            vm = service.wait_for(lambda: (v := api.get(f"/v1/vms/{fallback['vm_id']}").json())["state"] == "failed"
                                  and v, 10, message="the cold boot to fail (this host's KVM)")
            assert vm["source"] == "cold" and "bzImage" in vm["failure_reason"], vm
            kinds = [e["kind"] for e in api.get(f"/v1/vms/{vm['id']}/events").json()]
            assert kinds[:3] == ["vm.booting", "vm.clone_fallback", "vm.failed"], kinds
            assert (Path(service.data_dir) / "vms" / vm["id"] / "vmm-restore.log").exists()
            assert not snapshot.exists()
            metrics = api.get("/metrics").text
            assert 'pclite_clone_fallbacks_total{flavor="lab"} 1.0' in metrics
            time.sleep(4)  # rebuilds fail here too (garbage kernel): 1 s, 2 s, 4 s apart
            template = api.get("/v1/flavors/lab").json()["template"]
            assert template["state"] in ("failed", "building") and 2 <= template["failures"] <= 4, template
            assert "template build failed" in template["error"] or "restore" in template["error"]
            logs = data / "vms" / "template-lab"
            assert "bzImage" in (logs / "vmm.log").read_text(), "a failed build's logs outlive its work directory"
            assert 'pclite_template_builds_total{flavor="lab",result="failed"}' in api.get("/metrics").text
            tried = [e for vm in api.get("/v1/vms", params={"flavor": "lab"}).json()
                     for e in api.get(f"/v1/vms/{vm['id']}/events").json() if "restoring a clone" in e["message"]]
            assert len(tried) == 1, f"one clone tried, no loop: {tried}"
    finally:
        service.stop()


def test_template_vmms_are_not_taken_for_pool_vmms(workdir):
    """Their sockets live in run_dir/tpl/: the orphan sweep and the restart reconcile, which kill any VMM in
    run_dir that no live VM owns, must not see them; the template manager finds them there itself."""
    import signal
    import subprocess
    import sys

    from service.services.procfs import scan_vmms
    run_dir = workdir / "run"
    procs = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "hypervisor", "run",
                               "--api-sock", str(path)], start_new_session=True)
             for path in (run_dir / "vm-000000000001.sock", run_dir / "tpl" / "0123456789ab.sock")]
    try:
        deadline = time.monotonic() + 10
        while len(scan_vmms(run_dir) | scan_vmms(run_dir / "tpl")) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert scan_vmms(run_dir) == {str(run_dir / "vm-000000000001.sock"): procs[0].pid}
        assert scan_vmms(run_dir / "tpl") == {str(run_dir / "tpl" / "0123456789ab.sock"): procs[1].pid}
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
