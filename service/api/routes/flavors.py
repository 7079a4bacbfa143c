"""/v1/flavors: what a VM is made of, and its pool's size."""

import asyncio

from fastapi import APIRouter, Response

from service.api.deps import V1, RuntimeDep
from service.schemas import FlavorOut, FlavorPatch, FlavorSpec

router = APIRouter(prefix="/v1/flavors", tags=["flavors"], dependencies=V1)


def out(rt, flavor) -> FlavorOut:
    """The stored flavor plus its template's state (pclited's own, in memory)."""
    return FlavorOut.model_validate(flavor).model_copy(update={"template": rt.templates.status(flavor)})


@router.get("", response_model=list[FlavorOut])
async def list_flavors(rt: RuntimeDep):
    return [out(rt, flavor) for flavor in await asyncio.to_thread(rt.flavors.list)]


@router.post("", response_model=FlavorOut, status_code=201)
async def create_flavor(spec: FlavorSpec, rt: RuntimeDep):
    flavor = await asyncio.to_thread(rt.flavors.create, spec)
    rt.pool.wake()
    return out(rt, flavor)


@router.get("/{name}", response_model=FlavorOut)
async def get_flavor(name: str, rt: RuntimeDep):
    return out(rt, await asyncio.to_thread(rt.flavors.get, name))


@router.put("/{name}", response_model=FlavorOut, responses={201: {"model": FlavorOut}})
async def put_flavor(name: str, spec: FlavorSpec, rt: RuntimeDep, response: Response):
    flavor, created = await asyncio.to_thread(rt.flavors.replace, name, spec)
    response.status_code = 201 if created else 200
    rt.pool.flavor_changed(name)
    return out(rt, flavor)


@router.patch("/{name}", response_model=FlavorOut)
async def patch_flavor(name: str, patch: FlavorPatch, rt: RuntimeDep):
    flavor = await asyncio.to_thread(rt.flavors.patch, name, patch)
    rt.pool.flavor_changed(name)
    return out(rt, flavor)


@router.delete("/{name}", status_code=204)
async def delete_flavor(name: str, rt: RuntimeDep):
    await asyncio.to_thread(rt.flavors.delete, name)
    await rt.pool.drain(name)
    return Response(status_code=204)
