"""POST /v1/chat/completions: messages → chat template → engine → JSON or SSE."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time

from fastapi import APIRouter, Request
from fastapi.responses import Response

from engine import AsyncEngine, EngineError, RequestOutput, SamplingParams
from server.chat_template import TemplateOptions, apply_chat_template, check_request_template
from server.errors import ApiError, from_engine_error
from server.message_parsing import OutputParsers
from server.outputs import UsageCounter, chat_logprobs, finish_reason, prompt_logprobs_json
from server.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
)
from server.reasoning import REASONING_PARSERS
from server.routes import ERROR_RESPONSES, SSE_RESPONSE
from server.sampling import chat_sampling_params
from server.state import EngineDep, StateDep, arrival_time
from server.streaming import (
    ChatChunker,
    OutputStream,
    ResponseContext,
    engine_request_id,
    respond,
    response_id,
    sse_events,
)
from server.structured import ToolPlan, parameter_constraints, plan_tools

logger = logging.getLogger(__name__)

router = APIRouter(tags=["openai"])


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse,
             responses={**ERROR_RESPONSES, 200: SSE_RESPONSE(ChatCompletionChunk)})
async def create_chat_completion(body: ChatCompletionRequest, request: Request,
                                 state: StateDep, engine: EngineDep) -> Response:
    ctx = ResponseContext(response_id("chatcmpl", body.request_id), int(time.time()),
                          state.model_name_for(body.model))
    params = chat_sampling_params(body, engine.generation_defaults, engine.max_model_len)
    check_request_template(body.chat_template, state.settings.trust_request_chat_template)
    plan = plan_tools(body, state.settings.tool_call_parser,
                      body.chat_template or getattr(engine.tokenizer, "chat_template", None),
                      engine.tokenizer.get_added_vocab() if body.tools or body.functions else {})
    params = await _apply_tool_plan(engine, params, plan)
    options = TemplateOptions(
        add_generation_prompt=body.wants_generation_prompt,
        continue_final_message=body.continue_final_message, chat_template=body.chat_template,
        chat_template_kwargs=body.chat_template_kwargs, documents=body.documents,
        add_special_tokens=body.add_special_tokens, keep_last=params.truncate_prompt_tokens,
        tools=plan.template_tools if plan is not None else None)
    try:
        prompt_ids = await asyncio.to_thread(apply_chat_template, engine.tokenizer,
                                             body.messages, engine.max_model_len, options)
    except EngineError as exc:
        raise from_engine_error(exc, "messages") from exc
    logger.info("%s: chat, %d prompt tokens, n=%d, max_tokens=%s, stream=%s", ctx.response_id,
                len(prompt_ids), body.n, params.max_tokens, body.stream)
    stream = OutputStream(engine, [engine_request_id(ctx, body.request_id)], [prompt_ids],
                          params, arrival_time(request), state.settings.request_timeout)
    parsers = _output_parsers(body, plan, state.settings.reasoning_parser,
                              params.structured_outputs is not None)
    chunker = ChatChunker(ctx, params.logprobs, engine.tokenizer,
                          as_token_ids=body.return_tokens_as_token_ids,
                          return_token_ids=body.return_token_ids, echo_text=_echo_text(body),
                          parsers=parsers)
    events = (lambda: sse_events(stream, chunker, body.n, body.include_usage,
                                 body.continuous_usage, "messages")) if body.stream else None
    return await respond(request, stream, "messages", events,
                         lambda finals: _response(ctx, finals[0], body, params.logprobs, engine,
                                                  parsers))


async def _apply_tool_plan(engine: AsyncEngine, params: SamplingParams,
                           plan: ToolPlan | None) -> SamplingParams:
    """Check every tool's parameters schema (compiled off the event loop, then cached), and
    force the call with the plan's grammar for tool_choice "required" or a named function."""
    if plan is None:
        return params
    for constraint in parameter_constraints(plan):
        await engine.compile_grammar(constraint)
    if plan.parser is not None and plan.parser.keeps_special_tokens and \
            params.skip_special_tokens:
        # Mistral's [TOOL_CALLS] is a special token: skipped, no call could be found
        params = dataclasses.replace(params, skip_special_tokens=False)
    if plan.constraint is None:
        return params
    if params.structured_outputs is not None:
        raise ApiError(400, f"tool_choice {plan.mode!r} forces a tool call, which cannot also "
                       f"match {params.structured_outputs.param}", param="tool_choice")
    return dataclasses.replace(params, structured_outputs=plan.constraint)


def _output_parsers(body: ChatCompletionRequest, plan: ToolPlan | None,
                    reasoning_parser: str | None, is_constrained: bool) -> OutputParsers:
    reasoning = REASONING_PARSERS[reasoning_parser]() if reasoning_parser else None
    if reasoning is not None and is_constrained and reasoning.starts_in_reasoning:
        # a constraint holds from the first token, so the answer never opens with thinking
        # that the template started: all of it is content
        reasoning = None
    if plan is None:
        return OutputParsers(reasoning, None, body.include_reasoning)
    # small models often answer "auto" with bare JSON calls, without the format's markers
    bare_call_names = plan.names if plan.mode == "auto" else frozenset()
    return OutputParsers(reasoning, plan.parser, body.include_reasoning, plan.parallel,
                         bare_call_names)


def _echo_text(body: ChatCompletionRequest) -> str | None:
    """vLLM's chat echo: the last message's text goes first when it is the assistant's own
    (with continue_final_message, the answer then reads as one whole message)."""
    last = body.messages[-1]
    if not body.echo or last.role != "assistant" or not last.content:
        return None
    if isinstance(last.content, str):
        return last.content
    return "\n".join(part.text or "" for part in last.content)


def _response(ctx: ResponseContext, final: RequestOutput, body: ChatCompletionRequest,
              top_logprobs: int | None, engine: AsyncEngine,
              parsers: OutputParsers) -> ChatCompletionResponse:
    counter = UsageCounter()
    counter.update(0, final)
    prefix = _echo_text(body) or ""
    choices = []
    for choice in final.outputs:
        logprobs = None
        if top_logprobs is not None and choice.logprobs is not None:
            logprobs = chat_logprobs(choice.token_ids, choice.logprobs, top_logprobs,
                                     engine.tokenizer, body.return_tokens_as_token_ids)
        parts = parsers.parse(prefix + choice.text)
        reason = finish_reason(choice)
        choices.append(ChatChoice(
            index=choice.index, message=AssistantMessage(
                content=parts.content, tool_calls=parts.tool_calls,
                reasoning_content=parts.reasoning),
            logprobs=logprobs,
            finish_reason="tool_calls" if parts.tool_calls and reason == "stop" else reason,
            token_ids=list(choice.token_ids) if body.return_token_ids else None))
    prompt_logprobs = None
    if body.prompt_logprobs is not None and final.prompt_logprobs is not None:
        prompt_logprobs = prompt_logprobs_json(final.prompt_logprobs, engine.tokenizer,
                                               body.return_tokens_as_token_ids)
    return ChatCompletionResponse(
        id=ctx.response_id, created=ctx.created, model=ctx.model, choices=choices,
        usage=counter.usage(), prompt_logprobs=prompt_logprobs,
        prompt_token_ids=final.prompt_token_ids if body.return_token_ids else None)
