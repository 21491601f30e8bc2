"""A choice's output text → the assistant message's parts: reasoning (--reasoning-parser),
content and tool calls (the tool plan's parser), whole or as a stream of deltas."""

from __future__ import annotations

from dataclasses import dataclass, field

from server.protocol import DeltaFunctionCall, DeltaToolCall, FunctionCall, ToolCall
from server.reasoning import ReasoningParser, ReasoningStreamer
from server.tool_parsers import ToolCall as ParsedCall
from server.tool_parsers import (
    ToolCallDelta,
    ToolCallStreamer,
    ToolParser,
    bare_json_calls,
    could_be_bare_json_call,
    new_call_id,
)


@dataclass(frozen=True, slots=True)
class MessageParts:
    content: str | None
    reasoning: str | None
    tool_calls: list[ToolCall]


@dataclass(frozen=True, slots=True)
class OutputParsers:
    """What to read out of a chat answer's text. `parallel` False keeps only the first call.
    `bare_call_names`: with tool_choice "auto", an answer that is nothing but JSON calls of
    these tools, without the format's markers, counts as calls too."""

    reasoning: ReasoningParser | None = None
    tools: ToolParser | None = None
    include_reasoning: bool = True
    parallel: bool = True
    bare_call_names: frozenset[str] = frozenset()

    @property
    def is_active(self) -> bool:
        return self.reasoning is not None or self.tools is not None

    def parse(self, text: str) -> MessageParts:
        reasoning, content = None, text
        if self.reasoning is not None:
            split = self.reasoning.split(text)
            reasoning, content = split.reasoning, split.content or ""
        calls: list[ToolCall] = []
        if self.tools is not None:
            extracted = self.tools.extract(content)
            content = extracted.content or ""
            found = extracted.calls
            bare = None if found else self.bare_calls(content)
            if bare:
                found, content = bare, ""
            calls = [ToolCall(id=new_call_id(), function=FunctionCall(
                name=call.name, arguments=call.arguments)) for call in found]
            if not self.parallel:
                calls = calls[:1]
        # OpenAI: a message that only calls tools has null content
        return MessageParts(content if content or not calls else None,
                            reasoning if self.include_reasoning else None, calls)

    def streamer(self) -> MessageStreamer:
        return MessageStreamer(self)

    def bare_calls(self, content: str) -> list[ParsedCall] | None:
        if not self.bare_call_names:
            return None
        return bare_json_calls(content, self.bare_call_names)


@dataclass(frozen=True, slots=True)
class DeltaParts:
    content: str = ""
    reasoning: str = ""
    tool_calls: list[DeltaToolCall] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not (self.content or self.reasoning or self.tool_calls)


class MessageStreamer:
    """One choice's stream: text deltas in, message deltas out. Reasoning is split off first;
    the content that remains goes through the tool-call streamer."""

    def __init__(self, parsers: OutputParsers) -> None:
        self._parsers = parsers
        self._reasoning: ReasoningStreamer | None = (
            parsers.reasoning.streamer() if parsers.reasoning is not None else None)
        self._tools: ToolCallStreamer | None = (
            parsers.tools.streamer() if parsers.tools is not None else None)
        self.num_calls = 0  # calls whose first delta went out
        # content held back while it may still be bare JSON calls (OutputParsers.bare_calls)
        self._maybe_bare = bool(parsers.bare_call_names)
        self._held = ""

    def feed(self, text: str) -> DeltaParts:
        if self._reasoning is None:
            return self._content(text, False)
        split = self._reasoning.feed(text)
        return self._merge(split.reasoning or "", self._content(split.content or "", False))

    def finish(self) -> DeltaParts:
        if self._reasoning is None:
            return self._content("", True)
        split = self._reasoning.finish()
        return self._merge(split.reasoning or "", self._content(split.content or "", True))

    def _merge(self, reasoning: str, parts: DeltaParts) -> DeltaParts:
        if not self._parsers.include_reasoning:
            reasoning = ""
        return DeltaParts(parts.content, reasoning, parts.tool_calls)

    def _content(self, text: str, final: bool) -> DeltaParts:
        if self._tools is None:
            return DeltaParts(content=text)
        pieces = [self._tools.feed(text)] if text else []
        if final:
            pieces.append(self._tools.finish())
        calls = [call for piece in pieces for call in piece.tool_calls]
        content = "".join(p.content for p in pieces)
        if self._maybe_bare:
            content, calls = self._hold_bare(content, calls, final)
        return DeltaParts(content, "", self._tool_deltas(calls))

    def _hold_bare(self, content: str, calls: list[ToolCallDelta], final: bool
                   ) -> tuple[str, list[ToolCallDelta]]:
        """Hold content back while it may be bare JSON calls; at the end, calls or content."""
        self._held += content
        if calls or not could_be_bare_json_call(self._held):
            self._maybe_bare = False
            return self._held, calls
        if not final:
            return "", calls
        self._maybe_bare = False
        found = self._parsers.bare_calls(self._held)
        if not found:
            return self._held, calls
        return "", [ToolCallDelta(index, call.name, call.arguments)
                    for index, call in enumerate(found)]

    def _tool_deltas(self, calls: list[ToolCallDelta]) -> list[DeltaToolCall]:
        deltas = []
        for call in calls:
            if not self._parsers.parallel and call.index > 0:
                continue  # parallel_tool_calls false: the first call only
            if call.name is not None:
                self.num_calls += 1
                deltas.append(DeltaToolCall(
                    index=call.index, id=new_call_id(), type="function",
                    function=DeltaFunctionCall(name=call.name, arguments=call.arguments)))
            elif call.arguments:
                deltas.append(DeltaToolCall(index=call.index,
                                            function=DeltaFunctionCall(arguments=call.arguments)))
        return deltas
