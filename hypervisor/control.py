"""The VMM control API's handlers: one per route of hypervisor/vmm_api.py (named as there), each validating its
request with the contract's check_* and turning it into an action on one Machine and its agent.

The VM itself: status, ping, exec, actions, console, snapshot. Making it a container's home: drive (swap the rootfs
disk's backing file), mounts, hostname, and the I/O of interactive processes (exec_stdin|signal|resize: what an OCI
runtime's stand-in process relays).
"""

from __future__ import annotations

import json
import os
import threading
import time
from _queue import Empty  # `queue` without its imports: the API starts before the VM boots

from hypervisor import agent_protocol as P
from hypervisor import vmm_api
from hypervisor.agent_channel import AgentChannel, AgentError, AgentUnavailable, BadExecRequest, StreamLines
from hypervisor.api_server import Request, Response
from hypervisor.vmm_api import ApiError

SHUTDOWN_GRACE_S = 10.0
GUEST_DISK_SIZE = "/sys/block/vda/size"  # the only virtio-blk disk is vda
HEARTBEAT_S = 1.0


class Controller:
    def __init__(self, machine, agent: AgentChannel, serial_tail):
        self.machine = machine
        self.agent = agent
        self.serial_tail = serial_tail  # callable(n) -> bytes
        self.live: set[int] = set()  # interactive execs still running: the ids exec_stdin|signal|resize accept
        self.routes = {route: getattr(self, name) for name, route in vmm_api.ROUTES.items()}

    def __call__(self, request: Request) -> Response:
        route = self.routes.get((request.method, request.path))
        if route is None:
            known = {path for _, path in self.routes}
            if request.path in known:
                raise ApiError(405, f"{request.method} is not allowed on {request.path}")
            raise ApiError(404, f"no route {request.path}; routes: {', '.join(sorted(known))}")
        try:
            return route(request)
        except BadExecRequest as exc:
            raise ApiError(400, str(exc)) from None
        except AgentUnavailable as exc:
            raise ApiError(503, str(exc)) from None
        except AgentError as exc:
            raise ApiError(409, f"the guest agent refused: {exc}") from None

    # ---- the VM

    def state(self) -> str:
        m = self.machine
        if m.stopping:
            return "stopped"
        if m.pause_requested:
            return "paused"
        return "running" if "first_kvm_run" in m.timeline.marks else "starting"

    def status(self, _request: Request) -> Response:
        m = self.machine
        return Response(200, {
            "state": self.state(), "pid": os.getpid(), "agent_ready": self.agent.ready.is_set(),
            "agent_version": self.agent.version, "timeline_ms": m.timeline.as_ms(), "exits": m.exit_counts(),
            "devices": m.devices(), "vcpus": m.config.vcpus, "mem_mib": m.config.mem_mib,
            "boot": m.plan.kernel_format if m.plan else None, "stop_reason": m.stop_reason or None})

    def ping(self, _request: Request) -> Response:
        return Response(200, {"rtt_ms": round(self.agent.ping() * 1000, 3)})

    def exec(self, request: Request) -> Response:
        argv, kwargs, mode = vmm_api.check_exec(request.json())
        if mode == "interactive":
            return Response(200, self._interactive(argv, kwargs), "application/x-ndjson")
        if mode == "stream":
            return Response(200, self._stream_exec(argv, kwargs), "application/x-ndjson")
        return Response(200, self.agent.exec(argv, **kwargs).as_json())

    def _stream_exec(self, argv, kwargs):
        """NDJSON lines: {"stdout_b64"} / {"stderr_b64"} as output arrives, then {"exit": {...}} or {"error"}."""
        from binascii import b2a_base64
        lines = StreamLines()

        def on_output(stream: int, data: bytes) -> None:
            key = "stdout_b64" if stream == 1 else "stderr_b64"
            lines.put({key: b2a_base64(data, newline=False).decode()})

        def run() -> None:
            try:
                outcome = self.agent.exec(argv, on_output=on_output, **kwargs)
                result = outcome.as_json()
                result["stdout_b64"] = result["stderr_b64"] = ""  # already streamed
                lines.put({"exit": result})
            except AgentError as exc:
                lines.put({"error": str(exc)})
            finally:
                lines.put(None)

        threading.Thread(target=run, name="exec-stream", daemon=True).start()
        try:
            while (line := lines.get()) is not None:
                yield json.dumps(line).encode() + b"\n"
        finally:
            lines.close()  # the client went away: the exec thread must not stay blocked on a full queue

    def _interactive(self, argv: list[str], kwargs: dict):
        """NDJSON: {"started"}, then {"stdout_b64"}/{"stderr_b64"} as output arrives, then {"exit"} or {"error"}."""
        from binascii import b2a_base64
        kwargs = {k: v for k, v in kwargs.items() if k != "stdin"}
        lines = StreamLines()
        state = {"id": None}

        def on_started(exec_id: int, pid: int) -> None:
            state["id"] = exec_id
            self.live.add(exec_id)
            lines.put({"started": {"exec_id": exec_id, "pid": pid}})

        def on_output(stream: int, data: bytes) -> None:
            lines.put({"stdout_b64" if stream == 1 else "stderr_b64": b2a_base64(data, newline=False).decode()})

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

    def actions(self, request: Request) -> Response:
        body = request.json()
        if body == {"action": "test-denied-syscall"} and os.environ.get("PCLITE_TEST_HOOKS") == "1":
            from hypervisor.seccomp_filter import make_denied_syscall
            make_denied_syscall()  # under the seccomp filter the VMM dies here, of SIGSYS
            return Response(204)
        action = vmm_api.check_action(body)
        m = self.machine
        if action == "pause":
            if not m.pause():
                raise ApiError(504, "the vCPUs did not pause within 5 s")
        elif action == "resume":
            m.resume()
        else:
            threading.Thread(target=self._shutdown, name="shutdown", daemon=True).start()
        return Response(204)

    def _shutdown(self) -> None:
        """Ask the agent to power off; a guest that does not go within the grace period is stopped."""
        try:
            if self.agent.ready.is_set() and not self.machine.pause_requested:
                self.agent.request(P.MsgType.SHUTDOWN, P.ShutdownRequest(P.ShutdownHow.POWEROFF).encode(), 2.0)
        except AgentError:
            pass
        if not self.machine.wait_stopped(SHUTDOWN_GRACE_S):
            self.machine.stop("shutdown requested; the guest did not power off in time", 0)

    def snapshot(self, request: Request) -> Response:
        out_dir, resume = vmm_api.check_snapshot(request.json())
        from hypervisor.snapshot import SnapshotError, take_snapshot
        if self.machine.stopping:
            raise ApiError(409, "the VM has stopped: there is nothing to snapshot")
        try:
            return Response(200, take_snapshot(self.machine, self.agent, out_dir, resume))
        except SnapshotError as exc:
            raise ApiError(409, str(exc)) from None
        except OSError as exc:
            raise ApiError(500, f"writing the snapshot to {out_dir} failed: {exc}") from None

    def console(self, request: Request) -> Response:
        return Response(200, self.serial_tail(vmm_api.check_console(request.query)), "text/plain; charset=utf-8")

    # ---- a container's home: the rootfs disk, mounts, host name

    def drive(self, request: Request) -> Response:
        path, read_only, wait_s = vmm_api.check_drive(request.json())
        if path is not None and not os.path.isfile(path):
            raise ApiError(400, f"drive image {path} does not exist or is not a regular file: build it first "
                                f"(e.g. mke2fs -t ext4 -d DIR {path} 64M)")
        disk = self.machine.rootfs
        from hypervisor.vm import PLACEHOLDER_DISK
        try:
            disk.swap_backing(path or PLACEHOLDER_DISK, read_only if path else False)
        except OSError as exc:
            raise ApiError(400, f"cannot open drive image {path}: {exc.strerror}: check its permissions") from None
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
                raise ApiError(409, f"cannot read {GUEST_DISK_SIZE} in the guest ({exc}): is its virtio-blk "
                                    f"driver there? see GET /console") from None
            if seen == sectors:
                return True
            if time.monotonic() > deadline:
                raise ApiError(504, f"the guest still sees {seen} sectors, not {sectors}, {wait_s:g} s after the "
                                    f"swap: see GET /console for virtio_blk messages")
            time.sleep(0.002)

    def mounts(self, request: Request) -> Response:
        """One mount, or {"mounts": [...]} done in order (a container's /dev before its /dev/pts), stopping at the
        first that fails."""
        mounts = [P.MountRequest(*one) for one in vmm_api.check_mounts(request.json())]
        try:  # back to back, one round trip: the agent still does them in order
            self.agent.request_all([(P.MsgType.MOUNT, mount.encode()) for mount in mounts])
        except AgentUnavailable:
            raise
        except AgentError as exc:
            more = " (the mounts after it in the list were tried too)" if len(mounts) > 1 else ""
            raise AgentError(f"{exc}{more}", exc.errno) from None
        return Response(204)

    def hostname(self, request: Request) -> Response:
        self.agent.request(P.MsgType.SET_HOSTNAME, vmm_api.check_hostname(request.json()).encode())
        return Response(204)

    # ---- interactive processes

    def _live(self, exec_id: int) -> int:
        if exec_id not in self.live:
            raise ApiError(404, f"no interactive exec {exec_id} is running (it exited, or was not started with "
                                f"\"interactive\": true)")
        return exec_id

    def exec_stdin(self, request: Request) -> Response:
        exec_id, data, eof = vmm_api.check_stdin(request.json())
        self.agent.send_stdin(self._live(exec_id), data, eof)
        return Response(204)

    def exec_signal(self, request: Request) -> Response:
        exec_id, signo = vmm_api.check_signal(request.json())
        self.agent.signal(self._live(exec_id), signo)
        return Response(204)

    def exec_resize(self, request: Request) -> Response:
        exec_id, rows, cols = vmm_api.check_resize(request.json())
        self.agent.resize(self._live(exec_id), rows, cols)
        return Response(204)
