"""Per-container state under --root, the runtime's log (what containerd shows when a command fails), and process
identity checks that survive pid reuse.

  <root>/<id>/state.json      written by create: bundle, VM, stand-in pid + start time, annotations
  <root>/<id>/state.lines     its scalar fields as `key value` lines, for `start` and `delete`: containerd waits on
                              both, and reading them without json (and so re and enum) saves ~0.25 s each in the lab
  <root>/<id>/exec.fifo       `start` writes one byte here: the init stand-in then starts the guest process
  <root>/<id>/init.json       the stand-in, once the guest process runs: {"exec_id", "guest_pid"}
  <root>/<id>/init.error      the stand-in, when it could not start it: the reason
  <root>/<id>/execs/<pid>.json  one per `exec` stand-in: {"exec_id", "guest_pid", "start_time"}
  <root>/<id>/paused          present while the VM is paused
  <root>/<id>/released        the init stand-in released the VM when the process ended: `delete` removes files only
"""

import os
import sys
import time

DEFAULT_ROOT = "/run/pclite-runtime"
LEAN_KEYS = ("id", "vm_id", "api_socket", "server", "log", "pid", "start_time")


class RuntimeFailure(Exception):
    """A command failed: the message is the one line containerd logs and ctr prints."""


class Log:
    """--log FILE in --log-format json (what containerd's shim parses: {"level","msg","time"}) or text.

    PCLITE_RUNTIME_LOG=FILE keeps a copy of every line outside the bundle (which containerd deletes with the task):
    the info lines carry each step's duration."""

    def __init__(self, path: str | None = None, fmt: str = "text"):
        self.path, self.fmt = path, fmt
        self.copy = os.environ.get("PCLITE_RUNTIME_LOG")

    def write(self, level: str, msg: str) -> None:
        now = time.time()
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1e9):09d}Z"
        if self.fmt == "json":
            line = f'{{"level": "{level}", "msg": {json_string(msg)}, "time": "{stamp}"}}'
        else:
            line = f"time=\"{stamp}\" level={level} msg={json_string(msg)}"
        if self.copy:
            _append(self.copy, line)
        if not (self.path and _append(self.path, line)):
            os.write(2, (line + "\n").encode())

    def error(self, msg: str) -> None:
        self.write("error", msg)

    def warning(self, msg: str) -> None:
        self.write("warning", msg)

    def info(self, msg: str) -> None:
        self.write("info", msg)


def json_string(text: str) -> str:
    """A JSON string literal (what json.dumps gives for a str), without importing json."""
    out = ['"']
    for char in text:
        if char in '"\\':
            out.append("\\" + char)
        elif char < " " or char == "\x7f":
            out.append(f"\\u{ord(char):04x}")
        else:
            out.append(char)
    return "".join(out) + '"'


def _append(path: str, line: str) -> bool:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
        try:
            os.write(fd, (line + "\n").encode())
        finally:
            os.close(fd)
        return True
    except OSError:
        return False


def start_time(pid: int) -> int | None:
    """The process's start time (clock ticks since boot), or None when it is gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] in (b"Z", b"X") else int(fields[19])


def alive(pid: int | None, started: int | None) -> bool:
    return bool(pid) and start_time(pid) == started


def write_atomic(path: str, data: bytes | str) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
    os.replace(tmp, path)


class Container:
    def __init__(self, root: str, cid: str):
        if not cid or "/" in cid or cid in (".", "..") or len(cid) > 1024:
            raise RuntimeFailure(f"invalid container id {cid!r}: use letters, digits, '-', '_' or '.'")
        self.root, self.id = root, cid
        self.dir = os.path.join(root, cid)

    def path(self, name: str) -> str:
        return os.path.join(self.dir, name)

    def exists(self) -> bool:
        return os.path.exists(self.path("state.json"))

    def load(self) -> dict:
        from service.runtime.jsonlite import loads
        try:
            with open(self.path("state.json")) as f:
                return loads(f.read())
        except FileNotFoundError:
            raise RuntimeFailure(f"container {self.id} does not exist (no state in {self.dir})") from None
        except (OSError, ValueError) as exc:
            raise RuntimeFailure(f"container {self.id}'s state {self.path('state.json')} is unreadable ({exc}): "
                                 f"delete it with `delete --force {self.id}`") from None

    def save(self, state: dict) -> None:
        from service.runtime.jsonlite import dumps
        lines = "".join(f"{key} {value}\n" for key, value in state.items()
                        if key in LEAN_KEYS and value is not None and "\n" not in str(value))
        write_atomic(self.path("state.lines"), lines)
        write_atomic(self.path("state.json"), dumps(state))

    def load_lean(self) -> dict:
        """The scalar fields of state.json (LEAN_KEYS; pid and start_time as ints), read without json."""
        try:
            with open(self.path("state.lines")) as f:
                lean = dict(line.rstrip("\n").split(" ", 1) for line in f if " " in line)
        except FileNotFoundError:
            raise RuntimeFailure(f"container {self.id} does not exist (no state in {self.dir})") from None
        for key in ("pid", "start_time"):
            if key in lean:
                lean[key] = int(lean[key])
        return lean

    def read_json(self, name: str) -> dict | None:
        from service.runtime.jsonlite import loads
        try:
            with open(self.path(name)) as f:
                return loads(f.read())
        except (OSError, ValueError):
            return None

    def status(self, state: dict) -> str:
        if not alive(state.get("pid"), state.get("start_time")):
            return "stopped"
        if os.path.exists(self.path("paused")):
            return "paused"
        return "running" if os.path.exists(self.path("init.json")) else "created"

    def execs(self) -> dict[int, dict]:
        """{stand-in pid: its record} for exec stand-ins still alive."""
        found = {}
        try:
            names = os.listdir(self.path("execs"))
        except FileNotFoundError:
            return found
        for name in names:
            if name.endswith(".json") and name[:-5].isdigit():
                record = self.read_json(os.path.join("execs", name))
                pid = int(name[:-5])
                if record and alive(pid, record.get("start_time")):
                    found[pid] = record
        return found

    def oci_state(self, state: dict) -> dict:
        status = self.status(state)
        return {"ociVersion": "1.0.2", "id": self.id, "pid": state.get("pid", 0) if status != "stopped" else 0,
                "status": status, "bundle": state.get("bundle", ""), "rootfs": state.get("rootfs", ""),
                "created": state.get("created", ""), "owner": "", "annotations": state.get("annotations") or {}}


def remove_tree(path: str) -> None:
    """rm -r of a state directory (files and one level of subdirectories; no shutil: it is slow to import)."""
    try:
        entries = list(os.scandir(path))
    except FileNotFoundError:
        return
    except NotADirectoryError:
        os.unlink(path)
        return
    for entry in entries:
        if entry.is_dir(follow_symlinks=False):
            remove_tree(entry.path)
        else:
            try:  # noqa: SIM105 - contextlib costs start-up time
                os.unlink(entry.path)
            except FileNotFoundError:
                pass
    try:  # noqa: SIM105
        os.rmdir(path)
    except OSError:
        pass


def die(log: Log, message: str, code: int = 1) -> None:
    """The one line containerd shows for a failed command: to --log, and to stderr unless that is the log."""
    log.error(message)
    if log.path:
        try:  # noqa: SIM105 - contextlib costs start-up time
            os.write(2, f"pclite-runtime: {message}\n".encode())
        except OSError:
            pass
    sys.exit(code)
