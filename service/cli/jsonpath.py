"""kubectl's `-o jsonpath=TEMPLATE`, the subset scripts use: text with `{PATH}` parts, PATH made of `.field`,
`[N]` (negative from the end), `[*]` and `..`-free steps from the root (`$` or `.`), plus `{"\\n"}`-style literals.
Several results of one PATH print space-separated, as kubectl does. Filters, ranges and `range/end` are refused
with one line rather than guessed at: a tiny parser here beats a dependency for what pclitectl's objects need."""

from __future__ import annotations

import json
import re
from typing import Any

from service.cli.errors import EXIT_USAGE, CliError

_STEP = re.compile(r"\.([A-Za-z_][A-Za-z0-9_-]*)|\[(\*|-?\d+)\]|\['([^']*)'\]")
_LITERAL_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", '"': '"', "\\": "\\"}


def _bad(template: str, why: str) -> CliError:
    return CliError(f"jsonpath {template!r}: {why} — supported: {{.a.b}}, {{.items[*].id}}, {{.items[0]}}, "
                    f"{{\"\\n\"}}", EXIT_USAGE)


def _steps(path: str, template: str) -> list[tuple[str, Any]]:
    body = path[1:] if path.startswith("$") else path
    if body and not body.startswith((".", "[")):
        body = "." + body
    steps, at = [], 0
    if body == ".":
        return steps
    while at < len(body):
        match = _STEP.match(body, at)
        if match is None:
            raise _bad(template, f"cannot read {body[at:]!r}")
        field, index, quoted = match.groups()
        if field is not None or quoted is not None:
            steps.append(("field", field if field is not None else quoted))
        elif index == "*":
            steps.append(("all", None))
        else:
            steps.append(("index", int(index)))
        at = match.end()
    return steps


def _walk(values: list[Any], steps: list[tuple[str, Any]]) -> list[Any]:
    for kind, arg in steps:
        out: list[Any] = []
        for value in values:
            if kind == "field" and isinstance(value, dict) and arg in value:
                out.append(value[arg])
            elif kind == "all" and isinstance(value, list):
                out += value
            elif kind == "all" and isinstance(value, dict):
                out += list(value.values())
            elif kind == "index" and isinstance(value, list) and -len(value) <= arg < len(value):
                out.append(value[arg])
        values = out
    return values


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if value is None:
        return ""
    return json.dumps(value, ensure_ascii=False)


def parse(template: str) -> list[tuple[str, Any]]:
    """The template as parts: ("text", str) or ("path", steps); bad templates raise a usage error."""
    parts: list[tuple[str, Any]] = []
    at = 0
    while at < len(template):
        start = template.find("{", at)
        if start < 0:
            parts.append(("text", template[at:]))
            break
        if start > at:
            parts.append(("text", template[at:start]))
        end = template.find("}", start)
        if end < 0:
            raise _bad(template, "unclosed {")
        expr = template[start + 1:end].strip()
        if len(expr) >= 2 and expr[0] == expr[-1] == '"':
            parts.append(("text", re.sub(r"\\(.)", lambda m: _LITERAL_ESCAPES.get(m.group(1), m.group(0)),
                                         expr[1:-1])))
        elif expr.startswith(("$", ".")) or re.fullmatch(r"[A-Za-z_][\w.\[\]*'-]*", expr or "-"):
            if expr.startswith(("range", "end")) or "?" in expr or ".." in expr:
                raise _bad(template, f"{expr!r} is beyond the supported subset")
            parts.append(("path", _steps(expr, template)))
        else:
            raise _bad(template, f"{expr!r} is not a path")
        at = end + 1
    return parts


def render(template: str, data: Any) -> str:
    out = []
    for kind, arg in parse(template):
        out.append(arg if kind == "text" else " ".join(_text(v) for v in _walk([data], arg)))
    return "".join(out)
