"""The server's per-app state (on app.state) and the FastAPI dependencies that read it."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request

from engine import AsyncEngine
from server.errors import model_not_found, service_unavailable
from server.settings import Settings


@dataclass(slots=True)
class ServerState:
    """Set once by the lifespan; routes only read it. engine is None while loading.
    draining and num_in_flight belong to graceful shutdown (server/shutdown.py)."""

    settings: Settings
    engine: AsyncEngine | None = None
    served_model_name: str | None = None
    load_error: str | None = None
    url: str | None = None  # where the server listens, once bound (set by the CLI)
    created: int = field(default_factory=lambda: int(time.time()))
    draining: bool = False  # shutting down: new requests get 503
    num_in_flight: int = 0  # HTTP requests being answered (streams until their last byte)

    def model_name_for(self, requested: str | None) -> str:
        """The served name; a request naming another model gets 404. The name is only ever
        compared, never used as a path."""
        assert self.served_model_name is not None
        if requested is not None and requested != self.served_model_name:
            raise model_not_found(requested)
        return self.served_model_name


def get_state(request: Request) -> ServerState:
    state: ServerState = request.app.state.server
    return state


def get_engine(request: Request) -> AsyncEngine:
    state = get_state(request)
    if state.engine is not None:
        return state.engine
    if state.load_error is not None:
        raise service_unavailable(f"The model failed to load: {state.load_error}", "load_failed")
    raise service_unavailable("The model is still loading; retry shortly.", "model_loading")


def request_id(request: Request) -> str:
    return str(getattr(request.state, "request_id", "-"))


def arrival_time(request: Request) -> float:
    """time.monotonic() when the request arrived (set by RequestContextMiddleware)."""
    return float(getattr(request.state, "arrival_time", time.monotonic()))


StateDep = Annotated[ServerState, Depends(get_state)]
EngineDep = Annotated[AsyncEngine, Depends(get_engine)]
