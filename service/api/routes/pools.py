"""/v1/pools: each flavor's warm pool (read its state, set its target)."""

import asyncio
from collections import Counter

from fastapi import APIRouter

from service.api.deps import V1, NodeDep
from service.api.routes.flavors import Name
from service.schemas import PoolOut, PoolPatch

router = APIRouter(prefix="/v1/pools", tags=["pools"], dependencies=V1)


@router.get("", response_model=list[PoolOut])
async def list_pools(node: NodeDep):
    flavors = await asyncio.to_thread(node.flavors.list)
    counts = await asyncio.to_thread(node.inventory.pool_counts)
    return [node.pool.pool_status(f, counts.get(f.name, Counter())) for f in flavors]


@router.get("/{flavor}", response_model=PoolOut)
async def get_pool(flavor: Name, node: NodeDep):
    found = await asyncio.to_thread(node.flavors.get, flavor)
    counts = await asyncio.to_thread(node.inventory.pool_counts)
    return node.pool.pool_status(found, counts.get(flavor, Counter()))


@router.patch("/{flavor}", response_model=PoolOut)
async def patch_pool(flavor: Name, patch: PoolPatch, node: NodeDep):
    found = await asyncio.to_thread(node.flavors.set_target, flavor, patch.target)
    node.pool.wake()
    counts = await asyncio.to_thread(node.inventory.pool_counts)
    return node.pool.pool_status(found, counts.get(flavor, Counter()))
