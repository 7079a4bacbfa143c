"""VM operations behind /v1/vms/{id}: delete, exec, console, events."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import os
import time
from collections.abc import Awaitable, Callable
from datetime import timedelta

from hypervisor.client import VmmClient, VmmError, VmmUnavailable
from service.core.config import Settings
from service.models import CLAIMED, TERMINAL_STATES, VM, Event, utcnow
from service.schemas import ClaimRequest, ExecRequest, VMPatch
from service.services import labels as labelling
from service.services.errors import Conflict, Invalid, VmmFailed
from service.services.inventory import Inventory
from service.services.supervisor import Supervisor
from service.services.work import blocking

EXEC_OUTPUT_CAP = 1 << 20
MAX_CONSOLE_TAIL = 16 << 20
IDEMPOTENCY_KEY_TTL_S = 86400.0
MAX_IDEMPOTENCY_KEY = 255


class VmService:
    """One VM's operations for the API; stopping is the supervisor's (`stop_vm`, `wait_stopped`), taking one from
    the pool is `claim(flavor, wait) -> (vm, "hit"|"miss")`'s (the pool's)."""

    def __init__(self, settings: Settings, inventory: Inventory, supervisor: Supervisor,
                 claim: Callable[[str, bool], Awaitable[tuple[VM, str]]]) -> None:
        self.settings, self.inventory, self.supervisor = settings, inventory, supervisor
        self._claim = claim

    async def claim(self, req: ClaimRequest, key: str | None) -> tuple[VM, str, bool]:
        """Claim with a lease and labels; (vm, hit|miss, replayed). A key seen within a day with the same body
        answers its VM again (replayed); with another body it is refused."""
        labels = labelling.validate(req.labels)
        if key is not None:
            if not key or len(key) > MAX_IDEMPOTENCY_KEY or not key.isprintable() or not key.isascii():
                raise Invalid(f"Idempotency-Key must be 1-{MAX_IDEMPOTENCY_KEY} printable ASCII characters")
            digest = hashlib.sha256(json.dumps(req.model_dump(), sort_keys=True).encode()).hexdigest()
            seen = await asyncio.to_thread(self.inventory.reserve_key, key, digest, IDEMPOTENCY_KEY_TTL_S)
            if seen is not None:
                if seen.request_hash != digest:
                    raise Invalid(f"Idempotency-Key {key!r} was used within a day for a different request body: "
                                  "use a new key for a new claim")
                if seen.vm_id is None:
                    raise Conflict(f"a claim with Idempotency-Key {key!r} is still in progress: retry shortly")
                vm = await asyncio.to_thread(self.inventory.get, seen.vm_id)
                return vm, "hit" if seen.hit else "miss", True
        try:
            vm, result = await self._claim(req.flavor, req.wait)
            fields: dict = {}
            if labels:
                fields["labels"] = labels
            if req.ttl_s is not None:
                fields["expires_at"] = utcnow() + timedelta(seconds=req.ttl_s)
            if fields:
                vm = await asyncio.to_thread(self.inventory.patch, vm.id, "vm.leased", _describe(req.ttl_s, labels),
                                             **fields)
        except BaseException:
            if key is not None:
                await asyncio.to_thread(self.inventory.settle_key, key, None, None)
            raise
        if key is not None:
            await asyncio.to_thread(self.inventory.settle_key, key, vm.id, result == "hit")
        return vm, result, False

    async def patch(self, vm_id: str, req: VMPatch) -> VM:
        """Renew the lease (ttl_s from now) and/or merge labels (null removes one)."""
        vm = await asyncio.to_thread(self.inventory.get, vm_id)
        fields: dict = {}
        if req.ttl_s is not None:
            if vm.state != CLAIMED:
                raise Conflict(f"VM {vm_id} is {vm.state}: only a claimed VM has a lease to renew")
            fields["expires_at"] = utcnow() + timedelta(seconds=req.ttl_s)
        if req.labels is not None:
            merged = dict(vm.labels or {})
            for k, v in req.labels.items():
                if v is None:
                    merged.pop(k, None)
                else:
                    merged[k] = v
            fields["labels"] = labelling.validate(merged)
        if not fields:
            return vm
        return await asyncio.to_thread(self.inventory.patch, vm_id, "vm.renewed" if "expires_at" in fields
                                       else "vm.labeled", _describe(req.ttl_s, fields.get("labels")), **fields)

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


def _describe(ttl_s: int | None, labels: dict | None) -> str:
    parts = [f"lease {ttl_s}s from now"] if ttl_s is not None else []
    if labels is not None:
        parts.append("labels " + (",".join(f"{k}={v}" for k, v in sorted(labels.items())) or "(none)"))
    return "; ".join(parts)
