"""Protocol models, request → SamplingParams, the error envelope mapping and response/chunk
formatting, checked against the official `openai` SDK's own response types."""

from __future__ import annotations

import hmac
import json
import logging
import math

import openai.types as openai_types
import openai.types.chat as openai_chat
import pytest
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from engine import (
    CompletionOutput,
    ContextLengthExceededError,
    EngineDeadError,
    InvalidRequestError,
    Logprob,
    QueueFullError,
    RequestFailedError,
    RequestOutput,
    SamplingParams,
)
from engine.outputs import RequestTiming
from server.errors import from_engine_error, from_validation_errors
from server.middleware import key_matches
from server.outputs import CompletionLogprobBuilder, UsageCounter, chat_logprobs
from server.protocol import ChatCompletionRequest, CompletionRequest, ErrorResponse
from server.sampling import chat_sampling_params, completion_sampling_params

MESSAGES = [{"role": "user", "content": "hi"}]


class _Tokenizer:
    """Decodes ids as `<id>`; only used where Logprob.decoded_token is missing."""

    def decode(self, ids: list[int]) -> str:
        return "".join(f"<{i}>" for i in ids)


def _chat(**fields: object) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"messages": MESSAGES, **fields})


def _validation_error(model: type, data: object) -> list[dict[str, object]]:
    with pytest.raises(ValidationError) as info:
        model.model_validate(data)  # type: ignore[attr-defined]
    # FastAPI prefixes body errors with "body"; mirror that
    return [{**e, "loc": ("body", *e["loc"])} for e in info.value.errors()]


# ---------------------------------------------------------------- request parsing


def test_chat_request_all_fields_and_unknown_ignored(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="server.protocol"):
        request = _chat(
            model="m", max_tokens=7, max_completion_tokens=9, temperature=0.5, top_p=0.9, n=2,
            stream=True, stream_options={"include_usage": True}, stop=["a", "b"],
            presence_penalty=0.1, frequency_penalty=-0.1, logit_bias={"5": 2.0}, logprobs=True,
            top_logprobs=3, seed=4, user="u", top_k=5, min_p=0.1, repetition_penalty=1.1,
            min_tokens=1, ignore_eos=True, stop_token_ids=[3], skip_special_tokens=False,
            chat_template_kwargs={"enable_thinking": False}, tools=[], frobnicate=1)
    assert request.include_usage and request.max_output_tokens == 9
    assert not hasattr(request, "frobnicate") and request.tools == []
    assert "frobnicate" in caplog.text and "tools" not in caplog.text


def test_message_content_forms() -> None:
    request = ChatCompletionRequest.model_validate({"messages": [
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text",
                                                                       "text": "b"}]},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]},
        {"role": "tool", "content": "42", "tool_call_id": "1"},
    ]})
    from server.chat_template import render_messages

    rendered = render_messages(request.messages)
    assert [m["role"] for m in rendered] == ["system", "user", "assistant", "tool"]
    assert rendered[1]["content"] == "a\nb" and rendered[2]["content"] == ""
    assert rendered[3]["tool_call_id"] == "1"


@pytest.mark.parametrize("data, param", [
    ({}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user"}]}, "messages[0]"),
    ({"messages": MESSAGES, "temperature": -1}, "temperature"),
    ({"messages": MESSAGES, "top_p": 2}, "top_p"),
    ({"messages": MESSAGES, "n": 0}, "n"),
    ({"messages": MESSAGES, "max_tokens": -5}, "max_tokens"),
    ({"messages": MESSAGES, "logprobs": True, "top_logprobs": 50}, "top_logprobs"),
])
def test_bad_chat_requests_name_the_field(data: dict[str, object], param: str) -> None:
    error = from_validation_errors(_validation_error(ChatCompletionRequest, data))
    assert error.status == 400 and error.param == param
    assert error.error_type == "invalid_request_error"


def test_top_logprobs_needs_logprobs() -> None:
    error = from_validation_errors(_validation_error(
        ChatCompletionRequest, {"messages": MESSAGES, "top_logprobs": 2}))
    assert "requires logprobs" in error.message


@pytest.mark.parametrize("prompt, expected", [
    ("hello", ["hello"]),
    (["a", "b"], ["a", "b"]),
    ([1, 2, 3], [[1, 2, 3]]),
    ([[1], [2, 3]], [[1], [2, 3]]),
])
def test_completion_prompt_forms(prompt: object, expected: list[object]) -> None:
    assert CompletionRequest.model_validate({"prompt": prompt}).prompts == expected


@pytest.mark.parametrize("prompt", [[], [[]], [True, False], None, [1, "a"]])
def test_bad_completion_prompts(prompt: object) -> None:
    error = from_validation_errors(_validation_error(CompletionRequest, {"prompt": prompt}))
    assert error.status == 400 and error.param == "prompt"


def test_malformed_json_error() -> None:
    exc = RequestValidationError([{"type": "json_invalid", "loc": ("body", 3),
                                   "msg": "JSON decode error",
                                   "ctx": {"error": "Expecting value"}}])
    error = from_validation_errors(list(exc.errors()))
    assert error.status == 400 and "not valid JSON" in error.message
    assert "Expecting value" in error.message


# ---------------------------------------------------------------- sampling params


def test_chat_sampling_params_request_wins_then_model_defaults() -> None:
    defaults = {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05}
    params = chat_sampling_params(_chat(temperature=0.0, min_p=0.05), defaults, 4096)
    assert params.temperature == 0.0  # an explicit 0 is not "unset"
    assert (params.top_p, params.top_k, params.repetition_penalty) == (0.8, 20, 1.05)
    assert params.min_p == 0.05
    assert params.max_tokens is None  # absent: up to the context limit
    assert params.logprobs is None
    plain = chat_sampling_params(_chat(), {}, 4096)
    assert plain.temperature == SamplingParams().temperature
    plain.validate(vocab_size=100)


def test_chat_sampling_params_mapping() -> None:
    params = chat_sampling_params(_chat(
        max_tokens=5, max_completion_tokens=8, logprobs=True, top_logprobs=3, stop="x",
        logit_bias={"7": -100}, seed=3, n=2, stop_token_ids=[4], ignore_eos=True,
        min_tokens=2), {}, 4096)
    assert params.max_tokens == 8 and params.logprobs == 3 and params.stop == ("x",)
    assert params.logit_bias == {7: -100.0} and params.seed == 3 and params.n == 2
    assert params.stop_token_ids == (4,) and params.ignore_eos and params.min_tokens == 2
    assert chat_sampling_params(_chat(logprobs=True), {}, 4096).logprobs == 0
    params.validate(vocab_size=100)


@pytest.mark.parametrize("fields, param", [
    ({"logit_bias": {"x": 1}}, "logit_bias"),
])
def test_bad_chat_sampling_fields(fields: dict[str, object], param: str) -> None:
    from server.errors import ApiError

    with pytest.raises(ApiError) as info:
        chat_sampling_params(_chat(**fields), {}, 4096)
    assert info.value.status == 400 and info.value.param == param


@pytest.mark.parametrize("fields, param", [
    ({"best_of": 3}, "best_of"),
    ({"truncate_prompt_tokens": 0}, "truncate_prompt_tokens"),
])
def test_unsupported_completion_fields_rejected(fields: dict[str, object], param: str) -> None:
    from server.errors import ApiError

    request = CompletionRequest.model_validate({"prompt": "p", **fields})
    with pytest.raises(ApiError) as info:
        completion_sampling_params(request, {}, 4096)
    assert info.value.status == 400 and info.value.param == param


def test_completion_sampling_params() -> None:
    request = CompletionRequest.model_validate({"prompt": "p", "logprobs": 2, "max_tokens": 4})
    params = completion_sampling_params(request, {"temperature": 0.3}, 4096)
    assert params.logprobs == 2 and params.max_tokens == 4 and params.temperature == 0.3


# ---------------------------------------------------------------- engine errors → envelope


def test_engine_errors_map_to_status_and_envelope() -> None:
    context = from_engine_error(ContextLengthExceededError(512, 600, 10), "prompt")
    assert (context.status, context.code, context.param) == (400, "context_length_exceeded",
                                                             "prompt")
    assert "maximum context length is 512 tokens" in context.message
    assert "610 tokens (600 in the messages, 10 in the completion)" in context.message

    invalid = from_engine_error(InvalidRequestError("bad top_k", param="top_k"))
    assert (invalid.status, invalid.param) == (400, "top_k")

    full = from_engine_error(QueueFullError("full"))
    assert full.status == 429 and int(full.headers["Retry-After"]) >= 1

    dead = from_engine_error(EngineDeadError("gone"))
    assert dead.status == 503 and dead.error_type == "service_unavailable"

    failed = from_engine_error(RequestFailedError("nan"))
    assert failed.status == 500 and failed.error_type == "server_error"

    body = json.loads(bytes(full.to_response().body))
    ErrorResponse.model_validate(body)
    assert set(body["error"]) == {"message", "type", "param", "code"}


def test_api_key_compare_is_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    keys = (b"first-key", b"second-key")
    assert key_matches(b"second-key", keys)
    assert not key_matches(b"second-kez", keys)
    assert not key_matches(b"", keys)
    # every key is compared every time: no early exit on a match
    assert len(calls) == 6


# ---------------------------------------------------------------- response formatting


def _entry(*items: tuple[int, float, int, str]) -> dict[int, Logprob]:
    return {tid: Logprob(lp, rank, text) for tid, lp, rank, text in items}


def test_chat_logprobs_format_and_topk_order() -> None:
    # position 0: sampled token 7 ranked 2nd; position 1: sampled 9 ranked 1st; -inf clamped
    entries = [_entry((7, -1.5, 2, "b"), (3, -0.5, 1, "a"), (8, -3.0, 3, "c")),
               _entry((9, -0.1, 1, "é"), (4, -math.inf, 2, "z"))]
    result = chat_logprobs([7, 9], entries, 2, _Tokenizer())  # type: ignore[arg-type]
    payload = {"content": [item.model_dump() for item in result.content or []]}
    parsed = openai_chat.chat_completion.ChoiceLogprobs.model_validate(payload)
    first, second = parsed.content or []
    assert (first.token, first.logprob) == ("b", -1.5)
    assert [t.token for t in first.top_logprobs] == ["a", "b"]
    assert second.bytes == list("é".encode())
    assert [t.logprob for t in second.top_logprobs] == [-0.1, -9999.0]
    assert chat_logprobs([7], entries[:1], 0, _Tokenizer()).content[0].top_logprobs == []  # type: ignore[arg-type,index]


def test_completion_logprobs_offsets_continue_across_chunks() -> None:
    builder = CompletionLogprobBuilder(1, _Tokenizer())  # type: ignore[arg-type]
    first = builder.build([5, 6], [_entry((5, -1.0, 2, "ab"), (1, -0.2, 1, "x")),
                                   _entry((6, -0.3, 1, "cde"))])
    second = builder.build([2], [{2: Logprob(-0.4, 1, None)}])
    assert first.tokens == ["ab", "cde"] and first.text_offset == [0, 2]
    assert first.top_logprobs[0] == {"x": -0.2, "ab": -1.0}  # top-1 plus the sampled token
    assert second.tokens == ["<2>"] and second.text_offset == [5]


def _request_output(texts: list[str], finished: bool) -> RequestOutput:
    outputs = [CompletionOutput(index=i, token_ids=[0], text=t[-1:], num_tokens=len(t),
                                finish_reason="length" if finished else None)
               for i, t in enumerate(texts)]
    return RequestOutput("r", [1, 2, 3], outputs, finished, RequestTiming(arrival=0.0),
                         num_cached_tokens=2)


def test_usage_counter_adds_up() -> None:
    counter = UsageCounter()
    counter.update(0, _request_output(["ab", "c"], False))
    counter.update(0, _request_output(["abc", "cd"], True))
    counter.update(1, _request_output(["x"], True))
    usage = counter.usage()
    assert (usage.prompt_tokens, usage.completion_tokens) == (6, 6)
    assert usage.total_tokens == 12 and usage.prompt_tokens_details is not None
    assert usage.prompt_tokens_details.cached_tokens == 4


def test_stream_chunks_parse_as_openai_types() -> None:
    from server.streaming import ChatChunker, CompletionChunker, ResponseContext

    ctx = ResponseContext("chatcmpl-1", 123, "m")
    chat = ChatChunker(ctx, None, _Tokenizer())
    output = _request_output(["hi"], True)
    events = [*chat.start([output], 2, None), *chat.delta(1, output.outputs[0], None),
              *chat.finish(1, "length", None), chat.usage(UsageCounter().usage())]
    chunks = [openai_chat.ChatCompletionChunk.model_validate_json(e) for e in events]
    assert [c.choices[0].delta.role for c in chunks[:2]] == ["assistant", "assistant"]
    assert [c.choices[0].index for c in chunks[:4]] == [0, 1, 1, 1]
    assert chunks[2].choices[0].delta.content == "i" and chunks[2].choices[0].delta.role is None
    assert json.loads(events[3])["choices"][0]["delta"] == {}  # OpenAI's finish chunk shape
    assert chunks[3].choices[0].finish_reason == "length"
    assert chunks[4].choices == [] and chunks[4].usage is not None
    assert all(json.loads(e)["usage"] is None for e in events[:-1])
    assert {c.id for c in chunks} == {"chatcmpl-1"} and {c.created for c in chunks} == {123}

    legacy = CompletionChunker(ResponseContext("cmpl-1", 5, "m"), None, _Tokenizer(),
                               echo_texts=["p"])
    events = [*legacy.start([output], 1, None), *legacy.delta(0, output.outputs[0], None),
              *legacy.finish(0, "stop", None)]
    # the SDK's Completion type insists on a finish reason, which only the last chunk has
    final = openai_types.Completion.model_validate_json(events[-1])
    assert final.choices[0].finish_reason == "stop" and final.object == "text_completion"
    parsed = [json.loads(e) for e in events]
    assert [c["choices"][0]["text"] for c in parsed] == ["p", "i", ""]
    assert all(set(c) == set(parsed[-1]) for c in parsed)


def test_token_bytes_unescapes_partial_characters() -> None:
    from server.outputs import token_bytes

    raw = "日".encode()  # 3 bytes: e6 97 a5
    engine_style = "bytes:" + raw[:2].decode("utf-8", errors="backslashreplace")
    assert token_bytes(engine_style) == list(raw[:2])
    assert token_bytes("é!") == list("é!".encode())
