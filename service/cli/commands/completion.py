"""`completion bash|zsh|fish`: print the shell completion script (names of VMs and flavors complete too)."""

from __future__ import annotations

import click


@click.command("completion")
@click.argument("shell", type=click.Choice(["bash", "zsh", "fish"]))
@click.pass_context
def completion(ctx: click.Context, shell: str) -> None:
    """Print a completion script for SHELL.

    \b
    bash:  source <(pclitectl completion bash)      (or save it under /etc/bash_completion.d/)
    zsh:   source <(pclitectl completion zsh)
    fish:  pclitectl completion fish > ~/.config/fish/completions/pclitectl.fish
    """
    from click.shell_completion import get_completion_class

    root = ctx.find_root()
    cls = get_completion_class(shell)
    script = cls(root.command, {}, "pclitectl", "_PCLITECTL_COMPLETE").source()
    click.echo(script)
