"""`scale pool FLAVOR --target N`: how many ready VMs pclited keeps warm for a flavor."""

from __future__ import annotations

import click

from service.cli.commands.common import app, complete_flavor_names, resource_choice


@click.command("scale")
@click.argument("resource", type=resource_choice("pools"), metavar="pool")
@click.argument("flavor", shell_complete=complete_flavor_names)
@click.option("--target", type=click.IntRange(min=0), required=True, metavar="N", help="Ready VMs to keep.")
def scale(resource: str, flavor: str, target: int) -> None:
    """Set a flavor's warm-pool target."""
    client = app().client
    before = client.get_pool(flavor).get("target")
    pool = client.scale_pool(flavor, target) or {}
    after = pool.get("target", target)
    if before == after:
        click.echo(f"pool/{flavor} unchanged (target {after})")
    else:
        click.echo(f"pool/{flavor} scaled (target {before} → {after})")
