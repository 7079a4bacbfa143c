"""Where pclitectl finds the server and its token: flags, then env, then the config file pclited writes."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from service.cli.errors import CliError

DEFAULT_SERVER = "http://127.0.0.1:8080"


def config_path() -> Path:
    """PCLITE_CONFIG, else $XDG_CONFIG_HOME/pclite/config, else ~/.config/pclite/config: where pclited writes it."""
    explicit = os.environ.get("PCLITE_CONFIG")
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(base) / "pclite" / "config"


@dataclass(frozen=True)
class Settings:
    server: str
    token: str | None
    server_source: str  # "--server", "PCLITE_SERVER", the config file's path, or "default"
    token_source: str | None


def _read_config(path: Path) -> dict:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise CliError(f"cannot read the pclitectl config {path}: {exc.strerror} — fix its permissions "
                       f"or point PCLITE_CONFIG elsewhere") from None
    import yaml

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise CliError(f"the pclitectl config {path} is not valid YAML{where} — expected `server: URL` and "
                       f"`token: TOKEN` lines") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise CliError(f"the pclitectl config {path} must be a YAML mapping with `server:` and `token:` keys")
    for key in ("server", "token"):
        if key in data and data[key] is not None and not isinstance(data[key], str | int):
            raise CliError(f"the pclitectl config {path}: `{key}` must be a string")
    return data


def resolve(server_flag: str | None, token_flag: str | None) -> Settings:
    """Flags beat PCLITE_SERVER/PCLITE_TOKEN, which beat the config file; the server defaults to local pclited."""
    path = config_path()
    server, server_source = server_flag, "--server"
    token, token_source = token_flag, "--token"
    if not server and os.environ.get("PCLITE_SERVER"):
        server, server_source = os.environ["PCLITE_SERVER"], "PCLITE_SERVER"
    if not token and os.environ.get("PCLITE_TOKEN"):
        token, token_source = os.environ["PCLITE_TOKEN"], "PCLITE_TOKEN"
    if not server or not token:
        data = _read_config(path)
        if not server and data.get("server"):
            server, server_source = str(data["server"]), str(path)
        if not token and data.get("token"):
            token, token_source = str(data["token"]), str(path)
    if not server:
        server, server_source = DEFAULT_SERVER, "default"
    if not token:
        token_source = None
    server = server.strip().rstrip("/")
    if "://" not in server:
        server = f"http://{server}"
    if not server.startswith(("http://", "https://")):
        raise CliError(f"server URL {server!r} (from {server_source}) must start with http:// or https://")
    return Settings(server=server, token=token or None, server_source=server_source, token_source=token_source)
