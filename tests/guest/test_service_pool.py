"""pclited end to end with real microVMs (runs where KVM boots Linux, i.e. in the lab): a real uvicorn on loopback.

Warm pool of 2 → claim (hit) and refill → exec → delete → boot-phase histograms → kill -9 a VMM (failed, refilled)
→ cold-boot claim (miss) → kill -9 pclited mid-boot and restart it (inventory consistent, no orphans).
Each step has its own timeout: a lab boot takes ~3–4 s.
"""

from __future__ import annotations

import base64
import os
import re
import signal
import time

import pytest

from tests.support.servers import running_pclited, vmm_processes

STEP_S = 90.0  # per step: a few lab boots, two at a time (the first two also wait for the fork server)
SETTINGS = {"boot_concurrency": 2, "pool_tick_s": 0.2, "supervise_interval_s": 0.1, "health_interval_s": 2,
            "boot_timeout_s": 60, "stop_timeout_s": 5, "backoff_base_s": 1, "degrade_after_failures": 3}


@pytest.fixture
def service():
    with running_pclited(**SETTINGS) as svc:
        yield svc


def pool(api, flavor):
    return api.get(f"/v1/pools/{flavor}").json()


def metric(api, name: str, **labels) -> float:
    """The value of the sample `name` whose labels include `labels` (0 when there is none)."""
    for line in api.get("/metrics").text.splitlines():
        sample, _, value = line.rpartition(" ")
        if sample.split("{")[0] == name and labels.items() <= dict(re.findall(r'(\w+)="([^"]*)"', sample)).items():
            return float(value)
    return 0.0


def exec_in(api, vm_id, argv, **extra):
    response = api.post(f"/v1/vms/{vm_id}/exec", json={"argv": argv, "timeout_s": 20, **extra})
    assert response.status_code == 200, response.text
    body = response.json()
    body["stdout"] = base64.b64decode(body["stdout_b64"])
    body["stderr"] = base64.b64decode(body["stderr_b64"])
    return body


def live_inventory(api) -> dict[str, dict]:
    return {vm["api_socket"]: vm for vm in api.get("/v1/vms").json()
            if vm["state"] in ("booting", "ready", "claimed", "stopping")}


def test_warm_pool_claim_exec_delete_crash_and_restart(service):
    run_dir = service.data_dir / "run"
    with service.client(timeout=STEP_S) as api:
        # Cold pools (clone: false): clone pools have their own test, test_service_clone.py.
        created = api.post("/v1/flavors", json={"name": "lab", "mem_mib": 128, "pool_target": 2, "clone": False})
        assert created.status_code == 201, created.text

        # 1. target 2 → 2 ready
        service.wait_for(lambda: pool(api, "lab")["ready"] == 2, STEP_S, message="2 ready VMs")
        assert pool(api, "lab")["state"] == "ok"
        ready = api.get("/v1/vms", params={"flavor": "lab", "state": "ready"}).json()
        for vm in ready:
            phases = vm["boot_ms"]
            assert phases and all(phases[p] > 0 for p in ("vmm_setup", "kernel", "init_to_agent", "total")), vm
            assert phases["total"] >= phases["vmm_setup"] + phases["kernel"]

        # 2. /metrics: non-zero boot-phase histograms
        for phase in ("vmm_setup", "kernel", "init_to_agent", "total"):
            assert metric(api, "pclite_boot_phase_seconds_count", phase=phase, flavor="lab") >= 2, phase
            assert metric(api, "pclite_boot_phase_seconds_sum", phase=phase, flavor="lab") > 0, phase
        assert metric(api, "pclite_pool_ready", flavor="lab") == 2

        # 3. claim → hit, and the pool refills to 2
        started = time.monotonic()
        claim = api.post("/v1/vms", json={"flavor": "lab", "wait": False})
        claim_ms = (time.monotonic() - started) * 1000
        assert claim.status_code == 201, claim.text
        vm = claim.json()
        assert vm["claim"] == "hit" and vm["state"] == "claimed" and vm["claimed_at"]
        print(f"warm claim answered in {claim_ms:.1f} ms")
        service.wait_for(lambda: (p := pool(api, "lab"))["ready"] == 2 and p["claimed"] == 1, STEP_S,
                         message="the pool to refill to 2")

        # 4. exec through the API
        hi = exec_in(api, vm["id"], ["echo", "hi"])
        assert (hi["exit_code"], hi["stdout"], hi["timed_out"]) == (0, b"hi\n", False), hi
        piped = exec_in(api, vm["id"], ["cat"], stdin_b64=base64.b64encode(b"through stdin").decode())
        assert piped["stdout"] == b"through stdin"
        assert exec_in(api, vm["id"], ["sh", "-c", "echo err >&2; exit 3"])["exit_code"] == 3
        assert api.get(f"/v1/vms/{vm['id']}/console").status_code == 200

        # 5. delete: the VMM goes, its socket too
        deleted = api.delete(f"/v1/vms/{vm['id']}", params={"wait": "true"})
        assert deleted.status_code == 200 and deleted.json()["state"] == "stopped", deleted.text
        assert vm["api_socket"] not in vmm_processes(run_dir) and not os.path.exists(vm["api_socket"])
        assert [e["kind"] for e in api.get(f"/v1/vms/{vm['id']}/events").json()][-2:] == ["vm.stopping",
                                                                                           "vm.stopped"]

        # 6. kill -9 a ready VM's VMM → failed, counted, and the pool refills
        victim = api.get("/v1/vms", params={"flavor": "lab", "state": "ready"}).json()[0]
        os.kill(victim["pid"], signal.SIGKILL)
        failed = service.wait_for(
            lambda: (v := api.get(f"/v1/vms/{victim['id']}").json())["state"] == "failed" and v, 10,
            message="the killed VM to be failed")
        assert "signal 9" in failed["failure_reason"] or "gone" in failed["failure_reason"]
        assert metric(api, "pclite_vmm_crashes_total") >= 1
        service.wait_for(lambda: pool(api, "lab")["ready"] == 2, STEP_S, message="a refill after the crash")

        # 7. cold boot: a miss that waits
        api.post("/v1/flavors", json={"name": "cold", "mem_mib": 128, "pool_target": 0, "clone": False})
        cold = api.post("/v1/vms", json={"flavor": "cold", "wait": True})
        assert cold.status_code == 201, cold.text
        assert cold.json()["claim"] == "miss" and cold.json()["boot_ms"]["total"] > 0
        assert exec_in(api, cold.json()["id"], ["echo", "cold"])["stdout"] == b"cold\n"
        assert metric(api, "pclite_claims_total", flavor="cold", result="miss") == 1
        assert metric(api, "pclite_claims_total", flavor="lab", result="hit") == 1
        assert metric(api, "pclite_claim_seconds_count", flavor="lab", result="hit") == 1

        # 8. kill -9 pclited while a boot is in flight, start it again
        kept = api.post("/v1/vms", json={"flavor": "lab", "wait": False}).json()
        assert kept["claim"] == "hit"
        api.patch("/v1/pools/lab", json={"target": 3})
        service.wait_for(lambda: pool(api, "lab")["booting"] >= 1, 10, message="a boot in flight")
    service.stop(signal.SIGKILL)
    survivors = vmm_processes(run_dir)
    assert kept["api_socket"] in survivors, "detached VMMs outlive pclited"
    service.start()
    with service.client(timeout=STEP_S) as api:
        assert api.get(f"/v1/vms/{kept['id']}").json()["state"] == "claimed"
        assert exec_in(api, kept["id"], ["echo", "still here"])["stdout"] == b"still here\n"
        service.wait_for(lambda: (p := pool(api, "lab"))["ready"] == 3 and p["booting"] == 0, STEP_S,
                         message="the pool to settle at 3 after the restart")
        inventory = live_inventory(api)
        processes = vmm_processes(run_dir)
        assert set(processes) == set(inventory), f"no orphans and no ghosts: {processes} vs {list(inventory)}"
        for socket_path, vm in inventory.items():
            assert vm["pid"] == processes[socket_path], vm
        assert set(p.name for p in run_dir.glob("*.sock")) == {os.path.basename(s) for s in inventory}
        adopted = [e for vm in inventory.values() for e in api.get(f"/v1/vms/{vm['id']}/events").json()
                   if e["kind"] == "vm.adopted"]
        assert adopted, "the restart adopted the VMMs that were running"

        # 9. deleting the flavors stops their pools; claimed VMs stay until deleted
        assert api.delete("/v1/flavors/lab").status_code == 204
        service.wait_for(lambda: set(vmm_processes(run_dir)) <= {kept["api_socket"], cold.json()["api_socket"]},
                         STEP_S, message="the lab pool to stop")
        for vm_id in (kept["id"], cold.json()["id"]):
            assert api.delete(f"/v1/vms/{vm_id}", params={"wait": "true"}).json()["state"] == "stopped"
        assert not vmm_processes(run_dir)
