"""apply / get / describe / scale / delete for flavors and pools, through the real pclitectl, against both the real
pclited (`pclited serve` in a tmp dir, as a user's first start: it writes the client config pclitectl then reads)
and the contract stub. On this host no VM boots: pclited is given an empty artifact cache, so each boot fails at
once ("kernel not built") without starting a VMM, and its pools read `degraded` — the CLI paths are what is tested.
"""

from __future__ import annotations

import json

import pytest
import yaml

from tests.unit.test_cli_contract_stub import Cli, ContractStub, clean_env, serve, start_pclited, stop_pclited

FLAVORS = """\
apiVersion: pclite/v1
kind: Flavor
metadata:
  name: default
spec:
  vcpus: 1
  memMib: 256
  pool: {min: 1, target: 2}
  maxAgeSeconds: 600
---
apiVersion: pclite/v1
kind: Flavor
metadata:
  name: small
spec:
  memMib: 128
  cmdlineExtra: quiet
"""


@pytest.fixture(params=["pclited", "stub"])
def cli(request, tmp_path):
    if request.param == "stub":
        stub = ContractStub()
        with serve(stub.app) as url:
            yield Cli(url, stub.token, tmp_path)
        return
    proc, config = start_pclited(tmp_path, cache=tmp_path / "empty-cache")
    try:
        cli = Cli(config["server"], config["token"], tmp_path)
        cli.env = clean_env(tmp_path)  # no PCLITE_SERVER/PCLITE_TOKEN: pclitectl reads what pclited wrote
        yield cli
    finally:
        stop_pclited(proc)


def out(result) -> list[str]:
    return result.stdout.decode().splitlines()


def test_apply_is_idempotent_and_says_created_configured_unchanged(cli, tmp_path):
    path = tmp_path / "flavors.yaml"
    path.write_text(FLAVORS)
    assert out(cli("apply", "-f", str(path))) == ["flavor/default created", "flavor/small created"]
    assert out(cli("apply", "-f", str(path))) == ["flavor/default unchanged", "flavor/small unchanged"]
    path.write_text(FLAVORS.replace("memMib: 128", "memMib: 192"))
    assert out(cli("apply", "--dry-run", "-f", str(path))) == ["flavor/default unchanged (dry run)",
                                                               "flavor/small configured (dry run)"]
    assert out(cli("apply", "-f", str(path))) == ["flavor/default unchanged", "flavor/small configured"]
    small = json.loads(cli("get", "flavor", "small", "-o", "json").stdout)
    assert small["spec"]["memMib"] == 192 and small["spec"]["cmdlineExtra"] == "quiet"
    # stdin, and several -f
    other = tmp_path / "tiny.yaml"
    other.write_text("apiVersion: pclite/v1\nkind: Flavor\nmetadata: {name: tiny}\nspec: {memMib: 64}\n")
    assert out(cli("apply", "-f", "-", "-f", str(other), stdin=FLAVORS)) == [
        "flavor/default unchanged", "flavor/small configured", "flavor/tiny created"]


def test_get_flavors_table_and_documents_parse_back(cli):
    cli("apply", "-f", "-", stdin=FLAVORS)
    table = out(cli("get", "flavors"))
    assert table[0].split() == ["NAME", "VCPUS", "MEMORY", "POOL-MIN", "POOL-TARGET", "MAX-AGE", "AGE"]
    assert table[1].split()[:6] == ["default", "1", "256Mi", "1", "2", "600s"]
    assert out(cli("get", "flavors", "-o", "wide"))[0].split()[-5:] == ["CLONE", "TEMPLATE", "KERNEL", "INITRD",
                                                                        "CMDLINE-EXTRA"]
    listed = json.loads(cli("get", "flavors", "-o", "json").stdout)
    assert listed["apiVersion"] == "pclite/v1" and listed["kind"] == "List"
    by_name = {doc["metadata"]["name"]: doc for doc in listed["items"]}
    assert by_name["default"]["kind"] == "Flavor"
    assert by_name["default"]["spec"] | {"kernel": None, "initrd": None, "clone": True} == {
        "kernel": None, "initrd": None, "cmdlineExtra": "", "vcpus": 1, "memMib": 256, "maxAgeSeconds": 600,
        "clone": True, "pool": {"min": 1, "target": 2}}
    as_yaml = yaml.safe_load(cli("get", "flavors", "-o", "yaml").stdout)
    for doc in (*as_yaml["items"], *listed["items"]):  # the template's state is live: it may move in between
        doc.get("status", {}).pop("template", None)
    assert as_yaml == listed


def test_a_flavor_printed_as_yaml_applies_back_unchanged(cli):
    cli("apply", "-f", "-", stdin=FLAVORS)
    doc = cli("get", "flavor", "default", "-o", "yaml").stdout
    assert out(cli("apply", "-f", "-", stdin=doc)) == ["flavor/default unchanged"]
    edited = yaml.safe_load(doc)
    edited["spec"]["vcpus"] = 2
    assert out(cli("apply", "-f", "-", stdin=yaml.safe_dump(edited))) == ["flavor/default configured"]


def test_pools_scale_and_parse_back(cli):
    cli("apply", "-f", "-", stdin=FLAVORS)
    pools = json.loads(cli("get", "pools", "-o", "json").stdout)["items"]
    assert {p["flavor"]: (p["target"], p["min"]) for p in pools} == {"default": (2, 1), "small": (1, 0)}
    assert set(pools[0]) >= {"flavor", "target", "min", "ready", "booting", "claimed", "state", "reason"}
    assert out(cli("scale", "pool", "small", "--target", "3")) == ["pool/small scaled (target 1 → 3)"]
    assert out(cli("scale", "pool", "small", "--target", "3")) == ["pool/small unchanged (target 3)"]
    one = yaml.safe_load(cli("get", "pool", "small", "-o", "yaml").stdout)
    assert one["flavor"] == "small" and one["target"] == 3
    table = out(cli("get", "pools"))
    assert table[0].split() == ["FLAVOR", "READY", "BOOTING", "CLAIMED", "MIN", "STATE"]
    assert [row.split()[:2] for row in table[1:]] == [["default", f"{pools[0]['ready']}/2"], ["small", "0/3"]]
    assert json.loads(cli("get", "flavor", "small", "-o", "json").stdout)["spec"]["pool"]["target"] == 3


def test_describe_and_delete_a_flavor(cli):
    cli("apply", "-f", "-", stdin=FLAVORS)
    text = cli("describe", "flavor", "small").stdout.decode()
    for expected in ("Name:          small", "Cmdline extra: quiet", "Memory:        128 MiB", "Pool:",
                     "  Ready:   0/1"):
        assert expected in text, text
    assert out(cli("delete", "flavor", "small")) == ["flavor/small deleted"]
    assert [d["metadata"]["name"] for d in json.loads(cli("get", "flavors", "-o", "json").stdout)["items"]] == [
        "default"]


def test_version_shows_client_and_server(cli):
    lines = out(cli("version"))
    assert lines[0].startswith("Client Version: ") and lines[1].startswith("Server Version: ")
    doc = json.loads(cli("version", "-o", "json").stdout)
    assert set(doc) == {"client", "server"} and doc["server"]["version"]


def test_top_without_boots(cli):
    cli("apply", "-f", "-", stdin=FLAVORS)
    lines = out(cli("top"))
    assert lines[0].startswith("VMs: ")
    assert any(line.split()[:1] == ["default"] for line in lines)
    assert lines[-1] == "No boots measured yet."
