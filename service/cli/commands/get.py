"""`get vms|flavors|pools [NAME] [-o wide|json|yaml|name|jsonpath=T] [--no-headers] [-w]`: kubectl-style listings,
documents and watches."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import click

from service.cli import output
from service.cli.commands.common import ResourceRef, app, complete_names, references
from service.cli.errors import EXIT_USAGE, CliError


def _mem(mib: Any) -> str:
    return "<none>" if mib is None else f"{mib}Mi"


def _max_age(seconds: Any) -> str:
    return "<none>" if not seconds else f"{seconds}s"


def _boot(vm: dict, phase: str) -> str:
    boot = vm.get("boot_ms") or {}
    return output.ms(boot.get(phase)) if boot.get(phase) is not None else "<none>"


# resource -> (key field, columns, wide extra columns, row builder, wide row builder)
def vm_row(vm: dict) -> list[Any]:
    return [vm.get("id"), vm.get("flavor"), vm.get("state"), _boot(vm, "total"), output.age(vm.get("created_at"))]


def vm_wide(vm: dict) -> list[Any]:
    return [vm.get("source") or "<unknown>", vm.get("pid") or "<none>", _boot(vm, "vmm_setup"), _boot(vm, "kernel"),
            _boot(vm, "init_to_agent"),
            output.age(vm.get("claimed_at")) if vm.get("claimed_at") else "<none>",
            vm.get("failure_reason") or "<none>"]


def flavor_row(f: dict) -> list[Any]:
    return [f.get("name"), f.get("vcpus"), _mem(f.get("mem_mib")), f.get("pool_min"), f.get("pool_target"),
            _max_age(f.get("max_age_s")), output.age(f.get("created_at"))]


def _template(f: dict) -> str:
    template = f.get("template") or {}
    state = template.get("state") or "<unknown>"
    return f"{state} (retry in {template['retry_in_s']:.0f}s)" if template.get("retry_in_s") else state


def flavor_wide(f: dict) -> list[Any]:
    return ["yes" if f.get("clone", True) else "no", _template(f), f.get("kernel") or "<default>",
            f.get("initrd") or "<default>", f.get("cmdline_extra") or "<none>"]


def pool_row(p: dict) -> list[Any]:
    return [p.get("flavor"), f"{p.get('ready', 0)}/{p.get('target', 0)}", p.get("booting", 0), p.get("claimed", 0),
            p.get("min", 0), p.get("state")]


def pool_wide(p: dict) -> list[Any]:
    return [p.get("reason") or "<none>"]


TABLES: dict[str, tuple[str, list[str], list[str], Callable, Callable]] = {
    "vms": ("id", ["ID", "FLAVOR", "STATE", "BOOT", "AGE"],
            ["SOURCE", "PID", "VMM-SETUP", "KERNEL", "INIT-TO-AGENT", "CLAIMED", "REASON"], vm_row, vm_wide),
    "flavors": ("name", ["NAME", "VCPUS", "MEMORY", "POOL-MIN", "POOL-TARGET", "MAX-AGE", "AGE"],
                ["CLONE", "TEMPLATE", "KERNEL", "INITRD", "CMDLINE-EXTRA"], flavor_row, flavor_wide),
    "pools": ("flavor", ["FLAVOR", "READY", "BOOTING", "CLAIMED", "MIN", "STATE"], ["REASON"], pool_row, pool_wide),
}


def rows_for(resource: str, items: list[dict], wide: bool) -> tuple[list[str], list[list[Any]]]:
    _key, columns, wide_columns, row, wide_row = TABLES[resource]
    if wide:
        return columns + wide_columns, [row(i) + wide_row(i) for i in items]
    return columns, [row(i) for i in items]


def document(resource: str, item: dict) -> dict:
    """What -o json|yaml prints for one object: flavors as an applicable manifest, VMs and pools as the API has them."""
    if resource != "flavors":
        return item
    from service.cli.manifest import to_manifest

    return to_manifest(item)


def fetch(client, resource: str, name: str | None, flavor: str | None, state: str | None,
          selector: str | None = None) -> list[dict]:
    if resource == "vms":
        return [client.get_vm(name)] if name else client.list_vms(flavor=flavor, state=state, selector=selector)
    if resource == "flavors":
        return [client.get_flavor(name)] if name else client.list_flavors()
    return [client.get_pool(name)] if name else client.list_pools()


SINGULAR = {"vms": "vm", "flavors": "flavor", "pools": "pool"}
FORMATS = ("wide", "json", "yaml", "name", "jsonpath=TEMPLATE")


def check_format(fmt: str | None) -> str | None:
    if fmt is None or fmt in FORMATS[:4]:
        return fmt
    if fmt.startswith("jsonpath="):
        from service.cli import jsonpath

        jsonpath.parse(fmt.partition("=")[2])  # a bad template is bad usage, before anything is fetched
        return fmt
    raise CliError(f"-o {fmt!r}: use one of {', '.join(FORMATS)}", EXIT_USAGE)


def show(resource: str, items: list[dict], fmt: str | None, *, single: bool, headers: bool = True) -> None:
    if fmt in ("json", "yaml"):
        docs = [document(resource, i) for i in items]
        output.print_doc(docs[0] if single else output.as_list(docs), fmt)
        return
    if fmt == "name":
        key = TABLES[resource][0]
        click.echo("".join(f"{SINGULAR[resource]}/{i.get(key)}\n" for i in items), nl=False)
        return
    if fmt and fmt.startswith("jsonpath="):
        from service.cli import jsonpath

        docs = [document(resource, i) for i in items]
        click.echo(jsonpath.render(fmt.partition("=")[2], docs[0] if single else output.as_list(docs)), nl=False)
        return
    if not items:
        click.echo(f"No {resource} found.", err=True)
        return
    columns, rows = rows_for(resource, items, fmt == "wide")
    output.print_table(columns, rows, header=headers)


def watch(client, resource: str, name: str | None, flavor: str | None, state: str | None, fmt: str | None,
          interval_s: float, headers: bool = True) -> None:
    """kubectl -w: the full listing first, then one row (or one document, or TYPE/NAME) per object that changed."""
    key = TABLES[resource][0]
    seen: dict[str, Any] = {}
    first = True
    while True:
        items = fetch(client, resource, name, flavor, state)
        changed = [i for i in items if seen.get(i.get(key)) != i]
        for item in items:
            seen[item.get(key)] = item
        if fmt in ("json", "yaml"):
            for item in changed:
                output.print_doc(document(resource, item), fmt, stream_sep=True)
        elif fmt == "name":
            click.echo("".join(f"{SINGULAR[resource]}/{i.get(key)}\n" for i in changed), nl=False)
        elif changed or first:
            columns, rows = rows_for(resource, changed, fmt == "wide")
            if first and not rows:
                click.echo(f"No {resource} found yet; watching.", err=True)
            output.print_table(columns, rows, header=headers and first and bool(rows))
            if rows:
                first = False
        time.sleep(interval_s)


def watch_vms(client, flavor: str | None, state: str | None, selector: str | None, fmt: str | None,
              headers: bool = True) -> None:
    """kubectl get -w on the server's watch stream: a row per change; a VM that goes prints as DELETED."""
    first = headers
    for event in client.watch_vms(flavor=flavor, state=state, selector=selector):
        vm = event.get("object") or {}
        if fmt in ("json", "yaml"):
            output.print_doc(event, fmt, stream_sep=True)
            continue
        columns, rows = rows_for("vms", [vm], fmt == "wide")
        if event.get("type") == "DELETED":
            rows = [[vm.get("id"), vm.get("flavor"), "DELETED", *row[3:]] for row in rows]
        output.print_table(columns, rows, header=first)
        first = False


@click.command("get", short_help="List VMs, flavors or pools (or show one).")
@click.argument("resource", type=ResourceRef("vms", "flavors", "pools"), metavar="vms|flavors|pools")
@click.argument("name", required=False, shell_complete=complete_names)
@click.option("-o", "--output", "fmt", metavar="FORMAT",
              help="wide, json, yaml, name (TYPE/NAME lines) or jsonpath=TEMPLATE (e.g. '{.items[*].id}').")
@click.option("--no-headers", is_flag=True, help="Tables without their header line.")
@click.option("-w", "--watch", "watching", is_flag=True, help="After listing, keep printing objects that change.")
@click.option("--flavor", help="vms only: just this flavor's VMs.")
@click.option("--state", type=click.Choice(["booting", "ready", "claimed", "stopping", "stopped", "failed"]),
              help="vms only: just VMs in this state.")
@click.option("-l", "--selector", help="vms only: a label selector (a=b,c!=d,e,!f).")
@click.option("--watch-interval", type=float, default=1.0, hidden=True)
def get(resource: str, name: str | None, fmt: str | None, no_headers: bool, watching: bool, flavor: str | None,
        state: str | None, selector: str | None, watch_interval: float) -> None:
    """List VMs, flavors or pools, or show one by NAME (a VM's id, a flavor's or pool's name) or as TYPE/NAME.

    -o json|yaml prints the API objects (a List for several); flavors print as manifests `apply -f` takes back.
    """
    fmt = check_format(fmt)
    refs = references(resource, (name,) if name else (), ("vms", "flavors", "pools"))
    if len(refs) > 1:
        raise click.UsageError("get shows one object by name: `get vm NAME` or `get vm/NAME`")
    if refs:
        resource, name = refs[0]
    else:
        from service.cli.commands.common import RESOURCE_ALIASES

        resource = RESOURCE_ALIASES[resource]
    if fmt and fmt.startswith("jsonpath=") and watching:
        raise click.UsageError("-w prints each change as it comes: use -o json|yaml|name with it, not jsonpath")
    if (flavor or state or selector) and resource != "vms":
        raise click.UsageError("--flavor, --state and -l filter VMs: use them with `get vms`")
    client = app().client
    if watching:
        try:
            if resource == "vms" and not name and fmt in (None, "wide", "json", "yaml"):
                watch_vms(client, flavor, state, selector, fmt, headers=not no_headers)
            else:
                watch(client, resource, name, flavor, state, fmt, watch_interval, headers=not no_headers)
        except KeyboardInterrupt:
            return
        return
    show(resource, fetch(client, resource, name, flavor, state, selector), fmt, single=name is not None,
         headers=not no_headers)
