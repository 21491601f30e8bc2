"""What the engine hands back per request and step: plain data, ready to cross a process seam."""

from __future__ import annotations

from dataclasses import dataclass, field

# one position's logprobs: the sampled token first, then the top-k alternatives, as
# {token_id: Logprob}; decoded strings are filled by the output processor
TokenLogprobs = dict[int, "Logprob"]


@dataclass(slots=True)
class Logprob:
    logprob: float
    rank: int  # 1 = most likely
    decoded_token: str | None = None


@dataclass(slots=True)
class CompletionOutput:
    """One of the `n` sequences of a request, cumulative so far plus what this step added."""

    index: int
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    delta_token_ids: list[int] = field(default_factory=list)
    delta_text: str = ""
    logprobs: list[TokenLogprobs] | None = None  # one entry per generated token, cumulative
    delta_logprobs: list[TokenLogprobs] | None = None
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
