"""/v1/vms: claim a ready VM, look at VMs, exec in them, stop them."""

import asyncio

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import PlainTextResponse
from pydantic import ValidationError

from service.api.deps import V1, NodeDep
from service.api.middleware import TAR_TYPES, media_type
from service.schemas import (
    ClaimOut,
    ClaimRequest,
    EventOut,
    ExecOut,
    ExecRequest,
    RootfsOut,
    RootfsRequest,
    VMOut,
    VMState,
)
from service.services.errors import Invalid
from service.services.vms import MAX_CONSOLE_TAIL

router = APIRouter(prefix="/v1/vms", tags=["vms"], dependencies=V1)


@router.post("", response_model=ClaimOut, status_code=201,
             responses={503: {"description": "pool empty and wait=false (Retry-After), or the boot failed"}})
async def claim_vm(req: ClaimRequest, node: NodeDep):
    vm, result = await node.pool.claim(req.flavor, req.wait)
    return ClaimOut.model_validate({**VMOut.model_validate(vm).model_dump(), "claim": result})


@router.get("", response_model=list[VMOut])
async def list_vms(node: NodeDep, flavor: str | None = Query(None, max_length=63), state: VMState | None = None):
    return await asyncio.to_thread(node.inventory.list, flavor, state)


@router.get("/{vm_id}", response_model=VMOut)
async def get_vm(vm_id: str, node: NodeDep):
    return await asyncio.to_thread(node.inventory.get, vm_id)


@router.delete("/{vm_id}", response_model=VMOut, status_code=202,
               responses={200: {"model": VMOut, "description": "already stopped (or stopped while waiting)"}})
async def delete_vm(vm_id: str, node: NodeDep, response: Response,
                    wait: bool = Query(False, description="wait until the VMM has stopped")):
    vm, done = await node.vms.delete(vm_id, wait)
    response.status_code = 200 if done else 202
    return vm


@router.post("/{vm_id}/exec", response_model=ExecOut)
async def exec_in_vm(vm_id: str, req: ExecRequest, node: NodeDep):
    return await node.vms.exec(vm_id, req)


@router.get("/{vm_id}/console", response_class=PlainTextResponse)
async def console(vm_id: str, node: NodeDep, tail: int = Query(65536, ge=1, le=MAX_CONSOLE_TAIL)):
    data = await asyncio.to_thread(node.vms.console, vm_id, tail)
    return PlainTextResponse(data)


@router.get("/{vm_id}/events", response_model=list[EventOut])
async def events(vm_id: str, node: NodeDep):
    return await asyncio.to_thread(node.vms.events, vm_id)


@router.post("/{vm_id}/rootfs", response_model=RootfsOut,
             openapi_extra={"requestBody": {"content": {
                 "application/json": {"schema": RootfsRequest.model_json_schema()},
                 "application/x-tar": {"schema": {"type": "string", "format": "binary"}}}}})
async def attach_rootfs(vm_id: str, request: Request, node: NodeDep, read_only: bool = False,
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
