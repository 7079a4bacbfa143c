"""Bearer-token auth: one token per pclited, generated on first start when none is configured."""

from __future__ import annotations

import hmac
import logging
import os
import secrets
from pathlib import Path

import yaml

from service.core.config import Settings

log = logging.getLogger("pclited")
PUBLIC_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
MIN_TOKEN_CHARS = 32
# Tokens shipped in deploy/ as examples (tests/unit/test_service_config.py keeps this in step with them).
PLACEHOLDER_TOKENS = frozenset({"change-me-to-a-long-random-token"})


class BadToken(ValueError):
    """A token pclited refuses to serve with."""


def check_token(token: str, where: str) -> str:
    if token in PLACEHOLDER_TOKENS:
        raise BadToken(f"the token from {where} is the placeholder shipped with pclite: set a random one, e.g. "
                       "`openssl rand -base64 32`")
    if len(token) < MIN_TOKEN_CHARS:
        raise BadToken(f"the token from {where} has {len(token)} characters, under the {MIN_TOKEN_CHARS} required: "
                       "set a longer random one, e.g. `openssl rand -base64 32`")
    return token


def ensure_token(settings: Settings) -> str:
    """The configured token, else the one in data_dir/token, else a new one written there (0600). BadToken when
    the one found is short or a shipped placeholder."""
    if settings.token:
        return check_token(settings.token, "PCLITE_TOKEN or `token:` in the config file")
    path = settings.token_path
    try:
        token = path.read_text().strip()
        if token:
            return check_token(token, f"{path} (delete it to have a new one generated)")
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    tmp = path.with_name(f".token.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(token + "\n")
    os.replace(tmp, path)  # atomic: a concurrent reader never sees half a token
    log.info("generated an API token in %s", path)
    return token


def write_client_config(path: Path, server_url: str, token: str) -> Path | None:
    """~/.config/pclite/config for pclitectl (0600), only when the user has none: never overwrite theirs."""
    if path.exists():
        return None
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return None
    except OSError as exc:  # e.g. a read-only home: the service still works, the CLI needs --server/--token
        log.warning("could not write %s: %s", path, exc)
        return None
    with os.fdopen(fd, "w") as out:
        yaml.safe_dump({"server": server_url, "token": token}, out, default_flow_style=False)
    log.info("wrote client config %s", path)
    return path


def check_authorization(header: str | None, token: str, token_hint: str) -> str | None:
    """None when the header carries the token; otherwise what is wrong and what to do."""
    if not header:
        return f"missing Authorization header: send 'Authorization: Bearer <token>' ({token_hint})"
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return f"Authorization must be 'Bearer <token>', got scheme {scheme[:20]!r} ({token_hint})"
    if not hmac.compare_digest(value.strip().encode(), token.encode()):
        return f"invalid token ({token_hint})"
    return None
