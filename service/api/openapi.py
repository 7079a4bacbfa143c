"""The published OpenAPI, made to match what the server really answers: stable operation ids, every status with
its problem+json body, /metrics as text, and no reference to a schema that is not there."""

from __future__ import annotations

import re

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi.routing import APIRoute

from service.api.errors import PROBLEM_MEDIA_TYPE
from service.auth import PUBLIC_PATHS
from service.schemas import Problem

PROBLEM_REF = {"$ref": "#/components/schemas/Problem"}
# Any request: a non-numeric Content-Length (400), a body over the cap (413), a bug (500).
ALWAYS = {400: "bad request (a malformed Content-Length)", 413: "request body over the size cap",
          500: "internal error (a pclited bug)"}
# What the services raise (service/services/errors.py), by the operations that can raise it.
WRITES = {403: "forbidden, or over a quota", 409: "conflicts with the current state",
          502: "the VM's VMM failed", 503: "unavailable (Retry-After says when to retry)"}
WRITE_OPERATIONS = {"createFlavor", "putFlavor", "patchFlavor", "deleteFlavor", "patchPool", "claimVm", "deleteVm",
              "execInVm", "attachRootfs", "patchVm"}


def operation_id(route: APIRoute) -> str:
    """claim_vm → claimVm: the route function's name, stable across path changes."""
    head, *rest = route.name.split("_")
    return head + "".join(word.capitalize() for word in rest)


def _problem(description: str) -> dict:
    return {"description": description, "content": {PROBLEM_MEDIA_TYPE: {"schema": PROBLEM_REF}}}


def _refs(node, found: set[str]) -> None:
    if isinstance(node, dict):
        if isinstance(node.get("$ref"), str):
            found.add(node["$ref"])
        for value in node.values():
            _refs(value, found)
    elif isinstance(node, list):
        for value in node:
            _refs(value, found)


def build(app: FastAPI) -> dict:
    spec = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    schemas = spec.setdefault("components", {}).setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    schemas["Problem"] = Problem.model_json_schema()
    from service.schemas import RootfsRequest  # referenced by the rootfs body that FastAPI does not parse

    rootfs = RootfsRequest.model_json_schema(ref_template="#/components/schemas/{model}")
    schemas.update(rootfs.pop("$defs", {}))
    schemas["RootfsRequest"] = rootfs
    for path, operations in spec.get("paths", {}).items():
        for operation in operations.values():
            responses = operation.setdefault("responses", {})
            statuses = dict(ALWAYS)
            if path not in PUBLIC_PATHS:
                statuses[401] = "no or wrong bearer token (WWW-Authenticate: Bearer)"
            if "{" in path:
                statuses[404] = "no such resource"
            if operation.get("parameters") or operation.get("requestBody"):
                statuses[422] = "a parameter or the body is invalid (the detail names the field)"
            if operation.get("operationId") in WRITE_OPERATIONS:
                statuses.update(WRITES)
            if operation.get("operationId") == "claimVm":
                statuses[404] = "no such flavor"
            if path == "/readyz":
                statuses[503] = "not ready (the detail says why)"
            for status, description in statuses.items():
                key = str(status)
                described = responses.get(key, {}).get("description")
                responses[key] = _problem(described if described and key != "422" else description)
            if path == "/metrics":
                responses["200"] = {"description": "Prometheus text exposition",
                                    "content": {"text/plain": {"schema": {"type": "string"}}}}
            if re.fullmatch(r"/v1/vms/\{vm_id\}/console", path):
                responses["200"]["content"] = {"text/plain": {"schema": {"type": "string"}}}
    found: set[str] = set()
    _refs(spec, found)
    missing = {ref for ref in found if ref.rsplit("/", 1)[-1] not in schemas}
    assert not missing, f"OpenAPI references schemas that are not there: {sorted(missing)}"
    return spec


def install(app: FastAPI) -> None:
    def openapi() -> dict:
        if app.openapi_schema is None:
            app.openapi_schema = build(app)
        return app.openapi_schema

    app.openapi = openapi

