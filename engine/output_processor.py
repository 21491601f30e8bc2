"""OutputProcessor: turns per-step token outputs into RequestOutputs (text deltas, logprobs, n).

It owns the detokenizer state of every request. Stop strings are found here, at the text level;
the requests they end are handed back so the engine can finish them in the core.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from engine.core import EngineCoreOutput
from engine.detokenizer import IncrementalDetokenizer, decode_token
from engine.model_runner import PositionLogprobs
from engine.outputs import CompletionOutput, Logprob, RequestOutput, RequestTiming, TokenLogprobs
from engine.request import Request


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


class OutputProcessor:
    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
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

    def process(self, core_outputs: Iterable[EngineCoreOutput]) -> tuple[list[RequestOutput],
                                                                         list[str]]:
        """Apply one step's outputs. Returns the RequestOutputs of every user request that
        changed, and the sequence ids that a stop string finished (to finish in the core)."""
        stopped: list[str] = []
        touched: dict[str, _UserRequest] = {}
        for core_output in core_outputs:
            owner = self.owner.get(core_output.request.request_id)
            if owner is None:
                continue
            user_request, index = owner
            if self._apply(user_request.choices[index], core_output):
                stopped.append(core_output.request.request_id)
            touched[user_request.request_id] = user_request
        return [self._emit(u) for u in touched.values()], stopped

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
        """Finish choices whose sequences ended outside a step (abort, error)."""
        touched: dict[str, _UserRequest] = {}
        for request in requests:
            owner = self.owner.get(request.request_id)
            if owner is None:
                continue
            user_request, index = owner
            self._apply(user_request.choices[index], EngineCoreOutput(request, [], None, reason))
            user_request.error = user_request.error or error
            touched[user_request.request_id] = user_request
        return [self._emit(u) for u in touched.values()]

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
