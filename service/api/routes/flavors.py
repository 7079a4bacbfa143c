"""/v1/flavors: what a VM is made of, and its pool's size."""

import asyncio
from functools import partial
from typing import Annotated

from fastapi import APIRouter, Path, Query, Response

from service.api.deps import V1, NodeDep
from service.schemas import FlavorOut, FlavorPatch, FlavorSpec, TemplateOut

router = APIRouter(prefix="/v1/flavors", tags=["flavors"], dependencies=V1)
Name = Annotated[str, Path(description="the flavor's DNS label")]


def out(node, flavor) -> FlavorOut:
    """The stored flavor plus its template's state (pclited's own, in memory)."""
    status = node.templates.status(flavor)  # model_copy does not validate: a dict would serialize with warnings
    template = None if status is None else TemplateOut.model_validate(status)
    return FlavorOut.model_validate(flavor).model_copy(update={"template": template})


@router.get("", response_model=list[FlavorOut])
async def list_flavors(node: NodeDep):
    return [out(node, flavor) for flavor in await asyncio.to_thread(node.flavors.list)]


DryRun = Annotated[bool, Query(description="validate and answer with the result, writing nothing")]


@router.post("", response_model=FlavorOut, status_code=201)
async def create_flavor(spec: FlavorSpec, node: NodeDep, dry_run: DryRun = False):
    flavor = await asyncio.to_thread(partial(node.flavors.create, spec, dry_run=dry_run))
    if not dry_run:
        node.pool.wake()
    return out(node, flavor)


@router.get("/{name}", response_model=FlavorOut)
async def get_flavor(name: Name, node: NodeDep):
    return out(node, await asyncio.to_thread(node.flavors.get, name))


@router.put("/{name}", response_model=FlavorOut, responses={201: {"model": FlavorOut}})
async def put_flavor(name: Name, spec: FlavorSpec, node: NodeDep, response: Response, dry_run: DryRun = False):
    flavor, created = await asyncio.to_thread(partial(node.flavors.replace, name, spec, dry_run=dry_run))
    response.status_code = 201 if created else 200
    if not dry_run:
        node.pool.flavor_changed(name)
    return out(node, flavor)


@router.patch("/{name}", response_model=FlavorOut)
async def patch_flavor(name: Name, patch: FlavorPatch, node: NodeDep, dry_run: DryRun = False):
    flavor = await asyncio.to_thread(partial(node.flavors.patch, name, patch, dry_run=dry_run))
    if not dry_run:
        node.pool.flavor_changed(name)
    return out(node, flavor)


@router.delete("/{name}", status_code=204)
async def delete_flavor(name: Name, node: NodeDep):
    await asyncio.to_thread(node.flavors.delete, name)
    await node.pool.drain(name)
    return Response(status_code=204)
