"""Sequence: one sequence's evolving state inside the engine, from arrival to finish."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Protocol

from engine.outputs import PositionLogprobs, RequestTiming
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


class TokenConstraint(Protocol):
    """What the scheduler sees of a sequence's grammar (engine/structured/grammar.py)."""

    def accept(self, token_id: int) -> bool: ...

    @property
    def is_finished(self) -> bool: ...

    @property
    def is_broken(self) -> bool: ...


@dataclass(slots=True, eq=False)
class Sequence:
    """A single sequence. A user request with n > 1 becomes n Sequences that share a parent id.

    Invariant: num_computed_tokens <= num_tokens; the tokens in [num_computed_tokens,
    num_tokens) still need a forward pass before the next token can be sampled. (While a pass
    verifies proposals, num_computed_tokens counts them too; Scheduler.update_from_output
    brings it back to the accepted tokens.)
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
    # the grammar its output must match (structured outputs), advanced with every token
    grammar: TokenConstraint | None = None
    # speculative decoding: tokens proposed to follow all_token_ids, verified by the next
    # pass. Never part of all_token_ids (nor hashed) until accepted; the scheduler takes them
    spec_token_ids: list[int] = field(default_factory=list)
    timing: RequestTiming = field(init=False)
    # logprobs of prompt tokens 1, 2, ... as passes compute them; None when the params do not
    # ask for them, or once handed out with the first sampled token
    prompt_logprobs: list[PositionLogprobs] | None = field(init=False)

    def __post_init__(self) -> None:
        if not self.all_token_ids:
            self.all_token_ids = list(self.prompt_token_ids)
        self.timing = RequestTiming(arrival=self.arrival_time)
        self.prompt_logprobs = [] if self.sampling_params.prompt_logprobs is not None else None

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

    @property
    def is_decoding(self) -> bool:
        """Running with every token but the last computed: its next pass is one decode token
        (plus any speculative ones)."""
        return (self.status == SequenceStatus.RUNNING
                and self.num_computed_tokens == self.num_tokens - 1)

    def append_output_token_id(self, token_id: int) -> None:
        self.all_token_ids.append(token_id)
        if self.grammar is not None:
            self.grammar.accept(token_id)

    # ---- prompt logprobs ----------------------------------------------------------------------

    @property
    def needs_prompt_logprobs(self) -> bool:
        """Whether prompt tokens still lack logprobs: until then every prompt position must
        run through the model (no prefix-cache hits). False once complete, so a recompute
        after preemption neither computes them again nor is kept from the prefix cache."""
        return (self.prompt_logprobs is not None
                and len(self.prompt_logprobs) < self.num_prompt_tokens - 1)

    @property
    def num_prompt_logprobs(self) -> int:
        """Prompt tokens with logprobs so far: those at positions 1 .. num_prompt_logprobs."""
        return 0 if self.prompt_logprobs is None else len(self.prompt_logprobs)

    def add_prompt_logprobs(self, entries: list[PositionLogprobs]) -> None:
        """Commit what a successful pass computed for the next prompt positions."""
        assert self.prompt_logprobs is not None, "this sequence did not ask for prompt logprobs"
        assert len(self.prompt_logprobs) + len(entries) < self.num_prompt_tokens
        self.prompt_logprobs.extend(entries)

    def take_prompt_logprobs(self) -> list[PositionLogprobs] | None:
        """The complete prompt logprobs, once (they go out with the first sampled token);
        None before they are complete, after they were taken, or when not asked for."""
        if self.prompt_logprobs is None or self.needs_prompt_logprobs:
            return None
        taken, self.prompt_logprobs = self.prompt_logprobs, None
        return taken
