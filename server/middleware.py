"""Pure ASGI middleware: request ids and access logs, draining on shutdown, API-key auth, the
request body limit.

Pure ASGI rather than BaseHTTPMiddleware so streaming responses and `receive()`-based
disconnect detection pass through untouched.
"""

from __future__ import annotations

import asyncio
import contextvars
import hmac
import logging
import re
import time
import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.errors import ApiError, internal_error, service_unavailable

if TYPE_CHECKING:
    from server.state import ServerState

logger = logging.getLogger(__name__)

REQUEST_ID_HEADER = "x-request-id"
# request id of the HTTP request being handled, for log lines ("-" outside requests)
request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")

_SAFE_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
# with API keys configured, every path needs one except these (deny by default, so a route
# added later is protected without anyone remembering to list it)
OPEN_PATHS = frozenset({"/health", "/metrics", "/version", "/openapi.json", "/docs",
                        "/docs/oauth2-redirect", "/redoc"})
# answered even while draining: scrapers should see the shutdown through
_OPEN_WHILE_DRAINING = frozenset({"/metrics"})


class RequestIdFilter(logging.Filter):
    """Adds `request_id` to every record so formats can print it."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = request_id_var.get()
        return True


def scope_state(scope: Scope) -> dict[str, object]:
    # starlette's request.state reads this dict; uvicorn gives each request its own copy
    state: dict[str, object] = scope.setdefault("state", {})
    return state


class RequestContextMiddleware:
    """Honours or generates X-Request-Id, echoes it back, records the arrival time, turns
    unhandled exceptions into a 500 envelope and logs one access line per request."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = Headers(scope=scope).get(REQUEST_ID_HEADER, "")
        request_id = incoming if _SAFE_ID.fullmatch(incoming) else uuid.uuid4().hex
        state = scope_state(scope)
        state["request_id"] = request_id
        state["arrival_time"] = time.monotonic()
        token = request_id_var.set(request_id)
        status = 0

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = list(message.get("headers", []))
                headers.append((REQUEST_ID_HEADER.encode(), request_id.encode()))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            logger.exception("unhandled error in %s %s", scope["method"], scope["path"])
            if status:
                raise  # mid-response: the server closes the connection, the client sees it
            # a whole 500 response: the connection stays usable for the client's next request
            await internal_error().to_response()(scope, receive, send_with_id)
        finally:
            elapsed_ms = (time.monotonic() - float(state["arrival_time"])) * 1000  # type: ignore[arg-type]
            logger.info("%s %s %d %.1f ms", scope["method"], scope["path"], status, elapsed_ms)
            request_id_var.reset(token)


class ApiKeyMiddleware:
    """401 unless `Authorization: Bearer KEY` matches a configured key, compared in constant
    time against every key so neither the match position nor a common prefix shows.
    `open_paths` (exact paths) need no key: OPEN_PATHS plus the app's playground pages."""

    def __init__(self, app: ASGIApp, api_keys: Sequence[str],
                 open_paths: frozenset[str] = OPEN_PATHS) -> None:
        self.app = app
        self.api_keys = tuple(key.encode() for key in api_keys)
        self.open_paths = open_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.open_paths or \
                scope["method"] == "OPTIONS" or self.is_authorized(scope):
            await self.app(scope, receive, send)
            return
        error = ApiError(401, "Invalid or missing API key; send `Authorization: Bearer KEY`.",
                         code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        await error.to_response()(scope, receive, send)

    def is_authorized(self, scope: Scope) -> bool:
        scheme, _, given = Headers(scope=scope).get("authorization", "").partition(" ")
        if scheme.lower() != "bearer":
            return False
        return key_matches(given.strip().encode(), self.api_keys)


def key_matches(given: bytes, api_keys: Sequence[bytes]) -> bool:
    matched = False
    for key in api_keys:  # no early exit: the time taken does not say which key matched
        matched |= hmac.compare_digest(given, key)
    return matched


class DrainMiddleware:
    """Counts the HTTP requests in flight (graceful shutdown waits for them) and, once the
    server is draining, answers new ones with 503 and `Connection: close`."""

    def __init__(self, app: ASGIApp, state: ServerState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.state.draining and scope["path"] not in _OPEN_WHILE_DRAINING:
            error = service_unavailable("The server is shutting down; retry on another "
                                        "replica or after the restart.", "server_shutting_down")
            await error.to_response({"Connection": "close"})(scope, receive, send)
            return
        self.state.num_in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.state.num_in_flight -= 1


class BodyLimitMiddleware:
    """413 for bodies over `max_bytes`: at once from Content-Length, else while reading. 408
    (and the connection closed) when the whole body has not arrived `timeout_s` after the
    request began: a client that stops sending, or sends less than its Content-Length, holds
    nothing for long."""

    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await self.too_large().to_response()(scope, receive, send)
            return
        num_received = 0
        is_complete = False
        deadline = time.monotonic() + self.timeout_s

        async def limited_receive() -> Message:
            nonlocal num_received, is_complete
            if is_complete:  # past the body, receive() only waits for a disconnect
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), deadline - time.monotonic())
            except asyncio.TimeoutError:
                # FastAPI re-raises HTTPException from body reading; the handler wraps it
                raise HTTPException(408, f"The request body did not arrive within "
                                    f"{self.timeout_s:g} s.", headers={"Connection": "close"}
                                    ) from None
            num_received += len(message.get("body", b""))
            is_complete = not message.get("more_body", False)
            if num_received > self.max_bytes:
                raise HTTPException(413, self.too_large().message)
            return message

        await self.app(scope, limited_receive, send)

    def too_large(self) -> ApiError:
        return ApiError(413, f"Request body exceeds the limit of {self.max_bytes} bytes.",
                        code="request_too_large")
