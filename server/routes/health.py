"""GET /health (200 only while the engine loop is alive) and GET /version."""

from __future__ import annotations

from fastapi import APIRouter

from server import __version__
from server.errors import service_unavailable
from server.protocol import ErrorResponse, HealthResponse, VersionResponse
from server.state import EngineDep

router = APIRouter(tags=["server"])


@router.get("/health", response_model=HealthResponse,
            responses={503: {"model": ErrorResponse, "description": "loading or engine dead"}})
async def health(engine: EngineDep) -> HealthResponse:
    # get_engine already answered 503 while loading; here the loop itself must be running
    if not engine.is_alive:
        raise service_unavailable("The engine loop is not running.", "engine_dead")
    return HealthResponse()


@router.get("/version", response_model=VersionResponse)
async def version() -> VersionResponse:
    return VersionResponse(version=__version__)
