"""LLM: offline batch generation, the synchronous front of the engine."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace
from itertools import count

from engine.config import EngineConfig
from engine.errors import InvalidRequestError
from engine.llm_engine import LLMEngine
from engine.outputs import RequestOutput, RequestOutputKind
from engine.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

Prompt = str | Sequence[int]


class LLM:
    """`LLM(model, **engine_args).generate(prompts, sampling_params)`, as in vLLM.

    model is a Hugging Face directory, a .gguf file, a hub id, or None for the embedded default.
    """

    def __init__(self, model: str | None = None, **engine_args: object) -> None:
        self.llm_engine = LLMEngine(EngineConfig.from_kwargs(model, **engine_args))
        self.tokenizer = self.llm_engine.tokenizer
        self._ids = count()

    def close(self) -> None:
        """Stop the parallel group's workers, if any (also on leaving a `with` block)."""
        self.llm_engine.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def default_sampling_params(self) -> SamplingParams:
        return SamplingParams(**self.llm_engine.generation_defaults)  # type: ignore[arg-type]

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 ) -> list[RequestOutput]:
        """Run every prompt to completion; outputs come back in prompt order, each the
        request's final output as the engine made it (prompt_logprobs included when asked)."""
        prompt_list = _as_prompt_list(prompts)
        # only each request's final output is read: no per-step copies of its tokens
        params_list = [replace(params, output_kind=RequestOutputKind.FINAL_ONLY)
                       for params in self._params_list(sampling_params, len(prompt_list))]
        request_ids = []
        for prompt, params in zip(prompt_list, params_list, strict=True):
            request_id = str(next(self._ids))
            token_ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else prompt
            self.llm_engine.add_request(request_id, token_ids, params)
            request_ids.append(request_id)
        finished = self._run_to_completion()
        outputs = [finished[request_id] for request_id in request_ids]
        for prompt, output in zip(prompt_list, outputs, strict=True):
            output.prompt = prompt if isinstance(prompt, str) else None
        return outputs

    def _params_list(self, sampling_params: SamplingParams | Sequence[SamplingParams] | None,
                     num_prompts: int) -> list[SamplingParams]:
        if sampling_params is None:
            return [self.default_sampling_params()] * num_prompts
        if isinstance(sampling_params, SamplingParams):
            return [sampling_params] * num_prompts
        if len(sampling_params) != num_prompts:
            raise InvalidRequestError(f"got {len(sampling_params)} sampling params for "
                                      f"{num_prompts} prompts; pass one for all or one per prompt")
        return list(sampling_params)

    def _run_to_completion(self) -> dict[str, RequestOutput]:
        finished: dict[str, RequestOutput] = {}
        while self.llm_engine.has_unfinished_requests():
            for output in self.llm_engine.step():
                if output.finished:
                    finished[output.request_id] = output
        return finished


def _as_prompt_list(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    if prompts and isinstance(prompts[0], int):  # one prompt given as token ids
        return [prompts]  # type: ignore[list-item]
    return list(prompts)  # type: ignore[arg-type]
