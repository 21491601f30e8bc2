"""The HTTP routes, one router per concern: `all_routers()` is what the app factory mounts
(with a HEAD twin of every GET route); ERROR_RESPONSES and SSE_RESPONSE describe their
responses in the OpenAPI schema."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fastapi import APIRouter
from fastapi.routing import APIRoute
from pydantic import BaseModel

from server.protocol import ErrorResponse

# documented in the OpenAPI schema so clients (and schema fuzzers) know every error's shape
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": description}
    for status, description in (
        (400, "Invalid request (OpenAI error envelope)"),
        (401, "Missing or wrong API key"),
        (404, "Unknown model"),
        (413, "Request body too large"),
        (429, "Waiting queue full; retry after Retry-After seconds"),
        (500, "The request failed in the engine"),
        (503, "The model is loading or the engine has stopped"),
    )
}


def SSE_RESPONSE(chunk: type[BaseModel]) -> dict[str, Any]:  # noqa: N802 - reads as a constant
    """The 200 response of a route that streams `chunk` objects when `stream` is true."""
    return {"description": f"JSON, or with `stream: true` an SSE stream of {chunk.__name__} "
                           "objects ending with `data: [DONE]`",
            "content": {"text/event-stream": {"schema": {"type": "string"}}}}


def all_routers() -> list[APIRouter]:
    from server.routes import chat, completions, health, metrics, models, tokenize

    routers = [chat.router, completions.router, models.router, tokenize.router, health.router,
               metrics.router]
    return [*routers, head_router(routers)]


def head_router(routers: Sequence[APIRouter]) -> APIRouter:
    """A HEAD twin of every GET route in `routers`: load balancers and uptime checks probe with
    HEAD, and FastAPI, unlike Starlette, does not add it. A twin runs the same endpoint and
    dependencies, so it answers the status and headers GET would (uvicorn sends no body for
    HEAD). Twins stay out of the OpenAPI schema, which documents GET only, and live on a new
    router per call so building several apps never adds a route twice."""
    head = APIRouter(include_in_schema=False)
    for router in routers:
        for route in router.routes:
            if isinstance(route, APIRoute) and "GET" in (route.methods or ()):
                head.add_api_route(
                    route.path, route.endpoint, methods=["HEAD"], name=f"{route.name}_head",
                    response_model=route.response_model, status_code=route.status_code,
                    response_class=route.response_class, dependencies=route.dependencies)
    return head
