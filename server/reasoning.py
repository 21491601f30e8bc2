"""Reasoning parsers: a model's <think>…</think> split from its answer, whole or streamed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from server.text_stream import StrippedText, partial_suffix

THINK_START = "<think>"
THINK_END = "</think>"


@dataclass(frozen=True, slots=True)
class ReasoningSplit:
    reasoning: str | None
    content: str | None


class _LeftStripped:
    """Text with its leading whitespace dropped (the blank lines a model writes after </think>)."""

    def __init__(self) -> None:
        self._has_text = False

    def push(self, text: str) -> str:
        if not self._has_text:
            text = text.lstrip()
            self._has_text = bool(text)
        return text


def _none_if_empty(text: str) -> str | None:
    return text or None


class ReasoningStreamer:
    """Splits output fed piece by piece; holds back only what could be the start of a tag.

    States: "before" (content until <think>, or for a prompt-opened think only an optional
    leading <think>), "reasoning" (until </think>), "after" (content to the end).
    """

    def __init__(self, starts_in_reasoning: bool) -> None:
        self._starts_in_reasoning = starts_in_reasoning
        self._state = "before"
        self._buf = ""
        self._reasoning = StrippedText()
        self._content = _LeftStripped()
        self._out_reasoning: list[str] = []
        self._out_content: list[str] = []

    def feed(self, text: str) -> ReasoningSplit:
        self._buf += text
        self._run(is_final=False)
        return self._take()

    def finish(self) -> ReasoningSplit:
        self._run(is_final=True)
        return self._take()

    def _take(self) -> ReasoningSplit:
        split = ReasoningSplit(_none_if_empty("".join(self._out_reasoning)),
                               _none_if_empty("".join(self._out_content)))
        self._out_reasoning, self._out_content = [], []
        return split

    def _run(self, is_final: bool) -> None:
        while self._buf:
            if self._state == "before":
                step = self._before_prompt_opened if self._starts_in_reasoning else self._before
            else:
                step = self._in_reasoning if self._state == "reasoning" else self._after
            if not step(is_final):
                return

    def _before(self, is_final: bool) -> bool:
        # content until the first <think>
        head, found = self._until(THINK_START, is_final)
        self._emit_content(head)
        if found:
            self._state = "reasoning"
        return found

    def _before_prompt_opened(self, is_final: bool) -> bool:
        # the template opened <think>: the model may repeat it, after whitespace at most
        rest = self._buf.lstrip()
        if not rest:
            return False
        if rest.startswith(THINK_START):
            self._buf = rest[len(THINK_START):]
        elif THINK_START.startswith(rest) and not is_final:
            return False
        self._state = "reasoning"
        return True

    def _in_reasoning(self, is_final: bool) -> bool:
        head, found = self._until(THINK_END, is_final)
        self._emit_reasoning(head)
        if found:
            self._state = "after"
        return found

    def _after(self, is_final: bool) -> bool:
        self._emit_content(self._buf)
        self._buf = ""
        return False

    def _until(self, tag: str, is_final: bool) -> tuple[str, bool]:
        """Takes _buf up to `tag` (dropping the tag) if present; else all of it but what could
        be the tag's start. Returns (text taken, whether the tag was found)."""
        found = self._buf.find(tag)
        if found >= 0:
            head, self._buf = self._buf[:found], self._buf[found + len(tag):]
            return head, True
        keep = 0 if is_final else partial_suffix(self._buf, tag)
        cut = len(self._buf) - keep
        head, self._buf = self._buf[:cut], self._buf[cut:]
        return head, False

    def _emit_reasoning(self, text: str) -> None:
        out = self._reasoning.push(text)
        if out:
            self._out_reasoning.append(out)

    def _emit_content(self, text: str) -> None:
        # content before <think> is kept as written; after </think>, its leading blank lines go
        out = self._content.push(text) if self._state == "after" else text
        if out:
            self._out_content.append(out)


class ReasoningParser:
    """A format of thinking: where reasoning starts and ends in the output."""

    name: ClassVar[str]
    starts_in_reasoning: ClassVar[bool]  # the chat template opened <think> in the prompt

    def split(self, text: str) -> ReasoningSplit:
        if self.starts_in_reasoning:
            body = text.lstrip()
            before = ""
            rest = body[len(THINK_START):] if body.startswith(THINK_START) else text
        else:
            before, tag, rest = text.partition(THINK_START)
            if not tag:
                return ReasoningSplit(None, _none_if_empty(text))
        reasoning, tag, after = rest.partition(THINK_END)
        return ReasoningSplit(_none_if_empty(reasoning.strip()),
                              _none_if_empty(before + after.lstrip()))

    def streamer(self) -> ReasoningStreamer:
        return ReasoningStreamer(self.starts_in_reasoning)


class Qwen3ReasoningParser(ReasoningParser):
    """Qwen3: reasoning only inside <think>…</think> written by the model; an unfinished
    <think> makes the rest reasoning; no <think> at all is an answer without thinking."""

    name = "qwen3"
    starts_in_reasoning = False


class DeepSeekR1ReasoningParser(ReasoningParser):
    """DeepSeek-R1 and its distills: the template opened <think>, so the output is reasoning
    (an optional leading <think> dropped) until </think>; without </think> all of it is."""

    name = "deepseek_r1"
    starts_in_reasoning = True


REASONING_PARSERS: dict[str, type[ReasoningParser]] = {
    parser.name: parser for parser in (Qwen3ReasoningParser, DeepSeekR1ReasoningParser)
}
