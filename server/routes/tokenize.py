"""POST /tokenize and /detokenize, with the same tokenizer and chat template as generation."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter

from engine import EngineError
from server.chat_template import TemplateOptions, apply_chat_template, check_request_template
from server.errors import ApiError, from_engine_error
from server.protocol import DetokenizeRequest, DetokenizeResponse, TokenizeRequest, TokenizeResponse
from server.routes import ERROR_RESPONSES
from server.state import EngineDep, StateDep
from server.structured import function_specs, template_tools
from server.tokenization import encode_prompt

router = APIRouter(tags=["tokenizer"])


@router.post("/tokenize", response_model=TokenizeResponse, responses=ERROR_RESPONSES)
async def tokenize(body: TokenizeRequest, state: StateDep, engine: EngineDep) -> TokenizeResponse:
    """The limits of generation hold: a text longer than the context is a 400, found after
    tokenizing about a context's worth of it."""
    state.model_name_for(body.model)
    try:
        if body.messages is not None:
            check_request_template(body.chat_template,
                                   state.settings.trust_request_chat_template)
            options = TemplateOptions(
                add_generation_prompt=body.add_generation_prompt and not
                body.continue_final_message, continue_final_message=body.continue_final_message,
                chat_template=body.chat_template, chat_template_kwargs=body.chat_template_kwargs,
                # a rendered template has its special tokens: more only when asked for
                add_special_tokens=("add_special_tokens" in body.model_fields_set
                                    and body.add_special_tokens),
                tools=template_tools(function_specs(body.tools or ())))
            tokens = await asyncio.to_thread(apply_chat_template, engine.tokenizer, body.messages,
                                             engine.max_model_len, options)
        else:
            tokens = await asyncio.to_thread(encode_prompt, engine.tokenizer, body.prompt or "",
                                             engine.max_model_len, body.add_special_tokens)
    except EngineError as exc:
        raise from_engine_error(exc, "messages" if body.messages is not None else "prompt"
                                ) from exc
    return TokenizeResponse(tokens=list(tokens), count=len(tokens),
                            max_model_len=engine.max_model_len)


@router.post("/detokenize", response_model=DetokenizeResponse, responses=ERROR_RESPONSES)
async def detokenize(body: DetokenizeRequest, state: StateDep,
                     engine: EngineDep) -> DetokenizeResponse:
    state.model_name_for(body.model)
    if len(body.tokens) > engine.max_model_len:
        raise ApiError(400, f"at most max_model_len ({engine.max_model_len}) token ids can be "
                       f"detokenized at once; got {len(body.tokens)}", param="tokens")
    bad = [token for token in body.tokens if not 0 <= token < engine.vocab_size]
    if bad:
        raise ApiError(400, f"token ids must be in [0, {engine.vocab_size}); got {bad[:5]}",
                       param="tokens")
    text = await asyncio.to_thread(engine.tokenizer.decode, body.tokens)
    return DetokenizeResponse(prompt=str(text))
