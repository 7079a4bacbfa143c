"""Probes, metrics, version: /healthz, /readyz and /metrics need no token."""

import asyncio
from importlib.metadata import PackageNotFoundError, version

from fastapi import APIRouter, Response

from service.api.deps import V1, NodeDep
from service.api.errors import problem
from service.metrics import CONTENT_TYPE
from service.schemas import VersionOut

router = APIRouter(tags=["health"])


def pclite_version() -> str:
    try:
        return version("pclite")
    except PackageNotFoundError:
        return "0.0.0+unknown"


@router.get("/healthz")
async def healthz():
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(node: NodeDep):
    why = await asyncio.to_thread(node.healthy)
    if why:
        return problem(503, f"not ready: {why}", "not-ready")
    return {"status": "ready", "jail": node.launcher.jails.status()}  # what of the VMM jail is in force


@router.get("/metrics")
async def get_metrics(node: NodeDep):
    return Response(node.metrics.render(), media_type=CONTENT_TYPE)


@router.get("/v1/version", response_model=VersionOut, dependencies=V1)
async def get_version():
    return {"version": pclite_version()}
