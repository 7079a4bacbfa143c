"""pclitectl's VM verbs (run, exec, logs, describe vm, delete vm, get vms, top) as a subprocess against the contract
stub on 127.0.0.1: VMs cannot boot on this host, so the stub stands in for pclited's VM routes (see
test_cli_contract_stub.py). The same flow against a real pclited with real VMs is tests/guest/test_cli_e2e.py.
"""

from __future__ import annotations

import json
import subprocess
import time

import pytest
import yaml

from tests.unit.test_cli_contract_stub import Cli, ContractStub, pclitectl_argv, serve


@pytest.fixture
def stub() -> ContractStub:
    stub = ContractStub()
    stub.add_flavor("default", pool_target=2, pool_min=1)
    return stub


@pytest.fixture
def cli(stub, tmp_path):
    with serve(stub.app) as url:
        yield Cli(url, stub.token, tmp_path)


def lines(data: bytes) -> list[str]:
    return data.decode().splitlines()


def test_run_claims_a_warm_vm_runs_the_command_and_exits_with_its_code(cli, stub):
    warm = stub.add_vm("default")
    result = cli("run", "default", "--", "echo", "hi")
    assert result.stdout == b"hi\n"
    assert result.stderr == b""  # stdout/stderr carry only the command's output when not on a terminal
    assert stub.vms[warm["id"]]["state"] == "claimed"
    assert stub.exec_requests[-1]["argv"] == ["echo", "hi"]
    failed = cli("run", "default", "--", "fail", "7", ok=False)
    assert failed.returncode == 7 and failed.stderr == b"it failed\n"


def test_run_rm_deletes_the_vm_after_the_command(cli, stub):
    stub.add_vm("default")
    cli("run", "--rm", "default", "--", "echo", "bye")
    assert stub.vms == {}
    assert ("DELETE", "/v1/vms/vm0001abcd") in stub.requests


def test_run_without_a_command_prints_the_claimed_vm(cli, stub):
    stub.add_vm("default")
    assert lines(cli("run", "default").stdout) == ["vm/vm0001abcd claimed from pool default (hit)"]
    assert lines(cli("run", "default", "-o", "name").stdout) == ["vm0002abcd"]  # a miss: cold-booted
    doc = json.loads(cli("run", "default", "-o", "json").stdout)
    assert doc["claim"] == "miss" and doc["state"] == "claimed" and doc["flavor"] == "default"


def test_run_rm_without_command_and_no_wait_on_an_empty_pool(cli):
    usage = cli("run", "--rm", "default", ok=False)
    assert usage.returncode == 2 and b"--rm deletes the VM after its command" in usage.stderr
    empty = cli("run", "--no-wait", "default", ok=False)
    assert empty.returncode == 1
    assert lines(empty.stderr) == ["error: Service Unavailable: pool 'default' has no ready VM — retry in 2s (or drop "
                                   "--no-wait to wait for a VM)"]
    unknown = cli("run", "nope", "--", "true", ok=False)
    assert lines(unknown.stderr) == ['error: flavor "nope" not found — `pclitectl get flavors` lists them; '
                                     '`pclitectl apply -f FILE` creates one']


def test_exec_passes_piped_stdin_and_writes_bytes_to_the_right_streams(cli, stub):
    vm = stub.add_vm("default", "claimed")["id"]
    payload = bytes(range(256)) * 3
    assert cli("exec", vm, "--", "cat", stdin=payload).stdout == payload
    binary = cli("exec", vm, "--", "binary")
    assert binary.stdout == bytes(range(256))
    assert binary.stderr == b"\xff\xfe err\n"
    # -n never passes stdin; with stdin at /dev/null nothing is sent unless -i asks for it
    assert cli("exec", "-n", vm, "--", "cat", stdin=b"ignored").stdout == b""
    assert "stdin_b64" not in stub.exec_requests[-1]
    cli("exec", vm, "--", "cat")
    assert "stdin_b64" not in stub.exec_requests[-1]
    cli("exec", "-i", vm, "--", "cat")
    assert stub.exec_requests[-1]["stdin_b64"] == ""


def test_exec_propagates_exit_codes_signals_and_timeouts(cli, stub):
    vm = stub.add_vm("default", "claimed")["id"]
    assert cli("exec", vm, "--", "fail", "3", ok=False).returncode == 3
    assert cli("exec", vm, "--", "kill", "9", ok=False).returncode == 128 + 9
    assert cli("exec", vm, "--", "nosuch", ok=False).returncode == 127
    slow = cli("exec", "--timeout", "1", vm, "--", "sleep", "5", ok=False)
    assert slow.returncode == 124
    assert lines(slow.stderr) == [f"pclitectl: the command timed out in vm/{vm} after 1s"]
    assert stub.exec_requests[-1]["timeout_s"] == 1.0


def test_exec_forwards_env_and_cwd_and_keeps_argv_intact(cli, stub):
    vm = stub.add_vm("default", "claimed")["id"]
    out = cli("exec", "-e", "A=1", "-e", "B=x=y", "--cwd", "/tmp", vm, "--", "env").stdout
    assert lines(out) == ["A=1", "B=x=y", "cwd=/tmp"]
    cli("exec", vm, "--", "echo", "-n", "--rm", "-i", "a b")
    assert stub.exec_requests[-1]["argv"] == ["echo", "-n", "--rm", "-i", "a b"]


def test_exec_usage_and_unknown_vm(cli):
    usage = cli("exec", "vm0001abcd", ok=False)
    assert usage.returncode == 2 and b"exec needs a command" in usage.stderr
    missing = cli("exec", "nope", "--", "true", ok=False)
    assert missing.returncode == 1
    assert lines(missing.stderr) == ['error: vm "nope" not found — `pclitectl get vms` lists them']


def test_exec_on_a_vm_that_is_not_claimed_says_why(cli, stub):
    vm = stub.add_vm("default", "ready")["id"]
    refused = cli("exec", vm, "--", "true", ok=False)
    assert refused.returncode == 1
    assert lines(refused.stderr) == [f"error: Conflict: VM '{vm}' is ready: claim it first (409)"]


def test_logs_prints_the_console_and_its_tail(cli, stub):
    vm = stub.add_vm("default", console="one\ntwo\nthree\n")["id"]
    assert cli("logs", vm).stdout == b"one\ntwo\nthree\n"
    assert cli("logs", "--tail", "1", vm).stdout == b"three\n"


def test_logs_follow_prints_new_output_until_the_vm_stops(cli, stub):
    vm = stub.add_vm("default", console="boot\n")["id"]
    proc = subprocess.Popen(pclitectl_argv() + ["logs", "-f", "--poll-interval", "0.1", vm], env=cli.env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        assert proc.stdout.readline() == b"boot\n"
        stub.consoles[vm] += "more\n"
        assert proc.stdout.readline() == b"more\n"
        stub.consoles[vm] += "bye\n"
        stub.vms[vm]["state"] = "stopped"
        out, err = proc.communicate(timeout=20)
    finally:
        proc.kill()
    assert out == b"bye\n" and proc.returncode == 0, err


def test_describe_vm_shows_the_boot_timeline_and_events(cli, stub):
    vm = stub.add_vm("default", boot_ms={"vmm_setup": 10.0, "kernel": 60.0, "init_to_agent": 30.0, "total": 100.0})
    out = cli("describe", "vm", vm["id"]).stdout.decode()
    assert f"ID:         {vm['id']}" in out and "State:      ready" in out
    bar = next(line for line in out.splitlines() if "total 100ms" in line)
    assert (bar.count("█"), bar.count("▓"), bar.count("▒")) == (5, 29, 14)
    assert "█ vmm_setup 10ms  ▓ kernel 60ms  ▒ init_to_agent 30ms" in out
    assert "created   VMM started" in out and "ready     agent answered after 100.0 ms" in out
    booting = stub.add_vm("default", "booting")["id"]
    assert "(no boot timeline: the VM has not reached its agent)" in cli("describe", "vm", booting).stdout.decode()


def test_delete_vms_goes_on_past_unknown_ids_and_exits_1(cli, stub):
    a, b = stub.add_vm("default")["id"], stub.add_vm("default")["id"]
    result = cli("delete", "vm", a, "nope", b, ok=False)
    assert result.returncode == 1
    assert lines(result.stdout) == [f"vm/{a} deleted", f"vm/{b} deleted"]
    assert lines(result.stderr) == ['error: vm "nope" not found — `pclitectl get vms` lists them']
    assert stub.vms == {}


def test_get_vms_tables_and_documents_parse_back(cli, stub):
    ready = stub.add_vm("default")
    stub.add_vm("default", "booting")
    table = lines(cli("get", "vms").stdout)
    assert table[0].split() == ["ID", "FLAVOR", "STATE", "BOOT", "AGE"]
    assert table[1].split()[:4] == [ready["id"], "default", "ready", "137ms"]
    assert lines(cli("get", "vms", "-o", "wide").stdout)[0].split()[5:] == [
        "SOURCE", "PID", "VMM-SETUP", "KERNEL", "INIT-TO-AGENT", "CLAIMED", "REASON"]
    assert lines(cli("get", "vms", "-o", "wide").stdout)[1].split()[5:7] == ["cold", str(ready["pid"])]
    listed = json.loads(cli("get", "vms", "-o", "json").stdout)
    assert listed["kind"] == "List" and [v["id"] for v in listed["items"]] == list(stub.vms)
    assert yaml.safe_load(cli("get", "vms", "-o", "yaml").stdout) == listed
    one = yaml.safe_load(cli("get", "vm", ready["id"], "-o", "yaml").stdout)
    assert one == {k: (v if k != "boot_ms" else ready["boot_ms"]) for k, v in ready.items()}
    booting = json.loads(cli("get", "vms", "--state", "booting", "-o", "json").stdout)["items"]
    assert [v["state"] for v in booting] == ["booting"]


def test_get_vms_watch_prints_changes(cli, stub):
    vm = stub.add_vm("default", "booting")["id"]
    proc = subprocess.Popen(pclitectl_argv() + ["get", "vms", "-w", "--watch-interval", "0.1"], env=cli.env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        assert proc.stdout.readline().split() == [b"ID", b"FLAVOR", b"STATE", b"BOOT", b"AGE"]
        assert proc.stdout.readline().split()[:3] == [vm.encode(), b"default", b"booting"]
        time.sleep(0.3)
        stub.vms[vm].update(state="ready", boot_ms={"vmm_setup": 1.0, "kernel": 2.0, "init_to_agent": 3.0,
                                                    "total": 6.0})
        assert proc.stdout.readline().split()[:4] == [vm.encode(), b"default", b"ready", b"6.0ms"]
        del stub.vms[vm]
        assert proc.stdout.readline().split()[:3] == [vm.encode(), b"default", b"DELETED"]
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_top_reads_pool_readiness_and_phase_percentiles_from_metrics(cli, stub):
    for _ in range(4):
        stub.add_vm("default", boot_ms={"vmm_setup": 7.0, "kernel": 70.0, "init_to_agent": 300.0, "total": 377.0})
    cli("run", "default", "--", "echo")  # a hit
    out = lines(cli("top").stdout)
    assert out[0] == "VMs: claimed 1, ready 3   claims p50 3.8ms p99 5.0ms   VMM crashes: 0"
    pool = next(line.split() for line in out if line.startswith("default") and "ok" in line)
    assert pool == ["default", "3/2", "0", "1", "ok", "1", "100%", "3.8ms", "5.0ms"]
    phases = {line.split()[1]: line.split()[2:] for line in out if line.startswith("default") and "ok" not in line}
    # kernel: 4 observations of 70 ms in the (50, 100] ms bucket: p50 = 50 + 50 * 2/4
    assert phases["kernel"] == ["4", "75ms", "95ms", "100ms"]  # p99 99.5 ms, shown to the ms
    # init_to_agent: all in (250, 500] ms
    assert phases["init_to_agent"][:2] == ["4", "375ms"]
    assert list(phases) == ["vmm_setup", "kernel", "init_to_agent", "total"]


def test_completion_scripts_and_dynamic_names(cli, stub):
    for shell, marker in (("bash", "complete -o nosort -F"), ("zsh", "#compdef pclitectl"),
                          ("fish", "complete --no-files --command pclitectl")):
        script = cli("completion", shell).stdout.decode()
        assert marker in script and "_PCLITECTL_COMPLETE" in script, shell
    vm = stub.add_vm("default")["id"]
    env = {**cli.env, "_PCLITECTL_COMPLETE": "bash_complete", "COMP_WORDS": "pclitectl exec vm", "COMP_CWORD": "2"}
    done = subprocess.run(pclitectl_argv(), env=env, capture_output=True, timeout=30)
    assert done.stdout.decode().split() == [f"plain,{vm}"]
    env |= {"COMP_WORDS": "pclitectl run d", "COMP_CWORD": "2"}
    done = subprocess.run(pclitectl_argv(), env=env, capture_output=True, timeout=30)
    assert done.stdout.decode().split() == ["plain,default"]
