"""The published OpenAPI is the truth: it validates, every $ref resolves, every status the server sends is
documented with its problem+json body, and what the schema forbids (a bool for an int, null where refused) the
server refuses with 422 problem+json. Against a real pclited on loopback."""

from __future__ import annotations

import re

import pytest
from openapi_spec_validator import validate

from tests.support.servers import running_pclited

PROBLEM = "application/problem+json"


@pytest.fixture(scope="module")
def server():
    with running_pclited() as svc:
        yield svc


@pytest.fixture(scope="module")
def spec(server) -> dict:
    with server.client() as api:
        response = api.get("/openapi.json")
    assert response.status_code == 200
    return response.json()


def resolve(spec: dict, ref: str):
    assert ref.startswith("#/"), f"only local references: {ref}"
    node = spec
    for part in ref[2:].split("/"):
        assert isinstance(node, dict) and part in node, f"unresolvable $ref {ref}"
        node = node[part]
    return node


def refs(node):
    if isinstance(node, dict):
        if isinstance(node.get("$ref"), str):
            yield node["$ref"]
        for value in node.values():
            yield from refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from refs(value)


def operations(spec: dict):
    for path, methods in spec["paths"].items():
        for method, operation in methods.items():
            yield path, method, operation


def test_the_spec_validates_and_every_ref_resolves(spec):
    validate(spec)
    found = set(refs(spec))
    assert "#/components/schemas/RootfsRequest" in found and "#/components/schemas/GuestMount" in found
    for ref in found:
        resolve(spec, ref)
    assert "HTTPValidationError" not in spec["components"]["schemas"]


def test_a_dangling_ref_is_caught():
    with pytest.raises(AssertionError, match="unresolvable"):
        resolve({"components": {"schemas": {}}}, "#/$defs/GuestMount")


def test_operation_ids_are_stable_camel_case(spec):
    ids = {(method, path): op["operationId"] for path, method, op in operations(spec)}
    assert ids[("post", "/v1/vms")] == "claimVm" and ids[("get", "/v1/vms")] == "listVms"
    assert all(re.fullmatch(r"[a-z][a-zA-Z]+", i) for i in ids.values()), ids
    assert len(set(ids.values())) == len(ids)


def test_every_error_status_is_problem_json(spec):
    for path, method, operation in operations(spec):
        responses = operation["responses"]
        for status, response in responses.items():
            if int(status) >= 400:
                schema = response["content"][PROBLEM]["schema"]
                assert schema == {"$ref": "#/components/schemas/Problem"}, (method, path, status)
        assert {"400", "413", "500"} <= set(responses), (method, path)
        if path not in ("/healthz", "/readyz", "/metrics"):
            assert "401" in responses, (method, path)
        if "{" in path:
            assert "404" in responses, (method, path)
        if operation.get("requestBody") or operation.get("parameters"):
            assert "422" in responses, (method, path)
    metrics = spec["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert list(metrics) == ["text/plain"]


def test_schema_carries_the_constraints(spec):
    schemas = spec["components"]["schemas"]
    assert "pattern" in schemas["FlavorSpec"]["properties"]["name"]["anyOf"][0]
    assert schemas["FlavorPatch"]["properties"]["vcpus"]["type"] == "integer"  # never null
    assert schemas["ClaimRequest"]["properties"]["flavor"]["pattern"].startswith("^[a-z0-9]")


def test_what_the_server_answers_is_documented(server, spec):
    with server.client() as api, server.client(token="x" * 40) as stranger:
        answers = [
            ("get", "/v1/flavors/{name}", api.get("/v1/flavors/nope")),
            ("post", "/v1/vms", api.post("/v1/vms", json={"flavor": "nope"})),
            ("get", "/v1/vms", stranger.get("/v1/vms")),
            ("post", "/v1/flavors", api.post("/v1/flavors", json={"vcpus": 2})),
            ("get", "/v1/vms/{vm_id}", api.get("/v1/vms/NOT-AN-ID")),
        ]
        for method, path, response in answers:
            assert response.status_code >= 400
            assert response.headers["content-type"] == PROBLEM, response.text
            assert str(response.status_code) in spec["paths"][path][method]["responses"], (method, path, response)
        refused = api.put("/v1/vms")
        assert refused.status_code == 405 and refused.headers["content-type"] == PROBLEM
        assert set(refused.headers["allow"].split(", ")) == {"GET", "HEAD", "POST"}


def test_a_non_ascii_cmdline_is_refused_at_the_api(server):
    with server.client() as api:
        for bad in ("console=ttyS0 é", "a\tb", "a\x00b"):
            response = api.post("/v1/flavors", json={"name": "bad", "cmdline_extra": bad, "pool_target": 0})
            assert response.status_code == 422 and response.headers["content-type"] == PROBLEM, response.text
            assert "cmdline_extra" in response.json()["detail"]
        assert api.get("/v1/flavors/bad").status_code == 404


# -- typed-wrong bodies: what the schema forbids, the server refuses -------------------------------------------------

def wrong_values(schema: dict, spec: dict) -> list:
    """Values of the wrong JSON type for a property: bool for int, int for bool, null where not nullable."""
    if "$ref" in schema:
        schema = resolve(spec, schema["$ref"])
    types = {schema["type"]} if "type" in schema else {s.get("type") for s in schema.get("anyOf", [])}
    wrong = []
    if "integer" in types or "number" in types:
        wrong.append(True)
    if "boolean" in types:
        wrong += [0, 1]
    if "string" in types:
        wrong += [5, False]
    if "null" not in types:
        wrong.append(None)
    return wrong


def body_cases(spec: dict):
    for path, method, operation in operations(spec):
        content = operation.get("requestBody", {}).get("content", {})
        if "application/json" not in content or path.endswith("/rootfs"):
            continue
        schema = resolve(spec, content["application/json"]["schema"]["$ref"])
        for name, prop in schema["properties"].items():
            for value in wrong_values(prop, spec):
                yield operation["operationId"], method, path, name, value


URLS = {"{name}": "small", "{flavor}": "small", "{vm_id}": "vm-000000000001"}


def test_typed_wrong_bodies_get_422_problem_json(server, spec):
    cases = list(body_cases(spec))
    assert {c[0] for c in cases} >= {"createFlavor", "putFlavor", "patchFlavor", "patchPool", "claimVm", "execInVm"}
    assert any(c[3] == "vcpus" and c[4] is True for c in cases) and any(c[3] == "clone" and c[4] == 0 for c in cases)
    with server.client() as api:
        for operation_id, method, path, name, value in cases:
            url = path
            for placeholder, real in URLS.items():
                url = url.replace(placeholder, real)
            response = api.request(method.upper(), url, json={name: value})
            assert response.status_code == 422, (operation_id, name, value, response.status_code, response.text)
            assert response.headers["content-type"] == PROBLEM
            assert name in response.json()["detail"], (operation_id, name, value, response.text)
        assert api.get("/v1/flavors").json() == [], "nothing was created by a refused body"
