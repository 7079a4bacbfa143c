"""Claims with leases, labels and idempotency keys; label selectors, pages and watches on GET /v1/vms — against a
real pclited on 127.0.0.1, on SQLite and on PostgreSQL.

No guest boots on this host: a test plants a ready VM row in pclited's database whose "VMM" is a real sleeping
process with a VMM's command line (`hypervisor --api-sock SOCK`), so pclited's supervisor sees it alive, and
stopping it (lease expiry, DELETE) really signals it. The same lease flow with a booted guest is
tests/guest/test_claim_lease.py.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time

import httpx
import pytest

from service.core.db import Database
from service.models import VM, Event, Flavor, utcnow
from service.services.inventory import new_vm_id
from tests.support.servers import Pclited, database_url, short_tmpdir

FLAVOR = "leased"


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def server(request):
    workdir = short_tmpdir()
    url = database_url(request.param, workdir)
    service = Pclited(workdir / "data", url, max_vms=64, max_guest_mem_mib=1024, health_interval_s=3600,
                      supervise_interval_s=0.1)
    service.start()
    service.db_url = url
    # Written past the API's quota check: a flavor bigger than the memory quota, so the pool can never boot one
    # (no guest boots here), with a target above what the tests plant, so it never retires a planted VM as surplus.
    db = Database(url)
    with db.write() as s:
        s.add(Flavor(name=FLAVOR, vcpus=1, mem_mib=2048, pool_target=256, clone=False, cmdline_extra=""))
    db.dispose()
    yield service
    service.stop()
    shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def api(server):
    with server.client() as client:
        yield client


@pytest.fixture
def plant(server):
    """plant(): a ready VM of FLAVOR whose VMM is a sleeping process; every process is gone after the test."""
    db = Database(server.db_url)
    procs: list[subprocess.Popen] = []

    def plant_one(labels: dict | None = None) -> str:
        vm_id = new_vm_id()
        sock = str(server.data_dir / "run" / f"{vm_id}.sock")
        proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", "hypervisor", "--api-sock",
                                 sock], stdin=subprocess.DEVNULL)
        procs.append(proc)
        now = utcnow()
        with db.write() as s:
            s.add(VM(id=vm_id, flavor=FLAVOR, flavor_generation=1, pooled=True, state="ready", vcpus=1, mem_mib=64,
                     pid=proc.pid, api_socket=sock, console_path=str(server.data_dir / "vms" / vm_id / "console.log"),
                     created_at=now, ready_at=now, labels=labels))
            s.add(Event(vm_id=vm_id, flavor=FLAVOR, kind="vm.ready", message="planted by the test", at=now))
        return vm_id

    yield plant_one
    with server.client() as api:
        for vm in api.get("/v1/vms").json():
            if vm["state"] not in ("stopped", "failed", "stopping"):
                api.delete(f"/v1/vms/{vm['id']}", params={"wait": "true"})
    for proc in procs:
        proc.kill()
        proc.wait(timeout=10)
    db.dispose()


def state_of(api: httpx.Client, vm_id: str) -> str:
    return api.get(f"/v1/vms/{vm_id}").json()["state"]


def test_a_lease_expires_stops_the_vm_and_is_an_event(server, api, plant):
    vm_id = plant()
    claimed = api.post("/v1/vms", json={"flavor": FLAVOR, "wait": False, "ttl_s": 1})
    assert claimed.status_code == 201, claimed.text
    body = claimed.json()
    assert body["id"] == vm_id and body["claim"] == "hit" and body["expires_at"] is not None
    server.wait_for(lambda: state_of(api, vm_id) == "stopped", 20, message="the expired VM to stop")
    kinds = [e["kind"] for e in api.get(f"/v1/vms/{vm_id}/events").json()]
    assert "vm.expired" in kinds and kinds.index("vm.expired") < kinds.index("vm.stopped"), kinds
    assert "lease expired" in server.log()


def test_renewing_a_lease_keeps_the_vm(server, api, plant):
    vm_id = plant()
    first = api.post("/v1/vms", json={"flavor": FLAVOR, "wait": False, "ttl_s": 2}).json()
    renewed = api.patch(f"/v1/vms/{vm_id}", json={"ttl_s": 120})
    assert renewed.status_code == 200, renewed.text
    assert renewed.json()["expires_at"] > first["expires_at"]
    time.sleep(3)
    assert state_of(api, vm_id) == "claimed"
    assert "vm.renewed" in [e["kind"] for e in api.get(f"/v1/vms/{vm_id}/events").json()]
    assert api.patch(f"/v1/vms/{vm_id}", json={"ttl_s": 0}).status_code == 422
    assert api.patch(f"/v1/vms/{vm_id}", json={"ttl_s": True}).status_code == 422
    api.delete(f"/v1/vms/{vm_id}", params={"wait": "true"})
    refused = api.patch(f"/v1/vms/{vm_id}", json={"ttl_s": 60})
    assert refused.status_code == 409 and "only a claimed VM" in refused.json()["detail"]


def test_an_idempotent_retry_returns_the_same_vm(api, plant):
    first_vm, second_vm = plant(), plant()
    request = {"flavor": FLAVOR, "wait": False, "labels": {"owner": "retry"}}
    first = api.post("/v1/vms", json=request, headers={"Idempotency-Key": "claim-123"})
    again = api.post("/v1/vms", json=request, headers={"Idempotency-Key": "claim-123"})
    assert first.status_code == again.status_code == 201, (first.text, again.text)
    assert first.json()["id"] == again.json()["id"] == first_vm
    assert again.headers.get("idempotent-replayed") == "true" and again.json()["claim"] == "hit"
    assert state_of(api, second_vm) == "ready", "a retry claims nothing more"
    other = api.post("/v1/vms", json={**request, "labels": {"owner": "else"}}, headers={"Idempotency-Key": "claim-123"})
    assert other.status_code == 422 and "different request body" in other.json()["detail"]
    assert state_of(api, second_vm) == "ready"
    # A claim that fails frees its key: the retry may then succeed.
    assert api.post("/v1/vms", json={"flavor": "nope", "wait": False}, headers={"Idempotency-Key": "k2"}
                    ).status_code == 404
    assert api.post("/v1/vms", json={"flavor": FLAVOR, "wait": False}, headers={"Idempotency-Key": "k2"}
                    ).json()["id"] == second_vm


def test_labels_are_validated_and_selectors_filter(api, plant):
    ids = [plant() for _ in range(3)]
    for labels in ({"app": "web", "tier": "front"}, {"app": "web", "tier": "back"}, {"app": "db"}):
        assert api.post("/v1/vms", json={"flavor": FLAVOR, "wait": False, "labels": labels}).status_code == 201

    def selected(selector: str) -> list[str]:
        response = api.get("/v1/vms", params={"labelSelector": selector})
        assert response.status_code == 200, response.text
        return [vm["id"] for vm in response.json() if vm["id"] in ids]

    assert selected("app=web") == ids[:2]
    assert selected("app==web,tier!=front") == [ids[1]]
    assert selected("tier") == ids[:2]
    assert selected("!tier") == [ids[2]]
    assert selected("app!=web") == [ids[2]]
    assert selected("app=web,tier=side") == []
    assert api.get(f"/v1/vms/{ids[0]}").json()["labels"] == {"app": "web", "tier": "front"}
    patched = api.patch(f"/v1/vms/{ids[0]}", json={"labels": {"tier": None, "team": "a"}}).json()
    assert patched["labels"] == {"app": "web", "team": "a"}
    for bad in ("app=we b", "-x=1", "app in (a,b)", "a/b/c=1"):
        response = api.get("/v1/vms", params={"labelSelector": bad})
        assert response.status_code == 422 and "selector" in response.json()["detail"], (bad, response.text)
    for labels in ({"bad key": "x"}, {"app": "-x"}, {"a" * 64: "x"}, {"app": "x" * 64}):
        response = api.post("/v1/vms", json={"flavor": FLAVOR, "wait": False, "labels": labels})
        assert response.status_code == 422 and "label" in response.json()["detail"], (labels, response.text)


def test_pages_walk_every_vm_exactly_once(api, plant):
    planted = {plant(labels={"page": "walk"}) for _ in range(7)}
    seen: list[str] = []
    pages = 0
    token = None
    while True:
        params = {"limit": 3, "labelSelector": "page=walk"} | ({"continue": token} if token else {})
        response = api.get("/v1/vms", params=params)
        assert response.status_code == 200, response.text
        pages += 1
        assert len(response.json()) <= 3
        seen += [vm["id"] for vm in response.json()]
        token = response.headers.get("x-continue")
        if token is None:
            break
        assert 'rel="next"' in response.headers["link"]
    assert sorted(seen) == sorted(planted) and len(seen) == len(set(seen)) and pages == 3
    assert int(response.headers["x-resource-version"]) > 0
    bad = api.get("/v1/vms", params={"continue": "not-a-token"})
    assert bad.status_code == 422 and "continue token" in bad.json()["detail"]


def test_the_watch_shows_added_then_deleted(server, api, plant):
    before = plant(labels={"watch": "me"})
    lines: list[dict] = []
    got = threading.Event()

    def read() -> None:
        with server.client(timeout=60) as client, client.stream(
                "GET", "/v1/vms", params={"watch": "true", "labelSelector": "watch=me"}) as response:
            assert response.headers["content-type"].startswith("application/x-ndjson")
            for line in response.iter_lines():
                if line.strip():
                    lines.append(json.loads(line))
                    if lines[-1]["type"] == "DELETED" and lines[-1]["object"]["id"] != before:
                        got.set()
                        return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    server.wait_for(lambda: lines, 20, message="the watch's first line")
    after = plant(labels={"watch": "me"})
    plant(labels={"watch": "other"})  # filtered out
    server.wait_for(lambda: any(e["object"]["id"] == after for e in lines), 20, message="ADDED of the new VM")
    assert api.delete(f"/v1/vms/{after}", params={"wait": "true"}).status_code == 200
    assert got.wait(20), lines
    reader.join(10)
    assert lines[0] == {"type": "ADDED", "object": lines[0]["object"], "resourceVersion": lines[0]["resourceVersion"]}
    assert lines[0]["object"]["id"] == before
    mine = [(e["type"], e["object"].get("state")) for e in lines if e["object"]["id"] == after]
    assert mine[0] == ("ADDED", "ready") and mine[-1][0] == "DELETED", mine
    assert {e["object"]["labels"].get("watch") for e in lines} == {"me"}
    versions = [e["resourceVersion"] for e in lines]
    assert versions == sorted(versions)
    # From a resourceVersion: only what changed after it.
    with server.client(timeout=30) as client, client.stream(
            "GET", "/v1/vms", params={"watch": "true", "resourceVersion": versions[-2]}) as response:
        first = json.loads(next(line for line in response.iter_lines() if line.strip()))
    assert first["resourceVersion"] > versions[-2]


def test_pclitectl_selects_with_l_and_watch_prints_deleted(server, api, plant, tmp_path):
    from tests.unit.test_cli_contract_stub import Cli, pclitectl_argv

    cli = Cli(server.url, server.token, tmp_path)
    mine, other = plant(labels={"cli": "yes"}), plant(labels={"cli": "no"})
    listed = cli("get", "vms", "-l", "cli=yes", "-o", "json").stdout
    assert [vm["id"] for vm in json.loads(listed)["items"]] == [mine]
    bad = cli("get", "vms", "-l", "cli in (a)", ok=False)
    assert bad.returncode != 0 and b"set-based selectors" in bad.stderr
    proc = subprocess.Popen(pclitectl_argv() + ["get", "vms", "-w", "-l", "cli"], env=cli.env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        assert proc.stdout.readline().split() == [b"ID", b"FLAVOR", b"STATE", b"BOOT", b"AGE"]
        first = {proc.stdout.readline().split()[0] for _ in range(2)}
        assert first == {mine.encode(), other.encode()}
        assert api.delete(f"/v1/vms/{other}", params={"wait": "true"}).status_code == 200
        rows = []
        while not rows or rows[-1][2] != b"DELETED":
            rows.append(proc.stdout.readline().split())
        assert rows[-1][:3] == [other.encode(), FLAVOR.encode(), b"DELETED"], rows
    finally:
        proc.terminate()
        proc.wait(timeout=10)
