"""pclited's settings, token, client config, `pclited migrate`, and serving on a Unix socket."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml
from sqlalchemy import inspect

from service.auth import PLACEHOLDER_TOKENS, BadToken, check_authorization, ensure_token, write_client_config
from service.core.config import Settings, load_settings
from service.core.db import Database, normalize_url, on_network_fs
from tests.support.servers import ROOT, Pclited, short_tmpdir


@pytest.fixture
def workdir():
    path = short_tmpdir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def clean_env(monkeypatch):
    for key in list(os.environ):
        if key.startswith("PCLITE_") and key != "PCLITE_CACHE":
            monkeypatch.delenv(key)
    return monkeypatch


def test_defaults_follow_the_data_dir(clean_env, workdir):
    settings = load_settings(data_dir=workdir)
    assert settings.database_url == f"sqlite:///{workdir}/pclite.db"
    assert settings.run_dir == workdir / "run" and settings.token_path == workdir / "token"
    assert (settings.host, settings.port, settings.unix_socket) == ("127.0.0.1", 8080, None)
    expected = "/var/lib/pclite" if os.geteuid() == 0 else os.path.expanduser("~/.local/share/pclite")
    assert str(load_settings().data_dir) == expected


def test_environment_overrides_the_config_file(clean_env, workdir):
    config = workdir / "pclited.yaml"
    config.write_text(yaml.safe_dump({"port": 9999, "max_vms": 3, "data_dir": str(workdir)}))
    clean_env.setenv("PCLITE_MAX_VMS", "5")
    settings = load_settings(config)
    assert (settings.port, settings.max_vms, settings.data_dir) == (9999, 5, workdir)
    clean_env.setenv("PCLITE_CONFIG_FILE", str(config))
    assert load_settings().port == 9999


def test_bad_settings_are_refused_with_the_reason(clean_env, workdir):
    config = workdir / "typo.yaml"
    config.write_text("max_vm: 3\n")
    with pytest.raises(ValueError, match="max_vm"):
        load_settings(config)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_settings(workdir / "missing.yaml")
    with pytest.raises(ValueError, match="PCLITE_RUN_DIR"):
        load_settings(data_dir=workdir / ("d" * 100))
    result = subprocess.run([sys.executable, "-m", "service.main", "migrate", "--config", str(config)], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "bad configuration" in result.stderr and "max_vm" in result.stderr


def test_postgresql_urls_mean_psycopg3():
    assert normalize_url("postgresql://u:p%40ss@db/x").startswith("postgresql+psycopg://u:p%40ss@db/x")
    assert normalize_url("sqlite:////tmp/x.db") == "sqlite:////tmp/x.db"


def test_sqlite_skips_wal_on_a_network_filesystem():
    mounts = "/dev/vda / ext4 rw 0 0\nshare0 /srv/share 9p rw,trans=virtio 0 0\nfs /srv/share/local ext4 rw 0 0\n"
    assert on_network_fs(Path("/srv/share/data"), mounts)
    assert not on_network_fs(Path("/srv/share/local/data"), mounts), "the longest mount point wins"
    assert not on_network_fs(Path("/srv/shared"), mounts)


def test_token_is_generated_once_and_private(workdir):
    settings = Settings(data_dir=workdir)
    token = ensure_token(settings)
    assert len(token) >= 40 and stat.S_IMODE(os.stat(settings.token_path).st_mode) == 0o600
    assert ensure_token(settings) == token, "the same token on the next start"
    configured = "configured-" + "x" * 22
    assert ensure_token(Settings(data_dir=workdir, token=configured)) == configured


def test_short_or_placeholder_tokens_are_refused(workdir):
    with pytest.raises(BadToken, match="11 characters, under the 32"):
        ensure_token(Settings(data_dir=workdir, token="short-token"))
    with pytest.raises(BadToken, match="placeholder"):
        ensure_token(Settings(data_dir=workdir, token="change-me-to-a-long-random-token"))
    (workdir / "token").write_text("abc\n")  # a token file someone wrote by hand
    with pytest.raises(BadToken, match=f"{workdir / 'token'} .delete it"):
        ensure_token(Settings(data_dir=workdir))


def test_shipped_placeholder_tokens_are_all_known():
    """Every token in deploy/ is an example, and pclited refuses each."""
    import re
    shipped = set()
    for path in (ROOT / "deploy").rglob("*"):
        if path.is_file() and path.suffix in (".yaml", ".yml", ".service", ""):
            shipped |= set(re.findall(r"(?m)^\s*(?:token|PCLITE_TOKEN)\s*[:=]\s*\"?([^\s\"#]+)", path.read_text()))
    assert shipped and shipped <= PLACEHOLDER_TOKENS, shipped


@pytest.mark.parametrize("token, why", [("change-me-to-a-long-random-token", "placeholder shipped with pclite"),
                                        ("s3cret", "6 characters, under the 32 required")])
def test_pclited_refuses_to_start_with_a_weak_token(workdir, token, why):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PCLITE_")}
    env.update(PCLITE_DATA_DIR=str(workdir / "data"), PCLITE_TOKEN=token, PCLITE_PORT="0",
               PCLITE_WRITE_CLIENT_CONFIG="false")
    result = subprocess.run([sys.executable, "-m", "service.main", "serve"], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=60)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and why in lines[0], result.stderr
    assert lines[0].startswith("pclited: bad configuration: the token from PCLITE_TOKEN")
    assert not (workdir / "data" / "pclite.db").exists(), "refused before the database is touched"


def test_client_config_is_written_once_and_never_overwritten(workdir):
    path = workdir / "home" / ".config" / "pclite" / "config"
    assert write_client_config(path, "http://127.0.0.1:8080", "tok") == path
    assert yaml.safe_load(path.read_text()) == {"server": "http://127.0.0.1:8080", "token": "tok"}
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert write_client_config(path, "http://127.0.0.1:9", "other") is None
    assert yaml.safe_load(path.read_text())["token"] == "tok"


@pytest.mark.parametrize("header, problem", [(None, "missing Authorization"), ("Bearer", "Bearer <token>"),
                                             ("Token abc", "Bearer <token>"), ("Bearer abd", "invalid token"),
                                             ("Bearer abc", None), ("bearer  abc ", None)])
def test_authorization_header_checks(header, problem):
    result = check_authorization(header, "abc", "hint")
    assert (result is None) if problem is None else (problem in result and "hint" in result)


def test_pclited_migrate_creates_the_schema(clean_env, workdir):
    env = dict(os.environ, PCLITE_DATA_DIR=str(workdir))
    result = subprocess.run([sys.executable, "-m", "service.main", "migrate"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    db = Database(f"sqlite:///{workdir}/pclite.db")
    assert {"flavors", "vms", "events", "alembic_version"} <= set(inspect(db.engine).get_table_names())
    db.dispose()


def test_serves_on_a_unix_socket_too(workdir):
    sock = workdir / "pclited.sock"
    token = "s3cret-token-" + "0" * 20
    service = Pclited(workdir / "data", unix_socket=sock, token=token, write_client_config="false")
    service.start()
    try:
        assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)), base_url="http://pclited") as client:
            assert client.get("/healthz").status_code == 200
            assert client.get("/v1/flavors").status_code == 401
            assert client.get("/v1/flavors", headers={"Authorization": f"Bearer {token}"}).json() == []
        assert not (workdir / "data" / "token").exists(), "a configured token is not replaced by a generated one"
        assert not (workdir / "data" / "client-config").exists()
    finally:
        service.stop()
    assert not sock.exists(), "the socket is removed on exit"
