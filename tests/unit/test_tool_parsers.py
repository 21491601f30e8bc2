"""server/tool_parsers/: each format's calls found in whole outputs (lenient where models are
sloppy, never losing text), streamed pieces that join to the same calls and content however the
output is cut, and forced grammars that llguidance compiles, that accept exactly the format's
calls of the given tools, and whose random walks parse back into schema-valid calls."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from itertools import pairwise

import jsonschema
import llguidance
import llguidance.hf
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from server.tool_parsers import (
    PARSERS,
    ExtractedCalls,
    FunctionSpec,
    HermesParser,
    ToolCall,
    ToolCallDelta,
    ToolParser,
    bare_json_calls,
    could_be_bare_json_call,
    new_call_id,
    parser_for_template,
)
from tests.tiny_models import build_tokenizer

HERMES = PARSERS["hermes"]()
LLAMA = PARSERS["llama3_json"]()
MISTRAL = PARSERS["mistral"]()
JSON_ARRAY = PARSERS["json_array"]()


def stream(parser: ToolParser, pieces: list[str]) -> tuple[str, list[ToolCall],
                                                           list[ToolCallDelta]]:
    """Feeds `pieces` one by one; returns the joined content, the calls the deltas add up to,
    and the deltas themselves."""
    streamer = parser.streamer()
    outs = [streamer.feed(piece) for piece in pieces] + [streamer.finish()]
    deltas = [delta for out in outs for delta in out.tool_calls]
    names: dict[int, str] = {}
    arguments: dict[int, str] = {}
    for delta in deltas:
        if delta.name is not None:
            assert delta.index not in names, "a call's name is sent once"
            names[delta.index] = delta.name
        assert delta.index in names, "the name comes in the call's first delta"
        arguments[delta.index] = arguments.get(delta.index, "") + delta.arguments
    assert list(names) == list(range(len(names))), "calls are numbered 0, 1, ... in order"
    calls = [ToolCall(names[i], arguments[i]) for i in names]
    return "".join(out.content for out in outs), calls, deltas


def cut(text: str, points: list[int]) -> list[str]:
    bounds = [0, *sorted({p for p in points if p <= len(text)}), len(text)]
    return [text[a:b] for a, b in pairwise(bounds)]


# --- extract: each format, whole outputs ---


def test_registry_and_template_detection() -> None:
    assert set(PARSERS) == {"hermes", "llama3_json", "mistral", "json_array"}
    assert all(PARSERS[name].name == name for name in PARSERS)
    assert parser_for_template("{{ '<tool_call>\\n' }}{{ tool_call | tojson }}") == "hermes"
    assert parser_for_template("{{ '[TOOL_CALLS]' }}") == "mistral"
    assert parser_for_template("{{- '<|python_tag|>' }}") == "llama3_json"
    assert parser_for_template("{%- if message.role == 'ipython' %}") == "llama3_json"
    assert parser_for_template("{{ messages }}") is None
    assert parser_for_template(None) is None


def test_new_call_id() -> None:
    ids = {new_call_id() for _ in range(50)}
    assert len(ids) == 50
    for call_id in ids:
        assert call_id.startswith("call_") and len(call_id) == 29
        assert call_id[5:].isalnum() and call_id[5:].isascii()


@pytest.mark.parametrize(("text", "content", "calls"), [
    ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
     None, [("get_weather", '{"city": "Paris"}')]),
    ('Let me check.\n<tool_call>\n{"name": "a", "arguments": {}}\n</tool_call>\n'
     '<tool_call>\n{"name": "b", "arguments": {"x": [1, {"y": "}"}]}}\n</tool_call>',
     "Let me check.", [("a", "{}"), ("b", '{"x": [1, {"y": "}"}]}')]),
    # whitespace variations, no final </tool_call>
    ('<tool_call>{"name":"f","arguments":{"q":1}}', None, [("f", '{"q":1}')]),
    ('<tool_call>  \n {"name" : "f" ,\n "arguments" :\n {"q": 1} \n}  </tool_call>', None,
     [("f", '{"q": 1}')]),
    # "parameters" for "arguments"; arguments before name; arguments missing
    ('<tool_call>\n{"name": "f", "parameters": {"q": 1}}\n</tool_call>', None,
     [("f", '{"q": 1}')]),
    ('<tool_call>\n{"arguments": {"q": 1}, "name": "f"}\n</tool_call>', None,
     [("f", '{"q": 1}')]),
    ('<tool_call>\n{"name": "f"}\n</tool_call>', None, [("f", "{}")]),
    # arguments as a JSON string holding an object: the inner string
    ('<tool_call>\n{"name": "f", "arguments": " {\\"q\\": \\"}\\"} "}\n</tool_call>', None,
     [("f", '{"q": "}"}')]),
    # a closing tag inside a string value is data
    ('<tool_call>\n{"name": "f", "arguments": {"s": "</tool_call>\\"<tool_call>"}}\n</tool_call>',
     None, [("f", '{"s": "</tool_call>\\"<tool_call>"}')]),
    # text after the calls is content too; two objects in one block
    ('<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>\n\nDone.', "Done.", [("f", "{}")]),
    ('<tool_call>\n{"name": "f", "arguments": {}}\n{"name": "g", "arguments": {}}\n</tool_call>',
     None, [("f", "{}"), ("g", "{}")]),
    ('<tool_call>\n{"name": "天気", "arguments": {"都市": "東京 🙂"}}\n</tool_call>', None,
     [("天気", '{"都市": "東京 🙂"}')]),
])
def test_hermes_extract(text: str, content: str | None, calls: list[tuple[str, str]]) -> None:
    assert HERMES.extract(text) == ExtractedCalls(content, [ToolCall(*c) for c in calls])


@pytest.mark.parametrize("text", [
    "<tool_call>\nnot json at all\n</tool_call>",
    '<tool_call>\n{"arguments": {"q": 1}}\n</tool_call>',  # no name
    '<tool_call>\n{"name": "f", "arguments": {"q": 1}\n</tool_call>',  # unbalanced
    '<tool_call>\n{"name": "f" "arguments": {}}\n</tool_call>',  # not JSON
    '<tool_call>\n{"name": "f", "arguments": "not an object"}\n</tool_call>',
    '<tool_call>\n{"name": "f", "arguments": [1, 2]}\n</tool_call>',
    '<tool_call>\n{"name": 3, "arguments": {}}\n</tool_call>',
    '<tool_call>\n{"name": "", "arguments": {}}\n</tool_call>',
    '<tool_call>\n{"name": "f", "argu',  # cut off by max_tokens
    "I can use <tool_call> tags.",
    "<tool_call>",
    "<tool_",
])
def test_hermes_invalid_blocks_stay_content(text: str) -> None:
    assert HERMES.extract(text) == ExtractedCalls(text.strip(), [])


def test_deeply_nested_arguments_are_invalid_not_a_crash() -> None:
    deep = "[" * 100_000 + "]" * 100_000
    text = f'<tool_call>{{"name": "f", "arguments": {{"a": {deep}}}}}</tool_call>'
    assert HERMES.extract(text) == ExtractedCalls(text, [])
    assert LLAMA.extract(f'{{"name": "f", "parameters": "{deep}"}}').calls == []


def test_hermes_invalid_block_between_valid_ones() -> None:
    bad = '<tool_call>\n{"name": "f" oops}\n</tool_call>'
    text = f'<tool_call>{{"name": "a"}}</tool_call>\n{bad}\n<tool_call>{{"name": "b"}}</tool_call>'
    assert HERMES.extract(text) == ExtractedCalls(bad, [ToolCall("a", "{}"), ToolCall("b", "{}")])


@pytest.mark.parametrize(("text", "content", "calls"), [
    ('{"name": "f", "parameters": {"a": 1}}', None, [("f", '{"a": 1}')]),
    ('<|python_tag|>{"name": "f", "parameters": {"a": 1}}; {"name": "g", "parameters": {}}',
     None, [("f", '{"a": 1}'), ("g", "{}")]),
    ('  {"name": "f", "arguments": {"a": 1}}\n', None, [("f", '{"a": 1}')]),
    ('{"name": "f", "parameters": {}}\nThat is the call.', "That is the call.", [("f", "{}")]),
    ('{"name": "f", "parameters": {}}; and text', "; and text", [("f", "{}")]),
    ("The weather is sunny.", "The weather is sunny.", []),
    ('Here: {"name": "f", "parameters": {}}', 'Here: {"name": "f", "parameters": {}}', []),
    ('{"temperature": 21}', '{"temperature": 21}', []),
    ('{"name": "f", "parameters": {', '{"name": "f", "parameters": {', []),
    ("<|python_tag|>print(1)", "<|python_tag|>print(1)", []),
])
def test_llama3_json_extract(text: str, content: str | None,
                             calls: list[tuple[str, str]]) -> None:
    assert LLAMA.extract(text) == ExtractedCalls(content, [ToolCall(*c) for c in calls])


@pytest.mark.parametrize(("text", "content", "calls"), [
    ('[TOOL_CALLS] [{"name": "f", "arguments": {"a": 1}}]', None, [("f", '{"a": 1}')]),
    ('Sure.[TOOL_CALLS][{"name": "f", "arguments": {}},{"name": "g", "arguments": {"b": "]"}}]',
     "Sure.", [("f", "{}"), ("g", '{"b": "]"}')]),
    ('[TOOL_CALLS] [{"name": "f", "arguments": {}}', None, [("f", "{}")]),  # no closing ]
    ("[TOOL_CALLS] oops", "[TOOL_CALLS] oops", []),
    ('[TOOL_CALLS] [{"name": "f", "arguments": {}}, oops]', ", oops]", [("f", "{}")]),
    ("no calls [here]", "no calls [here]", []),
])
def test_mistral_extract(text: str, content: str | None, calls: list[tuple[str, str]]) -> None:
    assert MISTRAL.extract(text) == ExtractedCalls(content, [ToolCall(*c) for c in calls])


@pytest.mark.parametrize(("text", "content", "calls"), [
    ('[{"name": "f", "arguments": {"a": 1}}]', None, [("f", '{"a": 1}')]),
    ('[{"name": "f", "arguments": {}}, {"name": "g", "arguments": {}}]', None,
     [("f", "{}"), ("g", "{}")]),
    ('["f"]', '["f"]', []),
    ("plain answer", "plain answer", []),
])
def test_json_array_extract(text: str, content: str | None, calls: list[tuple[str, str]]) -> None:
    assert JSON_ARRAY.extract(text) == ExtractedCalls(content, [ToolCall(*c) for c in calls])


# --- streaming: what is sent when ---


def test_streamer_sends_content_early_and_holds_only_a_marker_start() -> None:
    streamer = HERMES.streamer()
    assert streamer.feed("Let me").content == "Let me"
    assert streamer.feed(" check. <tool").content == " check."  # " <tool" may be a marker
    out = streamer.feed('_call>\n{"name": "get_weather"')
    assert out.content == ""
    assert out.tool_calls == [ToolCallDelta(0, "get_weather", "")]  # the name, once complete
    out = streamer.feed(', "arguments": {"city": "Pa')
    assert out.tool_calls == [ToolCallDelta(0, None, '{"city": "Pa')]
    out = streamer.feed('ris"}')
    assert out.tool_calls == [ToolCallDelta(0, None, 'ris"}')]
    out = streamer.feed("}\n</tool_call>")  # the call's own closing: not arguments
    assert out == streamer.finish() == type(out)("", [])


def test_streamer_merges_a_calls_pieces_of_one_feed() -> None:
    text = '<tool_call>{"name": "f", "arguments": {"a": 1}}</tool_call>'
    assert HERMES.streamer().feed(text).tool_calls == [ToolCallDelta(0, "f", '{"a": 1}')]


def test_streamer_holds_arguments_written_before_the_name() -> None:
    streamer = HERMES.streamer()
    assert streamer.feed('<tool_call>{"arguments": {"a": 1}, ').tool_calls == []
    assert streamer.feed('"name": "f"').tool_calls == [ToolCallDelta(0, "f", '{"a": 1}')]


def test_streamer_sends_string_arguments_decoded_when_complete() -> None:
    streamer = HERMES.streamer()
    assert streamer.feed('<tool_call>{"name": "f", "arguments": "{\\"a').tool_calls == [
        ToolCallDelta(0, "f", "")]
    assert streamer.feed('\\": 1}"}').tool_calls == [ToolCallDelta(0, None, '{"a": 1}')]


def test_streamer_invalid_block_before_its_name_is_content() -> None:
    text = "<tool_call>\nnot json\n</tool_call>"
    content, calls, _ = stream(HERMES, list(text))
    assert (content, calls) == (text, [])


def test_streamer_keeps_a_call_whose_name_was_sent() -> None:
    # cut off mid-arguments: the name went out, so the call stays, arguments as written
    content, calls, _ = stream(HERMES, list('<tool_call>\n{"name": "f", "arguments": {"a": '))
    assert (content, calls) == ("", [ToolCall("f", '{"a": ')])


def test_streamer_is_linear_on_long_arguments() -> None:
    body = json.dumps({"code": "x = '}' + \"{\"\n" * 4000})
    text = f'<tool_call>\n{{"name": "write", "arguments": {body}}}\n</tool_call>'
    _, calls, deltas = stream(HERMES, [text[i:i + 3] for i in range(0, len(text), 3)])
    assert calls == [ToolCall("write", body)]
    assert len(deltas) > 1000


# --- streaming invariant: random outputs, random cuts ---

_ALPHABET = st.sampled_from(list('ab Z9\n\t{}[]":,\\/<>é日🙂') + ["</tool_call>", "<tool_call>"])
_STRINGS = st.lists(_ALPHABET, max_size=6).map("".join)
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | _STRINGS
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_STRINGS, inner, max_size=3),
    max_leaves=8,
)
_ARGS = st.dictionaries(_STRINGS, _JSON, max_size=4)
_NAMES = st.sampled_from(["get_weather", "f", "search-web", "日本"])
_TEXT = st.text(st.sampled_from(list("ab Z9.\n<>/[]}é🙂")), max_size=12)


@st.composite
def _calls(draw: st.DrawFn, max_calls: int = 3) -> list[tuple[str, str]]:
    """(name, arguments text) pairs, the text dumped in varying styles."""
    calls = []
    for _ in range(draw(st.integers(1, max_calls))):
        indent = draw(st.sampled_from([None, None, 2]))
        separators = draw(st.sampled_from([(", ", ": "), (",", ":")]))
        ascii_only = draw(st.booleans())
        args = json.dumps(draw(_ARGS), indent=indent, separators=separators,
                          ensure_ascii=ascii_only)
        calls.append((draw(_NAMES), args))
    return calls


def _call_object(name: str, args: str, key: str, style: int) -> str:
    if style == 1:  # arguments first
        return f'{{"{key}": {args}, "name": {json.dumps(name)}}}'
    if style == 2:  # arguments as a JSON string holding the object
        return f'{{"name": {json.dumps(name)}, "{key}": {json.dumps(args)}}}'
    return f'{{"name": {json.dumps(name)}, "{key}": {args}}}'


Sample = tuple[str, str, list[tuple[str, str]]]  # output, its content, its calls


@st.composite
def hermes_outputs(draw: st.DrawFn) -> Sample:
    before, after = draw(_TEXT), draw(_TEXT)
    assume(not after.lstrip().startswith("{"))  # would be read as one more call object
    calls = draw(_calls())
    blocks = []
    for name, args in calls:
        obj = _call_object(name, args, draw(st.sampled_from(["arguments", "parameters"])),
                           draw(st.integers(0, 2)))
        gap = draw(st.sampled_from(["\n", "", " \n"]))
        blocks.append(f"<tool_call>{gap}{obj}\n</tool_call>")
    if draw(st.booleans()):
        blocks[-1] = blocks[-1].removesuffix("</tool_call>")  # the model stopped before it
        after = ""
    text = before + "\n".join(blocks) + ("\n" + after if after else "")
    # the newlines between blocks are content too (stripped away unless text is around them)
    content = (before + "\n" * len(blocks) + after).strip()
    return text, content, calls


@st.composite
def llama3_outputs(draw: st.DrawFn) -> Sample:
    after = draw(_TEXT)
    assume(not after.lstrip().startswith(("{", ";")))
    calls = draw(_calls())
    objs = [_call_object(n, a, "parameters", draw(st.integers(0, 2))) for n, a in calls]
    tag = draw(st.sampled_from(["", "<|python_tag|>"]))
    text = tag + "; ".join(objs) + ("\n" + after if after else "")
    return text, after.strip(), calls


@st.composite
def mistral_outputs(draw: st.DrawFn) -> Sample:
    before = draw(_TEXT)
    calls = draw(_calls())
    objs = [_call_object(n, a, "arguments", draw(st.integers(0, 2))) for n, a in calls]
    return before + "[TOOL_CALLS] [" + ", ".join(objs) + "]", before.strip(), calls


@st.composite
def json_array_outputs(draw: st.DrawFn) -> Sample:
    calls = draw(_calls())
    objs = [_call_object(n, a, "arguments", draw(st.integers(0, 2))) for n, a in calls]
    return "[" + ",".join(objs) + "]", "", calls


SAMPLERS: dict[str, Callable[[], st.SearchStrategy[Sample]]] = {
    "hermes": hermes_outputs, "llama3_json": llama3_outputs,
    "mistral": mistral_outputs, "json_array": json_array_outputs,
}


@pytest.mark.parametrize("name", sorted(SAMPLERS))
@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_streamed_calls_match_extract(name: str, data: st.DataObject) -> None:
    parser = PARSERS[name]()
    text, content, calls = data.draw(SAMPLERS[name]())
    expected = ExtractedCalls(content or None, [ToolCall(n, a.strip()) for n, a in calls])
    assert parser.extract(text) == expected
    points = data.draw(st.lists(st.integers(0, len(text)), max_size=20))
    streamed_content, streamed_calls, _ = stream(parser, cut(text, points))
    assert (streamed_content, streamed_calls) == (content, expected.calls)


FIXED_SAMPLES = [
    'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", '
    '"x": {"y": "}</tool_call>\\"<tool_call>"}}}\n</tool_call>\n<tool_call>\n'
    '{"name": "f", "arguments": "{\\"a\\": 1}"}\n</tool_call>',
    '<tool_call>\n{"name": "天気", "arguments": {"都市": "東京 🙂", "n": [1, {"}": "]"}]}}'
    "\n</tool_call>\n\nDone.",
]


@pytest.mark.parametrize("text", FIXED_SAMPLES)
def test_one_character_at_a_time(text: str) -> None:
    whole = HERMES.extract(text)
    content, calls, _ = stream(HERMES, list(text))
    assert (content or None, calls) == (whole.content, whole.calls)


_CHAOS = st.lists(st.sampled_from(
    ["<tool_call>", "</tool_call>", "[TOOL_CALLS]", "<|python_tag|>", "<tool_", "{", "}", "[",
     "]", '"', '"name"', ": ", '"f"', '"arguments"', ",", ";", "\\", " ", "\n", "x", "é"]),
    max_size=30).map("".join)


@pytest.mark.parametrize("name", sorted(PARSERS))
@settings(max_examples=150, deadline=None)
@given(text=_CHAOS, points=st.lists(st.integers(0, 200), max_size=10))
def test_any_text_parses_without_losing_text(name: str, text: str, points: list[int]) -> None:
    parser = PARSERS[name]()
    whole = parser.extract(text)
    content, calls, _ = stream(parser, cut(text, points))
    if not whole.calls:
        assert whole.content == (text.strip() or None)  # nothing dropped
    if not calls:
        # a streamed call goes out once its name is complete, so this differs only then
        assert (content or None, whole.calls) == (whole.content, [])


# --- forced grammars ---

WEATHER = FunctionSpec("get_weather", "Weather in a city", {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 8},
                   "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city"], "additionalProperties": False,
})
NOTE = FunctionSpec("add_note", None, {
    "type": "object",
    "properties": {"text": {"type": "string", "maxLength": 6},
                   "tags": {"type": "array", "items": {"type": "string", "maxLength": 3},
                            "maxItems": 2},
                   "pinned": {"type": "boolean"},
                   "priority": {"type": "integer", "minimum": 0, "maximum": 9}},
    "required": ["text", "pinned"], "additionalProperties": False,
})
NO_ARGS = FunctionSpec("ping", None, {"type": "object", "properties": {},
                                      "additionalProperties": False})
TOOLS = [WEATHER, NOTE, NO_ARGS]


@pytest.fixture(scope="module")
def tokenizer() -> llguidance.LLTokenizer:
    return llguidance.hf.from_tokenizer(build_tokenizer())


def matcher(tokenizer: llguidance.LLTokenizer, lark: str) -> llguidance.LLMatcher:
    grammar = llguidance.LLMatcher.grammar_from_lark(lark)
    assert llguidance.LLMatcher.validate_grammar(grammar, tokenizer) == ""
    m = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
    assert not m.is_error(), m.get_error()
    return m


def accepts(tokenizer: llguidance.LLTokenizer, lark: str, text: str) -> bool:
    m = matcher(tokenizer, lark)
    return m.consume_tokens(tokenizer.tokenize_str(text)) and m.is_accepting()


def render(name: str, calls: list[tuple[str, str]]) -> str:
    """Calls written the way `name`'s forced grammar writes them."""
    if name == "hermes":
        return "\n".join(f'<tool_call>\n{{"name": "{n}", "arguments": {a}}}\n</tool_call>'
                         for n, a in calls)
    if name == "llama3_json":
        return "; ".join(f'{{"name": "{n}", "parameters": {a}}}' for n, a in calls)
    body = ", ".join(f'{{"name": "{n}", "arguments": {a}}}' for n, a in calls)
    return ("[TOOL_CALLS][" if name == "mistral" else "[") + body + "]"


GOOD = [("get_weather", '{"city": "Paris"}'),
        ("add_note", '{"text": "milk", "tags": ["a", "b"], "pinned": true, "priority": 3}'),
        ("ping", "{}")]
BAD = [
    [("get_wether", '{"city": "Paris"}')],  # no such tool
    [("get_weather", '{"town": "Paris"}')],  # not in the schema
    [("get_weather", '{"unit": "celsius"}')],  # required city missing
    [("get_weather", '{"city": 3}')],
    [("get_weather", '{"city": "Parisienne!"}')],  # over maxLength
    [("get_weather", '{"city":"Paris"}')],  # whitespace is fixed, not flexible
    [("get_weather", '{"city": "Paris" }')],
    [("add_note", '{"text": "x", "pinned": "yes"}')],
]


@pytest.mark.parametrize("name", sorted(PARSERS))
def test_forced_grammar_accepts_the_formats_calls(name: str,
                                                  tokenizer: llguidance.LLTokenizer) -> None:
    parser = PARSERS[name]()
    single, parallel = parser.forced_grammar(TOOLS, False), parser.forced_grammar(TOOLS, True)
    for call in GOOD:
        text = render(name, [call])
        assert accepts(tokenizer, single, text) and accepts(tokenizer, parallel, text)
        assert parser.extract(text) == ExtractedCalls(None, [ToolCall(*call)])
    assert accepts(tokenizer, parallel, render(name, GOOD))
    assert not accepts(tokenizer, single, render(name, GOOD))  # one call only
    assert parser.extract(render(name, GOOD)).calls == [ToolCall(*c) for c in GOOD]


@pytest.mark.parametrize("name", sorted(PARSERS))
def test_forced_grammar_rejects_others(name: str, tokenizer: llguidance.LLTokenizer) -> None:
    lark = PARSERS[name]().forced_grammar(TOOLS, True)
    for calls in BAD:
        assert not accepts(tokenizer, lark, render(name, calls)), calls
    assert not accepts(tokenizer, lark, "I'd rather answer in text.")
    assert not accepts(tokenizer, lark, "Sure! " + render(name, GOOD[:1]))
    assert not accepts(tokenizer, lark, "")
    other = "hermes" if name != "hermes" else "llama3_json"
    assert not accepts(tokenizer, lark, render(other, GOOD[:1]))


def test_forced_grammar_named_tool_only(tokenizer: llguidance.LLTokenizer) -> None:
    lark = HERMES.forced_grammar([NOTE], False)
    assert accepts(tokenizer, lark, render("hermes", GOOD[1:2]))
    assert not accepts(tokenizer, lark, render("hermes", GOOD[:1]))


def test_forced_grammar_of_a_tool_without_parameters(tokenizer: llguidance.LLTokenizer) -> None:
    lark = HERMES.forced_grammar([FunctionSpec("now", None, {})], False)
    assert accepts(tokenizer, lark, render("hermes", [("now", "{}")]))
    assert not accepts(tokenizer, lark, render("hermes", [("now", '"soon"')]))  # objects only
    with pytest.raises(ValueError):
        HERMES.forced_grammar([], False)


def test_hermes_grammar_text() -> None:
    lark = HERMES.forced_grammar([WEATHER], False)
    assert lark.splitlines()[:3] == [
        "start: call",
        "call: call_0",
        'call_0: "<tool_call>\\n{\\"name\\": \\"get_weather\\", \\"arguments\\": " args_0 '
        '"}\\n</tool_call>"',
    ]
    assert lark.splitlines()[3].startswith("args_0: %json {")


def random_walk(tokenizer: llguidance.LLTokenizer, lark: str, seed: int) -> str:
    """Samples uniformly among the tokens the grammar allows until it ends."""
    rng = random.Random(seed)
    m = matcher(tokenizer, lark)
    token_ids: list[int] = []
    for _ in range(1000):
        if m.is_stopped():
            break
        # the mask llguidance.torch.fill_next_token_bitmask writes, as bytes: bit j = token j
        # (that module's import compiles with torch and warns; the mask is the same)
        mask = int.from_bytes(m.compute_bitmask(), "little")
        allowed = [j for j in range(tokenizer.vocab_size) if mask >> j & 1]
        token_id = rng.choice(allowed)
        if token_id == tokenizer.eos_token:
            break
        assert m.consume_token(token_id)
        token_ids.append(token_id)
    assert m.is_accepting(), "the walk should end within 1000 tokens"
    return tokenizer.decode_str(token_ids)


@pytest.mark.parametrize("parallel", [False, True])
@pytest.mark.parametrize("name", sorted(PARSERS))
def test_random_walks_parse_into_valid_calls(name: str, parallel: bool,
                                             tokenizer: llguidance.LLTokenizer) -> None:
    parser = PARSERS[name]()
    lark = parser.forced_grammar(TOOLS, parallel)
    schemas = {tool.name: tool.parameters for tool in TOOLS}
    for seed in range(4):
        text = random_walk(tokenizer, lark, seed)
        extracted = parser.extract(text)
        assert extracted.content is None, text
        assert len(extracted.calls) >= 1 and (parallel or len(extracted.calls) == 1)
        for call in extracted.calls:
            jsonschema.validate(json.loads(call.arguments), schemas[call.name])
        content, calls, _ = stream(parser, list(text))
        assert (content, calls) == ("", extracted.calls)


# ---- markers that are tokens, bare JSON calls ---------------------------------------------

def test_forced_grammar_names_marker_tokens_by_id() -> None:
    tools = [FunctionSpec("f", None, {"type": "object", "properties": {}})]
    grammar = HermesParser().forced_grammar(tools, False, {"<tool_call>": 7, "</tool_call>": 8})
    assert "<[7]>" in grammar and "<[8]>" in grammar and '"<tool_call>' not in grammar
    plain = HermesParser().forced_grammar(tools, False)
    assert "<[" not in plain and "<tool_call>" in plain


def test_parallel_forced_grammar_lets_a_trailing_newline_end_the_calls() -> None:
    tools = [FunctionSpec("f", None, {"type": "object", "properties": {}})]
    start = HermesParser().forced_grammar(tools, True).splitlines()[0]
    assert start == 'start: call ("\\n" call)* "\\n"?'


@pytest.mark.parametrize("text, expected", [
    ('{"name": "f", "arguments": {"a": 1}}', [("f", '{"a": 1}')]),
    ('```json\n{"name": "f", "parameters": {}}\n```', [("f", "{}")]),
    ('[{"name": "f", "arguments": {}}, {"name": "g", "arguments": {"b": "é"}}]',
     [("f", "{}"), ("g", '{"b": "é"}')]),
    ('{"name": "f", "arguments": {}}\n{"name": "g", "arguments": {}}', [("f", "{}"), ("g", "{}")]),
    ('{"name": "f", "arguments": {}}\nand then', None),
    ('{"name": "unknown", "arguments": {}}', None),
    ('{"name": "f", "arguments": "not an object"}', None),
    ("The answer is 4.", None), ("{not json", None), ("[]", None),
])
def test_bare_json_calls(text: str, expected: list[tuple[str, str]] | None) -> None:
    calls = bare_json_calls(text, {"f", "g"})
    assert (None if calls is None else [(c.name, c.arguments) for c in calls]) == expected


@pytest.mark.parametrize("text, possible", [
    ("", True), ("  ", True), ("{", True), ("[{", True), ("`", True), ("``", True),
    ("```js", True), ("```json\n{", True), ("```\n[", True), ("```python\ndef", False),
    ("The", False), ("a{", False), ("`x", False), ('{"na', True), ('{ "name": "f"', True),
    ('[{"name"', True), ("[1] First", False), ('{"answer": 4}', False), ("[ {", True),
    ('```json\n{"result"', False),
])
def test_could_be_bare_json_call(text: str, possible: bool) -> None:
    assert could_be_bare_json_call(text) is possible
