"""pclited's REST contract against a real uvicorn on 127.0.0.1, on SQLite and on PostgreSQL.

Every error must be an RFC 7807 problem with a detail that says what to do, never a 500.
"""

from __future__ import annotations

import json
import os
import shutil
import stat

import httpx
import pytest
import yaml

from tests.support.servers import Pclited, PostgresServer, database_url, postgres_bindir, short_tmpdir

FLAVOR_KEYS = {"name", "kernel", "initrd", "cmdline_extra", "vcpus", "mem_mib", "pool_min", "pool_target",
               "max_age_s", "clone", "template", "created_at", "updated_at"}
POOL_KEYS = {"flavor", "target", "min", "ready", "booting", "claimed", "state", "reason"}
METRICS = ("pclite_boot_phase_seconds", "pclite_claim_seconds", "pclite_claims_total", "pclite_pool_ready",
           "pclite_pool_target", "pclite_vms", "pclite_vm_exits_total", "pclite_vmm_crashes_total")


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def server(request):
    workdir = short_tmpdir()
    service = Pclited(workdir / "data", database_url(request.param, workdir), max_vms=4, max_guest_mem_mib=1024,
                      health_interval_s=3600)
    service.start()
    yield service
    service.stop()
    shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def api(server):
    with server.client() as client:
        yield client


def assert_problem(response: httpx.Response, status: int, *needles: str) -> dict:
    assert response.status_code == status, f"{response.status_code} {response.text}"
    assert response.headers["content-type"].startswith("application/problem+json"), response.headers
    body = response.json()
    assert set(body) >= {"type", "title", "status", "detail"} and body["status"] == status, body
    assert body["type"].startswith("urn:pclite:problem:") and body["title"]
    for needle in needles:
        assert needle.lower() in body["detail"].lower(), f"{needle!r} not in {body['detail']!r}"
    return body


@pytest.mark.skipif(postgres_bindir() is None, reason="PostgreSQL is not installed: make deps")
def test_readyz_says_why_without_the_exception_text():
    """The database gone: /readyz answers 503 with a fixed reason; the driver's text (host, port, user) goes to the
    log only."""
    postgres = PostgresServer(postgres_bindir()).start()
    workdir = short_tmpdir()
    service = Pclited(workdir / "data", postgres.new_database(), health_interval_s=3600)
    try:
        service.start()
        postgres.stop()
        response = httpx.get(f"{service.url}/readyz", timeout=30)
        body = assert_problem(response, 503, "database unreachable")
        assert body["detail"] == "not ready: database unreachable (see pclited's log)", body
        assert str(postgres.port) not in response.text and "127.0.0.1" not in response.text
        # The driver's words go to the log (they name the port only when the connect fails, not when a pooled
        # connection is cut, so only the line itself is checked).
        assert "readyz: database ping failed" in service.log()
    finally:
        service.stop()
        postgres.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def test_probes_and_metrics_need_no_token(server):
    assert httpx.get(f"{server.url}/healthz").json() == {"status": "ok"}
    assert httpx.get(f"{server.url}/readyz").status_code == 200
    metrics = httpx.get(f"{server.url}/metrics")
    assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
    for name in METRICS:
        assert f"# TYPE {name.removesuffix('_total')} " in metrics.text or f"# TYPE {name} " in metrics.text, name
    assert 'pclite_build_info{version=' in metrics.text and 'process_cpu_seconds_total' in metrics.text


@pytest.mark.parametrize("method, path", [("GET", "/v1/flavors"), ("POST", "/v1/vms"), ("GET", "/v1/version"),
                                          ("GET", "/openapi.json"), ("DELETE", "/v1/vms/vm-000000000000"),
                                          ("GET", "/v1/no-such-route")])
def test_everything_else_needs_the_token(server, method, path):
    missing = httpx.request(method, server.url + path)
    body = assert_problem(missing, 401, "Authorization: Bearer", str(server.data_dir / "token"))
    assert missing.headers["www-authenticate"] == "Bearer"
    assert body["type"] == "urn:pclite:problem:unauthorized"
    wrong = httpx.request(method, server.url + path, headers={"Authorization": "Bearer not-the-token"})
    assert_problem(wrong, 401, "invalid token")
    basic = httpx.request(method, server.url + path, headers={"Authorization": "Basic dXNlcjpwdw=="})
    assert_problem(basic, 401, "Bearer <token>")


def test_generated_token_and_client_config_are_private(server):
    token_file = server.data_dir / "token"
    assert stat.S_IMODE(os.stat(token_file).st_mode) == 0o600
    config_file = server.data_dir / "client-config"
    assert stat.S_IMODE(os.stat(config_file).st_mode) == 0o600
    config = yaml.safe_load(config_file.read_text())
    assert config == {"server": server.url, "token": token_file.read_text().strip()}
    with server.client() as api:
        assert api.get("/v1/version").json()["version"]


def test_openapi_describes_the_contract(api):
    spec = api.get("/openapi.json").json()
    paths = spec["paths"]
    for path in ("/v1/flavors", "/v1/flavors/{name}", "/v1/pools", "/v1/pools/{flavor}", "/v1/vms",
                 "/v1/vms/{vm_id}", "/v1/vms/{vm_id}/exec", "/v1/vms/{vm_id}/console", "/v1/vms/{vm_id}/events"):
        assert path in paths, path
    assert set(paths["/v1/flavors/{name}"]) == {"get", "put", "patch", "delete"}
    assert "HTTPBearer" in spec["components"]["securitySchemes"]


def test_flavor_crud(api):
    created = api.post("/v1/flavors", json={"name": "crud", "vcpus": 2, "mem_mib": 128, "pool_target": 0,
                                            "cmdline_extra": "loglevel=3"})
    assert created.status_code == 201, created.text
    body = created.json()
    assert set(body) == FLAVOR_KEYS
    assert (body["kernel"], body["initrd"], body["vcpus"], body["mem_mib"]) == (None, None, 2, 128)
    assert_problem(api.post("/v1/flavors", json={"name": "crud", "pool_target": 0}), 409, "already exists", "PUT")
    assert "crud" in [f["name"] for f in api.get("/v1/flavors").json()]
    assert body["clone"] is True and body["template"]["state"] == "pending"  # no pool (target 0): nothing to build
    assert api.get("/v1/flavors/crud").json() == body
    patched = api.patch("/v1/flavors/crud", json={"max_age_s": 60})
    assert patched.status_code == 200 and patched.json()["max_age_s"] == 60 and patched.json()["vcpus"] == 2
    replaced = api.put("/v1/flavors/crud", json={"mem_mib": 64, "pool_target": 0})
    assert replaced.status_code == 200 and replaced.json()["vcpus"] == 1, "PUT replaces: omitted = default"
    fresh = api.put("/v1/flavors/crud-put", json={"pool_target": 0})
    assert fresh.status_code == 201 and fresh.json()["name"] == "crud-put"
    assert api.delete("/v1/flavors/crud-put").status_code == 204
    assert_problem(api.get("/v1/flavors/crud-put"), 404, "no flavor named 'crud-put'", "POST /v1/flavors")


def test_pools_follow_their_flavors(api):
    api.post("/v1/flavors", json={"name": "pooled", "mem_mib": 64, "pool_target": 0})
    pool = api.get("/v1/pools/pooled").json()
    assert set(pool) == POOL_KEYS
    assert pool == {"flavor": "pooled", "target": 0, "min": 0, "ready": 0, "booting": 0, "claimed": 0, "state": "ok",
                    "reason": None}
    assert "pooled" in [p["flavor"] for p in api.get("/v1/pools").json()]
    api.patch("/v1/flavors/pooled", json={"pool_min": 0})
    assert api.patch("/v1/pools/pooled", json={"target": 0}).json()["target"] == 0


BAD_INPUT = [
    ("POST", "/v1/flavors", {"name": "x", "vcpus": 0}, 422, "vcpus"),
    ("POST", "/v1/flavors", {"name": "x", "vcpus": 1000}, 422, "vcpus"),
    ("POST", "/v1/flavors", {"name": "x", "mem_mib": 1}, 422, "mem_mib"),
    ("POST", "/v1/flavors", {"name": "x", "mem_mib": 10**12}, 422, "mem_mib"),
    ("POST", "/v1/flavors", {"name": "x", "mem_mib": "lots"}, 422, "mem_mib"),
    ("POST", "/v1/flavors", {"name": "Not_A_Label"}, 422, "name"),
    ("POST", "/v1/flavors", {"name": "x", "vcpu": 2}, 422, "vcpu"),
    ("POST", "/v1/flavors", {"name": "x", "pool_min": 3, "pool_target": 1}, 422, "pool_min"),
    ("POST", "/v1/flavors", {"name": "x", "pool_target": -1}, 422, "pool_target"),
    ("POST", "/v1/flavors", {"name": "x", "kernel": "/no/such/vmlinux"}, 422, "does not exist"),
    ("POST", "/v1/flavors", {"name": "x", "cmdline_extra": "a\nb"}, 422, "one line"),
    ("POST", "/v1/flavors", {"vcpus": 1}, 422, "name is required"),
    ("POST", "/v1/flavors", "{not json", 422, "not valid JSON"),
    ("POST", "/v1/flavors", ["a", "list"], 422, "body"),
    ("GET", "/v1/flavors/nope", None, 404, "no flavor named 'nope'"),
    ("PATCH", "/v1/flavors/nope", {"vcpus": 2}, 404, "no flavor named"),
    ("PUT", "/v1/flavors/Bad_Name!", {"pool_target": 0}, 422, "DNS label"),
    ("DELETE", "/v1/flavors/nope", None, 404, "no flavor named"),
    ("GET", "/v1/pools/nope", None, 404, "no flavor named"),
    ("PATCH", "/v1/pools/nope", {"target": 1}, 404, "no flavor named"),
    ("PATCH", "/v1/pools/nope", {"target": -1}, 422, "target"),
    ("PATCH", "/v1/pools/nope", {"target": 100000}, 422, "target"),
    ("POST", "/v1/vms", {"flavor": "nope"}, 404, "no flavor named 'nope'"),
    ("POST", "/v1/vms", {}, 422, "flavor"),
    ("POST", "/v1/vms", {"flavor": "x", "wait": "maybe"}, 422, "wait"),
    ("GET", "/v1/vms?state=sleeping", None, 422, "state"),
    ("GET", "/v1/vms/vm-000000000000", None, 404, "no VM 'vm-000000000000'"),
    ("GET", "/v1/vms/" + "x" * 300, None, 404, "no VM"),
    ("GET", "/v1/flavors/" + "f" * 300, None, 404, "no flavor named"),
    ("PATCH", "/v1/flavors/" + "f" * 300, {"vcpus": 2}, 404, "no flavor named"),
    ("GET", "/v1/vms/" + "x" * 300 + "/events", None, 404, "no VM"),
    ("DELETE", "/v1/vms/vm-000000000000", None, 404, "no VM"),
    ("POST", "/v1/vms/vm-000000000000/exec", {"argv": ["true"]}, 404, "no VM"),
    ("POST", "/v1/vms/vm-000000000000/exec", {"argv": []}, 422, "argv"),
    ("POST", "/v1/vms/vm-000000000000/exec", {"argv": ["sh"], "timeout_s": -1}, 422, "timeout_s"),
    ("GET", "/v1/vms/vm-000000000000/console", None, 404, "no VM"),
    ("GET", "/v1/vms/vm-000000000000/console?tail=-5", None, 422, "tail"),
    ("GET", "/v1/vms/vm-000000000000/events", None, 404, "no VM"),
    ("GET", "/v1/nothing-here", None, 404, "openapi"),
    ("DELETE", "/v1/pools", None, 405, "not allowed"),
]


@pytest.mark.parametrize("method, path, body, status, needle", BAD_INPUT,
                         ids=[f"{m} {p[:40]} {status}" for m, p, _, status, _ in BAD_INPUT])
def test_bad_input_gets_a_clear_4xx(api, method, path, body, status, needle):
    if isinstance(body, str):
        response = api.request(method, path, content=body, headers={"Content-Type": "application/json"})
    else:
        response = api.request(method, path, json=body) if body is not None else api.request(method, path)
    assert_problem(response, status, needle)


def test_a_body_without_json_content_type_says_so(api):
    response = api.post("/v1/flavors", content=b'{"name": "x"}', headers={"Content-Type": "text/plain"})
    assert_problem(response, 422, "Content-Type: application/json")


def test_oversized_bodies_are_413_whether_declared_or_streamed(api):
    big = json.dumps({"name": "big", "cmdline_extra": "x" * (2 << 20)}).encode()
    assert_problem(api.post("/v1/flavors", content=big, headers={"Content-Type": "application/json"}), 413,
                   "larger than 1048576 bytes")

    def chunks():  # no Content-Length: the cap must hold while streaming
        for _ in range(40):
            yield b" " * 65536

    assert_problem(api.post("/v1/flavors", content=chunks(), headers={"Content-Type": "application/json"}), 413)
    # exec takes up to 16 MiB of stdin (base64 in JSON): 2 MiB is fine there (then: no such VM) …
    stdin = json.dumps({"argv": ["cat"], "stdin_b64": "A" * (2 << 20)})
    assert_problem(api.post("/v1/vms/vm-000000000000/exec", content=stdin,
                            headers={"Content-Type": "application/json"}), 404)
    # … and 23 MiB is not.
    huge = b'{"argv": ["cat"], "stdin_b64": "' + b"A" * (23 << 20) + b'"}'
    assert_problem(api.post("/v1/vms/vm-000000000000/exec", content=huge,
                            headers={"Content-Type": "application/json"}), 413, "16 MiB")
    assert api.get("/healthz").status_code == 200, "the server is still serving"


def test_quotas_are_enforced_with_a_4xx(api):
    assert_problem(api.post("/v1/flavors", json={"name": "hog", "mem_mib": 512, "pool_target": 3}), 403,
                   "guest memory quota", "PCLITE_MAX_GUEST_MEM_MIB")
    assert_problem(api.post("/v1/flavors", json={"name": "many", "mem_mib": 64, "pool_target": 5}), 403,
                   "VM quota", "PCLITE_MAX_VMS")
    assert api.post("/v1/flavors", json={"name": "huge", "mem_mib": 2048, "pool_target": 0}).status_code == 201
    assert_problem(api.patch("/v1/pools/huge", json={"target": 1}), 403, "guest memory quota")
    assert_problem(api.post("/v1/vms", json={"flavor": "huge"}), 403, "guest memory quota", "2048 MiB")
    assert api.get("/v1/vms", params={"flavor": "huge"}).json() == [], "a refused claim leaves no VM behind"


def test_an_empty_pool_without_wait_is_503_with_retry_after(api):
    api.post("/v1/flavors", json={"name": "empty", "mem_mib": 64, "pool_target": 0})
    response = api.post("/v1/vms", json={"flavor": "empty", "wait": False})
    assert_problem(response, 503, "no ready VM", "wait")
    assert int(response.headers["retry-after"]) >= 1
    metrics = api.get("/metrics").text
    assert 'pclite_claims_total{flavor="empty",result="miss"} 1.0' in metrics


def test_vm_listing_filters(api):
    assert api.get("/v1/vms").status_code == 200
    assert api.get("/v1/vms", params={"flavor": "no-such", "state": "ready"}).json() == []
