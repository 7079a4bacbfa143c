"""Route dependencies: the runtime, and the bearer scheme (for the OpenAPI description; the Guard enforces it)."""

from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPBearer

from service.services.runtime import Runtime

bearer = HTTPBearer(auto_error=False, description="the token from pclited's data dir (token file)")


def get_runtime(request: Request) -> Runtime:
    return request.app.state.runtime


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
V1 = [Depends(bearer)]
