"""`config get-contexts|current-context|use-context|set-context|view`: kubectl-style contexts in the client config,
one per pclited (one per node). A context is a name, a server URL and a token:

\b
current-context: node-a
contexts:
- {name: node-a, server: http://10.0.0.1:8080, token: ...}
"""

from __future__ import annotations

import click

from service.cli import output
from service.cli.commands.common import app
from service.cli.config import config_path, load, save
from service.cli.errors import CliError

LEGACY = "default"  # the name a flat `server:`/`token:` file's settings get once contexts are added


def _contexts(data: dict) -> list[dict]:
    contexts = data.get("contexts") or []
    if not isinstance(contexts, list) or not all(isinstance(c, dict) and c.get("name") for c in contexts):
        raise CliError(f"the pclitectl config {config_path()}: `contexts` must be a list of {{name, server, token}}")
    return contexts


@click.group("config", short_help="Contexts: which pclited (node) to talk to.")
def config() -> None:
    """Show or change the client config's contexts (file: PCLITE_CONFIG, else ~/.config/pclite/config)."""


@config.command("get-contexts")
@click.option("-o", "--output", "fmt", type=click.Choice(["name"]), help="name: just the names.")
@click.option("--no-headers", is_flag=True, help="Without the header line.")
def get_contexts(fmt: str | None, no_headers: bool) -> None:
    """List the contexts; `*` marks the current one."""
    data = load(config_path())
    contexts = _contexts(data)
    if fmt == "name":
        click.echo("".join(f"{c['name']}\n" for c in contexts), nl=False)
        return
    current = data.get("current-context")
    rows = [["*" if c["name"] == current else "", c["name"], c.get("server") or "<default>"] for c in contexts]
    if rows:
        output.print_table(["CURRENT", "NAME", "SERVER"], rows, header=not no_headers)


@config.command("current-context")
def current_context() -> None:
    """Print the current context's name (exit 1 when none is set)."""
    current = load(config_path()).get("current-context")
    if not current:
        raise CliError("current-context is not set")
    click.echo(current)


@config.command("use-context")
@click.argument("name")
def use_context(name: str) -> None:
    """Make NAME the current context."""
    path = config_path()
    data = load(path)
    if not any(c["name"] == name for c in _contexts(data)):
        raise CliError(f"no context exists with the name {name!r} — see `pclitectl config get-contexts`")
    data["current-context"] = name
    save(path, data)
    click.echo(f'Switched to context "{name}".')


@config.command("set-context")
@click.argument("name")
@click.option("--current", is_flag=True, help="Also make it the current context.")
def set_context(name: str, current: bool) -> None:
    """Create or change context NAME with the global --server URL and --token TOKEN (given anywhere on the line).

    A file with only the flat `server:`/`token:` pclited wrote keeps them as the context `default` (current).
    """
    root = app()
    server, token = root.server_flag, root.token_flag
    path = config_path()
    data = load(path)
    contexts = _contexts(data)
    if not contexts and (data.get("server") or data.get("token")) and name != LEGACY:
        contexts.append({"name": LEGACY, "server": data.get("server"), "token": data.get("token")})
        data.setdefault("current-context", LEGACY)
    entry = next((c for c in contexts if c["name"] == name), None)
    created = entry is None
    if created:
        if not server:
            raise click.UsageError(f"a new context needs --server URL: pclitectl config set-context {name} "
                                   f"--server http://HOST:8080 --token TOKEN")
        entry = {"name": name}
        contexts.append(entry)
    if server:
        if not server.startswith(("http://", "https://")):
            raise click.UsageError(f"--server {server!r} must start with http:// or https://")
        entry["server"] = server.rstrip("/")
    if token:
        entry["token"] = token
    data["contexts"] = contexts
    if current or not data.get("current-context"):
        data["current-context"] = name
    save(path, data)
    click.echo(f'Context "{name}" {"created" if created else "modified"}.')


@config.command("view")
@click.option("--raw", is_flag=True, help="Show the tokens too.")
def view(raw: bool) -> None:
    """Print the config as YAML, tokens redacted (unless --raw)."""
    data = load(config_path())
    if not raw:
        if data.get("token"):
            data["token"] = "REDACTED"
        for context in _contexts(data):
            if context.get("token"):
                context["token"] = "REDACTED"
    output.print_doc(data, "yaml")
