"""Everything pclitectl prints: kubectl-style tables, -o json|yaml documents, ages, durations and the boot bar."""

from __future__ import annotations

import os
import sys
from datetime import UTC, datetime
from typing import Any

API_VERSION = "pclite/v1"
PHASES = ("vmm_setup", "kernel", "init_to_agent")
PHASE_GLYPHS = {"vmm_setup": "█", "kernel": "▓", "init_to_agent": "▒"}
PHASE_COLORS = {"vmm_setup": "magenta", "kernel": "blue", "init_to_agent": "green"}
STATE_COLORS = {"ready": "green", "ok": "green", "booting": "yellow", "claimed": "cyan", "failed": "red",
                "degraded": "red", "stopping": "dim", "stopped": "dim", "hit": "green", "miss": "yellow"}

_console = None


def console():
    """A rich console on stdout: colour only on a terminal, and never wrapping tables when piped."""
    global _console
    if _console is None:
        from rich.console import Console

        tty = sys.stdout.isatty()
        _console = Console(highlight=False, soft_wrap=True, width=None if tty else 100_000)
    return _console


def styled(value: Any) -> str:
    """A table cell: known states coloured on a terminal (markup is escaped otherwise)."""
    from rich.markup import escape

    text = escape("" if value is None else str(value))
    color = STATE_COLORS.get(str(value))
    return f"[{color}]{text}[/]" if color else text


def print_renderable(renderable: Any) -> None:
    out = console()
    with out.capture() as cap:
        out.print(renderable)
    text = "\n".join(line.rstrip() for line in cap.get().splitlines())
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def table(columns: list[str], rows: list[list[Any]], *, header: bool = True):
    from rich.table import Table

    grid = Table(box=None, show_header=header, header_style="bold", pad_edge=False, padding=(0, 3, 0, 0),
                 show_edge=False)
    for column in columns:
        grid.add_column(column, no_wrap=True)
    for row in rows:
        grid.add_row(*(styled(cell) for cell in row))
    return grid


def _plain_terminal() -> bool:
    """Whether rich would print to stdout without any styling: not a terminal, and not told to pretend one is."""
    env = os.environ
    if env.get("TTY_COMPATIBLE") == "1" or env.get("FORCE_COLOR"):
        return False
    try:
        return not sys.stdout.isatty()
    except (AttributeError, ValueError):
        return False


def _plain_table(columns: list[str], rows: list[list[Any]], header: bool) -> list[str] | None:
    """The lines rich renders for `table()` when nothing is styled, or None when only rich knows (not plain ASCII).

    Columns are as wide as their widest cell, each but the last followed by 3 spaces, lines right-stripped.
    """
    grid = [list(columns)] if header else []
    grid += [["" if cell is None else str(cell) for cell in row] for row in rows]
    for line in grid:
        for cell in line:
            if not (cell.isascii() and cell.isprintable()) or "\\" in cell:  # rich's markup escaping of \ is lossy
                return None
    if not grid:
        return None
    widths = [max(len(line[i]) for line in grid) for i in range(len(columns))]
    if sum(widths) + 3 * len(widths) > 10_000:
        return None
    return ["   ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
            for line in grid]


def print_table(columns: list[str], rows: list[list[Any]], *, header: bool = True) -> None:
    if not rows and header:
        return
    if _plain_terminal() and all(len(row) == len(columns) for row in rows):
        lines = _plain_table(columns, rows, header)
        if lines is not None:  # as rich would print it, without importing rich (most of a short run's time)
            sys.stdout.write("\n".join(lines) + "\n")
            sys.stdout.flush()
            return
    print_renderable(table(columns, rows, header=header))


def dump(data: Any, fmt: str) -> str:
    if fmt == "json":
        import json

        return json.dumps(data, indent=2, ensure_ascii=False) + "\n"
    import yaml

    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False, allow_unicode=True)


def print_doc(data: Any, fmt: str, *, stream_sep: bool = False) -> None:
    """One -o json|yaml document; in a watch stream, yaml documents are separated by `---`."""
    if stream_sep and fmt == "yaml":
        sys.stdout.write("---\n")
    if stream_sep and fmt == "json":
        import json

        sys.stdout.write(json.dumps(data, ensure_ascii=False) + "\n")
    else:
        sys.stdout.write(dump(data, fmt))
    sys.stdout.flush()


def as_list(items: list[Any]) -> dict:
    return {"apiVersion": API_VERSION, "kind": "List", "items": items}


def parse_time(value: Any) -> datetime | None:
    if value in (None, ""):
        return None
    if isinstance(value, int | float):
        return datetime.fromtimestamp(value, UTC)
    try:
        parsed = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def age(value: Any, now: datetime | None = None) -> str:
    """kubectl's AGE: 42s, 5m10s, 3h, 2d4h."""
    then = parse_time(value)
    if then is None:
        return "<none>"
    seconds = int(max(0.0, ((now or datetime.now(UTC)) - then).total_seconds()))
    if seconds < 120:
        return f"{seconds}s"
    minutes, hours, days = seconds // 60, seconds // 3600, seconds // 86400
    if minutes < 10:
        return f"{minutes}m{seconds % 60}s"
    if hours < 3:
        return f"{minutes}m"
    if hours < 8:
        return f"{hours}h{minutes % 60}m"
    if days < 2:
        return f"{hours}h"
    return f"{days}d{hours % 24}h" if days < 8 else f"{days}d"


def ms(value: Any) -> str:
    if value is None:
        return "<none>"
    value = float(value)
    if value >= 10_000:
        return f"{value / 1000:.1f}s"
    return f"{value:.0f}ms" if value >= 10 else f"{value:.1f}ms"


def seconds_as_ms(value: float | None) -> str:
    return "-" if value is None else ms(value * 1000.0)


def _shares(values: list[float], width: int) -> list[int]:
    """Split `width` cells in proportion to `values`; every non-zero value gets at least one cell."""
    total = sum(values)
    raw = [width * v / total for v in values]
    cells = [max(1, int(r)) if v > 0 else 0 for r, v in zip(raw, values, strict=True)]
    while sum(cells) < width:
        index = max(range(len(cells)), key=lambda i: (raw[i] - cells[i]) if values[i] > 0 else -1e9)
        cells[index] += 1
    while sum(cells) > width:
        index = max(range(len(cells)), key=lambda i: cells[i])
        cells[index] -= 1
    return cells


def phase_bar(boot_ms: dict | None, *, width: int = 48) -> list[str]:
    """The boot timeline as a bar whose segments are the phases in order, plus a legend line with their times.

    Each phase has its own glyph so the bar reads without colour; on a terminal the segments are coloured too.
    """
    if not boot_ms:
        return ["(no boot timeline: the VM has not reached its agent)"]
    parts = [(phase, float(boot_ms.get(phase) or 0.0)) for phase in PHASES]
    measured = sum(v for _, v in parts)
    total = float(boot_ms.get("total") or measured)
    if measured <= 0:
        return [f"total {ms(total)}"]
    cells = list(zip((p for p, _ in parts), _shares([v for _, v in parts], width), strict=True))
    bar = "".join(f"[{PHASE_COLORS[p]}]{PHASE_GLYPHS[p] * n}[/]" for p, n in cells if n)
    legend = "  ".join(f"{PHASE_GLYPHS[p]} {p} {ms(v)}" for p, v in parts)
    return [f"{bar}  total {ms(total)}", legend]
