"""A minimal `--flag value` parser for the VMM: argparse alone costs ~0.1 s of start-up in the lab."""

from __future__ import annotations


class UsageError(Exception):
    pass


def parse_options(argv: list[str], spec: dict[str, tuple[type, object]], usage: str) -> dict:
    """spec maps '--name' → (type, default); type bool makes a flag. Returns {name: value} with dashes → '_'."""
    values = {name.lstrip("-").replace("-", "_"): default for name, (_, default) in spec.items()}
    index = 0
    while index < len(argv):
        arg = argv[index]
        name, eq, inline = arg.partition("=")
        if arg in ("-h", "--help"):
            raise UsageError(usage)
        if name not in spec:
            raise UsageError(f"unknown option {arg!r}\n{usage}")
        kind, _ = spec[name]
        key = name.lstrip("-").replace("-", "_")
        if kind is bool:
            values[key] = True
            index += 1
            continue
        if eq:
            raw = inline
            index += 1
        elif index + 1 < len(argv):
            raw = argv[index + 1]
            index += 2
        else:
            raise UsageError(f"{name} needs a value\n{usage}")
        try:
            values[key] = kind(raw)
        except ValueError:
            raise UsageError(f"{name} wants {kind.__name__}, got {raw!r}\n{usage}") from None
    missing = [name for name, (_, default) in spec.items() if default is REQUIRED and
               values[name.lstrip("-").replace("-", "_")] is REQUIRED]
    if missing:
        raise UsageError(f"missing {', '.join(missing)}\n{usage}")
    return values


REQUIRED = object()
