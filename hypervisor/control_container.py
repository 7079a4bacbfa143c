"""Control API routes that turn the VM into a container's home: its rootfs disk, mounts, host name, and the I/O of
interactive processes (what an OCI runtime's stand-in process relays).

  PUT  /drives/rootfs   {"path": FILE | null, "read_only": false, "wait_s": 5}
                        swap the disk's backing file (null: the empty placeholder) and raise a config change;
                        answers once the guest sees the new capacity (when its agent is up)
  POST /mounts          {"source", "target", "fstype", "flags": MS_* bits, "data", "mkdir": true}, or
                        {"mounts": [...]}: sent back to back, done by the agent in order; the first error is reported
  PUT  /hostname        {"hostname": NAME}
  POST /exec/stdin      {"exec_id", "data_b64", "eof": false}     for execs started with "interactive": true
  POST /exec/signal     {"exec_id", "signal": 15}
  POST /exec/resize     {"exec_id", "rows", "cols"}

POST /exec takes these fields on top of Controller.exec's: "interactive" (stdin stays open for /exec/stdin, output
is streamed, the first line is {"started": {"exec_id", "pid"}}; the process is killed if the client goes away),
"tty", "root" (chroot), "user" {"uid", "gid", "groups"}, "rlimits" [[resource, soft, hard]], "size" [rows, cols].
"""

from __future__ import annotations

import json
import os
import threading
import time
from _queue import Empty

from guestboot.agent import protocol as P
from hypervisor.agent_channel import AgentError, AgentUnavailable, StreamLines
from hypervisor.api_server import HttpError, Request, Response

GUEST_DISK_SIZE = "/sys/block/vda/size"  # the only virtio-blk disk is vda
MAX_WAIT_S = 60.0
MAX_ID = 0xFFFFFFFF
MAX_RLIM = P.RLIM_INFINITY
HEARTBEAT_S = 1.0


def _int(spec: dict, key: str, low: int, high: int, default=None) -> int:
    value = spec.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise HttpError(400, f"{key} must be an integer in {low}..{high}, got {value!r}")
    return value


def _str(spec: dict, key: str, default: str = "") -> str:
    value = spec.get(key, default)
    if not isinstance(value, str) or "\0" in value:
        raise HttpError(400, f"{key} must be a string without NUL bytes, got {value!r}")
    return value


class ContainerRoutes:
    def __init__(self, machine, agent):
        self.machine = machine
        self.agent = agent
        self.live: set[int] = set()  # interactive execs still running: the ids /exec/stdin|signal|resize accept
        self.routes = {("PUT", "/drives/rootfs"): self.drive, ("POST", "/mounts"): self.mount,
                       ("PUT", "/hostname"): self.hostname, ("POST", "/exec/stdin"): self.stdin,
                       ("POST", "/exec/signal"): self.signal, ("POST", "/exec/resize"): self.resize}

    # ---- the disk

    def drive(self, request: Request) -> Response:
        spec = request.json()
        path = spec.get("path")
        read_only = spec.get("read_only", False)
        wait_s = spec.get("wait_s", 5.0)
        if path is not None and (not isinstance(path, str) or not os.path.isabs(path)):
            raise HttpError(400, f"path must be an absolute path to a disk image (or null to detach), got {path!r}")
        if path is not None and not os.path.isfile(path):
            raise HttpError(400, f"drive image {path} does not exist or is not a regular file: build it first "
                                 f"(e.g. mke2fs -t ext4 -d DIR {path} 64M)")
        if not isinstance(read_only, bool) or not isinstance(wait_s, int | float) or not 0 <= wait_s <= MAX_WAIT_S:
            raise HttpError(400, f"read_only must be true/false and wait_s 0..{MAX_WAIT_S:g} seconds")
        disk = self.machine.rootfs
        from hypervisor.vm import PLACEHOLDER_DISK
        try:
            disk.swap_backing(path or PLACEHOLDER_DISK, read_only if path else False)
        except OSError as exc:
            raise HttpError(400, f"cannot open drive image {path}: {exc.strerror}: check its permissions") from None
        started = time.monotonic()
        seen = self._wait_guest_capacity(disk.capacity, wait_s) if wait_s and self.agent.ready.is_set() else None
        return Response(200, {"drive": "rootfs", "path": path, "read_only": disk.read_only, "sectors": disk.capacity,
                              "guest_sees_it": seen, "wait_ms": round((time.monotonic() - started) * 1000, 3)})

    def _wait_guest_capacity(self, sectors: int, wait_s: float) -> bool:
        """Poll the guest's view of the disk size (its driver applies a config change asynchronously)."""
        deadline = time.monotonic() + wait_s
        request = P.ReadFileRequest(GUEST_DISK_SIZE, 0, 64).encode()
        while True:
            try:
                seen = int(self.agent.request(P.MsgType.READ_FILE, request, 5.0).strip() or b"-1")
            except (AgentError, ValueError) as exc:
                raise HttpError(409, f"cannot read {GUEST_DISK_SIZE} in the guest ({exc}): is its virtio-blk "
                                     f"driver there? see GET /console") from None
            if seen == sectors:
                return True
            if time.monotonic() > deadline:
                raise HttpError(504, f"the guest still sees {seen} sectors, not {sectors}, {wait_s:g} s after the "
                                     f"swap: see GET /console for virtio_blk messages")
            time.sleep(0.002)

    # ---- mounts and host name

    def mount(self, request: Request) -> Response:
        """One mount, or {"mounts": [...]} done in order (a container's /dev before its /dev/pts), stopping at the
        first that fails."""
        spec = request.json()
        specs = spec.get("mounts", [spec])
        if not isinstance(specs, list) or not all(isinstance(one, dict) for one in specs):
            raise HttpError(400, "mounts must be a list of {source, target, fstype, flags, data, mkdir} objects")
        mounts = [P.MountRequest(_str(one, "source", "none"), _str(one, "target"), _str(one, "fstype"),
                                 _int(one, "flags", 0, MAX_ID, 0), _str(one, "data"), bool(one.get("mkdir", True)))
                  for one in specs]
        for mount in mounts:
            if not mount.target.startswith("/"):
                raise HttpError(400, f"target must be an absolute path in the guest, got {mount.target!r}")
        try:  # back to back, one round trip: the agent still does them in order
            self.agent.request_all([(P.MsgType.MOUNT, mount.encode()) for mount in mounts])
        except AgentUnavailable:
            raise
        except AgentError as exc:
            more = " (the mounts after it in the list were tried too)" if len(mounts) > 1 else ""
            raise AgentError(f"{exc}{more}", exc.errno) from None
        return Response(204)

    def hostname(self, request: Request) -> Response:
        name = _str(request.json(), "hostname")
        if not name or len(name.encode()) > 64:
            raise HttpError(400, f"hostname must be 1..64 bytes, got {name!r}")
        self.agent.request(P.MsgType.SET_HOSTNAME, name.encode())
        return Response(204)

    # ---- processes

    def exec_fields(self, spec: dict) -> dict:
        """The process fields of POST /exec, validated, as AgentChannel.exec keywords."""
        fields: dict = {}
        if spec.get("tty"):
            fields["tty"] = True
        if spec.get("root"):
            fields["root"] = _str(spec, "root")
        user = spec.get("user")
        if user is not None:
            if not isinstance(user, dict):
                raise HttpError(400, "user must be an object {\"uid\", \"gid\", \"groups\"}")
            groups = user.get("groups") or []
            if not isinstance(groups, list) or len(groups) > 64:
                raise HttpError(400, "user.groups must be a list of at most 64 gids")
            fields["user"] = (_int(user, "uid", 0, MAX_ID - 1), _int(user, "gid", 0, MAX_ID - 1, 0),
                              tuple(_int({"group": g}, "group", 0, MAX_ID - 1) for g in groups))
        rlimits = spec.get("rlimits") or []
        if not isinstance(rlimits, list) or len(rlimits) > 16:
            raise HttpError(400, "rlimits must be a list of at most 16 [resource, soft, hard] triples")
        for limit in rlimits:
            if (not isinstance(limit, list) or len(limit) != 3
                    or not all(isinstance(v, int) and 0 <= v <= MAX_RLIM for v in limit)):
                raise HttpError(400, f"rlimit {limit!r} is not [resource, soft, hard] with integers "
                                     f"(RLIM_INFINITY = {MAX_RLIM})")
        if rlimits:
            fields["rlimits"] = tuple(tuple(limit) for limit in rlimits)
        size = spec.get("size")
        if size is not None:
            if not isinstance(size, list) or len(size) != 2:
                raise HttpError(400, "size must be [rows, cols]")
            fields["size"] = (_int({"rows": size[0]}, "rows", 0, 0xFFFF), _int({"cols": size[1]}, "cols", 0, 0xFFFF))
        return fields

    def interactive(self, argv: list[str], kwargs: dict):
        """NDJSON: {"started"}, then {"stdout_b64"}/{"stderr_b64"} as output arrives, then {"exit"} or {"error"}."""
        import base64
        kwargs = {k: v for k, v in kwargs.items() if k != "stdin"}
        lines = StreamLines()
        state = {"id": None}

        def on_started(exec_id: int, pid: int) -> None:
            state["id"] = exec_id
            self.live.add(exec_id)
            lines.put({"started": {"exec_id": exec_id, "pid": pid}})

        def on_output(stream: int, data: bytes) -> None:
            lines.put({"stdout_b64" if stream == 1 else "stderr_b64": base64.b64encode(data).decode()})

        def run() -> None:
            try:
                result = self.agent.exec(argv, interactive=True, on_started=on_started, on_output=on_output,
                                         **kwargs).as_json()
                lines.put({"exit": result})
            except AgentError as exc:
                lines.put({"error": str(exc)})
            finally:
                self.live.discard(state["id"])
                lines.put(None)

        threading.Thread(target=run, name="exec-interactive", daemon=True).start()
        finished = False
        try:
            while True:
                try:
                    line = lines.get(timeout=HEARTBEAT_S)
                except Empty:
                    yield b"\n"  # a blank line on a quiet stream: writing it is how a vanished client is noticed
                    continue
                if line is None:
                    break
                yield json.dumps(line).encode() + b"\n"
            finished = True
        finally:
            lines.close()
            if not finished and state["id"] in self.live:  # the client went away: its process goes with it
                try:  # noqa: SIM105 - contextlib is kept off the VMM's start-up path
                    self.agent.signal(state["id"], 9)
                except AgentError:
                    pass

    def _live_exec(self, spec: dict) -> int:
        exec_id = _int(spec, "exec_id", 1, MAX_ID)
        if exec_id not in self.live:
            raise HttpError(404, f"no interactive exec {exec_id} is running (it exited, or was not started with "
                                 f"\"interactive\": true)")
        return exec_id

    def stdin(self, request: Request) -> Response:
        spec = request.json()
        exec_id = self._live_exec(spec)
        data = b""
        if spec.get("data_b64"):
            import base64
            try:
                data = base64.b64decode(spec["data_b64"], validate=True)
            except (ValueError, TypeError):
                raise HttpError(400, "data_b64 is not valid base64") from None
        self.agent.send_stdin(exec_id, data, bool(spec.get("eof")))
        return Response(204)

    def signal(self, request: Request) -> Response:
        spec = request.json()
        self.agent.signal(self._live_exec(spec), _int(spec, "signal", 1, 64))
        return Response(204)

    def resize(self, request: Request) -> Response:
        spec = request.json()
        exec_id = self._live_exec(spec)
        self.agent.resize(exec_id, _int(spec, "rows", 0, 0xFFFF), _int(spec, "cols", 0, 0xFFFF))
        return Response(204)
