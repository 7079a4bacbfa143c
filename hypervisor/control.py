"""The VMM control API: HTTP/JSON routes on a Unix socket, turned into actions on one Machine and its agent.

  GET  /status               state, boot timeline, exit counters, devices, agent readiness
  GET  /agent/ping           agent round trip
  POST /exec                 {argv, env?, cwd?, stdin_b64?, timeout_s?, output_cap?, stream?}
  PUT  /actions              {"action": "shutdown" | "pause" | "resume"}
  GET  /console?tail=N       the last N bytes of the serial console (text/plain)
  PUT  /snapshot              {"dir": DIR, "resume"?: true}: pause, write DIR (hypervisor/snapshot.py), resume
  PUT  /drives/rootfs, POST /mounts, PUT /hostname, POST /exec/stdin|signal|resize: see control_container.py
"""

from __future__ import annotations

import json
import os
import threading
from _queue import SimpleQueue  # what `queue` re-exports, without its imports: the API starts before the VM boots

from hypervisor.agent_channel import AgentChannel, AgentError, AgentUnavailable
from hypervisor.api_server import HttpError, Request, Response
from hypervisor.control_container import ContainerRoutes

MAX_OUTPUT_CAP = 64 << 20
SHUTDOWN_GRACE_S = 10.0


class Controller:
    def __init__(self, machine, agent: AgentChannel, serial_tail):
        self.machine = machine
        self.agent = agent
        self.serial_tail = serial_tail  # callable(n) -> bytes
        self.routes = {("GET", "/status"): self.status, ("GET", "/agent/ping"): self.ping,
                       ("POST", "/exec"): self.exec, ("PUT", "/actions"): self.actions,
                       ("GET", "/console"): self.console}
        self.container = ContainerRoutes(machine, agent)  # rootfs disk, mounts, interactive process I/O
        self.routes.update(self.container.routes)
        self.routes[("PUT", "/snapshot")] = self.snapshot

    def __call__(self, request: Request) -> Response:
        route = self.routes.get((request.method, request.path))
        if route is None:
            known = {path for _, path in self.routes}
            if request.path in known:
                raise HttpError(405, f"{request.method} is not allowed on {request.path}")
            raise HttpError(404, f"no route {request.path}; routes: {', '.join(sorted(known))}")
        try:
            return route(request)
        except AgentUnavailable as exc:
            raise HttpError(503, str(exc)) from None
        except AgentError as exc:
            raise HttpError(409, f"the guest agent refused: {exc}") from None

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
        spec = request.json()
        argv = spec.get("argv")
        if not isinstance(argv, list) or not argv or not all(isinstance(a, str) and a for a in argv):
            raise HttpError(400, "argv must be a non-empty list of non-empty strings, e.g. [\"uname\", \"-r\"]")
        env = spec.get("env") or {}
        if not isinstance(env, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
            raise HttpError(400, "env must be an object of string values")
        stdin = None
        if spec.get("stdin_b64") is not None:
            import base64  # here, not at the top: only exec needs it, and the API starts before the VM boots
            try:
                stdin = base64.b64decode(spec["stdin_b64"], validate=True)
            except (ValueError, TypeError):
                raise HttpError(400, "stdin_b64 is not valid base64") from None
        timeout_s = spec.get("timeout_s")
        if timeout_s is not None and (not isinstance(timeout_s, (int, float)) or timeout_s <= 0):
            raise HttpError(400, f"timeout_s must be a positive number of seconds, got {timeout_s!r}")
        cap = spec.get("output_cap", 1 << 20)
        if not isinstance(cap, int) or not 0 <= cap <= MAX_OUTPUT_CAP:
            raise HttpError(400, f"output_cap must be 0..{MAX_OUTPUT_CAP} bytes (0 = unlimited), got {cap!r}")
        cwd = spec.get("cwd") or "/"
        kwargs = dict(env=env, cwd=cwd, stdin=stdin, timeout_s=timeout_s, output_cap=cap)
        kwargs.update(self.container.exec_fields(spec))  # tty, root, user, rlimits, size
        if spec.get("interactive"):
            return Response(200, self.container.interactive(argv, kwargs), "application/x-ndjson")
        if spec.get("stream"):
            return Response(200, self._stream_exec(argv, kwargs), "application/x-ndjson")
        return Response(200, self.agent.exec(argv, **kwargs).as_json())

    def _stream_exec(self, argv, kwargs):
        """NDJSON lines: {"stdout_b64"} / {"stderr_b64"} as output arrives, then {"exit": {...}} or {"error"}."""
        import base64
        lines: SimpleQueue = SimpleQueue()

        def on_output(stream: int, data: bytes) -> None:
            key = "stdout_b64" if stream == 1 else "stderr_b64"
            lines.put({key: base64.b64encode(data).decode()})

        def run() -> None:
            try:
                outcome = self.agent.exec(argv, on_output=on_output, **kwargs)
                result = outcome.as_json()
                result["stdout_b64"] = result["stderr_b64"] = ""  # already streamed
                lines.put({"exit": result})
            except AgentError as exc:
                lines.put({"error": str(exc)})
            lines.put(None)

        threading.Thread(target=run, name="exec-stream", daemon=True).start()
        while (line := lines.get()) is not None:
            yield json.dumps(line).encode() + b"\n"

    def actions(self, request: Request) -> Response:
        action = request.json().get("action")
        m = self.machine
        if action == "pause":
            if not m.pause():
                raise HttpError(504, "the vCPUs did not pause within 5 s")
            return Response(204)
        if action == "resume":
            m.resume()
            return Response(204)
        if action == "shutdown":
            threading.Thread(target=self._shutdown, name="shutdown", daemon=True).start()
            return Response(204)
        if action == "test-denied-syscall" and os.environ.get("PCLITE_TEST_HOOKS") == "1":
            from hypervisor.seccomp_filter import make_denied_syscall
            make_denied_syscall()  # under the seccomp filter the VMM dies here, of SIGSYS
            return Response(204)
        raise HttpError(400, f"unknown action {action!r}: use shutdown, pause or resume")

    def _shutdown(self) -> None:
        """Ask the agent to power off; a guest that does not go within the grace period is stopped."""
        try:
            if self.agent.ready.is_set() and not self.machine.pause_requested:
                from guestboot.agent import protocol as P
                self.agent.request(P.MsgType.SHUTDOWN, P.ShutdownRequest(P.ShutdownHow.POWEROFF).encode(), 2.0)
        except AgentError:
            pass
        if not self.machine.wait_stopped(SHUTDOWN_GRACE_S):
            self.machine.stop("shutdown requested; the guest did not power off in time", 0)

    def snapshot(self, request: Request) -> Response:
        spec = request.json()
        out_dir = spec.get("dir")
        if not isinstance(out_dir, str) or not out_dir:
            raise HttpError(400, "dir must name the directory to write the snapshot to, e.g. {\"dir\": \"/run/t1\"}")
        from hypervisor.snapshot import SnapshotError, take_snapshot
        if self.machine.stopping:
            raise HttpError(409, "the VM has stopped: there is nothing to snapshot")
        try:
            return Response(200, take_snapshot(self.machine, self.agent, out_dir, bool(spec.get("resume", True))))
        except SnapshotError as exc:
            raise HttpError(409, str(exc)) from None
        except OSError as exc:
            raise HttpError(500, f"writing the snapshot to {out_dir} failed: {exc}") from None

    def console(self, request: Request) -> Response:
        try:
            tail = int(request.query.get("tail", 65536))
        except ValueError:
            raise HttpError(400, "tail must be a number of bytes") from None
        return Response(200, self.serial_tail(max(0, tail)), "text/plain; charset=utf-8")
