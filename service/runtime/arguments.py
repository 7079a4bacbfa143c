"""The runc command-line grammar pclite-runtime accepts: its flags per command, Go-style flag parsing, the container
id and signal names. Imported by every runtime start, so standard library only and nothing heavy."""

from service.runtime.state import Container

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
    """Bad usage: the runtime prints the message with a pointer to --help and exits 2."""


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
    """The last value given for a value flag under any of its names (--bundle/-b), or None."""
    for name in names:
        if name in options:
            return options[name][-1]
    return None


def switch(options: dict, *names: str) -> bool:
    """A switch given under any of its names (--force/-f)."""
    return any(options.get(name) for name in names)


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
