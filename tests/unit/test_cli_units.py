"""pclitectl's pure parts: manifest checks (with file:line), PromQL-style quantiles, console follow, formatting."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from service.cli import manifest, output, promtext
from service.cli.commands.logs import new_part
from service.cli.errors import CliError

GOOD = """\
apiVersion: pclite/v1
kind: Flavor
metadata:
  name: default
spec:
  vcpus: 2
  memMib: 256
  cmdlineExtra: "quiet"
  pool: {min: 1, target: 2}
  maxAgeSeconds: 600
---
# a second document, only a name: the server's defaults apply
apiVersion: pclite/v1
kind: Flavor
metadata:
  name: tiny
"""


def test_manifest_maps_spec_to_api_fields_across_documents():
    flavors = manifest.parse(GOOD, "f.yaml")
    assert [f.name for f in flavors] == ["default", "tiny"]
    assert flavors[0].body == {"vcpus": 2, "mem_mib": 256, "cmdline_extra": "quiet", "pool_min": 1,
                               "pool_target": 2, "max_age_s": 600}
    assert flavors[1].body == {}
    assert flavors[1].source == "f.yaml: document 2"


@pytest.mark.parametrize(("text", "expected"), [
    ("apiVersion: pclite/v1\nkind: Flavor\nmetadata:\n  name: a\nspec:\n  vcpus: two\n",
     "f.yaml:6: document 1 (flavor/a): spec.vcpus: must be an integer, got str 'two'"),
    ("apiVersion: pclite/v1\nkind: Flavor\nmetadata:\n  name: a\nspec:\n  memMIB: 256\n",
     "f.yaml:6: document 1 (flavor/a): spec.memMIB: unknown field"),
    ("apiVersion: pclite/v2\nkind: Flavor\nmetadata: {name: a}\n", "f.yaml:1: document 1 (flavor/a): apiVersion: "
                                                                    "must be 'pclite/v1', got 'pclite/v2'"),
    ("apiVersion: pclite/v1\nkind: Pod\nmetadata: {name: a}\n", "kind: must be 'Flavor'"),
    ("apiVersion: pclite/v1\nkind: Flavor\nmetadata: {}\n", "f.yaml:3: document 1: metadata.name: is required"),
    ("apiVersion: pclite/v1\nkind: Flavor\nmetadata: {name: Big_One}\n", "metadata.name: 'Big_One' is not a valid"),
    ("apiVersion: pclite/v1\nkind: Flavor\nmetadata: {name: a}\nspec:\n  pool: {min: 3, target: 1}\n",
     "f.yaml:5: document 1 (flavor/a): spec.pool.min: must be <= pool.target (3 > 1)"),
    ("apiVersion: pclite/v1\nkind: Flavor\nmetadata: {name: a}\nspec:\n  pool: 2\n",
     "spec.pool: must be a mapping"),
    ("apiVersion: pclite/v1\nkind: Flavor\nmetadata: {name: a}\nspec:\n  memMib: 8\n", "spec.memMib: must be >= 64"),
    ("apiVersion: pclite/v1\nkind: Flavor\nmetadata: {name: a}\nspec:\n  vcpus: true\n",
     "spec.vcpus: must be an integer, got bool True"),
    ("- just\n- a list\n", "document 1: a manifest must be a mapping"),
    ("apiVersion: pclite/v1\nkind: Flavor\nmetadata: {name: a\n", "f.yaml:4: not valid YAML"),
    ("", "f.yaml: no manifests in it"),
    ("---\n# only comments\n", "f.yaml: no manifests in it"),
    ("apiVersion: pclite/v1\nkind: Flavor\nmetadata: {name: a}\n---\napiVersion: pclite/v1\nkind: Flavor\n"
     "metadata: {name: a}\n", "f.yaml: document 2: flavor/a is already defined in f.yaml: document 1"),
])
def test_malformed_manifests_name_file_line_and_field(text, expected):
    with pytest.raises(CliError) as caught:
        manifest.parse(text, "f.yaml")
    assert expected in caught.value.message
    assert "\n" not in caught.value.message


def test_a_flavor_round_trips_through_its_manifest():
    flavor = {"name": "default", "kernel": None, "initrd": "/srv/initrd", "cmdline_extra": "", "vcpus": 1,
              "mem_mib": 256, "pool_min": 0, "pool_target": 2, "max_age_s": 0, "created_at": "2026-01-01T00:00:00Z",
              "updated_at": "2026-01-02T00:00:00Z"}
    import yaml

    parsed = manifest.parse(yaml.safe_dump(manifest.to_manifest(flavor)), "-")[0]
    assert parsed.name == "default"
    assert manifest.changed_fields(flavor, parsed.body) == {}
    assert manifest.changed_fields(flavor, {**parsed.body, "vcpus": 2}) == {"vcpus": 2}


def test_server_messages_are_translated_to_manifest_fields():
    assert manifest.in_manifest_terms("mem_mib: must be >= 64; pool_target too big") == \
        "spec.memMib: must be >= 64; spec.pool.target too big"


def _histogram(values, buckets=(0.01, 0.05, 0.1, 0.5, 1.0)):
    registry = CollectorRegistry()
    hist = Histogram("pclite_boot_phase_seconds", "x", ["phase", "flavor"], buckets=buckets, registry=registry)
    for v in values:
        hist.labels("total", "default").observe(v)
    return promtext.parse(generate_latest(registry).decode())


def test_histogram_quantile_interpolates_like_promql():
    # 10 observations: 4 in (0, 0.01], 4 in (0.05, 0.1], 2 in (0.1, 0.5].
    samples = _histogram([0.005] * 4 + [0.07] * 4 + [0.3] * 2)
    buckets = promtext.buckets_by(samples, "pclite_boot_phase_seconds", ("flavor", "phase"))[
        (("flavor", "default"), ("phase", "total"))]
    assert buckets[-1] == (math.inf, 10.0)
    # rank 5 sits in (0.05, 0.1] holding cumulative 4..8: 0.05 + 0.05 * (5-4)/4
    assert promtext.histogram_quantile(0.5, buckets) == pytest.approx(0.0625)
    # rank 9 sits in (0.1, 0.5] holding 8..10: 0.1 + 0.4 * (9-8)/2
    assert promtext.histogram_quantile(0.9, buckets) == pytest.approx(0.3)
    # rank 2 in the first bucket interpolates from 0
    assert promtext.histogram_quantile(0.2, buckets) == pytest.approx(0.005)


def test_histogram_quantile_edges():
    assert promtext.histogram_quantile(0.5, []) is None
    assert promtext.histogram_quantile(0.5, [(0.1, 0.0), (math.inf, 0.0)]) is None
    # everything above the highest finite bound: PromQL answers that bound
    assert promtext.histogram_quantile(0.99, [(0.1, 0.0), (1.0, 0.0), (math.inf, 3.0)]) == 1.0
    assert promtext.histogram_quantile(0.5, [(0.1, 1.0)]) is None  # no +Inf bucket: not a histogram


def test_buckets_are_summed_over_labels_not_grouped_by():
    registry = CollectorRegistry()
    hist = Histogram("pclite_claim_seconds", "x", ["flavor", "result"], buckets=(0.01, 1.0), registry=registry)
    hist.labels("a", "hit").observe(0.005)
    hist.labels("a", "miss").observe(0.5)
    samples = promtext.parse(generate_latest(registry).decode())
    by_flavor = promtext.buckets_by(samples, "pclite_claim_seconds", ("flavor",))
    assert by_flavor[(("flavor", "a"),)] == [(0.01, 1.0), (1.0, 2.0), (math.inf, 2.0)]


@pytest.mark.parametrize(("seen", "current", "new"), [
    (b"", b"abc\n", b"abc\n"),
    (b"abc\n", b"abc\ndef\n", b"def\n"),
    (b"line1\nline2\n", b"line2\nline3\n", b"line3\n"),  # the window slid
    (b"old\n", b"totally\ndifferent\n", b"totally\ndifferent\n"),  # slid past everything seen
    (b"same\n", b"same\n", b""),
    (b"\xff\x00tail", b"tail\xfe\n", b"\xfe\n"),  # bytes, not text: a console can hold anything
])
def test_follow_prints_only_what_is_new(seen, current, new):
    assert new_part(seen, current) == new


def test_age_reads_like_kubectl():
    now = datetime(2026, 1, 10, tzinfo=UTC)
    ago = lambda **kw: (now - timedelta(**kw)).isoformat()  # noqa: E731
    assert output.age(ago(seconds=42), now) == "42s"
    assert output.age(ago(minutes=5, seconds=10), now) == "5m10s"
    assert output.age(ago(minutes=45), now) == "45m"
    assert output.age(ago(hours=5, minutes=3), now) == "5h3m"
    assert output.age(ago(days=3, hours=2), now) == "3d2h"
    assert output.age(None, now) == "<none>"
    assert output.age("2026-01-09T23:59:00Z", now) == "60s"


def test_phase_bar_segments_are_proportional_and_fill_the_width():
    bar, legend = output.phase_bar({"vmm_setup": 10, "kernel": 60, "init_to_agent": 30, "total": 100}, width=50)
    plain = bar.split("  total")[0]
    for glyph, n in (("█", 5), ("▓", 30), ("▒", 15)):
        assert plain.count(glyph) == n
    assert "total 100ms" in bar
    assert legend == "█ vmm_setup 10ms  ▓ kernel 60ms  ▒ init_to_agent 30ms"
    tiny = output.phase_bar({"vmm_setup": 0.1, "kernel": 99.8, "init_to_agent": 0.1, "total": 100}, width=20)[0]
    assert tiny.count("█") == 1 and tiny.count("▒") == 1  # a measured phase never vanishes
    assert output.phase_bar(None) == ["(no boot timeline: the VM has not reached its agent)"]


def test_durations():
    assert output.ms(137.0) == "137ms"
    assert output.ms(3.84) == "3.8ms"
    assert output.ms(12500) == "12.5s"
    assert output.seconds_as_ms(None) == "-"
