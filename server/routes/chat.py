"""POST /v1/chat/completions: messages → chat template → engine → JSON or SSE."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid

from fastapi import APIRouter, Request
from fastapi.responses import Response

from engine import AsyncEngine, EngineError, RequestOutput
from server.chat_template import apply_chat_template
from server.errors import from_engine_error
from server.outputs import UsageCounter, chat_logprobs, finish_reason
from server.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
)
from server.routes import ERROR_RESPONSES, SSE_RESPONSE
from server.sampling import chat_sampling_params
from server.state import EngineDep, StateDep, arrival_time
from server.streaming import (
    ChatChunker,
    OutputStream,
    ResponseContext,
    respond,
    sse_events,
)

logger = logging.getLogger(__name__)

router = APIRouter(tags=["openai"])


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse,
             responses={**ERROR_RESPONSES, 200: SSE_RESPONSE(ChatCompletionChunk)})
async def create_chat_completion(body: ChatCompletionRequest, request: Request,
                                 state: StateDep, engine: EngineDep) -> Response:
    ctx = ResponseContext(f"chatcmpl-{uuid.uuid4().hex}", int(time.time()),
                          state.model_name_for(body.model))
    params = chat_sampling_params(body, engine.generation_defaults)
    try:
        prompt_ids = await asyncio.to_thread(
            apply_chat_template, engine.tokenizer, body.messages, engine.max_model_len,
            body.add_generation_prompt, body.chat_template_kwargs)
    except EngineError as exc:
        raise from_engine_error(exc, "messages") from exc
    logger.info("%s: chat, %d prompt tokens, n=%d, max_tokens=%s, stream=%s", ctx.response_id,
                len(prompt_ids), body.n, params.max_tokens, body.stream)
    stream = OutputStream(engine, [ctx.response_id], [prompt_ids], params,
                          arrival_time(request), state.settings.request_timeout)
    chunker = ChatChunker(ctx, params.logprobs, engine.tokenizer)
    events = (lambda: sse_events(stream, chunker, body.n, 1, body.include_usage, "messages")
              ) if body.stream else None
    return await respond(request, stream, "messages", events,
                         lambda finals: _response(ctx, finals[0], params.logprobs, engine))


def _response(ctx: ResponseContext, final: RequestOutput, top_logprobs: int | None,
              engine: AsyncEngine) -> ChatCompletionResponse:
    counter = UsageCounter()
    counter.update(0, final)
    choices = []
    for choice in final.outputs:
        logprobs = None
        if top_logprobs is not None and choice.logprobs is not None:
            logprobs = chat_logprobs(choice.token_ids, choice.logprobs, top_logprobs,
                                     engine.tokenizer)
        choices.append(ChatChoice(index=choice.index,
                                  message=AssistantMessage(content=choice.text),
                                  logprobs=logprobs,
                                  finish_reason=finish_reason(choice)))
    return ChatCompletionResponse(id=ctx.response_id, created=ctx.created, model=ctx.model,
                                  choices=choices, usage=counter.usage())
