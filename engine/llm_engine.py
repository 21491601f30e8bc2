"""LLMEngine: the synchronous engine — loading, admission, the core loop and output processing."""

from __future__ import annotations

import logging
import time
from collections import abc
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from engine.config import EngineConfig
from engine.core import EngineCore, FaultHooks, StepStats
from engine.distributed.group import WorkerGroup
from engine.distributed.parallel import SINGLE
from engine.errors import ContextLengthExceededError, InvalidRequestError
from engine.loader import LoadedModel, load_model
from engine.model_source import resolve_model_dir
from engine.output_processor import OutputProcessor
from engine.outputs import RequestOutput
from engine.sampling_params import GENERATION_DEFAULT_FIELDS, SamplingParams
from engine.sequence import Sequence, SequenceStatus
from engine.structured.grammar import CompiledGrammar, GrammarCompiler

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class EngineStats:
    """The engine's load at one moment, in sequences and blocks."""

    num_running: int
    num_waiting: int
    num_unfinished_requests: int  # user requests admitted and not finished
    num_free_blocks: int
    num_total_blocks: int
    kv_cache_usage: float


@dataclass(slots=True)
class PreparedRequest:
    """A validated user request split into its n sequences, ready for the scheduler."""

    request_id: str
    sequences: list[Sequence]
    params: SamplingParams  # the user request's; each sequence has its own seed
    arrival_time: float


class LLMEngine:
    def __init__(self, config: EngineConfig, loaded: LoadedModel | None = None, *,
                 strict_max_model_len: bool = False) -> None:
        """Loads the model and sizes the KV pool. max_model_len is lowered (with a warning) to
        what the pool holds, or, with strict_max_model_len, that is an error."""
        self.config = config
        self.workers: WorkerGroup | None = None  # the other ranks of a parallel group
        try:
            self._start(config, loaded, strict_max_model_len)
        except BaseException:
            self.close(healthy=False)
            raise

    def _start(self, config: EngineConfig, loaded: LoadedModel | None,
               strict_max_model_len: bool) -> None:
        if loaded is None:
            loaded = self._load(config)
        elif config.parallel.world_size > 1:
            raise InvalidRequestError("a parallel group loads its own shards: pass no model")
        self.loaded = loaded
        self.tokenizer = self.loaded.tokenizer
        self.vocab_size = int(self.loaded.hf_config.vocab_size)
        self.eos_token_ids = _eos_token_ids(self.loaded)
        self.generation_defaults = _generation_defaults(self.loaded)
        self.grammars = GrammarCompiler(self.tokenizer, self.vocab_size, self.eos_token_ids)
        model_limit = model_max_len(self.loaded, config.model.max_model_len)
        # the core sizes the KV pool; max_model_len is then capped to what the pool can hold
        self.core = EngineCore(config, self.loaded, model_limit)
        if self.workers is not None:
            self.core.runner.attach_workers(self.workers.channel)
        self.model_max_len = model_limit  # before fitting to the pool
        self.max_model_len = self._fit_max_model_len(model_limit, strict_max_model_len)
        self.fault_hooks: FaultHooks = self.core.fault_hooks  # tests only; shared with the parts
        self.output_processor = OutputProcessor(self.tokenizer, self.fault_hooks)
        self.deferred: dict[str, list[Sequence]] = {}  # siblings waiting for the prompt's blocks
        self.num_deferred = 0  # sequences in `deferred`
        logger.info("KV cache: %d blocks of %d tokens = %d tokens (%.2f GiB); max_model_len %d",
                    self.core.kv_cache_manager.num_total_blocks, config.cache.block_size,
                    self.pool_tokens,
                    self.core.runner.kv_cache_bytes / 1024**3, self.max_model_len)

    def _load(self, config: EngineConfig) -> LoadedModel:
        model = config.model.model
        if model is None:
            from engine.default_model import ensure_default_model  # heavy: only when used

            model = str(ensure_default_model())
        parallel = SINGLE
        if config.parallel.world_size > 1:  # the workers load what rank 0 resolved
            model = str(resolve_model_dir(model))
            self.workers = WorkerGroup.start(config, Path(model))
            parallel = self.workers.parallel
        return load_model(model, dtype=config.model.dtype, device=config.model.device,
                          allow_pickle=config.model.allow_pickle,
                          trust_remote_code=config.model.trust_remote_code,
                          tokenizer=config.model.tokenizer,
                          attn_backend=config.model.attention_backend,
                          quantization=config.model.quantization, parallel=parallel)

    def close(self, healthy: bool = True) -> None:
        """Stop the parallel group's workers, if any (`healthy`: they can still take the
        shutdown message); a no-op for one process."""
        if self.workers is not None:
            self.workers.close(healthy)

    @property
    def pool_tokens(self) -> int:
        return self.core.kv_cache_manager.num_total_blocks * self.config.cache.block_size

    def _fit_max_model_len(self, model_limit: int, strict: bool) -> int:
        if model_limit <= self.pool_tokens:
            return model_limit
        if strict:
            raise InvalidRequestError(
                f"max_model_len {model_limit} does not fit the KV cache, which holds "
                f"{self.pool_tokens} tokens: give the cache more memory or lower max_model_len "
                "(or drop the strict option to have it lowered automatically)",
                param="max_model_len")
        logger.warning("max_model_len lowered from %d to %d: the KV cache holds no more tokens",
                       model_limit, self.pool_tokens)
        return self.pool_tokens

    # ---- admission ----------------------------------------------------------------------------

    def prepare_request(self, request_id: str, prompt_token_ids: abc.Sequence[int],
                        params: SamplingParams,
                        arrival_time: float | None = None) -> PreparedRequest:
        """Validate a user request and split it into n sequences. Raises InvalidRequestError
        (or ContextLengthExceededError) naming the problem; touches no engine state."""
        params.validate(self.vocab_size)
        if params.bad_words or params.bad_words_token_ids:  # engine-filled: never the user's
            params = replace(params, bad_words_token_ids=tokenize_bad_words(
                self.tokenizer, params.bad_words, self.vocab_size))
        prompt = self.check_prompt(prompt_token_ids, params.truncate_prompt_tokens)
        max_tokens = self._resolve_max_tokens(len(prompt), params.max_tokens)
        # cached after the first time: the server compiles off the event loop beforehand
        grammar = (self.grammars.compile(params.structured_outputs)
                   if params.structured_outputs is not None else None)
        arrival = time.monotonic() if arrival_time is None else arrival_time
        sequences = [
            Sequence(sequence_id=_sequence_id(request_id, index, params.n), prompt_token_ids=prompt,
                    sampling_params=self._sequence_params(params, index), arrival_time=arrival,
                    max_tokens=max_tokens)
            for index in range(params.n)]
        if grammar is not None:
            _attach_grammar(sequences, grammar)
        return PreparedRequest(request_id, sequences, params, arrival)

    def check_prompt(self, prompt_token_ids: abc.Sequence[int],
                     truncate_prompt_tokens: int | None = None) -> list[int]:
        """The prompt as a list (only its last `truncate_prompt_tokens` tokens, when given), or
        InvalidRequestError / ContextLengthExceededError: token ids of this vocabulary, at
        most max_model_len of them. Reads only fixed attributes, so any thread may call it."""
        prompt = list(_truncate_prompt(prompt_token_ids, truncate_prompt_tokens))
        if not prompt:
            raise InvalidRequestError("the prompt is empty", param="prompt")
        if len(prompt) > self.max_model_len:  # before the scan: a huge list fails fast
            raise ContextLengthExceededError(self.max_model_len, len(prompt), None)
        if not all(isinstance(t, int) and 0 <= t < self.vocab_size for t in prompt):
            raise InvalidRequestError(
                f"prompt token ids must be integers in [0, {self.vocab_size})", param="prompt")
        return prompt

    def _resolve_max_tokens(self, num_prompt_tokens: int, max_tokens: int | None) -> int:
        room = self.max_model_len - num_prompt_tokens
        if room < 1 or (max_tokens is not None and max_tokens > room):
            raise ContextLengthExceededError(self.max_model_len, num_prompt_tokens, max_tokens)
        return room if max_tokens is None else max_tokens

    def _sequence_params(self, params: SamplingParams, index: int) -> SamplingParams:
        # each of the n sequences gets its own seed so they differ yet stay reproducible
        seed = None if params.seed is None else params.seed + index
        # the prompt's logprobs are the same for every sibling: only the first computes them,
        # so the others still share its prompt blocks through the prefix cache
        prompt_logprobs = params.prompt_logprobs if index == 0 else None
        return replace(params, n=1, seed=seed, eos_token_ids=self.eos_token_ids,
                       prompt_logprobs=prompt_logprobs)

    def add_prepared(self, prepared: PreparedRequest) -> None:
        first, *siblings = prepared.sequences
        if prepared.request_id in self.output_processor.user_requests:
            raise InvalidRequestError(f"request id {prepared.request_id!r} is already in use")
        self.core.add_sequence(first)
        self.output_processor.add_request(
            prepared.request_id, [s.sequence_id for s in prepared.sequences],
            first.prompt_token_ids, prepared.params, prepared.arrival_time, first.max_tokens)
        if siblings and self.config.cache.enable_prefix_caching:
            # siblings start once the first sequence's prompt is cached, so they share its blocks
            self.deferred[first.sequence_id] = siblings
            self.num_deferred += len(siblings)
        else:
            for sibling in siblings:
                self.core.add_sequence(sibling)

    def add_request(self, request_id: str, prompt_token_ids: abc.Sequence[int],
                    params: SamplingParams, arrival_time: float | None = None) -> None:
        self.add_prepared(self.prepare_request(request_id, prompt_token_ids, params, arrival_time))

    # ---- finishing from outside a step ------------------------------------------------------

    def abort_request(self, request_id: str) -> list[RequestOutput]:
        return self._finish_user_request(request_id, SequenceStatus.FINISHED_ABORTED, None)

    def fail_request(self, request_id: str, error: str) -> list[RequestOutput]:
        return self._finish_user_request(request_id, SequenceStatus.FINISHED_ERROR, error)

    def _finish_user_request(self, request_id: str, status: SequenceStatus,
                             error: str | None) -> list[RequestOutput]:
        sequence_ids = self.output_processor.sequence_ids(request_id)
        if not sequence_ids:
            return []
        self._pop_deferred(sequence_ids[0])  # siblings that never reached the core
        self.core.finish_sequences(sequence_ids, status)
        return self.output_processor.finish_sequences(sequence_ids, status.value, error)

    # ---- the loop ---------------------------------------------------------------------------

    def has_unfinished_requests(self) -> bool:
        return self.core.has_unfinished_sequences() or bool(self.deferred)

    def step(self) -> list[RequestOutput]:
        """One engine step. Requests whose content makes the step fail (their forward pass,
        their output processing) fail alone; only errors of the engine itself propagate."""
        if self.fault_hooks.on_step is not None:
            self.fault_hooks.on_step()
        core_step = self.core.step()
        processed = self.output_processor.process(core_step.outputs)
        failed = {**self._user_request_errors(core_step.failed), **processed.failed}
        failed_outputs = [output for request_id, error in failed.items()
                          for output in self.fail_request(request_id, error)]
        if processed.stopped:
            self.core.finish_sequences(processed.stopped, SequenceStatus.FINISHED_STOPPED)
        for core_output in core_step.outputs:
            for sibling in self._pop_deferred(core_output.sequence_id):
                self.core.add_sequence(sibling)
        return processed.outputs + failed_outputs

    def _pop_deferred(self, first_sequence_id: str) -> list[Sequence]:
        siblings = self.deferred.pop(first_sequence_id, [])
        self.num_deferred -= len(siblings)
        return siblings

    def _user_request_errors(self, sequence_errors: dict[str, str]) -> dict[str, str]:
        """Sequence id -> error, as user request id -> error (a sibling fails them all)."""
        errors: dict[str, str] = {}
        for sequence_id, error in sequence_errors.items():
            request_id = self.output_processor.request_id_of(sequence_id)
            if request_id is not None:
                errors.setdefault(request_id, error)
        return errors

    @property
    def last_step_stats(self) -> StepStats:
        return self.core.last_stats

    def stats(self) -> EngineStats:
        """A snapshot of the engine's load; plain reads, safe from any thread."""
        manager = self.core.kv_cache_manager
        return EngineStats(
            num_running=self.core.scheduler.num_running,
            # waiting: the scheduler's queue and the deferred siblings
            num_waiting=self.core.scheduler.num_waiting + self.num_deferred,
            num_unfinished_requests=self.output_processor.num_unfinished_requests,
            num_free_blocks=manager.num_free_blocks, num_total_blocks=manager.num_total_blocks,
            kv_cache_usage=manager.usage)


def _attach_grammar(sequences: list[Sequence], grammar: CompiledGrammar) -> None:
    """Each sequence (each of n) walks the grammar on its own."""
    for sequence in sequences:
        matcher = grammar.new_matcher()
        matcher.sequence_id = sequence.sequence_id
        sequence.grammar = matcher


def _sequence_id(request_id: str, index: int, n: int) -> str:
    return request_id if n == 1 else f"{request_id}#{index}"


def _truncate_prompt(prompt_token_ids: abc.Sequence[int],
                     truncate_prompt_tokens: int | None) -> abc.Sequence[int]:
    """The prompt's last `truncate_prompt_tokens` tokens (all of it when it is no longer)."""
    if truncate_prompt_tokens is None or truncate_prompt_tokens >= len(prompt_token_ids):
        return prompt_token_ids
    return prompt_token_ids[len(prompt_token_ids) - truncate_prompt_tokens:]


def tokenize_bad_words(tokenizer: PreTrainedTokenizerBase, bad_words: abc.Sequence[str],
                       vocab_size: int) -> tuple[tuple[int, ...], ...]:
    """Each bad word as token ids, twice: as given with its leading whitespace stripped (a
    word at the start of the text) and after one space (a word inside it); the spaced form is
    left out when it tokenizes the same. A form holding an id the model cannot produce can
    never occur, so it is left out as well."""
    forms: list[tuple[int, ...]] = []
    for word in bad_words:
        bare = _encode_plain(tokenizer, word.lstrip())
        spaced = _encode_plain(tokenizer, " " + word.lstrip())
        candidates = [bare] if spaced == bare else [bare, spaced]
        forms += [ids for ids in candidates if ids and max(ids) < vocab_size]
    return tuple(forms)


def _encode_plain(tokenizer: PreTrainedTokenizerBase, text: str) -> tuple[int, ...]:
    return tuple(tokenizer.encode(text, add_special_tokens=False))


def model_max_len(loaded: LoadedModel, requested: int | None) -> int:
    limit = loaded.max_positions
    if requested is None:
        return limit
    if requested > limit:
        raise InvalidRequestError(
            f"max_model_len {requested} exceeds the model's limit of {limit} positions",
            param="max_model_len")
    return requested


def _eos_token_ids(loaded: LoadedModel) -> tuple[int, ...]:
    ids: list[int] = []
    generation_config = loaded.generation_config
    configured = generation_config.eos_token_id if generation_config is not None else None
    if configured is None:
        configured = loaded.hf_config.eos_token_id
    for token_id in (configured if isinstance(configured, list) else [configured]):
        if token_id is not None and token_id not in ids:
            ids.append(int(token_id))
    if loaded.tokenizer.eos_token_id is not None and loaded.tokenizer.eos_token_id not in ids:
        ids.append(int(loaded.tokenizer.eos_token_id))
    return tuple(ids)


def _generation_defaults(loaded: LoadedModel) -> dict[str, float | int]:
    """Sampling defaults the checkpoint ships in generation_config.json, when it samples."""
    generation_config = loaded.generation_config
    if generation_config is None or not getattr(generation_config, "do_sample", False):
        return {}
    defaults: dict[str, float | int] = {}
    for name in GENERATION_DEFAULT_FIELDS:
        value = getattr(generation_config, name, None)
        if value is not None:
            defaults[name] = value
    return defaults
