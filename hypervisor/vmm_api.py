"""The VMM control API contract: its routes, field names, limits and error body, the one validator of each request
(the VMM's server runs it; pclited's exec schema too), the requests every client sends (VmmCalls, over any
transport) and the one decoder of error answers (the VMM's {"error"} and pclited's problem+json alike).

Served by hypervisor/control.py (one handler per route, named as here) through hypervisor/api_server.py; used by
hypervisor/client.py (pclited, `python -m hypervisor exec`) and service/runtime/transport.py (the OCI runtime).
Both the VMM and the OCI runtime import it at start-up: no json, re, base64, enum or dataclasses here.

  GET  /status               state, boot timeline, exit counters, devices, agent readiness
  GET  /agent/ping           agent round trip
  POST /exec                 EXEC_FIELDS; "stream": NDJSON output; "interactive": stdin stays open for
                             /exec/stdin, the first line is {"started": {"exec_id", "pid"}}, killed if the client goes
  PUT  /actions              {"action": "shutdown" | "pause" | "resume"}
  GET  /console?tail=N       the last N bytes of the serial console (text/plain)
  PUT  /snapshot             {"dir", "resume"}: pause, write DIR (hypervisor/snapshot.py), resume
  PUT  /drives/rootfs        {"path": FILE | null, "read_only", "wait_s"}: swap the disk's backing file
  POST /mounts               MOUNT_FIELDS, or {"mounts": [...]} done in order, the first error reported
  PUT  /hostname             {"hostname"}
  POST /exec/stdin|signal|resize   {"exec_id", "data_b64", "eof"} | {"exec_id", "signal"} | {"exec_id", "rows", "cols"}
Errors: {"error": one sentence that says what to do} with a 4xx/5xx status.
"""

from binascii import Error as _Base64Error
from binascii import a2b_base64, b2a_base64

# name -> (method, path); the server's handler for a route is Controller.<name>
ROUTES = {
    "status": ("GET", "/status"),
    "ping": ("GET", "/agent/ping"),
    "exec": ("POST", "/exec"),
    "actions": ("PUT", "/actions"),
    "console": ("GET", "/console"),
    "snapshot": ("PUT", "/snapshot"),
    "drive": ("PUT", "/drives/rootfs"),
    "mounts": ("POST", "/mounts"),
    "hostname": ("PUT", "/hostname"),
    "exec_stdin": ("POST", "/exec/stdin"),
    "exec_signal": ("POST", "/exec/signal"),
    "exec_resize": ("POST", "/exec/resize"),
}
PROCESS_FIELDS = ("tty", "root", "user", "rlimits", "size")
EXEC_FIELDS = ("argv", "env", "cwd", "stdin_b64", "timeout_s", "output_cap", "stream", "interactive", *PROCESS_FIELDS)
MOUNT_FIELDS = ("source", "target", "fstype", "flags", "data", "mkdir")
FIELDS = {  # the JSON body fields each route takes (a field not listed is refused)
    "status": (), "ping": (), "console": (), "exec": EXEC_FIELDS, "actions": ("action",),
    "snapshot": ("dir", "resume"), "drive": ("path", "read_only", "wait_s"), "mounts": ("mounts", *MOUNT_FIELDS),
    "hostname": ("hostname",), "exec_stdin": ("exec_id", "data_b64", "eof"), "exec_signal": ("exec_id", "signal"),
    "exec_resize": ("exec_id", "rows", "cols"),
}
ACTIONS = ("shutdown", "pause", "resume")

MAX_HEADER_BYTES = 16 << 10
MAX_BODY_BYTES = 64 << 20
MAX_ARGS = 4096
MAX_PATH = 4096
MAX_TIMEOUT_S = 86400
MAX_EXEC_STDIN = 16 << 20  # inline stdin of one exec; interactive processes stream theirs through /exec/stdin
DEFAULT_OUTPUT_CAP = 1 << 20
MAX_OUTPUT_CAP = 64 << 20
MAX_WAIT_S = 60.0
MAX_ID = 0xFFFFFFFF
RLIM_INFINITY = (1 << 64) - 1  # hypervisor.agent_protocol's, not imported: the runtime starts without it
MAX_GROUPS = 64
MAX_RLIMITS = 16
MAX_SIGNAL = 64
MAX_TERM_SIZE = 0xFFFF
MAX_HOSTNAME_BYTES = 64
DEFAULT_CONSOLE_TAIL = 65536


class ApiError(ValueError):
    """A request the contract refuses (or a handler's failure): answered as {"error": message} with this status."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def error_body(message: str) -> dict:
    return {"error": message}


# ---- requests (client side): (method, path, body)

def exec_request(argv, *, env=None, cwd="/", stdin: bytes | None = None, timeout_s=None,
                 output_cap: int = DEFAULT_OUTPUT_CAP, stream: bool = False, interactive: bool = False, **process):
    """POST /exec. process: tty, root, user {"uid", "gid", "groups"}, rlimits [[resource, soft, hard]], size."""
    unknown = set(process) - set(PROCESS_FIELDS)
    if unknown:
        raise TypeError(f"exec_request: unknown process fields {sorted(unknown)}; known: {PROCESS_FIELDS}")
    body = {"argv": list(argv), "env": env or {}, "cwd": cwd, "timeout_s": timeout_s, "output_cap": output_cap,
            "stdin_b64": None if stdin is None else b2a_base64(stdin, newline=False).decode()}
    if stream:
        body["stream"] = True
    if interactive:
        body["interactive"] = True
    body.update({key: value for key, value in process.items() if value is not None})
    return (*ROUTES["exec"], body)


def mounts_request(mounts: list[dict]):
    return (*ROUTES["mounts"], {"mounts": mounts})


def mount_request(source: str, target: str, fstype: str = "", flags: int = 0, data: str = "", mkdir: bool = True):
    return (*ROUTES["mounts"], {"source": source, "target": target, "fstype": fstype, "flags": flags, "data": data,
                                "mkdir": mkdir})


class VmmCalls:
    """Every VMM API call, over any transport: a subclass supplies _call(method, path, body=None, timeout=None),
    which returns the parsed JSON answer (bytes for text/plain, None when empty) and raises on an error answer."""

    def _call(self, method: str, path: str, body: dict | None = None, timeout: float | None = None):
        raise NotImplementedError

    def status(self) -> dict:
        return self._call(*ROUTES["status"])

    def ping(self) -> float:
        """The agent's round trip, in seconds."""
        return self._call(*ROUTES["ping"])["rtt_ms"] / 1000

    def action(self, action: str) -> None:
        self._call(*ROUTES["actions"], {"action": action})

    def console(self, tail: int = DEFAULT_CONSOLE_TAIL) -> bytes:
        method, path = ROUTES["console"]
        return self._call(method, f"{path}?tail={int(tail)}")

    def snapshot(self, out_dir, resume: bool = True, timeout_s: float = 600.0) -> dict:
        """Pause the VM, write a snapshot to out_dir (hypervisor/snapshot.py), resume it unless resume=False."""
        return self._call(*ROUTES["snapshot"], {"dir": str(out_dir), "resume": resume}, timeout=timeout_s)

    def swap_drive(self, path: str | None, read_only: bool = False, wait_s: float = 5.0) -> dict:
        """Point the rootfs disk at an image (None: the empty placeholder); returns once the guest sees it."""
        return self._call(*ROUTES["drive"], {"path": path, "read_only": read_only, "wait_s": wait_s},
                          timeout=wait_s + 10)

    def mount(self, source: str, target: str, fstype: str = "", flags: int = 0, data: str = "",
              mkdir: bool = True) -> None:
        self._call(*mount_request(source, target, fstype, flags, data, mkdir))

    def mounts(self, mounts: list[dict]) -> None:
        """Several mounts in one request, done in order (the first failure is the error)."""
        self._call(*mounts_request(mounts))

    def set_hostname(self, name: str) -> None:
        self._call(*ROUTES["hostname"], {"hostname": name})

    def stdin(self, exec_id: int, data: bytes, eof: bool = False) -> None:
        """Feed an interactive process's stdin (eof closes it)."""
        self._call(*ROUTES["exec_stdin"], {"exec_id": exec_id, "data_b64": b2a_base64(data, newline=False).decode(),
                                           "eof": eof})

    def signal(self, exec_id: int, signo: int) -> None:
        self._call(*ROUTES["exec_signal"], {"exec_id": exec_id, "signal": signo})

    def resize(self, exec_id: int, rows: int, cols: int) -> None:
        self._call(*ROUTES["exec_resize"], {"exec_id": exec_id, "rows": rows, "cols": cols})


# ---- validation (server side, and pclited's exec schema): each returns the request's values or raises ApiError(400)

def check_fields(route: str, spec: dict) -> dict:
    unknown = [key for key in spec if key not in FIELDS[route]]
    if unknown:
        method, path = ROUTES[route]
        raise ApiError(400, f"{method} {path} takes no field {', '.join(map(repr, unknown))}; its fields: "
                            f"{', '.join(FIELDS[route]) or 'none'}")
    return spec


def _int(spec: dict, key: str, low: int, high: int, default=None) -> int:
    value = spec.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ApiError(400, f"{key} must be an integer in {low}..{high}, got {value!r}")
    return value


def _str(spec: dict, key: str, default: str = "") -> str:
    value = spec.get(key, default)
    if not isinstance(value, str) or "\0" in value:
        raise ApiError(400, f"{key} must be a string without NUL bytes, got {value!r}")
    return value


def _base64(value, key: str) -> bytes:
    try:
        return a2b_base64(value, strict_mode=True)
    except (_Base64Error, ValueError, TypeError):
        raise ApiError(400, f"{key} is not valid base64 (standard alphabet, with padding)") from None


def check_exec(spec: dict) -> tuple[list[str], dict, str | None]:
    """POST /exec → (argv, AgentChannel.exec keywords, "interactive" | "stream" | None)."""
    check_fields("exec", spec)
    argv = spec.get("argv")
    if (not isinstance(argv, list) or not argv or len(argv) > MAX_ARGS
            or not all(isinstance(a, str) and a and "\0" not in a for a in argv)):
        raise ApiError(400, f"argv must be a list of 1..{MAX_ARGS} non-empty strings without NUL, e.g. "
                            f"[\"uname\", \"-r\"]")
    env = spec.get("env") or {}
    if not isinstance(env, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
        raise ApiError(400, "env must be an object of string values")
    stdin = None
    if spec.get("stdin_b64") is not None:
        stdin = _base64(spec["stdin_b64"], "stdin_b64")
        if len(stdin) > MAX_EXEC_STDIN:
            raise ApiError(400, f"stdin is {len(stdin)} bytes; the limit is {MAX_EXEC_STDIN} ({MAX_EXEC_STDIN >> 20} "
                                f"MiB): send less, or copy large data in pieces")
    timeout_s = spec.get("timeout_s")
    if timeout_s is not None and (not isinstance(timeout_s, int | float) or isinstance(timeout_s, bool)
                                  or not 0 < timeout_s <= MAX_TIMEOUT_S):
        raise ApiError(400, f"timeout_s must be a positive number of seconds up to {MAX_TIMEOUT_S}, got {timeout_s!r}")
    cap = spec.get("output_cap", DEFAULT_OUTPUT_CAP)
    streamed = bool(spec.get("stream") or spec.get("interactive"))
    if not isinstance(cap, int) or isinstance(cap, bool) or not (0 if streamed else 1) <= cap <= MAX_OUTPUT_CAP:
        raise ApiError(400, f"output_cap must be 1..{MAX_OUTPUT_CAP} bytes (0, no cap, only for a streamed exec, "
                            f"which buffers nothing), got {cap!r}")
    cwd = spec.get("cwd") or "/"
    if not isinstance(cwd, str) or "\0" in cwd or len(cwd) > MAX_PATH:
        raise ApiError(400, f"cwd must be a path of at most {MAX_PATH} characters without NUL, got {cwd!r}")
    kwargs = {"env": env, "cwd": cwd, "stdin": stdin, "timeout_s": timeout_s, "output_cap": cap,
              **_process_fields(spec)}
    mode = "interactive" if spec.get("interactive") else "stream" if spec.get("stream") else None
    return argv, kwargs, mode


def _process_fields(spec: dict) -> dict:
    fields: dict = {}
    if spec.get("tty"):
        fields["tty"] = True
    if spec.get("root"):
        fields["root"] = _str(spec, "root")
    user = spec.get("user")
    if user is not None:
        if not isinstance(user, dict):
            raise ApiError(400, "user must be an object {\"uid\", \"gid\", \"groups\"}")
        groups = user.get("groups") or []
        if not isinstance(groups, list) or len(groups) > MAX_GROUPS:
            raise ApiError(400, f"user.groups must be a list of at most {MAX_GROUPS} gids")
        fields["user"] = (_int(user, "uid", 0, MAX_ID - 1), _int(user, "gid", 0, MAX_ID - 1, 0),
                          tuple(_int({"group": g}, "group", 0, MAX_ID - 1) for g in groups))
    rlimits = spec.get("rlimits") or []
    if not isinstance(rlimits, list) or len(rlimits) > MAX_RLIMITS:
        raise ApiError(400, f"rlimits must be a list of at most {MAX_RLIMITS} [resource, soft, hard] triples")
    for limit in rlimits:
        if (not isinstance(limit, list) or len(limit) != 3
                or not all(isinstance(v, int) and 0 <= v <= RLIM_INFINITY for v in limit)):
            raise ApiError(400, f"rlimit {limit!r} is not [resource, soft, hard] with integers "
                                f"(RLIM_INFINITY = {RLIM_INFINITY})")
    if rlimits:
        fields["rlimits"] = tuple(tuple(limit) for limit in rlimits)
    size = spec.get("size")
    if size is not None:
        if not isinstance(size, list) or len(size) != 2:
            raise ApiError(400, "size must be [rows, cols]")
        fields["size"] = (_int({"rows": size[0]}, "rows", 0, MAX_TERM_SIZE),
                          _int({"cols": size[1]}, "cols", 0, MAX_TERM_SIZE))
    return fields


def check_mounts(spec: dict) -> list[tuple[str, str, str, int, str, bool]]:
    """POST /mounts → [(source, target, fstype, flags, data, mkdir)], in order."""
    check_fields("mounts", spec)
    specs = spec.get("mounts", [spec])
    if not isinstance(specs, list) or not all(isinstance(one, dict) for one in specs):
        raise ApiError(400, "mounts must be a list of {source, target, fstype, flags, data, mkdir} objects")
    mounts = []
    for one in specs:
        unknown = [key for key in one if key not in MOUNT_FIELDS] if one is not spec else []
        if unknown:
            raise ApiError(400, f"a mount takes no field {', '.join(map(repr, unknown))}; its fields: "
                                f"{', '.join(MOUNT_FIELDS)}")
        target = _str(one, "target")
        if not target.startswith("/"):
            raise ApiError(400, f"target must be an absolute path in the guest, got {target!r}")
        mounts.append((_str(one, "source", "none"), target, _str(one, "fstype"), _int(one, "flags", 0, MAX_ID, 0),
                       _str(one, "data"), bool(one.get("mkdir", True))))
    return mounts


def check_hostname(spec: dict) -> str:
    name = _str(check_fields("hostname", spec), "hostname")
    if not name or len(name.encode()) > MAX_HOSTNAME_BYTES:
        raise ApiError(400, f"hostname must be 1..{MAX_HOSTNAME_BYTES} bytes, got {name!r}")
    return name


def check_drive(spec: dict) -> tuple[str | None, bool, float]:
    """PUT /drives/rootfs → (path or None, read_only, wait_s); whether the file exists is the server's to check."""
    check_fields("drive", spec)
    path = spec.get("path")
    read_only = spec.get("read_only", False)
    wait_s = spec.get("wait_s", 5.0)
    if path is not None and (not isinstance(path, str) or not path.startswith("/") or "\0" in path):
        raise ApiError(400, f"path must be an absolute path to a disk image (or null to detach), got {path!r}")
    if (not isinstance(read_only, bool) or not isinstance(wait_s, int | float) or isinstance(wait_s, bool)
            or not 0 <= wait_s <= MAX_WAIT_S):
        raise ApiError(400, f"read_only must be true/false and wait_s 0..{MAX_WAIT_S:g} seconds")
    return path, read_only, wait_s


def check_exec_id(spec: dict) -> int:
    return _int(spec, "exec_id", 1, MAX_ID)


def check_stdin(spec: dict) -> tuple[int, bytes, bool]:
    exec_id = check_exec_id(check_fields("exec_stdin", spec))
    data = _base64(spec["data_b64"], "data_b64") if spec.get("data_b64") else b""
    return exec_id, data, bool(spec.get("eof"))


def check_signal(spec: dict) -> tuple[int, int]:
    return check_exec_id(check_fields("exec_signal", spec)), _int(spec, "signal", 1, MAX_SIGNAL)


def check_resize(spec: dict) -> tuple[int, int, int]:
    exec_id = check_exec_id(check_fields("exec_resize", spec))
    return exec_id, _int(spec, "rows", 0, MAX_TERM_SIZE), _int(spec, "cols", 0, MAX_TERM_SIZE)


def check_action(spec: dict) -> str:
    action = check_fields("actions", spec).get("action")
    if action not in ACTIONS:
        raise ApiError(400, f"unknown action {action!r}: use {', '.join(ACTIONS[:-1])} or {ACTIONS[-1]}")
    return action


def check_snapshot(spec: dict) -> tuple[str, bool]:
    out_dir = check_fields("snapshot", spec).get("dir")
    if not isinstance(out_dir, str) or not out_dir:
        raise ApiError(400, "dir must name the directory to write the snapshot to, e.g. {\"dir\": \"/run/t1\"}")
    return out_dir, bool(spec.get("resume", True))


def check_console(query: dict) -> int:
    try:
        return max(0, int(query.get("tail", DEFAULT_CONSOLE_TAIL)))
    except ValueError:
        raise ApiError(400, "tail must be a number of bytes") from None


def check_content_length(value: str | None) -> int:
    """A request's Content-Length: absent = 0; anything but plain digits is refused (no "-1 = until the end")."""
    if value is None:
        return 0
    if not (value.isascii() and value.isdigit()):
        raise ApiError(400, f"bad Content-Length {value[:32]!r}: it must be the body's size in bytes (0 or more)")
    length = int(value)
    if length > MAX_BODY_BYTES:
        raise ApiError(413, f"request body of {length} bytes is over the {MAX_BODY_BYTES} byte limit: send less "
                            f"per request")
    return length


# ---- errors (every client): the one decoder of error answers

def one_line(text) -> str:
    return " ".join(str(text).split())


def error_text(payload: bytes, status: int, reason: str = "", loads=None) -> str:
    """The reason an error answer gives, on one line: the VMM's {"error"}, an RFC 9457 problem's title and detail
    (FastAPI's validation list too), else the start of the body. loads: a JSON parser (default json.loads)."""
    if loads is None:
        from json import loads
    try:
        body = loads(payload)
    except (ValueError, UnicodeDecodeError):
        text = one_line(payload[:1200].decode("utf-8", "replace")[:300])
        return f"HTTP {status}: {text}" if text else reason or f"HTTP {status}"
    if not isinstance(body, dict):
        return one_line(body)
    if isinstance(body.get("error"), str) and body["error"]:
        return one_line(body["error"])
    detail = body.get("detail")
    if isinstance(detail, list):  # FastAPI/pydantic validation errors
        parts = []
        for item in detail[:5]:
            if isinstance(item, dict):
                loc = ".".join(str(p) for p in item.get("loc", ()) if p != "body")
                parts.append(f"{loc}: {item.get('msg', '')}" if loc else str(item.get("msg", "")))
        detail = "; ".join(parts)
    title = body.get("title")
    if title and detail and one_line(detail) != one_line(title):
        return one_line(f"{title}: {detail}")
    return one_line(detail or title or reason or body)
