"""kubectl's conventions in pclitectl (issue 16), as a subprocess against a real pclited on 127.0.0.1 (flavors,
pools, contexts, apply, dry runs) and against the contract stub where a VM must be in a given state (VMs cannot
boot on this host): TYPE/NAME, global flags anywhere, -o name|jsonpath, --no-headers, wait, contexts, apply -f DIR.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time

import pytest
import yaml

from service.cli.main import hoist_global_options
from tests.unit.test_cli_contract_stub import (
    Cli,
    ContractStub,
    clean_env,
    pclitectl_argv,
    serve,
    start_pclited,
    stop_pclited,
)

FLAVOR = "apiVersion: pclite/v1\nkind: Flavor\nmetadata: {{name: {name}}}\nspec: {spec}\n"


@pytest.fixture(scope="module")
def pclited(tmp_path_factory):
    home = tmp_path_factory.mktemp("pclited")
    proc, config = start_pclited(home, cache=home / "empty-cache")
    try:
        yield config, home
    finally:
        stop_pclited(proc)


@pytest.fixture
def cli(pclited, tmp_path):
    config, _home = pclited
    cli = Cli(config["server"], config["token"], tmp_path)
    yield cli
    names = cli("get", "flavors", "-o", "name").stdout.decode().split()
    if names:
        cli("delete", *names)


@pytest.fixture
def stub_cli(tmp_path):
    stub = ContractStub()
    stub.add_flavor("default")
    with serve(stub.app) as url:
        yield stub, Cli(url, stub.token, tmp_path)


def lines(result) -> list[str]:
    return result.stdout.decode().splitlines()


def apply_flavors(cli, *names_and_specs: tuple[str, str]) -> None:
    text = "---\n".join(FLAVOR.format(name=name, spec=spec) for name, spec in names_and_specs)
    cli("apply", "-f", "-", stdin=text)


# -- TYPE/NAME ---------------------------------------------------------------------------------------------------

def test_type_slash_name_works_wherever_a_name_goes(cli):
    apply_flavors(cli, ("small", "{memMib: 128}"), ("big", "{memMib: 512}"))
    assert lines(cli("get", "flavor/small", "-o", "name")) == ["flavor/small"]
    assert json.loads(cli("get", "flavors/big", "-o", "json").stdout)["spec"]["memMib"] == 512
    described = cli("describe", "flavor/small").stdout.decode()
    assert "Name:" in described and "small" in described and "128 MiB" in described
    assert lines(cli("get", "pool/small", "--no-headers"))[0].split()[0] == "small"
    assert lines(cli("delete", "flavor/small", "flavor/big")) == ["flavor/small deleted", "flavor/big deleted"]
    assert cli("get", "flavors", "-o", "name").stdout == b""
    missing = cli("describe", "vm/vm-nope", ok=False)  # a pclitectl error (1), no longer bad usage (2)
    assert missing.returncode == 1 and len(missing.stderr.splitlines()) == 1 and b"vm-nope" in missing.stderr
    for argv in (["describe", "widget/x"], ["delete", "vm/a", "b"], ["describe", "vm/"], ["get", "vm/a", "vm/b"]):
        bad = cli(*argv, ok=False)
        assert bad.returncode == 2 and b"Traceback" not in bad.stderr, argv


def test_vm_verbs_take_vm_slash_id(stub_cli):
    stub, cli = stub_cli
    vm = stub.add_vm("default", console="hello from the console\n")
    ref = f"vm/{vm['id']}"
    assert lines(cli("get", ref, "-o", "name")) == [ref]
    assert vm["id"] in cli("describe", ref).stdout.decode()
    assert cli("logs", ref).stdout == b"hello from the console\n"
    assert lines(cli("get", "vms", "-o", "name")) == [ref]
    assert lines(cli("delete", ref)) == [f"{ref} deleted"]
    assert vm["id"] not in stub.vms
    assert cli("logs", "flavor/default", ok=False).returncode == 2


# -- global flags anywhere ---------------------------------------------------------------------------------------

def test_global_flags_work_after_the_verb(pclited, tmp_path):
    config, _home = pclited
    nobody = Cli("http://127.0.0.1:9", "wrong", tmp_path)
    nobody.env = clean_env(tmp_path)  # no env, no config file: only the flags can reach pclited
    assert lines(nobody("get", "pools", "--server", config["server"], "--token", config["token"])) == []
    assert nobody("get", "--server=" + config["server"], "flavors", "--token=" + config["token"]).returncode == 0
    refused = nobody("get", "pools", "--server", config["server"], "--token", "wrong-token", ok=False)
    assert refused.returncode == 1 and b"Traceback" not in refused.stderr
    assert nobody("get", "pools", "--server", ok=False).returncode == 2  # the flag's value is missing


def test_hoisting_leaves_the_guest_command_alone():
    assert hoist_global_options(["exec", "vm-1", "--server", "s", "--", "echo", "--token", "t"]) == [
        "--server", "s", "exec", "vm-1", "--", "echo", "--token", "t"]
    assert hoist_global_options(["get", "vms", "--context=a", "-o", "name"]) == ["--context=a", "get", "vms", "-o",
                                                                                  "name"]


# -- -o name, -o jsonpath, --no-headers --------------------------------------------------------------------------

def test_output_name_jsonpath_and_no_headers(cli):
    apply_flavors(cli, ("alpha", "{memMib: 128, vcpus: 2}"), ("beta", "{}"))
    assert lines(cli("get", "flavors", "-o", "name")) == ["flavor/alpha", "flavor/beta"]
    assert lines(cli("get", "pools", "-o", "name")) == ["pool/alpha", "pool/beta"]
    got = cli("get", "flavors", "-o", "jsonpath={.items[*].metadata.name}").stdout
    assert got == b"alpha beta"  # as kubectl: no newline unless the template asks for one
    got = cli("get", "flavor", "alpha", "-o", 'jsonpath={.spec.memMib}/{.spec.vcpus}{"\\n"}').stdout
    assert got == b"128/2\n"
    assert cli("get", "flavors", "-o", "jsonpath={.items[-1].metadata.name}").stdout == b"beta"
    table = lines(cli("get", "flavors", "--no-headers"))
    assert [row.split()[0] for row in table] == ["alpha", "beta"]
    assert lines(cli("get", "flavors", "-o", "wide", "--no-headers"))[0].split()[0] == "alpha"
    for fmt in ("jsonpath={.items[?(@.x)]}", "jsonpath={.items", "jsonpath={range .items[*]}", "xml"):
        bad = cli("get", "flavors", "-o", fmt, ok=False)
        assert bad.returncode == 2 and len(bad.stderr.splitlines()) == 1, fmt


# -- wait --------------------------------------------------------------------------------------------------------

def test_wait_for_ready_delete_and_timeout(stub_cli):
    stub, cli = stub_cli
    vm = stub.add_vm("default", state="booting")
    ref = f"vm/{vm['id']}"
    threading.Timer(1.0, lambda: vm.update(state="ready")).start()
    started = time.monotonic()
    assert lines(cli("wait", "--for=condition=Ready", ref, "--timeout=20s")) == [f"{ref} condition met"]
    assert 0.9 < time.monotonic() - started < 15

    threading.Timer(1.0, lambda: stub.vms.pop(vm["id"])).start()
    assert lines(cli("wait", "--for", "delete", ref, "--timeout", "20s")) == [f"{ref} condition met"]
    assert lines(cli("wait", "--for=delete", "vm/never-was", "--timeout=0")) == ["vm/never-was condition met"]

    slow = stub.add_vm("default", state="booting")
    started = time.monotonic()
    timed_out = cli("wait", "--for=condition=Ready", f"vm/{slow['id']}", "--timeout=1s", ok=False)
    assert timed_out.returncode == 1 and timed_out.stdout == b""
    assert timed_out.stderr.decode().splitlines() == [f"error: timed out waiting for the condition on vm/{slow['id']}"]
    assert 0.9 < time.monotonic() - started < 10
    slow.update(state="failed", failure_reason="kernel not built")
    failed = cli("wait", "--for=condition=Ready", f"vm/{slow['id']}", "--timeout=30s", ok=False)
    assert failed.returncode == 1 and b"will not become Ready" in failed.stderr  # at once, not after 30 s
    missing = cli("wait", "--for=condition=Ready", "vm/nope", ok=False)
    assert missing.returncode == 1 and len(missing.stderr.splitlines()) == 1
    for argv in (["--for=condition=Alive", ref], ["--for=delete", ref, "--timeout=soon"], ["vm/x"],
                 ["--for=delete", "flavor/default"]):
        assert cli("wait", *argv, ok=False).returncode == 2, argv


# -- contexts ----------------------------------------------------------------------------------------------------

def test_contexts_pick_the_server_and_the_runtime_reads_the_current_one(pclited, stub_cli, tmp_path):
    config, _home = pclited
    stub, stub_client = stub_cli
    stub_url = stub_client.url
    path = tmp_path / "cfg" / "config"
    path.parent.mkdir()
    path.write_text(f"server: {config['server']}\ntoken: {config['token']}\n")  # as pclited writes it
    cli = Cli("", "", tmp_path)
    cli.env = clean_env(tmp_path, PCLITE_CONFIG=str(path))
    assert cli("config", "current-context", ok=False).returncode == 1
    assert lines(cli("config", "set-context", "node-b", "--server", stub_url, "--token", stub.token)) == [
        'Context "node-b" created.']
    # the flat file's settings became context "default", still the current one
    assert lines(cli("config", "current-context")) == ["default"]
    assert [row.split() for row in lines(cli("config", "get-contexts"))] == [
        ["CURRENT", "NAME", "SERVER"], ["*", "default", config["server"]], ["node-b", stub_url]]
    assert lines(cli("get", "flavors", "-o", "name")) == []  # pclited: no flavors yet
    assert lines(cli("get", "flavors", "-o", "name", "--context", "node-b")) == ["flavor/default"]  # the stub
    assert lines(cli("config", "use-context", "node-b")) == ['Switched to context "node-b".']
    assert lines(cli("get", "flavors", "-o", "name")) == ["flavor/default"]
    assert path.stat().st_mode & 0o077 == 0

    view = cli("config", "view").stdout.decode()
    assert config["token"] not in view and stub.token not in view and "REDACTED" in view
    assert yaml.safe_load(view)["current-context"] == "node-b"
    assert stub.token in cli("config", "view", "--raw").stdout.decode()

    # pclite-runtime's reader (no YAML) gets the current context's server and token from the same file
    probe = ("from service import clientconfig; s = clientconfig.resolve(); print(s.server, s.token); "
             "import sys; assert 'yaml' not in sys.modules")
    env = clean_env(tmp_path, PCLITE_CONFIG=str(path))
    done = subprocess.run([pclitectl_argv()[0].rsplit("/", 1)[0] + "/python", "-c", probe], env=env,
                          capture_output=True, text=True, check=True)
    assert done.stdout.split() == [stub_url, stub.token]
    cli("config", "use-context", "default")
    done = subprocess.run([pclitectl_argv()[0].rsplit("/", 1)[0] + "/python", "-c", probe], env=env,
                          capture_output=True, text=True, check=True)
    assert done.stdout.split() == [config["server"], config["token"]]

    unknown = cli("config", "use-context", "nope", ok=False)
    assert unknown.returncode == 1 and len(unknown.stderr.splitlines()) == 1
    assert cli("get", "pools", "--context", "nope", ok=False).returncode == 1
    assert cli("config", "set-context", "new-one", ok=False).returncode == 2  # a new context needs --server
    assert lines(cli("config", "set-context", "node-b", "--token", "rotated")) == ['Context "node-b" modified.']
    assert yaml.safe_load(path.read_text())["contexts"][1] == {"name": "node-b", "server": stub_url,
                                                               "token": "rotated"}


# -- apply -------------------------------------------------------------------------------------------------------

def test_apply_dir_resets_removed_fields_and_dry_runs(cli, tmp_path):
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    (manifests / "a.yaml").write_text(FLAVOR.format(name="a", spec="{memMib: 128, vcpus: 2, cmdlineExtra: quiet}"))
    (manifests / "b.yml").write_text(FLAVOR.format(name="b", spec="{}"))
    (manifests / "c.json").write_text(json.dumps({"apiVersion": "pclite/v1", "kind": "Flavor",
                                                  "metadata": {"name": "c"}, "spec": {"memMib": 64}}))
    (manifests / "notes.txt").write_text("not a manifest")
    assert lines(cli("apply", "-f", str(manifests))) == ["flavor/a created", "flavor/b created", "flavor/c created"]
    assert lines(cli("apply", "-f", str(manifests))) == ["flavor/a unchanged", "flavor/b unchanged",
                                                         "flavor/c unchanged"]

    # a field removed from the manifest goes back to its default (kubectl's apply), not kept
    (manifests / "a.yaml").write_text(FLAVOR.format(name="a", spec="{memMib: 128}"))
    assert lines(cli("apply", "-f", str(manifests / "a.yaml"))) == ["flavor/a configured"]
    spec = json.loads(cli("get", "flavor/a", "-o", "json").stdout)["spec"]
    assert (spec["memMib"], spec["vcpus"], spec["cmdlineExtra"]) == (128, 1, "")

    # --dry-run=server: pclited checks, nothing is written
    (manifests / "a.yaml").write_text(FLAVOR.format(name="a", spec="{memMib: 192}"))
    (manifests / "d.yaml").write_text(FLAVOR.format(name="d", spec="{}"))
    assert lines(cli("apply", "--dry-run=server", "-f", str(manifests))) == [
        "flavor/a configured (server dry run)", "flavor/b unchanged (server dry run)",
        "flavor/c unchanged (server dry run)", "flavor/d created (server dry run)"]
    assert json.loads(cli("get", "flavor/a", "-o", "json").stdout)["spec"]["memMib"] == 128
    assert cli("get", "flavor/d", ok=False).returncode == 1
    assert lines(cli("apply", "--dry-run", "-f", str(manifests / "d.yaml"))) == ["flavor/d created (dry run)"]
    assert lines(cli("apply", "--dry-run=client", "-f", str(manifests / "a.yaml"))) == [
        "flavor/a configured (dry run)"]
    # what only pclited knows (the kernel path is not on its host) fails a server dry run, not a client one
    (manifests / "a.yaml").write_text(FLAVOR.format(name="a", spec="{kernel: /nonexistent/vmlinux}"))
    refused = cli("apply", "--dry-run=server", "-f", str(manifests / "a.yaml"), ok=False)
    assert refused.returncode == 1 and b"/nonexistent/vmlinux" in refused.stderr
    assert len(refused.stderr.splitlines()) == 1
    assert cli("apply", "--dry-run=client", "-f", str(manifests / "a.yaml")).returncode == 0
    assert json.loads(cli("get", "flavor/a", "-o", "json").stdout)["spec"].get("kernel") is None
    assert cli("apply", "--dry-run=maybe", "-f", str(manifests), ok=False).returncode == 2

    empty = tmp_path / "empty"
    empty.mkdir()
    nothing = cli("apply", "-f", str(empty), ok=False)
    assert nothing.returncode == 1 and b"no *.yaml" in nothing.stderr


def test_cli_defaults_are_pclited_defaults():
    from service.cli.manifest import DEFAULTS
    from service.schemas import FlavorSpec

    assert {k: v for k, v in FlavorSpec().model_dump().items() if k != "name"} == DEFAULTS


def test_flavor_routes_dry_run_writes_nothing(pclited, cli):
    import httpx

    config, _home = pclited
    headers = {"Authorization": f"Bearer {config['token']}"}
    with httpx.Client(base_url=config["server"], headers=headers, timeout=30) as http:
        made = http.post("/v1/flavors", params={"dry_run": "true"}, json={"name": "dry", "mem_mib": 128})
        assert made.status_code == 201 and made.json()["mem_mib"] == 128
        assert http.put("/v1/flavors/dry", params={"dry_run": "true"}, json={}).status_code == 201
        assert http.get("/v1/flavors/dry").status_code == 404
        assert http.post("/v1/flavors", json={"name": "dry", "mem_mib": 128}).status_code == 201
        spec = lambda: {k: v for k, v in http.get("/v1/flavors/dry").json().items() if k != "template"}  # noqa: E731
        before = spec()
        assert http.patch("/v1/flavors/dry", params={"dry_run": "true"}, json={"vcpus": 2}).json()["vcpus"] == 2
        assert http.put("/v1/flavors/dry", params={"dry_run": "true"}, json={"vcpus": 3}).json()["vcpus"] == 3
        assert http.patch("/v1/flavors/dry", params={"dry_run": "true"},
                          json={"pool_min": 5, "pool_target": 1}).status_code == 422
        assert spec() == before  # the template's state moves on its own; the spec must not


def test_watch_with_output_name(stub_cli):
    stub, cli = stub_cli
    first = stub.add_vm("default", state="booting")["id"]
    proc = subprocess.Popen(pclitectl_argv() + ["get", "vms", "-w", "-o", "name", "--watch-interval", "0.1"],
                            env=cli.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        assert proc.stdout.readline() == f"vm/{first}\n".encode()
        stub.vms[first].update(state="ready")
        assert proc.stdout.readline() == f"vm/{first}\n".encode()
    finally:
        proc.terminate()
        proc.wait(timeout=10)
