"""`apply -f FILE|DIR|-`: create or update flavors from kubectl-style manifests; idempotent.

Every document of every file is checked before anything is sent. Each flavor then prints one line:
`flavor/NAME created`, `flavor/NAME configured` (some field changed) or `flavor/NAME unchanged`. A field the
manifest leaves out is set to its default (a field removed from the manifest is reset), as kubectl's apply does.
"""

from __future__ import annotations

import os
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
    except UnicodeDecodeError:
        raise CliError(f"{path}: not UTF-8 text — give -f a YAML manifest") from None
    except OSError as exc:
        raise CliError(f"{path}: cannot read it ({exc.strerror})") from None


MANIFEST_SUFFIXES = (".yaml", ".yml", ".json")


def _paths(path: str) -> list[str]:
    """A file as itself; a directory as its *.yaml, *.yml and *.json files, by name (kubectl's -f DIR)."""
    if path == "-" or not os.path.isdir(path):
        return [path]
    try:
        names = sorted(n for n in os.listdir(path) if n.endswith(MANIFEST_SUFFIXES))
    except OSError as exc:
        raise CliError(f"{path}: cannot list it ({exc.strerror})") from None
    found = [os.path.join(path, n) for n in names if os.path.isfile(os.path.join(path, n))]
    if not found:
        raise CliError(f"{path}: no *.yaml, *.yml or *.json manifest in this directory")
    return found


def _refused(item: manifest.FlavorManifest, exc: CliError) -> CliError:
    return CliError(f"{item.source}: flavor/{item.name}: {manifest.in_manifest_terms(exc.message)}")


def apply_one(client, item: manifest.FlavorManifest, *, dry_run: str) -> str:
    """dry_run: "none" (apply), "client" (send nothing) or "server" (pclited checks it all, writes nothing)."""
    server_only = dry_run == "server"
    try:
        current = client.get_flavor(item.name)
    except NotFound:
        current = None
    if current is None:
        if dry_run == "client":
            return "created"
        try:
            client.create_flavor({"name": item.name, **item.body}, dry_run=server_only)
            return "created"
        except CliError as exc:
            if exc.status != 409:
                raise _refused(item, exc) from None
        current = client.get_flavor(item.name)  # created concurrently: update it instead
    changes = manifest.changed_fields(current, manifest.DEFAULTS | item.body)
    if not changes:
        return "unchanged"
    if dry_run != "client":
        try:
            client.patch_flavor(item.name, changes, dry_run=server_only)
        except CliError as exc:
            raise _refused(item, exc) from None
    return "configured"


@click.command("apply", short_help="Create or update flavors from manifests.")
@click.option("-f", "--filename", "files", multiple=True, required=True, metavar="FILE|DIR|-",
              help="Manifest file (multi-document YAML), a directory of *.yaml|*.yml|*.json, or - for stdin. "
                   "Repeatable.")
@click.option("--dry-run", type=click.Choice(["none", "client", "server"]), default="none", is_flag=False,
              flag_value="client", help="client: say what would change, send nothing; server: pclited checks "
                                        "every change as if applying it, and writes nothing.")
def apply(files: tuple[str, ...], dry_run: str) -> None:
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
      # a field left out gets its default (vcpus 1, memMib 256, pool {min: 0, target: 1}, clone true)
      # kernel: /path/vmlinux, initrd: /path/initrd (default: the ones pclited built)
    """
    if list(files).count("-") > 1:
        raise click.UsageError("stdin (-f -) can be read only once")
    items: list[manifest.FlavorManifest] = []
    for given in files:
        for path in _paths(given):
            text, source = _read(path)
            items += manifest.parse(text, source)
    names: dict[str, str] = {}
    for item in items:
        if item.name in names:
            raise CliError(f"{item.source}: flavor/{item.name} is already defined in {names[item.name]}")
        names[item.name] = item.source
    client = app().client
    suffix = {"none": "", "client": " (dry run)", "server": " (server dry run)"}[dry_run]
    for item in items:
        click.echo(f"flavor/{item.name} {apply_one(client, item, dry_run=dry_run)}{suffix}")
