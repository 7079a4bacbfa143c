"""pclitectl's entry point: the click group, global --server/--token, and the one place errors become one line.

Exit codes: 0 success; 1 any pclitectl error (server down, auth, not found, bad manifest, refused by the API);
2 bad usage; `exec`/`run -- CMD` exit with the command's own code (128+N if killed by signal N, 124 on timeout);
130 when interrupted.
"""

from __future__ import annotations

import contextlib
import os
import sys

import click

from service.cli.errors import CliError

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 110}

# Every verb, in the order `--help` lists them, as "module:attribute": a verb's module (and what it needs: rich,
# yaml, the HTTP client) is imported only when that verb runs, is completed, or --help describes it.
COMMANDS = {
    "get": "service.cli.commands.get:get",
    "describe": "service.cli.commands.describe:describe",
    "run": "service.cli.commands.run:run",
    "exec": "service.cli.commands.run:exec_",
    "logs": "service.cli.commands.logs:logs",
    "delete": "service.cli.commands.delete:delete",
    "apply": "service.cli.commands.apply:apply",
    "scale": "service.cli.commands.scale:scale",
    "top": "service.cli.commands.top:top",
    "wait": "service.cli.commands.wait:wait",
    "config": "service.cli.commands.config:config",
    "version": "service.cli.commands.version:version",
    "completion": "service.cli.commands.completion:completion",
}


class AppContext:
    """Per-invocation state: settings are resolved and the client created only when a command needs them."""

    def __init__(self, server: str | None, token: str | None, context: str | None = None):
        self.server_flag, self.token_flag, self.context_flag = server, token, context
        self._client = None

    @property
    def client(self):
        if self._client is None:
            from service.cli.client import Client
            from service.cli.config import resolve

            self._client = Client(resolve(self.server_flag, self.token_flag, self.context_flag))
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()


class LazyGroup(click.Group):
    """A group whose subcommands are named up front but imported on first use (see COMMANDS)."""

    def __init__(self, *args, lazy_commands: dict[str, str] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.lazy_commands = dict(lazy_commands or {})

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(self.lazy_commands) + [name for name in self.commands if name not in self.lazy_commands]

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        command = self.commands.get(cmd_name)
        if command is None and cmd_name in self.lazy_commands:
            import importlib

            module_name, _, attr = self.lazy_commands[cmd_name].partition(":")
            command = getattr(importlib.import_module(module_name), attr)
            self.commands[cmd_name] = command
        return command

    def resolve_command(self, ctx: click.Context, args: list[str]):
        try:
            return super().resolve_command(ctx, args)
        except click.UsageError as exc:
            # "No such command 'gett'. Did you mean 'get'?": suggest from every name, not just the imported ones.
            name = getattr(exc, "command_name", None)  # click >= 8.4's NoSuchCommand
            if name is None:
                raise
            raise type(exc)(name, possibilities=self.list_commands(ctx), ctx=exc.ctx) from None


@click.group(cls=LazyGroup, lazy_commands=COMMANDS, context_settings=CONTEXT_SETTINGS)
@click.option("--server", metavar="URL", help="pclited's URL [env PCLITE_SERVER; else `server:` in "
              "~/.config/pclite/config (PCLITE_CONFIG); else http://127.0.0.1:8080].")
@click.option("--token", metavar="TOKEN", help="API bearer token [env PCLITE_TOKEN; else `token:` in the config "
              "file pclited writes on first start].")
@click.option("--context", metavar="NAME", help="Use this context of the config file instead of its current one.")
@click.pass_context
def cli(ctx: click.Context, server: str | None, token: str | None, context: str | None) -> None:
    """Control pclited: flavors, warm pools and microVMs, kubectl-style.

    \b
    pclitectl get pools                      pool readiness per flavor
    pclitectl run default -- uname -a        claim a warm VM and run a command in it
    pclitectl apply -f flavors.yaml          create or update flavors (kind: Flavor)
    """
    app = AppContext(server, token, context)
    ctx.obj = app
    ctx.call_on_close(app.close)


def _say(message: str) -> None:
    with contextlib.suppress(OSError):
        sys.stderr.write(message.rstrip("\n") + "\n")
        sys.stderr.flush()


GLOBAL_OPTIONS = ("--server", "--token", "--context")


def hoist_global_options(argv: list[str]) -> list[str]:
    """kubectl takes its global flags anywhere on the line (`get vms --server X`): move them before the verb.

    Nothing after `--` moves (that is the guest command's), and a flag's value stays with it.
    """
    front: list[str] = []
    rest: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            rest += argv[i:]
            break
        name = arg.partition("=")[0]
        if name in GLOBAL_OPTIONS:
            if "=" in arg or i + 1 >= len(argv):
                front.append(arg)  # a missing value stays for click to report as bad usage
                i += 1
            else:
                front += argv[i:i + 2]
                i += 2
            continue
        rest.append(arg)
        i += 1
    return front + rest


def main(argv: list[str] | None = None) -> int:
    args = hoist_global_options(sys.argv[1:] if argv is None else list(argv))
    try:
        result = cli.main(args=args, prog_name="pclitectl", standalone_mode=False)
    except CliError as exc:
        _say(f"error: {exc.message}")
        return exc.exit_code
    except click.exceptions.Abort:
        _say("aborted")
        return 130
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`pclitectl get vms | head -1`): stop quietly, and keep Python from complaining.
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as exc:  # e.g. stdout on a full disk
        _say(f"error: {exc.strerror or exc}{f' ({exc.filename})' if exc.filename else ''} — pclitectl could not "
             f"finish its output")
        return 1
    except Exception as exc:  # never a traceback for users; PCLITE_DEBUG=1 shows it
        if os.environ.get("PCLITE_DEBUG"):
            raise
        _say(f"error: internal error in pclitectl ({type(exc).__name__}: {exc}) — rerun with PCLITE_DEBUG=1 "
             f"for the traceback and report it")
        return 1
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    raise SystemExit(main())
