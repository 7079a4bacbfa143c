"""Where pclitectl finds the server and its token: service/clientconfig.py's order (flags, env, the config file
pclited writes), with YAML for a file in another form and the CLI's errors."""

from __future__ import annotations

from pathlib import Path

from service import clientconfig
from service.cli.errors import CliError
from service.clientconfig import DEFAULT_SERVER, Settings

__all__ = ["DEFAULT_SERVER", "Settings", "config_path", "resolve"]


def config_path() -> Path:
    return Path(clientconfig.config_path())


def _load_yaml(text: str, path: str):
    import yaml  # only for a file pclited did not write: importing it costs more than a short pclitectl run

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise CliError(f"the pclitectl config {path} is not valid YAML{where} — expected `server: URL` and "
                       f"`token: TOKEN` lines") from None


def resolve(server_flag: str | None, token_flag: str | None) -> Settings:
    """Flags beat PCLITE_SERVER/PCLITE_TOKEN, which beat the config file; the server defaults to local pclited."""
    try:
        settings = clientconfig.resolve(server_flag, token_flag, _load_yaml)
    except clientconfig.ConfigError as exc:
        raise CliError(str(exc)) from None
    if not settings.server.startswith(("http://", "https://")):
        raise CliError(f"server URL {settings.server!r} (from {settings.server_source}) must start with http:// or "
                       f"https://")
    return settings
