"""Calls that small models write as bare JSON, without their format's markers."""

from __future__ import annotations

import json
import re
from collections.abc import Collection

from server.tool_parsers.types import ARGS_KEYS, JSON_ERRORS, WHITESPACE, ToolCall

_FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.DOTALL)


def bare_json_calls(text: str, names: Collection[str]) -> list[ToolCall] | None:
    """A whole answer that is nothing but calls written as JSON, without the format's markers
    (small models do this: `{"name": "f", "arguments": {...}}`, one per line or in a list,
    possibly in a ```json fence), when every name is one of the request's tools; else None."""
    body = text.strip()
    fenced = _FENCE.match(body)
    if fenced:
        body = fenced.group(1)
    items = _json_documents(body)
    if not items:
        return None
    calls = []
    for item in items:
        if not isinstance(item, dict) or item.get("name") not in names:
            return None
        arguments: object = next((item[key] for key in ARGS_KEYS if key in item), {})
        if not isinstance(arguments, dict):
            return None
        calls.append(ToolCall(str(item["name"]), json.dumps(arguments, ensure_ascii=False)))
    return calls


def _json_documents(text: str) -> list[object] | None:
    """The values of one or more JSON documents separated by whitespace (a model writing one
    call per line), lists flattened; None unless the whole text is such documents."""
    decoder, items, position = json.JSONDecoder(), [], 0
    while position < len(text):
        if text[position] not in "{[":
            return None
        try:
            value, position = decoder.raw_decode(text, position)
        except JSON_ERRORS:
            return None
        items.extend(value if isinstance(value, list) and value else [value])
        while position < len(text) and text[position] in WHITESPACE:
            position += 1
    return items or None


def could_be_bare_json_call(text: str) -> bool:
    """Whether streamed content so far may still turn out to be bare JSON calls: a json fence
    or nothing yet, then `{"name"` or `[{"name"` as far as it has come (so "[1] First, ..."
    or a JSON answer of other keys streams at once)."""
    head = text.lstrip()
    if head.startswith("```"):
        info, newline, rest = head[3:].partition("\n")
        if not newline:
            return True
        if info.strip() not in ("", "json"):
            return False  # ```python is code, not a call
        head = rest.lstrip()
    elif "```".startswith(head):
        return True
    return _could_open_a_call(head)


def _could_open_a_call(head: str) -> bool:
    """`head` is a prefix of `{"name"` or `[{"name"` (whitespace allowed between), or goes on
    past one."""
    compact = "".join(head[:64].split())  # the opening is short; whitespace may separate it
    opening = '[{"name"' if compact.startswith("[") else '{"name"'
    size = min(len(compact), len(opening))
    return compact[:size] == opening[:size]
