"""`logs VM [-f]`: the VM's serial console; -f keeps polling and prints what is new until the VM stops."""

from __future__ import annotations

import sys
import time

import click

from service.cli.commands.common import app, complete_vm_ids, vm_name
from service.cli.errors import NotFound

TERMINAL_STATES = ("stopped", "failed")


def new_part(seen: bytes, current: bytes) -> bytes:
    """What `current` (a window over the console) adds to `seen` (the previous window).

    The server returns the console's tail: a window that grows and, once the buffer is full, slides. The new text
    follows the longest start of `current` that is an end of `seen` (found in linear time, KMP-style); when the
    window slid past everything seen, all of it is new.
    """
    if not seen or not current:
        return current
    if current.startswith(seen):
        return current[len(seen):]
    failure = [0] * len(current)
    k = 0
    for i in range(1, len(current)):
        while k and current[i] != current[k]:
            k = failure[k - 1]
        if current[i] == current[k]:
            k += 1
        failure[i] = k
    k = 0
    for ch in seen[-len(current):]:
        if k == len(current):
            k = failure[k - 1]
        while k and current[k] != ch:
            k = failure[k - 1]
        if current[k] == ch:
            k += 1
    return current[k:]


def _emit(data: bytes) -> None:
    if data:
        sys.stdout.buffer.write(data)
        sys.stdout.flush()


def last_lines(data: bytes, n: int | None) -> bytes:
    if n is None:
        return data
    return b"".join(data.splitlines(keepends=True)[-n:]) if n else b""


@click.command("logs", short_help="Print (or follow) a VM's serial console.")
@click.argument("vm", shell_complete=complete_vm_ids)
@click.option("-f", "--follow", is_flag=True, help="Keep printing new console output until the VM stops.")
@click.option("--tail", type=click.IntRange(min=0), metavar="N", help="Only the last N lines (of the last 64 KiB).")
@click.option("--poll-interval", type=float, default=0.5, hidden=True)
def logs(vm: str, follow: bool, tail: int | None, poll_interval: float) -> None:
    """Print a VM's serial console (kernel messages and what the guest writes to it)."""
    vm = vm_name(vm)
    client = app().client
    seen = client.console(vm)
    _emit(last_lines(seen, tail))
    if not follow:
        return
    try:
        while True:
            time.sleep(poll_interval)
            try:
                current = client.console(vm)
            except NotFound:
                click.echo(f"pclitectl: vm/{vm} is gone", err=True)
                return
            fresh = new_part(seen, current)
            _emit(fresh)
            seen = current
            if not fresh and client.get_vm(vm).get("state") in TERMINAL_STATES:
                _emit(new_part(seen, client.console(vm)))
                return
    except KeyboardInterrupt:
        return
