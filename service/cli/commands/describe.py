"""`describe vm|flavor NAME`: everything about one object, with a VM's boot timeline as a phase bar and its events."""

from __future__ import annotations

from typing import Any

import click

from service.cli import output
from service.cli.commands.common import ResourceRef, app, complete_names, references
from service.cli.commands.get import vm_row


def _when(value: Any) -> str:
    if not value:
        return "<none>"
    return f"{value} ({output.age(value)} ago)"


def _fields(pairs: list[tuple[str, Any]]) -> list[str]:
    from rich.markup import escape

    width = max(len(k) for k, _ in pairs) + 2
    return [f"{(k + ':').ljust(width)}{output.styled(v) if k in ('State', 'Claim') else escape(str(v))}"
            for k, v in pairs]


def _print_lines(lines: list[str]) -> None:
    from rich.text import Text

    output.print_renderable(Text.from_markup("\n".join(lines)))


def _section(title: str, renderable_lines: list[str]) -> list[str]:
    return [f"[bold]{title}:[/]"] + [f"  {line}" for line in renderable_lines]


def _table_lines(columns: list[str], rows: list[list[Any]]) -> list[str]:
    """A small table rendered to markup-free lines (kept plain so it can sit inside a section)."""
    from rich.markup import escape

    widths = [max(len(str(c)), *(len(str(r[i])) for r in rows)) for i, c in enumerate(columns)]
    lines = ["   ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip()]
    for row in rows:
        lines.append(escape("   ".join(str(v).ljust(w) for v, w in zip(row, widths, strict=True)).rstrip()))
    return lines


def describe_vm(client, vm_id: str) -> None:
    vm = client.get_vm(vm_id)
    events = client.events(vm_id)
    made = [("Source", vm.get("source") or "<unknown>")]
    if vm.get("template"):
        made.append(("Template", vm["template"]))
    lines = _fields([
        ("ID", vm.get("id")), ("Flavor", vm.get("flavor")), ("State", vm.get("state")), *made,
        ("PID", vm.get("pid") or "<none>"), ("API socket", vm.get("api_socket") or "<none>"),
        ("Created", _when(vm.get("created_at"))), ("Ready", _when(vm.get("ready_at"))),
        ("Claimed", _when(vm.get("claimed_at"))), ("Stopped", _when(vm.get("stopped_at"))),
    ] + ([("Failure", vm["failure_reason"])] if vm.get("failure_reason") else []))
    lines += _section("Boot timeline", output.phase_bar(vm.get("boot_ms")))
    if events:
        rows = [[output.age(e.get("at")), e.get("kind", ""), e.get("message", "")] for e in events]
        lines += _section("Events", _table_lines(["AGE", "KIND", "MESSAGE"], rows))
    else:
        lines.append("[bold]Events:[/]  <none>")
    _print_lines(lines)


def template_summary(template: dict | None) -> str:
    if not template:
        return "<unknown>"
    parts = [template.get("state") or "<unknown>"]
    if template.get("dir"):
        parts.append(template["dir"])
    if template.get("build_ms") is not None:
        parts.append(f"built in {template['build_ms'] / 1000:.1f}s")
    if template.get("error"):
        parts.append(template["error"])
    if template.get("retry_in_s"):
        parts.append(f"retry in {template['retry_in_s']:.0f}s")
    return ", ".join(parts)


def describe_flavor(client, name: str) -> None:
    flavor = client.get_flavor(name)
    pool = client.get_pool(name)
    vms = client.list_vms(flavor=name)
    lines = _fields([
        ("Name", flavor.get("name")), ("Kernel", flavor.get("kernel") or "<default>"),
        ("Initrd", flavor.get("initrd") or "<default>"), ("Cmdline extra", flavor.get("cmdline_extra") or "<none>"),
        ("vCPUs", flavor.get("vcpus")), ("Memory", f"{flavor.get('mem_mib')} MiB"),
        ("Max age", f"{flavor['max_age_s']}s" if flavor.get("max_age_s") else "<none>"),
        ("Clone", "yes" if flavor.get("clone", True) else "no (cold boots only)"),
        ("Template", template_summary(flavor.get("template"))),
        ("Created", _when(flavor.get("created_at"))), ("Updated", _when(flavor.get("updated_at"))),
    ])
    pool_lines = _fields([
        ("State", pool.get("state")), ("Ready", f"{pool.get('ready', 0)}/{pool.get('target', 0)}"),
        ("Min", pool.get("min", 0)), ("Booting", pool.get("booting", 0)), ("Claimed", pool.get("claimed", 0)),
    ] + ([("Reason", pool["reason"])] if pool.get("reason") else []))
    lines += _section("Pool", pool_lines)
    if vms:
        rows = [vm_row(vm) for vm in vms]
        lines += _section("VMs", _table_lines(["ID", "FLAVOR", "STATE", "BOOT", "AGE"], rows))
    else:
        lines.append("[bold]VMs:[/]  <none>")
    _print_lines(lines)


@click.command("describe", short_help="Show a VM (boot timeline, events) or a flavor.")
@click.argument("resource", type=ResourceRef("vms", "flavors"), metavar="vm|flavor")
@click.argument("names", nargs=-1, metavar="NAME", shell_complete=complete_names)
def describe(resource: str, names: tuple[str, ...]) -> None:
    """Show one VM (boot timeline, events) or one flavor (spec, pool, VMs) in detail: `vm NAME` or `vm/NAME`."""
    refs = references(resource, names, ("vms", "flavors"))
    if not refs:
        raise click.UsageError("name the object: `describe vm NAME` or `describe vm/NAME`")
    client = app().client
    for index, (kind, name) in enumerate(refs):
        if index:
            click.echo()
        describe_vm(client, name) if kind == "vms" else describe_flavor(client, name)

