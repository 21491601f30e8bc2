"""server/message_parsing.py: a chat answer's text → content, reasoning and tool calls; the
stream of deltas adds up to the whole-text parse, bare JSON calls included."""

from __future__ import annotations

import json

import pytest

from server.message_parsing import DeltaParts, OutputParsers
from server.reasoning import REASONING_PARSERS
from server.tool_parsers import PARSERS

NAMES = frozenset({"get_weather"})
HERMES_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
BARE_CALL = '{"name": "get_weather", "arguments": {"city": "Paris"}}'


def streamed(parsers: OutputParsers, text: str, size: int) -> tuple[str, str, dict[int, list[str]]]:
    """(content, reasoning, per call index [name, arguments]) from `text` fed `size` chars at a
    time."""
    streamer = parsers.streamer()
    parts: list[DeltaParts] = [streamer.feed(text[i:i + size]) for i in range(0, len(text), size)]
    parts.append(streamer.finish())
    calls: dict[int, list[str]] = {}
    for part in parts:
        for delta in part.tool_calls:
            entry = calls.setdefault(delta.index, ["", ""])
            entry[0] += delta.function.name or ""
            entry[1] += delta.function.arguments or ""
    return ("".join(p.content for p in parts), "".join(p.reasoning for p in parts), calls)


AUTO = OutputParsers(tools=PARSERS["hermes"](), bare_call_names=NAMES)


@pytest.mark.parametrize("text, content, calls", [
    (HERMES_CALL, None, [("get_weather", '{"city": "Paris"}')]),
    (BARE_CALL, None, [("get_weather", '{"city": "Paris"}')]),
    (f"```json\n{BARE_CALL}\n```", None, [("get_weather", '{"city": "Paris"}')]),
    ('{"name": "other", "arguments": {}}', '{"name": "other", "arguments": {}}', []),
    ("It is sunny.", "It is sunny.", []),
])
@pytest.mark.parametrize("size", [1, 3, 1000])
def test_stream_adds_up_to_the_whole_parse(text: str, content: str | None,
                                           calls: list[tuple[str, str]], size: int) -> None:
    whole = AUTO.parse(text)
    assert whole.content == content
    assert [(c.function.name, c.function.arguments) for c in whole.tool_calls] == calls
    streamed_content, _, streamed_calls = streamed(AUTO, text, size)
    assert streamed_content == (content or "")
    assert [tuple(streamed_calls[i]) for i in sorted(streamed_calls)] == calls
    for name, arguments in calls:
        assert name in NAMES and json.loads(arguments) == {"city": "Paris"}


def test_plain_text_streams_without_waiting_for_the_end() -> None:
    streamer = AUTO.streamer()
    assert streamer.feed("The weather").content == "The weather"


def test_bare_calls_only_in_auto_mode() -> None:
    forced = OutputParsers(tools=PARSERS["hermes"]())
    assert forced.parse(BARE_CALL).tool_calls == []
    assert forced.parse(BARE_CALL).content == BARE_CALL


def test_reasoning_then_a_call() -> None:
    parsers = OutputParsers(reasoning=REASONING_PARSERS["qwen3"](), tools=PARSERS["hermes"](),
                            bare_call_names=NAMES)
    text = f"<think>need the weather</think>\n{HERMES_CALL}"
    parts = parsers.parse(text)
    assert parts.reasoning == "need the weather" and parts.content is None
    assert [c.function.name for c in parts.tool_calls] == ["get_weather"]
    content, reasoning, calls = streamed(parsers, text, 2)
    assert (content, reasoning) == ("", "need the weather") and calls[0][0] == "get_weather"
    hidden = OutputParsers(reasoning=REASONING_PARSERS["qwen3"](), include_reasoning=False)
    assert hidden.parse(text).reasoning is None
    assert streamed(hidden, text, 5)[1] == ""


def test_not_parallel_keeps_the_first_call() -> None:
    parsers = OutputParsers(tools=PARSERS["hermes"](), parallel=False)
    text = HERMES_CALL + "\n" + HERMES_CALL.replace("Paris", "Rome")
    assert len(parsers.parse(text).tool_calls) == 1
    assert sorted(streamed(parsers, text, 4)[2]) == [0]
