"""What the engine hands back per request and step: plain data, ready to cross a process seam."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

# (token_id, logprob, rank) for the sampled token, then the top-k alternatives: one
# position's logprobs as the model runner returns them
PositionLogprobs = list[tuple[int, float, int]]
# one position's logprobs: the sampled token first, then the top-k alternatives, as
# {token_id: Logprob}; decoded strings are filled by the output processor
TokenLogprobs = dict[int, "Logprob"]


@dataclass(slots=True)
class Logprob:
    logprob: float
    rank: int  # 1 = most likely
    decoded_token: str | None = None


class RequestOutputKind(enum.Enum):
    """What each RequestOutput of a request holds (SamplingParams.output_kind)."""

    CUMULATIVE = "cumulative"  # everything so far, every step (a copy each time: O(n^2))
    DELTA = "delta"  # only what this step added: streaming
    FINAL_ONLY = "final_only"  # one output, when the request finishes, holding everything


@dataclass(slots=True)
class CompletionOutput:
    """One of the `n` sequences of a request: its tokens, text and logprobs, either so far
    or since the previous output, as the request's output kind says."""

    index: int
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[TokenLogprobs] | None = None  # one entry per token in token_ids
    num_tokens: int = 0  # tokens generated so far, whatever the output kind
    finish_reason: str | None = None  # "stop", "length", "abort", "error"
    stop_reason: int | str | None = None  # the stop string or stop token id that matched

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(slots=True)
class RequestTiming:
    """Monotonic timestamps (time.monotonic()) of a request's milestones; None until reached."""

    arrival: float
    first_scheduled: float | None = None
    first_token: float | None = None
    last_token: float | None = None
    finished: float | None = None


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    timing: RequestTiming
    num_cached_tokens: int = 0
    prompt: str | None = None
    error: str | None = None  # set when finish_reason == "error"
    max_tokens: int | None = None  # the resolved limit on each choice's generated tokens
    # SamplingParams.prompt_logprobs: one entry per prompt token, None for the first (nothing
    # predicts it), each the prompt token itself first, then the top-k alternatives
    prompt_logprobs: list[TokenLogprobs | None] | None = None


@dataclass(slots=True)
class EngineCoreOutput:
    """What one step did to one sequence: new tokens and, when it ended, why. Values only:
    nothing here changes after the step that made it."""

    sequence_id: str
    new_token_ids: list[int]
    new_logprobs: list[PositionLogprobs] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache
    # the prompt's logprobs, for prompt tokens 1 .. P-1 (the first has none): complete, and
    # only with a sequence's first sampled token
    prompt_logprobs: list[PositionLogprobs] | None = None
    first_scheduled_time: float | None = None  # time.monotonic() values
    time: float = 0.0  # when this step's tokens were sampled
