"""RequestOutput streams → SSE events in the OpenAI order, and the plumbing around them:
merging one HTTP request's engine streams, aborting them when the client goes away."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, TypeVar

import anyio
from fastapi import Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel
from sse_starlette import EventSourceResponse
from starlette.background import BackgroundTask
from starlette.types import Receive
from transformers import PreTrainedTokenizerBase

from engine import CompletionOutput, EngineError, RequestOutput, SamplingParams
from server.errors import (
    ApiError,
    ClientDisconnectedError,
    from_engine_error,
    internal_error,
    request_timed_out,
)
from server.message_parsing import DeltaParts, MessageStreamer, OutputParsers
from server.outputs import (
    CompletionLogprobBuilder,
    TokenLogprobs,
    UsageCounter,
    chat_logprobs,
    finish_reason,
)
from server.protocol import (
    ChatChunkChoice,
    ChatCompletionChunk,
    CompletionChoice,
    CompletionChunk,
    DeltaMessage,
    ErrorResponse,
    Usage,
)

if TYPE_CHECKING:
    from engine import AsyncEngine

logger = logging.getLogger(__name__)

T = TypeVar("T")
SSE_PING_SECONDS = 15  # keeps idle proxies from closing slow streams
CLEANUP_TIMEOUT_S = 2.0
# Characters that str.splitlines() (and so httpx's aiter_lines and many SSE readers built on
# it) treats as line ends but JSON leaves raw; escaped, a data line stays one line everywhere.
_LINE_BREAKING = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


class OutputStream:
    """The engine streams of one HTTP request (one per prompt).

    `start()` waits for every prompt's first output, so admission errors (bad params, context
    too long, queue full) surface as exceptions before any response byte is sent. Iterating
    yields (prompt_index, RequestOutput): one prompt's stream directly, several merged as
    their outputs come. `aclose()` aborts whatever has not finished; it is the one cleanup,
    idempotent, whoever calls it first. With `timeout_s`, requests still running that long
    after arrival fail with a 504 ApiError.
    """

    def __init__(self, engine: AsyncEngine, request_ids: Sequence[str],
                 prompts: Sequence[list[int]], params: SamplingParams,
                 arrival_time: float | None, timeout_s: float | None = None) -> None:
        self.engine = engine
        self.request_ids = list(request_ids)
        self.timeout_s = timeout_s
        deadline = None
        if timeout_s is not None:
            deadline = (time.monotonic() if arrival_time is None else arrival_time) + timeout_s
        self._generators = [engine.generate(rid, ids, params, arrival_time, deadline)
                            for rid, ids in zip(request_ids, prompts, strict=True)]
        self._first: list[RequestOutput] = []
        self._unfinished = set(range(len(self._generators)))
        self._pumps: list[asyncio.Task[None]] = []
        self._closed = False

    async def start(self) -> None:
        firsts = await asyncio.gather(*(anext(gen) for gen in self._generators),
                                      return_exceptions=True)
        errors = [item for item in firsts if isinstance(item, BaseException)]
        if errors:
            await self.aclose()
            raise self._converted(errors[0])
        self._first = [item for item in firsts if isinstance(item, RequestOutput)]

    @property
    def first_outputs(self) -> list[RequestOutput]:
        """Each prompt's first output (after start())."""
        return self._first

    async def __aiter__(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        try:
            for index, output in enumerate(self._first):
                self._mark(index, output)
                yield index, output
            outputs = self._merged() if len(self._generators) > 1 else self._single()
            async for index, output in outputs:
                self._mark(index, output)
                yield index, output
        except TimeoutError as exc:
            raise self._converted(exc) from exc

    async def _single(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        if self._unfinished:
            async for output in self._generators[0]:
                yield 0, output

    async def _merged(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Several prompts' outputs in arrival order: a task per unfinished stream feeds one
        queue; the first exception ends the merge."""
        queue: asyncio.Queue[tuple[int, RequestOutput | BaseException | None]] = asyncio.Queue()

        async def pump(index: int) -> None:
            try:
                async for output in self._generators[index]:
                    queue.put_nowait((index, output))
            except Exception as exc:
                queue.put_nowait((index, exc))
            queue.put_nowait((index, None))  # this stream is done

        self._pumps = [asyncio.create_task(pump(i)) for i in sorted(self._unfinished)]
        num_open = len(self._pumps)
        while num_open:
            index, item = await queue.get()
            if item is None:
                num_open -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item

    def _converted(self, error: BaseException) -> BaseException:
        """The engine's TimeoutError (a passed deadline) as the 504 the client gets."""
        if isinstance(error, TimeoutError) and self.timeout_s is not None:
            return request_timed_out(self.timeout_s)
        return error

    def _mark(self, index: int, output: RequestOutput) -> None:
        if output.finished:
            self._unfinished.discard(index)

    async def aclose(self) -> None:
        """Abort unfinished requests now (sync, so it holds even when cancelled), then let the
        engine generators and pump tasks wind down."""
        if self._closed:
            return
        self._closed = True
        for index in sorted(self._unfinished):
            self.engine.abort(self.request_ids[index])
        for pump in self._pumps:
            pump.cancel()
        with anyio.move_on_after(CLEANUP_TIMEOUT_S, shield=True):
            await asyncio.gather(*self._pumps, return_exceptions=True)
            for generator in self._generators:
                with contextlib.suppress(Exception):
                    await generator.aclose()  # type: ignore[attr-defined]


async def collect(stream: OutputStream, num_prompts: int) -> list[RequestOutput]:
    """Run a non-streaming request to the end; the final output per prompt."""
    finals: dict[int, RequestOutput] = {}
    async for index, output in stream:
        finals[index] = output
    return [finals[index] for index in range(num_prompts)]


async def respond(request: Request, stream: OutputStream, prompt_param: str,
                  stream_events: Callable[[], AsyncIterator[str]] | None,
                  build_body: Callable[[list[RequestOutput]], BaseModel]) -> Response:
    """The generation routes' one path: admit every prompt (errors before any byte, naming
    `prompt_param`), then either stream `stream_events()` as SSE or collect the final
    outputs into `build_body`'s JSON. A client that leaves aborts the requests."""
    try:
        await until_disconnected(request.receive, stream.start())
        if stream_events is not None:
            return sse_response(stream_events(), stream)
        finals = await until_disconnected(request.receive,
                                          collect(stream, len(stream.request_ids)))
    except EngineError as exc:
        raise from_engine_error(exc, prompt_param) from exc
    finally:
        if stream_events is None:
            await stream.aclose()
    return JSONResponse(build_body(finals).model_dump())


async def until_disconnected(receive: Receive, awaitable: Awaitable[T]) -> T:
    """Await `awaitable` unless the client disconnects first: then cancel it and raise
    ClientDisconnectedError. Call only after the request body has been read."""
    work = asyncio.ensure_future(awaitable)
    watcher = asyncio.ensure_future(_wait_for_disconnect(receive))
    try:
        await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not work.done():
            work.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await work
    if work.cancelled():
        raise ClientDisconnectedError()
    return work.result()


async def _wait_for_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        await asyncio.sleep(0.05)  # a stray body message: don't spin


# ---------------------------------------------------------------- chunk formatting


@dataclass(slots=True)
class ResponseContext:
    """What every chunk of one response shares."""

    response_id: str
    created: int
    model: str


def response_id(prefix: str, client_id: str | None) -> str:
    """`chatcmpl-<id>`: the client's request_id (vLLM's field) when given, else a fresh one."""
    return f"{prefix}-{client_id or uuid.uuid4().hex}"


def engine_request_id(ctx: ResponseContext, client_id: str | None) -> str:
    """The engine's id for a response: unique even when clients reuse a request_id."""
    return f"{ctx.response_id}-{uuid.uuid4().hex[:8]}" if client_id else ctx.response_id


class Chunker(Protocol):
    def start(self, firsts: Sequence[RequestOutput], n: int, usage: Usage | None) -> list[str]:
        ...

    def delta(self, index: int, choice: CompletionOutput, usage: Usage | None) -> list[str]: ...

    def finish(self, index: int, reason: str, usage: Usage | None) -> list[str]: ...

    def usage(self, usage: Usage) -> str: ...


@dataclass(slots=True)
class ChatChunker:
    ctx: ResponseContext
    top_logprobs: int | None  # None: no logprobs
    tokenizer: PreTrainedTokenizerBase
    as_token_ids: bool = False  # return_tokens_as_token_ids
    return_token_ids: bool = False
    echo_text: str | None = None  # chat echo: the last (assistant) message, sent first
    parsers: OutputParsers = field(default_factory=OutputParsers)  # reasoning, tool calls
    _streamers: dict[int, MessageStreamer] = field(default_factory=dict)

    def _chunk(self, choices: list[ChatChunkChoice], usage: Usage | None = None,
               prompt_token_ids: list[int] | None = None) -> str:
        chunk = ChatCompletionChunk(id=self.ctx.response_id, created=self.ctx.created,
                                    model=self.ctx.model, choices=choices, usage=usage,
                                    prompt_token_ids=prompt_token_ids)
        return event_json(chunk)

    def start(self, firsts: Sequence[RequestOutput], n: int, usage: Usage | None) -> list[str]:
        prompt_ids = firsts[0].prompt_token_ids if self.return_token_ids else None
        events = [self._chunk([ChatChunkChoice(index=i, delta=DeltaMessage(role="assistant",
                                                                           content=""))],
                              usage, prompt_ids)
                  for i in range(n)]
        if self.echo_text:
            events += [self._chunk([ChatChunkChoice(
                index=i, delta=DeltaMessage(content=self.echo_text))], usage) for i in range(n)]
        return events

    def delta(self, index: int, choice: CompletionOutput, usage: Usage | None) -> list[str]:
        logprobs = None
        if self.top_logprobs is not None and choice.logprobs:
            logprobs = chat_logprobs(choice.token_ids, choice.logprobs, self.top_logprobs,
                                     self.tokenizer, self.as_token_ids)
        delta = DeltaMessage(content=choice.text)
        if self.parsers.is_active:
            parts = self._streamer(index).feed(choice.text)
            if parts.is_empty and logprobs is None and not self.return_token_ids:
                return []  # held back: it may be the start of a tool call or a tag
            delta = _delta_message(parts)
        return [self._chunk([ChatChunkChoice(
            index=index, delta=delta, logprobs=logprobs,
            token_ids=list(choice.token_ids) if self.return_token_ids else None)], usage)]

    def finish(self, index: int, reason: str, usage: Usage | None) -> list[str]:
        events = []
        if self.parsers.is_active:
            streamer = self._streamer(index)
            parts = streamer.finish()
            if not parts.is_empty:
                events.append(self._chunk([ChatChunkChoice(index=index,
                                                           delta=_delta_message(parts))], usage))
            if streamer.num_calls and reason == "stop":
                reason = "tool_calls"
        events.append(self._chunk([ChatChunkChoice(
            index=index, delta=DeltaMessage(),
            finish_reason=reason)], usage))  # type: ignore[arg-type]
        return events

    def _streamer(self, index: int) -> MessageStreamer:
        streamer = self._streamers.get(index)
        if streamer is None:
            streamer = self._streamers[index] = self.parsers.streamer()
        return streamer

    def usage(self, usage: Usage) -> str:
        return self._chunk([], usage=usage)


@dataclass(slots=True)
class CompletionChunker:
    ctx: ResponseContext
    logprobs: int | None
    tokenizer: PreTrainedTokenizerBase
    echo_texts: list[str] | None  # per choice: the prompt text to send first
    as_token_ids: bool = False
    return_token_ids: bool = False
    _builders: dict[int, CompletionLogprobBuilder] = field(default_factory=dict)

    def _chunk(self, choices: list[CompletionChoice], usage: Usage | None = None) -> str:
        chunk = CompletionChunk(id=self.ctx.response_id, created=self.ctx.created,
                                model=self.ctx.model, choices=choices, usage=usage)
        return event_json(chunk)

    def _builder(self, index: int) -> CompletionLogprobBuilder:
        assert self.logprobs is not None
        return self._builders.setdefault(index, CompletionLogprobBuilder(
            self.logprobs, self.tokenizer, self.as_token_ids))

    def start(self, firsts: Sequence[RequestOutput], n: int, usage: Usage | None) -> list[str]:
        """Per choice, the echoed prompt (with its logprobs when asked) and, with
        return_token_ids, the prompt's token ids: before any completion text."""
        if not self.echo_texts and not self.return_token_ids:
            return []
        events = []
        for prompt_index, first in enumerate(firsts):
            for index in range(prompt_index * n, (prompt_index + 1) * n):
                text = self.echo_texts[index] if self.echo_texts else ""
                logprobs = None
                if self.echo_texts and self.logprobs is not None:
                    logprobs = self._builder(index).build(first.prompt_token_ids,
                                                          echo_logprobs(first))
                events.append(self._chunk([CompletionChoice(
                    index=index, text=text, logprobs=logprobs,
                    prompt_token_ids=first.prompt_token_ids if self.return_token_ids else None)],
                    usage))
        return events

    def delta(self, index: int, choice: CompletionOutput, usage: Usage | None) -> list[str]:
        logprobs = None
        if self.logprobs is not None and choice.logprobs:
            logprobs = self._builder(index).build(choice.token_ids, choice.logprobs)
        return [self._chunk([CompletionChoice(
            index=index, text=choice.text, logprobs=logprobs,
            token_ids=list(choice.token_ids) if self.return_token_ids else None)], usage)]

    def finish(self, index: int, reason: str, usage: Usage | None) -> list[str]:
        return [self._chunk([CompletionChoice(index=index, text="",
                                              finish_reason=reason)],  # type: ignore[arg-type]
                            usage)]

    def usage(self, usage: Usage) -> str:
        return self._chunk([], usage=usage)


def echo_logprobs(output: RequestOutput) -> list[TokenLogprobs | None]:
    """The echoed prompt's logprob entries: the engine's prompt logprobs (the first None)."""
    entries = output.prompt_logprobs
    assert entries is not None, "echo with logprobs asks the engine for prompt logprobs"
    return list(entries)


def _step_events(chunker: Chunker, n: int, prompt_index: int, output: RequestOutput,
                 finished: set[int], usage: Usage | None) -> Iterator[str]:
    for choice in output.outputs:
        index = prompt_index * n + choice.index
        if index in finished:
            continue
        if choice.text or choice.logprobs:  # a delta: this step's part only
            yield from chunker.delta(index, choice, usage)
        if choice.finish_reason is not None:
            finished.add(index)
            yield from chunker.finish(index, finish_reason(choice), usage)


async def sse_events(stream: OutputStream, chunker: Chunker, n: int, include_usage: bool,
                     continuous_usage: bool, prompt_param: str) -> AsyncIterator[str]:
    """Start chunks (role, echo), deltas, finish chunks, the usage chunk, then [DONE]; with
    continuous_usage every chunk carries the usage so far. A failure after the start is one
    error event and then [DONE]. Closing the iterator aborts the requests."""
    counter = UsageCounter()
    finished: set[int] = set()
    try:
        firsts = stream.first_outputs
        for prompt_index, first in enumerate(firsts):
            counter.add_prompt(prompt_index, first)
        for event in chunker.start(firsts, n, counter.usage() if continuous_usage else None):
            yield event
        async for prompt_index, output in stream:
            counter.update(prompt_index, output)
            usage = counter.usage() if continuous_usage else None
            for event in _step_events(chunker, n, prompt_index, output, finished, usage):
                yield event
        if include_usage:
            yield chunker.usage(counter.usage())
    except EngineError as exc:
        logger.warning("%s failed mid-stream: %s", stream.request_ids[0], exc)
        yield error_event(from_engine_error(exc, prompt_param))
    except ApiError as exc:  # a timeout, a shutdown
        logger.warning("%s failed mid-stream: %s", stream.request_ids[0], exc.message)
        yield error_event(exc)
    except Exception:
        logger.exception("%s failed mid-stream", stream.request_ids[0])
        yield error_event(internal_error())
    finally:
        await stream.aclose()
    yield "[DONE]"


def _delta_message(parts: DeltaParts) -> DeltaMessage:
    return DeltaMessage(content=parts.content or None, reasoning_content=parts.reasoning or None,
                        tool_calls=parts.tool_calls or None)


def event_json(payload: BaseModel) -> str:
    """One SSE data payload: compact JSON on a single line for every line splitter. JSON escapes
    CR and LF itself; the three other Unicode line breaks only occur inside strings, where the
    escape decodes to the same text."""
    return payload.model_dump_json().translate(_LINE_BREAKING)


def error_event(error: ApiError) -> str:
    return event_json(ErrorResponse(error=error.to_detail()))


def sse_response(events: AsyncIterator[str], stream: OutputStream) -> EventSourceResponse:
    # the background close covers a client that leaves before the first event is pulled
    return EventSourceResponse(events, sep="\n", ping=SSE_PING_SECONDS,
                               background=BackgroundTask(stream.aclose))
