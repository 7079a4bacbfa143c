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
