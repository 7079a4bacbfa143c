"""VM operations behind /v1/vms/{id}: delete, exec, console, events."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import time

from hypervisor.client import VmmClient, VmmError, VmmUnavailable
from service.core.config import Settings
from service.models import CLAIMED, TERMINAL_STATES, VM, Event
from service.schemas import ExecRequest
from service.services.errors import Conflict, VmmFailed
from service.services.inventory import Inventory
from service.services.supervisor import Supervisor
from service.services.work import blocking

EXEC_OUTPUT_CAP = 1 << 20
MAX_CONSOLE_TAIL = 16 << 20


class VmService:
    """One VM's operations for the API; stopping is the supervisor's (`stop_vm`, `wait_stopped`)."""

    def __init__(self, settings: Settings, inventory: Inventory, supervisor: Supervisor) -> None:
        self.settings, self.inventory, self.supervisor = settings, inventory, supervisor

    async def delete(self, vm_id: str, wait: bool = False) -> tuple[VM, bool]:
        """Stop the VM; returns (vm, done): done when it is already stopped/failed (or stopped while waiting)."""
        vm = await asyncio.to_thread(self.inventory.get, vm_id)
        if vm.state in TERMINAL_STATES:
            return vm, True
        vm = await self.supervisor.stop_vm(vm_id, "deleted through the API")
        if wait:
            with contextlib.suppress(TimeoutError):
                await self.supervisor.wait_stopped(vm_id, self.settings.stop_timeout_s + 10)
            vm = await asyncio.to_thread(self.inventory.get, vm_id)
        return vm, vm.state in TERMINAL_STATES

    async def exec(self, vm_id: str, req: ExecRequest) -> dict:
        vm = await asyncio.to_thread(self.inventory.get, vm_id)
        if vm.state != CLAIMED:
            raise Conflict(f"VM {vm_id} is {vm.state}: exec runs only in a claimed VM (claim one with POST /v1/vms)")
        stdin = None if req.stdin_b64 is None else base64.b64decode(req.stdin_b64)  # ExecRequest checked it
        if not os.path.exists(vm.api_socket):
            raise Conflict(f"VM {vm_id}'s VMM is not running (no control socket); it will be marked failed: "
                           "delete it and claim another")
        # The socket timeout must outlast the command's own timeout.
        client = VmmClient(vm.api_socket, timeout=(req.timeout_s or 86400.0) + 30.0)
        started = time.monotonic()
        try:
            result = await blocking(client.exec, req.argv, stdin=stdin, env=req.env, cwd=req.cwd,
                                    timeout_s=req.timeout_s, output_cap=EXEC_OUTPUT_CAP)
        except VmmUnavailable as exc:
            raise Conflict(f"VM {vm_id}'s VMM is gone ({exc}); it will be marked failed: delete it and claim "
                           "another") from exc
        except VmmError as exc:
            raise VmmFailed(f"exec in {vm_id} failed: {exc}") from exc
        duration = getattr(result, "duration_s", None)
        return {"exit_code": result.exit_code, "signal": result.signal, "timed_out": result.timed_out,
                "stdout_b64": base64.b64encode(result.stdout).decode(),
                "stderr_b64": base64.b64encode(result.stderr).decode(),
                "stdout_truncated": result.stdout_truncated, "stderr_truncated": result.stderr_truncated,
                "duration_ms": round((duration if duration is not None else time.monotonic() - started) * 1000, 3)}

    def console(self, vm_id: str, tail: int) -> bytes:
        vm = self.inventory.get(vm_id)
        try:
            with open(vm.console_path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                f.seek(max(0, size - tail))
                return f.read(tail)
        except FileNotFoundError:
            return b""

    def events(self, vm_id: str) -> list[Event]:
        return self.inventory.events(vm_id)
