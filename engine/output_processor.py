"""OutputProcessor: turns per-step token outputs into RequestOutputs (text deltas, logprobs, n).

It owns the detokenizer state of every request. Stop strings are found here, at the text level;
the requests they end are handed back so the engine can finish them in the core.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from transformers import PreTrainedTokenizerBase

from engine.core import EngineCoreOutput, FaultHooks
from engine.detokenizer import IncrementalDetokenizer, decode_token
from engine.model_runner import PositionLogprobs
from engine.outputs import CompletionOutput, Logprob, RequestOutput, RequestTiming, TokenLogprobs
from engine.request import Request

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class _Choice:
    """One of a user request's n sequences, as the client will see it."""

    output: CompletionOutput
    detokenizer: IncrementalDetokenizer
    wants_logprobs: bool
    request: Request  # the engine-side sequence


@dataclass(slots=True)
class _UserRequest:
    request_id: str
    prompt_token_ids: list[int]
    choices: list[_Choice]
    arrival_time: float
    error: str | None = None

    @property
    def finished(self) -> bool:
        return all(c.output.finished for c in self.choices)


@dataclass(slots=True)
class ProcessedStep:
    """What one step's outputs did to the user requests."""

    outputs: list[RequestOutput] = field(default_factory=list)  # requests that changed
    stopped: list[str] = field(default_factory=list)  # sequence ids a stop string finished
    failed: dict[str, str] = field(default_factory=dict)  # user request id -> error message


class OutputProcessor:
    def __init__(self, tokenizer: PreTrainedTokenizerBase,
                 fault_hooks: FaultHooks | None = None) -> None:
        self.tokenizer = tokenizer
        self.fault_hooks = fault_hooks or FaultHooks()
        self.user_requests: dict[str, _UserRequest] = {}
        self.owner: dict[str, tuple[_UserRequest, int]] = {}  # sequence id -> (user request, index)

    def add_request(self, request_id: str, sequences: Sequence[Request],
                    arrival_time: float) -> None:
        """Track a user request whose n sequences are `sequences` (index order)."""
        choices = [self._new_choice(index, seq) for index, seq in enumerate(sequences)]
        user_request = _UserRequest(request_id, list(sequences[0].prompt_token_ids), choices,
                                    arrival_time)
        self.user_requests[request_id] = user_request
        for index, seq in enumerate(sequences):
            self.owner[seq.request_id] = (user_request, index)

    def _new_choice(self, index: int, request: Request) -> _Choice:
        params = request.sampling_params
        detokenizer = IncrementalDetokenizer(
            self.tokenizer, request.prompt_token_ids, params.skip_special_tokens,
            params.stop, params.include_stop_str_in_output)
        output = CompletionOutput(index=index, logprobs=[] if params.logprobs is not None else None)
        return _Choice(output, detokenizer, params.logprobs is not None, request)

    def sequence_ids(self, request_id: str) -> list[str]:
        user_request = self.user_requests.get(request_id)
        if user_request is None:
            return []
        return [c.request.request_id for c in user_request.choices]

    # ---- per step ---------------------------------------------------------------------------

    def process(self, core_outputs: Iterable[EngineCoreOutput]) -> ProcessedStep:
        """Apply one step's outputs. An exception while processing one request (detokenizer,
        hook) fails only that request: it is reported in `failed`, not emitted."""
        step = ProcessedStep()
        touched: dict[str, _UserRequest] = {}
        for core_output in core_outputs:
            sequence = core_output.request
            owner = self.owner.get(sequence.request_id)
            if owner is None:
                continue
            user_request, index = owner
            if user_request.request_id in step.failed:
                continue
            try:
                if self.fault_hooks.on_request_output is not None:
                    self.fault_hooks.on_request_output(sequence)
                if self._apply(user_request.choices[index], core_output):
                    step.stopped.append(sequence.request_id)
            except Exception as exc:
                logger.exception("processing the output of %s failed", user_request.request_id)
                step.failed[user_request.request_id] = f"processing the output failed: {exc!r}"
                continue
            touched[user_request.request_id] = user_request
        step.outputs = [self._emit(u) for u in touched.values()
                        if u.request_id not in step.failed]
        return step

    def _apply(self, choice: _Choice, core_output: EngineCoreOutput) -> bool:
        """Update one choice; True when a stop string ended it before the core did."""
        output = choice.output
        if output.finished:
            return False
        new_ids = core_output.new_token_ids
        output.token_ids.extend(new_ids)
        output.delta_token_ids.extend(new_ids)
        if choice.wants_logprobs and core_output.new_logprobs is not None:
            entries = [self._logprobs(p) for p in core_output.new_logprobs]
            assert output.logprobs is not None
            output.logprobs.extend(entries)
            output.delta_logprobs = (output.delta_logprobs or []) + entries
        stop_string = choice.detokenizer.update(new_ids) if new_ids else None
        stopped_here = stop_string is not None and core_output.finish_reason is None
        if stop_string is not None:
            output.finish_reason, output.stop_reason = "stop", stop_string
        elif core_output.finish_reason is not None:
            output.finish_reason = core_output.finish_reason
            output.stop_reason = core_output.request.stop_reason
        delta_text = choice.detokenizer.get_delta(finished=output.finished)
        output.delta_text += delta_text
        output.text += delta_text
        return stopped_here

    def _logprobs(self, position: PositionLogprobs) -> TokenLogprobs:
        entries: TokenLogprobs = {}
        for token_id, logprob, rank in position:
            if token_id not in entries:  # the sampled token may also be among the top-k
                entries[token_id] = Logprob(logprob, rank, decode_token(self.tokenizer, token_id))
        return entries

    def finish_sequences(self, requests: Iterable[Request], reason: str,
                         error: str | None = None) -> list[RequestOutput]:
        """Finish choices whose sequences ended outside a step (abort, error). An error skips
        the detokenizer: it may be what failed."""
        touched: dict[str, _UserRequest] = {}
        for request in requests:
            owner = self.owner.get(request.request_id)
            if owner is None:
                continue
            user_request, index = owner
            self._finish_choice(user_request.choices[index], request, reason, flush=error is None)
            user_request.error = user_request.error or error
            touched[user_request.request_id] = user_request
        return [self._emit(u) for u in touched.values()]

    def _finish_choice(self, choice: _Choice, request: Request, reason: str,
                       flush: bool) -> None:
        if flush:
            try:  # held-back text (a possible stop string prefix) goes out with the finish
                self._apply(choice, EngineCoreOutput(request, [], None, reason))
                return
            except Exception:
                logger.exception("flushing the text of %s failed", request.request_id)
        if not choice.output.finished:
            choice.output.finish_reason = reason

    def _emit(self, user_request: _UserRequest) -> RequestOutput:
        outputs = []
        for choice in user_request.choices:
            outputs.append(_snapshot(choice.output))
            _clear_delta(choice.output)
        first = user_request.choices[0].request
        result = RequestOutput(
            request_id=user_request.request_id, prompt_token_ids=user_request.prompt_token_ids,
            outputs=outputs, finished=user_request.finished,
            timing=_merged_timing(user_request),
            num_cached_tokens=max(first.num_cached_tokens, 0),
            error=user_request.error)
        if result.finished:
            result.timing.finished = time.monotonic()
            self._forget(user_request)
        return result

    def _forget(self, user_request: _UserRequest) -> None:
        self.user_requests.pop(user_request.request_id, None)
        for choice in user_request.choices:
            self.owner.pop(choice.request.request_id, None)


def _snapshot(output: CompletionOutput) -> CompletionOutput:
    """A copy that later steps cannot mutate (callers may hold it across steps)."""
    return CompletionOutput(
        index=output.index, token_ids=list(output.token_ids), text=output.text,
        delta_token_ids=list(output.delta_token_ids), delta_text=output.delta_text,
        logprobs=None if output.logprobs is None else list(output.logprobs),
        delta_logprobs=output.delta_logprobs, finish_reason=output.finish_reason,
        stop_reason=output.stop_reason)


def _clear_delta(output: CompletionOutput) -> None:
    output.delta_token_ids = []
    output.delta_text = ""
    output.delta_logprobs = None if output.logprobs is None else []


def _merged_timing(user_request: _UserRequest) -> RequestTiming:
    timings = [c.request.timing for c in user_request.choices]
    timing = RequestTiming(arrival=user_request.arrival_time)
    timing.first_scheduled = min((t.first_scheduled for t in timings
                                  if t.first_scheduled is not None), default=None)
    timing.first_token = min((t.first_token for t in timings if t.first_token is not None),
                             default=None)
    timing.last_token = max((t.last_token for t in timings if t.last_token is not None),
                            default=None)
    return timing
