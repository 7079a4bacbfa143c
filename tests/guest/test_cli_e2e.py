"""pclitectl end to end against a real pclited booting real VMs (issue 6's done-list), run in the lab by `make test`.

apply → get pools until the ready count is reached → run default -- echo hi → exec with stdin → logs → describe →
delete, with -o json/yaml parse-back at each step and the bad-input cases (unknown VM, wrong token). pclited starts as
on a user's first start: it writes ~/.config/pclite/config (HOME is a tmp dir) and pclitectl reads it, no flags.
"""

from __future__ import annotations

import json
import time

import pytest
import yaml

from guestbuild.cache import cache_root
from tests.support.artifacts import guest_artifacts
from tests.unit.test_cli_contract_stub import Cli, clean_env, start_pclited, stop_pclited

POOL_TARGET = 2
READY_TIMEOUT_S = 600  # cold boots in the emulated lab take seconds each
MANIFEST = f"""\
apiVersion: pclite/v1
kind: Flavor
metadata:
  name: default
spec:
  vcpus: 1
  memMib: 256
  pool: {{min: 1, target: {POOL_TARGET}}}
"""


@pytest.fixture(scope="module")
def cli(tmp_path_factory):
    guest_artifacts()  # built by `make test` before the guest tests; fails here with the fix if not
    home = tmp_path_factory.mktemp("cli-e2e")
    proc, config = start_pclited(home, cache=cache_root())
    try:
        cli = Cli(config["server"], config["token"], home)
        cli.env = clean_env(home)  # server and token come from the config pclited wrote
        yield cli
    finally:
        stop_pclited(proc)
        print((home / "pclited.log").read_text()[-4000:])


def out(result) -> str:
    return result.stdout.decode()


def wait_for_ready_pool(cli) -> dict:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        pools = json.loads(cli("get", "pools", "-o", "json").stdout)["items"]
        pool = next(p for p in pools if p["flavor"] == "default")
        if pool["ready"] >= POOL_TARGET:
            return pool
        assert time.monotonic() < deadline, f"pool never reached {POOL_TARGET} ready: {pool}\n" + out(
            cli("get", "vms", "-o", "wide"))
        time.sleep(1)


def test_cli_end_to_end_with_real_vms(cli):
    # apply, idempotently
    assert out(cli("apply", "-f", "-", stdin=MANIFEST)).splitlines() == ["flavor/default created"]
    assert out(cli("apply", "-f", "-", stdin=MANIFEST)).splitlines() == ["flavor/default unchanged"]

    # get pools until the ready count is reached; -o yaml parses back to the same objects
    pool = wait_for_ready_pool(cli)
    assert pool["state"] == "ok" and pool["target"] == POOL_TARGET
    pools_yaml = yaml.safe_load(cli("get", "pools", "-o", "yaml").stdout)
    assert pools_yaml["kind"] == "List" and pools_yaml["items"][0]["flavor"] == "default"
    table = out(cli("get", "pools")).splitlines()
    assert table[1].split()[:2] == ["default", f"{POOL_TARGET}/{POOL_TARGET}"]

    # run -- echo hi: a warm claim, the command's output and exit code, VM removed with --rm
    ran = cli("run", "--rm", "default", "--", "echo", "hi")
    assert ran.stdout == b"hi\n"
    assert cli("run", "--rm", "default", "--", "sh", "-c", "exit 7", ok=False).returncode == 7

    # claim one to keep; exec with stdin, exit codes, stderr
    vm_id = out(cli("run", "default", "-o", "name")).strip()
    assert vm_id
    payload = b"hello\nworld\n" + bytes(range(256))
    assert cli("exec", vm_id, "--", "cat", stdin=payload).stdout == payload
    wc = cli("exec", vm_id, "--", "wc", "-c", stdin=b"x" * 100_000)
    assert wc.stdout.split()[0] == b"100000"
    err = cli("exec", vm_id, "--", "sh", "-c", "echo oops >&2; exit 3", ok=False)
    assert err.returncode == 3 and err.stderr == b"oops\n" and err.stdout == b""
    uname = cli("exec", vm_id, "--", "uname", "-r")
    assert uname.stdout.strip()

    # logs: what the guest writes to its console shows up
    cli("exec", vm_id, "--", "sh", "-c", "echo pclitectl-e2e-marker > /dev/console")
    deadline = time.monotonic() + 30
    while b"pclitectl-e2e-marker" not in cli("logs", vm_id).stdout:
        assert time.monotonic() < deadline, "the console line never reached `pclitectl logs`"
        time.sleep(0.5)
    assert cli("logs", "--tail", "1", vm_id).stdout.strip()

    # describe: the boot timeline as a phase bar, and the events
    described = out(cli("describe", "vm", vm_id))
    assert f"ID:         {vm_id}" in described and "State:      claimed" in described
    assert "Boot timeline:" in described and "total " in described
    for phase in ("vmm_setup", "kernel", "init_to_agent"):
        assert phase in described
    assert "Events:" in described and "<none>" not in described.split("Events:")[1].splitlines()[0]
    assert "Pool:" in out(cli("describe", "flavor", "default"))

    # -o json / yaml parse back to the same VM
    as_json = json.loads(cli("get", "vm", vm_id, "-o", "json").stdout)
    assert as_json == yaml.safe_load(cli("get", "vm", vm_id, "-o", "yaml").stdout)
    assert as_json["state"] == "claimed" and as_json["boot_ms"]["total"] > 0
    assert {v["id"] for v in json.loads(cli("get", "vms", "--state", "claimed", "-o", "json").stdout)["items"]} >= {
        vm_id}

    # top: boot-phase percentiles from /metrics
    top = out(cli("top"))
    rows = [line.split() for line in top.splitlines() if line.startswith("default")]
    phases = {row[1]: int(row[2]) for row in rows if len(row) == 6}
    assert set(phases) == {"vmm_setup", "kernel", "init_to_agent", "total"} and phases["total"] >= POOL_TARGET

    # delete
    assert out(cli("delete", "vm", vm_id)).splitlines() == [f"vm/{vm_id} deleted"]
    state = json.loads(cli("get", "vm", vm_id, "-o", "json").stdout)["state"]
    assert state in ("stopping", "stopped")

    # bad input: one line, nonzero
    missing = cli("exec", "vm-doesnotexist", "--", "true", ok=False)
    assert missing.returncode == 1 and missing.stderr.decode().count("\n") == 1
    cli.env["PCLITE_TOKEN"] = "wrong"
    denied = cli("get", "pools", ok=False)
    assert denied.returncode == 1 and b"rejected the token" in denied.stderr
