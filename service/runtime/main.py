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

from service.runtime import state as st
from service.runtime.state import Container, Log, RuntimeFailure

FLAVOR_ANNOTATION = "pclite.flavor"
START_TIMEOUT_S = 60.0
SIGNALS = {"HUP": 1, "INT": 2, "QUIT": 3, "ILL": 4, "TRAP": 5, "ABRT": 6, "BUS": 7, "FPE": 8, "KILL": 9, "USR1": 10,
           "SEGV": 11, "USR2": 12, "PIPE": 13, "ALRM": 14, "TERM": 15, "STKFLT": 16, "CHLD": 17, "CONT": 18,
           "STOP": 19, "TSTP": 20, "TTIN": 21, "TTOU": 22, "URG": 23, "XCPU": 24, "XFSZ": 25, "VTALRM": 26,
           "PROF": 27, "WINCH": 28, "IO": 29, "PWR": 30, "SYS": 31}
# Flags per command: value flags take an argument; the rest are switches. Unknown runc flags are refused.
GLOBAL_VALUES = {"root", "log", "log-format", "criu", "rootless"}
GLOBAL_SWITCHES = {"debug", "systemd-cgroup", "help", "h", "version", "v"}
COMMANDS = {
    "create": ({"bundle", "b", "pid-file", "console-socket", "preserve-fds"}, {"no-pivot", "no-new-keyring"}),
    "start": (set(), set()), "state": (set(), set()), "pause": (set(), set()), "resume": (set(), set()),
    "kill": (set(), {"all", "a"}), "delete": (set(), {"force", "f"}), "features": (set(), set()),
    "exec": ({"process", "p", "pid-file", "console-socket", "cwd", "env", "e", "user", "u", "preserve-fds"},
             {"detach", "d", "tty", "t", "no-new-privs"}),
    "ps": ({"format", "f"}, set()), "update": ({"resources", "r"}, set()),
}


class Usage(Exception):
    pass


def parse_flags(args: list[str], values: set[str], switches: set[str], anywhere: bool):
    """Go-style flags (-x, --x, --x=v, --x v) → (options, positional). anywhere: flags may follow positional
    arguments too (`delete ID --force`); otherwise the first positional argument ends the flags."""
    options: dict[str, object] = {}
    positional: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if arg == "--":
            positional += args[i:]
            break
        if not arg.startswith("-") or arg == "-":
            positional.append(arg)
            if not anywhere:
                positional += args[i:]
                break
            continue
        name, eq, value = arg.lstrip("-").partition("=")
        if name in values:
            if not eq:
                if i >= len(args):
                    raise Usage(f"flag --{name} needs a value")
                value, i = args[i], i + 1
            options.setdefault(name, []).append(value)  # repeatable (exec --env)
        elif name in switches:
            options[name] = value.lower() not in ("false", "0") if eq else True
        else:
            raise Usage(f"unknown flag {arg}")
    return options, positional


def one(options: dict, *names: str) -> str | None:
    for name in names:
        if name in options:
            return options[name][-1]
    return None


def main(argv: list[str] | None = None) -> int:
    entered = time.clock_gettime(time.CLOCK_BOOTTIME)
    argv = sys.argv[1:] if argv is None else argv
    log = Log()
    try:
        options, rest = parse_flags(argv, GLOBAL_VALUES, GLOBAL_SWITCHES, False)
        log = Log(one(options, "log"), one(options, "log-format") or "text")
        if options.get("version") or options.get("v"):
            print("pclite-runtime version 0.1.0\nspec: 1.0.2")
            return 0
        if not rest or options.get("help") or options.get("h"):
            print(__doc__)
            return 0 if not rest else 2
        command, args = rest[0], rest[1:]
        if command not in COMMANDS:
            raise Usage(f"unknown command {command!r}")
        values, switches = COMMANDS[command]
        cmd_options, positional = parse_flags(args, values, switches, command != "exec")
        root = one(options, "root") or st.DEFAULT_ROOT
        if command == "delete" and (cmd_options.get("force") or cmd_options.get("f")) and positional and \
                not container_of(root, positional).exists():
            code = 0  # containerd's cleanup after every task delete: answer before importing anything more
        else:
            if command in ("start", "delete"):
                from service.runtime import light as commands
            else:
                from service.runtime import commands
            code = getattr(commands, "cmd_" + command)(root, cmd_options, positional, log) or 0
        if log.copy:
            force = " --force" if cmd_options.get("force") or cmd_options.get("f") else ""
            _log_duration(log, command + force, positional, entered)
        return code
    except Usage as exc:
        log.error(f"{exc}: see `pclite-runtime --help`")
        if log.path:
            print(f"pclite-runtime: {exc}", file=sys.stderr)
        return 2
    except RuntimeFailure as exc:
        st.die(log, str(exc))
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


def container_of(root: str, positional: list[str]) -> Container:
    if not positional:
        raise Usage("the container id is missing")
    return Container(root, positional[0])


def signal_number(text: str) -> int:
    name = text.upper().removeprefix("SIG")
    if name.isdigit() and 0 < int(name) < 65:
        return int(name)
    if name in SIGNALS:
        return SIGNALS[name]
    raise Usage(f"unknown signal {text!r}: use a number or a name like TERM, KILL, SIGINT")


def now_iso() -> str:
    now = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1e9):09d}Z"


def print_json(data) -> None:
    from service.runtime.jsonlite import dumps
    sys.stdout.write(dumps(data, indent=2) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(main())
