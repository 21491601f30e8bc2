"""The HTTP routes, one router per concern: `all_routers()` is what the app factory mounts;
ERROR_RESPONSES and SSE_RESPONSE describe their responses in the OpenAPI schema."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
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

    return [chat.router, completions.router, models.router, tokenize.router, health.router,
            metrics.router]
