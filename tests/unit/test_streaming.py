"""server/streaming.py over the fake-runner AsyncEngine: sse_events in the OpenAI order (role
chunks, content, finish, usage, [DONE]), an engine failure mid-stream as one error event then
[DONE], several prompts merged, admission errors and timeouts raised by start() before any
event, and a client that leaves aborting its requests."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence

import pytest
from prometheus_client import CollectorRegistry

from engine import AsyncEngine, InvalidRequestError, SamplingParams
from engine.outputs import RequestOutputKind
from server.errors import ApiError
from server.streaming import (
    ChatChunker,
    Chunker,
    CompletionChunker,
    OutputStream,
    ResponseContext,
    sse_events,
)
from tests.fake_runner import (
    all_blocks_free,
    fake_async_engine,
    greedy_tokens,
    running,
    tokenizer,
    until,
)
from tests.tiny_models import VOCAB_SIZE

CTX = ResponseContext("resp-1", 1_700_000_000, "fake")
PROMPT = [30, 41, 52, 63, 74, 85]
POISON = [7, 7, 7, 7]
Chunk = dict[str, object]


def _params(max_tokens: int, n: int = 1) -> SamplingParams:
    return SamplingParams(n=n, temperature=0.0, max_tokens=max_tokens, ignore_eos=True,
                          output_kind=RequestOutputKind.DELTA)


def _text(prompt: Sequence[int], max_tokens: int) -> str:
    return str(tokenizer().decode(greedy_tokens(prompt, max_tokens), skip_special_tokens=True,
                                  clean_up_tokenization_spaces=False))


def _stream(engine: AsyncEngine, prompts: list[list[int]], params: SamplingParams,
            timeout_s: float | None = None) -> OutputStream:
    request_ids = ["req"] if len(prompts) == 1 else [f"req-{i}" for i in range(len(prompts))]
    return OutputStream(engine, request_ids, prompts, params, None, timeout_s)


async def _events(stream: OutputStream, chunker: Chunker, n: int, num_prompts: int,
                  include_usage: bool = True, continuous_usage: bool = False) -> list[str]:
    await stream.start()
    assert len(stream.first_outputs) == num_prompts
    return [event async for event in sse_events(stream, chunker, n, include_usage,
                                                continuous_usage, "messages")]


def _chunks(events: list[str]) -> list[Chunk]:
    assert events[-1] == "[DONE]" and events.count("[DONE]") == 1
    return [json.loads(event) for event in events[:-1]]


def _kind(chunk: Chunk) -> str:
    """role, content, finish or usage: what one chunk is for."""
    choices = chunk["choices"]
    assert isinstance(choices, list)
    if not choices:
        return "usage"
    [choice] = choices  # every chunk speaks for one choice
    if choice["finish_reason"] is not None:
        return "finish"
    return "role" if choice.get("delta", {}).get("role") else "content"


def _index(chunk: Chunk) -> int:
    [choice] = chunk["choices"]  # type: ignore[misc]
    return int(choice["index"])


# ---- the OpenAI order -----------------------------------------------------------------------


def test_chat_events_come_in_the_openai_order() -> None:
    engine, runner = fake_async_engine()
    n, max_tokens = 2, 5

    async def run() -> list[str]:
        async with running(engine, runner):
            return await _events(_stream(engine, [PROMPT], _params(max_tokens, n)),
                                 ChatChunker(CTX, None, tokenizer()), n, 1)

    chunks = _chunks(asyncio.run(run()))
    kinds = [_kind(chunk) for chunk in chunks]
    assert kinds[:n] == ["role"] * n and kinds[-1] == "usage"
    assert [_index(c) for c in chunks[:n]] == [0, 1]
    assert all(c["choices"][0]["delta"] == {"role": "assistant", "content": ""}  # type: ignore[index]
               for c in chunks[:n])
    for index in range(n):
        own = [(kind, c) for kind, c in zip(kinds, chunks, strict=True)
               if kind in ("content", "finish") and _index(c) == index]
        assert [kind for kind, _ in own][-1] == "finish"  # after every content chunk
        assert [kind for kind, _ in own].count("finish") == 1
        assert len(own) == max_tokens + 1  # every token adds text: one content chunk each
        text = "".join(c["choices"][0]["delta"]["content"]  # type: ignore[index]
                       for kind, c in own if kind == "content")
        assert text == _text(PROMPT, max_tokens)
        assert own[-1][1]["choices"][0]["finish_reason"] == "length"  # type: ignore[index]
    assert chunks[-1]["usage"] == {"prompt_tokens": len(PROMPT),
                                   "completion_tokens": n * max_tokens,
                                   "total_tokens": len(PROMPT) + n * max_tokens,
                                   "prompt_tokens_details": {"cached_tokens": 0}}
    assert {c["id"] for c in chunks} == {CTX.response_id}
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}


def test_no_usage_chunk_unless_asked() -> None:
    engine, runner = fake_async_engine()

    async def run() -> list[str]:
        async with running(engine, runner):
            return await _events(_stream(engine, [PROMPT], _params(3)),
                                 ChatChunker(CTX, None, tokenizer()), 1, 1,
                                 include_usage=False)

    kinds = [_kind(chunk) for chunk in _chunks(asyncio.run(run()))]
    assert kinds[0] == "role" and kinds[-1] == "finish" and "usage" not in kinds


def test_several_prompts_merge_into_one_stream() -> None:
    engine, runner = fake_async_engine()
    prompts = [PROMPT, [60, 61, 62], [90, 91, 92, 93, 94]]
    max_tokens = 4

    async def run() -> list[str]:
        async with running(engine, runner):
            return await _events(_stream(engine, prompts, _params(max_tokens)),
                                 CompletionChunker(CTX, None, tokenizer(), None),
                                 1, len(prompts))

    chunks = _chunks(asyncio.run(run()))
    assert _kind(chunks[-1]) == "usage"
    for index, prompt in enumerate(prompts):  # choice index = prompt index when n == 1
        own = [c for c in chunks[:-1] if _index(c) == index]
        assert "".join(c["choices"][0]["text"] for c in own) == _text(prompt, max_tokens)  # type: ignore[index]
        assert [_kind(c) for c in own][-1] == "finish"
        assert [_kind(c) for c in own].count("finish") == 1
    usage = chunks[-1]["usage"]
    assert isinstance(usage, dict)
    assert usage["prompt_tokens"] == sum(len(p) for p in prompts)
    assert usage["completion_tokens"] == max_tokens * len(prompts)
    assert all_blocks_free(engine)


# ---- errors ---------------------------------------------------------------------------------


def test_an_engine_failure_mid_stream_is_one_error_event_then_done() -> None:
    engine, runner = fake_async_engine()
    runner.fail_when = lambda r: (r.prompt_token_ids[:len(POISON)] == POISON
                                  and r.num_output_tokens >= 3)

    async def run() -> list[str]:
        async with running(engine, runner):
            events = await _events(_stream(engine, [POISON + PROMPT], _params(20)),
                                   ChatChunker(CTX, None, tokenizer()), 1, 1)
            await until(lambda: all_blocks_free(engine), "the failed request's blocks")
            return events

    events = asyncio.run(run())
    chunks = _chunks(events)
    error = chunks[-1]["error"]
    assert isinstance(error, dict) and set(error) == {"message", "type", "param", "code"}
    assert error["code"] == "request_failed" and "fake pass failed" in error["message"]
    kinds = [_kind(chunk) for chunk in chunks[:-1]]
    # the three tokens before the failing pass were sent; no finish, no usage
    assert kinds == ["role", "content", "content", "content"]


def test_admission_errors_raise_from_start_before_any_event() -> None:
    engine, runner = fake_async_engine()

    async def run() -> None:
        async with running(engine, runner):
            stream = _stream(engine, [PROMPT, [VOCAB_SIZE + 5]], _params(50))
            with pytest.raises(InvalidRequestError, match="prompt token ids"):
                await stream.start()
            # the valid prompt's request was admitted, then aborted by start()
            await until(lambda: engine.llm_engine.stats().num_unfinished_requests == 0,
                         "the admitted prompt aborted")
            await until(lambda: all_blocks_free(engine), "its blocks free")

    asyncio.run(run())


def test_a_deadline_before_the_first_output_is_a_504_from_start() -> None:
    engine, runner = fake_async_engine()
    runner.hold()  # no pass completes: only the timeout can end the request

    async def run() -> None:
        async with running(engine, runner):
            stream = _stream(engine, [PROMPT], _params(5), timeout_s=0.05)
            with pytest.raises(ApiError) as excinfo:
                await stream.start()
            assert (excinfo.value.status, excinfo.value.code) == (504, "request_timeout")
            runner.release_hold()
            await until(lambda: all_blocks_free(engine), "the timed-out request's blocks")

    asyncio.run(run())


def test_a_client_that_leaves_aborts_its_requests() -> None:
    registry = CollectorRegistry()
    engine, runner = fake_async_engine(registry)
    runner.hold(after_passes=1)  # a first token, then nothing until the client has left

    async def run() -> None:
        async with running(engine, runner):
            stream = _stream(engine, [PROMPT], _params(100))
            await stream.start()
            events = sse_events(stream, ChatChunker(CTX, None, tokenizer()), 1, True, False,
                                "messages")
            assert _kind(json.loads(await anext(events))) == "role"
            assert _kind(json.loads(await anext(events))) == "content"
            await events.aclose()  # type: ignore[attr-defined]  # the client went away
            runner.release_hold()
            await until(lambda: engine.llm_engine.stats().num_unfinished_requests == 0,
                         "the request aborted")
            await until(lambda: all_blocks_free(engine), "its blocks free")

    asyncio.run(run())
    aborted = registry.get_sample_value("pagedserve_request_failure_total",
                                        {"model_name": "fake", "reason": "abort"})
    assert aborted == 1  # aborted, not run to its 100 tokens
