"""Structured outputs and tools on the embedded default model (Qwen2.5-Coder-0.5B-Instruct), as
a user drives them with the openai SDK: `beta.chat.completions.parse` with a pydantic model, a
two-turn get_weather conversation, forced calls, and the SDK's stream helpers. One server for
the module; every answer is short, as the model writes ~30 tokens/s on CPU."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import openai
import pytest
from pydantic import BaseModel

from tests.integration.test_default_model import (
    DEFAULT_MODEL_NAME,
    REPO,
    _free_port,
    _require_default_model,
    _wait_healthy,
)

pytestmark = [pytest.mark.slow, pytest.mark.default_model]

API_KEY = "sk-default-tools"
WEATHER_SCHEMA = {
    "type": "object", "additionalProperties": False, "required": ["location", "unit"],
    "properties": {"location": {"type": "string", "description": "a city, e.g. Paris"},
                   "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}}
TIME_SCHEMA = {
    "type": "object", "additionalProperties": False, "required": ["timezone"],
    "properties": {"timezone": {"type": "string", "description": "an IANA zone, e.g. "
                                                                 "Europe/Paris"}}}
SCHEMAS = {"get_weather": WEATHER_SCHEMA, "get_time": TIME_SCHEMA}
# strict: the SDK's parse and stream helpers only take strict function tools
TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Get the current weather in a city",
        "parameters": WEATHER_SCHEMA, "strict": True}},
    {"type": "function", "function": {
        "name": "get_time", "description": "Get the current time in a timezone",
        "parameters": TIME_SCHEMA, "strict": True}},
]
QUESTION = [{"role": "user", "content": "What is the weather like in Paris right now? "
                                        "Use celsius."}]
WEATHER_REPORT = {"location": "Paris", "temperature": 23, "unit": "celsius",
                  "condition": "sunny"}


class Capital(BaseModel):
    city: str
    country: str


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[openai.OpenAI]:
    """`pagedserve serve` with the default config, as a user starts it; SIGTERM at the end."""
    _require_default_model()
    port = _free_port()
    base_url = f"http://127.0.0.1:{port}"
    log = tmp_path_factory.mktemp("default-tools") / "pagedserve.log"
    command = [str(Path(sys.executable).with_name("pagedserve")), "serve",
               "--config", "configs/default.yaml", "--port", str(port), "--seed", "0"]
    with log.open("wb") as out:
        process = subprocess.Popen(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                   env={**os.environ, "PAGEDSERVE_API_KEY": API_KEY})
    try:
        _wait_healthy(process, base_url, log)
        yield openai.OpenAI(base_url=f"{base_url}/v1", api_key=API_KEY, max_retries=0,
                            timeout=600)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()


def _calls(message: object) -> list[tuple[str, str]]:
    return [(call.function.name, call.function.arguments)
            for call in getattr(message, "tool_calls", None) or []]


def _assert_valid_calls(message: object, names: set[str]) -> None:
    calls = _calls(message)
    assert calls, f"no tool calls: {message}"
    for name, arguments in calls:
        assert name in names, calls
        jsonschema.validate(json.loads(arguments), SCHEMAS[name])


def test_parse_returns_the_pydantic_model(client: openai.OpenAI) -> None:
    completion = client.beta.chat.completions.parse(
        model=DEFAULT_MODEL_NAME, temperature=0, max_tokens=40, response_format=Capital,
        messages=[{"role": "user", "content": "What is the capital of France? Reply in JSON "
                                              "with the keys city and country."}])
    choice = completion.choices[0]
    assert choice.finish_reason == "stop"
    capital = choice.message.parsed
    assert isinstance(capital, Capital)
    assert "paris" in capital.city.lower() and "france" in capital.country.lower()


def test_json_object(client: openai.OpenAI) -> None:
    answer = client.chat.completions.create(
        model=DEFAULT_MODEL_NAME, temperature=0, max_tokens=40,
        response_format={"type": "json_object"},
        messages=[{"role": "user", "content": "Describe Ann, aged 30, as a JSON object with "
                                              "the keys name and age."}])
    assert answer.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(answer.choices[0].message.content or ""), dict)


def test_auto_calls_get_weather(client: openai.OpenAI) -> None:
    """The first turn: the model's own call, parsed out of its text."""
    first = client.chat.completions.create(
        model=DEFAULT_MODEL_NAME, temperature=0, max_tokens=60, messages=QUESTION,  # type: ignore[arg-type]
        tools=TOOLS, tool_choice="auto")  # type: ignore[arg-type]
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    _assert_valid_calls(choice.message, {"get_weather"})
    call = choice.message.tool_calls[0]  # type: ignore[index]
    assert call.id and call.type == "function"
    assert "paris" in json.loads(call.function.arguments)["location"].lower()


def test_tool_result_is_used_in_the_answer(client: openai.OpenAI) -> None:
    """The second turn: the call (as the first turn makes it) and the tool's result go back
    through the template, and the answer is text that uses the result. This 0.5B model, shown
    a conversation that ends in a tool result, writes the same call again, so a user turn
    asks for the answer; the tools are left out, or it calls again all the same."""
    arguments = json.dumps({"location": "Paris", "unit": "celsius"})
    messages = [*QUESTION,
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "call_1", "type": "function",
                     "function": {"name": "get_weather", "arguments": arguments}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": json.dumps(WEATHER_REPORT)},
                {"role": "user", "content": "Summarize the tool response in one sentence."}]
    second = client.chat.completions.create(
        model=DEFAULT_MODEL_NAME, temperature=0, max_tokens=40, messages=messages)  # type: ignore[arg-type]
    answer = second.choices[0]
    assert not answer.message.tool_calls, answer
    assert "23" in (answer.message.content or ""), answer.message.content


@pytest.mark.parametrize("tool_choice, names", [
    ("required", {"get_weather", "get_time"}),
    ({"type": "function", "function": {"name": "get_time"}}, {"get_time"}),
], ids=["required", "named"])
def test_forced_calls(client: openai.OpenAI, tool_choice: object, names: set[str]) -> None:
    answer = client.chat.completions.create(
        model=DEFAULT_MODEL_NAME, temperature=0, max_tokens=60, messages=QUESTION,  # type: ignore[arg-type]
        tools=TOOLS, tool_choice=tool_choice, parallel_tool_calls=False)  # type: ignore[arg-type]
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    _assert_valid_calls(choice.message, names)
    assert len(_calls(choice.message)) == 1


@pytest.mark.parametrize("tool_choice", ["auto", "required"])
def test_sdk_stream_helper_equals_the_plain_answer(client: openai.OpenAI,
                                                   tool_choice: str) -> None:
    fields = {"model": DEFAULT_MODEL_NAME, "temperature": 0, "max_tokens": 60,
              "messages": QUESTION, "tools": TOOLS, "tool_choice": tool_choice}
    if tool_choice == "required":
        # free to make several calls, this model goes on calling until max_tokens, and the
        # SDK's helper refuses to parse a "length" answer
        fields["parallel_tool_calls"] = False
    plain = client.chat.completions.create(**fields).choices[0]  # type: ignore[call-overload]
    with client.beta.chat.completions.stream(**fields) as stream:  # type: ignore[arg-type]
        streamed = stream.get_final_completion().choices[0]
    assert streamed.finish_reason == plain.finish_reason
    # the stream's first chunk says content "" (as vLLM's does), the plain answer null
    assert (streamed.message.content or None) == (plain.message.content or None)
    assert _calls(streamed.message) == _calls(plain.message)
    if tool_choice == "required":
        assert plain.finish_reason == "tool_calls", plain
        _assert_valid_calls(streamed.message, set(SCHEMAS))
        parsed = streamed.message.tool_calls[0].function.parsed_arguments  # type: ignore[index]
        assert parsed == json.loads(_calls(plain.message)[0][1])
