"""A choice's output text → the assistant message's parts: reasoning (--reasoning-parser),
content and tool calls (the tool plan's parser), whole or as a stream of deltas."""

from __future__ import annotations

from dataclasses import dataclass, field

from server.protocol import DeltaFunctionCall, DeltaToolCall, FunctionCall, ToolCall
from server.reasoning import ReasoningParser, ReasoningStreamer
from server.tool_parsers import ToolCallDelta, ToolCallStreamer, ToolParser, new_call_id


@dataclass(frozen=True, slots=True)
class MessageParts:
    content: str | None
    reasoning: str | None
    tool_calls: list[ToolCall]


@dataclass(frozen=True, slots=True)
class OutputParsers:
    """What to read out of a chat answer's text. `parallel` False keeps only the first call."""

    reasoning: ReasoningParser | None = None
    tools: ToolParser | None = None
    include_reasoning: bool = True
    parallel: bool = True

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
            calls = [ToolCall(id=new_call_id(), function=FunctionCall(
                name=call.name, arguments=call.arguments)) for call in extracted.calls]
            if not self.parallel:
                calls = calls[:1]
        # OpenAI: a message that only calls tools has null content
        return MessageParts(content if content or not calls else None,
                            reasoning if self.include_reasoning else None, calls)

    def streamer(self) -> MessageStreamer:
        return MessageStreamer(self)


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
        return DeltaParts("".join(p.content for p in pieces), "", self._tool_deltas(calls))

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
