"""Clone pools end to end with a real pclited and real microVMs (runs where KVM boots Linux, i.e. in the lab).

A clone flavor of target 2 builds one template (cold boot, snapshot at agent-ready) and fills with clones that
answer exec under their own host names → claim-drain and refill timed against a cold-boot flavor → kill -9
pclited and restart it (clones adopted) → a changed flavor gets a new template, the old one goes once no VM maps
it → a truncated template falls back to cold boots (the pool still fills, an event says why) and is rebuilt.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time

import pytest

from tests.guest.test_service_pool import exec_in, live_inventory, metric, pool
from tests.support.servers import running_pclited, vmm_processes

STEP_S = 90.0  # per step: a template build is a cold boot plus a snapshot, in the emulated lab
SETTINGS = {"boot_concurrency": 2, "pool_tick_s": 0.2, "supervise_interval_s": 0.1, "health_interval_s": 5,
            "boot_timeout_s": 60, "stop_timeout_s": 5, "backoff_base_s": 1, "degrade_after_failures": 3,
            "template_backoff_s": 2, "template_backoff_max_s": 8}


@pytest.fixture
def service():
    with running_pclited(**SETTINGS) as svc:
        yield svc


def ready_vms(api, flavor: str) -> list[dict]:
    return api.get("/v1/vms", params={"flavor": flavor, "state": "ready"}).json()


def story(service, api, flavor: str) -> str:
    """What happened to the flavor's VMs, for a failed assertion."""
    lines = [f"template: {template(api, flavor)}"]
    for vm in api.get("/v1/vms", params={"flavor": flavor}).json():
        lines += [f"{vm['id']} {vm['state']} {vm['source']}: {e['kind']}: {e['message']}"
                  for e in api.get(f"/v1/vms/{vm['id']}/events").json()]
    return "\n".join(lines) + f"\npclited log tail:\n{service.log()[-3000:]}"


def template(api, flavor: str) -> dict:
    return api.get(f"/v1/flavors/{flavor}").json()["template"]


def drain_and_refill(service, api, flavor: str) -> tuple[float, list[dict]]:
    """Claim every ready VM at once, then time until the pool is full again; returns (seconds, the claimed VMs)."""
    target = pool(api, flavor)["target"]
    claimed = [api.post("/v1/vms", json={"flavor": flavor, "wait": False}).json() for _ in range(target)]
    assert all(vm.get("claim") == "hit" for vm in claimed), claimed
    started = time.monotonic()
    service.wait_for(lambda: pool(api, flavor)["ready"] == target, STEP_S, interval_s=0.05,
                     message=f"{flavor} to refill")
    return time.monotonic() - started, claimed


def test_clone_pool_templates_refill_change_and_fall_back(service):
    try:
        scenario(service)
    except AssertionError:  # the service's data goes with the test: say what happened to the pools first
        with contextlib.suppress(Exception), service.client() as api:
            for flavor in api.get("/v1/flavors").json():
                print(f"--- {flavor['name']}\n{story(service, api, flavor['name'])}")
        raise


def scenario(service):
    data = service.data_dir
    run_dir = data / "run"
    with service.client(timeout=STEP_S) as api:
        created = api.post("/v1/flavors", json={"name": "cl", "mem_mib": 128, "pool_target": 2})
        assert created.status_code == 201 and created.json()["clone"] is True, created.text

        # 1. one template, then 2 ready clones with their own identities
        built = service.wait_for(lambda: (t := template(api, "cl"))["state"] == "ready" and t, STEP_S,
                                 message="the first template")
        assert (data / "templates" / built["dir"] / "memory").exists() and built["build_ms"] > 0
        service.wait_for(lambda: len(ready_vms(api, "cl")) == 2, STEP_S, message="2 ready clones")
        assert [vm["source"] for vm in ready_vms(api, "cl")] == ["clone", "clone"]
        assert metric(api, "pclite_boot_to_ready_seconds_count", flavor="cl", source="clone") == 2
        # the phase histograms: the template's cold boot has them all, the clones vmm_setup and total only
        assert metric(api, "pclite_boot_phase_seconds_count", flavor="cl", phase="kernel") == 1
        assert metric(api, "pclite_boot_phase_seconds_count", flavor="cl", phase="total") == 3
        assert metric(api, "pclite_template_state", flavor="cl", state="ready") == 1
        assert not vmm_processes(run_dir / "tpl"), "the template VM is stopped once snapshotted"
        print(f"template built in {built['build_ms'] / 1000:.1f} s")

        # 2. claim-drain → refilled with clones; each clone answers exec under its own host name
        clone_s, clones = drain_and_refill(service, api, "cl")
        assert {vm["source"] for vm in clones} == {"clone"} == {vm["source"] for vm in ready_vms(api, "cl")}
        assert {vm["template"] for vm in clones} == {built["dir"]}
        names = {exec_in(api, vm["id"], ["hostname"])["stdout"].decode().strip() for vm in clones}
        assert names == {vm["id"] for vm in clones}, "each clone has its own host name (its VM id)"
        assert all(vm["boot_ms"]["total"] > 0 for vm in clones)
        for vm in clones:
            api.delete(f"/v1/vms/{vm['id']}")
        # the same with cold boots, same size, same run
        api.post("/v1/flavors", json={"name": "co", "mem_mib": 128, "pool_target": 2, "clone": False})
        service.wait_for(lambda: pool(api, "co")["ready"] == 2, STEP_S, message="2 ready cold VMs")
        assert {vm["source"] for vm in ready_vms(api, "co")} == {"cold"}
        assert template(api, "co")["state"] == "disabled"
        cold_s, colds = drain_and_refill(service, api, "co")
        for vm in colds:
            api.delete(f"/v1/vms/{vm['id']}")
        print(f"claim-drain of 2 → refilled: clones {clone_s:.2f} s, cold boots {cold_s:.2f} s "
              f"(×{cold_s / clone_s:.1f})")
        assert api.patch("/v1/pools/co", json={"target": 0}).status_code == 200

        # 3. kill -9 pclited, start it again: clones are VMMs like any other, adopted
        kept = api.post("/v1/vms", json={"flavor": "cl", "wait": False}).json()
        assert kept["source"] == "clone"
    service.stop(signal.SIGKILL)
    service.start()
    with service.client(timeout=STEP_S) as api:
        assert exec_in(api, kept["id"], ["hostname"])["stdout"].decode().strip() == kept["id"]
        service.wait_for(lambda: pool(api, "cl")["ready"] == 2 and pool(api, "co")["ready"] == 0, STEP_S,
                         message="the pools to settle after the restart")
        assert template(api, "cl")["dir"] == built["dir"] and template(api, "cl")["state"] == "ready"
        inventory = live_inventory(api)
        assert set(vmm_processes(run_dir)) == set(inventory), "no orphans and no ghosts"

        # 4. a changed flavor: a new template; the old one stays while a clone of it lives
        assert api.patch("/v1/flavors/cl", json={"mem_mib": 160}).status_code == 200
        rebuilt = service.wait_for(lambda: (t := template(api, "cl"))["state"] == "ready"
                                   and t["key"] != built["key"] and t, STEP_S, message="a template of the new spec")
        service.wait_for(lambda: len(ready_vms(api, "cl")) == 2, STEP_S, message="2 clones of the new template")
        assert {vm["source"] for vm in ready_vms(api, "cl")} == {"clone"}
        fresh = api.post("/v1/vms", json={"flavor": "cl", "wait": False}).json()
        mem_kib = int(exec_in(api, fresh["id"], ["head", "-1", "/proc/meminfo"])["stdout"].split()[1])
        assert 128 << 10 < mem_kib <= 160 << 10, f"a clone of the 160 MiB template: MemTotal {mem_kib} KiB"
        api.delete(f"/v1/vms/{fresh['id']}")
        assert (data / "templates" / built["dir"]).exists(), "a claimed clone still maps the old template"
        assert exec_in(api, kept["id"], ["echo", "old clone"])["stdout"] == b"old clone\n"
        api.delete(f"/v1/vms/{kept['id']}", params={"wait": "true"})
        service.wait_for(lambda: not (data / "templates" / built["dir"]).exists(), 30,
                         message="the old template to be removed once unused")

        # 5. a truncated template: clones fail to restore, the VMs boot cold instead, the template is rebuilt
        api.patch("/v1/pools/cl", json={"target": 0})
        service.wait_for(lambda: not [vm for vm in live_inventory(api).values() if vm["flavor"] == "cl"], STEP_S,
                         message="the cl pool to drain")
        memory = data / "templates" / rebuilt["dir"] / "memory"
        os.truncate(memory, memory.stat().st_size // 2)
        fallbacks_before = metric(api, "pclite_clone_fallbacks_total", flavor="cl")
        api.patch("/v1/pools/cl", json={"target": 2})
        service.wait_for(lambda: len(ready_vms(api, "cl")) == 2, STEP_S, message="the pool to fill despite it")
        events = [e for vm in api.get("/v1/vms", params={"flavor": "cl"}).json()
                  for e in api.get(f"/v1/vms/{vm['id']}/events").json() if e["kind"] == "vm.clone_fallback"]
        assert events and all("truncated" in e["message"] for e in events), events
        assert "cold" in {vm["source"] for vm in ready_vms(api, "cl")}
        assert metric(api, "pclite_clone_fallbacks_total", flavor="cl") - fallbacks_before == len(events)
        again = service.wait_for(lambda: (t := template(api, "cl"))["state"] == "ready" and t, STEP_S,
                                 message="the template to be rebuilt")
        assert again["key"] == rebuilt["key"] and memory.stat().st_size == 160 << 20  # whole again
        print(f"fallbacks: {len(events)}; template rebuilt in {again['build_ms'] / 1000:.1f} s")
