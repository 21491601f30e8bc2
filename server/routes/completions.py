"""POST /v1/completions: the legacy API; one or several prompts, as text or token ids."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence

from fastapi import APIRouter, Request
from fastapi.responses import Response
from transformers import PreTrainedTokenizerBase

from engine import CompletionOutput, EngineError, RequestOutput
from server.errors import from_engine_error
from server.outputs import (
    CompletionLogprobBuilder,
    UsageCounter,
    finish_reason,
    prompt_logprobs_json,
)
from server.protocol import (
    CompletionChoice,
    CompletionChunk,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
)
from server.routes import ERROR_RESPONSES, SSE_RESPONSE
from server.sampling import completion_sampling_params
from server.state import EngineDep, StateDep, arrival_time
from server.streaming import (
    CompletionChunker,
    OutputStream,
    ResponseContext,
    echo_logprobs,
    engine_request_id,
    respond,
    response_id,
    sse_events,
)
from server.tokenization import encode_prompt

logger = logging.getLogger(__name__)

router = APIRouter(tags=["openai"])


@router.post("/v1/completions", response_model=CompletionResponse,
             responses={**ERROR_RESPONSES, 200: SSE_RESPONSE(CompletionChunk)})
async def create_completion(body: CompletionRequest, request: Request, state: StateDep,
                            engine: EngineDep) -> Response:
    ctx = ResponseContext(response_id("cmpl", body.request_id), int(time.time()),
                          state.model_name_for(body.model))
    params = completion_sampling_params(body, engine.generation_defaults, engine.max_model_len)
    try:
        engine.check_capacity(params.n * len(body.prompts))  # before any tokenizing
        prompts = await asyncio.to_thread(
            tokenize_prompts, engine.tokenizer, body.prompts, engine.max_model_len,
            engine.check_prompt, body.add_special_tokens, params.truncate_prompt_tokens)
    except EngineError as exc:
        raise from_engine_error(exc, "prompt") from exc
    # one engine request per prompt; choice index = prompt_index * n + i, as OpenAI numbers them
    base_id = engine_request_id(ctx, body.request_id)
    request_ids = [base_id] if len(prompts) == 1 else [
        f"{base_id}-{index}" for index in range(len(prompts))]
    logger.info("%s: completion, %d prompt(s) of %s tokens, n=%d, max_tokens=%s, stream=%s",
                ctx.response_id, len(prompts), [len(p) for p in prompts], body.n,
                params.max_tokens, body.stream)
    echo_texts = _echo_texts(engine.tokenizer, body, prompts) if body.echo else None
    stream = OutputStream(engine, request_ids, prompts, params, arrival_time(request),
                          state.settings.request_timeout)
    chunker = CompletionChunker(ctx, params.logprobs, engine.tokenizer, echo_texts,
                                as_token_ids=body.return_tokens_as_token_ids,
                                return_token_ids=body.return_token_ids)
    events = (lambda: sse_events(stream, chunker, body.n, body.include_usage,
                                 body.continuous_usage, "prompt")) if body.stream else None
    return await respond(request, stream, "prompt", events, lambda finals: _response(
        ctx, finals, body, params.logprobs, echo_texts, engine.tokenizer))


def tokenize_prompts(tokenizer: PreTrainedTokenizerBase,
                     prompts: Sequence[str] | Sequence[list[int]], max_tokens: int,
                     check_token_ids: Callable[[list[int], int | None], list[int]],
                     add_special_tokens: bool = True,
                     keep_last: int | None = None) -> list[list[int]]:
    """Text prompts get the tokenizer's special tokens (e.g. BOS) unless add_special_tokens is
    off, and must fit `max_tokens`; token ids pass as given once `check_token_ids` (the
    engine's own admission check) accepts them: echo decodes them before the engine sees them.
    With `keep_last` (truncate_prompt_tokens) every prompt keeps only its last tokens."""
    encoded = []
    for prompt in prompts:
        if isinstance(prompt, str):
            encoded.append(encode_prompt(tokenizer, prompt, max_tokens, add_special_tokens,
                                         keep_last))
        else:
            encoded.append(check_token_ids(prompt, keep_last))
    return encoded


def _echo_texts(tokenizer: PreTrainedTokenizerBase, body: CompletionRequest,
                prompts: list[list[int]]) -> list[str]:
    """Per choice, the prompt as text: the string sent, or the decoded token ids (and the
    decoded tokens kept, when the prompt was truncated)."""
    truncated = body.truncate_prompt_tokens is not None
    texts = [prompt if isinstance(prompt, str) and not truncated else str(tokenizer.decode(ids))
             for prompt, ids in zip(body.prompts, prompts, strict=True)]
    return [text for text in texts for _ in range(body.n)]


def _response(ctx: ResponseContext, finals: list[RequestOutput], body: CompletionRequest,
              logprobs: int | None, echo_texts: list[str] | None,
              tokenizer: PreTrainedTokenizerBase) -> CompletionResponse:
    counter = UsageCounter()
    choices = []
    for prompt_index, final in enumerate(finals):
        counter.update(prompt_index, final)
        prompt_logprobs = None
        if body.prompt_logprobs is not None and final.prompt_logprobs is not None:
            prompt_logprobs = prompt_logprobs_json(final.prompt_logprobs, tokenizer,
                                                   body.return_tokens_as_token_ids)
        for choice in final.outputs:
            index = prompt_index * body.n + choice.index
            choices.append(CompletionChoice(
                index=index, text=(echo_texts[index] if echo_texts else "") + choice.text,
                logprobs=_choice_logprobs(final, choice, logprobs, echo_texts is not None,
                                          tokenizer, body.return_tokens_as_token_ids),
                finish_reason=finish_reason(choice), prompt_logprobs=prompt_logprobs,
                prompt_token_ids=final.prompt_token_ids if body.return_token_ids else None,
                token_ids=list(choice.token_ids) if body.return_token_ids else None))
    return CompletionResponse(id=ctx.response_id, created=ctx.created, model=ctx.model,
                              choices=choices, usage=counter.usage())


def _choice_logprobs(final: RequestOutput, choice: CompletionOutput, logprobs: int | None,
                     echo: bool, tokenizer: PreTrainedTokenizerBase,
                     as_token_ids: bool) -> CompletionLogprobs | None:
    """Legacy logprobs of one choice: the echoed prompt's tokens first (the first one null),
    then the completion's, with one running text offset."""
    if logprobs is None or choice.logprobs is None:
        return None
    builder = CompletionLogprobBuilder(logprobs, tokenizer, as_token_ids)
    result = builder.build(final.prompt_token_ids, echo_logprobs(final)) if echo else None
    return builder.build(choice.token_ids, choice.logprobs, result)
