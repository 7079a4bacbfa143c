"""Where pclitectl finds the server and its token: service/clientconfig.py's order (flags, env, the config file
pclited writes), with YAML for a file in another form and the CLI's errors."""

from __future__ import annotations

from pathlib import Path

from service import clientconfig
from service.cli.errors import CliError
from service.clientconfig import DEFAULT_SERVER, Settings

__all__ = ["DEFAULT_SERVER", "Settings", "config_path", "load", "resolve", "save"]


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


def resolve(server_flag: str | None, token_flag: str | None, context: str | None = None) -> Settings:
    """Flags beat PCLITE_SERVER/PCLITE_TOKEN, which beat the config file (--context, else its current context);
    the server defaults to local pclited."""
    try:
        settings = clientconfig.resolve(server_flag, token_flag, _load_yaml, context or None)
    except clientconfig.ConfigError as exc:
        raise CliError(str(exc)) from None
    if not settings.server.startswith(("http://", "https://")):
        raise CliError(f"server URL {settings.server!r} (from {settings.server_source}) must start with http:// or "
                       f"https://")
    return settings


def load(path: Path) -> dict:
    """The whole config file, by YAML ({} when there is none)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as exc:
        raise CliError(f"cannot read the pclitectl config {path}: {exc}") from None
    data = _load_yaml(text, str(path))
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise CliError(f"the pclitectl config {path} must be a YAML mapping")
    return data


def save(path: Path, data: dict) -> None:
    """Write the config (mode 0600: it holds tokens), replacing it atomically. With contexts, the current one's
    server and token are also written as the top-level `server:`/`token:` lines that pclite-runtime reads."""
    import os

    import yaml

    contexts = data.get("contexts") or []
    current = next((c for c in contexts if c.get("name") == data.get("current-context")), None)
    out: dict = {}
    if current is not None:
        out.update({key: current[key] for key in clientconfig.KEYS if current.get(key)})
    elif not contexts:
        out.update({key: data[key] for key in clientconfig.KEYS if data.get(key)})
    if data.get("current-context"):
        out["current-context"] = data["current-context"]
    if contexts:
        out["contexts"] = [{k: c[k] for k in ("name", *clientconfig.KEYS) if c.get(k)} for c in contexts]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(yaml.safe_dump(out, sort_keys=False, default_flow_style=False))
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise CliError(f"cannot write the pclitectl config {path}: {exc.strerror}") from None
