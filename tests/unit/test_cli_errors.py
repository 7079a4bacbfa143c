"""Bad input and bad days: every failure is one readable line on stderr, a nonzero exit, and never a traceback.

Server down, wrong or missing token, unknown VM, malformed manifests, a broken config file, a server that is not
pclited. The real pclitectl runs as a subprocess; the server is the contract stub on 127.0.0.1 (or nothing at all).
"""

from __future__ import annotations

import pytest
from fastapi import FastAPI
from fastapi.responses import HTMLResponse

from tests.unit.test_cli_contract_stub import Cli, ContractStub, clean_env, free_port, run_cli, serve

VERBS = [
    ("get", "vms"), ("get", "flavors", "-o", "json"), ("get", "pools"), ("describe", "vm", "x"),
    ("describe", "flavor", "x"), ("run", "default", "--", "true"), ("exec", "x", "--", "true"), ("logs", "x"),
    ("delete", "vm", "x"), ("scale", "pool", "x", "--target", "1"), ("top",), ("version",),
]


def one_error_line(result, *, code: int = 1) -> str:
    err = result.stderr.decode()
    assert result.returncode == code, (result.returncode, err, result.stdout)
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    return err.strip()


@pytest.fixture
def stub() -> ContractStub:
    stub = ContractStub()
    stub.add_flavor("default")
    return stub


@pytest.fixture
def cli(stub, tmp_path):
    with serve(stub.app) as url:
        yield Cli(url, stub.token, tmp_path)


@pytest.mark.parametrize("argv", VERBS, ids=lambda a: " ".join(a[:2]))
def test_server_down_says_where_and_what_to_do(argv, tmp_path):
    url = f"http://127.0.0.1:{free_port()}"
    result = run_cli(*argv, env=clean_env(tmp_path, PCLITE_SERVER=url, PCLITE_TOKEN="t"))
    assert one_error_line(result) == (f"error: cannot reach pclited at {url}: connection refused — is it running? "
                                      f"(`make run`)")


def test_server_down_with_the_default_url(tmp_path):
    result = run_cli("get", "pools", env=clean_env(tmp_path, PCLITE_SERVER=f"127.0.0.1:{free_port()}"))
    assert "cannot reach pclited at http://127.0.0.1:" in one_error_line(result)


@pytest.mark.parametrize("argv", [v for v in VERBS if v[0] != "version"] + [("apply", "-f", "-")],
                         ids=lambda a: " ".join(a[:2]))
def test_wrong_token_names_where_it_came_from(cli, argv):
    cli.env["PCLITE_TOKEN"] = "not-the-token"
    stdin = "apiVersion: pclite/v1\nkind: Flavor\nmetadata: {name: a}\n" if argv[0] == "apply" else None
    line = one_error_line(cli(*argv, stdin=stdin, ok=False))
    assert line.startswith(f"error: pclited at {cli.url} rejected the token from PCLITE_TOKEN (Unauthorized: "
                           "invalid token")
    assert "pass the right --token or PCLITE_TOKEN, or fix `token:` in" in line


def test_no_token_at_all(cli):
    del cli.env["PCLITE_TOKEN"]
    line = one_error_line(cli("get", "vms", ok=False))
    assert line == (f"error: pclited at {cli.url} needs a token and none is set — pass --token, set PCLITE_TOKEN, or "
                    f"put `token:` in {cli.home}/.config/pclite/config (pclited writes it on first start)")


def test_flags_beat_env_beat_the_config_file(cli, stub, tmp_path):
    config = tmp_path / ".config" / "pclite" / "config"
    config.parent.mkdir(parents=True)
    config.write_text(f"server: {cli.url}\ntoken: {stub.token}\n")
    env = clean_env(tmp_path)
    assert run_cli("get", "flavors", env=env).returncode == 0  # both from ~/.config/pclite/config
    wrong = run_cli("get", "flavors", env={**env, "PCLITE_TOKEN": "bad"})
    assert "rejected the token from PCLITE_TOKEN" in one_error_line(wrong)
    assert run_cli("--token", stub.token, "get", "flavors", env={**env, "PCLITE_TOKEN": "bad"}).returncode == 0
    elsewhere = run_cli("get", "flavors", env={**env, "PCLITE_SERVER": f"http://127.0.0.1:{free_port()}"})
    assert "cannot reach pclited" in one_error_line(elsewhere)
    assert run_cli("--server", cli.url, "get", "flavors",
                   env={**env, "PCLITE_SERVER": "http://127.0.0.1:1"}).returncode == 0
    # PCLITE_CONFIG points somewhere else; XDG_CONFIG_HOME moves the default, as pclited's writer does
    other = tmp_path / "other.yaml"
    other.write_text(f"server: {cli.url}\ntoken: bad\n")
    assert "rejected the token from " + str(other) in one_error_line(
        run_cli("get", "flavors", env={**env, "PCLITE_CONFIG": str(other)}))
    xdg = tmp_path / "xdg"
    (xdg / "pclite").mkdir(parents=True)
    (xdg / "pclite" / "config").write_text(f"server: {cli.url}\ntoken: {stub.token}\n")
    assert run_cli("get", "flavors", env={**clean_env(tmp_path / "nohome"), "XDG_CONFIG_HOME": str(xdg)}
                   ).returncode == 0


@pytest.mark.parametrize(("content", "expected"), [
    ("server: [unclosed\n", "is not valid YAML (line 2)"),  # where YAML noticed: the end of the file
    ("- a list\n", "must be a YAML mapping with `server:` and `token:` keys"),
    ("server: {a: 1}\n", "`server` must be a string"),
])
def test_a_broken_config_file_is_named(tmp_path, content, expected):
    config = tmp_path / "config"
    config.write_text(content)
    line = one_error_line(run_cli("get", "vms", env=clean_env(tmp_path, PCLITE_CONFIG=str(config))))
    assert line.startswith(f"error: the pclitectl config {config}") and expected in line


@pytest.mark.parametrize("argv", [("get", "vm", "nope"), ("get", "vms", "nope", "-o", "json"),
                                  ("describe", "vm", "nope"), ("exec", "nope", "--", "true"), ("logs", "nope"),
                                  ("logs", "-f", "nope"), ("delete", "vm", "nope")], ids=" ".join)
def test_unknown_vm(cli, argv):
    assert one_error_line(cli(*argv, ok=False)) == 'error: vm "nope" not found — `pclitectl get vms` lists them'


@pytest.mark.parametrize("argv", [("get", "flavor", "nope"), ("describe", "flavor", "nope"),
                                  ("delete", "flavor", "nope")], ids=" ".join)
def test_unknown_flavor(cli, argv):
    assert one_error_line(cli(*argv, ok=False)) == ('error: flavor "nope" not found — `pclitectl get flavors` lists '
                                                    'them; `pclitectl apply -f FILE` creates one')


def test_unknown_pool(cli):
    assert one_error_line(cli("scale", "pool", "nope", "--target", "3", ok=False)) == (
        'error: pool "nope" not found — `pclitectl get pools` lists them (one per flavor)')


def test_malformed_manifest_file_names_file_line_and_field_and_applies_nothing(cli, stub, tmp_path):
    path = tmp_path / "flavors.yaml"
    path.write_text("apiVersion: pclite/v1\nkind: Flavor\nmetadata:\n  name: good\nspec:\n  vcpus: 1\n---\n"
                    "apiVersion: pclite/v1\nkind: Flavor\nmetadata:\n  name: bad\nspec:\n  vcpus: 1\n"
                    "  memMb: 128\n")
    line = one_error_line(cli("apply", "-f", str(path), ok=False))
    assert line == (f"error: {path}:14: document 2 (flavor/bad): spec.memMb: unknown field (allowed here: "
                    f"clone, cmdlineExtra, initrd, kernel, maxAgeSeconds, memMib, pool, vcpus)")
    assert "good" not in stub.flavors  # checked before anything was sent
    assert not any(method == "POST" for method, _ in stub.requests)


def test_malformed_manifest_on_stdin_and_missing_files(cli):
    line = one_error_line(cli("apply", "-f", "-", stdin="apiVersion: pclite/v1\nkind: Flavor\nmetadata: {name: a}\n"
                                                       "spec:\n  pool: {target: many}\n", ok=False))
    assert line == "error: <stdin>:5: document 1 (flavor/a): spec.pool.target: must be an integer, got str 'many'"
    assert one_error_line(cli("apply", "-f", "/nonexistent.yaml", ok=False)) == (
        "error: /nonexistent.yaml: no such file — check the path given to -f")
    assert "not valid YAML" in one_error_line(cli("apply", "-f", "-", stdin="a: [\n", ok=False))


def test_server_side_refusal_names_the_manifest_field(cli, tmp_path):
    path = tmp_path / "f.yaml"
    path.write_text("apiVersion: pclite/v1\nkind: Flavor\nmetadata: {name: x}\nspec:\n  vcpus: 1\n")
    cli("apply", "-f", str(path))
    path.write_text("apiVersion: pclite/v1\nkind: Flavor\nmetadata: {name: x}\nspec:\n  memMib: 300000\n")
    line = one_error_line(cli("apply", "-f", str(path), ok=False))
    assert line == (f"error: {path}: document 1: flavor/x: Unprocessable Entity: spec.memMib: Input should be less "
                    f"than or equal to 262144 (422)")


def test_a_server_that_is_not_pclited(tmp_path):
    app = FastAPI()

    @app.get("/{path:path}")
    def page(path: str):
        return HTMLResponse("<html>hello</html>")

    with serve(app) as url:
        line = one_error_line(run_cli("get", "vms", env=clean_env(tmp_path, PCLITE_SERVER=url, PCLITE_TOKEN="t")))
    assert line == (f"error: pclited at {url} sent a non-JSON answer to GET /v1/vms: '<html>hello</html>' — is "
                    f"--server pointing at pclited?")


def test_bad_usage_exits_2(cli):
    result = cli("get", "widgets", ok=False)
    assert result.returncode == 2 and b"Traceback" not in result.stderr
    assert b"'widgets' is not one of 'vm', 'vms', 'flavor', 'flavors', 'pool', 'pools'" in result.stderr
    assert cli("scale", "pool", "default", ok=False).returncode == 2  # --target is required
    assert cli("get", "pools", "--state", "ready", ok=False).returncode == 2
