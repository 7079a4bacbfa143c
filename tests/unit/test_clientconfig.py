"""The client config parser pclitectl and pclite-runtime share (service/clientconfig.py): it reads the file pclited
writes as yaml.safe_load would, sends every other form to YAML (or refuses it where there is no YAML), and applies
one order of precedence. And it stays cheap to import for the runtime."""

import random
import subprocess
import sys

import pytest
import yaml

from service import clientconfig
from service.auth import write_client_config
from service.cli.config import resolve as cli_resolve
from service.cli.errors import CliError
from service.runtime import launcher
from service.runtime.peers import pclited
from service.runtime.state import RuntimeFailure


@pytest.mark.parametrize("text", [
    "server: http://127.0.0.1:8080\ntoken: abc-DEF_123\n", "token: '0123'\n", "token: 12ab\n", "token: -1e5\n",
    "token: 0x1f\n", "token: 1_000\n", "server: yes\n", "server: 'yes'\n", "server: null\n", "server: a:\n",
    "server: unix:/run/pclited.sock\n", "token: ''\n", "token:  two-spaces  \n", "token: 'a b'\n",
    "token: 2026-01-02\n", "server: http://[::1]:80\n", "server: [a]\n", "server: a[b, c]\n",
    "server: x\nserver: y\n", "other: x\n", "token: \"quoted\"\n", "token: 'it''s'\n", "token:x\n", "token: \n", "",
    "token: a\r\n", "token: -0b1a\n", "token: 1e5a\n", "server: /path\n", "server: _x\n", "token: 'café'\n",
])
def test_the_usual_form_reads_as_yaml_does(text):
    simple = clientconfig.simple_config(text)
    if simple is not None:
        assert simple == (yaml.safe_load(text) or {}), text


def test_random_lines_never_read_otherwise_than_yaml():
    chars = "ab_Z09-+:/.'\" @%=~xXbB#\t[],{}"
    rng = random.Random(17)
    read = 0
    for _ in range(5000):
        value = "".join(rng.choice(chars) for _ in range(rng.randint(0, 8)))
        text = f"{rng.choice(['server', 'token'])}:{' ' * rng.randint(0, 2)}{value}\n"
        simple = clientconfig.simple_config(text)
        if simple is None:
            continue
        read += 1
        assert simple == yaml.safe_load(text), text
    assert read > 300  # the usual form is common enough in the sample to mean something


def test_what_pclited_writes_is_the_usual_form(tmp_path):
    for token in ("abc", "0123", "12ab", "yes", "-x", "0x1f", "1e5", "_Ab-9", "null"):  # as ensure_token makes them
        path = write_client_config(tmp_path / token / "config", "http://[::1]:8080", token)
        assert clientconfig.simple_config(path.read_text()) == {"server": "http://[::1]:8080", "token": token}


@pytest.fixture
def env(monkeypatch, tmp_path):
    for name in ("PCLITE_SERVER", "PCLITE_TOKEN", "PCLITE_CONFIG", "XDG_CONFIG_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    return monkeypatch


def test_flags_beat_env_beat_the_file_beat_the_default(env, tmp_path):
    assert (clientconfig.resolve().server, clientconfig.resolve().token) == (clientconfig.DEFAULT_SERVER, None)
    config = tmp_path / ".config" / "pclite" / "config"
    config.parent.mkdir(parents=True)
    config.write_text("server: 'unix:/run/p.sock'\ntoken: from-file\n")
    settings = clientconfig.resolve()
    assert (settings.server, settings.token, settings.token_source) == ("unix:/run/p.sock", "from-file", str(config))
    env.setenv("PCLITE_SERVER", "host:9/")
    env.setenv("PCLITE_TOKEN", "from-env")
    settings = clientconfig.resolve()
    assert (settings.server, settings.server_source, settings.token) == ("http://host:9", "PCLITE_SERVER", "from-env")
    settings = clientconfig.resolve("https://flag", "t")
    assert (settings.server, settings.server_source, settings.token_source) == ("https://flag", "--server", "--token")
    assert "from-env" not in repr(clientconfig.resolve())


def test_another_form_needs_yaml(env, tmp_path):
    config = tmp_path / "config"
    config.write_text('server: "http://127.0.0.1:9"  # double quotes\ntoken: t\n')
    env.setenv("PCLITE_CONFIG", str(config))
    assert cli_resolve(None, None).server == "http://127.0.0.1:9"  # pclitectl reads it with yaml
    with pytest.raises(RuntimeFailure, match="is not in the form pclited writes .* set PCLITE_SERVER and PCLITE_TOKEN"):
        pclited()  # the runtime has no yaml: one line saying what to do
    config.write_text("server: 'unix:/run/p.sock'\n")
    with pytest.raises(CliError, match="must start with http:// or https://"):
        cli_resolve(None, None)
    assert pclited().server == "unix:/run/p.sock"
    env.setenv("PCLITE_CONFIG", str(tmp_path))  # a directory: unreadable as a file, even for root
    with pytest.raises(CliError, match="cannot read the pclitectl config .* fix its permissions"):
        cli_resolve(None, None)
    with pytest.raises(RuntimeFailure, match="cannot read the pclitectl config"):
        pclited()


def test_it_imports_nothing_but_os():
    code = "import sys, os; sys.path.insert(0, sys.argv[1]); before = set(sys.modules); " \
           "import service.clientconfig; print(' '.join(sorted(set(sys.modules) - before)))"
    done = subprocess.run([sys.executable, "-IS", "-c", code, launcher.ROOT], capture_output=True, text=True,
                          check=True)
    assert set(done.stdout.split()) == {"service", "service.clientconfig"}


def test_the_lean_reader_takes_the_flat_keys_of_a_file_with_contexts(tmp_path):
    import yaml

    text = ("server: http://10.0.0.2:8080\ntoken: tok-b\ncurrent-context: b\ncontexts:\n"
            "- name: a\n  server: http://10.0.0.1:8080\n  token: tok-a\n- name: b\n  server: http://10.0.0.2:8080\n"
            "  token: tok-b\n")
    assert clientconfig.flat_of_contexts(text) == {"server": "http://10.0.0.2:8080", "token": "tok-b"}
    data = yaml.safe_load(text)
    assert clientconfig.select_context(data, "cfg") == {"server": "http://10.0.0.2:8080", "token": "tok-b"}
    assert clientconfig.select_context(data, "cfg", "a") == {"server": "http://10.0.0.1:8080", "token": "tok-a"}
    with pytest.raises(clientconfig.ConfigError, match="context 'c' is not in"):
        clientconfig.select_context(data, "cfg", "c")
    # anything else at the top level: not the form pclitectl writes, so the runtime asks for YAML (and says so)
    assert clientconfig.flat_of_contexts(text + "extra: 1\n") is None
    assert clientconfig.flat_of_contexts("server: http://x\n") is None  # no contexts: simple_config's business
    path = tmp_path / "config"
    path.write_text(text + "extra: 1\n")
    with pytest.raises(clientconfig.ConfigError, match="not in the form pclited writes"):
        clientconfig.read_config(str(path))
