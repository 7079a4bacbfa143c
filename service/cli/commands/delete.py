"""`delete vm ID...` (stop and remove VMs) and `delete flavor NAME...`."""

from __future__ import annotations

import click

from service.cli.commands.common import ResourceRef, app, complete_names, references
from service.cli.errors import EXIT_ERROR, CliError


@click.command("delete", short_help="Delete VMs (or flavors).")
@click.argument("resource", type=ResourceRef("vms", "flavors"), metavar="vm|flavor")
@click.argument("names", nargs=-1, metavar="ID...", shell_complete=complete_names)
@click.option("--wait", is_flag=True, help="vm: return only once the VMM has stopped.")
def delete(resource: str, names: tuple[str, ...], wait: bool) -> None:
    """Delete VMs by id (their VMM is stopped) or flavors by name (`vm ID...` or `vm/ID...`). Every name is tried;
    any failure exits 1."""
    refs = references(resource, names, ("vms", "flavors"))
    if not refs:
        raise click.UsageError("name what to delete: `delete vm ID...` or `delete vm/ID...`")
    client = app().client
    failed = 0
    for kind, name in dict.fromkeys(refs):
        vms = kind == "vms"
        try:
            client.delete_vm(name, wait=wait) if vms else client.delete_flavor(name)
        except CliError as exc:
            # Not found (or refused) for one name: say so and go on with the others.
            failed += 1
            click.echo(f"error: {exc.message}", err=True)
            continue
        click.echo(f"{'vm' if vms else 'flavor'}/{name} deleted")
    if failed:
        click.get_current_context().exit(EXIT_ERROR)
