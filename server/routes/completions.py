"""POST /v1/completions: the legacy API; one or several prompts, as text or token ids."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable, Sequence

from fastapi import APIRouter, Request
from fastapi.responses import Response
from transformers import PreTrainedTokenizerBase

from engine import EngineError, RequestOutput
from server.errors import from_engine_error
from server.outputs import CompletionLogprobBuilder, UsageCounter, finish_reason
from server.protocol import CompletionChoice, CompletionChunk, CompletionRequest, CompletionResponse
from server.routes import ERROR_RESPONSES, SSE_RESPONSE
from server.sampling import completion_sampling_params
from server.state import EngineDep, StateDep, arrival_time
from server.streaming import (
    CompletionChunker,
    OutputStream,
    ResponseContext,
    respond,
    sse_events,
)
from server.tokenization import encode_prompt

logger = logging.getLogger(__name__)

router = APIRouter(tags=["openai"])


@router.post("/v1/completions", response_model=CompletionResponse,
             responses={**ERROR_RESPONSES, 200: SSE_RESPONSE(CompletionChunk)})
async def create_completion(body: CompletionRequest, request: Request, state: StateDep,
                            engine: EngineDep) -> Response:
    ctx = ResponseContext(f"cmpl-{uuid.uuid4().hex}", int(time.time()),
                          state.model_name_for(body.model))
    params = completion_sampling_params(body, engine.generation_defaults)
    try:
        engine.check_capacity(params.n * len(body.prompts))  # before any tokenizing
        prompts = await asyncio.to_thread(tokenize_prompts, engine.tokenizer, body.prompts,
                                          engine.max_model_len, engine.check_prompt)
    except EngineError as exc:
        raise from_engine_error(exc, "prompt") from exc
    # one engine request per prompt; choice index = prompt_index * n + i, as OpenAI numbers them
    request_ids = [ctx.response_id] if len(prompts) == 1 else [
        f"{ctx.response_id}-{index}" for index in range(len(prompts))]
    logger.info("%s: completion, %d prompt(s) of %s tokens, n=%d, max_tokens=%s, stream=%s",
                ctx.response_id, len(prompts), [len(p) for p in prompts], body.n,
                params.max_tokens, body.stream)
    echo_texts = _echo_texts(engine.tokenizer, body, prompts) if body.echo else None
    stream = OutputStream(engine, request_ids, prompts, params, arrival_time(request),
                          state.settings.request_timeout)
    chunker = CompletionChunker(ctx, params.logprobs, engine.tokenizer, echo_texts)
    events = (lambda: sse_events(stream, chunker, body.n, len(prompts), body.include_usage,
                                 "prompt")) if body.stream else None
    return await respond(request, stream, "prompt", events, lambda finals: _response(
        ctx, finals, body.n, params.logprobs, echo_texts, engine.tokenizer))


def tokenize_prompts(tokenizer: PreTrainedTokenizerBase,
                     prompts: Sequence[str] | Sequence[list[int]], max_tokens: int,
                     check_token_ids: Callable[[list[int]], list[int]]) -> list[list[int]]:
    """Text prompts get the tokenizer's special tokens (e.g. BOS) and must fit `max_tokens`;
    token ids pass as given once `check_token_ids` (the engine's own admission check) accepts
    them: echo decodes them before the engine sees them."""
    return [encode_prompt(tokenizer, prompt, max_tokens) if isinstance(prompt, str)
            else check_token_ids(prompt) for prompt in prompts]


def _echo_texts(tokenizer: PreTrainedTokenizerBase, body: CompletionRequest,
                prompts: list[list[int]]) -> list[str]:
    """Per choice, the prompt as text: the string sent, or the decoded token ids."""
    texts = [prompt if isinstance(prompt, str) else str(tokenizer.decode(ids))
             for prompt, ids in zip(body.prompts, prompts, strict=True)]
    return [text for text in texts for _ in range(body.n)]


def _response(ctx: ResponseContext, finals: list[RequestOutput], n: int, logprobs: int | None,
              echo_texts: list[str] | None,
              tokenizer: PreTrainedTokenizerBase) -> CompletionResponse:
    counter = UsageCounter()
    choices = []
    for prompt_index, final in enumerate(finals):
        counter.update(prompt_index, final)
        for choice in final.outputs:
            index = prompt_index * n + choice.index
            choice_logprobs = None
            if logprobs is not None and choice.logprobs is not None:
                builder = CompletionLogprobBuilder(logprobs, tokenizer)
                choice_logprobs = builder.build(choice.token_ids, choice.logprobs)
            prefix = echo_texts[index] if echo_texts else ""
            choices.append(CompletionChoice(
                index=index, text=prefix + choice.text, logprobs=choice_logprobs,
                finish_reason=finish_reason(choice)))
    return CompletionResponse(id=ctx.response_id, created=ctx.created, model=ctx.model,
                              choices=choices, usage=counter.usage())
