"""Acceptance (field fuzzing beyond the schema): hypothesis builds raw JSON bodies for chat and
completions in which every field ranges over its whole JSON domain (huge and negative integers,
1e308 and overflowing literals, NaN, empty and huge strings and lists, every Unicode class with
lone surrogates and non-characters, wrong types at any depth), about half of them valid with odd
parameters so generation really runs. A greedy witness request runs beside them all the while.
Over 2,000 bodies: only 2xx, or 4xx with the OpenAI envelope (a stream's error is one envelope
event, then [DONE]); replies are strict JSON (no NaN); a non-finite number in a numeric field is
refused; the witness's text never changes; /health stays 200; every KV block is free at the end."""

from __future__ import annotations

import collections
import copy
import dataclasses
import json
import math
import re
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.integration.conftest import MODEL_NAME, RunningServer, serve
from tests.tiny_models import VOCAB_SIZE

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
NUM_BODIES = 2000
MAX_MODEL_LEN = 64  # short context: every generation the fuzzer starts ends quickly
ENVELOPE_FIELDS = {"message", "type", "param", "code"}
WITNESS = {"model": MODEL_NAME, "prompt": [30, 41, 52, 63, 74, 85], "max_tokens": 16,
           "temperature": 0.0, "ignore_eos": True}
MIN_WITNESS_REPLIES = 5


# ---------------------------------------------------------------- the JSON domain

# A literal (1e999, a 5000-digit integer: no Python number json.dumps would write) travels in
# the drawn value as this marker string and is spliced into the JSON text unquoted.
LITERAL_MARK = "\x00literal:{}\x00"
_QUOTED_MARK = re.compile(r'"\\u0000literal:(\d+)\\u0000"')
RAW_LITERALS = ("1e999", "-1e999", "1E400", "1e-400", "-0", "-0.0", "NaN", "Infinity",
                "-Infinity", "1" + "0" * 5000, "-" + "9" * 5000, "1.0", "2.0e0", "1.5e308",
                "0.00000000000000000000000000000000001", "123456789012345678901234567890.5",
                "18446744073709551616.0", "9223372036854775808", "-9223372036854775809")


def encode(value: object, ensure_ascii: bool = True) -> str:
    """JSON text with NaN/Infinity as JS literals and the literal markers spliced in."""
    text = json.dumps(value, allow_nan=True, ensure_ascii=ensure_ascii)
    return _QUOTED_MARK.sub(lambda match: RAW_LITERALS[int(match[1])], text)


def _weighted(*options: tuple[int, st.SearchStrategy[object]]) -> st.SearchStrategy[object]:
    return st.one_of(*(strategy for weight, strategy in options for _ in range(weight)))


EDGE_INTS = (0, 1, -1, 2, 16, 17, 20, 21, VOCAB_SIZE - 1, VOCAB_SIZE, MAX_MODEL_LEN,
             2**31 - 1, 2**31, 2**32, 2**53 + 1, 2**63 - 1, 2**63, 2**64 - 1, 2**64, 2**64 + 1,
             -2**63, -2**63 - 1, -2**64, 10**30, -10**30, 10**4000)
EDGE_FLOATS = (0.0, -0.0, 5e-324, 1e-300, 1e-8, 0.1, 0.5, 1.0, 1.0000001, 1.5, 2.0,
               2.0000000001, 100.0, 100.00001, 1e308, 1.7976931348623157e308, -1e308,
               float("nan"), float("inf"), float("-inf"))
# every Unicode category: lone surrogates (Cs), non-characters and unassigned (Cn), controls
TEXT = st.text(st.characters(codec=None, exclude_categories=()), max_size=12)
EDGE_STRINGS = ("", " ", "\x00", "\ud800", "\udfff", "a\ud800b", "\udc00\ud800",
                "\ud800\udc00", "\uffff", "\ufffe", "\ufdd0", "\U0010ffff", "\U0001fffe",
                "<|im_end|>", "<|im_start|>", "<|endoftext|>", "{{ 7 * 7 }}", "\r\n", "\u2028",
                "\x85", "data: [DONE]\n\n", MODEL_NAME, "text", "user", "assistant", "function")
HUGE: tuple[object, ...] = (
    "x" * 100_000, "\U0001f642" * 5000, "\ud800" * 5000, [0] * 100_000, ["a"] * 10_000,
    [[1]] * 10_000, [{}] * 1000, {f"k{i}": i for i in range(10_000)})

SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(), st.sampled_from(EDGE_INTS),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from(EDGE_FLOATS),
    TEXT, st.sampled_from(EDGE_STRINGS),
    st.integers(0, len(RAW_LITERALS) - 1).map(LITERAL_MARK.format),
)
# any JSON value: scalars, nested wrong types, now and then a huge string or container
JSON_ANY = _weighted(
    (12, st.recursive(SCALARS, lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.one_of(TEXT, st.sampled_from(("type", "text", "role", "content"))),
                        children, max_size=4)), max_leaves=8)),
    (1, st.sampled_from(HUGE)))


# ---------------------------------------------------------------- the fields


@dataclass(frozen=True, slots=True)
class Field:
    """A request field: values the schema accepts (odd ones included), and values just past
    its bounds; a mutation replaces it with one of those or with any JSON value."""

    valid: st.SearchStrategy[object]
    edges: tuple[object, ...] = ()

    def anything(self) -> st.SearchStrategy[object]:
        return st.one_of(JSON_ANY, st.sampled_from(self.edges)) if self.edges else JSON_ANY


def _floats(low: float, high: float, exclude_min: bool = False) -> st.SearchStrategy[object]:
    return st.floats(low, high, exclude_min=exclude_min)


SHORT_TEXT = _weighted((3, TEXT), (1, st.sampled_from(EDGE_STRINGS)))
TOKEN_ID = _weighted((24, st.integers(0, VOCAB_SIZE - 1)),
                     (1, st.sampled_from((VOCAB_SIZE, -1, 2**31, 2**63, 2**64))))
TOKEN_IDS = st.lists(TOKEN_ID, min_size=1, max_size=12)
SEEDS = st.one_of(st.integers(-2**70, 2**70), st.integers(0, 2**32),
                  st.sampled_from((0, -1, 2**63 - 1, 2**63, 2**63 + 1, 2**64 - 1, 2**64,
                                   2**64 + 1, -2**63, -2**63 - 1, -2**64, 2**128)))
BOOL = Field(st.booleans(), (0, 1, "true", None))
MAX_TOKENS = Field(st.integers(1, 8), (0, -1, MAX_MODEL_LEN, MAX_MODEL_LEN + 1, 2**31, 2**63,
                                       2**64, 1.0, 1.5))

SMALL_SCHEMA = st.sampled_from((
    {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9}},
     "required": ["a"], "additionalProperties": False},
    {"type": "string", "maxLength": 3}, {"enum": ["x", "y"]}, {"type": "boolean"},
    {"type": "frobnicate"}, {"type": "object", "properties": 5}, {"anyOf": []}))
TOOL = st.fixed_dictionaries(
    {"type": st.just("function"),
     "function": st.fixed_dictionaries({"name": st.sampled_from(("f", "g", "get_weather"))},
                                       optional={"description": SHORT_TEXT,
                                                 "parameters": SMALL_SCHEMA})})
TOOL_CHOICE = st.one_of(st.sampled_from(("none", "auto", "required")),
                        st.sampled_from(("f", "g", "zzz")).map(
                            lambda name: {"type": "function", "function": {"name": name}}))

SAMPLING_FIELDS: dict[str, Field] = {
    "model": Field(st.just(MODEL_NAME), ("gpt-4o", "", "../../etc/passwd", "\ud800")),
    "n": Field(_weighted((4, st.integers(1, 4)), (1, st.integers(5, 16))),
               (0, 17, -1, 2**63, 2**64, 1.0, 16.5)),
    "temperature": Field(_weighted((2, st.just(0.0)), (2, _floats(0.0, 2.0)),
                                   (1, st.sampled_from((5e-324, 1e-300, 1e-8, 2.0)))),
                         (-5e-324, 2.0000000001, 1e308, float("inf"), float("nan"))),
    "top_p": Field(st.one_of(_floats(0.0, 1.0, exclude_min=True),
                             st.sampled_from((5e-324, 1e-300, 1.0))),
                   (0.0, -0.0, 1.0000001, float("nan"))),
    "presence_penalty": Field(_floats(-2.0, 2.0), (-2.0000001, 2.0000001, float("-inf"))),
    "frequency_penalty": Field(_floats(-2.0, 2.0), (-2.0000001, 2.0000001, float("inf"))),
    "logit_bias": Field(st.dictionaries(TOKEN_ID.map(str), _floats(-100.0, 100.0), max_size=5),
                        ({"1": 100.0001}, {"0": 1e308}, {"x": 1}, {"-1": 1}, {"1.5": 1},
                         {str(2**64): 1}, {"1": float("nan")})),
    "seed": Field(SEEDS),
    "stop": Field(st.one_of(SHORT_TEXT, st.lists(SHORT_TEXT, max_size=4)), ([""] * 17, [None])),
    "stream": BOOL,
    "stream_options": Field(st.fixed_dictionaries({"include_usage": st.booleans()},
                                                  optional={"continuous_usage_stats":
                                                            st.booleans()}),
                            ({"include_usage": None}, {}, {"continuous_usage_stats": 1})),
    "user": Field(SHORT_TEXT),
    "top_k": Field(st.integers(-1, VOCAB_SIZE + 8), (-2, 2**63, 2**64, -2**63)),
    "min_p": Field(st.one_of(_floats(0.0, 1.0), st.sampled_from((1.0, 5e-324))),
                   (-5e-324, 1.0000001)),
    "repetition_penalty": Field(st.one_of(_floats(0.0, 10.0, exclude_min=True),
                                          st.sampled_from((5e-324, 1e-300, 1e300, 1e308))),
                                (0.0, -1.0, float("inf"), float("nan"))),
    "min_tokens": Field(st.integers(0, 8), (-1, 2**63, MAX_MODEL_LEN + 1)),
    "ignore_eos": BOOL,
    "stop_token_ids": Field(st.lists(TOKEN_ID, max_size=4), ([1.0], ["1"], [2**64])),
    "skip_special_tokens": BOOL,
    "include_stop_str_in_output": BOOL,
    "spaces_between_special_tokens": BOOL,
    "truncate_prompt_tokens": Field(st.one_of(st.integers(1, 64), st.just(-1)),
                                    (0, -2, 2**63, "8")),
    "prompt_logprobs": Field(st.integers(0, 3), (21, -1, 2**63, True)),
    "allowed_token_ids": Field(st.lists(TOKEN_ID, min_size=1, max_size=8),
                               ([], [VOCAB_SIZE], [-1], ["1"], [2**64], [1.0])),
    "bad_words": Field(st.lists(SHORT_TEXT, max_size=3),
                       ([""], [" "], ["\ud800"], ["x" * 2000], ["a"] * 300, [None])),
    "return_tokens_as_token_ids": BOOL,
    "return_token_ids": BOOL,
    "request_id": Field(st.from_regex(r"[A-Za-z0-9._:-]{1,24}", fullmatch=True),
                        ("", "a b", "\ud800", "x" * 300, 7)),
    "cache_salt": Field(SHORT_TEXT, ("", "\ud800", "x" * 300)),
    "add_special_tokens": BOOL,
    "priority": Field(st.just(0), (1, -1, 2**63)),  # refused unless 0
    # constraints: valid ones make the tiny model's rows constrained; broken ones are a 400
    "guided_json": Field(SMALL_SCHEMA, ("{", [1], {"type": 5})),
    "guided_regex": Field(st.one_of(st.sampled_from(("a+", "[0-9]{1,3}", "x|yz")), SHORT_TEXT),
                          ("(a", "[", "\ud800")),
    "guided_choice": Field(st.lists(SHORT_TEXT, min_size=1, max_size=3), ([], [""], [1])),
    "guided_grammar": Field(st.sampled_from(('root ::= "a" | "bc"', 'start: "x"+')),
                            ("start: missing", "root ::= (", "")),
    "structured_outputs": Field(st.one_of(
        st.fixed_dictionaries({"choice": st.lists(SHORT_TEXT, min_size=1, max_size=3)}),
        st.fixed_dictionaries({"json": SMALL_SCHEMA}), st.just({"json_object": True})),
        ({}, {"regex": "a", "choice": ["b"]}, {"json": "{"})),
    "response_format": Field(st.one_of(
        st.sampled_from(({"type": "text"}, {"type": "json_object"})),
        SMALL_SCHEMA.map(lambda schema: {"type": "json_schema",
                                         "json_schema": {"name": "s", "schema": schema}})),
        ({"type": "xml"}, {"type": "json_schema"}, {"type": "json_schema", "json_schema": {
            "name": "s", "schema": 5}})),
    # a field no schema knows: ignored, whatever its value (mutations add more, any name)
    "frobnicate": Field(JSON_ANY),
}

CONTENT_PART = st.fixed_dictionaries(
    {"type": _weighted((6, st.just("text")),
                       (1, st.sampled_from(("image_url", "input_audio", "", "TEXT"))))},
    optional={"text": SHORT_TEXT})
TOOL_CALL = st.fixed_dictionaries(
    {"id": SHORT_TEXT, "type": st.just("function"),
     "function": st.fixed_dictionaries({"name": SHORT_TEXT, "arguments": SHORT_TEXT})})
MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(("system", "developer", "user", "assistant", "tool")),
     "content": st.one_of(SHORT_TEXT, st.lists(CONTENT_PART, min_size=1, max_size=3))},
    optional={"name": SHORT_TEXT, "tool_call_id": SHORT_TEXT,
              "tool_calls": st.lists(TOOL_CALL, max_size=2)})
ASSISTANT_WITHOUT_CONTENT = st.fixed_dictionaries(
    {"role": st.just("assistant"), "content": st.none()},
    optional={"tool_calls": st.lists(TOOL_CALL, max_size=2)})
TEMPLATE_KWARGS = st.dictionaries(
    st.one_of(SHORT_TEXT, st.sampled_from(("messages", "conversation", "tools", "documents",
                                           "tokenize", "add_generation_prompt",
                                           "continue_final_message", "enable_thinking",
                                           "bos_token", "eos_token", "raise_exception"))),
    JSON_ANY, max_size=3)

CHAT_FIELDS: dict[str, Field] = {
    **SAMPLING_FIELDS,
    "messages": Field(st.lists(_weighted((6, MESSAGE), (1, ASSISTANT_WITHOUT_CONTENT)),
                               min_size=1, max_size=3),
                      ([], [{}], [{"role": "user"}], [{"role": "wizard", "content": "x"}],
                       [{"role": "user", "content": [{"type": "image_url"}]}])),
    "max_tokens": MAX_TOKENS,
    "max_completion_tokens": MAX_TOKENS,
    "logprobs": BOOL,
    "top_logprobs": Field(st.integers(0, 20), (21, -1, 2**63)),
    "add_generation_prompt": BOOL,
    "chat_template_kwargs": Field(TEMPLATE_KWARGS),
    "continue_final_message": BOOL,
    "echo": BOOL,
    "documents": Field(st.lists(st.dictionaries(SHORT_TEXT, SHORT_TEXT, max_size=2),
                                max_size=2), ([None], [{"a": 1}])),
    # this server does not trust request templates: always a 400 naming the field
    "chat_template": Field(st.just("{{ messages }}"), ("{% for %}", "", "\ud800")),
    "metadata": Field(st.dictionaries(SHORT_TEXT, SHORT_TEXT, max_size=2)),
    "store": BOOL,
    "tools": Field(st.lists(TOOL, max_size=2),
                   ([{}], [{"type": "function"}], [{"type": "function",
                                                    "function": {"name": "a b"}}])),
    "tool_choice": Field(TOOL_CHOICE, ("bogus", {"type": "function"})),
    "parallel_tool_calls": BOOL,
}
PROMPT = st.one_of(SHORT_TEXT, st.lists(SHORT_TEXT, min_size=1, max_size=4), TOKEN_IDS,
                   st.lists(TOKEN_IDS, min_size=1, max_size=4))
COMPLETION_FIELDS: dict[str, Field] = {
    **SAMPLING_FIELDS,
    "prompt": Field(PROMPT, ([], [[]], [[1], "a"], [1, "a"], [0] * 100_000, [[0]] * 1000,
                             ["a"] * 1000, [[1.0]], [True])),
    "max_tokens": MAX_TOKENS,
    "echo": BOOL,
    "logprobs": Field(st.integers(0, 20), (21, -1, True, 2**63)),
    "suffix": Field(st.sampled_from(("", None)), ("b", "\ud800")),
    "best_of": Field(st.none(), (0, 1, 2, 16, 17, 2**63)),  # only best_of == n is served
}
REQUIRED = {CHAT: ("messages", "max_tokens"), COMPLETIONS: ("prompt", "max_tokens")}


@st.composite
def _valid_body(draw: st.DrawFn, fields: Mapping[str, Field], required: tuple[str, ...]
                ) -> dict[str, object]:
    """The required fields (max_tokens among them, so generation stays a few tokens long)
    and up to eight others: few enough that a fair share of bodies is valid throughout."""
    optional = sorted(set(fields) - set(required))
    names = draw(st.lists(st.sampled_from(optional), max_size=8, unique=True))
    return {name: draw(fields[name].valid) for name in (*required, *names)}


VALID_BODIES = {path: _valid_body(fields, REQUIRED[path])
                for path, fields in ((CHAT, CHAT_FIELDS), (COMPLETIONS, COMPLETION_FIELDS))}


def _slots(value: object) -> list[tuple[object, object]]:
    """Every (container, key) in a body: the places a mutation may hit, at any depth."""
    found: list[tuple[object, object]] = []
    children: Iterator[tuple[object, object]] = iter(())
    if isinstance(value, dict) and len(value) <= 16:  # not into the huge ones
        children = iter(list(value.items()))
    elif isinstance(value, list) and len(value) <= 16:
        children = enumerate(value)
    for key, child in children:
        found.append((value, key))
        found.extend(_slots(child))
    return found


@st.composite
def _mutated(draw: st.DrawFn, body: dict[str, object], fields: Mapping[str, Field]) -> object:
    """Replace, delete or add a value somewhere in `body`: a field past its bounds, a wrong
    type deep in a message."""
    body = copy.deepcopy(body)  # drawn values may be the strategies' shared constants
    # the slots of the copy only: a value put in may be shared and is never descended into
    slots = [(body, name) for name in fields] + _slots(body)
    for _ in range(draw(st.integers(1, 3))):
        container, key = draw(st.sampled_from(slots))
        action = draw(st.sampled_from(("replace", "replace", "replace", "delete", "add")))
        if action == "replace" and container is body and key in fields:
            body[str(key)] = draw(fields[str(key)].anything())
        elif action == "replace" and isinstance(container, list) and isinstance(key, int):
            container[key] = draw(JSON_ANY)
        elif action == "replace" and isinstance(container, dict):
            container[str(key)] = draw(JSON_ANY)
        elif action == "delete" and isinstance(container, dict):
            container.pop(key, None)
        elif action == "add" and isinstance(container, dict):
            container[draw(TEXT)] = draw(JSON_ANY)
    return body


@dataclass(frozen=True, slots=True)
class Body:
    path: str
    value: object
    ensure_ascii: bool  # False: raw UTF-8, and lone surrogates as invalid bytes

    def content(self) -> bytes:
        return encode(self.value, self.ensure_ascii).encode("utf-8", "surrogatepass")


@st.composite
def bodies(draw: st.DrawFn) -> Body:
    """Half valid bodies, a third of them mutated in one to three places, the rest wild."""
    path = draw(st.sampled_from((CHAT, COMPLETIONS)))
    fields = CHAT_FIELDS if path == CHAT else COMPLETION_FIELDS
    mode = draw(st.sampled_from(("valid",) * 6 + ("mutated",) * 4 + ("wild",) * 2))
    value: object = draw(VALID_BODIES[path])
    if mode == "mutated":
        value = draw(_mutated(value, fields))  # type: ignore[arg-type]
    elif mode == "wild":
        value = draw(st.one_of(
            st.dictionaries(st.one_of(st.sampled_from(tuple(fields)), TEXT), JSON_ANY,
                            max_size=8),
            JSON_ANY))
    return Body(path, value, draw(st.sampled_from((True,) * 9 + (False,))))


# ---------------------------------------------------------------- checks

# fields whose every value is a number or holds numbers: NaN, ±Infinity or an overflowing
# literal anywhere in them must be refused (unknown fields are ignored, whatever they hold)
NUMERIC_FIELDS = {
    CHAT: frozenset({"n", "temperature", "top_p", "presence_penalty", "frequency_penalty",
                     "logit_bias", "seed", "top_k", "min_p", "repetition_penalty",
                     "min_tokens", "stop_token_ids", "max_tokens", "max_completion_tokens",
                     "top_logprobs"}),
    COMPLETIONS: frozenset({"n", "temperature", "top_p", "presence_penalty",
                            "frequency_penalty", "logit_bias", "seed", "top_k", "min_p",
                            "repetition_penalty", "min_tokens", "stop_token_ids", "max_tokens",
                            "prompt", "logprobs", "best_of"}),
}
_NON_FINITE_MARKS = frozenset(  # 1e999, NaN...; a 5000-digit integer is a (big) integer
    LITERAL_MARK.format(index) for index, text in enumerate(RAW_LITERALS)
    if not math.isfinite(float(text)) and not text.lstrip("-").isdigit())


def _is_non_finite(value: object) -> bool:
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, str):
        return value in _NON_FINITE_MARKS
    if isinstance(value, dict):
        return any(_is_non_finite(item) for item in value.values())
    if isinstance(value, list) and len(value) <= 16:  # the huge ones hold none
        return any(_is_non_finite(item) for item in value)
    return False


def must_be_refused(body: Body) -> str | None:
    """The numeric field holding a non-finite number, if any: the body is not valid."""
    if not isinstance(body.value, dict):
        return None
    for name in sorted(NUMERIC_FIELDS[body.path] & set(body.value)):
        if _is_non_finite(body.value[name]):
            return name
    return None


def _no_constant(name: str) -> object:
    raise AssertionError(f"{name} in a reply: not JSON (RFC 8259), clients cannot parse it")


def strict_json(text: str | bytes) -> object:
    return json.loads(text, parse_constant=_no_constant)


def check_envelope(payload: object, where: str) -> dict[str, object]:
    assert isinstance(payload, dict) and set(payload) == {"error"}, \
        f"{where} without the OpenAI envelope: {payload!r:.500}"
    error = payload["error"]
    assert isinstance(error, dict) and set(error) == ENVELOPE_FIELDS, \
        f"{where} envelope fields: {payload!r:.500}"
    assert isinstance(error["message"], str) and error["message"], f"{where}: {payload!r:.500}"
    return error


def check_events(events: list[str]) -> str:
    """An SSE reply: JSON chunks, at most one error event right before, and then, [DONE]."""
    assert events and events[-1] == "[DONE]" and events.count("[DONE]") == 1, \
        f"stream not ended by one [DONE]: {events[-3:]!r:.500}"
    for position, event in enumerate(events[:-1]):
        payload = strict_json(event)
        if isinstance(payload, dict) and "error" in payload:
            error = check_envelope(payload, "stream error event")
            assert position == len(events) - 2, f"events after an error: {events[-3:]!r:.500}"
            assert error["type"] != "server_error", f"a 5xx inside the stream: {payload}"
            return "stream-error"
        assert isinstance(payload, dict) and "choices" in payload, f"bad chunk: {event:.500}"
    return "stream"


def send(http: httpx.Client, body: Body) -> str:
    """Post one body, read the reply to its end, check it; the outcome's name, for the tally."""
    headers = {"Content-Type": "application/json"}
    refused_for = must_be_refused(body)
    with http.stream("POST", body.path, content=body.content(), headers=headers) as response:
        status = response.status_code
        if response.headers.get("content-type", "").startswith("text/event-stream"):
            assert status == 200 and refused_for is None, f"{status}, {refused_for} accepted"
            events = [line.removeprefix("data:").strip() for line in response.iter_lines()
                      if line.startswith("data:")]
            return check_events(events)
        raw = response.read()
    assert 200 <= status < 300 or 400 <= status < 500, f"{status}: {raw[:1000]!r}"
    payload = strict_json(raw)
    if status >= 400:
        error = check_envelope(payload, str(status))
        return f"{status} {error['param']}"
    assert refused_for is None, f"a non-finite {refused_for} accepted: {raw[:300]!r}"
    assert isinstance(payload, dict) and payload.get("choices"), f"{status}: {raw[:1000]!r}"
    return str(status)


# ---------------------------------------------------------------- the witness


@dataclass(slots=True)
class Witness:
    """One greedy request, over and over on its own connection, beside the fuzzing; /health
    polled between. `current` is the body being fuzzed, to name it when a reply goes wrong."""

    server: RunningServer
    reference: str
    texts: list[str] = dataclasses.field(default_factory=list)
    problems: list[str] = dataclasses.field(default_factory=list)
    num_busy: int = 0
    current: Body | None = None
    _stop: threading.Event = dataclasses.field(default_factory=threading.Event)

    def run(self) -> None:
        with httpx.Client(base_url=self.server.base_url, headers=self.server.headers,
                          timeout=60) as http:
            while not self._stop.is_set():
                self._once(http)

    def _once(self, http: httpx.Client) -> None:
        beside = f"beside {self.current!r:.600}"
        try:
            health = http.get("/health")
            if health.status_code != 200:
                self.problems.append(f"/health {health.status_code} {beside}")
            response = http.post(COMPLETIONS, json=WITNESS)
            text = response.json()["choices"][0]["text"] if response.status_code == 200 else ""
        except Exception as exc:  # a reset connection, a reply that is not the usual JSON
            self.problems.append(f"witness {exc!r} {beside}")
            time.sleep(0.1)
            return
        if response.status_code == 429:  # a fan-out filled the queue: busy, not wrong
            self.num_busy += 1
            time.sleep(0.05)
        elif response.status_code != 200:
            self.problems.append(f"witness {response.status_code} {response.text[:300]} {beside}")
        else:
            self.texts.append(text)
            if text != self.reference:
                self.problems.append(f"witness text {text!r} != {self.reference!r} {beside}")

    def stop(self) -> None:
        self._stop.set()


@pytest.fixture(scope="module")
def fuzz_server(tiny_llama_dir: Path) -> Iterator[RunningServer]:
    with serve(tiny_llama_dir, num_blocks=64, max_num_seqs=8, max_model_len=MAX_MODEL_LEN,
               max_queue_len=64) as running:
        yield running


@given(body=bodies())
@settings(max_examples=NUM_BODIES, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
def fuzz(http: httpx.Client, witness: Witness, tally: collections.Counter[str],
         failed: list[Body], body: Body) -> None:
    witness.current = body
    try:
        tally[send(http, body)] += 1
    except BaseException as exc:
        failed.append(body)  # the first one, before shrinking, is what broke a dead server
        if isinstance(exc, AssertionError):  # name the bytes sent, ready for curl
            raise AssertionError(f"{exc}\nPOST {body.path} {body.content()[:2000]!r}") from None
        raise


@pytest.mark.slow  # about 80 s on two cores
def test_fuzzed_fields_never_hurt_the_server(fuzz_server: RunningServer) -> None:
    http = httpx.Client(base_url=fuzz_server.base_url, headers=fuzz_server.headers, timeout=60)
    solo = http.post(COMPLETIONS, json=WITNESS)
    assert solo.status_code == 200, solo.text
    witness = Witness(fuzz_server, solo.json()["choices"][0]["text"])
    thread = threading.Thread(target=witness.run, name="witness", daemon=True)
    tally: collections.Counter[str] = collections.Counter()
    failed: list[Body] = []
    thread.start()
    try:
        fuzz(http, witness, tally, failed)
    finally:
        witness.stop()
        thread.join(timeout=60)
        print(f"outcomes: {tally.most_common()}\nwitness: {len(witness.texts)} replies, "
              f"{witness.num_busy} busy; problems: {witness.problems[:5]}")
        if failed:
            print(f"first failing body, before shrinking: {failed[0]!r:.2000}")
    assert not witness.problems, "\n".join(witness.problems[:10])
    assert len(witness.texts) >= MIN_WITNESS_REPLIES
    assert sum(tally.values()) >= NUM_BODIES
    assert tally["200"] + tally["stream"] >= NUM_BODIES // 10  # a fair share really generated
    fuzz_server.wait_idle(timeout_s=10.0)
    assert http.get("/health").status_code == 200
