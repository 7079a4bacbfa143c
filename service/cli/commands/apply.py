"""`apply -f FILE|-`: create or update flavors from kubectl-style manifests; idempotent.

Every document of every file is checked before anything is sent. Each flavor then prints one line:
`flavor/NAME created`, `flavor/NAME configured` (some field changed) or `flavor/NAME unchanged`.
"""

from __future__ import annotations

import sys

import click

from service.cli import manifest
from service.cli.commands.common import app
from service.cli.errors import CliError, NotFound


def _read(path: str) -> tuple[str, str]:
    if path == "-":
        return sys.stdin.read(), "<stdin>"
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read(), path
    except FileNotFoundError:
        raise CliError(f"{path}: no such file — check the path given to -f") from None
    except IsADirectoryError:
        raise CliError(f"{path}: is a directory — give -f a YAML file (or - for stdin)") from None
    except UnicodeDecodeError:
        raise CliError(f"{path}: not UTF-8 text — give -f a YAML manifest") from None
    except OSError as exc:
        raise CliError(f"{path}: cannot read it ({exc.strerror})") from None


def _refused(item: manifest.FlavorManifest, exc: CliError) -> CliError:
    return CliError(f"{item.source}: flavor/{item.name}: {manifest.in_manifest_terms(exc.message)}")


def apply_one(client, item: manifest.FlavorManifest, *, dry_run: bool) -> str:
    try:
        current = client.get_flavor(item.name)
    except NotFound:
        current = None
    if current is None:
        if dry_run:
            return "created"
        try:
            client.create_flavor({"name": item.name, **item.body})
            return "created"
        except CliError as exc:
            if exc.status != 409:
                raise _refused(item, exc) from None
        current = client.get_flavor(item.name)  # created concurrently: update it instead
    changes = manifest.changed_fields(current, item.body)
    if not changes:
        return "unchanged"
    if not dry_run:
        try:
            client.patch_flavor(item.name, changes)
        except CliError as exc:
            raise _refused(item, exc) from None
    return "configured"


@click.command("apply", short_help="Create or update flavors from manifests.")
@click.option("-f", "--filename", "files", multiple=True, required=True, metavar="FILE|-",
              help="Manifest file (multi-document YAML), or - for stdin. Repeatable.")
@click.option("--dry-run", is_flag=True, help="Check the manifests and say what would change; send nothing.")
def apply(files: tuple[str, ...], dry_run: bool) -> None:
    """Create or update flavors from manifests (apiVersion: pclite/v1, kind: Flavor).

    \b
    apiVersion: pclite/v1
    kind: Flavor
    metadata:
      name: default
    spec:
      vcpus: 1
      memMib: 256
      cmdlineExtra: ""
      pool: {min: 1, target: 2}
      maxAgeSeconds: 3600      # 0: no age limit
      # kernel: /path/vmlinux, initrd: /path/initrd (default: the ones pclited built)
    """
    if list(files).count("-") > 1:
        raise click.UsageError("stdin (-f -) can be read only once")
    items: list[manifest.FlavorManifest] = []
    for path in files:
        text, source = _read(path)
        items += manifest.parse(text, source)
    names: dict[str, str] = {}
    for item in items:
        if item.name in names:
            raise CliError(f"{item.source}: flavor/{item.name} is already defined in {names[item.name]}")
        names[item.name] = item.source
    client = app().client
    suffix = " (dry run)" if dry_run else ""
    for item in items:
        click.echo(f"flavor/{item.name} {apply_one(client, item, dry_run=dry_run)}{suffix}")
