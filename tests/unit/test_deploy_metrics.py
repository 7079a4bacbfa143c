"""The Grafana dashboard and the Prometheus files query only what pclited really exports, and parse as PromQL.

Exported metrics come from the service itself: service/metrics.py's definitions (read with `ast` for their label
names) cross-checked against a live `Metrics()` registry (the families /metrics serves). Every `pclite_*` name in a
query must be one of their samples, every label it selects or groups by must be one of that metric's labels (or a
scrape-time target label), and promtool — Prometheus's own parser, when installed — checks the config, the alert
rules (with a unit test of two alerts) and every dashboard query.
"""

from __future__ import annotations

import ast
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "pclite-dashboard.json"
PROMETHEUS = ROOT / "deploy" / "prometheus" / "prometheus.yml"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
METRICS_SOURCE = ROOT / "service" / "metrics.py"

# What issue 6's REST contract promises /metrics exports.
CONTRACT = {"pclite_boot_phase_seconds", "pclite_claim_seconds", "pclite_claims_total", "pclite_pool_ready",
            "pclite_pool_target", "pclite_vms", "pclite_vm_exits_total", "pclite_vmm_crashes_total"}
TARGET_LABELS = {"job", "instance", "node", "pod"}  # added at scrape time (prometheus.yml, the ServiceMonitor)
BUILTIN_METRICS = {"up"}
SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_count", "_sum", "_created"),
            "gauge": ("",), "summary": ("", "_count", "_sum", "_created")}
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool",
                "offset"}


def declared_metrics() -> dict[str, tuple[str, tuple[str, ...]]]:
    """{family name as exported: (type, label names)} from the prometheus_client calls in service/metrics.py."""
    tree = ast.parse(METRICS_SOURCE.read_text())
    found = {}
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                and node.func.id in ("Counter", "Gauge", "Histogram", "Summary", "Info")):
            continue
        name = ast.literal_eval(node.args[0])
        if node.func.id == "Info":  # exported as a gauge <name>_info{labels of its dict} (service/metrics.py)
            found[name + "_info"] = ("gauge", ("version",))
            continue
        labels_node = node.args[2] if len(node.args) > 2 else next(
            (k.value for k in node.keywords if k.arg == "labelnames"), None)
        labels = tuple(ast.literal_eval(labels_node)) if labels_node is not None else ()
        kind = node.func.id.lower()
        if kind == "counter":
            name = name.removesuffix("_total")
        found[name] = (kind, labels)
    return found


def exported_samples() -> dict[str, set[str]]:
    """{sample name: its label names} for every sample pclited's /metrics can carry."""
    from service.metrics import Metrics

    declared = declared_metrics()
    live = {family.name + ("_info" if family.type == "info" else ""): "gauge" if family.type == "info" else family.type
            for family in Metrics().registry.collect() if family.name.startswith("pclite_")}
    assert {name: kind for name, (kind, _) in declared.items()} == live, "service/metrics.py and its registry differ"
    samples = {}
    for name, (kind, labels) in declared.items():
        for suffix in SUFFIXES[kind]:
            extra = {"le"} if suffix == "_bucket" else set()
            samples[name + suffix] = set(labels) | extra
    return samples


EXPORTED = exported_samples()


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def dashboard_queries() -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and every query variable of the dashboard."""
    queries = []
    for panel in dashboard()["panels"]:
        for target in panel.get("targets", []):
            queries.append((f"panel {panel['id']} {panel['title']!r} {target['refId']}", target["expr"]))
    for var in dashboard()["templating"]["list"]:
        if var["type"] == "query":
            inner = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", var["definition"])
            assert inner, var["definition"]
            queries.append((f"variable ${var['name']}", inner.group(1)))
    return queries


def alert_queries() -> list[tuple[str, str]]:
    rules = yaml.safe_load(ALERTS.read_text())
    return [(f"alert {rule['alert']}", rule["expr"]) for group in rules["groups"] for rule in group["rules"]]


ALL_QUERIES = dashboard_queries() + alert_queries()


def as_promql(expr: str) -> str:
    """A dashboard query with Grafana's variables filled in, as Prometheus would receive it."""
    return (expr.replace("$__rate_interval", "1m").replace("$__interval", "1m").replace("$phase", "total")
            .replace("$flavor", ".*").replace("$node", ".*"))


def strip_strings(expr: str) -> str:
    return re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)


def selectors(expr: str) -> list[tuple[str, list[str]]]:
    """(metric, [label names]) for each `metric{...}` or bare metric in the query."""
    found = []
    for match in re.finditer(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(\{[^}]*\})?", strip_strings(expr)):
        name, body = match.group(1), match.group(2)
        if not (name.startswith("pclite_") or name in BUILTIN_METRICS):
            continue
        labels = re.findall(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)", body or "")
        found.append((name, labels))
    return found


def grouping_labels(expr: str) -> list[str]:
    labels = []
    pattern = r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)"
    for clause in re.findall(pattern, strip_strings(expr)):
        labels += [label.strip() for label in clause.split(",") if label.strip()]
    return labels


def test_the_service_exports_what_the_contract_promises():
    names = set(EXPORTED) | {n.removesuffix("_bucket") for n in EXPORTED}
    missing = CONTRACT - names
    assert not missing, f"the contract's metrics missing from service/metrics.py: {missing}"


@pytest.mark.parametrize(("where", "expr"), ALL_QUERIES, ids=[w for w, _ in ALL_QUERIES])
def test_queries_use_only_exported_metrics_and_their_labels(where, expr):
    used = selectors(expr)
    assert used, f"{where}: no pclite metric in {expr!r}"
    metric_labels = set()
    for name, labels in used:
        if name in BUILTIN_METRICS:
            metric_labels |= TARGET_LABELS
            continue
        assert name in EXPORTED, f"{where}: {name} is not exported by pclited (it has: {sorted(EXPORTED)})"
        allowed = EXPORTED[name] | TARGET_LABELS
        assert set(labels) <= allowed, f"{where}: {name} has no label {set(labels) - allowed}"
        metric_labels |= allowed
    grouped = set(grouping_labels(expr)) - PROMQL_WORDS
    assert grouped <= metric_labels, f"{where}: groups by {grouped - metric_labels}, which its metrics lack"


def test_the_checker_notices_a_wrong_name_or_label():
    assert "pclite_boots_total" not in EXPORTED
    assert selectors('sum by (le) (rate(pclite_claim_seconds_bucket{flavour="x"}[5m]))') == [
        ("pclite_claim_seconds_bucket", ["flavour"])]
    assert "flavour" not in EXPORTED["pclite_claim_seconds_bucket"]
    assert grouping_labels("sum by (le, phase) (x) / on (flavor) y") == ["le", "phase", "flavor"]


def test_dashboard_has_the_panels_operators_need():
    board = dashboard()
    panels = board["panels"]
    assert board["uid"] == "pclite" and isinstance(board["schemaVersion"], int)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    kinds = {p["type"] for p in panels}
    assert kinds <= {"timeseries", "heatmap", "stat", "gauge", "bargauge", "table", "row", "text"}
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24 and grid["h"] > 0, panel["title"]
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
    exprs = " ".join(t["expr"] for p in panels for t in p["targets"])
    heatmap = next(p for p in panels if p["type"] == "heatmap")
    assert "pclite_boot_phase_seconds_bucket" in heatmap["targets"][0]["expr"]
    assert heatmap["targets"][0]["format"] == "heatmap" and heatmap["options"]["calculate"] is False
    assert "pclite_pool_ready" in exprs and "pclite_pool_target" in exprs  # pool readiness
    assert 'pclite_claims_total{result="hit"' in exprs  # claim hit ratio
    assert "histogram_quantile(0.99, sum by (le, result) (rate(pclite_claim_seconds_bucket" in exprs  # latency


def test_dashboard_variables_are_defined():
    board = dashboard()
    defined = {v["name"] for v in board["templating"]["list"]}
    text = DASHBOARD.read_text()
    used = set(re.findall(r"\$\{?([a-zA-Z_]\w*)", text)) - {"__rate_interval", "__interval"}
    assert used <= defined, used - defined
    phase = next(v for v in board["templating"]["list"] if v["name"] == "phase")
    assert phase["query"].split(",") == ["total", "vmm_setup", "kernel", "init_to_agent"]
    from service.metrics import BOOT_PHASES

    assert set(phase["query"].split(",")) == set(BOOT_PHASES)


# -- promtool: Prometheus's own parser ------------------------------------------------------------------------

needs_promtool = pytest.mark.skipif(shutil.which("promtool") is None,
                                    reason="promtool (Debian package `prometheus`) is not installed")


def promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=120, cwd=cwd)


@needs_promtool
def test_promtool_accepts_the_scrape_config_and_alert_rules():
    config = promtool("check", "config", str(PROMETHEUS))
    assert config.returncode == 0, config.stdout + config.stderr
    rules = promtool("check", "rules", str(ALERTS))
    assert rules.returncode == 0, rules.stdout + rules.stderr
    scrape = yaml.safe_load(PROMETHEUS.read_text())["scrape_configs"]
    assert [job["metrics_path"] for job in scrape] == ["/metrics"] * len(scrape)


@needs_promtool
def test_promtool_parses_every_dashboard_query(tmp_path):
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query_{i}", "expr": as_promql(expr)} for i, (_, expr) in enumerate(dashboard_queries())
    ]}]}
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump(rules))
    result = promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(dashboard_queries())} rules found" in result.stdout


@needs_promtool
def test_alerts_fire_when_a_pool_empties_and_claims_miss(tmp_path):
    labels = 'flavor="default", node="n1"'
    test = {
        "rule_files": [str(ALERTS)],
        "evaluation_interval": "1m",
        "tests": [{
            "interval": "1m",
            "input_series": [
                {"series": f"pclite_pool_ready{{{labels}}}", "values": "2 1 0 0 0 0 0 0 0 0 0 0"},
                {"series": f"pclite_pool_target{{{labels}}}", "values": "2x11"},
                {"series": f'pclite_claims_total{{{labels}, result="hit"}}', "values": "0+1x30"},
                {"series": f'pclite_claims_total{{{labels}, result="miss"}}', "values": "0+1x30"},
            ],
            "alert_rule_test": [
                {"eval_time": "10m", "alertname": "PclitePoolEmpty", "exp_alerts": [{
                    "exp_labels": {"severity": "critical", "flavor": "default", "node": "n1"},
                    "exp_annotations": {
                        "summary": "pool default on n1 has no ready VM",
                        "description": "Every claim is a cold boot. `pclitectl describe flavor default` says why."},
                }]},
                {"eval_time": "10m", "alertname": "PclitePoolBelowTarget", "exp_alerts": []},  # its `for` is 15m
                {"eval_time": "30m", "alertname": "PcliteClaimMissRatioHigh", "exp_alerts": [{
                    "exp_labels": {"severity": "warning", "flavor": "default", "node": "n1"},
                    "exp_annotations": {
                        "summary": "more than 20% of claims on pool default miss the warm pool",
                        "description": "Raise the pool target: `pclitectl scale pool default --target N`."},
                }]},
            ],
        }],
    }
    path = tmp_path / "alerts_test.yml"
    path.write_text(yaml.safe_dump(test))
    result = promtool("test", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


# -- a real pclited's exposition --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def exposition() -> str:
    from tests.support.servers import running_pclited

    with running_pclited() as svc, svc.client() as api:
        assert api.get("/v1/flavors").status_code == 200
        assert api.get("/v1/vms/vm-nope").status_code == 404
        return api.get("/metrics").text


def exposed_families(text: str) -> dict[str, str]:
    return dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M))


@needs_promtool
def test_promtool_accepts_a_real_exposition(exposition):
    result = subprocess.run(["promtool", "check", "metrics"], input=exposition, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    families = exposed_families(exposition)
    for name in ("process_cpu_seconds_total", "process_resident_memory_bytes", "python_info",
                 "python_gc_collections_total", "pclite_build_info", "pclite_http_requests_total",
                 "pclite_http_request_duration_seconds", "pclite_pool_degraded", "pclite_quota_limit",
                 "pclite_quota_used"):
        assert name in families, f"{name} missing from /metrics"
    assert re.search(r'^pclite_build_info\{version="[^"]+"\} 1\.0$', exposition, re.M)
    assert re.search(r'^pclite_http_requests_total\{method="GET",route="/v1/vms/\{vm_id\}",status="404"\} 1\.0$',
                     exposition, re.M), "requests are counted by route template, not raw path"
    assert "vm-nope" not in exposition
    from service.metrics import BUCKETS

    assert BUCKETS[0] < 0.001, "claim latency (a pool hit) is sub-millisecond: so are the first buckets"
    assert 'pclite_http_request_duration_seconds_bucket{le="0.0001"' in exposition, "sub-millisecond buckets"
    assert re.search(r'^pclite_quota_limit\{resource="vms"\} \d', exposition, re.M)


def test_dashboard_and_alerts_use_only_metrics_of_a_real_exposition(exposition):
    samples = set()
    for name, kind in exposed_families(exposition).items():
        base = name.removesuffix("_total") if kind == "counter" else name
        samples |= {base + suffix for suffix in SUFFIXES.get(kind, ("",))}
    for where, expr in ALL_QUERIES:
        for name, _ in selectors(expr):
            assert name in samples | BUILTIN_METRICS, f"{where}: {name} is not in a real pclited's /metrics"


RULE_TESTS = ROOT / "deploy" / "prometheus" / "tests"


def runbook_alerts() -> list[dict]:
    rules = [r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]
    return [r for r in rules if "runbook_url" in r.get("annotations", {})]


def test_claim_degraded_and_quota_alerts_link_a_readme_runbook():
    alerts = {r["alert"]: r for r in runbook_alerts()}
    assert {"PcliteClaimErrors", "PclitePoolDegraded", "PcliteQuotaNearlyFull"} <= set(alerts)
    readme = (ROOT / "README.md").read_text()
    anchors = {"runbook-" + re.sub(r"[^a-z0-9 -]", "", h.lower()).strip().replace(" ", "-").removeprefix("runbook-")
               for h in re.findall(r"^#+ (Runbook: .+)$", readme, re.M)}
    for name, rule in alerts.items():
        path, _, anchor = rule["annotations"]["runbook_url"].partition("#")
        assert path == "README.md" and anchor in anchors, f"{name}: no README section #{anchor} ({anchors})"


@needs_promtool
@pytest.mark.parametrize("alert", [r["alert"] for r in runbook_alerts()])
def test_each_runbook_alert_has_a_passing_promtool_rule_test(alert):
    tests = [p for p in RULE_TESTS.glob("*.yml") if f"alertname: {alert}\n" in p.read_text()]
    assert tests, f"no promtool rule test under {RULE_TESTS} for {alert}"
    for path in tests:
        fires = yaml.safe_load(path.read_text())["tests"][0]["alert_rule_test"]
        assert any(case["alertname"] == alert and case["exp_alerts"] for case in fires), f"{path}: never fires"
        result = promtool("test", "rules", path.name, cwd=RULE_TESTS)
        assert result.returncode == 0, result.stdout + result.stderr
