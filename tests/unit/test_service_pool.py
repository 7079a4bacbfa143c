"""Pools, supervision and restarts with a real pclited, on this host.

This host's KVM cannot boot Linux, so every real VMM pclited starts here fails: a good test of the failure,
backoff and degraded paths. Ready and claimed VMs are played by stand-in processes whose command line looks like
a VMM's (`hypervisor … --api-sock <run_dir>/<id>.sock`), which is how pclited finds its VMMs again.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from datetime import timedelta

import pytest

from service.core.db import Database, upgrade
from service.models import VM, Flavor, utcnow
from tests.support.servers import Pclited, database_url, short_tmpdir, vmm_processes

FAST = {"pool_tick_s": 0.2, "supervise_interval_s": 0.1, "backoff_base_s": 0.4, "backoff_max_s": 1.6,
        "degrade_after_failures": 2, "stop_timeout_s": 0.5, "health_interval_s": 3600}


class Harness:
    def __init__(self, backend: str) -> None:
        self.workdir = short_tmpdir()
        self.data = self.workdir / "data"
        self.run_dir = self.data / "run"
        self.url = database_url(backend, self.workdir)
        self.servers: list[Pclited] = []
        self.fakes: list[subprocess.Popen] = []
        self.garbage = self.workdir / "not-a-kernel"
        self.garbage.write_bytes(b"this is not a kernel\n")

    def server(self, **settings) -> Pclited:
        service = Pclited(self.data, self.url, **(FAST | settings))
        self.servers.append(service)
        return service.start()

    def db(self) -> Database:
        database = Database(self.url)
        upgrade(database)
        return database

    def fake_vmm(self, vm_id: str) -> subprocess.Popen:
        """A process pclited takes for that VM's VMM (but with no control socket behind it)."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", "hypervisor", "run",
                                 "--api-sock", str(self.run_dir / f"{vm_id}.sock")], start_new_session=True)
        self.fakes.append(proc)
        return proc

    def insert(self, database: Database, vm_id: str, state: str, pid: int | None, flavor: str = "f",
               generation: int = 1, **fields) -> None:
        now = utcnow()
        values = {"id": vm_id, "flavor": flavor, "flavor_generation": generation, "pooled": True, "state": state,
                  "vcpus": 1, "mem_mib": 64, "pid": pid, "api_socket": str(self.run_dir / f"{vm_id}.sock"),
                  "console_path": str(self.data / "vms" / vm_id / "console.log"), "created_at": now,
                  "ready_at": now if state in ("ready", "claimed") else None} | fields
        with database.write() as s:
            s.add(VM(**values))

    def add_flavor(self, database: Database, name: str = "f", **fields) -> None:
        now = utcnow()
        values = {"name": name, "kernel": str(self.garbage), "initrd": str(self.garbage), "cmdline_extra": "",
                  "vcpus": 1, "mem_mib": 64, "pool_min": 0, "pool_target": 0, "max_age_s": 0, "generation": 1,
                  "created_at": now, "updated_at": now} | fields
        with database.write() as s:
            s.add(Flavor(**values))

    def close(self) -> None:
        for service in self.servers:
            with contextlib.suppress(Exception):
                service.stop()
        for pid in vmm_processes(self.run_dir).values():  # real VMMs are detached: they outlive pclited
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for proc in self.fakes:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait()
        shutil.rmtree(self.workdir, ignore_errors=True)


@pytest.fixture(params=["sqlite", "postgres"])
def harness(request):
    h = Harness(request.param)
    yield h
    h.close()


@pytest.fixture
def sqlite_harness():
    h = Harness("sqlite")
    yield h
    h.close()


def vms_of(api, flavor: str) -> list[dict]:
    return api.get("/v1/vms", params={"flavor": flavor}).json()


def metric(api, line_start: str) -> float:
    for line in api.get("/metrics").text.splitlines():
        if line.startswith(line_start + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_boot_failures_fail_the_vm_log_events_and_degrade_the_flavor_with_backoff(harness):
    service = harness.server()
    with service.client() as api:
        response = api.post("/v1/flavors", json={"name": "broken", "kernel": str(harness.garbage),
                                                 "initrd": str(harness.garbage), "mem_mib": 64, "pool_target": 1})
        assert response.status_code == 201, response.text
        pool = service.wait_for(lambda: (p := api.get("/v1/pools/broken").json())["state"] == "degraded" and p,
                                15, message="the pool to turn degraded")
        assert "2 consecutive boot failures" in pool["reason"] and "next attempt in" in pool["reason"]
        assert "exited with code 1" in pool["reason"], "the reason carries the VMM's own error"
        time.sleep(4)  # let the backoff show: 0.4 s, 0.8 s, then 1.6 s between attempts
        failed = [vm for vm in vms_of(api, "broken") if vm["state"] == "failed"]
        starts = sorted(vm["created_at"] for vm in failed)
        assert 3 <= len(starts) <= 8, f"{len(starts)} boots in ~5 s: no backoff (the tick alone would do ~25)"
        from datetime import datetime
        gaps = [(datetime.fromisoformat(b) - datetime.fromisoformat(a)).total_seconds()
                for a, b in zip(starts, starts[1:], strict=False)]
        assert gaps[0] >= 0.3 and gaps[1] >= 0.7, f"backoff must grow: gaps {gaps}"
        vm = failed[0]
        assert vm["failure_reason"].startswith("VMM exited with code 1") and vm["stopped_at"] and not vm["ready_at"]
        kinds = [e["kind"] for e in api.get(f"/v1/vms/{vm['id']}/events").json()]
        assert kinds == ["vm.booting", "vm.failed"]
        claim = api.post("/v1/vms", json={"flavor": "broken"})
        assert claim.status_code == 503 and "degraded" in claim.json()["detail"], claim.text
        assert int(claim.headers["retry-after"]) >= 1
        assert metric(api, 'pclite_claims_total{flavor="broken",result="error"}') == 1
        assert metric(api, "pclite_vmm_crashes_total") == 0, "a VMM that reports a boot error did not crash"
        assert metric(api, 'pclite_vms{flavor="broken",state="failed"}') >= 3
        assert metric(api, 'pclite_pool_degraded{flavor="broken"}') == 1
        assert api.patch("/v1/pools/broken", json={"target": 0}).status_code == 200
        time.sleep(0.5)
        assert not vmm_processes(harness.run_dir), "no VMM left behind"
        assert not list(harness.run_dir.glob("*.sock")), "no socket left behind"


def test_a_vmm_that_does_not_get_ready_in_time_is_killed(sqlite_harness):
    """The real kernel: on this host KVM cannot run it; where it can, no boot reaches the agent in 0.2 s."""
    service = sqlite_harness.server(boot_timeout_s=0.2, degrade_after_failures=1, backoff_base_s=30)
    with service.client() as api:
        api.post("/v1/flavors", json={"name": "slow", "mem_mib": 128, "pool_target": 1})
        vm = service.wait_for(lambda: next((v for v in vms_of(api, "slow") if v["state"] == "failed"), None), 20,
                              message="the boot to time out")
        assert "agent not ready within 0.2s" in vm["failure_reason"]
        assert vm["pid"], "the VMM had been started"
        service.wait_for(lambda: not vmm_processes(sqlite_harness.run_dir), 5, message="the VMM to be killed")
        assert not os.path.exists(vm["api_socket"])
        assert api.get("/v1/pools/slow").json()["state"] == "degraded"


def test_kill_9_of_a_booting_vmm_is_a_crash(sqlite_harness):
    service = sqlite_harness.server(boot_timeout_s=60, degrade_after_failures=1, backoff_base_s=30)
    with service.client() as api:
        # A cold boot: a clone pool first waits for its template build, which on a loaded host outlasts the wait.
        api.post("/v1/flavors", json={"name": "victim", "mem_mib": 128, "pool_target": 1, "clone": False})
        vm = service.wait_for(lambda: next((v for v in vms_of(api, "victim") if v["pid"]), None), 30)
        service.wait_for(lambda: vmm_processes(sqlite_harness.run_dir), 5, message="the VMM process")
        os.kill(vm["pid"], signal.SIGKILL)
        failed = service.wait_for(lambda: (v := api.get(f"/v1/vms/{vm['id']}").json())["state"] == "failed" and v, 10)
        assert "killed by signal 9 (SIGKILL)" in failed["failure_reason"]
        assert metric(api, "pclite_vmm_crashes_total") == 1


def test_a_vmm_killed_by_sigsys_is_failed_with_reason_seccomp(sqlite_harness):
    # SIGSYS is how the VMM's seccomp filter kills it (hypervisor/seccomp_filter.py); pclited sees only that status.
    # Unjailed: a jailed VMM is pid 1 of its pid namespace, which a kill(SIGSYS) from outside cannot end (only the
    # kernel's seccomp kill or SIGKILL can; tests/guest/test_seccomp.py has the real one).
    service = sqlite_harness.server(boot_timeout_s=60, degrade_after_failures=1, backoff_base_s=30, jail=False)
    with service.client() as api:
        api.post("/v1/flavors", json={"name": "sys", "mem_mib": 128, "pool_target": 1, "clone": False})
        vm = service.wait_for(lambda: next((v for v in vms_of(api, "sys") if v["pid"]), None), 30)
        service.wait_for(lambda: vmm_processes(sqlite_harness.run_dir), 5, message="the VMM process")
        os.kill(vm["pid"], signal.SIGSYS)
        failed = service.wait_for(lambda: (v := api.get(f"/v1/vms/{vm['id']}").json())["state"] == "failed" and v, 10)
        assert failed["failure_reason"].startswith("seccomp: VMM killed by signal 31 (SIGSYS)"), failed


def test_a_cold_boot_that_fails_answers_503_and_counts_an_error(sqlite_harness):
    service = sqlite_harness.server()
    with service.client() as api:
        api.post("/v1/flavors", json={"name": "cold", "kernel": str(sqlite_harness.garbage),
                                      "initrd": str(sqlite_harness.garbage), "mem_mib": 64, "pool_target": 0})
        response = api.post("/v1/vms", json={"flavor": "cold", "wait": True})
        assert response.status_code == 503, response.text
        detail = response.json()["detail"]
        (vm,) = vms_of(api, "cold")
        assert vm["id"] in detail and "exited with code 1" in detail and "/events" in detail
        assert vm["state"] == "failed"
        assert metric(api, 'pclite_claims_total{flavor="cold",result="error"}') == 1


def test_restart_reconciles_the_inventory_with_live_vmms(harness):
    h = harness
    database = h.db()
    h.add_flavor(database, "f", pool_target=1)
    claimed, ready = h.fake_vmm("vm-c00000000001"), h.fake_vmm("vm-r00000000001")
    booting, orphan = h.fake_vmm("vm-b00000000001"), h.fake_vmm("vm-o00000000001")
    gone = subprocess.Popen(["true"])
    gone.wait()
    h.insert(database, "vm-c00000000001", "claimed", claimed.pid)
    h.insert(database, "vm-r00000000001", "ready", ready.pid)
    h.insert(database, "vm-b00000000001", "booting", booting.pid, created_at=utcnow() - timedelta(hours=1))
    h.insert(database, "vm-d00000000001", "ready", gone.pid)
    h.insert(database, "vm-s00000000001", "stopping", gone.pid)
    h.insert(database, "vm-x00000000001", "claimed", None)  # pclited died before recording the pid
    (h.run_dir / "vm-z00000000001.sock").write_text("stale")
    database.dispose()

    service = h.server(boot_timeout_s=1.0)
    with service.client() as api:
        state = {vm["id"]: vm for vm in api.get("/v1/vms").json()}
        assert state["vm-c00000000001"]["state"] == "claimed", "a live claimed VM is adopted, still its user's"
        assert state["vm-r00000000001"]["state"] == "ready"
        assert state["vm-d00000000001"]["state"] == "failed"
        assert "gone while pclited was not running" in state["vm-d00000000001"]["failure_reason"]
        assert state["vm-s00000000001"]["state"] == "stopped"
        assert state["vm-x00000000001"]["state"] == "failed"
        assert orphan.wait(5) is not None, "a VMM no VM owns is killed"
        assert not (h.run_dir / "vm-z00000000001.sock").exists()
        events = [e["kind"] for e in api.get("/v1/vms/vm-c00000000001/events").json()]
        assert events[-1] == "vm.adopted"
        # The adopted booting VM never gets an agent: it fails after its grace, and its VMM is stopped.
        service.wait_for(lambda: api.get("/v1/vms/vm-b00000000001").json()["state"] == "failed", 15)
        assert booting.wait(5) is not None
        # kill -9 the ready VM's VMM: failed, counted as a crash, and the pool refills (that boot fails here).
        killed_at = utcnow()
        os.kill(ready.pid, signal.SIGKILL)
        ready.wait()
        vm = service.wait_for(lambda: (v := api.get("/v1/vms/vm-r00000000001").json())["state"] == "failed" and v, 5)
        assert "VMM crashed" in api.get("/v1/vms/vm-r00000000001/events").json()[-1]["message"]
        assert vm["failure_reason"] and metric(api, "pclite_vmm_crashes_total") >= 1
        from datetime import datetime
        service.wait_for(lambda: any(datetime.fromisoformat(v["created_at"]) > killed_at
                                     for v in vms_of(api, "f")), 5, message="a refill boot")
        # A second restart changes nothing for the claimed VM: it keeps its VMM.
        service.stop()
        assert claimed.poll() is None, "stopping pclited leaves (detached) VMMs running"
        service.start()
        assert api.get("/v1/vms/vm-c00000000001").json()["state"] == "claimed"
        deleted = api.delete("/v1/vms/vm-c00000000001", params={"wait": "true"})
        assert deleted.status_code == 200 and deleted.json()["state"] == "stopped", deleted.text
        assert claimed.wait(5) == -signal.SIGTERM


def test_retirement_delete_exec_and_console(sqlite_harness):
    h = sqlite_harness
    database = h.db()
    h.add_flavor(database, "f", pool_target=3, max_age_s=60, generation=2)
    h.add_flavor(database, "g", pool_target=0)
    procs = {vm_id: h.fake_vmm(vm_id) for vm_id in
             ("vm-old000000001", "vm-gen000000001", "vm-ok0000000001", "vm-cl0000000001", "vm-g00000000001")}
    h.insert(database, "vm-old000000001", "ready", procs["vm-old000000001"].pid, generation=2,
             ready_at=utcnow() - timedelta(hours=2))
    h.insert(database, "vm-gen000000001", "ready", procs["vm-gen000000001"].pid, generation=1)
    h.insert(database, "vm-ok0000000001", "ready", procs["vm-ok0000000001"].pid, generation=2)
    h.insert(database, "vm-cl0000000001", "claimed", procs["vm-cl0000000001"].pid, generation=2)
    h.insert(database, "vm-g00000000001", "ready", procs["vm-g00000000001"].pid, flavor="g")
    console = h.data / "vms" / "vm-cl0000000001" / "console.log"
    console.parent.mkdir(parents=True)
    console.write_bytes(b"boot...\npclite-init: ready\n")
    database.dispose()

    service = h.server()
    with service.client() as api:
        def state(vm_id):
            return api.get(f"/v1/vms/{vm_id}").json()["state"]

        service.wait_for(lambda: state("vm-old000000001") == "stopped" and state("vm-gen000000001") == "stopped"
                         and state("vm-g00000000001") == "stopped", 10, message="retirements")
        reasons = {vm_id: api.get(f"/v1/vms/{vm_id}/events").json()[-2]["message"]
                   for vm_id in ("vm-old000000001", "vm-gen000000001", "vm-g00000000001")}
        assert "older than max_age_s=60" in reasons["vm-old000000001"]
        assert "flavor spec changed" in reasons["vm-gen000000001"]
        assert "pool target lowered to 0" in reasons["vm-g00000000001"]
        assert state("vm-ok0000000001") == "ready" and state("vm-cl0000000001") == "claimed"
        assert procs["vm-old000000001"].wait(5) == -signal.SIGTERM, "stopping really stops the VMM"

        tail = api.get("/v1/vms/vm-cl0000000001/console", params={"tail": 14})
        assert tail.status_code == 200 and tail.text == "e-init: ready\n"
        in_pool = api.post("/v1/vms/vm-ok0000000001/exec", json={"argv": ["true"]})
        assert in_pool.status_code == 409 and "claimed VM" in in_pool.json()["detail"]
        no_socket = api.post("/v1/vms/vm-cl0000000001/exec", json={"argv": ["true"]})
        assert no_socket.status_code == 409 and "not running" in no_socket.json()["detail"]

        claim = api.post("/v1/vms", json={"flavor": "f", "wait": False})
        assert claim.status_code == 201 and claim.json()["claim"] == "hit" and claim.json()["id"] == "vm-ok0000000001"
        assert api.post("/v1/vms", json={"flavor": "f", "wait": False}).status_code == 503, "never handed out twice"

        first = api.delete("/v1/vms/vm-cl0000000001")
        assert first.status_code == 202 and first.json()["state"] == "stopping"
        service.wait_for(lambda: state("vm-cl0000000001") == "stopped", 5)
        again = api.delete("/v1/vms/vm-cl0000000001")
        assert again.status_code == 200 and again.json()["state"] == "stopped"

        assert api.delete("/v1/flavors/g").status_code == 204
        assert api.delete("/v1/flavors/f").status_code == 204
        assert state("vm-ok0000000001") == "claimed", "deleting a flavor leaves claimed VMs to their users"
