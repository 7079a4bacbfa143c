"""Claims with a lease and an Idempotency-Key against real microVMs (the lab): a claim with ttl_s 5 is stopped after
its lease ends and lists vm.expired; a retried claim with the same key returns the same VM; the watch shows the
expired VM as DELETED. Host tests cover the same with planted VMs (tests/unit/test_service_claims.py).
"""

from __future__ import annotations

import json
import threading

import pytest

from tests.support.servers import running_pclited

pytestmark = [pytest.mark.guest]
STEP_S = 90.0  # per step: the lab's first two cold boots after pclited starts take 40 s and more
SETTINGS = {"boot_concurrency": 2, "pool_tick_s": 0.2, "supervise_interval_s": 0.1, "health_interval_s": 2,
            "boot_timeout_s": 60, "stop_timeout_s": 5}


def test_a_leased_claim_is_stopped_after_expiry_and_a_retry_gets_the_same_vm():
    with running_pclited(**SETTINGS) as service, service.client(timeout=STEP_S) as api:
        created = api.post("/v1/flavors", json={"name": "lease", "mem_mib": 128, "pool_target": 2, "clone": False})
        assert created.status_code == 201, created.text
        service.wait_for(lambda: api.get("/v1/pools/lease").json()["ready"] == 2, STEP_S, message="2 ready VMs")

        events: list[dict] = []

        def watch() -> None:
            with service.client(timeout=STEP_S * 2) as client, client.stream(
                    "GET", "/v1/vms", params={"watch": "true", "labelSelector": "lease=yes"}) as response:
                for line in response.iter_lines():
                    if line.strip():
                        events.append(json.loads(line))
                        if events[-1]["type"] == "DELETED":
                            return

        reader = threading.Thread(target=watch, daemon=True)
        reader.start()
        request = {"flavor": "lease", "ttl_s": 5, "labels": {"lease": "yes"}}
        first = api.post("/v1/vms", json=request, headers={"Idempotency-Key": "lab-lease-1"})
        again = api.post("/v1/vms", json=request, headers={"Idempotency-Key": "lab-lease-1"})
        assert first.status_code == again.status_code == 201, (first.text, again.text)
        vm_id = first.json()["id"]
        assert again.json()["id"] == vm_id and again.headers.get("idempotent-replayed") == "true"
        ran = api.post(f"/v1/vms/{vm_id}/exec", json={"argv": ["true"]})
        assert ran.status_code == 200 and ran.json()["exit_code"] == 0, ran.text

        service.wait_for(lambda: api.get(f"/v1/vms/{vm_id}").json()["state"] == "stopped", 5 + STEP_S,
                         message="the leased VM to stop after its 5 s lease")
        kinds = [e["kind"] for e in api.get(f"/v1/vms/{vm_id}/events").json()]
        assert "vm.expired" in kinds, kinds
        reader.join(STEP_S)
        assert events and events[-1]["type"] == "DELETED" and events[-1]["object"]["id"] == vm_id, events
