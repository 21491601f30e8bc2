"""GET /health (200 only while the engine loop is alive and making progress) and GET /version."""

from __future__ import annotations

import logging

from fastapi import APIRouter

from server import __version__
from server.errors import service_unavailable
from server.protocol import ErrorResponse, HealthResponse, VersionResponse
from server.state import EngineDep, StateDep

logger = logging.getLogger(__name__)

router = APIRouter(tags=["server"])


@router.get("/health", response_model=HealthResponse,
            responses={503: {"model": ErrorResponse,
                             "description": "loading, engine dead or hung, or shutting down"}})
async def health(state: StateDep, engine: EngineDep) -> HealthResponse:
    # get_engine already answered 503 while loading (and DrainMiddleware while shutting down);
    # here the loop itself must be running, and not stuck in one step: the worker stamps a
    # heartbeat after every step and every idle wait
    if not engine.is_alive:
        raise service_unavailable("The engine loop is not running.", "engine_dead")
    stalled_s = engine.seconds_since_progress
    limit_s = state.settings.engine_stall_timeout
    if stalled_s > limit_s:
        logger.warning("health: the engine loop has made no progress for %.1f s", stalled_s)
        raise service_unavailable(
            f"The engine loop has made no progress for {stalled_s:.0f} s (limit {limit_s:g} s).",
            "engine_stalled")
    return HealthResponse()


@router.get("/version", response_model=VersionResponse)
async def version() -> VersionResponse:
    return VersionResponse(version=__version__)
