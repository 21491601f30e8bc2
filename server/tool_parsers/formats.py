"""The tool-call formats (hermes, llama3_json, mistral, json_array): parsing, and the Lark
grammars that force a call in each format's own syntax."""

from __future__ import annotations

import json
import secrets
import string
from abc import ABC
from collections.abc import Mapping, Sequence
from typing import ClassVar

from engine import JSON_FORMAT
from server.tool_parsers.streamer import ToolCallStreamer
from server.tool_parsers.types import (
    CallSyntax,
    ExtractedCalls,
    FunctionSpec,
    GrammarShape,
    ToolCall,
)


class ToolParser(ABC):
    """One tool-call format: its syntax for parsing and its shape for forced grammars."""

    name: ClassVar[str]
    syntax: ClassVar[CallSyntax]
    shape: ClassVar[GrammarShape]
    markers: ClassVar[tuple[str, ...]] = ()  # texts a tokenizer may have as tokens of their own
    # the format's marker is a special token, so the text must keep special tokens
    keeps_special_tokens: ClassVar[bool] = False

    def extract(self, text: str) -> ExtractedCalls:
        streamer = ToolCallStreamer(self.syntax, is_eager=False)
        pieces = [streamer.feed(text), streamer.finish()]
        # not eager: each call comes whole, in one delta with its name
        calls = [ToolCall(d.name or "", d.arguments) for p in pieces for d in p.tool_calls]
        content = "".join(p.content for p in pieces)
        return ExtractedCalls(content or None, calls)

    def streamer(self) -> ToolCallStreamer:
        return ToolCallStreamer(self.syntax)

    def forced_grammar(self, tools: Sequence[FunctionSpec], parallel: bool,
                       marker_tokens: Mapping[str, int] | None = None) -> str:
        """A Lark grammar (llguidance dialect): the whole output is one call of `tools` in this
        format, or one or more when `parallel`, each call's arguments matching its schema.
        `marker_tokens` maps the format's markers that are single added tokens of the model's
        tokenizer (Qwen's <tool_call>) to their ids: the grammar names those tokens, since a
        grammar engine never spells an added token's text out of ordinary ones."""
        if not tools:
            raise ValueError("forced_grammar needs at least one tool")
        shape, markers = self.shape, dict(marker_tokens or {})
        joiner = _lark_text(shape.joiner, markers)
        calls = f"call ({joiner} call)*" if parallel else "call"
        if parallel and not shape.joiner.strip() and not shape.suffix:
            # a model that writes the joiner (a newline) after a call may still mean to stop
            calls += f" {joiner}?"
        start = [_lark_text(shape.prefix, markers), calls, _lark_text(shape.suffix, markers)]
        lines = ["start: " + " ".join(part for part in start if part),
                 "call: " + " | ".join(f"call_{i}" for i in range(len(tools)))]
        for i, tool in enumerate(tools):
            lines += self._call_rules(f"call_{i}", f"args_{i}", tool, markers)
        return "\n".join(lines) + "\n"

    def _call_rules(self, call: str, args: str, tool: FunctionSpec,
                    markers: Mapping[str, int]) -> list[str]:
        """One tool's call, written as the chat template writes it, with its name fixed."""
        shape = self.shape
        opening = f'{shape.call_open}{{"name": {_json_str(tool.name)}, "{shape.args_key}": '
        closing = "}" + shape.call_close
        return [f"{call}: {_lark_text(opening, markers)} {args} {_lark_text(closing, markers)}",
                f"{args}: %json {json.dumps(_arguments_schema(tool.parameters))}"]


def _json_str(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def _lark_str(text: str) -> str:
    # llguidance's Lark reads string literals with JSON escapes
    return _json_str(text)


def _lark_text(text: str, markers: Mapping[str, int]) -> str:
    """`text` as a sequence of Lark items: string literals, and `<[id]>` (one token) for
    each marker that is a token of its own."""
    if not text:
        return ""
    for marker, token_id in markers.items():
        before, found, after = text.partition(marker)
        if found:
            parts = [_lark_text(before, markers), f"<[{token_id}]>", _lark_text(after, markers)]
            return " ".join(part for part in parts if part)
    return _lark_str(text)


def _arguments_schema(parameters: dict[str, object]) -> dict[str, object]:
    """The tool's schema, made to accept objects only (what `extract` takes for arguments),
    with llguidance's whitespace options."""
    schema = dict(parameters)
    schema.setdefault("type", "object")
    schema["x-guidance"] = JSON_FORMAT  # the engine's JSON, inside a Lark grammar
    return schema


class HermesParser(ToolParser):
    """Qwen2.5, Qwen3, Hermes: <tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>."""

    name = "hermes"
    markers = ("<tool_call>", "</tool_call>")
    syntax = CallSyntax(marker="<tool_call>", is_anchored=False, prefixes=(), list_open="",
                        separator="", list_close="</tool_call>")
    # what Qwen's chat template writes for an assistant's calls, "\n" between them
    shape = GrammarShape(prefix="", call_open="<tool_call>\n", args_key="arguments",
                         call_close="\n</tool_call>", joiner="\n", suffix="")


class Llama3JsonParser(ToolParser):
    """Llama 3.1/3.2: the output is {"name": ..., "parameters": {...}}, several joined by "; "."""

    name = "llama3_json"
    syntax = CallSyntax(marker="", is_anchored=True, prefixes=("<|python_tag|>",), list_open="",
                        separator=";", list_close="")
    shape = GrammarShape(prefix="", call_open="", args_key="parameters", call_close="",
                         joiner="; ", suffix="")


class MistralParser(ToolParser):
    """Mistral: [TOOL_CALLS] then a JSON array of {"name": ..., "arguments": {...}}."""

    name = "mistral"
    markers = ("[TOOL_CALLS]",)
    keeps_special_tokens = True
    syntax = CallSyntax(marker="[TOOL_CALLS]", is_anchored=False, prefixes=(), list_open="[",
                        separator=",", list_close="]")
    # forced grammars name [TOOL_CALLS] by token id where the tokenizer has it as a token
    shape = GrammarShape(prefix="[TOOL_CALLS][", call_open="", args_key="arguments",
                         call_close="", joiner=", ", suffix="]")


class JsonArrayParser(ToolParser):
    """Fallback for templates with no known format, for forced calls only: the whole output
    is a JSON array of {"name": ..., "arguments": {...}}."""

    name = "json_array"
    syntax = CallSyntax(marker="", is_anchored=True, prefixes=(), list_open="[",
                        separator=",", list_close="]")
    shape = GrammarShape(prefix="[", call_open="", args_key="arguments", call_close="",
                         joiner=", ", suffix="]")


PARSERS: dict[str, type[ToolParser]] = {
    parser.name: parser
    for parser in (HermesParser, Llama3JsonParser, MistralParser, JsonArrayParser)
}

# template markers, most specific first
_TEMPLATE_MARKERS = (
    ("<tool_call>", "hermes"),
    ("[TOOL_CALLS]", "mistral"),
    ("<|python_tag|>", "llama3_json"),
    ("ipython", "llama3_json"),
)


def parser_for_template(chat_template: str | None) -> str | None:
    """The tool-call format a chat template writes, from its markers; None if none is known."""
    if not chat_template:
        return None
    for marker, name in _TEMPLATE_MARKERS:
        if marker in chat_template:
            return name
    return None


_ID_ALPHABET = string.ascii_letters + string.digits


def new_call_id() -> str:
    """An OpenAI-style tool call id: "call_" and 24 random alphanumerics."""
    return "call_" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(24))
