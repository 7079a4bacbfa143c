"""Route dependencies: pclited's node (its services), and the bearer scheme (for the OpenAPI description; the Guard
enforces it)."""

from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPBearer

from service.services.node import Node

bearer = HTTPBearer(auto_error=False, description="the token from pclited's data dir (token file)")


def get_node(request: Request) -> Node:
    return request.app.state.node


NodeDep = Annotated[Node, Depends(get_node)]
V1 = [Depends(bearer)]
