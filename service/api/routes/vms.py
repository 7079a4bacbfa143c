"""/v1/vms: claim a ready VM, look at VMs, exec in them, stop them."""

import asyncio
import base64
import binascii
import json
from datetime import datetime
from typing import Annotated
from urllib.parse import urlencode

from fastapi import APIRouter, Header, Path, Query, Request, Response
from fastapi.encoders import jsonable_encoder
from fastapi.responses import PlainTextResponse, StreamingResponse
from pydantic import ValidationError

from service.api.deps import V1, NodeDep
from service.api.middleware import TAR_TYPES, media_type
from service.models import TERMINAL_STATES
from service.schemas import (
    NAME_PATTERN,
    ClaimOut,
    ClaimRequest,
    EventOut,
    ExecOut,
    ExecRequest,
    RootfsOut,
    RootfsRequest,
    VMOut,
    VMPatch,
    VMState,
)
from service.services import labels as labelling
from service.services.errors import Invalid
from service.services.vms import MAX_CONSOLE_TAIL

router = APIRouter(prefix="/v1/vms", tags=["vms"], dependencies=V1)
VmId = Annotated[str, Path(description="the VM's id (vm-…)")]


@router.post("", response_model=ClaimOut, status_code=201,
             responses={503: {"description": "pool empty and wait=false (Retry-After), or the boot failed"}})
async def claim_vm(req: ClaimRequest, node: NodeDep, response: Response,
                   idempotency_key: str | None = Header(None, description="a retry with the same key (within 24 h) "
                                                        "and body returns the same VM; another body: 422")):
    vm, result, replayed = await node.vms.claim(req, idempotency_key)
    if replayed:
        response.headers["Idempotent-Replayed"] = "true"
    return ClaimOut.model_validate({**VMOut.model_validate(vm).model_dump(), "claim": result})


WATCH_POLL_S = 0.2
WATCH_HEARTBEAT_S = 15.0


def _continue_token(vm) -> str:
    raw = json.dumps([vm.created_at.isoformat(), vm.id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _after(token: str) -> tuple[datetime, str]:
    try:
        created, vm_id = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        return datetime.fromisoformat(created), str(vm_id)
    except (binascii.Error, ValueError, TypeError):
        raise Invalid("bad continue token: pass back the X-Continue header of the previous page unchanged") from None


def _line(kind: str, obj: dict, rv: int) -> bytes:
    return (json.dumps({"type": kind, "object": obj, "resourceVersion": rv}) + "\n").encode()


@router.get("", response_model=list[VMOut],
            description="Labels filter with labelSelector (kubectl's equality syntax: `a=b,c!=d,e,!f`). Pages: "
                        "`limit`; the response's `X-Continue` header (and Link rel=next) gives the next page's "
                        "`continue` token. `X-Resource-Version` is the inventory's version (its last event id). "
                        "`watch=true` streams NDJSON `{type: ADDED|MODIFIED|DELETED, object, resourceVersion}`: "
                        "the current live VMs as ADDED (or the changes after `resourceVersion`), then every change; "
                        "a VM that stops or fails (or stops matching) is DELETED.",
            responses={200: {"content": {"application/x-ndjson": {}}}})
async def list_vms(request: Request, node: NodeDep, response: Response,
                   flavor: str | None = Query(None, max_length=63, pattern=NAME_PATTERN),
                   state: VMState | None = None,
                   label_selector: str | None = Query(None, alias="labelSelector", max_length=4096),
                   limit: int | None = Query(None, ge=1, le=1000),
                   continue_: str | None = Query(None, alias="continue", max_length=1024),
                   watch: bool = False,
                   resource_version: int | None = Query(None, alias="resourceVersion", ge=0)):
    selector = labelling.parse_selector(label_selector or "")
    if watch:
        if limit is not None or continue_ is not None:
            raise Invalid("watch=true does not page: drop limit and continue")
        return StreamingResponse(_watch(node, flavor, state, selector, resource_version),
                                 media_type="application/x-ndjson")
    after = _after(continue_) if continue_ else None
    rv = await asyncio.to_thread(node.inventory.last_event_id)
    vms, more = await asyncio.to_thread(node.inventory.page, flavor, state,
                                        lambda vm: labelling.matches(selector, vm.labels), limit, after)
    response.headers["X-Resource-Version"] = str(rv)
    if more:
        token = _continue_token(vms[-1])
        response.headers["X-Continue"] = token
        query = {k: v for k, v in request.query_params.items() if k != "continue"} | {"continue": token}
        response.headers["Link"] = f'<{request.url.path}?{urlencode(query)}>; rel="next"'
    return vms


async def _watch(node, flavor, state, selector, resource_version):
    inventory = node.inventory

    def wanted(vm) -> bool:
        return ((not flavor or vm.flavor == flavor) and (not state or vm.state == state)
                and labelling.matches(selector, vm.labels))

    def out(vm) -> dict:
        return jsonable_encoder(VMOut.model_validate(vm))

    sent: set[str] = set()
    if resource_version is None:
        rv = await asyncio.to_thread(inventory.last_event_id)
        for vm in await asyncio.to_thread(inventory.live):
            if wanted(vm):
                sent.add(vm.id)
                yield _line("ADDED", out(vm), rv)
    else:
        rv = resource_version
    idle = 0.0
    while True:
        changes = await asyncio.to_thread(inventory.events_after, rv)
        if not changes:
            await asyncio.sleep(WATCH_POLL_S)
            idle += WATCH_POLL_S
            if idle >= WATCH_HEARTBEAT_S:  # an empty line keeps proxies from closing an idle stream
                idle = 0.0
                yield b"\n"
            continue
        idle = 0.0
        for event_id, vm_id, _kind in changes:
            rv = event_id
            if vm_id is None:
                continue
            vm = await asyncio.to_thread(inventory.find, vm_id)
            gone = vm is None or (vm.state in TERMINAL_STATES and state not in TERMINAL_STATES)
            if gone or not wanted(vm):
                if vm_id in sent:
                    sent.discard(vm_id)
                    yield _line("DELETED", out(vm) if vm is not None else {"id": vm_id}, rv)
                continue
            yield _line("MODIFIED" if vm_id in sent else "ADDED", out(vm), rv)
            sent.add(vm_id)


@router.patch("/{vm_id}", response_model=VMOut,
              description="A JSON merge patch: `ttl_s` renews a claimed VM's lease (it ends ttl_s from now); "
                          "`labels` are merged (a null value removes a label).")
async def patch_vm(vm_id: VmId, req: VMPatch, node: NodeDep):
    return await node.vms.patch(vm_id, req)


@router.get("/{vm_id}", response_model=VMOut)
async def get_vm(vm_id: VmId, node: NodeDep):
    return await asyncio.to_thread(node.inventory.get, vm_id)


@router.delete("/{vm_id}", response_model=VMOut, status_code=202,
               responses={200: {"model": VMOut, "description": "already stopped (or stopped while waiting)"}})
async def delete_vm(vm_id: VmId, node: NodeDep, response: Response,
                    wait: bool = Query(False, description="wait until the VMM has stopped")):
    vm, done = await node.vms.delete(vm_id, wait)
    response.status_code = 200 if done else 202
    return vm


@router.post("/{vm_id}/exec", response_model=ExecOut)
async def exec_in_vm(vm_id: VmId, req: ExecRequest, node: NodeDep):
    return await node.vms.exec(vm_id, req)


@router.get("/{vm_id}/console", response_class=PlainTextResponse)
async def get_vm_console(vm_id: VmId, node: NodeDep, tail: int = Query(65536, ge=1, le=MAX_CONSOLE_TAIL)):
    data = await asyncio.to_thread(node.vms.console, vm_id, tail)
    return PlainTextResponse(data)


@router.get("/{vm_id}/events", response_model=list[EventOut])
async def list_vm_events(vm_id: VmId, node: NodeDep):
    return await asyncio.to_thread(node.vms.events, vm_id)


@router.post("/{vm_id}/rootfs", response_model=RootfsOut,
             openapi_extra={"requestBody": {"content": {
                 "application/json": {"schema": {"$ref": "#/components/schemas/RootfsRequest"}},
                 "application/x-tar": {"schema": {"type": "string", "format": "binary"}}}}})
async def attach_rootfs(vm_id: VmId, request: Request, node: NodeDep, read_only: bool = False,
                        size_mib: int | None = Query(None, ge=1, le=1 << 20)):
    """A container's rootfs into a claimed VM: an ext4 image of it becomes the VM's disk, mounted at /rootfs."""
    content_type = media_type(request.headers)
    if content_type in TAR_TYPES:
        return await node.rootfs.attach_tar(vm_id, request.stream(), read_only, size_mib)
    if content_type != "application/json":
        raise Invalid(f"Content-Type {content_type or '(none)'} is neither application/json ({{\"path\": DIR}}) nor "
                      "application/x-tar (a tar stream of the rootfs)")
    try:
        spec = RootfsRequest.model_validate_json(await request.body())
    except ValidationError as exc:
        raise Invalid(f"bad rootfs request: {exc.errors()[0]['msg']} at {exc.errors()[0]['loc']}: send "
                      "{\"path\": \"/abs/dir\", \"read_only\": false}") from None
    return await node.rootfs.attach_path(vm_id, spec.path, spec.read_only, spec.size_mib,
                                       [mount.model_dump() for mount in spec.mounts], spec.hostname)
