"""The plain data of tool calls: functions, calls, stream deltas, and how a format lays them out."""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class FunctionSpec:
    """One tool from the request's `tools` (type "function")."""

    name: str
    description: str | None
    parameters: dict[str, object]  # a JSON schema, already validated by the caller


@dataclass(frozen=True, slots=True)
class ToolCall:
    name: str
    arguments: str  # JSON text, exactly as the stream sent it


@dataclass(frozen=True, slots=True)
class ExtractedCalls:
    content: str | None  # text outside the calls; None when nothing but whitespace
    calls: list[ToolCall]  # empty: the model answered in text


@dataclass(frozen=True, slots=True)
class ToolCallDelta:
    """One piece of a streamed call, as OpenAI's delta.tool_calls[i]."""

    index: int
    name: str | None  # set in the first delta of a call only
    arguments: str


@dataclass(frozen=True, slots=True)
class StreamDelta:
    content: str
    tool_calls: list[ToolCallDelta]


@dataclass(frozen=True, slots=True)
class CallSyntax:
    """How a format lays out its calls, enough to find them in text.

    A block starts at `marker` (searched anywhere) or, when `is_anchored`, only at the start
    of the output (after whitespace and one of `prefixes`). Inside a block: `list_open`, call
    objects separated by `separator` ("" = whitespace only), then `list_close`.
    """

    marker: str
    is_anchored: bool
    prefixes: tuple[str, ...]
    list_open: str
    separator: str
    list_close: str


@dataclass(frozen=True, slots=True)
class GrammarShape:
    """How a format writes forced calls: prefix call (joiner call)* suffix, each call wrapped."""

    prefix: str
    call_open: str
    args_key: str
    call_close: str
    joiner: str
    suffix: str


WHITESPACE = " \t\r\n"
STRING_STOP = re.compile(r'["\\]')
ARGS_KEYS = ("arguments", "parameters")
# json.loads raises RecursionError on deeply nested input: invalid like any other bad JSON
JSON_ERRORS = (ValueError, RecursionError)
