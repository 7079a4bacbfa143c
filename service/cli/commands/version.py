"""`version`: pclitectl's version and the server's (GET /v1/version)."""

from __future__ import annotations

import click

from service.cli import output
from service.cli.commands.common import app
from service.cli.pkginfo import client_version


@click.command("version")
@click.option("--client", "client_only", is_flag=True, help="Only pclitectl's own version; no server needed.")
@click.option("-o", "--output", "fmt", type=click.Choice(["json", "yaml"]), help="Output format.")
def version(client_only: bool, fmt: str | None) -> None:
    """Print the client and server versions."""
    mine = {"version": client_version()}
    if client_only:
        if fmt:
            output.print_doc({"client": mine}, fmt)
        else:
            click.echo(f"Client Version: {mine['version']}")
        return
    if not fmt:
        click.echo(f"Client Version: {mine['version']}")
    server = app().client.version()
    if fmt:
        output.print_doc({"client": mine, "server": server}, fmt)
        return
    server_version = server.get("version", "unknown") if isinstance(server, dict) else server
    extra = ""
    if isinstance(server, dict):
        rest = {k: v for k, v in server.items() if k != "version" and isinstance(v, str | int | float)}
        extra = "".join(f", {k} {v}" for k, v in rest.items())
    click.echo(f"Server Version: {server_version}{extra}")
