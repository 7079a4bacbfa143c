"""`run FLAVOR [--rm] [-- CMD ARGS]` (claim a warm VM, optionally run a command) and `exec VM [-i] -- CMD ARGS`.

A command's stdout and stderr are written as bytes to pclitectl's own stdout and stderr, and pclitectl exits with
the command's exit code: 128+N when a signal N killed it, 124 when it timed out (as timeout(1) does).
"""

from __future__ import annotations

import base64
import sys

import click

from service.cli import output
from service.cli.commands.common import app, complete_flavor_names, complete_vm_ids, vm_name
from service.cli.errors import CliError

EXIT_TIMED_OUT = 124
EXEC_HTTP_SLACK_S = 30.0


def _read_stdin(mode: bool | None) -> bytes | None:
    """-i: always pass stdin; -n: never; neither: pass it when it is not a terminal (a pipe or a file)."""
    if mode is False or sys.stdin is None:
        return None
    try:
        if mode is None and sys.stdin.isatty():
            return None
        data = sys.stdin.buffer.read()
    except (OSError, ValueError):
        return None
    return data if (data or mode) else None


def _env_pairs(values: tuple[str, ...]) -> dict[str, str]:
    env = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", param_hint="'-e/--env'")
        env[key] = value
    return env


def _write(stream, data: bytes) -> None:
    if data:
        stream.buffer.write(data)
        stream.flush()


def exec_in(client, vm_id: str, argv: list[str], *, stdin: bytes | None, env: dict[str, str], cwd: str | None,
            timeout_s: float | None) -> int:
    body: dict = {"argv": argv}
    if stdin is not None:
        body["stdin_b64"] = base64.b64encode(stdin).decode()
    if env:
        body["env"] = env
    if cwd:
        body["cwd"] = cwd
    if timeout_s is not None:
        body["timeout_s"] = timeout_s
    # Without --timeout the command may run as long as pclited lets it: so does the wait for its answer.
    http_timeout = timeout_s + EXEC_HTTP_SLACK_S if timeout_s is not None else None
    result = client.exec_vm(vm_id, body, timeout_s=http_timeout)
    if not isinstance(result, dict):
        raise CliError(f"pclited sent no exec result for vm/{vm_id} — see its log")
    _write(sys.stdout, base64.b64decode(result.get("stdout_b64") or ""))
    _write(sys.stderr, base64.b64decode(result.get("stderr_b64") or ""))
    for stream in ("stdout", "stderr"):
        if result.get(f"{stream}_truncated"):
            click.echo(f"pclitectl: the command's {stream} was truncated by pclited", err=True)
    if result.get("timed_out"):
        click.echo(f"pclitectl: the command timed out in vm/{vm_id}"
                   + (f" after {timeout_s:g}s" if timeout_s is not None else ""), err=True)
        return EXIT_TIMED_OUT
    if result.get("signal"):
        return 128 + int(result["signal"])
    code = result.get("exit_code")
    return int(code) & 0xFF if code is not None else 1


def _stdin_option(f):
    f = click.option("-n", "--no-stdin", "no_stdin", is_flag=True,
                     help="Never pass stdin (by default it is passed when it is not a terminal).")(f)
    return click.option("-i", "--stdin", "stdin_flag", is_flag=True, help="Pass stdin to the command.")(f)


def _exec_options(f):
    f = click.option("--timeout", "timeout_s", type=click.FloatRange(min=0, min_open=True), metavar="SECONDS",
                     help="Kill the command after this long (exit code 124).")(f)
    f = click.option("--cwd", metavar="DIR", help="Working directory in the guest.")(f)
    f = click.option("-e", "--env", "env", multiple=True, metavar="KEY=VALUE", help="Environment variable.")(f)
    return _stdin_option(f)


def _stdin_mode(stdin_flag: bool, no_stdin: bool) -> bool | None:
    if stdin_flag and no_stdin:
        raise click.UsageError("-i and -n contradict each other")
    return True if stdin_flag else (False if no_stdin else None)


@click.command("exec", short_help="Run a command in a VM; exit with its code.")
@click.argument("vm", shell_complete=complete_vm_ids)
@click.argument("command", nargs=-1, type=click.UNPROCESSED, metavar="-- CMD [ARGS]...")
@_exec_options
def exec_(vm: str, command: tuple[str, ...], stdin_flag: bool, no_stdin: bool, env: tuple[str, ...],
          cwd: str | None, timeout_s: float | None) -> None:
    """Run CMD in a VM; its output goes to stdout/stderr and pclitectl exits with its exit code."""
    if not command:
        raise click.UsageError("exec needs a command: pclitectl exec VM -- CMD [ARGS]...")
    mode = _stdin_mode(stdin_flag, no_stdin)
    code = exec_in(app().client, vm_name(vm), list(command), stdin=_read_stdin(mode), env=_env_pairs(env), cwd=cwd,
                   timeout_s=timeout_s)
    click.get_current_context().exit(code)


@click.command("run", short_help="Claim a warm VM; optionally run a command in it.")
@click.argument("flavor", shell_complete=complete_flavor_names)
@click.argument("command", nargs=-1, type=click.UNPROCESSED, metavar="[-- CMD [ARGS]...]")
@click.option("--rm", "remove", is_flag=True, help="Delete the VM when the command ends.")
@click.option("--no-wait", is_flag=True, help="Fail at once if the pool has no ready VM instead of waiting.")
@click.option("-o", "--output", "fmt", type=click.Choice(["name", "json", "yaml"]),
              help="Without a command: how to print the claimed VM (default: a line; `name`: just its id).")
@_exec_options
def run(flavor: str, command: tuple[str, ...], remove: bool, no_wait: bool, fmt: str | None, stdin_flag: bool,
        no_stdin: bool, env: tuple[str, ...], cwd: str | None, timeout_s: float | None) -> None:
    """Claim a VM of FLAVOR from its warm pool; with -- CMD, run it there and exit with its code."""
    if remove and not command:
        raise click.UsageError("--rm deletes the VM after its command: give one with -- CMD [ARGS]...")
    if fmt and command:
        raise click.UsageError("-o prints the claimed VM and only applies without a command")
    mode = _stdin_mode(stdin_flag, no_stdin)
    environment = _env_pairs(env)
    stdin = _read_stdin(mode) if command else None  # read before claiming: a bad input leaves no VM behind
    client = app().client
    try:
        vm = client.claim_vm(flavor, wait=not no_wait)
    except CliError as exc:
        if exc.status == 503 and no_wait:
            raise CliError(f"{exc.message} (or drop --no-wait to wait for a VM)", status=503) from None
        raise
    vm_id = vm.get("id")
    if not command:
        if fmt == "name":
            click.echo(vm_id)
        elif fmt in ("json", "yaml"):
            output.print_doc(vm, fmt)
        else:
            click.echo(f"vm/{vm_id} claimed from pool {flavor} ({vm.get('claim', 'claimed')})")
        return
    if sys.stderr.isatty():
        click.echo(f"vm/{vm_id} claimed from pool {flavor} ({vm.get('claim', 'claimed')})", err=True)
    code = 1
    try:
        code = exec_in(client, vm_id, list(command), stdin=stdin, env=environment, cwd=cwd, timeout_s=timeout_s)
    except CliError as exc:
        if remove:
            raise
        raise CliError(f"{exc.message} (vm/{vm_id} stays claimed: `pclitectl delete vm {vm_id}`)",
                       status=exc.status) from None
    finally:
        if remove:
            try:
                client.delete_vm(vm_id)
            except CliError as exc:
                click.echo(f"pclitectl: could not delete vm/{vm_id}: {exc.message}", err=True)
    click.get_current_context().exit(code)
