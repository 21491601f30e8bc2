"""server/reasoning.py: qwen3 and deepseek_r1 splits of whole outputs, and streamed pieces that
join to the same split however the output is cut, tags included."""

from __future__ import annotations

from itertools import pairwise

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from server.reasoning import (
    REASONING_PARSERS,
    DeepSeekR1ReasoningParser,
    Qwen3ReasoningParser,
    ReasoningParser,
    ReasoningSplit,
)

QWEN3 = Qwen3ReasoningParser()
R1 = DeepSeekR1ReasoningParser()


def stream(parser: ReasoningParser, pieces: list[str]) -> ReasoningSplit:
    """Feeds `pieces` one by one and joins what the streamer emitted."""
    streamer = parser.streamer()
    outs = [streamer.feed(piece) for piece in pieces] + [streamer.finish()]
    reasoning = "".join(out.reasoning or "" for out in outs)
    content = "".join(out.content or "" for out in outs)
    return ReasoningSplit(reasoning or None, content or None)


def cut(text: str, points: list[int]) -> list[str]:
    bounds = [0, *sorted(set(points)), len(text)]
    return [text[a:b] for a, b in pairwise(bounds)]


def test_registry() -> None:
    assert set(REASONING_PARSERS) == {"qwen3", "deepseek_r1"}
    assert REASONING_PARSERS["qwen3"] is Qwen3ReasoningParser


@pytest.mark.parametrize(("text", "reasoning", "content"), [
    ("<think>\nLet me think.\n</think>\n\nThe answer is 4.", "Let me think.", "The answer is 4."),
    ("The answer is 4.", None, "The answer is 4."),
    ("<think>\nstill thinking", "still thinking", None),
    ("<think>\n\n</think>\n\nHi", None, "Hi"),  # Qwen3's empty think with thinking off
    ("<think>a</think>", "a", None),
    ("Sure: <think>x</think> done", "x", "Sure: done"),
    ("", None, None),
    ("a </think> b", None, "a </think> b"),  # no <think>: all content
])
def test_qwen3_split(text: str, reasoning: str | None, content: str | None) -> None:
    assert QWEN3.split(text) == ReasoningSplit(reasoning, content)


@pytest.mark.parametrize(("text", "reasoning", "content"), [
    ("Let me think.\n</think>\n\nThe answer is 4.", "Let me think.", "The answer is 4."),
    ("<think>\nLet me think.\n</think>\n\n4", "Let me think.", "4"),
    ("  <think>x</think>y", "x", "y"),
    ("no end tag at all", "no end tag at all", None),
    ("</think>answer", None, "answer"),
    ("<thi", "<thi", None),
    ("", None, None),
])
def test_deepseek_r1_split(text: str, reasoning: str | None, content: str | None) -> None:
    assert R1.split(text) == ReasoningSplit(reasoning, content)


@pytest.mark.parametrize("parser", [QWEN3, R1])
def test_tags_never_in_fields(parser: ReasoningParser) -> None:
    split = parser.split("<think>\nplan\n</think>\n\nanswer")
    assert split == ReasoningSplit("plan", "answer")
    assert stream(parser, list("<think>\nplan\n</think>\n\nanswer")) == split


def test_streamer_emits_early_and_holds_only_a_tag_start() -> None:
    streamer = QWEN3.streamer()
    assert streamer.feed("<thi") == ReasoningSplit(None, None)
    assert streamer.feed("nk>\nStep one") == ReasoningSplit("Step one", None)
    # "</th" might be the end tag: held; the newline before it might end the reasoning: held
    assert streamer.feed(".\n</th") == ReasoningSplit(".", None)
    assert streamer.feed("ink>\n\nAns") == ReasoningSplit(None, "Ans")
    assert streamer.feed("wer") == ReasoningSplit(None, "wer")
    assert streamer.finish() == ReasoningSplit(None, None)


def test_streamer_flushes_a_held_partial_tag_at_finish() -> None:
    streamer = QWEN3.streamer()
    assert streamer.feed("a <thin") == ReasoningSplit(None, "a ")
    assert streamer.finish() == ReasoningSplit(None, "<thin")


SAMPLES = [
    "<think>\nLet me think about 2+2.\nIt is 4.\n</think>\n\nThe answer is **4**.",
    "<think>\n</think>\n\nNo thinking here.",
    "Just an answer, with a < and a </ and <th in it.",
    "<think>\nunfinished thoughts about </thin tags",
    "  <think>r</think>c",
    "reasoning first\n</think>\n\nthen content with <think> in it",
    "<think>\n日本語の思考 🙂\n</think>\n\n中文回答",
    "pre <think> mid </think> post </think> tail",
    "",
    "\n\n",
]

PIECES = ["<think>", "</think>", "<", "</", "<th", "</thi", ">", "\n", " ", "a", "é", "🙂", "think"]


@settings(max_examples=300, deadline=None)
@given(text=st.one_of(st.sampled_from(SAMPLES), st.lists(st.sampled_from(PIECES)).map("".join)),
       points=st.lists(st.integers(min_value=0, max_value=200), max_size=12),
       name=st.sampled_from(sorted(REASONING_PARSERS)))
def test_streamed_split_matches_whole_split(text: str, points: list[int], name: str) -> None:
    parser = REASONING_PARSERS[name]()
    points = [p for p in points if p <= len(text)]
    assert stream(parser, cut(text, points)) == parser.split(text)


@pytest.mark.parametrize("name", sorted(REASONING_PARSERS))
@pytest.mark.parametrize("text", SAMPLES)
def test_one_character_at_a_time(name: str, text: str) -> None:
    parser = REASONING_PARSERS[name]()
    assert stream(parser, list(text)) == parser.split(text)
