"""/v1/pools: each flavor's warm pool (read its state, set its target)."""

import asyncio
from collections import Counter

from fastapi import APIRouter

from service.api.deps import V1, RuntimeDep
from service.schemas import PoolOut, PoolPatch

router = APIRouter(prefix="/v1/pools", tags=["pools"], dependencies=V1)


@router.get("", response_model=list[PoolOut])
async def list_pools(rt: RuntimeDep):
    flavors = await asyncio.to_thread(rt.flavors.list)
    counts = await asyncio.to_thread(rt.inv.pool_counts)
    return [rt.pool.pool_status(f, counts.get(f.name, Counter())) for f in flavors]


@router.get("/{flavor}", response_model=PoolOut)
async def get_pool(flavor: str, rt: RuntimeDep):
    found = await asyncio.to_thread(rt.flavors.get, flavor)
    counts = await asyncio.to_thread(rt.inv.pool_counts)
    return rt.pool.pool_status(found, counts.get(flavor, Counter()))


@router.patch("/{flavor}", response_model=PoolOut)
async def patch_pool(flavor: str, patch: PoolPatch, rt: RuntimeDep):
    found = await asyncio.to_thread(rt.flavors.set_target, flavor, patch.target)
    rt.pool.wake()
    counts = await asyncio.to_thread(rt.inv.pool_counts)
    return rt.pool.pool_status(found, counts.get(flavor, Counter()))
