"""kubectl-style manifests for flavors: `apiVersion: pclite/v1`, `kind: Flavor`, metadata.name and a spec.

Parsing checks every document before anything is sent, and every complaint names the file, the document, the line
and the field, so `apply -f` can refuse a bad file in one readable line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from service.cli.errors import CliError

API_VERSION = "pclite/v1"
KIND = "Flavor"
NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")

# spec field -> (API field, type, minimum); `pool` is nested and handled on its own.
SPEC_FIELDS: dict[str, tuple[str, type, int | None]] = {
    "kernel": ("kernel", str, None),
    "initrd": ("initrd", str, None),
    "cmdlineExtra": ("cmdline_extra", str, None),
    "vcpus": ("vcpus", int, 1),
    "memMib": ("mem_mib", int, 64),  # pclited's floor: the guest kernel + agent need it
    "maxAgeSeconds": ("max_age_s", int, 0),  # 0: no age limit
    "clone": ("clone", bool, None),  # refill from clones of a template VM (default true)
}
POOL_FIELDS: dict[str, tuple[str, type, int | None]] = {
    "min": ("pool_min", int, 0),
    "target": ("pool_target", int, 0),
}
# What pclited gives a field a manifest leaves out (service/schemas.py FlavorSpec; a test keeps them equal): `apply`
# sets a field removed from the manifest back to this, as kubectl's apply does.
DEFAULTS: dict[str, Any] = {"kernel": None, "initrd": None, "cmdline_extra": "", "vcpus": 1, "mem_mib": 256,
                            "pool_min": 0, "pool_target": 1, "max_age_s": 3600, "clone": True}
NULLABLE = {"maxAgeSeconds", "kernel", "initrd"}
METADATA_FIELDS = {"name", "labels", "annotations", "creationTimestamp"}
TOP_FIELDS = {"apiVersion", "kind", "metadata", "spec", "status"}


@dataclass
class FlavorManifest:
    name: str
    body: dict[str, Any]  # API fields present in the manifest (a partial flavor)
    source: str  # "FILE: document N" for messages


class _Doc:
    """One YAML document: its data plus its node tree, to tell the line of any field."""

    def __init__(self, source: str, index: int, node, data):
        self.source, self.index, self.node, self.data = source, index, node, data

    def line_of(self, path: tuple[str, ...]) -> int | None:
        node, line = self.node, self.node.start_mark.line + 1
        for key in path:
            if not hasattr(node, "value") or not isinstance(node.value, list):
                break
            for key_node, value_node in node.value:
                if getattr(key_node, "value", None) == key:
                    node, line = value_node, key_node.start_mark.line + 1
                    break
            else:
                break
        return line

    def fail(self, path: tuple[str, ...], problem: str) -> CliError:
        line = self.line_of(path)
        field = ".".join(path)
        where = f"{self.source}:{line}" if line else self.source
        name = ""
        if isinstance(self.data, dict) and isinstance(self.data.get("metadata"), dict):
            meta_name = self.data["metadata"].get("name")
            name = f" (flavor/{meta_name})" if isinstance(meta_name, str) else ""
        subject = f"{field}: " if field else ""
        return CliError(f"{where}: document {self.index}{name}: {subject}{problem}")


def _describe(value: Any) -> str:
    return "null" if value is None else f"{type(value).__name__} {value!r}"


def _check_value(doc: _Doc, path: tuple[str, ...], value: Any, kind: type, minimum: int | None,
                 nullable: bool) -> Any:
    expected = {int: "an integer", bool: "true or false"}.get(kind, "a string")
    if value is None:
        if nullable:
            return None
        raise doc.fail(path, f"must not be empty (expected {expected})")
    if kind is bool:
        if not isinstance(value, bool):
            raise doc.fail(path, f"must be true or false, got {_describe(value)}")
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise doc.fail(path, f"must be an integer, got {_describe(value)}")
        if minimum is not None and value < minimum:
            raise doc.fail(path, f"must be >= {minimum}, got {value}")
        return value
    if not isinstance(value, str):
        raise doc.fail(path, f"must be a string, got {_describe(value)}")
    return value


def _unknown(doc: _Doc, path: tuple[str, ...], keys, allowed) -> None:
    extra = [str(k) for k in keys if k not in allowed]
    if extra:
        raise doc.fail(path + (extra[0],), f"unknown field (allowed here: {', '.join(sorted(allowed))})")


def _flavor_from(doc: _Doc) -> FlavorManifest:
    data = doc.data
    if not isinstance(data, dict):
        raise doc.fail((), f"a manifest must be a mapping with apiVersion, kind, metadata and spec, got "
                           f"{type(data).__name__}")
    if data.get("apiVersion") != API_VERSION:
        raise doc.fail(("apiVersion",), f"must be {API_VERSION!r}, got {data.get('apiVersion')!r}")
    if data.get("kind") != KIND:
        raise doc.fail(("kind",), f"must be {KIND!r} (the only kind pclitectl applies), got {data.get('kind')!r}")
    _unknown(doc, (), data.keys(), TOP_FIELDS)
    meta = data.get("metadata")
    if not isinstance(meta, dict):
        raise doc.fail(("metadata",), "must be a mapping with a `name`")
    _unknown(doc, ("metadata",), meta.keys(), METADATA_FIELDS)
    name = meta.get("name")
    if not isinstance(name, str) or not name:
        raise doc.fail(("metadata", "name"), "is required (a flavor name such as `default`)")
    if len(name) > 63 or not NAME_RE.match(name):
        raise doc.fail(("metadata", "name"), f"{name!r} is not a valid name: lowercase letters, digits and '-', "
                                             f"starting and ending with a letter or digit, at most 63 characters")
    spec = data.get("spec")
    if spec is None:
        spec = {}
    if not isinstance(spec, dict):
        raise doc.fail(("spec",), f"must be a mapping, got {_describe(spec)}")
    _unknown(doc, ("spec",), spec.keys(), set(SPEC_FIELDS) | {"pool"})
    body: dict[str, Any] = {}
    for key, (api_key, kind, minimum) in SPEC_FIELDS.items():
        if key in spec:
            body[api_key] = _check_value(doc, ("spec", key), spec[key], kind, minimum, key in NULLABLE)
    if "pool" in spec:
        pool = spec["pool"]
        if not isinstance(pool, dict):
            raise doc.fail(("spec", "pool"), f"must be a mapping with `min` and/or `target`, got {_describe(pool)}")
        _unknown(doc, ("spec", "pool"), pool.keys(), set(POOL_FIELDS))
        for key, (api_key, kind, minimum) in POOL_FIELDS.items():
            if key in pool:
                body[api_key] = _check_value(doc, ("spec", "pool", key), pool[key], kind, minimum, False)
        if "pool_min" in body and "pool_target" in body and body["pool_min"] > body["pool_target"]:
            raise doc.fail(("spec", "pool", "min"), f"must be <= pool.target ({body['pool_min']} > "
                                                    f"{body['pool_target']})")
    return FlavorManifest(name=name, body=body, source=f"{doc.source}: document {doc.index}")


def parse(text: str, source: str) -> list[FlavorManifest]:
    """Every Flavor in a (multi-document) YAML text; raises CliError naming the first problem."""
    import yaml

    loader = yaml.SafeLoader(text)
    docs: list[_Doc] = []
    try:
        index = 0
        while loader.check_node():
            node = loader.get_node()
            index += 1
            if node is None:
                continue
            docs.append(_Doc(source, index, node, loader.construct_document(node)))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark is not None else source
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise CliError(f"{where}: not valid YAML: {problem}") from None
    finally:
        loader.dispose()
    docs = [d for d in docs if d.data is not None]
    if not docs:
        raise CliError(f"{source}: no manifests in it (expected documents with apiVersion: {API_VERSION}, "
                       f"kind: {KIND})")
    manifests = [_flavor_from(doc) for doc in docs]
    seen: dict[str, str] = {}
    for manifest in manifests:
        if manifest.name in seen:
            raise CliError(f"{manifest.source}: flavor/{manifest.name} is already defined in {seen[manifest.name]}")
        seen[manifest.name] = manifest.source
    return manifests


def in_manifest_terms(text: str) -> str:
    """A server message about API fields (mem_mib, pool_target) in the manifest's own terms (spec.memMib, ...)."""
    names = {api: f"spec.{key}" for key, (api, _t, _m) in SPEC_FIELDS.items()}
    names.update({api: f"spec.pool.{key}" for key, (api, _t, _m) in POOL_FIELDS.items()})
    return re.sub(r"\b(" + "|".join(names) + r")\b", lambda m: names[m.group(1)], text)


def changed_fields(current: dict, desired: dict) -> dict:
    """The fields of a partial flavor that differ from the server's copy."""
    return {k: v for k, v in desired.items() if current.get(k) != v}


def to_manifest(flavor: dict) -> dict:
    """A server flavor as the manifest that `apply -f` accepts back (a no-op: `unchanged`)."""
    spec: dict[str, Any] = {}
    for key, (api_key, _kind, _min) in SPEC_FIELDS.items():
        if api_key in flavor:
            spec[key] = flavor[api_key]
    pool = {key: flavor[api_key] for key, (api_key, _k, _m) in POOL_FIELDS.items() if api_key in flavor}
    if pool:
        spec["pool"] = pool
    doc: dict[str, Any] = {"apiVersion": API_VERSION, "kind": KIND, "metadata": {"name": flavor.get("name")}}
    if flavor.get("created_at"):
        doc["metadata"]["creationTimestamp"] = flavor["created_at"]
    doc["spec"] = spec
    status = {}
    if flavor.get("updated_at"):
        status["updatedAt"] = flavor["updated_at"]
    if isinstance(flavor.get("template"), dict):  # read-only: `apply -f` ignores status
        status["template"] = {k: v for k, v in flavor["template"].items() if v is not None}
    if status:
        doc["status"] = status
    return doc
