"""deploy/kubernetes validated against real schemas, then cross-checked the way the API server and kubelet would.

- Core kinds: the official `kubernetes` Python client's models (generated from the Kubernetes OpenAPI spec; pydantic
  with extra="forbid" and strict types), so a misspelt field, a wrong type or a missing required field fails.
- ServiceMonitor: the fields of the Prometheus Operator's CRD (monitoring.coreos.com/v1, operator v0.84.1), the
  subset this repository uses encoded below from the CRD's openAPIV3Schema, unknown fields rejected.
- References: selectors match pod labels, ports/volumes/secrets/config keys named in one object exist in another,
  every PCLITE_* variable is a real pclited setting, and the ConfigMap's settings file loads in pclited's Settings.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
KUBE = ROOT / "deploy" / "kubernetes"
NAMESPACE = "pclite"


def load_all() -> list[dict]:
    docs = []
    for path in sorted(KUBE.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                docs.append(doc | {"__file__": path.name})
    return docs


DOCS = load_all()


def by_kind(kind: str) -> list[dict]:
    return [d for d in DOCS if d["kind"] == kind]


def one(kind: str) -> dict:
    found = by_kind(kind)
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def strip(doc: dict) -> dict:
    return {k: v for k, v in doc.items() if k != "__file__"}


def test_the_kinds_a_pclite_deployment_needs_are_there():
    kinds = sorted(d["kind"] for d in DOCS)
    assert kinds == ["ConfigMap", "DaemonSet", "Namespace", "Secret", "Service", "ServiceAccount", "ServiceMonitor"]
    for doc in DOCS:
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == NAMESPACE, doc["__file__"]
        assert doc["metadata"]["labels"]["app.kubernetes.io/name"] == "pclite", doc["__file__"]


# -- the official schemas -------------------------------------------------------------------------------------

CORE_MODELS = {("v1", "Namespace"): "V1Namespace", ("v1", "ServiceAccount"): "V1ServiceAccount",
               ("v1", "Secret"): "V1Secret", ("v1", "ConfigMap"): "V1ConfigMap",
               ("apps/v1", "DaemonSet"): "V1DaemonSet", ("v1", "Service"): "V1Service"}


@pytest.mark.parametrize("doc", [d for d in DOCS if d["kind"] != "ServiceMonitor"],
                         ids=lambda d: f"{d['kind']}/{d['metadata']['name']}")
def test_core_objects_validate_against_the_kubernetes_openapi_models(doc):
    models = pytest.importorskip("kubernetes.client.models", reason="the `kubernetes` client (dev extra) is needed "
                                                                    "to validate against the Kubernetes OpenAPI models")
    key = (doc["apiVersion"], doc["kind"])
    assert key in CORE_MODELS, f"{doc['__file__']}: unexpected apiVersion/kind {key}"
    model = getattr(models, CORE_MODELS[key])
    model.model_validate(strip(doc))  # raises pydantic.ValidationError naming each bad field


def test_the_schema_check_catches_mistakes():
    """The models are strict: a misspelt field, a wrong type and a missing required field each fail."""
    models = pytest.importorskip("kubernetes.client.models", reason="the `kubernetes` client (dev extra) is needed")
    from pydantic import ValidationError

    ds = strip(one("DaemonSet"))
    container = ds["spec"]["template"]["spec"]["containers"][0]
    bad_field = yaml.safe_load(yaml.safe_dump(ds))
    bad_field["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    bad_type = yaml.safe_load(yaml.safe_dump(ds))
    bad_type["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "8080"
    missing = yaml.safe_load(yaml.safe_dump(ds))
    del missing["spec"]["selector"]
    for broken in (bad_field, bad_type, missing):
        with pytest.raises(ValidationError):
            models.V1DaemonSet.model_validate(broken)
    assert container["name"] == "pclited"


# Enumerations the OpenAPI models keep as plain strings.
ENUMS = {
    "hostPath.type": {"", "DirectoryOrCreate", "Directory", "FileOrCreate", "File", "Socket", "CharDevice",
                      "BlockDevice"},
    "imagePullPolicy": {"Always", "IfNotPresent", "Never"},
    "protocol": {"TCP", "UDP", "SCTP"},
    "service.type": {"ClusterIP", "NodePort", "LoadBalancer", "ExternalName"},
    "internalTrafficPolicy": {"Cluster", "Local"},
    "updateStrategy.type": {"RollingUpdate", "OnDelete"},
    "seccompProfile.type": {"RuntimeDefault", "Localhost", "Unconfined"},
}


def test_enumerated_values_are_valid():
    ds = one("DaemonSet")
    pod = ds["spec"]["template"]["spec"]
    assert ds["spec"]["updateStrategy"]["type"] in ENUMS["updateStrategy.type"]
    assert pod["securityContext"]["seccompProfile"]["type"] in ENUMS["seccompProfile.type"]
    for volume in pod["volumes"]:
        if "hostPath" in volume:
            assert volume["hostPath"].get("type", "") in ENUMS["hostPath.type"]
    for container in pod["containers"]:
        assert container["imagePullPolicy"] in ENUMS["imagePullPolicy"]
        assert all(p["protocol"] in ENUMS["protocol"] for p in container["ports"])
    svc = one("Service")["spec"]
    assert svc["type"] in ENUMS["service.type"]
    assert svc["internalTrafficPolicy"] in ENUMS["internalTrafficPolicy"]
    assert all(p["protocol"] in ENUMS["protocol"] for p in svc["ports"])


# -- the ServiceMonitor against its CRD -----------------------------------------------------------------------

# From monitoring.coreos.com_servicemonitors.yaml (operator v0.84.1), openAPIV3Schema, the parts used here.
# "type" is the CRD's JSON type; "properties" lists every field the CRD allows at that level (not only ours).
STRING, BOOL, INT = {"type": "string"}, {"type": "boolean"}, {"type": "integer"}
STRINGS = {"type": "array", "items": STRING}
LABEL_SELECTOR = {"type": "object", "properties": {
    "matchLabels": {"type": "object", "additionalProperties": STRING},
    "matchExpressions": {"type": "array", "items": {"type": "object", "required": ["key", "operator"], "properties": {
        "key": STRING, "operator": STRING, "values": STRINGS}}}}}
RELABEL = {"type": "object", "properties": {
    "action": {"type": "string", "enum": ["replace", "Replace", "keep", "Keep", "drop", "Drop", "hashmod", "HashMod",
                                          "labelmap", "LabelMap", "labeldrop", "LabelDrop", "labelkeep", "LabelKeep",
                                          "lowercase", "Lowercase", "uppercase", "Uppercase", "keepequal",
                                          "KeepEqual", "dropequal", "DropEqual"]},
    "modulus": INT, "regex": STRING, "replacement": STRING, "separator": STRING, "sourceLabels": STRINGS,
    "targetLabel": STRING}}
DURATION = {"type": "string", "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?"
                                         r"(([0-9]+)s)?(([0-9]+)ms)?)$"}
ENDPOINT = {"type": "object", "properties": {
    "authorization": {"type": "object"}, "basicAuth": {"type": "object"}, "bearerTokenFile": STRING,
    "bearerTokenSecret": {"type": "object"}, "enableHttp2": BOOL, "filterRunning": BOOL, "followRedirects": BOOL,
    "honorLabels": BOOL, "honorTimestamps": BOOL, "interval": DURATION, "metricRelabelings": {
        "type": "array", "items": RELABEL}, "noProxy": STRING, "oauth2": {"type": "object"},
    "params": {"type": "object"}, "path": STRING, "port": STRING, "proxyConnectHeader": {"type": "object"},
    "proxyFromEnvironment": BOOL, "proxyUrl": STRING, "relabelings": {"type": "array", "items": RELABEL},
    "scheme": {"type": "string", "enum": ["http", "https", "HTTP", "HTTPS"]}, "scrapeTimeout": DURATION,
    "targetPort": {"type": "int-or-string"}, "tlsConfig": {"type": "object"}, "trackTimestampsStaleness": BOOL}}
SERVICE_MONITOR = {"type": "object", "required": ["spec"], "properties": {
    "apiVersion": STRING, "kind": STRING, "metadata": {"type": "object"},
    "spec": {"type": "object", "required": ["endpoints", "selector"], "properties": {
        "attachMetadata": {"type": "object", "properties": {"node": BOOL}}, "bodySizeLimit": STRING,
        "convertClassicHistogramsToNHCB": BOOL, "endpoints": {"type": "array", "items": ENDPOINT},
        "fallbackScrapeProtocol": STRING, "jobLabel": STRING, "keepDroppedTargets": INT, "labelLimit": INT,
        "labelNameLengthLimit": INT, "labelValueLengthLimit": INT,
        "namespaceSelector": {"type": "object", "properties": {"any": BOOL, "matchNames": STRINGS}},
        "nativeHistogramBucketLimit": INT, "nativeHistogramMinBucketFactor": {"type": "int-or-string"},
        "podTargetLabels": STRINGS, "sampleLimit": INT, "scrapeClass": STRING, "scrapeClassicHistograms": BOOL,
        "scrapeProtocols": STRINGS, "selector": LABEL_SELECTOR,
        "selectorMechanism": {"type": "string", "enum": ["RelabelConfig", "RoleSelector"]}, "targetLabels": STRINGS,
        "targetLimit": INT}}}}


def crd_errors(value, schema: dict, path: str = "") -> list[str]:
    """A small OpenAPI v3 (structural schema) check: types, enums, patterns, required and unknown fields."""
    import re

    kind = schema["type"]
    checks = {"string": str, "boolean": bool, "array": list, "object": dict}
    if kind == "integer":
        if isinstance(value, bool) or not isinstance(value, int):
            return [f"{path}: expected integer, got {value!r}"]
        return []
    if kind == "int-or-string":
        return [] if isinstance(value, int | str) and not isinstance(value, bool) else [f"{path}: int or string"]
    if not isinstance(value, checks[kind]):
        return [f"{path}: expected {kind}, got {type(value).__name__}"]
    errors = []
    if kind == "string":
        if "enum" in schema and value not in schema["enum"]:
            errors.append(f"{path}: {value!r} not in {schema['enum']}")
        if "pattern" in schema and not re.search(schema["pattern"], value):
            errors.append(f"{path}: {value!r} does not match {schema['pattern']}")
    elif kind == "array":
        for i, item in enumerate(value):
            errors += crd_errors(item, schema["items"], f"{path}[{i}]")
    elif kind == "object":
        errors += [f"{path}.{k}: required" for k in schema.get("required", []) if k not in value]
        if "properties" in schema:
            for key, item in value.items():
                if key not in schema["properties"]:
                    errors.append(f"{path}.{key}: unknown field (the CRD would prune it)")
                else:
                    errors += crd_errors(item, schema["properties"][key], f"{path}.{key}")
        elif "additionalProperties" in schema:
            for key, item in value.items():
                errors += crd_errors(item, schema["additionalProperties"], f"{path}.{key}")
    return errors


def test_service_monitor_matches_its_crd():
    monitor = one("ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert crd_errors(strip(monitor), SERVICE_MONITOR) == []
    spec = {k: v for k, v in monitor["spec"].items() if k != "endpoints"} | {"endpoint": monitor["spec"]["endpoints"]}
    typo = strip(monitor) | {"spec": spec}
    assert any("spec.endpoint: unknown field" in e for e in crd_errors(typo, SERVICE_MONITOR))
    assert any("spec.endpoints: required" in e for e in crd_errors(typo, SERVICE_MONITOR))


# -- references between objects --------------------------------------------------------------------------------


def matches(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def test_selectors_reach_the_pods_and_service():
    ds, svc, monitor = one("DaemonSet"), one("Service"), one("ServiceMonitor")
    pod_labels = ds["spec"]["template"]["metadata"]["labels"]
    assert matches(ds["spec"]["selector"]["matchLabels"], pod_labels)
    assert matches(svc["spec"]["selector"], pod_labels)
    assert matches(monitor["spec"]["selector"]["matchLabels"], svc["metadata"]["labels"])
    assert monitor["spec"]["namespaceSelector"]["matchNames"] == [svc["metadata"]["namespace"]]
    container_ports = {p["name"]: p["containerPort"] for p in ds["spec"]["template"]["spec"]["containers"][0]["ports"]}
    service_ports = {p["name"]: p for p in svc["spec"]["ports"]}
    for port in service_ports.values():
        assert port["targetPort"] in container_ports or port["targetPort"] in container_ports.values()
    for endpoint in monitor["spec"]["endpoints"]:
        assert endpoint["port"] in service_ports
        assert endpoint["path"] == "/metrics"
    assert all(len(name) <= 15 for name in container_ports)  # IANA_SVC_NAME


def test_pod_spec_references_resolve():
    ds = one("DaemonSet")
    pod = ds["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    container = pod["containers"][0]
    ports = {p["name"] for p in container["ports"]}
    for mount in container["volumeMounts"]:
        assert mount["name"] in volumes, mount
    assert sorted(m["name"] for m in container["volumeMounts"]) == sorted(volumes)  # nothing declared unused
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["port"] in ports
    assert pod["serviceAccountName"] == one("ServiceAccount")["metadata"]["name"]
    secret = one("Secret")
    secret_keys = set(secret.get("stringData", {})) | set(secret.get("data", {}))
    for env in container["env"]:
        ref = env.get("valueFrom", {}).get("secretKeyRef")
        if ref:
            assert ref["name"] == secret["metadata"]["name"] and ref["key"] in secret_keys, env
    config = one("ConfigMap")
    assert volumes["config"]["configMap"]["name"] == config["metadata"]["name"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    mount = next(m for m in container["volumeMounts"] if m["name"] == "config")
    assert env["PCLITE_CONFIG_FILE"] == f"{mount['mountPath']}/pclited.yaml"
    assert "pclited.yaml" in config["data"]


def test_kvm_access_and_pod_hardening():
    pod = one("DaemonSet")["spec"]["template"]["spec"]
    kvm = next(v for v in pod["volumes"] if v["name"] == "kvm")
    assert kvm["hostPath"] == {"path": "/dev/kvm", "type": "CharDevice"}
    container = pod["containers"][0]
    assert {"name": "kvm", "mountPath": "/dev/kvm"} in container["volumeMounts"]
    context = container["securityContext"]
    assert context["readOnlyRootFilesystem"] is True
    # The API server rejects privileged together with allowPrivilegeEscalation: false.
    assert not (context.get("privileged") and context.get("allowPrivilegeEscalation") is False)
    assert pod["automountServiceAccountToken"] is False
    writable = {m["mountPath"] for m in container["volumeMounts"] if not m.get("readOnly")}
    assert {"/var/lib/pclite", "/run/pclite", "/tmp"} <= writable  # what pclited writes on a read-only root
    env = {e["name"]: e for e in container["env"]}
    assert env["PCLITE_DATABASE_URL"]["valueFrom"]["secretKeyRef"]["key"] == "database-url"
    assert env["PCLITE_TOKEN"]["valueFrom"]["secretKeyRef"]["key"] == "token"
    assert one("Secret")["stringData"]["database-url"].startswith("postgresql+psycopg://")
    assert one("Namespace")["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "privileged"


def pclited_setting_names() -> set[str]:
    from service.core.config import Settings

    return {f"PCLITE_{name.upper()}" for name in Settings.model_fields}


# Variables read outside pclited's Settings: the artifact cache (guestbuild) and pclited's settings-file path.
OTHER_PCLITE_VARIABLES = {"PCLITE_CACHE", "PCLITE_CONFIG_FILE"}


def test_every_pclite_variable_is_a_real_setting():
    known = pclited_setting_names() | OTHER_PCLITE_VARIABLES
    container = one("DaemonSet")["spec"]["template"]["spec"]["containers"][0]
    names = [e["name"] for e in container["env"] if e["name"].startswith("PCLITE_")]
    assert names and set(names) <= known, set(names) - known


def test_the_configmap_settings_file_loads_in_pclited(tmp_path, monkeypatch):
    from service.core.config import load_settings

    for name in list(__import__("os").environ):
        if name.startswith("PCLITE_"):
            monkeypatch.delenv(name)
    path = tmp_path / "pclited.yaml"
    path.write_text(one("ConfigMap")["data"]["pclited.yaml"])
    settings = load_settings(path, data_dir=tmp_path / "data")  # extra="forbid": an unknown key raises
    assert settings.max_vms == 64 and settings.boot_concurrency == 2


def test_kustomization_lists_every_manifest():
    kustomization = yaml.safe_load((KUBE / "kustomization.yaml").read_text())
    assert kustomization["namespace"] == NAMESPACE
    assert sorted(kustomization["resources"]) == sorted(p.name for p in KUBE.glob("*.yaml")
                                                        if p.name != "kustomization.yaml")


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with its built-in kustomize) is not installed")
def test_kustomize_builds_the_bundle():
    built = subprocess.run(["kubectl", "kustomize", str(KUBE)], capture_output=True, text=True, timeout=120)
    assert built.returncode == 0, built.stderr
    docs = [d for d in yaml.safe_load_all(built.stdout) if d]
    assert sorted(d["kind"] for d in docs) == sorted(d["kind"] for d in DOCS)
    assert all(d["metadata"]["labels"]["app.kubernetes.io/part-of"] == "pclite" for d in docs)
