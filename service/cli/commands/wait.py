"""`wait --for=condition=Ready|delete vm/NAME... [--timeout=60s]`: kubectl's wait, by polling.

Exit 0 once every VM meets the condition (one `vm/NAME condition met` line each); 1 with one line on timeout, or
at once when a VM can never become Ready (failed or stopped); 2 for bad usage.
"""

from __future__ import annotations

import re
import time

import click

from service.cli.commands.common import ResourceRef, app, complete_names, references
from service.cli.errors import CliError, NotFound

READY_STATES = ("ready", "claimed")
NEVER_READY = ("stopping", "stopped", "failed")
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def duration_s(text: str) -> float:
    """kubectl's durations: 60s, 1m30s, 500ms, 1h; a bare number is seconds."""
    text = text.strip()
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    parts = _DURATION.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise click.BadParameter(f"{text!r} is not a duration such as 60s, 1m30s or 500ms", param_hint="--timeout")
    return sum(float(n) * _UNIT_S[u] for n, u in parts)


def _condition(value: str) -> str:
    kind, _, arg = value.partition("=")
    if value == "delete":
        return "delete"
    if kind == "condition" and arg.lower() == "ready":
        return "ready"
    raise click.BadParameter(f"{value!r}: use condition=Ready or delete", param_hint="--for")


def _met(client, name: str, condition: str) -> bool:
    try:
        vm = client.get_vm(name)
    except NotFound:
        if condition == "delete":
            return True
        raise
    if condition == "delete":
        return False
    if vm.get("state") in NEVER_READY:
        raise CliError(f"vm/{name} is {vm.get('state')}: it will not become Ready"
                       + (f" ({vm['failure_reason']})" if vm.get("failure_reason") else ""))
    return vm.get("state") in READY_STATES


@click.command("wait", short_help="Wait for VMs to be Ready or deleted.")
@click.argument("resource", type=ResourceRef("vms"), metavar="vm/NAME...")
@click.argument("names", nargs=-1, metavar="", shell_complete=complete_names)
@click.option("--for", "for_", required=True, metavar="condition=Ready|delete", help="What to wait for.")
@click.option("--timeout", "timeout", default="30s", show_default=True, metavar="DURATION",
              help="Give up after this long (60s, 2m, 500ms); 0 checks once.")
@click.option("--poll-interval", type=float, default=0.2, hidden=True)
def wait(resource: str, names: tuple[str, ...], for_: str, timeout: str, poll_interval: float) -> None:
    """Wait until each VM is Ready (its agent answers: state ready or claimed) or deleted (gone from the API)."""
    condition = _condition(for_)
    limit_s = duration_s(timeout)
    refs = references(resource, names, ("vms",))
    if not refs:
        raise click.UsageError("name the VMs: `wait --for=condition=Ready vm/NAME`")
    client = app().client
    deadline = time.monotonic() + limit_s
    for _kind, name in dict.fromkeys(refs):
        while not _met(client, name, condition):
            left = deadline - time.monotonic()
            if left <= 0:
                raise CliError(f"timed out waiting for the condition on vm/{name}")
            time.sleep(min(poll_interval, left))
        click.echo(f"vm/{name} condition met")
