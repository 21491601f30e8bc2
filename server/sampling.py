"""Request fields → SamplingParams, filling what the request omits from generation_config.json."""

from __future__ import annotations

from collections.abc import Mapping

from engine import GENERATION_DEFAULT_FIELDS, RequestOutputKind, SamplingParams
from server.errors import ApiError
from server.protocol import ChatCompletionRequest, CompletionRequest, SamplingRequest
from server.structured import output_constraint


def check_combinations(request: SamplingRequest) -> None:
    """Fields that are fine alone but not together: a 400 naming the one that cannot apply."""
    if request.stream_options is not None and not request.stream:
        raise ApiError(400, "stream_options is only allowed with stream=true",
                       param="stream_options")
    if request.prompt_logprobs is not None and request.stream:
        raise ApiError(400, "prompt_logprobs is not available with stream=true",
                       param="prompt_logprobs")
    if (isinstance(request, ChatCompletionRequest) and request.continue_final_message
            and request.wants_generation_prompt):
        raise ApiError(400, "continue_final_message continues the last message, so "
                       "add_generation_prompt must not be true as well",
                       param="continue_final_message")


def chat_sampling_params(request: ChatCompletionRequest, defaults: Mapping[str, float | int],
                         max_model_len: int) -> SamplingParams:
    check_combinations(request)
    logprobs = (request.top_logprobs or 0) if request.logprobs else None
    return _build(request, defaults, max_model_len, max_tokens=request.max_output_tokens,
                  logprobs=logprobs, prompt_logprobs=request.prompt_logprobs)


def completion_sampling_params(request: CompletionRequest, defaults: Mapping[str, float | int],
                               max_model_len: int) -> SamplingParams:
    check_combinations(request)
    if request.best_of is not None and request.best_of != request.n:
        raise ApiError(400, "best_of is not supported (it must equal n when given)",
                       param="best_of")
    prompt_logprobs = request.prompt_logprobs
    if request.echo and request.logprobs is not None:
        # the echoed prompt's tokens get logprobs like the completion's (OpenAI's legacy API)
        prompt_logprobs = max(prompt_logprobs or 0, request.logprobs)
    return _build(request, defaults, max_model_len, max_tokens=request.max_tokens,
                  logprobs=request.logprobs, prompt_logprobs=prompt_logprobs)


def _build(request: SamplingRequest, defaults: Mapping[str, float | int], max_model_len: int,
           max_tokens: int | None, logprobs: int | None,
           prompt_logprobs: int | None) -> SamplingParams:
    kwargs: dict[str, object] = {}
    # the fields whose default comes from the model's generation config
    for name in GENERATION_DEFAULT_FIELDS:
        value = getattr(request, name)
        if value is None:
            value = defaults.get(name)
        if value is not None:
            kwargs[name] = value
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(request, name) is not None:
            kwargs[name] = getattr(request, name)
    # a stream takes each step's new tokens; a whole response waits for the final output
    kind = RequestOutputKind.DELTA if request.stream else RequestOutputKind.FINAL_ONLY
    return SamplingParams(
        output_kind=kind, n=request.n, max_tokens=max_tokens, logprobs=logprobs, seed=request.seed,
        stop=_stop_strings(request.stop), stop_token_ids=tuple(request.stop_token_ids or ()),
        min_tokens=request.min_tokens, ignore_eos=request.ignore_eos,
        skip_special_tokens=request.skip_special_tokens,
        include_stop_str_in_output=request.include_stop_str_in_output,
        logit_bias=_logit_bias(request.logit_bias), prompt_logprobs=prompt_logprobs,
        allowed_token_ids=(tuple(request.allowed_token_ids)
                           if request.allowed_token_ids is not None else None),
        bad_words=tuple(request.bad_words or ()),
        truncate_prompt_tokens=_truncation(request.truncate_prompt_tokens, max_model_len),
        spaces_between_special_tokens=request.spaces_between_special_tokens,
        cache_salt=request.cache_salt, structured_outputs=output_constraint(request),
        **kwargs,  # type: ignore[arg-type]
    )


def _truncation(truncate_prompt_tokens: int | None, max_model_len: int) -> int | None:
    """vLLM's -1 means "to the context length"; 0 keeps nothing, which no prompt can be."""
    if truncate_prompt_tokens == -1:
        return max_model_len
    if truncate_prompt_tokens == 0:
        raise ApiError(400, "truncate_prompt_tokens must be at least 1 (or -1: the context "
                       "length)", param="truncate_prompt_tokens")
    return truncate_prompt_tokens


def _stop_strings(stop: str | list[str] | None) -> tuple[str, ...]:
    if stop is None:
        return ()
    return (stop,) if isinstance(stop, str) else tuple(stop)


def _logit_bias(bias: Mapping[str, float] | None) -> dict[int, float] | None:
    """OpenAI sends token ids as JSON object keys, i.e. strings."""
    if not bias:
        return None
    try:
        return {int(token_id): float(value) for token_id, value in bias.items()}
    except ValueError as exc:
        raise ApiError(400, "logit_bias keys must be token ids", param="logit_bias") from exc
