"""Every failure as the OpenAI error envelope: engine errors, validation, HTTP errors, crashes."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from engine import (
    ContextLengthExceededError,
    EngineDeadError,
    EngineDiedError,
    EngineError,
    InvalidRequestError,
    QueueFullError,
    RequestFailedError,
)
from server.fields import UnsupportedFieldError
from server.protocol import ErrorDetail, ErrorResponse, InvalidTextError

logger = logging.getLogger(__name__)

RETRY_AFTER_SECONDS = 1  # advertised on 429 (queue full) and 503 (still loading)
GENERATION_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})

_CODES_BY_STATUS = {401: "invalid_api_key", 404: "not_found", 405: "method_not_allowed",
                    408: "request_timeout", 413: "request_too_large", 429: "rate_limit_exceeded"}


class ApiError(Exception):
    """An error the server answers with directly: status, envelope fields, extra headers."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None, error_type: str | None = None,
                 headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.error_type = error_type or error_type_for(status)
        self.headers = dict(headers or {})

    def to_detail(self) -> ErrorDetail:
        return ErrorDetail(message=self.message, type=self.error_type, param=self.param,
                           code=self.code)

    def to_response(self, headers: Mapping[str, str] | None = None) -> JSONResponse:
        body = ErrorResponse(error=self.to_detail()).model_dump()
        return AsciiJSONResponse(body, status_code=self.status,
                                 headers={**self.headers, **(headers or {})})


class AsciiJSONResponse(JSONResponse):
    """JSON with every non-ASCII character escaped: an error message that quotes the client's
    input always encodes, lone surrogates included."""

    def render(self, content: object) -> bytes:
        return json.dumps(content, separators=(",", ":")).encode("ascii")


class ClientDisconnectedError(Exception):
    """The client went away before its response was ready; its requests are aborted."""


CLIENT_CLOSED_REQUEST = 499  # nginx's status for this; nobody is left to read it


def error_type_for(status: int) -> str:
    return "server_error" if status >= 500 else "invalid_request_error"


def model_not_found(name: str) -> ApiError:
    return ApiError(404, f"The model `{name}` does not exist.", param="model",
                    code="model_not_found")


def service_unavailable(message: str, code: str) -> ApiError:
    return ApiError(503, message, code=code, error_type="service_unavailable",
                    headers={"Retry-After": str(RETRY_AFTER_SECONDS)})


def request_timed_out(timeout_s: float) -> ApiError:
    return ApiError(504, f"The request did not finish within the {timeout_s:g} s request "
                    "timeout; its work was stopped.", code="request_timeout",
                    error_type="timeout_error")


def from_engine_error(exc: EngineError, prompt_param: str = "messages") -> ApiError:
    """Map an engine error to status + envelope; `prompt_param` names the prompt field."""
    if isinstance(exc, ContextLengthExceededError):
        return ApiError(400, str(exc), param=prompt_param, code="context_length_exceeded")
    if isinstance(exc, InvalidRequestError):
        return ApiError(400, str(exc), param=exc.param)
    if isinstance(exc, QueueFullError):
        return ApiError(429, str(exc) or "The server is overloaded; retry shortly.",
                        code="queue_full", error_type="rate_limit_exceeded",
                        headers={"Retry-After": str(RETRY_AFTER_SECONDS)})
    if isinstance(exc, EngineDiedError):  # the request was in flight: the server failed it
        return ApiError(500, str(exc), code="engine_dead")
    if isinstance(exc, EngineDeadError):
        return service_unavailable(str(exc) or "The engine has stopped.", "engine_dead")
    if isinstance(exc, RequestFailedError):
        return ApiError(500, str(exc) or "The request failed in the engine.",
                        code="request_failed")
    return ApiError(500, str(exc) or type(exc).__name__, code="engine_error")


def from_validation_errors(errors: Sequence[Mapping[str, object]]) -> ApiError:
    """RequestValidationError's list → one 400 naming the first offending field."""
    if not errors:
        return ApiError(400, "invalid request")
    first = errors[0]
    if first.get("type") == "json_invalid":
        ctx = first.get("ctx")
        reason = ctx.get("error", "") if isinstance(ctx, Mapping) else ""
        return ApiError(400, f"Request body is not valid JSON: {reason}".rstrip(": "),
                        code="invalid_json")
    if first.get("type") == "model_attributes_type" and first.get("loc") in (("body",),
                                                                          ["body"]):
        # e.g. curl -d without -H 'Content-Type: application/json'
        return ApiError(400, "Request body must be a JSON object sent with "
                        "Content-Type: application/json", code="invalid_json")
    problems = [_describe_error(error) for error in errors[:3]]
    param = _param_of(first.get("loc"))
    return ApiError(400, "; ".join(problems), param=param or None)


def _describe_error(error: Mapping[str, object]) -> str:
    message = str(error.get("msg", "invalid value")).removeprefix("Value error, ")
    param = _param_of(error.get("loc"))
    if error.get("type") == "missing" and not param:
        return "Request body is required"
    return f"{param}: {message}" if param else message


def _param_of(loc: object) -> str:
    """('body', 'messages', 0, 'role') → 'messages[0].role'; pydantic's union tags dropped."""
    if not isinstance(loc, (list, tuple)):
        return ""
    param = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(part, int):
            param += f"[{part}]"
        elif "[" in str(part) or str(part) in ("str", "int", "float", "bool"):
            break  # a union member's type tag, not a field
        else:
            param += f".{part}" if param else str(part)
    return param


def _http_error(exc: StarletteHTTPException) -> ApiError:
    message = str(exc.detail)
    if isinstance(exc.__cause__, UnicodeDecodeError):
        message = "Request body is not valid UTF-8 JSON"
    elif exc.status_code == 404:
        message = "Not found"
    return ApiError(exc.status_code, message, code=_CODES_BY_STATUS.get(exc.status_code),
                    headers=exc.headers)


async def _handle_api_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return exc.to_response()


async def _handle_validation(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    _count_rejected_generation(request)
    return from_validation_errors(list(exc.errors())).to_response()


def _count_rejected_generation(request: Request) -> None:
    """request_failure_total{reason="validation"} covers requests the protocol models reject
    too, not only those the engine refuses."""
    if request.url.path not in GENERATION_PATHS:
        return
    engine = getattr(getattr(request.app.state, "server", None), "engine", None)
    if engine is not None:
        engine.metrics.record_validation_failure()


async def _handle_invalid_text(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, InvalidTextError)
    _count_rejected_generation(request)
    return ApiError(400, str(exc), param=exc.param or None, code="invalid_text").to_response()


async def _handle_unsupported_field(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, UnsupportedFieldError)
    _count_rejected_generation(request)
    return ApiError(400, str(exc), param=exc.param, code="unsupported_field").to_response()


async def _handle_http(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    error = _http_error(exc)
    if exc.status_code == 404:
        error.message = f"Invalid URL ({request.method} {request.url.path})"
    elif exc.status_code == 405:
        error.message = f"Method {request.method} not allowed on {request.url.path}"
    return error.to_response()


async def _handle_engine(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, EngineError)
    error = from_engine_error(exc)
    if error.status >= 500:
        logger.error("engine error: %s", exc)
    return error.to_response()


async def _handle_disconnect(request: Request, exc: Exception) -> Response:
    return Response(status_code=CLIENT_CLOSED_REQUEST)


def internal_error() -> ApiError:
    return ApiError(500, "Internal server error", code="internal_error")


def install_exception_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ApiError, _handle_api_error)
    app.add_exception_handler(RequestValidationError, _handle_validation)
    app.add_exception_handler(InvalidTextError, _handle_invalid_text)
    app.add_exception_handler(UnsupportedFieldError, _handle_unsupported_field)
    app.add_exception_handler(StarletteHTTPException, _handle_http)
    app.add_exception_handler(EngineError, _handle_engine)
    app.add_exception_handler(ClientDisconnectedError, _handle_disconnect)
