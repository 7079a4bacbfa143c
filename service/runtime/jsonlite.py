"""JSON for the runtime without the json package: `import json` pulls in re, enum, functools and collections, ~0.2 s
of every runtime start in the lab. The C accelerator _json does the parsing (json's own fast path) and escapes
strings; the rest is a few lines. Falls back to json where _json is missing.
"""

WHITESPACE = " \t\n\r"

try:
    import _json
except ImportError:  # an interpreter without the accelerator: the real thing, at its price
    _json = None


class _Context:
    """What _json.make_scanner reads from a json.JSONDecoder: plain dicts, ints and floats, strict strings."""
    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    memo: dict = {}

    @staticmethod
    def parse_constant(name: str):
        raise ValueError(f"{name} is not valid JSON")


if _json is not None:
    _scan = _json.make_scanner(_Context)
    _string = _json.encode_basestring_ascii


def loads(text: str | bytes):
    """A JSON document → Python values; ValueError (as json raises) when it is not one."""
    if _json is None:
        import json
        return json.loads(text)
    if isinstance(text, bytes | bytearray):
        text = bytes(text).decode()
    start = len(text) - len(text.lstrip(WHITESPACE))
    try:
        value, end = _scan(text, start)
    except StopIteration as exc:
        raise ValueError(f"not JSON: nothing valid at character {exc.value}") from None
    if text[end:].strip(WHITESPACE):
        raise ValueError(f"not JSON: extra data at character {end}")
    return value


def dumps(value, indent: int | None = None, _level: int = 0) -> str:
    """Python values (dict, list, tuple, str, int, float, bool, None) → JSON, ASCII only, like json.dumps."""
    if _json is None:
        import json
        return json.dumps(value, indent=indent)
    if isinstance(value, str):
        return _string(value)
    if value is None:
        return "null"
    if value is True or value is False:
        return "true" if value else "false"
    if isinstance(value, int):
        return int.__repr__(value)
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError(f"{value!r} has no JSON form")
        return float.__repr__(value)
    if isinstance(value, dict):
        items = [f"{_string(k if isinstance(k, str) else dumps(k))}: {dumps(v, indent, _level + 1)}"
                 for k, v in value.items()]
        return _wrap("{", items, "}", indent, _level)
    if isinstance(value, list | tuple):
        return _wrap("[", [dumps(v, indent, _level + 1) for v in value], "]", indent, _level)
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def _wrap(open_: str, items: list[str], close: str, indent: int | None, level: int) -> str:
    if indent is None or not items:
        return open_ + ", ".join(items) + close
    inner, outer = "\n" + " " * indent * (level + 1), "\n" + " " * indent * level
    return open_ + inner + ("," + inner).join(items) + outer + close
