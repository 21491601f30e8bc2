"""Tool calls on a tiny random-weight model behind a Qwen2.5-style tools chat template: forced
calls (tool_choice "required" or a named function) always come back as tool_calls whose
arguments match the tool's schema, streamed or not; "none" answers in text; "auto" parses the
model's own <tool_call> text; tool conversations go back through the template; the legacy
functions/function_call behave like tools/tool_choice; malformed tools are a 400."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import jsonschema
import openai
import pytest

from tests.integration.conftest import MODEL_NAME, RunningServer, serve
from tests.json_schemas import Schema

# Qwen2.5's layout, shortened: the tools listed in the system turn (by name and description
# only: the byte-level tokenizer spends a token per byte or two, and a random model reads
# nothing into schemas), calls as <tool_call>\n{"name": ..., "arguments": ...}\n</tool_call>,
# results in a user turn
TOOLS_TEMPLATE = (
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}{%- endif %}"
    "{{- '# Tools\\n<tools>' }}"
    "{%- for tool in tools %}"
    "{{- '\\n' + tool.function.name + ': ' + (tool.function.description or '') }}"
    "{%- endfor %}"
    "{{- '\\n</tools>\\nCall one as <tool_call>\\n{\"name\": <name>, \"arguments\": <args>}"
    "\\n</tool_call><|im_end|>\\n' }}"
    "{%- elif messages[0].role == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'system' and loop.first %}"
    "{%- elif message.role == 'assistant' and message.tool_calls %}"
    "{{- '<|im_start|>assistant' }}"
    "{%- if message.content %}{{- '\\n' + message.content }}{%- endif %}"
    "{%- for call in message.tool_calls %}"
    "{%- if call.function is defined %}{%- set call = call.function %}{%- endif %}"
    "{{- '\\n<tool_call>\\n{\"name\": \"' + call.name + '\", \"arguments\": ' }}"
    "{{- call.arguments | tojson }}{{- '}\\n</tool_call>' }}"
    "{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{{- '<|im_start|>user\\n<tool_response>\\n' + message.content"
    " + '\\n</tool_response><|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
WEATHER_SCHEMA: Schema = {
    "type": "object", "additionalProperties": False, "required": ["location", "unit"],
    "properties": {"location": {"type": "string", "pattern": "^[A-Z][a-z]{1,8}$"},
                   "unit": {"enum": ["celsius", "fahrenheit"]}}}
ADD_SCHEMA: Schema = {
    "type": "object", "additionalProperties": False, "required": ["a", "b"],
    "properties": {"a": {"type": "integer", "minimum": -999, "maximum": 999},
                   "b": {"type": "integer", "minimum": -999, "maximum": 999}}}
# one of tests/json_schemas.py's drawn schemas (nesting, patterns, lengths, an array), as a
# third tool's parameters
RECORD_SCHEMA: Schema = {
    "type": "object", "additionalProperties": False, "required": ["kind", "flag", "tags"],
    "properties": {
        "kind": {"type": "object", "additionalProperties": False, "required": ["id", "meta"],
                 "properties": {"id": {"type": "string", "minLength": 0, "maxLength": 1},
                                "meta": {"type": "string", "pattern": "^x[0-9]{1,3}$"}}},
        "flag": {"type": "string", "minLength": 1, "maxLength": 1},
        "tags": {"type": "array", "items": {"type": "string", "pattern": "^[a-f0-9]{2,8}$"},
                 "minItems": 0, "maxItems": 1}}}
SCHEMAS = {"get_weather": WEATHER_SCHEMA, "add": ADD_SCHEMA, "record": RECORD_SCHEMA}
TOOLS = [{"type": "function", "function": {"name": name, "description": f"the {name} tool",
                                           "parameters": schema}}
         for name, schema in SCHEMAS.items()]
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]
MAX_TOKENS = 320  # with the ~190-token prompt, within the tiny model's 512 positions
CALL_TEXT = ('<tool_call>\n{"name": "get_weather", "arguments": {"location": "Paris", '
             '"unit": "celsius"}}\n</tool_call>')


@pytest.fixture(scope="module")
def tools_server(tiny_llama_dir: Path) -> Iterator[RunningServer]:
    """The tiny llama serving the tools template (a prompt with the tools is ~190 tokens)."""
    with serve(tiny_llama_dir, {"chat_template": TOOLS_TEMPLATE}, num_blocks=512,
               max_num_seqs=32) as running:
        yield running


@dataclass(frozen=True, slots=True)
class Call:
    id: str
    name: str
    arguments: str


@dataclass(frozen=True, slots=True)
class Reply:
    content: str | None
    calls: list[Call]
    finish_reason: str | None


async def ask(server: RunningServer, stream: bool, **fields: object) -> Reply:
    """One chat completion with the tools, streamed (deltas reassembled) or not; a client per
    request, as each gather runs in an event loop of its own."""
    body = {"model": MODEL_NAME, "messages": MESSAGES, "max_tokens": MAX_TOKENS,
            "tools": TOOLS, **fields}
    async with server.async_client() as client:
        if stream:
            return await _streamed(client, body)
        response = await client.chat.completions.create(**body)  # type: ignore[call-overload]
    choice = response.choices[0]
    calls = [Call(call.id, call.function.name, call.function.arguments)
             for call in choice.message.tool_calls or []]
    assert all(call.type == "function" for call in choice.message.tool_calls or [])
    return Reply(choice.message.content, calls, choice.finish_reason)


async def _streamed(client: openai.AsyncOpenAI, body: dict[str, object]) -> Reply:
    content: list[str] = []
    parts: dict[int, dict[str, str]] = {}  # index -> id, name, arguments so far
    finish_reason = None
    async for chunk in await client.chat.completions.create(stream=True, **body):  # type: ignore[call-overload]
        for choice in chunk.choices:
            content.append(choice.delta.content or "")
            for delta in choice.delta.tool_calls or []:
                part = parts.setdefault(delta.index, {"id": "", "name": "", "arguments": ""})
                function = delta.function
                if not part["id"]:  # the first delta of a call: id, type and the whole name
                    assert delta.id and delta.type == "function", delta
                    assert function is not None and function.name, delta
                    part["id"], part["name"] = delta.id, function.name
                else:  # then argument fragments only
                    assert not delta.id and (function is None or not function.name), delta
                if function is not None:
                    part["arguments"] += function.arguments or ""
            finish_reason = choice.finish_reason or finish_reason
    calls = [Call(**parts[index]) for index in sorted(parts)]
    assert sorted(parts) == list(range(len(parts))), "call indexes are not 0, 1, ..."
    return Reply("".join(content) or None, calls, finish_reason)


def gather(*coroutines: object) -> list[Reply]:
    async def run() -> list[Reply]:
        return list(await asyncio.gather(*coroutines))  # type: ignore[arg-type]

    return asyncio.run(run())


def _bad_call(call: Call, names: set[str]) -> str | None:
    """Why `call` is not a call of one of `names` with valid arguments; None when it is."""
    if not call.id or call.name not in names:
        return f"id {call.id!r}, name {call.name!r}"
    try:
        jsonschema.validate(json.loads(call.arguments), SCHEMAS[call.name])
    except (json.JSONDecodeError, jsonschema.ValidationError) as exc:
        return f"{type(exc).__name__}: {str(exc)[:200]}"
    return None


def _named(name: str) -> dict[str, object]:
    return {"type": "function", "function": {"name": name}}


# ---------------------------------------------------------------- forced calls


FORCED_CASES = [(choice, parallel, temperature, stream)
                for choice in ("required", "get_weather", "add", "record")
                for parallel in (True, False) for temperature in (0.0, 1.0)
                for stream in (False, True)]


@pytest.fixture(scope="module")
def forced_replies(tools_server: RunningServer) -> list[Reply]:
    """Every forced case at once, so the engine batches their grammars."""
    return gather(*(ask(tools_server, stream, temperature=temperature, seed=index,
                        parallel_tool_calls=parallel,
                        tool_choice=choice if choice == "required" else _named(choice))
                    for index, (choice, parallel, temperature, stream)
                    in enumerate(FORCED_CASES)))


def test_forced_calls_are_valid_tool_calls(forced_replies: list[Reply]) -> None:
    failures = []
    for (choice, parallel, temperature, stream), reply in zip(FORCED_CASES, forced_replies,
                                                              strict=True):
        names = set(SCHEMAS) if choice == "required" else {choice}
        single = not parallel or choice != "required"
        problems = [why for call in reply.calls if (why := _bad_call(call, names))]
        if reply.finish_reason != "tool_calls":
            problems.append(f"finish_reason {reply.finish_reason!r}")
        if not reply.calls or (single and len(reply.calls) != 1):
            problems.append(f"{len(reply.calls)} calls")
        if len({call.id for call in reply.calls}) != len(reply.calls):
            problems.append("call ids repeat")
        if problems:
            failures.append(f"{choice} parallel={parallel} T={temperature} stream={stream}: "
                            f"{problems} {reply}")
    assert not failures, "\n".join(failures[:6])


def test_streamed_calls_equal_non_streamed_at_temperature_0(forced_replies: list[Reply]
                                                            ) -> None:
    pairs: dict[tuple[object, ...], dict[bool, Reply]] = {}
    for (choice, parallel, temperature, stream), reply in zip(FORCED_CASES, forced_replies,
                                                              strict=True):
        if temperature == 0.0:
            pairs.setdefault((choice, parallel), {})[stream] = reply
    for key, replies in pairs.items():
        plain, streamed = ([(c.name, c.arguments) for c in replies[s].calls]
                           for s in (False, True))
        assert plain == streamed, key
        assert replies[False].content == replies[True].content, key


def test_tool_choice_none_answers_in_text(tools_server: RunningServer) -> None:
    replies = gather(*(ask(tools_server, stream, tool_choice="none", temperature=temperature,
                           max_tokens=24) for temperature in (0.0, 1.0)
                       for stream in (False, True)))
    for reply in replies:
        assert reply.calls == [] and isinstance(reply.content, str) and reply.content
        assert reply.finish_reason in ("stop", "length")


def test_auto_parses_the_models_own_call(tools_server: RunningServer) -> None:
    """A random model never writes a <tool_call> of its own accord; a guided_choice makes it
    write exactly one, which "auto" must return as a call, streamed or not."""
    replies = gather(*(ask(tools_server, stream, tool_choice="auto", temperature=0.0,
                           extra_body={"guided_choice": [CALL_TEXT]})
                       for stream in (False, True)))
    for reply in replies:
        assert reply.finish_reason == "tool_calls", reply
        assert [(c.name, json.loads(c.arguments)) for c in reply.calls] == [
            ("get_weather", {"location": "Paris", "unit": "celsius"})]
        assert not reply.content


# ---------------------------------------------------------------- conversations


def _conversation(arguments: str) -> list[dict[str, object]]:
    return [
        {"role": "system", "content": "Answer briefly."},
        *MESSAGES,
        {"role": "assistant", "content": None, "tool_calls": [{
            "id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": arguments}}]},
        {"role": "tool", "tool_call_id": "call_1",
         "content": '{"temperature": 21, "unit": "celsius"}'},
    ]


def test_tool_results_go_back_through_the_template(tools_server: RunningServer) -> None:
    """A conversation holding an assistant's call and the tool's result (~370 prompt tokens) is
    rendered and answered in every tool_choice mode."""
    arguments = '{"location": "Paris", "unit": "celsius"}'
    replies = gather(*(ask(tools_server, False, messages=_conversation(arguments), tools=TOOLS[:1],
                           tool_choice=choice, parallel_tool_calls=False, temperature=0.0,
                           max_tokens=max_tokens)
                       for choice, max_tokens in (("auto", 16), ("none", 16),
                                                  ("required", 120))))
    assert replies[0].finish_reason in ("stop", "length", "tool_calls")
    assert replies[1].calls == [] and replies[1].content
    assert replies[2].finish_reason == "tool_calls", replies[2]
    assert [_bad_call(call, {"get_weather"}) for call in replies[2].calls] == [None]
    rendered = tools_server.http().post("/tokenize", json={
        "model": MODEL_NAME, "messages": _conversation(arguments), "add_generation_prompt": True})
    assert rendered.status_code == 200, rendered.text
    text = tools_server.engine.tokenizer.decode(rendered.json()["tokens"])
    assert CALL_TEXT in text and "<tool_response>\n{\"temperature\": 21" in text, text


def test_tools_are_rendered_in_the_prompt(tools_server: RunningServer) -> None:
    client = tools_server.client()
    prompt_tokens = []
    for tools in (TOOLS, None):
        response = client.chat.completions.create(
            model=MODEL_NAME, messages=MESSAGES, max_tokens=1,  # type: ignore[arg-type]
            tools=tools or openai.NOT_GIVEN)  # type: ignore[arg-type]
        assert response.usage is not None
        prompt_tokens.append(response.usage.prompt_tokens)
    listing = "# Tools\n<tools>\n" + "\n".join(f"{name}: the {name} tool" for name in SCHEMAS)
    assert prompt_tokens[0] - prompt_tokens[1] > len(listing) // 4, prompt_tokens
    # /tokenize renders the same prompt when given the same tools
    rendered = tools_server.http().post("/tokenize", json={
        "model": MODEL_NAME, "messages": MESSAGES, "tools": TOOLS})
    assert rendered.status_code == 200, rendered.text
    assert rendered.json()["count"] == prompt_tokens[0]


# ---------------------------------------------------------------- legacy functions


def test_legacy_functions_behave_like_tools(tools_server: RunningServer) -> None:
    functions = [tool["function"] for tool in TOOLS]
    legacy, modern = gather(
        ask(tools_server, False, tools=None, functions=functions, function_call={"name": "add"},
            temperature=0.0),
        ask(tools_server, False, tool_choice=_named("add"), temperature=0.0))
    assert legacy.finish_reason in ("tool_calls", "function_call"), legacy
    assert [(c.name, c.arguments) for c in legacy.calls] == [
        (c.name, c.arguments) for c in modern.calls]
    assert _bad_call(legacy.calls[0], {"add"}) is None
    plain = gather(ask(tools_server, False, tools=None, functions=functions, function_call="none",
                       max_tokens=8))[0]
    assert plain.calls == [] and plain.content


# ---------------------------------------------------------------- refused tools


def _tool(parameters: object, name: str = "f") -> dict[str, object]:
    return {"type": "function", "function": {"name": name, "parameters": parameters}}


BAD_TOOL_CASES = [
    ("parameters of unknown type", {"tools": [_tool({"type": "frobnicate"})]}, "tools"),
    ("properties not an object", {"tools": [_tool({"type": "object", "properties": 5})]},
     "tools"),
    ("parameters not an object", {"tools": [_tool("x")]}, "tools"),
    ("bad parameters, tool_choice none", {"tools": [_tool({"type": "frobnicate"})],
                                          "tool_choice": "none"}, "tools"),
    ("named function unknown", {"tools": TOOLS, "tool_choice": _named("nope")}, "tool_choice"),
    ("required without tools", {"tool_choice": "required"}, "tool_choice"),
    ("legacy function_call unknown",
     {"functions": [TOOLS[0]["function"]], "function_call": {"name": "nope"}},
     "function_call"),
    ("legacy bad parameters", {"functions": [{"name": "f", "parameters": {"type": "frobnicate"}}]},
     "functions"),
    ("streamed, named function unknown",
     {"tools": TOOLS, "tool_choice": _named("nope"), "stream": True}, "tool_choice"),
]


@pytest.mark.parametrize("fields, param", [case[1:] for case in BAD_TOOL_CASES],
                         ids=[case[0] for case in BAD_TOOL_CASES])
def test_bad_tools_are_a_400_naming_the_field(tools_server: RunningServer,
                                              fields: dict[str, object], param: str) -> None:
    response = tools_server.http().post("/v1/chat/completions", json={
        "model": MODEL_NAME, "messages": MESSAGES, "max_tokens": 8, **fields})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["message"]
    assert isinstance(error["param"], str) and error["param"].startswith(param), error
    tools_server.wait_idle()


def test_server_serves_after_bad_tools(tools_server: RunningServer) -> None:
    http = tools_server.http()
    for _, fields, _ in BAD_TOOL_CASES:
        response = http.post("/v1/chat/completions", json={
            "model": MODEL_NAME, "messages": MESSAGES, "max_tokens": 8, **fields})
        assert response.status_code == 400
    tools_server.wait_idle()
    reply = gather(ask(tools_server, False, tool_choice="required",
                       temperature=0.0))[0]
    assert reply.finish_reason == "tool_calls" and reply.calls
    tools_server.wait_idle()
