"""Graceful shutdown: on SIGTERM/SIGINT refuse new requests with 503, let running ones finish
within the shutdown timeout, fail the rest with a clear error, then let uvicorn stop."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from types import FrameType

import uvicorn

from server.errors import service_unavailable
from server.state import ServerState

logger = logging.getLogger(__name__)

# after failing the leftovers, how long their error responses get to reach the clients
FLUSH_GRACE_S = 5.0
# uvicorn's own limit on waiting for connections once the drain is over (a backstop)
UVICORN_GRACEFUL_TIMEOUT_S = 5


@dataclass(slots=True)
class Drain:
    """The shutdown's progress. begin() and hurry() run in a signal handler: they only set
    fields; is_done() runs on the event loop, every uvicorn tick (0.1 s)."""

    state: ServerState
    timeout_s: float
    deadline: float | None = None  # monotonic; None until a signal arrives
    failed_at: float | None = None  # when the leftovers were failed
    announced: bool = False

    @property
    def has_begun(self) -> bool:
        return self.deadline is not None

    def begin(self) -> None:
        self.state.draining = True
        self.deadline = time.monotonic() + self.timeout_s

    def hurry(self) -> None:
        """A second signal: fail what is left now instead of waiting out the timeout."""
        self.deadline = time.monotonic()

    def is_done(self) -> bool:
        assert self.deadline is not None
        if not self.announced:
            self.announced = True
            logger.info("shutting down: refusing new requests, %d in flight get up to %g s",
                        self.state.num_in_flight, self.timeout_s)
        if self.state.num_in_flight == 0:
            logger.info("drained: no request in flight")
            return True
        now = time.monotonic()
        if self.failed_at is None:
            if now >= self.deadline:
                self._fail_leftovers()
                self.failed_at = now
            return False
        return now - self.failed_at >= FLUSH_GRACE_S

    def _fail_leftovers(self) -> None:
        engine = self.state.engine
        error = service_unavailable(
            f"The server is shutting down and the request did not finish within the "
            f"{self.timeout_s:g} s shutdown timeout.", "server_shutting_down")
        num_failed = engine.fail_all(error) if engine is not None else 0
        logger.warning("shutdown timeout (%g s) passed: failed %d unfinished requests",
                       self.timeout_s, num_failed)


class GracefulServer(uvicorn.Server):
    """uvicorn.Server whose first SIGTERM/SIGINT starts a drain instead of closing the listening
    socket at once, so requests arriving meanwhile get a 503 rather than a refused connection.
    A second signal cuts the wait short; a third is uvicorn's own (SIGINT: force quit)."""

    def __init__(self, config: uvicorn.Config, state: ServerState) -> None:
        config.timeout_graceful_shutdown = UVICORN_GRACEFUL_TIMEOUT_S
        super().__init__(config)
        self.drain = Drain(state, state.settings.shutdown_timeout)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # not recorded in uvicorn's captured signals: a drained server exits normally, status 0
        if not self.drain.has_begun:
            self.drain.begin()
        elif self.drain.failed_at is None:
            self.drain.hurry()
        else:
            super().handle_exit(sig, frame)

    async def on_tick(self, counter: int) -> bool:
        if await super().on_tick(counter):
            return True
        return self.drain.has_begun and self.drain.is_done()
