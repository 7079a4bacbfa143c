"""pclite-runtime: an OCI runtime CLI (the runc subset containerd's io.containerd.runc.v2 shim calls) whose
containers are pclite microVMs claimed from pclited.

  pclite-runtime [--root DIR] [--log FILE] [--log-format text|json] COMMAND [OPTIONS] ID
    create --bundle DIR [--pid-file F] [--console-socket S] ID   claim a VM, give it the bundle's rootfs, wait
    start ID                              run the container's process in its VM
    state ID                              OCI state JSON
    kill [--all] ID [SIGNAL]              signal the process (SIGTERM by default)
    delete [--force] ID                   release the VM and forget the container
    exec --process FILE [--detach] [--pid-file F] [--console-socket S] ID    another process in the same VM
    ps [--format table|json] ID           host pids of the container's stand-in processes
    pause ID | resume ID                  freeze or thaw the VM's vCPUs
    features                              what this runtime supports (JSON)

The VM's flavor comes from the annotation `pclite.flavor` (default `default`); pclited from PCLITE_SERVER and
PCLITE_TOKEN, else pclitectl's config file. Errors: one line on stderr and in --log; exit 1 (2 for bad usage).
"""

import sys
import time

from service.runtime.arguments import COMMANDS, GLOBAL_SWITCHES, GLOBAL_VALUES, Usage, one, parse_flags, switch
from service.runtime.state import DEFAULT_ROOT, Log, RuntimeFailure, die


def main(argv: list[str] | None = None) -> int:
    entered = time.clock_gettime(time.CLOCK_BOOTTIME)
    argv = sys.argv[1:] if argv is None else argv
    log = Log()
    try:
        options, rest = parse_flags(argv, GLOBAL_VALUES, GLOBAL_SWITCHES, False)
        log = Log(one(options, "log"), one(options, "log-format") or "text")
        if switch(options, "version", "v"):
            print("pclite-runtime version 0.1.0\nspec: 1.0.2")
            return 0
        if not rest or switch(options, "help", "h"):
            print(__doc__)
            return 0 if not rest else 2
        command, args = rest[0], rest[1:]
        if command not in COMMANDS:
            raise Usage(f"unknown command {command!r}")
        values, switches = COMMANDS[command]
        cmd_options, positional = parse_flags(args, values, switches, command != "exec")
        root = one(options, "root") or DEFAULT_ROOT
        if command in ("start", "delete"):  # what containerd waits on: the lean module
            from service.runtime import quick_commands as handlers
        else:
            from service.runtime import commands as handlers
        code = getattr(handlers, "cmd_" + command)(root, cmd_options, positional, log) or 0
        if log.copy:
            force = " --force" if switch(cmd_options, "force", "f") else ""
            _log_duration(log, command + force, positional, entered)
        return code
    except Usage as exc:
        log.error(f"{exc}: see `pclite-runtime --help`")
        if log.path:
            print(f"pclite-runtime: {exc}", file=sys.stderr)
        return 2
    except RuntimeFailure as exc:
        die(log, str(exc))
    except KeyboardInterrupt:
        return 130
    return 1


def _log_duration(log: Log, command: str, positional: list[str], entered: float) -> None:
    """For PCLITE_RUNTIME_LOG: this invocation's time since exec (/proc's start time, in clock ticks), and how much
    of it passed before main() (the interpreter's start-up and imports)."""
    import os
    try:
        with open("/proc/self/stat", "rb") as f:
            ticks = int(f.read().rsplit(b")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return
    started = ticks / os.sysconf("SC_CLK_TCK")
    now = time.clock_gettime(time.CLOCK_BOOTTIME)
    log.info(f"{command} {positional[0] if positional else '-'}: {(now - started) * 1000:.0f} ms from exec to exit, "
             f"{(entered - started) * 1000:.0f} ms of it before main()")


if __name__ == "__main__":
    sys.exit(main())
