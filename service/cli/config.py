"""Where pclitectl finds the server and its token: flags, then env, then the config file pclited writes."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import NamedTuple

from service.cli.errors import CliError

DEFAULT_SERVER = "http://127.0.0.1:8080"

# `server: URL` / `token: TOKEN` lines as pclited writes them (yaml.safe_dump): a single-quoted scalar, or a plain one
# that YAML 1.1 can only read as a string: it starts with a letter, `_` or `/` and is no boolean or null word; or it
# is a token (letters, digits, `-`, `_`) that has a letter and no 0b/0x prefix, so no int, float or date.
_SIMPLE_LINE = re.compile(r"(server|token): +(?:'([\x20-\x26\x28-\x7e]*)'|([A-Za-z_/][-A-Za-z0-9_./:@%+=~]*)"
                          r"|(?![-+]?0[bxBX])([-0-9][-0-9_]*[A-Za-z][-A-Za-z0-9_]*)) *")
_YAML_WORDS = frozenset({"yes", "Yes", "YES", "no", "No", "NO", "true", "True", "TRUE", "false", "False", "FALSE",
                         "on", "On", "ON", "off", "Off", "OFF", "null", "Null", "NULL"})


def config_path() -> Path:
    """PCLITE_CONFIG, else $XDG_CONFIG_HOME/pclite/config, else ~/.config/pclite/config: where pclited writes it."""
    explicit = os.environ.get("PCLITE_CONFIG")
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(base) / "pclite" / "config"


class Settings(NamedTuple):
    server: str
    token: str | None
    server_source: str  # "--server", "PCLITE_SERVER", the config file's path, or "default"
    token_source: str | None


def _simple_config(text: str) -> dict | None:
    """The config as yaml.safe_load reads it, when it is just the lines pclited writes; else None (ask YAML)."""
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    data: dict[str, str] = {}
    for line in lines:
        match = _SIMPLE_LINE.fullmatch(line)
        if match is None or match[1] in data:
            return None
        quoted, plain, token = match[2], match[3], match[4]
        if plain is not None and (plain in _YAML_WORDS or plain.endswith(":")):
            return None
        data[match[1]] = next(v for v in (quoted, plain, token) if v is not None)
    return data


def _read_config(path: Path) -> dict:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise CliError(f"cannot read the pclitectl config {path}: {exc.strerror} — fix its permissions "
                       f"or point PCLITE_CONFIG elsewhere") from None
    simple = _simple_config(text)
    if simple is not None:  # importing yaml would cost more than the rest of a short pclitectl run
        return simple
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
