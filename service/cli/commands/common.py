"""Helpers shared by the verbs: the app context, resource-name aliases, and shell completion of names."""

from __future__ import annotations

import click

RESOURCE_ALIASES = {
    "vm": "vms", "vms": "vms",
    "flavor": "flavors", "flavors": "flavors",
    "pool": "pools", "pools": "pools",
}


def app(ctx: click.Context | None = None):
    """The AppContext set up by the root group (its lazily created API client is `.client`)."""
    return (ctx or click.get_current_context()).find_root().obj


def resource_choice(*names: str) -> click.Choice:
    return click.Choice([alias for alias, canon in RESOURCE_ALIASES.items() if canon in names])


def _completion_client(ctx: click.Context):
    from service.cli.client import Client
    from service.cli.config import resolve

    params = ctx.find_root().params
    return Client(resolve(params.get("server"), params.get("token")), timeout_s=2.0)


def complete_vm_ids(ctx: click.Context, _param, incomplete: str) -> list[str]:
    try:
        with _completion_client(ctx) as client:
            return [vm["id"] for vm in client.list_vms() if str(vm.get("id", "")).startswith(incomplete)]
    except Exception:  # completion must never fail loudly
        return []


def complete_flavor_names(ctx: click.Context, _param, incomplete: str) -> list[str]:
    try:
        with _completion_client(ctx) as client:
            return [f["name"] for f in client.list_flavors() if str(f.get("name", "")).startswith(incomplete)]
    except Exception:
        return []


def complete_names(ctx: click.Context, param, incomplete: str) -> list[str]:
    """VM ids or flavor names, by the RESOURCE argument before it."""
    if RESOURCE_ALIASES.get(ctx.params.get("resource") or "") in ("flavors", "pools"):
        return complete_flavor_names(ctx, param, incomplete)
    return complete_vm_ids(ctx, param, incomplete)


class ResourceRef(click.ParamType):
    """A resource type (`vm`, `flavors`, ...) or kubectl's `TYPE/NAME` (`vm/vm-1`): the raw text, checked."""

    name = "resource"

    def __init__(self, *canon: str):
        self.allowed = [alias for alias, c in RESOURCE_ALIASES.items() if c in canon]

    def convert(self, value, param, ctx):
        kind, slash, name = str(value).partition("/")
        if kind not in self.allowed or (slash and not name):
            shown = f"{kind!r}" if slash and kind not in self.allowed else repr(value)
            choices = ", ".join(repr(a) for a in self.allowed)
            self.fail(f"{shown} is not one of {choices} (or TYPE/NAME such as vm/vm-1)", param, ctx)
        return value

    def shell_complete(self, ctx, param, incomplete):
        from click.shell_completion import CompletionItem

        return [CompletionItem(a) for a in self.allowed if a.startswith(incomplete)]


def references(resource: str, names: tuple[str, ...] | list[str], allowed: tuple[str, ...]) -> list[tuple[str, str]]:
    """(canonical type, name) pairs from `TYPE NAME...` or `TYPE/NAME...`, kubectl's two forms (not mixed)."""
    if "/" not in resource:
        return [(RESOURCE_ALIASES[resource], name) for name in names]
    refs = []
    for item in (resource, *names):
        kind, slash, name = item.partition("/")
        if not slash or not name:
            raise click.UsageError(f"{item!r}: with TYPE/NAME, give every object as TYPE/NAME (e.g. vm/vm-1)")
        if RESOURCE_ALIASES.get(kind) not in allowed:
            raise click.UsageError(f"{item!r}: the type must be one of "
                                   f"{', '.join(a for a, c in RESOURCE_ALIASES.items() if c in allowed)}")
        refs.append((RESOURCE_ALIASES[kind], name))
    return refs


def vm_name(value: str) -> str:
    """A VM's id, given bare or as `vm/ID` (what pclitectl itself prints)."""
    kind, slash, name = value.partition("/")
    if not slash:
        return value
    if RESOURCE_ALIASES.get(kind) != "vms" or not name:
        raise click.UsageError(f"{value!r} is not a VM: give its id or vm/ID")
    return name
