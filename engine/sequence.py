"""Sequence: one sequence's evolving state inside the engine, from arrival to finish."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from engine.outputs import RequestTiming
from engine.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"
    FINISHED_ERROR = "error"

    @property
    def is_finished(self) -> bool:
        return self in _FINISHED

    @property
    def finish_reason(self) -> str | None:
        return self.value if self.is_finished else None


_FINISHED = frozenset({SequenceStatus.FINISHED_STOPPED, SequenceStatus.FINISHED_LENGTH,
                       SequenceStatus.FINISHED_ABORTED, SequenceStatus.FINISHED_ERROR})


@dataclass(slots=True, eq=False)
class Sequence:
    """A single sequence. A user request with n > 1 becomes n Sequences that share a parent id.

    Invariant: num_computed_tokens <= num_tokens; the tokens in [num_computed_tokens,
    num_tokens) still need a forward pass before the next token can be sampled.
    """

    sequence_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    arrival_time: float
    max_tokens: int  # resolved limit on generated tokens (never None inside the engine)
    status: SequenceStatus = SequenceStatus.WAITING
    all_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = -1  # prefix-cache hit at first schedule; -1 until scheduled
    num_preemptions: int = 0
    block_hashes: list[bytes] = field(default_factory=list)  # filled by the KV cache manager
    stop_reason: int | str | None = None
    timing: RequestTiming = field(init=False)

    def __post_init__(self) -> None:
        if not self.all_token_ids:
            self.all_token_ids = list(self.prompt_token_ids)
        self.timing = RequestTiming(arrival=self.arrival_time)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.all_token_ids) - len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.all_token_ids[len(self.prompt_token_ids):]

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    def append_output_token_id(self, token_id: int) -> None:
        self.all_token_ids.append(token_id)
