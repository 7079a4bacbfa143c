"""The client config: where pclitectl and pclite-runtime find pclited and its token. The one parser of the file
pclited writes on its first start (`server: URL` and `token: TOKEN`, by yaml.safe_dump), and the one order of
precedence: flags, then PCLITE_SERVER/PCLITE_TOKEN, then the file, then the local default. A file with contexts
(`current-context:` and `contexts:`, written by `pclitectl config`) also carries the current context's `server:` and
`token:` as top-level lines, so this reader (the runtime's) never needs YAML for it.

Standard library only, and only `os`: pclite-runtime imports this on the calls containerd waits on, where re,
typing or yaml would each cost more than the rest of the call. The file's usual form is read here; anything else is
YAML, which a caller that has yaml passes in as load_yaml (pclitectl does; the runtime then asks for the usual form).
"""

import os

DEFAULT_SERVER = "http://127.0.0.1:8080"
KEYS = ("server", "token")

# What yaml.safe_dump writes unquoted and yaml.safe_load reads back as the same string: a plain scalar starting with
# a letter, `_` or `/`; or a token-like one (digits, letters, `-`, `_`) with a letter in it, so no int, float or date.
_LETTERS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
_DIGITS = frozenset("0123456789")
_PLAIN_FIRST = _LETTERS | frozenset("_/")
_PLAIN = _LETTERS | _DIGITS | frozenset("-_./:@%+=~[]")  # [] for an IPv6 host: plain in block context
_TOKEN = _LETTERS | _DIGITS | frozenset("-_")
_YAML_WORDS = frozenset({"yes", "Yes", "YES", "no", "No", "NO", "true", "True", "TRUE", "false", "False", "FALSE",
                         "on", "On", "ON", "off", "Off", "OFF", "null", "Null", "NULL"})


class ConfigError(Exception):
    """The config file cannot be read or is not the mapping it should be; the message names it and the remedy."""


class Settings:
    """Where to reach pclited, and where each part came from ("--server", "PCLITE_SERVER", the file, "default")."""

    __slots__ = ("server", "token", "server_source", "token_source")

    def __init__(self, server: str, token: str | None, server_source: str, token_source: str | None):
        self.server, self.token = server, token
        self.server_source, self.token_source = server_source, token_source

    def __repr__(self) -> str:
        return f"Settings(server={self.server!r}, server_source={self.server_source!r}, token_source=" \
               f"{self.token_source!r})"  # never the token


def config_path() -> str:
    """PCLITE_CONFIG, else $XDG_CONFIG_HOME/pclite/config, else ~/.config/pclite/config: where pclited writes it."""
    explicit = os.environ.get("PCLITE_CONFIG")
    if explicit:
        return os.path.expanduser(explicit)
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return os.path.join(base, "pclite", "config")


def _scalar(text: str) -> str | None:
    """The string yaml.safe_load reads from a value written as pclited writes it; None for any other form."""
    value = text.strip(" ")
    if len(value) >= 2 and value[0] == value[-1] == "'":
        inner = value[1:-1]
        return inner if all(" " <= char <= "~" and char != "'" for char in inner) else None
    if not value:
        return None
    if value[0] in _PLAIN_FIRST:
        fits = all(char in _PLAIN for char in value) and value not in _YAML_WORDS and not value.endswith(":")
        return value if fits else None
    unsigned = value[1:] if value[0] == "-" else value
    if unsigned[:1] == "0" and unsigned[1:2] in ("b", "x", "B", "X"):  # YAML 1.1 binary or hex: an int
        return None
    looks_like_token = value[0] == "-" or value[0] in _DIGITS
    return value if looks_like_token and all(c in _TOKEN for c in value) and any(c in _LETTERS for c in value) \
        else None


def simple_config(text: str) -> dict | None:
    """The config as yaml.safe_load reads it, when it is just the lines pclited writes; else None (ask YAML)."""
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    data: dict[str, str] = {}
    for line in lines:
        key, colon, rest = line.partition(":")
        if not colon or key not in KEYS or key in data or not rest.startswith(" "):
            return None
        value = _scalar(rest)
        if value is None:
            return None
        data[key] = value
    return data


CONTEXT_KEYS = ("current-context", "contexts")


def flat_of_contexts(text: str) -> dict | None:
    """The `server:`/`token:` lines pclitectl keeps at the top of a file with contexts (the current context's, so
    this reader needs no YAML): None unless every other top-level line is `current-context:` or `contexts:`."""
    data: dict[str, str] = {}
    has_contexts = False
    for line in text.split("\n"):
        if not line or line[0] in " -#":
            continue
        key, colon, rest = line.partition(":")
        if not colon:
            return None
        if key in CONTEXT_KEYS:
            has_contexts = has_contexts or key == "contexts"
            continue
        value = _scalar(rest) if key in KEYS and key not in data and rest.startswith(" ") else None
        if value is None:
            return None
        data[key] = value
    return data if has_contexts else None


def select_context(data: dict, path: str, name: str | None = None) -> dict:
    """The server and token of context `name` (else the file's current-context) when the file lists contexts; the
    flat `server:`/`token:` otherwise."""
    contexts = data.get("contexts")
    if not contexts and not name:
        return data
    wanted = name or data.get("current-context")
    if not isinstance(contexts, list) or not all(isinstance(c, dict) for c in contexts):
        raise ConfigError(f"the pclitectl config {path}: `contexts` must be a list of {{name, server, token}}")
    if not wanted:
        return data
    for context in contexts:
        if context.get("name") == wanted:
            return {key: context.get(key) for key in KEYS}
    raise ConfigError(f"context {wanted!r} is not in the pclitectl config {path} — see `pclitectl config "
                      f"get-contexts`, or add it with `pclitectl config set-context {wanted} --server URL`")


def read_config(path: str, load_yaml=None) -> dict:
    """The file's mapping ({} when there is none). load_yaml(text, path) reads any other YAML form; without it only
    the form pclited writes is accepted."""
    try:
        with open(path) as f:
            text = f.read()
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise ConfigError(f"cannot read the pclitectl config {path}: {exc.strerror} — fix its permissions "
                          f"or point PCLITE_CONFIG elsewhere") from None
    simple = simple_config(text)
    if simple is not None:
        return simple
    if load_yaml is None:
        flat = flat_of_contexts(text)
        if flat is not None:
            return flat
        raise ConfigError(f"the pclitectl config {path} is not in the form pclited writes (`server: URL` and "
                          f"`token: TOKEN` lines): rewrite it so, or set PCLITE_SERVER and PCLITE_TOKEN")
    data = load_yaml(text, path)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"the pclitectl config {path} must be a YAML mapping with `server:` and `token:` keys")
    for key in KEYS:
        if key in data and data[key] is not None and not isinstance(data[key], str | int):
            raise ConfigError(f"the pclitectl config {path}: `{key}` must be a string")
    return data


def resolve(server_flag: str | None = None, token_flag: str | None = None, load_yaml=None,
            context: str | None = None) -> Settings:
    """Flags beat PCLITE_SERVER/PCLITE_TOKEN, which beat the config file (its context `context`, else its current
    one, else its flat keys); the server defaults to local pclited.
    The server comes back without a trailing `/`, and with http:// when it names no scheme (nor `unix:`)."""
    server, server_source = server_flag, "--server"
    token, token_source = token_flag, "--token"
    if not server and os.environ.get("PCLITE_SERVER"):
        server, server_source = os.environ["PCLITE_SERVER"], "PCLITE_SERVER"
    if not token and os.environ.get("PCLITE_TOKEN"):
        token, token_source = os.environ["PCLITE_TOKEN"], "PCLITE_TOKEN"
    if not server or not token or context:
        path = config_path()
        data = select_context(read_config(path, load_yaml), path, context)
        if not server and data.get("server"):
            server, server_source = str(data["server"]), path
        if not token and data.get("token"):
            token, token_source = str(data["token"]), path
    if not server:
        server, server_source = DEFAULT_SERVER, "default"
    server = server.strip().rstrip("/")
    if "://" not in server and not server.startswith("unix:"):
        server = f"http://{server}"
    return Settings(server, token or None, server_source, token_source if token else None)
