"""OutputProcessor: turns per-step token outputs into RequestOutputs (text, logprobs, n).

It owns the detokenizer state of every user request's choices. Stop strings are found here,
at the text level; the sequences they end are handed back so the engine can finish them in
the core. It sees the core only through EngineCoreOutput values.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from transformers import PreTrainedTokenizerBase

from engine.detokenizer import IncrementalDetokenizer, decode_token
from engine.fault_hooks import FaultHooks
from engine.outputs import (
    CompletionOutput,
    EngineCoreOutput,
    Logprob,
    PositionLogprobs,
    RequestOutput,
    RequestOutputKind,
    RequestTiming,
    TokenLogprobs,
)
from engine.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class _Choice:
    """One of a user request's n sequences, as the client will see it: what is new since
    the last output, and (unless the client takes deltas) everything so far."""

    index: int
    sequence_id: str
    detokenizer: IncrementalDetokenizer
    keeps_all: bool  # CUMULATIVE and FINAL_ONLY outputs need every token
    wants_logprobs: bool
    new_token_ids: list[int] = field(default_factory=list)
    new_text: str = ""
    new_logprobs: list[TokenLogprobs] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    num_tokens: int = 0
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_cached_tokens: int = 0
    first_scheduled: float | None = None
    first_token: float | None = None
    last_token: float | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def add(self, token_ids: list[int], logprobs: list[TokenLogprobs], text: str) -> None:
        self.num_tokens += len(token_ids)
        self.new_token_ids += token_ids
        self.new_text += text
        self.new_logprobs += logprobs
        if self.keeps_all:
            self.token_ids += token_ids
            self.text += text
            self.logprobs += logprobs

    def take_output(self, kind: RequestOutputKind) -> CompletionOutput:
        """This choice's output, then the new part starts over."""
        if kind is RequestOutputKind.DELTA:
            token_ids, text, logprobs = self.new_token_ids, self.new_text, self.new_logprobs
        elif kind is RequestOutputKind.CUMULATIVE:  # copies: the caller may keep them
            token_ids, text, logprobs = list(self.token_ids), self.text, list(self.logprobs)
        else:  # FINAL_ONLY: the one output, after which the choice is forgotten
            token_ids, text, logprobs = self.token_ids, self.text, self.logprobs
        self.new_token_ids, self.new_text, self.new_logprobs = [], "", []
        return CompletionOutput(
            index=self.index, token_ids=token_ids, text=text,
            logprobs=logprobs if self.wants_logprobs else None, num_tokens=self.num_tokens,
            finish_reason=self.finish_reason, stop_reason=self.stop_reason)


@dataclass(slots=True)
class _UserRequest:
    request_id: str
    prompt_token_ids: list[int]
    output_kind: RequestOutputKind
    choices: list[_Choice]
    arrival_time: float
    max_tokens: int | None = None
    error: str | None = None
    # the first choice's prompt logprobs (vLLM's shape), once its first token came; a DELTA
    # request's only until the output that carries them
    prompt_logprobs: list[TokenLogprobs | None] | None = None

    @property
    def finished(self) -> bool:
        return all(c.finished for c in self.choices)


@dataclass(slots=True)
class ProcessedStep:
    """What one step's outputs did to the user requests."""

    outputs: list[RequestOutput] = field(default_factory=list)  # requests to report
    stopped: list[str] = field(default_factory=list)  # sequence ids a stop string finished
    failed: dict[str, str] = field(default_factory=dict)  # user request id -> error message


class OutputProcessor:
    def __init__(self, tokenizer: PreTrainedTokenizerBase,
                 fault_hooks: FaultHooks | None = None) -> None:
        self.tokenizer = tokenizer
        self.fault_hooks = fault_hooks or FaultHooks()
        self.user_requests: dict[str, _UserRequest] = {}
        # sequence id -> (user request, choice index)
        self._owner: dict[str, tuple[_UserRequest, int]] = {}

    def add_request(self, request_id: str, sequence_ids: list[str], prompt_token_ids: list[int],
                    params: SamplingParams, arrival_time: float,
                    max_tokens: int | None = None) -> None:
        """Track a user request whose n choices are the sequences `sequence_ids`, in order;
        `max_tokens` (the resolved limit) is only reported, for the metrics."""
        choices = [self._new_choice(index, sequence_id, prompt_token_ids, params)
                   for index, sequence_id in enumerate(sequence_ids)]
        user_request = _UserRequest(request_id, prompt_token_ids, params.output_kind, choices,
                                    arrival_time, max_tokens)
        self.user_requests[request_id] = user_request
        for index, sequence_id in enumerate(sequence_ids):
            self._owner[sequence_id] = (user_request, index)

    def _new_choice(self, index: int, sequence_id: str, prompt_token_ids: list[int],
                    params: SamplingParams) -> _Choice:
        detokenizer = IncrementalDetokenizer(
            self.tokenizer, prompt_token_ids, params.skip_special_tokens,
            params.stop, params.include_stop_str_in_output,
            spaces_between_special_tokens=params.spaces_between_special_tokens)
        return _Choice(index, sequence_id, detokenizer,
                       keeps_all=params.output_kind is not RequestOutputKind.DELTA,
                       wants_logprobs=params.logprobs is not None)

    def sequence_ids(self, request_id: str) -> list[str]:
        user_request = self.user_requests.get(request_id)
        if user_request is None:
            return []
        return [c.sequence_id for c in user_request.choices]

    def request_id_of(self, sequence_id: str) -> str | None:
        owner = self._owner.get(sequence_id)
        return None if owner is None else owner[0].request_id

    @property
    def num_unfinished_requests(self) -> int:
        return len(self.user_requests)

    # ---- per step ---------------------------------------------------------------------------

    def process(self, core_outputs: Iterable[EngineCoreOutput]) -> ProcessedStep:
        """Apply one step's outputs. An exception while processing one request (detokenizer,
        hook) fails only that request: it is reported in `failed`, not emitted."""
        step = ProcessedStep()
        touched: dict[str, _UserRequest] = {}
        for core_output in core_outputs:
            owner = self._owner.get(core_output.sequence_id)
            if owner is None:
                continue
            user_request, index = owner
            if user_request.request_id in step.failed:
                continue
            choice = user_request.choices[index]
            try:
                if self.fault_hooks.on_request_output is not None:
                    self.fault_hooks.on_request_output(
                        user_request.request_id, user_request.prompt_token_ids,
                        choice.num_tokens + len(core_output.new_token_ids))
                if self._apply(choice, core_output):
                    step.stopped.append(core_output.sequence_id)
                if core_output.prompt_logprobs is not None:
                    user_request.prompt_logprobs = self._prompt_logprobs(
                        core_output.prompt_logprobs)
            except Exception as exc:
                logger.exception("processing the output of %s failed", user_request.request_id)
                step.failed[user_request.request_id] = f"processing the output failed: {exc!r}"
                continue
            touched[user_request.request_id] = user_request
        step.outputs = [self._emit(u) for u in touched.values()
                        if u.request_id not in step.failed and _reports(u)]
        return step

    def _apply(self, choice: _Choice, core_output: EngineCoreOutput) -> bool:
        """Update one choice; True when a stop string ended it before the core did."""
        if choice.finished:
            return False
        _record_times(choice, core_output)
        new_ids = core_output.new_token_ids
        logprobs = ([self._logprobs(p) for p in core_output.new_logprobs]
                    if choice.wants_logprobs and core_output.new_logprobs else [])
        stop_string = None
        for num_kept, token_id in enumerate(new_ids, 1):
            stop_string = choice.detokenizer.update((token_id,))
            if stop_string is not None:
                # a step brings several tokens with speculation: those after the stop go
                new_ids, logprobs = new_ids[:num_kept], logprobs[:num_kept]
                break
        stopped_here = stop_string is not None and core_output.finish_reason is None
        if stop_string is not None:
            choice.finish_reason, choice.stop_reason = "stop", stop_string
        elif core_output.finish_reason is not None:
            choice.finish_reason = core_output.finish_reason
            choice.stop_reason = core_output.stop_reason
        choice.add(new_ids, logprobs, choice.detokenizer.get_delta(finished=choice.finished))
        return stopped_here

    def _logprobs(self, position: PositionLogprobs,
                  texts: dict[int, str] | None = None) -> TokenLogprobs:
        """One position as {token_id: Logprob}; `texts` memoizes decoded tokens across
        positions."""
        texts = {} if texts is None else texts
        entries: TokenLogprobs = {}
        for token_id, logprob, rank in position:
            if token_id in entries:  # the sampled token may also be among the top-k
                continue
            text = texts.get(token_id)
            if text is None:
                text = texts[token_id] = decode_token(self.tokenizer, token_id)
            entries[token_id] = Logprob(logprob, rank, text)
        return entries

    def _prompt_logprobs(self, positions: list[PositionLogprobs]) -> list[TokenLogprobs | None]:
        """vLLM's shape: None for the first prompt token (nothing predicts it), then one dict
        per later token, the prompt token first. Each distinct token is decoded once: across
        a long prompt's top-k the same ids come back again and again."""
        texts: dict[int, str] = {}
        return [None, *(self._logprobs(position, texts) for position in positions)]

    def finish_sequences(self, sequence_ids: Iterable[str], reason: str,
                         error: str | None = None) -> list[RequestOutput]:
        """Finish choices whose sequences ended outside a step (abort, error). An error skips
        the detokenizer: it may be what failed."""
        touched: dict[str, _UserRequest] = {}
        for sequence_id in sequence_ids:
            owner = self._owner.get(sequence_id)
            if owner is None:
                continue
            user_request, index = owner
            self._finish_choice(user_request.choices[index], reason, flush=error is None)
            user_request.error = user_request.error or error
            touched[user_request.request_id] = user_request
        return [self._emit(u) for u in touched.values()]

    def _finish_choice(self, choice: _Choice, reason: str, flush: bool) -> None:
        if flush:
            try:  # held-back text (a possible stop string prefix) goes out with the finish
                self._apply(choice, EngineCoreOutput(choice.sequence_id, [],
                                                     finish_reason=reason))
                return
            except Exception:
                logger.exception("flushing the text of %s failed", choice.sequence_id)
        if not choice.finished:
            choice.finish_reason = reason

    def _emit(self, user_request: _UserRequest) -> RequestOutput:
        kind = user_request.output_kind
        result = RequestOutput(
            request_id=user_request.request_id, prompt_token_ids=user_request.prompt_token_ids,
            outputs=[choice.take_output(kind) for choice in user_request.choices],
            finished=user_request.finished, timing=_merged_timing(user_request),
            num_cached_tokens=user_request.choices[0].num_cached_tokens,
            error=user_request.error, prompt_logprobs=_take_prompt_logprobs(user_request),
            max_tokens=user_request.max_tokens)
        if result.finished:
            result.timing.finished = time.monotonic()
            self._forget(user_request)
        return result

    def _forget(self, user_request: _UserRequest) -> None:
        self.user_requests.pop(user_request.request_id, None)
        for choice in user_request.choices:
            self._owner.pop(choice.sequence_id, None)


def _reports(user_request: _UserRequest) -> bool:
    """Whether a step that changed the request produces an output for it."""
    return user_request.output_kind is not RequestOutputKind.FINAL_ONLY or user_request.finished


def _take_prompt_logprobs(user_request: _UserRequest) -> list[TokenLogprobs | None] | None:
    """The prompt logprobs an output carries: every output from the first token on, or for
    DELTA only the first that has them (the core hands them out once). Never changed once
    set, so CUMULATIVE outputs may share one list."""
    prompt_logprobs = user_request.prompt_logprobs
    if user_request.output_kind is RequestOutputKind.DELTA:
        user_request.prompt_logprobs = None
    return prompt_logprobs


def _record_times(choice: _Choice, core_output: EngineCoreOutput) -> None:
    if core_output.first_scheduled_time is not None and choice.first_scheduled is None:
        choice.first_scheduled = core_output.first_scheduled_time
    choice.num_cached_tokens = max(choice.num_cached_tokens, core_output.num_cached_tokens)
    if core_output.new_token_ids:
        if choice.first_token is None:
            choice.first_token = core_output.time
        choice.last_token = core_output.time


def _merged_timing(user_request: _UserRequest) -> RequestTiming:
    choices = user_request.choices
    return RequestTiming(
        arrival=user_request.arrival_time,
        first_scheduled=min((c.first_scheduled for c in choices
                             if c.first_scheduled is not None), default=None),
        first_token=min((c.first_token for c in choices if c.first_token is not None),
                        default=None),
        last_token=max((c.last_token for c in choices if c.last_token is not None),
                       default=None))
