"""Pydantic models of the OpenAI requests, responses and stream chunks that pagedserve speaks."""

from __future__ import annotations

import logging
import time
from typing import Annotated, ClassVar, Literal, cast

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

from server.fields import CHAT, COMPLETIONS, check_fields

logger = logging.getLogger(__name__)

MAX_TOP_LOGPROBS = 20  # OpenAI's cap on top_logprobs
# sizes of lists and short strings; long texts are bounded by the body limit and the context
MAX_MESSAGES = 4096
MAX_PROMPTS = 1024  # prompts in one /v1/completions request
MAX_NAME_CHARS = 256  # model, user, message names
MAX_STOP_STRINGS = 16
MAX_TOKEN_ID_LIST = 1024  # stop_token_ids, logit_bias entries
MAX_ALLOWED_TOKEN_IDS = 262_144  # allowed_token_ids: up to a whole large vocabulary
MAX_BAD_WORDS = 256
MAX_CHAT_TEMPLATE_CHARS = 131_072  # the largest shipped templates are ~20k characters
MAX_DOCUMENTS = 256
MAX_TOOLS = 256

TokenIds = list[StrictInt]
# JSON allows 1e999 and Python's json module NaN/Infinity; no sampling field means either
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]
ShortStr = Annotated[str, Field(max_length=MAX_NAME_CHARS)]
AllowedTokenIds = Annotated[list[StrictInt], Field(min_length=1, max_length=MAX_ALLOWED_TOKEN_IDS)]


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
    """Requests ignore unknown fields (clients send extras) but log their names at debug.
    Strict: "10" is not an integer and 1 is not a bool, as in OpenAI's API."""

    model_config = ConfigDict(extra="ignore", strict=True)

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


# ---------------------------------------------------------------- structured outputs and tools

JsonSchema = dict[str, object]
FunctionName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.:-]{1,64}$")]


class JsonSchemaFormat(OpenAIBaseModel):
    name: Annotated[str, Field(min_length=1, max_length=MAX_NAME_CHARS)]
    description: str | None = None
    # "schema" would shadow a BaseModel attribute; the JSON key is still "schema"
    schema_: JsonSchema | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(OpenAIBaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError('response_format of type "json_schema" needs json_schema')
        return self


class StructuredOutputsRequest(OpenAIBaseModel):
    """vLLM's `structured_outputs`: exactly one constraint."""

    json_: JsonSchema | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: Annotated[list[str], Field(min_length=1)] | None = None
    grammar: str | None = None
    json_object: bool | None = None


class FunctionDefinition(OpenAIBaseModel):
    name: FunctionName
    description: str | None = None
    parameters: JsonSchema | None = None
    strict: bool | None = None


class Tool(OpenAIBaseModel):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionNameRef(OpenAIBaseModel):
    name: Annotated[str, Field(min_length=1, max_length=MAX_NAME_CHARS)]


class NamedToolChoice(OpenAIBaseModel):
    type: Literal["function"]
    function: FunctionNameRef


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice
FunctionCallChoice = Literal["none", "auto"] | FunctionNameRef  # legacy function_call


class StreamOptions(OpenAIBaseModel):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM: usage on every chunk (with include_usage)


class SamplingRequest(RequestBody):
    """Fields shared by chat and legacy completions: OpenAI's plus vLLM's extensions. Ranges
    the engine checks again (SamplingParams.validate) are stated here too, for the schema.
    server/fields.py lists every field of both APIs; refused ones are checked there, on the
    raw body, and are not fields here (in their neutral value they mean nothing)."""

    endpoint: ClassVar[str]

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
    spaces_between_special_tokens: bool = False
    include_stop_str_in_output: bool = False
    truncate_prompt_tokens: int | None = Field(None, ge=-1)
    prompt_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    allowed_token_ids: AllowedTokenIds | None = None
    bad_words: Annotated[list[str], Field(max_length=MAX_BAD_WORDS)] | None = None
    echo: bool = False
    return_tokens_as_token_ids: bool = False
    return_token_ids: bool = False
    cache_salt: Annotated[str, Field(min_length=1, max_length=MAX_NAME_CHARS)] | None = None
    request_id: Annotated[str, Field(min_length=1, max_length=MAX_NAME_CHARS,
                                     pattern=r"^[A-Za-z0-9._:-]+$")] | None = None
    # structured outputs (server/structured.py): at most one of these per request
    response_format: ResponseFormat | None = None
    guided_json: JsonSchema | str | None = None
    guided_regex: str | None = None
    guided_choice: Annotated[list[str], Field(min_length=1)] | None = None
    guided_grammar: str | None = None
    structured_outputs: StructuredOutputsRequest | None = None
    guided_decoding_backend: ShortStr | None = None  # one backend here: no effect

    @model_validator(mode="before")
    @classmethod
    def _check_fields(cls, data: object) -> object:
        """Refused fields asking for something are a 400 naming them; unknown ones a warning."""
        if isinstance(data, dict):
            unknown = check_fields(cls.endpoint, data)
            if unknown:
                logger.warning("%s request: ignoring fields unknown to the OpenAI and vLLM "
                               "APIs: %s", cls.endpoint, ", ".join(sorted(unknown)[:20]))
        return data

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    @property
    def continuous_usage(self) -> bool:
        return self.include_usage and bool(self.stream_options
                                           and self.stream_options.continuous_usage_stats)


class ChatCompletionRequest(SamplingRequest):
    endpoint: ClassVar[str] = CHAT

    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False
    chat_template: Annotated[str, Field(min_length=1,
                                        max_length=MAX_CHAT_TEMPLATE_CHARS)] | None = None
    chat_template_kwargs: dict[str, object] | None = None
    documents: Annotated[list[dict[str, str]], Field(max_length=MAX_DOCUMENTS)] | None = None
    # accepted, no effect on the answer (server/fields.py)
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    prediction: dict[str, object] | None = None
    include_reasoning: bool = True
    tools: Annotated[list[Tool], Field(max_length=MAX_TOOLS)] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    functions: Annotated[list[FunctionDefinition], Field(max_length=MAX_TOOLS)] | None = None
    function_call: FunctionCallChoice | None = None

    @model_validator(mode="after")
    def _top_logprobs_needs_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        return self

    @property
    def wants_generation_prompt(self) -> bool:
        """add_generation_prompt, which continue_final_message turns off unless it was set."""
        if self.continue_final_message and "add_generation_prompt" not in self.model_fields_set:
            return False
        return self.add_generation_prompt

    @property
    def max_output_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens else self.max_tokens


class CompletionRequest(SamplingRequest):
    endpoint: ClassVar[str] = COMPLETIONS

    prompt: str | Annotated[list[str], Field(max_length=MAX_PROMPTS)] | TokenIds | Annotated[
        list[TokenIds], Field(max_length=MAX_PROMPTS)]
    max_tokens: int = Field(16, ge=1)  # OpenAI's default, not the rest of the context
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    best_of: int | None = Field(None, ge=1)
    add_special_tokens: bool = True

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
    continue_final_message: bool = False
    chat_template: Annotated[str, Field(min_length=1,
                                        max_length=MAX_CHAT_TEMPLATE_CHARS)] | None = None
    chat_template_kwargs: dict[str, object] | None = None
    tools: Annotated[list[Tool], Field(max_length=MAX_TOOLS)] | None = None  # with messages

    @model_validator(mode="after")
    def _exactly_one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt or messages")
        return self


class DetokenizeRequest(RequestBody):
    model: ShortStr | None = None
    tokens: list[StrictInt]


# ---------------------------------------------------------------- responses


class OmitsUnsetExtras(BaseModel):
    """Extension fields (vLLM's prompt_logprobs, token ids) appear only when asked for; OpenAI's
    own null fields (content, logprobs, finish_reason) are always sent, as OpenAI does."""

    _extras: ClassVar[frozenset[str]] = frozenset({"prompt_logprobs", "prompt_token_ids",
                                                   "token_ids"})

    @model_serializer(mode="wrap")
    def _drop_unset_extras(self, handler: SerializerFunctionWrapHandler) -> dict[str, object]:
        return {key: value for key, value in handler(self).items()
                if value is not None or key not in self._extras}


class PromptLogprob(BaseModel):
    """vLLM's prompt logprob entry, keyed by the token id (as a string) in its position's dict."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


# one entry per prompt token; the first is null (nothing precedes it)
PromptLogprobs = list[dict[str, PromptLogprob] | None]


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


FinishReason = Literal["stop", "length", "tool_calls"]


class FunctionCall(BaseModel):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    tool_calls: list[ToolCall] = Field(default_factory=list)
    reasoning_content: str | None = None  # vLLM: with --reasoning-parser

    @model_serializer(mode="wrap")
    def _drop_unset(self, handler: SerializerFunctionWrapHandler) -> dict[str, object]:
        # reasoning_content only from a reasoning parser, as vLLM sends it
        data = handler(self)
        if data.get("reasoning_content") is None:
            data.pop("reasoning_content", None)
        return data


class ChatChoice(OmitsUnsetExtras):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None = None
    token_ids: list[int] | None = None  # return_token_ids


def _now() -> int:
    return int(time.time())


class ChatCompletionResponse(OmitsUnsetExtras):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatChoice]
    usage: Usage
    prompt_logprobs: PromptLogprobs | None = None
    prompt_token_ids: list[int] | None = None


class DeltaFunctionCall(BaseModel):
    name: str | None = None
    arguments: str | None = None

    @model_serializer(mode="wrap")
    def _drop_unset(self, handler: SerializerFunctionWrapHandler) -> dict[str, object]:
        return {key: value for key, value in handler(self).items() if value is not None}


class DeltaToolCall(BaseModel):
    """A piece of a streamed call: index, id, type and name first, then argument fragments."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall

    @model_serializer(mode="wrap")
    def _drop_unset(self, handler: SerializerFunctionWrapHandler) -> dict[str, object]:
        return {key: value for key, value in handler(self).items() if value is not None}


class DeltaMessage(BaseModel):
    """A stream delta carries only what changed: OpenAI sends `{}` with the finish reason."""

    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None

    @model_serializer(mode="wrap")
    def _drop_unset(self, handler: SerializerFunctionWrapHandler) -> dict[str, object]:
        return {key: value for key, value in handler(self).items() if value is not None}


class ChatChunkChoice(OmitsUnsetExtras):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None = None
    token_ids: list[int] | None = None


class ChatCompletionChunk(OmitsUnsetExtras):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    prompt_token_ids: list[int] | None = None  # return_token_ids: on the first chunks


class CompletionChoice(OmitsUnsetExtras):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None = None
    prompt_logprobs: PromptLogprobs | None = None
    prompt_token_ids: list[int] | None = None
    token_ids: list[int] | None = None


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

