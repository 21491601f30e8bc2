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
    """Whether streamed content so far may still turn out to be bare JSON calls."""
    head = text.lstrip()
    if len(head) < 3:
        return not head or head[0] in "{[" or "```".startswith(head)
    if head.startswith("```"):
        info, newline, _ = head[3:].partition("\n")
        return not newline or info.strip() in ("", "json")  # ```python is code, not a call
    return head.startswith(("{", "["))
