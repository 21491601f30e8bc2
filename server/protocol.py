"""Pydantic models of the OpenAI requests, responses and stream chunks that pagedserve speaks."""

from __future__ import annotations

import logging
import time
from typing import Annotated, Literal, cast

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    StrictInt,
    field_validator,
    model_serializer,
    model_validator,
)

logger = logging.getLogger(__name__)

MAX_TOP_LOGPROBS = 20  # OpenAI's cap on top_logprobs
# sizes of lists and short strings; long texts are bounded by the body limit and the context
MAX_MESSAGES = 4096
MAX_PROMPTS = 1024  # prompts in one /v1/completions request
MAX_NAME_CHARS = 256  # model, user, message names
MAX_STOP_STRINGS = 16
MAX_TOKEN_ID_LIST = 1024  # stop_token_ids, logit_bias entries

TokenIds = list[StrictInt]
# JSON allows 1e999 and Python's json module NaN/Infinity; no sampling field means either
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]
ShortStr = Annotated[str, Field(max_length=MAX_NAME_CHARS)]


class InvalidTextError(Exception):
    """A string in the request is not valid Unicode text (a lone surrogate, which JSON can
    spell as "\\ud800"): nothing downstream can encode it. Deliberately not a ValueError,
    so pydantic lets it through with the exact `param` instead of the whole body's."""

    def __init__(self, param: str) -> None:
        super().__init__(f"{param or 'the request'} holds a lone surrogate (e.g. \\ud800), "
                         "which is not valid Unicode text")
        self.param = param


def check_encodable(value: object, param: str = "") -> None:
    """Raise InvalidTextError naming the first string (key or value, at any depth) that UTF-8
    cannot encode. Iterative: JSON nested a thousand deep must not exhaust the stack."""
    pending: list[tuple[object, str]] = [(value, param)]
    while pending:
        item, path = pending.pop()
        if isinstance(item, str):
            if not _is_encodable(item):
                raise InvalidTextError(path)
        elif isinstance(item, dict):
            for key, child in reversed(item.items()):
                child_path = f"{path}.{key}" if path else str(key)
                if isinstance(key, str) and not _is_encodable(key):
                    raise InvalidTextError(child_path)
                pending.append((child, child_path))
        elif isinstance(item, list):
            pending.extend((child, f"{path}[{index}]")
                           for index, child in reversed(list(enumerate(item))))


def _is_encodable(text: str) -> bool:
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class OpenAIBaseModel(BaseModel):
    """Requests ignore unknown fields (clients send extras) but log their names at debug."""

    model_config = ConfigDict(extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _log_unknown_fields(cls, data: object) -> object:
        if isinstance(data, dict) and logger.isEnabledFor(logging.DEBUG):
            unknown = sorted(set(map(str, data)) - set(cls.model_fields))
            if unknown:
                logger.debug("%s: ignoring unknown fields %s", cls.__name__, unknown)
        return data


# ---------------------------------------------------------------- requests


class RequestBody(OpenAIBaseModel):
    """A whole request body: every string in it must be encodable text."""

    @model_validator(mode="before")
    @classmethod
    def _check_text(cls, data: object) -> object:
        check_encodable(data)
        return data


class ContentPart(OpenAIBaseModel):
    """One part of an array-valued message content; only `text` parts are served."""

    type: ShortStr
    text: str | None = None


class ChatMessage(OpenAIBaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | Annotated[list[ContentPart], Field(max_length=MAX_MESSAGES)] | None = None
    name: ShortStr | None = None
    tool_call_id: ShortStr | None = None
    tool_calls: Annotated[list[dict[str, object]], Field(max_length=MAX_MESSAGES)] | None = None

    @model_validator(mode="after")
    def _content_required(self) -> ChatMessage:
        # only an assistant turn (e.g. one that made tool calls) may come without content
        if self.content is None and self.role != "assistant":
            raise ValueError(f"content is required for a {self.role} message")
        return self


class StreamOptions(OpenAIBaseModel):
    include_usage: bool = False


class SamplingRequest(RequestBody):
    """Fields shared by chat and legacy completions: OpenAI's plus vLLM's extensions. Ranges
    the engine checks again (SamplingParams.validate) are stated here too, for the schema."""

    model: ShortStr | None = None
    n: int = Field(1, ge=1)
    temperature: FiniteFloat | None = Field(None, ge=0.0, le=2.0)
    top_p: FiniteFloat | None = Field(None, gt=0.0, le=1.0)
    presence_penalty: FiniteFloat | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: FiniteFloat | None = Field(None, ge=-2.0, le=2.0)
    logit_bias: Annotated[dict[str, FiniteFloat], Field(max_length=MAX_TOKEN_ID_LIST)] | None = None
    seed: int | None = None
    stop: str | Annotated[list[str], Field(max_length=MAX_STOP_STRINGS)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: ShortStr | None = None
    # vLLM extensions
    top_k: int | None = None
    min_p: FiniteFloat | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: FiniteFloat | None = Field(None, gt=0.0)
    min_tokens: int = Field(0, ge=0)
    ignore_eos: bool = False
    stop_token_ids: Annotated[list[StrictInt], Field(max_length=MAX_TOKEN_ID_LIST)] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, object] | None = None

    @model_validator(mode="after")
    def _top_logprobs_needs_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        return self

    @property
    def max_output_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens else self.max_tokens


class CompletionRequest(SamplingRequest):
    prompt: str | Annotated[list[str], Field(max_length=MAX_PROMPTS)] | TokenIds | Annotated[
        list[TokenIds], Field(max_length=MAX_PROMPTS)]
    max_tokens: int | None = Field(None, ge=1)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1)

    @field_validator("prompt")
    @classmethod
    def _check_prompt(cls, prompt: str | list[str] | list[int] | list[list[int]]
                      ) -> str | list[str] | list[int] | list[list[int]]:
        if isinstance(prompt, list) and not prompt:
            raise ValueError("prompt must not be empty")
        if isinstance(prompt, list) and any(p == [] for p in prompt):
            raise ValueError("prompt must not contain empty token lists")
        return prompt

    @property
    def prompts(self) -> list[str] | list[list[int]]:
        """The prompt as a list of prompts: strings or token-id lists."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if all(isinstance(item, int) for item in prompt):
            return [[int(item) for item in prompt]]  # type: ignore[arg-type]
        if all(isinstance(item, str) for item in prompt):
            return [str(item) for item in prompt]
        return [list(cast(list[int], item)) for item in prompt]


class TokenizeRequest(RequestBody):
    model: ShortStr | None = None
    prompt: str | None = None
    messages: Annotated[list[ChatMessage], Field(max_length=MAX_MESSAGES)] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, object] | None = None

    @model_validator(mode="after")
    def _exactly_one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt or messages")
        return self


class DetokenizeRequest(RequestBody):
    model: ShortStr | None = None
    tokens: list[StrictInt]


# ---------------------------------------------------------------- responses


class UsageDetails(BaseModel):
    cached_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: UsageDetails | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None
    refusal: list[ChatTokenLogprob] | None = None


class CompletionLogprobs(BaseModel):
    """Legacy format: parallel lists, one entry per token."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


FinishReason = Literal["stop", "length"]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None = None


def _now() -> int:
    return int(time.time())


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatChoice]
    usage: Usage


class DeltaMessage(BaseModel):
    """A stream delta carries only what changed: OpenAI sends `{}` with the finish reason."""

    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer(mode="wrap")
    def _drop_unset(self, handler: SerializerFunctionWrapHandler) -> dict[str, object]:
        return {key: value for key, value in handler(self).items() if value is not None}


class ChatChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class CompletionChunk(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "pagedserve"
    root: str | None = None
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeResponse(BaseModel):
    tokens: list[int]
    count: int
    max_model_len: int


class DetokenizeResponse(BaseModel):
    prompt: str


class VersionResponse(BaseModel):
    version: str


class HealthResponse(BaseModel):
    status: Literal["ok"] = "ok"


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail

