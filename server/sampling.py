"""Request fields → SamplingParams, filling what the request omits from generation_config.json."""

from __future__ import annotations

from collections.abc import Mapping

from engine import GENERATION_DEFAULT_FIELDS, RequestOutputKind, SamplingParams
from server.errors import ApiError
from server.protocol import ChatCompletionRequest, CompletionRequest, SamplingRequest


def chat_sampling_params(request: ChatCompletionRequest,
                         defaults: Mapping[str, float | int]) -> SamplingParams:
    logprobs = (request.top_logprobs or 0) if request.logprobs else None
    return _build(request, defaults, max_tokens=request.max_output_tokens, logprobs=logprobs)


def completion_sampling_params(request: CompletionRequest,
                               defaults: Mapping[str, float | int]) -> SamplingParams:
    if request.suffix:
        raise ApiError(400, "suffix is not supported", param="suffix")
    if request.best_of is not None and request.best_of != request.n:
        raise ApiError(400, "best_of is not supported (it must equal n when given)",
                       param="best_of")
    if request.echo and request.logprobs is not None:
        raise ApiError(400, "echo with logprobs is not supported: prompt logprobs are not "
                       "computed", param="echo")
    return _build(request, defaults, max_tokens=request.max_tokens, logprobs=request.logprobs)


def _build(request: SamplingRequest, defaults: Mapping[str, float | int],
           max_tokens: int | None, logprobs: int | None) -> SamplingParams:
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
        logit_bias=_logit_bias(request.logit_bias), **kwargs,  # type: ignore[arg-type]
    )


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
