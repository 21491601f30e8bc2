"""The engine's typed errors; server/errors.py maps each to an HTTP status and error envelope."""

from __future__ import annotations


class EngineError(Exception):
    """Base class of every error the engine raises on purpose."""


class InvalidRequestError(EngineError, ValueError):
    """A request or its sampling parameters are invalid; `param` names the offending field."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class ContextLengthExceededError(InvalidRequestError):
    """Prompt plus requested completion do not fit the model's context window."""

    def __init__(self, max_model_len: int, num_prompt_tokens: int, max_tokens: int | None,
                 at_least: bool = False) -> None:
        """at_least: the prompt was counted only until it could not fit (a lower bound)."""
        requested = num_prompt_tokens + (max_tokens or 0)
        bound = "at least " if at_least else ""
        detail = f"{bound}{num_prompt_tokens} in the messages"
        if max_tokens is not None:
            detail += f", {max_tokens} in the completion"
        super().__init__(
            f"This model's maximum context length is {max_model_len} tokens. "
            f"However, you requested {bound}{requested} tokens ({detail}). "
            "Please reduce the length of the messages or completion.",
            param="messages",
        )
        self.max_model_len = max_model_len
        self.num_prompt_tokens = num_prompt_tokens
        self.max_tokens = max_tokens


class UnsupportedModelError(EngineError):
    """The checkpoint's architecture, format or file is not one the engine can load."""


class QueueFullError(EngineError):
    """The waiting queue is at `max_queue_len`; the caller should retry later."""


class EngineDeadError(EngineError):
    """The engine loop has stopped; no request can be served until restart."""


class EngineDiedError(EngineDeadError):
    """What a request in flight gets when the engine loop dies under it (the server's 500;
    a request refused because the engine is already dead gets EngineDeadError, 503)."""


class RequestFailedError(EngineError):
    """Processing one request raised; that request is finished with an error, others go on."""


class RequestTimeoutError(RequestFailedError, TimeoutError):
    """A request passed its deadline; it is finished and its blocks are freed."""


class WorkerGroupError(EngineError):
    """A rank of the parallel group died, hung past the distributed timeout, or broke a
    collective: the group cannot compute any more steps (fatal, like a lost device)."""
